//! GENEVE redirection (upstream Istio 1.18–1.20 "iptables" ambient mode).
//!
//! The agent works in the node's namespace and in the ztunnel pod's, never
//! in application pods: enrolled pods' TCP is marked on the node, routed
//! into the `istioout` tunnel, traffic *for* enrolled pods into `istioin`,
//! and ztunnel takes the decapsulated packets with TPROXY. Facts:
//! `shared/reference/redirection-geneve.md`.
//!
//! [`GeneveRedirector`] implements [`Redirector`]; in addition the control
//! loop tells it which ztunnel pod is active with
//! [`GeneveRedirector::set_ztunnel`] (the newest Ready `app=ztunnel` pod on
//! the node, or `None`). Pods enrolled while no ztunnel is set are recorded
//! and put in the ipset, and reported as retryable (`pending`); they get
//! their routes when a ztunnel is set.
//!
//! Fail closed: when the ztunnel goes away (`None`, or before a rebuild
//! against another pod) the node is *held* ([`state::ZtunnelChange::Hold`]):
//! capture, tunnels and table 100 (per-pod routes, `$ZT/32`) stay, the
//! routes of tables 101–102 become `unreachable` and the ztunnel side is
//! removed, so enrolled pods' traffic is refused (or dropped at the tunnel),
//! never sent around ztunnel, while kubelet probes still reach the pods and
//! the ztunnel pod. Building against the next ztunnel replaces each held
//! route in place.
//!
//! Layout: pure generators and decisions (`node_rules`, `ztunnel_rules`,
//! `routing`, `port`, `state`, `sysctl` lists, `ipset` lines) are unit-tested
//! on any machine; `node`, `ztunnel_ns` and `inventory` touch the kernel
//! (tests in `tests/geneve_*.rs`, run in a VM where the host kernel lacks
//! GENEVE: `scripts/vm-tests.sh`).

mod batch;
pub mod constants;
mod error;
pub mod inventory;
pub mod ipset;
pub mod node;
pub mod node_rules;
pub mod port;
pub mod routing;
pub mod state;
pub mod sysctl;
pub mod sysctl_journal;
pub mod ztunnel_ns;
pub mod ztunnel_rules;

#[cfg(test)]
mod golden {
    /// The GENEVE goldens live under `testdata/geneve/`.
    pub fn assert_golden(name: &str, actual: &str) {
        crate::redirect::golden::assert_golden("geneve", name, actual)
    }
}

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use futures::future::BoxFuture;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

pub use batch::{ChainRules, TableBatch, render};
pub use error::GeneveError;
pub use inventory::Inventory;
pub use node::Topology;
pub use state::{PodRouting, PodTable, ZtunnelPod};

use super::iptables::{Backend, detect_backend};
use super::netlink::Netlink;
use super::netns::Netns;
use super::{PodRedirect, ReconcileReport, RedirectError, Redirector};
use crate::redirect::netlink::RouteKind;
use state::{ZtunnelChange, plan_reconcile, plan_ztunnel_change};
pub use sysctl::SysctlRoot;

/// Configuration of GENEVE mode.
#[derive(Debug, Clone)]
pub struct GeneveConfig {
    /// The node's network namespace. The agent runs with `hostNetwork`, so in
    /// production this is its own (`/proc/self/ns/net`); tests point it at a
    /// simulated node.
    pub node_netns: PathBuf,
    /// `$HOST_IP` (the node address inside `node.spec.podCIDR`, else its
    /// InternalIP). `None`: the source address the node uses toward the
    /// ztunnel pod.
    pub host_ip: Option<Ipv4Addr>,
    /// iptables backend; `None`: detected in the node namespace as upstream.
    pub backend: Option<Backend>,
    /// DNS capture (`ISTIO_META_DNS_CAPTURE=true` on the ztunnel pod).
    pub dns_capture: bool,
    /// Where `net.ipv4.conf.*` is written (`$HOST_PROC_DIR/sys/net` in the
    /// chart, `/proc/sys/net` by default), and the journal of the node
    /// values it replaced (`<run_dir>/geneve-sysctls.json` in the agent;
    /// none by default), restored by [`GeneveRedirector::cleanup`].
    pub sysctls: SysctlRoot,
}

impl Default for GeneveConfig {
    fn default() -> Self {
        Self {
            node_netns: PathBuf::from("/proc/self/ns/net"),
            host_ip: None,
            backend: None,
            dns_capture: false,
            sysctls: SysctlRoot::default(),
        }
    }
}

/// The tunnels and rules currently built, and against which ztunnel.
struct Active {
    topo: Topology,
    ns: Netns,
    nl: Netlink,
}

struct Inner {
    nl: Netlink,
    active: Option<Active>,
    /// No ztunnel, and the node is held.
    held: bool,
    /// While held: `$HOST_IP` of the kept per-pod routes (`None`: no
    /// tunnels, pods get `unreachable` routes).
    held_host_ip: Option<Ipv4Addr>,
    /// No ztunnel, but the node may still route into tunnels: an earlier
    /// agent's capture, or a hold that failed half-way. The next
    /// `set_ztunnel(None)` holds.
    needs_hold: bool,
    pods: PodTable,
}

impl Inner {
    fn pod_routing(&self) -> PodRouting {
        match (&self.active, self.held) {
            (Some(a), _) => PodRouting::Tunnel {
                host_ip: a.topo.host_ip,
            },
            (None, true) => PodRouting::Held {
                host_ip: self.held_host_ip,
            },
            (None, false) => PodRouting::Untouched,
        }
    }
}

/// GENEVE-mode [`Redirector`].
pub struct GeneveRedirector {
    cfg: GeneveConfig,
    node_ns: Netns,
    backend: Backend,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for GeneveRedirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneveRedirector")
            .field("node_netns", &self.cfg.node_netns)
            .field("backend", &self.backend)
            .finish()
    }
}

fn node_error(stage: &'static str, e: GeneveError) -> RedirectError {
    RedirectError::node(stage, e)
}

impl GeneveRedirector {
    /// Opens the node namespace and a netlink socket in it; detects the
    /// iptables backend there unless configured, and whether an earlier
    /// agent left a capture (held until a ztunnel is set). Touches nothing.
    pub async fn new(cfg: GeneveConfig) -> Result<Self, GeneveError> {
        let node_ns = Netns::open(&cfg.node_netns)?;
        let backend = match cfg.backend {
            Some(b) => b,
            None => node_ns.run_async(detect_backend).await?,
        };
        let nl = Netlink::connect(&node_ns).await?;
        let needs_hold = node::has_capture(&nl).await?;
        info!(node_netns = %cfg.node_netns.display(), %backend, earlier_capture = needs_hold, "GENEVE redirection ready");
        Ok(Self {
            cfg,
            node_ns,
            backend,
            inner: Mutex::new(Inner {
                nl,
                active: None,
                held: false,
                held_host_ip: None,
                needs_hold,
                pods: PodTable::default(),
            }),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// What the tunnels are currently built against.
    pub async fn topology(&self) -> Option<Topology> {
        self.inner
            .lock()
            .await
            .active
            .as_ref()
            .map(|a| a.topo.clone())
    }

    /// Whether the node is held: no ztunnel, enrolled pods' traffic refused.
    pub async fn is_held(&self) -> bool {
        self.inner.lock().await.held
    }

    /// Enrolled pods: UID → IP.
    pub async fn enrolled(&self) -> BTreeMap<String, Ipv4Addr> {
        let inner = self.inner.lock().await;
        inner.pods.iter().map(|(u, e)| (u.clone(), e.ip)).collect()
    }

    /// What differs between the kernel and what was built for the active
    /// ztunnel (node and ztunnel netns; rules, routes, devices, iptables,
    /// ipset); empty when nothing is built or the node is held.
    pub async fn drift(&self) -> Result<Vec<String>, GeneveError> {
        let inner = self.inner.lock().await;
        let Some(a) = inner.active.as_ref().filter(|_| !inner.held) else {
            return Ok(Vec::new());
        };
        let pods: BTreeMap<Ipv4Addr, String> =
            inner.pods.iter().map(|(u, e)| (e.ip, u.clone())).collect();
        let node = inventory::inspect_node(&self.node_ns, &inner.nl, self.backend).await?;
        let zt = inventory::inspect_ztunnel(&a.ns, &a.nl, self.backend).await?;
        let mut out = node.node_drift(&a.topo, &pods);
        out.extend(
            zt.ztunnel_drift(&a.topo)
                .into_iter()
                .map(|d| format!("ztunnel netns: {d}")),
        );
        Ok(out)
    }

    /// Reads back the node namespace and, when a ztunnel is set, its
    /// namespace.
    pub async fn inspect(&self) -> Result<(Inventory, Option<Inventory>), GeneveError> {
        let inner = self.inner.lock().await;
        let node = inventory::inspect_node(&self.node_ns, &inner.nl, self.backend).await?;
        let zt = match &inner.active {
            Some(a) => Some(inventory::inspect_ztunnel(&a.ns, &a.nl, self.backend).await?),
            None => None,
        };
        Ok((node, zt))
    }

    /// Points redirection at `ztunnel` (or at none). The same pod again
    /// re-applies everything without recreating matching tunnels; another
    /// pod or IP holds the node, then builds against the new pod; `None`
    /// holds it (see [`ZtunnelChange`]): enrolled pods stay captured and
    /// their traffic is refused until a ztunnel is set again.
    pub async fn set_ztunnel(&self, ztunnel: Option<ZtunnelPod>) -> Result<(), GeneveError> {
        let mut inner = self.inner.lock().await;
        let current = inner.active.as_ref().map(|a| &a.topo.ztunnel);
        let change = plan_ztunnel_change(current, ztunnel.as_ref(), inner.needs_hold);
        match change {
            ZtunnelChange::Nothing => return Ok(()),
            ZtunnelChange::Hold | ZtunnelChange::Rebuild => {
                self.hold(&mut inner).await?;
            }
            ZtunnelChange::Build | ZtunnelChange::Refresh => {}
        }
        let Some(zt) = ztunnel else {
            return Ok(());
        };
        // From here until the end the node may be partly built (and no ztunnel
        // is active): should this fail, the next call must hold or rebuild it,
        // not decide there is nothing to do.
        inner.needs_hold = true;
        let (ns, nl) = match inner.active.take() {
            Some(a) => (a.ns, a.nl),
            None => {
                let ns = Netns::open(&zt.netns)?;
                let nl = Netlink::connect(&ns).await?;
                (ns, nl)
            }
        };
        let topo =
            node::resolve(&inner.nl, &nl, &zt, self.cfg.host_ip, self.cfg.dns_capture).await?;
        info!(
            ztunnel = %zt.ip, uid = %zt.uid, veth = %topo.ztunnel_veth, port = topo.geneve_port,
            host_ip = %topo.host_ip, ?change, "building GENEVE redirection"
        );
        if inner.held
            && inner.held_host_ip.is_some()
            && !node::node_tunnels_match(&inner.nl, &topo).await?
        {
            // The tunnels are replaced (new ztunnel IP or port), which takes
            // the per-pod routes through them along: make them `unreachable`
            // first, so no pod is ever without a route.
            inner.held_host_ip = None;
            let wanted = inner.pods.iter().map(|(u, e)| (u.clone(), e.ip)).collect();
            self.sync_pods(&inner, &wanted, false).await?;
        }
        let t0 = std::time::Instant::now();
        // The ztunnel side first: by the time the node routes into the
        // tunnels, TPROXY is there to take the packets.
        ztunnel_ns::build_ztunnel(&ns, &nl, &topo, self.backend, &self.cfg.sysctls).await?;
        let t1 = std::time::Instant::now();
        node::build_node(
            &self.node_ns,
            &inner.nl,
            &topo,
            self.backend,
            &self.cfg.sysctls,
        )
        .await?;
        debug!(ztunnel = ?(t1 - t0), node = ?t1.elapsed(), "GENEVE sides built");
        inner.active = Some(Active { topo, ns, nl });
        let wanted = inner.pods.iter().map(|(u, e)| (u.clone(), e.ip)).collect();
        self.sync_pods(&inner, &wanted, false).await?;
        inner.held = false;
        inner.held_host_ip = None;
        inner.needs_hold = false;
        Ok(())
    }

    /// Holds the node (fail closed without ztunnel): the routes of tables
    /// 101–102 become `unreachable` in place (captured outbound is refused),
    /// per-pod routes are made to match the pod table, and the old ztunnel
    /// netns' setup is removed (best effort: the pod may be gone), so held
    /// inbound traffic is dropped at the tunnel. Capture, tunnels and table
    /// 100 stay.
    async fn hold(&self, inner: &mut Inner) -> Result<(), GeneveError> {
        let old_ip = inner.active.as_ref().map(|a| a.topo.ztunnel.ip);
        warn!(ztunnel = ?old_ip, pods = inner.pods.len(), "no ztunnel: holding GENEVE capture, enrolled pods' traffic is refused until a ztunnel is Ready");
        // Until the end, a failure leaves the node to be held again by the
        // next attempt.
        inner.needs_hold = true;
        node::hold_routes(&inner.nl).await?;
        let host_ip = match inner.active.as_ref() {
            Some(a) => Some(a.topo.host_ip),
            None => node::pod_route_source(&inner.nl)
                .await?
                .or(self.cfg.host_ip),
        };
        let tunnels = inner.nl.link(constants::NODE_INBOUND_LINK).await?.is_some();
        let old = inner.active.take();
        inner.held = true;
        inner.held_host_ip = host_ip.filter(|_| tunnels);
        let wanted = inner.pods.iter().map(|(u, e)| (u.clone(), e.ip)).collect();
        self.sync_pods(inner, &wanted, false).await?;
        inner.needs_hold = false;
        if let Some(a) = old {
            let params = a.topo.ztunnel_rule_params();
            if let Err(e) = ztunnel_ns::teardown_ztunnel(&a.ns, &a.nl, &params, self.backend).await
            {
                warn!(ztunnel = %a.topo.ztunnel.ip, error = %e, "cannot clean the old ztunnel pod's namespace");
            }
        }
        Ok(())
    }

    /// Tears everything down (uninstall): the ztunnel side (best effort),
    /// the node side, and the ipset when `destroy_ipset`.
    async fn teardown(&self, inner: &mut Inner, destroy_ipset: bool) -> Result<(), GeneveError> {
        if let Some(a) = inner.active.take() {
            info!(ztunnel = %a.topo.ztunnel.ip, "tearing down GENEVE redirection");
            let params = a.topo.ztunnel_rule_params();
            if let Err(e) = ztunnel_ns::teardown_ztunnel(&a.ns, &a.nl, &params, self.backend).await
            {
                warn!(ztunnel = %a.topo.ztunnel.ip, error = %e, "cannot clean the old ztunnel pod's namespace");
            }
        }
        node::teardown_node(&self.node_ns, &inner.nl, self.backend, destroy_ipset).await?;
        inner.held = false;
        inner.held_host_ip = None;
        inner.needs_hold = false;
        Ok(())
    }

    /// Makes the ipset and per-pod routes match `wanted`; returns the UIDs
    /// found in the ipset that are not wanted. Without `remove_strays`,
    /// entries of pods this redirector does not know (e.g. after an agent
    /// restart, before [`Redirector::reconcile`]) are kept and routed: they
    /// stay redirected until reconcile says otherwise.
    async fn sync_pods(
        &self,
        inner: &Inner,
        wanted: &BTreeMap<String, Ipv4Addr>,
        remove_strays: bool,
    ) -> Result<Vec<String>, GeneveError> {
        let label = inner.nl.netns().to_string();
        let set = node::ipset_entries(&self.node_ns, &label).await?;
        let mut extended;
        let wanted = if remove_strays {
            wanted
        } else {
            extended = wanted.clone();
            let held: BTreeSet<Ipv4Addr> = wanted.values().copied().collect();
            for (ip, uid) in set.iter().flatten() {
                let key = if uid.is_empty() {
                    format!("unknown-{ip}")
                } else {
                    uid.clone()
                };
                if !held.contains(ip) && !wanted.contains_key(&key) {
                    extended.insert(key, *ip);
                }
            }
            &extended
        };
        let routing = inner.pod_routing();
        let routes = match routing {
            PodRouting::Untouched => None,
            _ => Some(inner.nl.routes(constants::TABLE_INBOUND).await?),
        };
        let plan = plan_reconcile(wanted, set.as_ref(), routes.as_deref(), |ip| {
            routing
                .route(ip)
                .expect("routes are only read when pods are routed")
        });
        let mut batch = ipset::create_line();
        for ip in &plan.ipset_del {
            batch.push_str(&ipset::del_line(*ip));
        }
        for (ip, uid) in &plan.ipset_add {
            batch.push_str(
                &ipset::add_line(*ip, uid).map_err(|source| GeneveError::Ipset {
                    netns: label.clone(),
                    source,
                })?,
            );
        }
        node::ipset_batch(&self.node_ns, &label, batch).await?;
        for r in &plan.routes_del {
            inner.nl.delete_route(r).await?;
        }
        for r in &plan.routes_add {
            inner.nl.replace_route(r).await?;
        }
        for r in plan
            .routes_add
            .iter()
            .filter(|r| r.kind == RouteKind::Unicast)
        {
            let ip = r.dst.addr();
            if let Err(e) =
                node::pod_rp_filter(&self.node_ns, &inner.nl, ip, &self.cfg.sysctls).await
            {
                warn!(pod_ip = %ip, error = %e, "cannot set rp_filter on the pod's host device");
            }
        }
        Ok(plan.removed_uids)
    }

    /// Enrols `pod`: its IPv4 in the capture ipset, its route. A pod already
    /// held stays in the table whatever fails here, with the capture it had,
    /// so its failures are retryable (the [`Redirector`] contract).
    async fn enrol_pod(&self, pod: &PodRedirect) -> Result<(), RedirectError> {
        let mut inner = self.inner.lock().await;
        let held = inner.pods.get(&pod.uid).is_some();
        let fail = |e: GeneveError| RedirectError::new(pod, "GENEVE enrol", held, e);
        let plan = inner
            .pods
            .plan_enrol(&pod.uid, &pod.key(), &pod.ips)
            .map_err(|e| fail(e.into()))?;
        self.place_pod(&mut inner, pod, &plan).await.map_err(fail)?;
        if inner.active.is_none() {
            return Err(RedirectError::new(
                pod,
                "GENEVE enrol",
                true,
                GeneveError::NoZtunnel,
            ));
        }
        info!(pod = %pod.key(), uid = %pod.uid, ip = %plan.ip, "pod enrolled (GENEVE)");
        let v6 = state::uncaptured_ipv6(&pod.ips);
        if !held && !v6.is_empty() {
            warn!(pod = %pod.key(), uid = %pod.uid, ipv6 = ?v6, "dual-stack pod: GENEVE mode captures IPv4 only, its IPv6 traffic bypasses ztunnel (in-pod mode captures both)");
        }
        Ok(())
    }

    /// An enrolled pod's IPs changed: its ipset entry and route follow its
    /// IPv4 (nothing to do when it is the one recorded).
    async fn sync_pod_ips(&self, pod: &PodRedirect) -> Result<(), RedirectError> {
        let mut inner = self.inner.lock().await;
        let fail = |e: GeneveError| RedirectError::new(pod, "GENEVE IP sync", true, e);
        let plan = inner
            .pods
            .plan_enrol(&pod.uid, &pod.key(), &pod.ips)
            .map_err(|e| fail(e.into()))?;
        let recorded = inner.pods.get(&pod.uid).map(|e| e.ip);
        if recorded == Some(plan.ip) && plan.stale.is_empty() {
            return Ok(());
        }
        self.place_pod(&mut inner, pod, &plan).await.map_err(fail)?;
        info!(pod = %pod.key(), uid = %pod.uid, ip = %plan.ip, old_ip = ?recorded, "pod IP synced (GENEVE)");
        Ok(())
    }

    /// The step enrol and IP sync share: the ipset entry and route of the IP
    /// `pod` had go (when `plan` moves it), those of its IP are put in place
    /// (routed as the node is: tunnel, held or untouched), and the table
    /// records it.
    async fn place_pod(
        &self,
        inner: &mut Inner,
        pod: &PodRedirect,
        plan: &state::EnrolPlan,
    ) -> Result<(), GeneveError> {
        if let Some(old) = plan.old_ip {
            node::remove_pod(&self.node_ns, &inner.nl, old).await?;
        }
        let new_pod = inner.pods.get(&pod.uid).is_none();
        let route = inner.pod_routing().route(plan.ip);
        node::add_pod(
            &self.node_ns,
            &inner.nl,
            route,
            plan.ip,
            &pod.uid,
            &self.cfg.sysctls,
            new_pod,
        )
        .await?;
        inner.pods.commit_enrol(&pod.uid, &pod.key(), plan);
        Ok(())
    }

    async fn unenrol_pod(&self, pod: &PodRedirect) -> Result<(), RedirectError> {
        let mut inner = self.inner.lock().await;
        let Some(ip) = inner.pods.unenrol(&pod.uid, &pod.ips) else {
            return Ok(());
        };
        node::remove_pod(&self.node_ns, &inner.nl, ip)
            .await
            .map_err(|e| RedirectError::new(pod, "GENEVE unenrol", false, e))?;
        info!(pod = %pod.key(), uid = %pod.uid, %ip, "pod unenrolled (GENEVE)");
        Ok(())
    }

    async fn reconcile_pods(&self, enrolled: &[PodRedirect]) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let mut inner = self.inner.lock().await;
        let before: BTreeSet<String> = inner.pods.iter().map(|(u, _)| u.clone()).collect();
        let mut table = PodTable::default();
        let mut ok = Vec::new();
        // Pods whose IPs are unknown (empty in the cache at start-up) keep
        // the entry the ipset holds for their UID, instead of losing their
        // capture until their IP shows up (then `sync_ips` checks it).
        let held = if enrolled.iter().any(|p| p.ips.is_empty()) {
            let label = inner.nl.netns().to_string();
            match node::ipset_entries(&self.node_ns, &label).await {
                Ok(set) => set
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(ip, uid)| (uid, ip))
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "start-up: cannot list the capture ipset for pods without IPs");
                    BTreeMap::new()
                }
            }
        } else {
            BTreeMap::new()
        };
        for pod in enrolled {
            let ips = match held.get(&pod.uid) {
                Some(ip) if pod.ips.is_empty() => {
                    info!(pod = %pod.key(), uid = %pod.uid, %ip,
                        "start-up: pod without IPs in the cache keeps its capture ipset entry");
                    vec![std::net::IpAddr::V4(*ip)]
                }
                _ => pod.ips.clone(),
            };
            match table.plan_enrol(&pod.uid, &pod.key(), &ips) {
                Ok(plan) => {
                    table.commit_enrol(&pod.uid, &pod.key(), &plan);
                    ok.push(pod);
                }
                Err(e) => report
                    .failed
                    .push(RedirectError::new(pod, "GENEVE reconcile", false, e)),
            }
        }
        let wanted: BTreeMap<String, Ipv4Addr> =
            table.iter().map(|(u, e)| (u.clone(), e.ip)).collect();
        inner.pods = table;
        match self.sync_pods(&inner, &wanted, true).await {
            Ok(removed) => {
                let mut removed: BTreeSet<String> = removed.into_iter().collect();
                removed.extend(before.into_iter().filter(|u| !wanted.contains_key(u)));
                report.removed = removed.into_iter().collect();
                let active = inner.active.is_some();
                for pod in ok.into_iter().filter(|p| wanted.contains_key(&p.uid)) {
                    if active {
                        report.enrolled.push(pod.uid.clone());
                    } else {
                        report.failed.push(RedirectError::new(
                            pod,
                            "GENEVE reconcile",
                            true,
                            GeneveError::NoZtunnel,
                        ));
                    }
                }
            }
            Err(e) => {
                // The pods are held (in the table) with the capture an
                // earlier agent gave them: retryable, as in-pod mode's
                // start-up failures.
                let msg = e.to_string();
                for pod in ok {
                    report.failed.push(RedirectError::new(
                        pod,
                        "GENEVE reconcile",
                        true,
                        msg.clone(),
                    ));
                }
            }
        }
        report
    }

    /// Removes everything: both sides, the ipset, the enrolled-pod table;
    /// then puts back the node sysctls the journal recorded (uninstall).
    pub async fn cleanup(&self) -> Result<(), GeneveError> {
        let mut inner = self.inner.lock().await;
        self.teardown(&mut inner, true).await?;
        inner.pods.clear();
        let sysctls = self.cfg.sysctls.clone();
        let label = inner.nl.netns().to_string();
        let restored = self
            .node_ns
            .run_async(move || sysctls.restore())
            .await?
            .map_err(|source| GeneveError::Sysctl {
                netns: label,
                source,
            })?;
        if let Some(journal) = self.cfg.sysctls.journal() {
            info!(restored, journal = %journal.display(), "node sysctls changed by GENEVE mode put back");
        }
        Ok(())
    }
}

impl Redirector for GeneveRedirector {
    fn mode(&self) -> &'static str {
        "geneve"
    }

    fn enrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.enrol_pod(pod))
    }

    fn unenrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.unenrol_pod(pod))
    }

    fn sync_ips<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.sync_pod_ips(pod))
    }

    fn reconcile<'a>(&'a self, enrolled: &'a [PodRedirect]) -> BoxFuture<'a, ReconcileReport> {
        Box::pin(self.reconcile_pods(enrolled))
    }

    fn cleanup_all(&self) -> BoxFuture<'_, Result<(), RedirectError>> {
        Box::pin(async move {
            self.cleanup()
                .await
                .map_err(|e| node_error("GENEVE cleanup", e))
        })
    }
}
