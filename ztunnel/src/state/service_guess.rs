//! Which Service an inbound connection was for, for the destination-side telemetry.
//!
//! The destination ztunnel only sees `podIP:targetPort`. Like upstream, it picks among the
//! destination workload's own services: the one named by the client's `forwarded: host=`
//! (only if the workload really belongs to it, so a client cannot inject arbitrary labels),
//! else the first (by namespace/hostname) with a port whose target port is the connection's
//! port, either in the service's port map or in the workload's port map for that service.

use std::sync::Arc;

use super::Snapshot;
use super::workload::{NamespacedHostname, Service, Workload};

impl Snapshot {
    /// The services `w` is an endpoint of (sorted by namespace/hostname).
    pub fn services_of(&self, w: &Workload) -> Vec<Arc<Service>> {
        let mut out: Vec<Arc<Service>> = w
            .services
            .keys()
            .filter_map(|key| {
                let (namespace, hostname) = key.split_once('/')?;
                self.services
                    .get(&NamespacedHostname {
                        namespace: namespace.to_string(),
                        hostname: hostname.to_string(),
                    })
                    .cloned()
            })
            .collect();
        out.sort_by_key(|s| s.key());
        out
    }

    /// The service an inbound connection to `w` on `port` was most likely for.
    pub fn guess_inbound_service(
        &self,
        w: &Workload,
        forwarded_host: Option<&str>,
        port: u16,
    ) -> Option<Arc<Service>> {
        let services = self.services_of(w);
        if let Some(host) = forwarded_host
            && let Some(s) = services.iter().find(|s| s.hostname == host)
        {
            return Some(s.clone());
        }
        services.into_iter().find(|s| {
            let ep_ports = w.services.get(&s.key().to_string());
            s.ports.iter().any(|(svc_port, target)| {
                *target == port
                    || ep_ports.and_then(|m| m.get(svc_port)) == Some(&port)
                    || (*target == 0 && *svc_port == port)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::state::file::test_store;

    const YAML: &str = r#"
workloads:
- uid: app
  name: app
  namespace: ns
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  services:
    "ns/b.ns.svc.cluster.local": {80: 8080}
    "ns/a.ns.svc.cluster.local": {}
    "ns/named.ns.svc.cluster.local": {90: 9090}
    "ns/missing.ns.svc.cluster.local": {}
services:
- {name: a, namespace: ns, hostname: a.ns.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 8080}}
- {name: b, namespace: ns, hostname: b.ns.svc.cluster.local, vips: ["/10.96.0.2"], ports: {80: 8080}}
- {name: named, namespace: ns, hostname: named.ns.svc.cluster.local, vips: ["/10.96.0.3"], ports: {90: 0}}
- {name: other, namespace: ns, hostname: other.ns.svc.cluster.local, vips: ["/10.96.0.4"], ports: {80: 7070}}
"#;

    #[test]
    fn forwarded_host_then_target_port() {
        let snap = test_store(YAML).snapshot();
        let w = snap.workload_by_uid("app").unwrap().clone();
        let names: Vec<String> = snap
            .services_of(&w)
            .iter()
            .map(|s| s.name.clone())
            .collect();
        assert_eq!(names, ["a", "b", "named"]);
        let guess = |host: Option<&str>, port| {
            snap.guess_inbound_service(&w, host, port)
                .map(|s| s.name.clone())
        };
        assert_eq!(
            guess(Some("b.ns.svc.cluster.local"), 8080).as_deref(),
            Some("b")
        );
        // Sorted order decides without a host; a host the workload is not part of is ignored.
        assert_eq!(guess(None, 8080).as_deref(), Some("a"));
        assert_eq!(
            guess(Some("other.ns.svc.cluster.local"), 8080).as_deref(),
            Some("a")
        );
        // Named target port: the workload's own port map.
        assert_eq!(guess(None, 9090).as_deref(), Some("named"));
        assert_eq!(guess(None, 1234), None);
    }
}
