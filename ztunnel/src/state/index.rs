//! Lookups by address and hostname, and the conflict rules of the snapshot's indexes, as
//! upstream ztunnel:
//! - two workloads on one IP (see [`prefer_for_address`]);
//! - several services on one VIP or hostname (see [`best_service`]);
//! - services a client may not see: when the client's namespace is known, a service whose
//!   `visibility` is `Namespace` is invisible outside its namespace (skipped, logged at
//!   debug); without a client namespace nothing is filtered.

use std::net::IpAddr;
use std::sync::Arc;

use super::Snapshot;
use super::workload::{NetworkAddress, Protocol, Service, Workload};

/// What an address is: see [`Snapshot::destination`].
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    Service(&'a Arc<Service>),
    Workload(&'a Arc<Workload>),
}

impl Snapshot {
    /// The service with VIP (or inside a CIDR VIP) `ip` on `network`, for no particular
    /// client: see [`Self::service_by_vip_for`].
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip_for(network, ip, None)
    }

    /// The service a client in namespace `client_ns` reaches at `ip` on `network`: among
    /// the visible services with that host VIP, the client namespace's, else a `canonical`
    /// one, else the first by namespace; when none, the best visible CIDR VIP holding `ip`
    /// (`state::cidr`).
    pub fn service_by_vip_for(
        &self,
        network: &str,
        ip: IpAddr,
        client_ns: Option<&str>,
    ) -> Option<&Arc<Service>> {
        self.service_by_host_vip_for(network, ip, client_ns)
            .or_else(|| self.by_cidr.best(network, ip, client_ns))
    }

    /// [`Self::service_by_vip_for`] without the CIDR VIPs.
    fn service_by_host_vip_for(
        &self,
        network: &str,
        ip: IpAddr,
        client_ns: Option<&str>,
    ) -> Option<&Arc<Service>> {
        let services = self.services_by_vip(network, ip);
        best_service(
            services.iter().filter(|s| s.visible_for(client_ns)),
            client_ns,
        )
    }

    /// Every service with host VIP `ip` on `network`, sorted by namespace (unfiltered).
    pub fn services_by_vip(&self, network: &str, ip: IpAddr) -> &[Arc<Service>] {
        let key = NetworkAddress::new(network, ip);
        self.by_vip.get(&key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// What a client in `client_ns` reaches at `ip` on `network`: a service by host VIP,
    /// else the workload with that IP, else a service by CIDR VIP (a workload's own
    /// address wins over a range that holds it, as upstream looks workloads up first).
    pub fn destination(
        &self,
        network: &str,
        ip: IpAddr,
        client_ns: Option<&str>,
    ) -> Option<Destination<'_>> {
        if let Some(s) = self.service_by_host_vip_for(network, ip, client_ns) {
            return Some(Destination::Service(s));
        }
        if let Some(w) = self.workload_by_ip(network, ip) {
            return Some(Destination::Workload(w));
        }
        self.by_cidr
            .best(network, ip, client_ns)
            .map(Destination::Service)
    }

    /// The services named `host` (lower-case, no trailing dot) in any namespace, sorted
    /// by namespace, unfiltered (wildcard hosts are stored as `*.example.com`).
    pub fn services_by_host(&self, host: &str) -> &[Arc<Service>] {
        self.by_host.get(host).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The service named `host` a client in `client_ns` means: among those visible to it,
    /// the client namespace's, else a `canonical` one, else the first by namespace.
    pub fn service_by_host_for(
        &self,
        host: &str,
        client_ns: Option<&str>,
    ) -> Option<&Arc<Service>> {
        let services = self.services_by_host(host);
        best_service(
            services.iter().filter(|s| s.visible_for(client_ns)),
            client_ns,
        )
    }
}

impl Service {
    /// Whether a client in `client_ns` may see this service ([`Service::visible_to`]);
    /// always when the client's namespace is unknown. A filtered service is logged at
    /// debug.
    pub fn visible_for(&self, client_ns: Option<&str>) -> bool {
        let Some(ns) = client_ns else {
            return true;
        };
        let visible = self.visible_to(ns);
        if !visible {
            tracing::debug!(
                hostname = %self.hostname,
                service_namespace = %self.namespace,
                client_namespace = %ns,
                "service not visible to the client's namespace; skipped"
            );
        }
        visible
    }
}

/// Whether `new` should own an address `old` already has.
///
/// Ranking, best first: a Kubernetes pod (uid `<cluster>//v1/Pod/…`: pods cannot claim an
/// address they do not have, a ServiceEntry or WorkloadEntry can), then a healthy one (an IP
/// reused while the old pod is stuck terminating on a lost node), then an HBONE one (in the
/// mesh: more useful context); on a tie the later uid wins, so the result does not depend on
/// arrival order. Upstream ranks pod, then HBONE, then the later inserted.
pub(super) fn prefer_for_address(old: &Workload, new: &Workload) -> bool {
    let rank = |w: &Workload| (is_pod(w), w.is_healthy(), w.protocol == Protocol::HBONE);
    rank(new) >= rank(old)
}

fn is_pod(w: &Workload) -> bool {
    w.uid.contains("//v1/Pod/") || w.uid.contains("//Pod/")
}

/// The service a VIP or hostname shared by several `services` (sorted by namespace) stands
/// for: the one in the client's namespace `client_ns`, else the first `canonical` one
/// (istiod marks the Kubernetes Service canonical over ServiceEntries reusing its address),
/// else the first.
fn best_service<'a>(
    services: impl Iterator<Item = &'a Arc<Service>>,
    client_ns: Option<&str>,
) -> Option<&'a Arc<Service>> {
    let (mut canonical, mut first) = (None, None);
    for s in services {
        if client_ns.is_some_and(|ns| s.namespace == ns) {
            return Some(s);
        }
        if s.canonical && canonical.is_none() {
            canonical = Some(s);
        }
        first.get_or_insert(s);
    }
    canonical.or(first)
}

#[cfg(test)]
mod tests {
    use crate::state::file::test_store;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pod_keeps_its_ip_against_a_service_entry_endpoint() {
        // A ServiceEntry's inline endpoint (uid `<cluster>/networking.istio.io/…`, sorting
        // after a pod's `<cluster>//v1/Pod/…`) names a pod's IP: the pod keeps it.
        let store = test_store(
            r#"
workloads:
- uid: Kubernetes//v1/Pod/ns/pod
  name: pod
  namespace: ns
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  services: {}
- uid: Kubernetes/networking.istio.io/ServiceEntry/other/se/10.0.0.1
  name: se
  namespace: other
  workloadIps: ["10.0.0.1"]
  services: {}
"#,
        );
        let s = store.snapshot();
        let w = s.workload_by_ip("", ip("10.0.0.1")).unwrap();
        assert_eq!(w.uid, "Kubernetes//v1/Pod/ns/pod");
    }

    #[test]
    fn indexes_follow_updates_and_removals() {
        use crate::state::Store;
        let w: crate::state::Workload = serde_yaml_ng::from_str(
            "{uid: u1, name: a, namespace: ns, workloadIps: [10.0.0.1], services: {ns/svc: {80: 8080}}}",
        )
        .unwrap();
        let svc: crate::state::Service = serde_yaml_ng::from_str(
            "{name: svc, namespace: ns, hostname: svc, vips: [/10.96.0.1], ports: {80: 8080}}",
        )
        .unwrap();
        let store = Store::new();
        let src = store.source("xds");
        // The endpoint arrives before its service.
        src.upsert_workload(w.clone());
        src.upsert_service(svc.clone());
        let s = store.snapshot();
        let vip = s.service_by_vip("", ip("10.96.0.1")).unwrap();
        assert_eq!(s.pick_endpoint(vip, 80).unwrap().0.uid, "u1");
        // The workload moves to another IP: the old one is forgotten.
        let mut moved = w.clone();
        moved.workload_ips = vec![ip("10.0.0.2")];
        src.upsert_workload(moved);
        let s = store.snapshot();
        assert!(s.workload_by_ip("", ip("10.0.0.1")).is_none());
        assert_eq!(s.workload_by_ip("", ip("10.0.0.2")).unwrap().uid, "u1");
        // The service goes (its VIP with it) while its endpoint stays, then comes back.
        src.remove_service(&svc.key());
        assert!(
            store
                .snapshot()
                .service_by_vip("", ip("10.96.0.1"))
                .is_none()
        );
        src.upsert_service(svc);
        let s = store.snapshot();
        let vip = s.service_by_vip("", ip("10.96.0.1")).unwrap();
        assert_eq!(s.pick_endpoint(vip, 80).unwrap().0.uid, "u1");
        src.remove_workload("u1");
        let s = store.snapshot();
        assert!(s.workload_by_ip("", ip("10.0.0.2")).is_none());
        assert!(
            s.pick_endpoint(s.service_by_vip("", ip("10.96.0.1")).unwrap(), 80)
                .is_none()
        );
    }

    const SHARED_VIP: &str = r#"
services:
- name: a
  namespace: a
  hostname: a.example.com
  vips: ["/10.96.0.1"]
  ports: {80: 80}
- name: svc
  namespace: b
  hostname: svc.b.svc.cluster.local
  vips: ["/10.96.0.1"]
  ports: {80: 8080}
  canonical: true
- name: c
  namespace: c
  hostname: c.example.com
  vips: ["/10.96.0.1"]
  ports: {80: 80}
"#;

    #[test]
    fn a_shared_vip_goes_to_the_canonical_service() {
        // Repeat: the choice must not depend on hash order.
        for _ in 0..20 {
            let s = test_store(SHARED_VIP).snapshot();
            let svc = s.service_by_vip("", ip("10.96.0.1")).unwrap();
            assert_eq!(svc.namespace, "b");
        }
    }

    #[test]
    fn a_shared_vip_prefers_the_clients_namespace() {
        let s = test_store(SHARED_VIP).snapshot();
        let vip = ip("10.96.0.1");
        let for_ns = |ns| {
            s.service_by_vip_for("", vip, Some(ns))
                .unwrap()
                .namespace
                .clone()
        };
        assert_eq!(for_ns("c"), "c");
        assert_eq!(for_ns("a"), "a");
        assert_eq!(for_ns("elsewhere"), "b");
        assert_eq!(s.services_by_vip("", vip).len(), 3);
    }

    const SCOPED: &str = r#"
workloads:
- {uid: pod, name: pod, namespace: a, workloadIps: ["10.96.0.9"], services: {}}
services:
- {name: db, namespace: a, hostname: db.example.com, vips: ["/10.96.0.2"], ports: {80: 80},
   visibility: Namespace}
- {name: db, namespace: b, hostname: db.example.com, vips: ["/10.96.0.2"], ports: {80: 80}}
- {name: only, namespace: a, hostname: only.example.com, vips: ["/10.96.0.3"], ports: {80: 80},
   visibility: Namespace}
- {name: range, namespace: c, hostname: range.example.com, ports: {80: 80},
   cidrVips: [{network: "", cidr: 10.96.0.0/24}]}
"#;

    #[test]
    fn namespace_scoped_services_are_invisible_to_other_namespaces_by_vip() {
        let s = test_store(SCOPED).snapshot();
        let ns_of = |addr: &str, ns: Option<&str>| {
            s.service_by_vip_for("", ip(addr), ns)
                .map(|s| s.namespace.clone())
        };
        // Shared VIP: the scoped one for its own namespace, the public one elsewhere.
        assert_eq!(ns_of("10.96.0.2", Some("a")).unwrap(), "a");
        assert_eq!(ns_of("10.96.0.2", Some("c")).unwrap(), "b");
        // Only a scoped service there: from elsewhere the address falls to the range.
        assert_eq!(ns_of("10.96.0.3", Some("a")).unwrap(), "a");
        assert_eq!(ns_of("10.96.0.3", Some("b")).unwrap(), "c");
        // No client namespace: nothing filtered (the first by namespace).
        assert_eq!(ns_of("10.96.0.2", None).unwrap(), "a");
        assert_eq!(ns_of("10.96.0.3", None).unwrap(), "a");
        // Destinations: host VIP, then a workload's own IP, then a range.
        let dest = |addr: &str| match s.destination("", ip(addr), Some("b")) {
            Some(super::Destination::Service(s)) => format!("service {}", s.name),
            Some(super::Destination::Workload(w)) => format!("workload {}", w.uid),
            None => "none".into(),
        };
        assert_eq!(dest("10.96.0.2"), "service db");
        assert_eq!(dest("10.96.0.9"), "workload pod");
        assert_eq!(dest("10.96.0.10"), "service range");
        assert_eq!(dest("10.97.0.1"), "none");
    }

    #[test]
    fn namespace_scoped_services_are_invisible_to_other_namespaces_by_hostname() {
        let s = test_store(SCOPED).snapshot();
        let ns_of = |host: &str, ns: Option<&str>| {
            s.service_by_host_for(host, ns).map(|s| s.namespace.clone())
        };
        assert_eq!(ns_of("db.example.com", Some("a")).unwrap(), "a");
        assert_eq!(ns_of("db.example.com", Some("c")).unwrap(), "b");
        assert_eq!(ns_of("only.example.com", Some("a")).unwrap(), "a");
        assert!(ns_of("only.example.com", Some("b")).is_none());
        assert_eq!(ns_of("only.example.com", None).unwrap(), "a");
        assert_eq!(ns_of("db.example.com", None).unwrap(), "a");
        assert_eq!(
            s.services_by_host("only.example.com").len(),
            1,
            "unfiltered"
        );
    }
}
