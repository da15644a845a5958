//! Choosing among a service's candidate endpoints (upstream's `load_balance`): locality
//! preferences ([`prefer`]) then a random choice weighted by capacity
//! ([`choose_by_capacity`]).

use super::Endpoint;
use super::workload::{
    LoadBalancer, LoadBalancerMode, LoadBalancerScope, NamespacedHostname, Workload,
};

/// Why a service has no endpoint to send a connection to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoEndpoint {
    #[error("service {0} has no healthy endpoint")]
    NoHealthy(NamespacedHostname),
    #[error("service {0} has healthy endpoints, all of capacity 0")]
    NoCapacity(NamespacedHostname),
    #[error(
        "service {service} has endpoints only on network(s) {networks}, not on this proxy's \
         network {local:?}, and they name no network gateway to reach them through"
    )]
    OtherNetwork {
        service: NamespacedHostname,
        local: String,
        networks: String,
    },
}

/// The endpoints `lb` prefers for client `src` (upstream's ranking): each endpoint ranks
/// by how many leading preferences it shares with `src` (a first `Network` preference
/// that matches counts for all); `Strict` drops endpoints that miss any, then the best
/// rank wins.
pub(super) fn prefer<'a>(
    lb: &LoadBalancer,
    src: &Workload,
    eps: Vec<&'a Endpoint>,
) -> Vec<&'a Endpoint> {
    if matches!(
        lb.mode,
        LoadBalancerMode::Standard | LoadBalancerMode::Passthrough
    ) {
        return eps;
    }
    let prefs = &lb.routing_preferences;
    let network_first = prefs.first() == Some(&LoadBalancerScope::Network);
    let ranked: Vec<(usize, &Endpoint)> = eps
        .into_iter()
        .filter_map(|ep| {
            let w = &ep.workload;
            let (mut rank, mut adjust) = (0, 0);
            for scope in prefs {
                let matches = match scope {
                    LoadBalancerScope::Region => src.locality.region == w.locality.region,
                    LoadBalancerScope::Zone => src.locality.zone == w.locality.zone,
                    LoadBalancerScope::Subzone => src.locality.subzone == w.locality.subzone,
                    LoadBalancerScope::Node => src.node == w.node,
                    LoadBalancerScope::Cluster => src.cluster_id == w.cluster_id,
                    LoadBalancerScope::Network => {
                        let m = src.network == w.network;
                        if network_first {
                            if m {
                                adjust = prefs.len() - 1;
                            } else {
                                continue;
                            }
                        }
                        m
                    }
                };
                if !matches {
                    break;
                }
                rank += 1;
            }
            if lb.mode == LoadBalancerMode::Strict && rank != prefs.len() {
                return None;
            }
            Some((rank + adjust, ep))
        })
        .collect();
    let best = ranked.iter().map(|(r, _)| *r).max().unwrap_or(0);
    ranked
        .into_iter()
        .filter(|(r, _)| *r == best)
        .map(|(_, ep)| ep)
        .collect()
}

/// One of `eps` at random, each as likely as its workload's `capacity` (upstream's weighted
/// choice): an endpoint of capacity 0 is never chosen, and `None` when none has capacity.
pub(super) fn choose_by_capacity<'a>(
    eps: &[&'a Endpoint],
    rng: &mut impl rand::Rng,
) -> Option<&'a Endpoint> {
    let total: u64 = eps.iter().map(|e| u64::from(e.workload.capacity)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rng.random_range(0..total);
    for ep in eps {
        let c = u64::from(ep.workload.capacity);
        if n < c {
            return Some(ep);
        }
        n -= c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ep(uid: &str, capacity: u32) -> Endpoint {
        let mut w: Workload =
            serde_yaml_ng::from_str(&format!("{{uid: {uid}, namespace: ns}}")).unwrap();
        w.capacity = capacity;
        Endpoint {
            workload: Arc::new(w),
            ports: Default::default(),
        }
    }

    #[test]
    fn endpoints_are_chosen_in_proportion_to_capacity() {
        let (a, b, none) = (ep("a", 3), ep("b", 1), ep("none", 0));
        let eps = [&a, &b, &none];
        let mut rng = rand::rng();
        let mut picked_a = 0;
        for _ in 0..4000 {
            let e = choose_by_capacity(&eps, &mut rng).unwrap();
            assert_ne!(e.workload.uid, "none", "capacity 0 chosen");
            if e.workload.uid == "a" {
                picked_a += 1;
            }
        }
        // Expected 3000 (sd ~27); uniform choice would give ~1333.
        assert!((2700..3300).contains(&picked_a), "{picked_a}");
    }

    #[test]
    fn no_endpoint_when_every_capacity_is_zero() {
        let (a, b) = (ep("a", 0), ep("b", 0));
        assert!(choose_by_capacity(&[&a, &b], &mut rand::rng()).is_none());
        assert!(choose_by_capacity(&[], &mut rand::rng()).is_none());
    }
}
