//! Waypoints (and other HBONE gateways) as seen from the state: where a [`GatewayAddress`]
//! leads, and whether a given workload is behind one.
//!
//! A gateway address is either an IP on a network (a workload's IP or a service VIP) or a
//! service `namespace/hostname`. A service resolves to one of its healthy endpoints, at the
//! address's `hbone_mtls_port` mapped through the service's ports. The identities a client
//! must accept from the gateway are the gateway workload's own identity plus the gateway
//! service's `subjectAltNames` (upstream's `workload_and_services_san`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::seq::IndexedRandom;

use super::workload::{GatewayAddress, GatewayDestination, Service, Workload};
use super::{Destination, Snapshot};
use crate::identity::Identity;

/// The next hop for traffic sent through a gateway.
#[derive(Debug, Clone)]
pub struct GatewayHop {
    /// The gateway workload picked.
    pub workload: Arc<Workload>,
    /// `gatewayIP:hboneMtlsPort`.
    pub addr: SocketAddr,
    /// Identities the gateway may prove (its own, plus its service's SANs).
    pub identities: Vec<Identity>,
    /// The gateway's service, when the address named one.
    pub service: Option<Arc<Service>>,
}

/// Why a gateway address leads nowhere.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GatewayError {
    #[error("waypoint {0}: no workload or service with that address")]
    Unknown(String),
    #[error("waypoint {0}: its service has no healthy endpoint")]
    NoEndpoint(String),
    #[error("waypoint {0}: workload {1} has no IP address")]
    NoAddress(String, String),
}

/// `"<network>/<ip>:<port>"` or `"<namespace>/<hostname>:<port>"`, for messages.
pub fn describe(gw: &GatewayAddress) -> String {
    match &gw.destination {
        GatewayDestination::Address(a) => format!("{a}:{}", gw.hbone_mtls_port),
        GatewayDestination::Hostname(h) => format!("{h}:{}", gw.hbone_mtls_port),
    }
}

enum Target<'a> {
    Workload(&'a Arc<Workload>),
    Service(&'a Arc<Service>),
}

impl Snapshot {
    fn gateway_target(&self, gw: &GatewayAddress) -> Option<Target<'_>> {
        match &gw.destination {
            GatewayDestination::Address(a) => {
                match self.destination(&a.network, a.address, None)? {
                    Destination::Service(s) => Some(Target::Service(s)),
                    Destination::Workload(w) => Some(Target::Workload(w)),
                }
            }
            GatewayDestination::Hostname(h) => self.services.get(h).map(Target::Service),
        }
    }

    /// Where traffic through `gw` goes: a gateway workload (an endpoint picked at random when
    /// the address is a service) and its HBONE address. `like` picks the IP family.
    pub fn resolve_gateway(
        &self,
        gw: &GatewayAddress,
        like: IpAddr,
    ) -> Result<GatewayHop, GatewayError> {
        let (workload, port, service) = match self.gateway_target(gw) {
            None => return Err(GatewayError::Unknown(describe(gw))),
            Some(Target::Workload(w)) => (w.clone(), gw.hbone_mtls_port, None),
            Some(Target::Service(s)) => {
                let (w, port) = self
                    .pick_endpoint(s, gw.hbone_mtls_port)
                    .ok_or_else(|| GatewayError::NoEndpoint(describe(gw)))?;
                (w, port, Some(s.clone()))
            }
        };
        let ip = workload
            .workload_ips
            .iter()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
            .or(workload.workload_ips.first())
            .copied()
            .ok_or_else(|| GatewayError::NoAddress(describe(gw), workload.uid.clone()))?;
        let mut identities = vec![workload.identity()];
        if let Some(s) = &service {
            identities.extend(s.san_identities());
        }
        Ok(GatewayHop {
            addr: SocketAddr::new(ip, port),
            workload,
            identities,
            service,
        })
    }

    /// Whether a workload behind `gw` satisfies `pred` (the gateway workload itself, or any
    /// endpoint of the gateway service). Unknown addresses contain nothing.
    pub fn gateway_contains(&self, gw: &GatewayAddress, pred: impl Fn(&Workload) -> bool) -> bool {
        match self.gateway_target(gw) {
            None => false,
            Some(Target::Workload(w)) => pred(w),
            Some(Target::Service(s)) => self.endpoints(&s.key()).iter().any(|e| pred(&e.workload)),
        }
    }

    /// Whether `w` is (one of the workloads of) the waypoint `gw`: same uid, or same
    /// identity and a shared IP.
    pub fn is_gateway_workload(&self, gw: &GatewayAddress, w: &Workload) -> bool {
        self.gateway_contains(gw, |g| {
            g.uid == w.uid
                || (g.identity() == w.identity()
                    && g.workload_ips.iter().any(|ip| w.workload_ips.contains(ip)))
        })
    }

    /// Whether `w` is the network (east-west) gateway of `network`: a workload on that
    /// network names it in its `networkGateway` (istiod gives every workload its network's
    /// gateway, local ones included). Linear in the workloads.
    pub fn is_network_gateway(&self, network: &str, w: &Workload) -> bool {
        self.workloads().any(|o| {
            o.network == network
                && o.network_gateway
                    .as_ref()
                    .is_some_and(|gw| self.is_gateway_workload(gw, w))
        })
    }

    /// The waypoint of whatever owns `ip` on `network` ([`Snapshot::destination`]: a
    /// service by host VIP, else the workload with that IP, else a service by CIDR VIP); a
    /// service's primary `waypoint`, not its weighted ones (as upstream).
    pub fn waypoint_of_address(&self, network: &str, ip: IpAddr) -> Option<&GatewayAddress> {
        match self.destination(network, ip, None)? {
            Destination::Service(s) => s.waypoint.as_ref(),
            Destination::Workload(w) => w.waypoint.as_ref(),
        }
    }
}

impl Service {
    /// Every waypoint this service names: `waypoint`, then the weighted ones.
    pub fn waypoints(&self) -> impl Iterator<Item = &GatewayAddress> {
        let weighted = self.weighted_waypoints.iter().map(|w| &w.destination);
        self.waypoint.iter().chain(weighted)
    }

    /// The waypoint a new connection to this service goes through: one of
    /// `weightedWaypoints` at random, each with probability weight / sum of weights (weight
    /// 0: never), as upstream; `waypoint` when that list is empty or every weight is 0.
    pub fn pick_waypoint(&self, rng: &mut impl rand::Rng) -> Option<&GatewayAddress> {
        self.weighted_waypoints
            .choose_weighted(rng, |w| w.weight)
            .ok()
            .map(|w| &w.destination)
            .or(self.waypoint.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::file::test_store;

    const YAML: &str = r#"
workloads:
- uid: wp1
  name: wp1
  namespace: ns
  serviceAccount: waypoint
  workloadIps: ["10.0.0.9"]
  protocol: HBONE
  services: {"ns/waypoint.ns.svc.cluster.local": {15008: 15008}}
- uid: solo
  name: solo
  namespace: ns
  serviceAccount: solo-wp
  workloadIps: ["10.0.0.8"]
  protocol: HBONE
  services: {}
- uid: app
  name: app
  namespace: ns
  serviceAccount: app
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  waypoint: {destination: "/10.0.0.8", hboneMtlsPort: 15008}
  services: {}
services:
- name: waypoint
  namespace: ns
  hostname: waypoint.ns.svc.cluster.local
  vips: ["/10.96.0.9"]
  ports: {15008: 15008}
  subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/waypoint-alt"]
- name: empty
  namespace: ns
  hostname: empty.ns.svc.cluster.local
  vips: ["/10.96.0.7"]
  ports: {}
- name: echo
  namespace: ns
  hostname: echo.ns.svc.cluster.local
  vips: ["/10.96.0.1"]
  ports: {80: 8080}
  waypoint: {destination: {namespace: ns, hostname: waypoint.ns.svc.cluster.local}, hboneMtlsPort: 15008}
"#;

    fn snapshot() -> Arc<Snapshot> {
        test_store(YAML).snapshot()
    }

    fn gw(yaml: &str) -> GatewayAddress {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn hostname_waypoint_resolves_to_an_endpoint_with_service_sans() {
        let snap = snapshot();
        let svc = snap
            .service_by_vip("", "10.96.0.1".parse().unwrap())
            .unwrap();
        let hop = snap
            .resolve_gateway(svc.waypoint.as_ref().unwrap(), "10.0.0.1".parse().unwrap())
            .unwrap();
        assert_eq!(hop.workload.uid, "wp1");
        assert_eq!(hop.addr, "10.0.0.9:15008".parse().unwrap());
        let ids: Vec<String> = hop.identities.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            ids,
            [
                "spiffe://cluster.local/ns/ns/sa/waypoint",
                "spiffe://cluster.local/ns/ns/sa/waypoint-alt"
            ]
        );
        assert!(hop.service.is_some());
    }

    #[test]
    fn address_waypoints_resolve_to_workloads_or_service_vips() {
        let snap = snapshot();
        let hop = snap
            .resolve_gateway(
                &gw("{destination: \"/10.0.0.8\", hboneMtlsPort: 15009}"),
                "10.0.0.1".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(
            (hop.workload.uid.as_str(), hop.addr),
            ("solo", "10.0.0.8:15009".parse().unwrap())
        );
        assert!(hop.service.is_none());
        let hop = snap
            .resolve_gateway(
                &gw("{destination: \"/10.96.0.9\"}"),
                "10.0.0.1".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(hop.workload.uid, "wp1");
    }

    #[test]
    fn unknown_and_empty_waypoints_are_errors_naming_the_address() {
        let snap = snapshot();
        let like = "10.0.0.1".parse().unwrap();
        let err = snap
            .resolve_gateway(&gw("{destination: \"/10.0.0.77\"}"), like)
            .unwrap_err();
        assert_eq!(err, GatewayError::Unknown("/10.0.0.77:15008".into()));
        assert!(err.to_string().contains("/10.0.0.77:15008"), "{err}");
        let err = snap
            .resolve_gateway(&gw("{destination: \"/10.96.0.7\"}"), like)
            .unwrap_err();
        assert!(matches!(err, GatewayError::NoEndpoint(_)), "{err}");
        let err = snap
            .resolve_gateway(&gw("{destination: {namespace: x, hostname: nope}}"), like)
            .unwrap_err();
        assert_eq!(err, GatewayError::Unknown("x/nope:15008".into()));
    }

    #[test]
    fn gateway_membership() {
        let snap = snapshot();
        let svc_wp = snap
            .service_by_vip("", "10.96.0.1".parse().unwrap())
            .unwrap()
            .waypoint
            .clone()
            .unwrap();
        let wl = |uid: &str| snap.workload_by_uid(uid).unwrap().clone();
        assert!(snap.is_gateway_workload(&svc_wp, &wl("wp1")));
        assert!(!snap.is_gateway_workload(&svc_wp, &wl("solo")));
        assert!(!snap.is_gateway_workload(&svc_wp, &wl("app")));
        let app_wp = wl("app").waypoint.clone().unwrap();
        assert!(snap.is_gateway_workload(&app_wp, &wl("solo")));
        assert!(!snap.is_gateway_workload(&app_wp, &wl("wp1")));
        // Same identity and IP as the waypoint counts too (e.g. a re-created pod).
        let mut twin = (*wl("wp1")).clone();
        twin.uid = "other-uid".into();
        assert!(snap.is_gateway_workload(&svc_wp, &twin));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(snap.waypoint_of_address("", ip("10.96.0.1")), Some(&svc_wp));
        assert_eq!(snap.waypoint_of_address("", ip("10.0.0.1")), Some(&app_wp));
        assert_eq!(snap.waypoint_of_address("", ip("10.0.0.9")), None);
        assert_eq!(snap.waypoint_of_address("", ip("10.9.9.9")), None);
    }

    #[test]
    fn weighted_waypoints_are_picked_in_proportion_to_their_weight() {
        use rand::SeedableRng;
        let svc: Service = serde_yaml_ng::from_str(
            r#"
name: echo
namespace: ns
hostname: echo.ns.svc.cluster.local
waypoint: {destination: /10.0.0.1}
weightedWaypoints:
- {destination: {destination: /10.0.0.1}, weight: 3}
- {destination: {destination: /10.0.0.2}, weight: 1}
- {destination: {destination: /10.0.0.3}, weight: 0}
"#,
        )
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..4000 {
            let gw = svc.pick_waypoint(&mut rng).unwrap();
            *counts.entry(describe(gw)).or_insert(0) += 1;
        }
        assert_eq!(counts.get("/10.0.0.3:15008"), None, "weight 0 chosen");
        // Expected 3000 (sd ~27); a uniform or primary-only choice would be far off.
        let primary = counts["/10.0.0.1:15008"];
        assert!((2800..3200).contains(&primary), "{counts:?}");
        assert_eq!(primary + counts["/10.0.0.2:15008"], 4000);
        assert_eq!(svc.waypoints().count(), 4);

        // Every weight 0, or none: the single `waypoint`.
        let mut zero = svc.clone();
        for w in &mut zero.weighted_waypoints {
            w.weight = 0;
        }
        let mut none = svc.clone();
        none.weighted_waypoints.clear();
        for s in [&zero, &none] {
            for _ in 0..50 {
                assert_eq!(s.pick_waypoint(&mut rng), s.waypoint.as_ref());
            }
        }
        none.waypoint = None;
        assert_eq!(none.pick_waypoint(&mut rng), None);
    }
}
