//! Conflict rules of the snapshot's address indexes, as upstream ztunnel:
//! - two workloads on one IP (see [`prefer_for_address`]);
//! - several services on one VIP (see [`best_service`]).

use std::net::IpAddr;
use std::sync::Arc;

use super::Snapshot;
use super::workload::{NetworkAddress, Protocol, Service, Workload};

impl Snapshot {
    /// [`Self::service_by_vip`] for a client in namespace `client_ns`: a service of that
    /// namespace sharing the VIP wins, as upstream.
    pub fn service_by_vip_for(
        &self,
        network: &str,
        ip: IpAddr,
        client_ns: Option<&str>,
    ) -> Option<&Arc<Service>> {
        best_service(self.services_by_vip(network, ip), client_ns)
    }

    /// Every service with VIP `ip` on `network`, sorted by namespace.
    pub fn services_by_vip(&self, network: &str, ip: IpAddr) -> &[Arc<Service>] {
        let key = NetworkAddress::new(network, ip);
        self.by_vip.get(&key).map(Vec::as_slice).unwrap_or(&[])
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

/// The service a VIP shared by several `services` (sorted by namespace) stands for: the one
/// in the client's namespace `client_ns`, else a `canonical` one (istiod marks the
/// Kubernetes Service canonical over ServiceEntries reusing its address), else the first.
fn best_service<'a>(
    services: &'a [Arc<Service>],
    client_ns: Option<&str>,
) -> Option<&'a Arc<Service>> {
    client_ns
        .and_then(|ns| services.iter().find(|s| s.namespace == ns))
        .or_else(|| services.iter().find(|s| s.canonical))
        .or_else(|| services.first())
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
}
