//! What the GENEVE redirector must do, decided without touching the kernel:
//! the enrolled-pod table, ztunnel changes and start-up reconciliation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use super::constants::{NODE_INBOUND_LINK, TABLE_INBOUND, ZTUNNEL_INBOUND_ADDR};
use super::routing::{held_pod_route, pod_route, unreachable_route};
use crate::redirect::netlink::{Route, RouteKind};

/// The ztunnel pod GENEVE redirection points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelPod {
    /// `metadata.uid`.
    pub uid: String,
    /// Pod IP (IPv4: this mode is IPv4 only, as upstream).
    pub ip: Ipv4Addr,
    /// The pod's network namespace (`/proc/<pid>/ns/net`, a CNI netns path...).
    pub netns: PathBuf,
    /// The pod's interface toward the node (`eth0`).
    pub iface: String,
}

/// One enrolled pod as the redirector remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    /// `namespace/name`, for messages.
    pub key: String,
    pub ip: Ipv4Addr,
}

/// Enrolled pods by UID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodTable {
    pods: BTreeMap<String, PodEntry>,
}

/// What enrolling a pod takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolPlan {
    pub ip: Ipv4Addr,
    /// UIDs of other pods recorded with the same IP: gone pods whose IP was
    /// reused. They are forgotten (the ipset entry gets the new UID; the
    /// route is the same).
    pub stale: Vec<String>,
    /// The pod was recorded with another IP, whose entry and route must go.
    pub old_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("pod {key} has no IPv4 address (GENEVE redirection is IPv4 only)")]
    NoIpv4 { key: String },
}

/// The pod's IPv6 addresses GENEVE mode does not capture (dual-stack pods: their IPv6
/// traffic bypasses ztunnel, so the agent warns at enrolment).
pub fn uncaptured_ipv6(ips: &[IpAddr]) -> Vec<IpAddr> {
    ips.iter()
        .filter(|ip| matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none()))
        .copied()
        .collect()
}

/// The pod's first IPv4 address.
pub fn pod_ipv4(ips: &[IpAddr]) -> Option<Ipv4Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    })
}

impl PodTable {
    pub fn get(&self, uid: &str) -> Option<&PodEntry> {
        self.pods.get(uid)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &PodEntry)> {
        self.pods.iter()
    }

    /// Decides how to enrol `uid`; [`PodTable::commit_enrol`] records it once
    /// the kernel work is done.
    pub fn plan_enrol(&self, uid: &str, key: &str, ips: &[IpAddr]) -> Result<EnrolPlan, PlanError> {
        let ip = pod_ipv4(ips).ok_or_else(|| PlanError::NoIpv4 {
            key: key.to_string(),
        })?;
        let stale = self
            .pods
            .iter()
            .filter(|(u, e)| u.as_str() != uid && e.ip == ip)
            .map(|(u, _)| u.clone())
            .collect();
        let old_ip = self.pods.get(uid).map(|e| e.ip).filter(|old| *old != ip);
        Ok(EnrolPlan { ip, stale, old_ip })
    }

    pub fn commit_enrol(&mut self, uid: &str, key: &str, plan: &EnrolPlan) {
        for s in &plan.stale {
            self.pods.remove(s);
        }
        self.pods.insert(
            uid.to_string(),
            PodEntry {
                key: key.to_string(),
                ip: plan.ip,
            },
        );
    }

    /// Decides what unenrolling `uid` removes from the kernel: its recorded
    /// IP (or, if it was never recorded, the first IPv4 of `ips`), unless
    /// another enrolled pod now holds that IP. Forgets `uid`.
    pub fn unenrol(&mut self, uid: &str, ips: &[IpAddr]) -> Option<Ipv4Addr> {
        let ip = match self.pods.remove(uid) {
            Some(e) => e.ip,
            None => pod_ipv4(ips)?,
        };
        (!self.pods.values().any(|e| e.ip == ip)).then_some(ip)
    }

    /// Forgets `uid`; returns what was recorded.
    pub fn remove(&mut self, uid: &str) -> Option<PodEntry> {
        self.pods.remove(uid)
    }

    pub fn clear(&mut self) {
        self.pods.clear();
    }
}

/// What a new ztunnel pod (or none) means for the node.
///
/// GENEVE mode fails closed: once the node captures enrolled pods' traffic,
/// losing the ztunnel never releases it. The capture (ipset, marks, policy
/// rules, tunnels, table 100) stays and every route of tables 101–102
/// becomes `unreachable` ("held", [`hold_route`]); the ztunnel side is
/// removed. Enrolled pods' traffic is refused or dropped instead of crossing
/// the underlay in plaintext, until a
/// Ready ztunnel takes it again. Only unenrolment and the full clean-up
/// (uninstall) remove capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZtunnelChange {
    /// No ztunnel before or after, nothing to hold.
    Nothing,
    /// Same pod, same IP and netns: re-apply idempotently (repairs drift,
    /// keeps the tunnels).
    Refresh,
    /// A ztunnel after none (or after a hold): build everything, then the
    /// enrolled pods' routes (each replaces its held route in place).
    Build,
    /// Another pod or a new IP: hold, then build against the new one.
    Rebuild,
    /// ztunnel gone (or a capture left without one, e.g. by an earlier
    /// agent): hold — the routes of tables 101–102 become `unreachable`
    /// and the old ztunnel netns' setup is removed; the ipset, iptables
    /// rules, policy rules, tunnels, table 100 and pod table are kept.
    Hold,
}

/// `needs_hold`: no ztunnel is active but the node may still route into
/// tunnels (an earlier agent's capture, or an interrupted hold).
pub fn plan_ztunnel_change(
    current: Option<&ZtunnelPod>,
    new: Option<&ZtunnelPod>,
    needs_hold: bool,
) -> ZtunnelChange {
    match (current, new) {
        (None, None) if needs_hold => ZtunnelChange::Hold,
        (None, None) => ZtunnelChange::Nothing,
        (None, Some(_)) => ZtunnelChange::Build,
        (Some(_), None) => ZtunnelChange::Hold,
        (Some(a), Some(b)) if a == b => ZtunnelChange::Refresh,
        (Some(_), Some(_)) => ZtunnelChange::Rebuild,
    }
}

/// How enrolled pods' inbound traffic is routed (their table-100 `/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodRouting {
    /// Not known yet (before the first ztunnel decision): per-pod routes
    /// are left as they are.
    Untouched,
    /// Into `istioin`, with `$HOST_IP` as source.
    Tunnel { host_ip: Ipv4Addr },
    /// No ztunnel. With `host_ip` (the tunnels are kept): into `istioin` as
    /// usual — its outer packets find only `unreachable` routes, so they
    /// are dropped, while the node's own connections to the pod (kubelet
    /// probes, re-routed by their 0x220 mark after this first lookup)
    /// still work. Without (no tunnel to route into): `unreachable`.
    Held { host_ip: Option<Ipv4Addr> },
}

impl PodRouting {
    /// The table-100 route pod `ip` must have; `None`: leave routes alone.
    pub fn route(&self, ip: Ipv4Addr) -> Option<Route> {
        match self {
            PodRouting::Untouched => None,
            PodRouting::Tunnel { host_ip }
            | PodRouting::Held {
                host_ip: Some(host_ip),
            } => Some(pod_route(ip, *host_ip)),
            PodRouting::Held { host_ip: None } => Some(held_pod_route(ip)),
        }
    }
}

/// Holding the node: what a route of tables 101–102 becomes: the tunnel
/// defaults and `$ZT/32` routes become `unreachable` with the same table
/// and destination, replacing them in place. Table 100 is kept as it is:
/// its per-pod routes let the kubelet probe enrolled pods, and its
/// `$ZT/32` route is the node's only way to the ztunnel pod (rule 103 sends
/// *all* traffic through table 100), so a restarting ztunnel can pass its
/// readiness probe, which the node waits for before it builds again. An
/// `unreachable $ZT/32` there deadlocked a ztunnel restarted in place; it
/// also looked like a held pod route and was swept as a stray. The outer
/// packets of held inbound traffic still reach no proxy: the ztunnel side
/// (`pistioin`) is removed on hold. `None`: keep as is.
pub fn hold_route(r: &Route) -> Option<Route> {
    if r.table == TABLE_INBOUND || r.kind == RouteKind::Unreachable {
        return None;
    }
    Some(unreachable_route(r.table, r.dst))
}

/// Kernel changes that make the node match a wanted set of pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcilePlan {
    /// ipset entries to add or re-comment: (IP, UID).
    pub ipset_add: Vec<(Ipv4Addr, String)>,
    /// ipset entries to delete.
    pub ipset_del: Vec<Ipv4Addr>,
    /// Per-pod routes to add (only when tunnels are up).
    pub routes_add: Vec<Route>,
    /// Routes in table 100 through `istioin` that no wanted pod needs.
    pub routes_del: Vec<Route>,
    /// UIDs found in the ipset comments that are not wanted.
    pub removed_uids: Vec<String>,
}

impl ReconcilePlan {
    pub fn is_empty(&self) -> bool {
        self.ipset_add.is_empty()
            && self.ipset_del.is_empty()
            && self.routes_add.is_empty()
            && self.routes_del.is_empty()
    }
}

/// A per-pod route of table 100 in either form: through `istioin`, or
/// `unreachable` while held.
pub fn is_any_pod_route(r: &Route) -> bool {
    r.table == TABLE_INBOUND
        && r.dst.prefix_len() == 32
        && match r.kind {
            RouteKind::Unreachable => true,
            RouteKind::Unicast => r.dev == NODE_INBOUND_LINK && r.via == Some(ZTUNNEL_INBOUND_ADDR),
            RouteKind::Local => false,
        }
}

/// Compares `wanted` (UID → IP) with the kernel: the ipset (`None`: set
/// missing) and the routes of table 100 (`None`: per-pod routes are left
/// alone). `pod_route` builds the wanted route of an IP.
///
/// A wanted IP whose route differs (held ↔ tunnel, stale source) gets its
/// route in `routes_add` only: adding replaces it in place (same table and
/// destination), so the pod is never without a route. Per-pod routes of
/// IPs that are not wanted go to `routes_del`.
pub fn plan_reconcile(
    wanted: &BTreeMap<String, Ipv4Addr>,
    ipset: Option<&BTreeMap<Ipv4Addr, String>>,
    table_inbound: Option<&[Route]>,
    pod_route: impl Fn(Ipv4Addr) -> Route,
) -> ReconcilePlan {
    let mut plan = ReconcilePlan::default();
    let empty = BTreeMap::new();
    let have = ipset.unwrap_or(&empty);
    let wanted_ips: BTreeSet<Ipv4Addr> = wanted.values().copied().collect();
    for (uid, ip) in wanted {
        if have.get(ip) != Some(uid) {
            plan.ipset_add.push((*ip, uid.clone()));
        }
    }
    for (ip, comment) in have {
        if !wanted_ips.contains(ip) {
            plan.ipset_del.push(*ip);
            if !comment.is_empty() && !wanted.contains_key(comment) {
                plan.removed_uids.push(comment.clone());
            }
        }
    }
    if let Some(routes) = table_inbound {
        for ip in &wanted_ips {
            let want = pod_route(*ip);
            if !routes.contains(&want) {
                plan.routes_add.push(want);
            }
        }
        for r in routes {
            if is_any_pod_route(r) && !wanted_ips.contains(&r.dst.addr()) {
                plan.routes_del.push(r.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::super::routing::pod_route;
    use super::*;

    const HOST: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn enrol_needs_ipv4_and_prefers_it_over_v6() {
        let t = PodTable::default();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(
            t.plan_enrol("u1", "ns/a", &[v6]),
            Err(PlanError::NoIpv4 { key: "ns/a".into() })
        );
        assert_eq!(uncaptured_ipv6(&[v6]), [v6]);
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        let v4: IpAddr = "10.0.0.8".parse().unwrap();
        assert_eq!(uncaptured_ipv6(&[v4, mapped]), Vec::<IpAddr>::new());
        let plan = t
            .plan_enrol("u1", "ns/a", &[v6, "10.244.1.9".parse().unwrap()])
            .unwrap();
        assert_eq!(plan.ip, ip("10.244.1.9"));
        assert!(plan.stale.is_empty() && plan.old_ip.is_none());
    }

    #[test]
    fn reenrol_is_a_noop_plan_and_ip_reuse_evicts_the_stale_pod() {
        let mut t = PodTable::default();
        let p = t
            .plan_enrol("u1", "ns/a", &["10.244.1.9".parse().unwrap()])
            .unwrap();
        t.commit_enrol("u1", "ns/a", &p);
        let again = t
            .plan_enrol("u1", "ns/a", &["10.244.1.9".parse().unwrap()])
            .unwrap();
        assert!(again.stale.is_empty() && again.old_ip.is_none());
        // u1 is gone without an unenrol; u2 gets its IP
        let p2 = t
            .plan_enrol("u2", "ns/b", &["10.244.1.9".parse().unwrap()])
            .unwrap();
        assert_eq!(p2.stale, vec!["u1".to_string()]);
        t.commit_enrol("u2", "ns/b", &p2);
        assert_eq!(t.len(), 1);
        assert!(t.get("u1").is_none());
        // u2 changes IP
        let p3 = t
            .plan_enrol("u2", "ns/b", &["10.244.1.10".parse().unwrap()])
            .unwrap();
        assert_eq!(p3.old_ip, Some(ip("10.244.1.9")));
        t.commit_enrol("u2", "ns/b", &p3);
        assert_eq!(t.remove("u2").unwrap().ip, ip("10.244.1.10"));
        assert!(t.is_empty());
    }

    #[test]
    fn unenrol_never_removes_an_ip_another_pod_holds() {
        let mut t = PodTable::default();
        let addr: IpAddr = "10.244.1.9".parse().unwrap();
        let p = t.plan_enrol("u1", "ns/a", &[addr]).unwrap();
        t.commit_enrol("u1", "ns/a", &p);
        // late unenrol of an older pod with the same IP, never recorded here
        let mut t2 = t.clone();
        t2.commit_enrol(
            "u2",
            "ns/b",
            &t2.plan_enrol("u2", "ns/b", &["10.244.1.10".parse().unwrap()])
                .unwrap(),
        );
        assert_eq!(t.unenrol("old", &[addr]), None);
        assert_eq!(t.len(), 1);
        assert_eq!(t.unenrol("u1", &[]), Some(ip("10.244.1.9")));
        assert!(t.is_empty());
        // unknown pod, not held by anyone: its IP is removed (idempotent)
        assert_eq!(t.unenrol("u9", &[addr]), Some(ip("10.244.1.9")));
        assert_eq!(t.unenrol("u9", &[]), None);
        assert_eq!(t2.unenrol("u2", &[]), Some(ip("10.244.1.10")));
    }

    #[test]
    fn ztunnel_changes() {
        let a = ZtunnelPod {
            uid: "z1".into(),
            ip: ip("10.244.1.5"),
            netns: "/proc/10/ns/net".into(),
            iface: "eth0".into(),
        };
        let mut b = a.clone();
        b.ip = ip("10.244.1.6");
        use ZtunnelChange::*;
        for needs_hold in [false, true] {
            assert_eq!(plan_ztunnel_change(None, Some(&a), needs_hold), Build);
            assert_eq!(plan_ztunnel_change(Some(&a), Some(&a), needs_hold), Refresh);
            assert_eq!(plan_ztunnel_change(Some(&a), Some(&b), needs_hold), Rebuild);
            // ztunnel gone: never a tear-down (fail closed), always a hold.
            assert_eq!(plan_ztunnel_change(Some(&a), None, needs_hold), Hold);
        }
        assert_eq!(plan_ztunnel_change(None, None, false), Nothing);
        // An earlier agent's capture, or a hold interrupted by an error: held
        // (again) when told there is no ztunnel.
        assert_eq!(plan_ztunnel_change(None, None, true), Hold);
        let mut c = a.clone();
        c.netns = "/proc/11/ns/net".into();
        assert_eq!(plan_ztunnel_change(Some(&a), Some(&c), false), Rebuild);
    }

    #[test]
    fn reconcile_adds_missing_fixes_comments_and_removes_strays() {
        let wanted: BTreeMap<String, Ipv4Addr> = [
            ("u1".to_string(), ip("10.244.1.9")),
            ("u2".to_string(), ip("10.244.1.10")),
        ]
        .into();
        let ipset: BTreeMap<Ipv4Addr, String> = [
            (ip("10.244.1.9"), "u1".to_string()),    // fine
            (ip("10.244.1.10"), "old".to_string()),  // IP reused: re-comment
            (ip("10.244.1.11"), "gone".to_string()), // stray
        ]
        .into();
        let pr = |i| pod_route(i, HOST);
        let mut foreign = pr(ip("10.244.1.50"));
        foreign.dev = "eth0".into(); // not ours
        let routes = vec![pr(ip("10.244.1.9")), pr(ip("10.244.1.11")), foreign];
        let plan = plan_reconcile(&wanted, Some(&ipset), Some(&routes), pr);
        assert_eq!(plan.ipset_add, vec![(ip("10.244.1.10"), "u2".to_string())]);
        assert_eq!(plan.ipset_del, vec![ip("10.244.1.11")]);
        assert_eq!(plan.removed_uids, vec!["gone".to_string()]);
        assert_eq!(plan.routes_add, vec![pr(ip("10.244.1.10"))]);
        assert_eq!(plan.routes_del, vec![pr(ip("10.244.1.11"))]);
        // a route with a stale source address is replaced in place (adding
        // replaces the route of the same destination), never deleted first
        let stale_src = pod_route(ip("10.244.1.9"), ip("10.0.0.1"));
        let plan = plan_reconcile(
            &wanted,
            Some(&ipset),
            Some(std::slice::from_ref(&stale_src)),
            pr,
        );
        assert!(plan.routes_del.is_empty(), "{:?}", plan.routes_del);
        assert_eq!(
            plan.routes_add,
            vec![pr(ip("10.244.1.9")), pr(ip("10.244.1.10"))]
        );
    }

    /// Held ↔ tunnel: every wanted pod's route is replaced in place (no
    /// moment without a route, when its traffic would reach it directly);
    /// routes of pods no longer wanted go, in either form.
    #[test]
    fn hold_and_rebuild_replace_pod_routes_in_place() {
        let wanted: BTreeMap<String, Ipv4Addr> = [
            ("u1".to_string(), ip("10.244.1.9")),
            ("u2".to_string(), ip("10.244.1.10")),
        ]
        .into();
        let ipset: BTreeMap<Ipv4Addr, String> = [
            (ip("10.244.1.9"), "u1".to_string()),
            (ip("10.244.1.10"), "u2".to_string()),
        ]
        .into();
        let tunnel = PodRouting::Tunnel { host_ip: HOST };
        let held = PodRouting::Held { host_ip: None };
        // Held with the tunnels kept: pods keep their tunnel routes.
        assert_eq!(
            PodRouting::Held {
                host_ip: Some(HOST)
            }
            .route(ip("10.244.1.9")),
            tunnel.route(ip("10.244.1.9"))
        );
        assert_eq!(PodRouting::Untouched.route(ip("10.244.1.9")), None);
        let h = |i| held.route(i).unwrap();
        let t = |i| tunnel.route(i).unwrap();
        assert_eq!(h(ip("10.244.1.9")).kind, RouteKind::Unreachable);
        assert!(is_any_pod_route(&h(ip("10.244.1.9"))));
        assert!(is_any_pod_route(&t(ip("10.244.1.9"))));

        // hold: tunnel routes (and a gone pod's) → held routes
        let routes = vec![
            t(ip("10.244.1.9")),
            t(ip("10.244.1.10")),
            t(ip("10.244.1.11")),
        ];
        let plan = plan_reconcile(&wanted, Some(&ipset), Some(&routes), h);
        assert_eq!(
            plan.routes_add,
            vec![h(ip("10.244.1.9")), h(ip("10.244.1.10"))]
        );
        assert_eq!(plan.routes_del, vec![t(ip("10.244.1.11"))]);
        assert!(plan.ipset_add.is_empty() && plan.ipset_del.is_empty());

        // ztunnel back: held routes (and a held route of a pod unenrolled
        // meanwhile) → tunnel routes
        let routes = vec![
            h(ip("10.244.1.9")),
            h(ip("10.244.1.10")),
            h(ip("10.244.1.12")),
        ];
        let plan = plan_reconcile(&wanted, Some(&ipset), Some(&routes), t);
        assert_eq!(
            plan.routes_add,
            vec![t(ip("10.244.1.9")), t(ip("10.244.1.10"))]
        );
        assert_eq!(plan.routes_del, vec![h(ip("10.244.1.12"))]);

        // other routes of table 100 are not pod routes
        let mut local = h(ip("10.244.1.13"));
        local.kind = RouteKind::Local;
        assert!(!is_any_pod_route(&local));
        let mut wide = h(ip("10.244.1.0"));
        wide.dst = "10.244.1.0/24".parse().unwrap();
        assert!(!is_any_pod_route(&wide));
    }

    /// Holding keeps table 100 and turns every route of tables 101–102
    /// into `unreachable` (same table and destination).
    #[test]
    fn hold_routes() {
        use super::super::routing::node_base_routes;
        let zt = ip("10.244.1.5");
        for r in node_base_routes(zt, "vethzt") {
            if r.table == TABLE_INBOUND {
                assert_eq!(hold_route(&r), None, "{r}: table 100 is kept");
                continue;
            }
            let h = hold_route(&r).unwrap_or_else(|| panic!("{r} kept"));
            assert_eq!((h.table, h.dst), (r.table, r.dst), "{r}");
            assert_eq!(h.kind, RouteKind::Unreachable);
            assert_eq!(hold_route(&h), None, "holding twice changes nothing");
        }
        assert_eq!(hold_route(&pod_route(ip("10.244.1.9"), HOST)), None);
        assert_eq!(hold_route(&held_pod_route(ip("10.244.1.9"))), None);
    }

    #[test]
    fn reconcile_without_set_or_tunnels() {
        let wanted: BTreeMap<String, Ipv4Addr> = [("u1".to_string(), ip("10.244.1.9"))].into();
        let plan = plan_reconcile(&wanted, None, None, |i| pod_route(i, HOST));
        assert_eq!(plan.ipset_add.len(), 1);
        assert!(plan.routes_add.is_empty() && plan.routes_del.is_empty());
        let done: BTreeMap<Ipv4Addr, String> = [(ip("10.244.1.9"), "u1".to_string())].into();
        assert!(
            plan_reconcile(
                &wanted,
                Some(&done),
                Some(&[pod_route(ip("10.244.1.9"), HOST)]),
                |i| pod_route(i, HOST)
            )
            .is_empty()
        );
    }
}
