//! Inbound HBONE: may this client certificate be presented from this source address?
//!
//! The zero-trust property kept here: a workload must not be able to present another
//! workload's certificate from its own address. The rule, per TCP connection, with the
//! peer's certificate identity `I` and the workload `W` the state has at the source IP:
//!
//! 1. No workload at the source IP (another cluster, a gateway, a host address): accepted;
//!    TLS proved `I` and authorization decides.
//! 2. `W` runs as a node-proxy account (`CA_TRUSTED_NODE_ACCOUNTS`, default
//!    `<POD_NAMESPACE>/ztunnel`): `W` is a peer ztunnel connecting without the original
//!    source address (GENEVE/TPROXY mode with `ENABLE_ORIG_SRC` off or unavailable). It
//!    holds the certificates of the workloads of its own node — the CA issues them to it
//!    for exactly those pods, under the same setting — so `I` must be the identity of a
//!    workload on `W`'s node (or `W`'s own). The client is then described by its
//!    `baggage`, not by `W`.
//! 3. `W` is its network's east-west gateway (a workload of this network names it as its
//!    `networkGateway`): it relays double-HBONE inner tunnels from other networks without
//!    terminating them, so `I` is the remote client's own identity, which TLS proved; the
//!    client's address is unknown here (as upstream, which has no address rule at all).
//! 4. Any other `W`: `I` must be `W`'s identity.
//!
//! With original source on (the default where `IP_TRANSPARENT` works), a peer ztunnel in
//! TPROXY mode connects from the source pod's own IP, so rule 4 applies to it like to the
//! in-pod and dedicated modes. Rule 2 never lets a workload use a certificate that is not
//! its own: only node-proxy pods get it, and only for identities the CA would give them.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::NodeProxyAccount;
use crate::identity::Identity;
use crate::state::{Snapshot, Workload};

/// Who the client at the source address is, when its certificate is acceptable there.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// Rule 1 or 4: the workload at the source address (`None`: unknown address).
    Workload(Option<Arc<Workload>>),
    /// Rule 2: a node proxy acting for a workload of its node.
    NodeProxy(Arc<Workload>),
    /// Rule 3: the network's east-west gateway relaying a client of another network.
    NetworkGateway(Arc<Workload>),
}

/// The certificate may not be presented from the source address.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum SourceMismatch {
    #[error(
        "client certificate identity {presented} is not the identity of the workload at the source address ({workload}: {expected})"
    )]
    NotTheWorkload {
        presented: Identity,
        workload: String,
        expected: Identity,
    },
    #[error(
        "client certificate identity {presented} is not the identity of a workload on node {node:?}, where the node proxy at the source address ({proxy}) runs"
    )]
    NotOnProxyNode {
        presented: Identity,
        proxy: String,
        node: String,
    },
}

impl SourceMismatch {
    /// The identity the workload at the source address has (rule 4), for logs.
    pub(super) fn expected(&self) -> Option<&Identity> {
        match self {
            SourceMismatch::NotTheWorkload { expected, .. } => Some(expected),
            SourceMismatch::NotOnProxyNode { .. } => None,
        }
    }
}

/// Whether `w` runs as one of the node-proxy accounts.
pub(super) fn is_node_proxy(w: &Workload, accounts: &[NodeProxyAccount]) -> bool {
    accounts
        .iter()
        .any(|a| a.namespace == w.namespace && a.service_account == w.service_account)
}

/// Applies the rule above to a client at `src` on `network` (the served workload's: a
/// direct peer shares it) that proved `presented`.
pub(super) fn check_source(
    snap: &Snapshot,
    network: &str,
    src: IpAddr,
    presented: &Identity,
    node_proxies: &[NodeProxyAccount],
) -> Result<Source, SourceMismatch> {
    let Some(w) = snap.workload_by_ip(network, src) else {
        return Ok(Source::Workload(None));
    };
    let own = w.identity();
    if own == *presented {
        return Ok(Source::Workload(Some(w.clone())));
    }
    if is_node_proxy(w, node_proxies) {
        // Linear in the number of workloads, only for connections from a node proxy
        // without original source (pooled: one check per HBONE connection).
        let on_its_node = snap
            .workloads()
            .any(|o| o.node == w.node && o.identity() == *presented);
        return if on_its_node {
            Ok(Source::NodeProxy(w.clone()))
        } else {
            Err(SourceMismatch::NotOnProxyNode {
                presented: presented.clone(),
                proxy: w.uid.clone(),
                node: w.node.clone(),
            })
        };
    }
    if snap.is_network_gateway(network, w) {
        return Ok(Source::NetworkGateway(w.clone()));
    }
    Err(SourceMismatch::NotTheWorkload {
        presented: presented.clone(),
        workload: w.uid.clone(),
        expected: own,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::file::test_store;

    const YAML: &str = r#"
workloads:
- {uid: a, name: a, namespace: ns, serviceAccount: sa-a, workloadIps: ["10.244.1.5"],
   protocol: HBONE, node: n1, services: {}}
- {uid: c, name: c, namespace: ns, serviceAccount: sa-c, workloadIps: ["10.244.1.6"],
   protocol: HBONE, node: n1, services: {}}
- {uid: b, name: b, namespace: ns, serviceAccount: sa-b, workloadIps: ["10.244.2.7"],
   protocol: HBONE, node: n2, services: {}}
- {uid: zt1, name: ztunnel-n1, namespace: istio-system, serviceAccount: ztunnel,
   workloadIps: ["10.244.1.3"], protocol: TCP, node: n1, services: {}}
- {uid: lookalike, name: lookalike, namespace: ns, serviceAccount: ztunnel,
   workloadIps: ["10.244.1.9"], protocol: TCP, node: n1, services: {}}
"#;

    fn snapshot() -> Arc<Snapshot> {
        test_store(YAML).snapshot()
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    fn accounts() -> Vec<NodeProxyAccount> {
        vec!["istio-system/ztunnel".parse().unwrap()]
    }

    fn check(src: &str, presented: &Identity) -> Result<Source, SourceMismatch> {
        check_source(
            &snapshot(),
            "",
            src.parse().unwrap(),
            presented,
            &accounts(),
        )
    }

    #[test]
    fn a_workload_presents_only_its_own_identity() {
        match check("10.244.1.5", &id("ns", "sa-a")) {
            Ok(Source::Workload(Some(w))) => assert_eq!(w.uid, "a"),
            r => panic!("{r:?}"),
        }
        // Another workload's certificate from its own address: refused, even a workload
        // of the same node, naming both identities.
        let e = check("10.244.1.5", &id("ns", "sa-c")).unwrap_err();
        assert_eq!(e.expected(), Some(&id("ns", "sa-a")));
        let msg = e.to_string();
        assert!(
            msg.contains("sa-c") && msg.contains("sa-a") && msg.contains("a:"),
            "{msg}"
        );
        // A pod whose service account merely has the node proxy's name, in another
        // namespace, is no node proxy.
        assert!(matches!(
            check("10.244.1.9", &id("ns", "sa-a")),
            Err(SourceMismatch::NotTheWorkload { .. })
        ));
    }

    #[test]
    fn the_network_gateway_relays_clients_of_other_networks() {
        let yaml = r#"
workloads:
- {uid: ew, name: ew, namespace: istio-system, serviceAccount: istio-eastwestgateway,
   workloadIps: ["10.244.1.20"], protocol: TCP, network: west, services: {}}
- {uid: b, name: b, namespace: ns, serviceAccount: sa-b, workloadIps: ["10.244.1.7"],
   protocol: HBONE, network: west, networkGateway: {destination: "west/10.244.1.20"},
   services: {}}
- {uid: other, name: other, namespace: ns, serviceAccount: sa-o, workloadIps: ["10.244.1.21"],
   protocol: TCP, network: west, services: {}}
"#;
        let snap = test_store(yaml).snapshot();
        let remote = id("far", "sa-remote");
        let check = |src: &str, network: &str| {
            check_source(&snap, network, src.parse().unwrap(), &remote, &accounts())
        };
        match check("10.244.1.20", "west") {
            Ok(Source::NetworkGateway(w)) => assert_eq!(w.uid, "ew"),
            r => panic!("{r:?}"),
        }
        // Any other workload of the network stays bound to its own identity.
        assert!(matches!(
            check("10.244.1.21", "west"),
            Err(SourceMismatch::NotTheWorkload { .. })
        ));
    }

    #[test]
    fn unknown_sources_are_left_to_authorization() {
        assert!(matches!(
            check("192.0.2.1", &id("ns", "sa-a")),
            Ok(Source::Workload(None))
        ));
    }

    /// The GENEVE-mode regression: the source node's ztunnel connecting from its own pod IP
    /// (no original source) with the certificate of a pod on its node was refused.
    #[test]
    fn a_node_proxy_presents_identities_of_its_own_node_only() {
        for sa in ["sa-a", "sa-c"] {
            match check("10.244.1.3", &id("ns", sa)) {
                Ok(Source::NodeProxy(w)) => assert_eq!(w.uid, "zt1"),
                r => panic!("{sa}: {r:?}"),
            }
        }
        // Its own identity is its own.
        assert!(matches!(
            check("10.244.1.3", &id("istio-system", "ztunnel")),
            Ok(Source::Workload(Some(_)))
        ));
        // b runs on n2: the CA would never have given n1's proxy b's certificate.
        let e = check("10.244.1.3", &id("ns", "sa-b")).unwrap_err();
        assert!(matches!(e, SourceMismatch::NotOnProxyNode { .. }), "{e}");
        assert!(e.to_string().contains("\"n1\""), "{e}");
        // Without the account configured as a node proxy, rule 4 applies.
        assert!(
            check_source(
                &snapshot(),
                "",
                "10.244.1.3".parse().unwrap(),
                &id("ns", "sa-a"),
                &[]
            )
            .is_err()
        );
    }
}
