//! Services by CIDR VIP (upstream's `cidr_vips`): a service that owns a whole address
//! range. Kept apart from the host VIPs so the exact lookup stays one hash probe; this
//! index is only searched when that probe finds nothing visible.
//!
//! Among the ranges containing an address (same network, visible to the client), the best
//! is the highest `(in the client's namespace, prefix length, canonical)`, compared in
//! that order as upstream: a wider range in the client's namespace beats a narrower one
//! elsewhere. Ties go to the first service by namespace and hostname.

use std::net::IpAddr;
use std::sync::Arc;

use super::workload::{NetworkCidr, Service};

/// How well a range matches: `(in the client's namespace, prefix length, canonical)`.
type Rank = (bool, u8, bool);

#[derive(Debug, Default)]
pub(super) struct CidrIndex {
    /// Sorted by service key, so ties do not depend on hash order.
    entries: Vec<(NetworkCidr, Arc<Service>)>,
}

impl CidrIndex {
    pub(super) fn new<'a>(services: impl Iterator<Item = &'a Arc<Service>>) -> Self {
        let mut entries: Vec<(NetworkCidr, Arc<Service>)> = services
            .flat_map(|s| s.cidr_vips.iter().map(|c| (c.clone(), s.clone())))
            .collect();
        entries.sort_by(|a, b| a.1.key().cmp(&b.1.key()).then(a.0.cidr.cmp(&b.0.cidr)));
        CidrIndex { entries }
    }

    /// The best visible service whose range holds `ip` on `network` (see the module doc).
    pub(super) fn best(
        &self,
        network: &str,
        ip: IpAddr,
        client_ns: Option<&str>,
    ) -> Option<&Arc<Service>> {
        let mut best: Option<(Rank, &Arc<Service>)> = None;
        for (range, svc) in &self.entries {
            if range.network != network || !range.cidr.contains(&ip) {
                continue;
            }
            if !svc.visible_for(client_ns) {
                continue;
            }
            let rank: Rank = (
                client_ns.is_some_and(|ns| svc.namespace == ns),
                range.cidr.prefix_len(),
                svc.canonical,
            );
            if best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, svc));
            }
        }
        best.map(|(_, svc)| svc)
    }
}

#[cfg(test)]
mod tests {
    use crate::state::file::test_store;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    const RANGES: &str = r#"
services:
- {name: wide, namespace: a, hostname: wide.example.com, ports: {80: 80},
   cidrVips: [{network: "", cidr: 10.8.0.0/16}]}
- {name: narrow, namespace: b, hostname: narrow.example.com, ports: {80: 80},
   cidrVips: [{network: "", cidr: 10.8.1.0/24}]}
- {name: narrow2, namespace: c, hostname: narrow2.example.com, ports: {80: 80},
   cidrVips: [{network: "", cidr: 10.8.1.0/24}], canonical: true}
- {name: exact, namespace: d, hostname: exact.example.com, ports: {80: 80},
   vips: [/10.8.1.7]}
- {name: private, namespace: e, hostname: private.example.com, ports: {80: 80},
   cidrVips: [{network: "", cidr: 10.8.1.0/28}], visibility: Namespace}
- {name: remote, namespace: a, hostname: remote.example.com, ports: {80: 80},
   cidrVips: [{network: west, cidr: "fd00::/64"}]}
"#;

    #[test]
    fn ranges_rank_by_namespace_then_prefix_then_canonical() {
        let s = test_store(RANGES).snapshot();
        let host = |addr: &str, ns: Option<&str>| {
            s.service_by_vip_for("", ip(addr), ns)
                .map(|s| s.hostname.clone())
        };
        // Longest prefix; of two equal ones, the canonical.
        assert_eq!(host("10.8.1.200", None).unwrap(), "narrow2.example.com");
        assert_eq!(
            host("10.8.1.200", Some("x")).unwrap(),
            "narrow2.example.com"
        );
        // The client's namespace beats a longer prefix elsewhere.
        assert_eq!(host("10.8.1.200", Some("a")).unwrap(), "wide.example.com");
        assert_eq!(host("10.8.1.200", Some("b")).unwrap(), "narrow.example.com");
        // Only the wide range holds it.
        assert_eq!(host("10.8.2.1", Some("b")).unwrap(), "wide.example.com");
        assert!(host("10.9.0.1", None).is_none());
        // Ranges are per network.
        assert!(s.service_by_vip_for("", ip("fd00::1"), None).is_none());
        let remote = s.service_by_vip_for("west", ip("fd00::1"), None).unwrap();
        assert_eq!(remote.hostname, "remote.example.com");
    }

    #[test]
    fn an_exact_vip_beats_every_range() {
        let s = test_store(RANGES).snapshot();
        for ns in [None, Some("a"), Some("b")] {
            let svc = s.service_by_vip_for("", ip("10.8.1.7"), ns).unwrap();
            assert_eq!(svc.hostname, "exact.example.com", "{ns:?}");
        }
        // Host VIPs stay in their own index.
        assert!(s.services_by_vip("", ip("10.8.1.200")).is_empty());
    }

    #[test]
    fn a_namespace_scoped_range_is_only_seen_from_its_namespace() {
        let s = test_store(RANGES).snapshot();
        let host = |ns: Option<&str>| {
            s.service_by_vip_for("", ip("10.8.1.3"), ns)
                .unwrap()
                .hostname
                .clone()
        };
        assert_eq!(host(Some("e")), "private.example.com");
        assert_eq!(host(Some("x")), "narrow2.example.com");
        // No client namespace: nothing is filtered.
        assert_eq!(host(None), "private.example.com");
    }
}
