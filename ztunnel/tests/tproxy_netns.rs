//! The node-scope proxy of TPROXY mode (`PROXY_MODE=shared`, `INPOD_ENABLED=false`) in a
//! real "ztunnel pod" namespace with real TPROXY rules, on this machine's kernel (no
//! GENEVE needed: the pods' links end in ztunnel's namespace instead of the tunnels, with
//! the same TPROXY, mark and local-route setup the node agent installs there).
//!
//! ```text
//!   pod a 10.61.1.1 ──za─┐
//!   pod b 10.61.1.2 ──zb─┤ ztunnel netns (10.61.1.254 on each link): TPROXY za→15001,
//!   remote 10.62.0.5 ─zr─┘   zr→15006; replies on zb to other addresses marked 0x4d3
//! ```
//!
//! - a → b:8080 is captured on 15001, its original destination is the accepted socket's
//!   local address, a is found by its source IP, and b (same node) is reached through the
//!   node-local fast path with a's IP as source (transparent + freebind); both directions
//!   are access-logged with the SPIFFE identities.
//! - remote → b:8080 is captured on 15006 and delivered with the remote's IP as source.

mod common;
mod tproxy_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tproxy_support::Prerouting::{Capture, CapturePort, ReturnMark};
use tproxy_support::{
    Namespaces, NodeProxy, echo_server, install_prerouting, ip, is_root, pod_link, roundtrip,
    tproxy_routing,
};

const A: Ipv4Addr = Ipv4Addr::new(10, 61, 1, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 61, 1, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 61, 1, 254);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 62, 0, 5);

/// Namespaces: 0 zt, 1 pod a, 2 pod b, 3 remote.
fn topology() -> Namespaces {
    let t = Namespaces::new("zttp", &["zt", "a", "b", "r"]);
    let zt = t.name(0);
    for (i, (link, addr)) in [("za", A), ("zb", B), ("zr", REMOTE)].iter().enumerate() {
        pod_link(zt, link, t.name(i + 1), *addr, GW);
    }
    // What the node agent sets up in the ztunnel pod (GENEVE mode), with these links
    // in place of pistioout (za) / pistioin (zr) / eth0 (zb).
    tproxy_routing(zt, true);
    install_prerouting(
        &t.ns(0),
        &[
            Capture("za", 15001),
            Capture("zr", 15006),
            ReturnMark("zb", GW),
        ],
    );
    t
}

#[test]
fn node_proxy_with_tproxy_in_its_own_netns() {
    if !is_root() {
        return;
    }
    let topo = topology();
    let mesh = common::Mesh::new("10.61.1", |c| {
        c.node_name = Some("n1".into());
    });
    let proxy = NodeProxy::start(topo.ns(0), mesh.inputs.clone(), true);
    let dst = SocketAddr::from((B, 8080));
    let peers = echo_server(&topo.ns(2), dst);

    // a → b: outbound capture, node-local fast path, a's IP kept as source.
    assert_eq!(roundtrip(&topo.ns(1), dst, b"from-a"), b"from-a");
    let seen = peers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(A), "b must see a's address");
    let a_id = "spiffe://cluster.local/ns/ns-a/sa/sa-a";
    let b_id = "spiffe://cluster.local/ns/ns-b/sa/sa-b";
    common::wait_until(
        "outbound+inbound access log lines for a -> b",
        Duration::from_secs(5),
        || {
            let logged =
                |dir: &str| !common::log_lines(&[dir, a_id, b_id, "10.61.1.2:8080"]).is_empty();
            logged("direction=\"outbound\"") && logged("direction=\"inbound\"")
        },
    );

    // remote → b: inbound plaintext capture, remote's IP kept as source.
    assert_eq!(roundtrip(&topo.ns(3), dst, b"from-remote"), b"from-remote");
    let seen = peers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        seen.ip(),
        IpAddr::V4(REMOTE),
        "b must see the remote's address"
    );

    proxy.stop();
}

// ---- two nodes: HBONE between two node proxies ----------------------------------------

const A1: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 1);
const ZT1: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 3);
const GW1: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 254);
const B2: Ipv4Addr = Ipv4Addr::new(10, 64, 2, 1);
const ZT2: Ipv4Addr = Ipv4Addr::new(10, 64, 2, 3);
const GW2: Ipv4Addr = Ipv4Addr::new(10, 64, 2, 254);

/// Two "nodes", each a ztunnel netns with one pod; the link between the two ztunnel
/// namespaces stands for node 1 → underlay → node 2 → `istioin` (GENEVE mode), with the
/// same TPROXY (15008 on the inbound link) and 0x4d3 return marks the node agent installs:
///
/// ```text
///   pod a 10.64.1.1 ─za─ zt1 (10.64.1.3 on z12) ═z12/z21═ zt2 (10.64.2.3 on z21) ─zb─ pod b 10.64.2.1
/// ```
///
/// Namespaces: 0 zt1, 1 pod a, 2 zt2, 3 pod b.
fn two_nodes() -> Namespaces {
    let t = Namespaces::new("zttp2n", &["zt1", "a", "zt2", "b"]);
    let (zt1, a, zt2, b) = (t.name(0), t.name(1), t.name(2), t.name(3));
    // pods
    pod_link(zt1, "za", a, A1, GW1);
    pod_link(zt2, "zb", b, B2, GW2);
    // "underlay" between the two ztunnel namespaces
    ip(
        zt1,
        &format!("link add z12 type veth peer name z21 netns {zt2}"),
    );
    ip(zt1, &format!("addr add {ZT1}/32 dev z12"));
    ip(zt2, &format!("addr add {ZT2}/32 dev z21"));
    ip(zt1, "link set z12 up");
    ip(zt2, "link set z21 up");
    ip(zt1, &format!("route add {ZT2}/32 dev z12 scope link"));
    ip(zt2, &format!("route add {ZT1}/32 dev z21 scope link"));
    ip(zt1, &format!("route add {B2}/32 via {ZT2} dev z12"));
    ip(zt2, &format!("route add {A1}/32 via {ZT1} dev z21"));
    for zt in [zt1, zt2] {
        tproxy_routing(zt, true);
    }
    // zt1: a's outbound → 15001 (pistioout); replies to a's address arriving from
    // node 2 → local (0x4d3). zt2: HBONE from node 1 → 15008 (pistioin); b's replies
    // to other addresses → local (0x4d3).
    install_prerouting(&t.ns(0), &[Capture("za", 15001), ReturnMark("z12", ZT1)]);
    install_prerouting(
        &t.ns(2),
        &[CapturePort("z21", 15008), ReturnMark("zb", GW2)],
    );
    t
}

/// The cluster as ztunnel's state sees it: a on n1, b on n2, and each node's ztunnel pod
/// (istio-system/ztunnel, indexed like any pod by Kubernetes discovery).
const TWO_NODES_YAML: &str = r#"
workloads:
- {uid: a, name: a, namespace: ns-a, serviceAccount: sa-a, workloadIps: ["10.64.1.1"],
   protocol: HBONE, node: n1, services: {}}
- {uid: b, name: b, namespace: ns-b, serviceAccount: sa-b, workloadIps: ["10.64.2.1"],
   protocol: HBONE, node: n2, services: {}}
- {uid: zt1, name: ztunnel-n1, namespace: istio-system, serviceAccount: ztunnel,
   workloadIps: ["10.64.1.3"], protocol: TCP, node: n1, services: {}}
- {uid: zt2, name: ztunnel-n2, namespace: istio-system, serviceAccount: ztunnel,
   workloadIps: ["10.64.2.3"], protocol: TCP, node: n2, services: {}}
"#;

/// GENEVE-mode regression: node 1's ztunnel tunnels a's connection to b on node 2.
/// With original source, the HBONE connection comes from a's own IP, so node 2's source
/// check compares a's certificate with a (before the fix it came from ztunnel-n1's IP and
/// was refused as an identity mismatch). Without original source it comes from
/// ztunnel-n1's IP and is accepted because ztunnel-n1 is a node proxy presenting the
/// identity of a workload on its own node.
#[test]
fn hbone_between_node_proxies_with_and_without_original_source() {
    if !is_root() {
        return;
    }
    let topo = two_nodes();
    let mesh = common::Mesh::new("10.64.9", |_| {});
    let lc = common::local_config(TWO_NODES_YAML, "two-nodes.yaml");
    mesh.store
        .source("file")
        .replace_all(lc.workloads, lc.services, lc.policies);
    let on_node = |node: &str| {
        let mut inputs = mesh.inputs.clone();
        let mut cfg = (*inputs.cfg).clone();
        cfg.node_name = Some(node.into());
        inputs.cfg = Arc::new(cfg);
        inputs
    };
    // Node 2 delivers with the client address it sees (as in production).
    let zt2 = NodeProxy::start(topo.ns(2), on_node("n2"), true);
    let dst = SocketAddr::from((B2, 8080));
    let peers = echo_server(&topo.ns(3), dst);
    let a_id = "spiffe://cluster.local/ns/ns-a/sa/sa-a";

    for (orig_src, seen_src) in [(true, A1), (false, ZT1)] {
        let zt1 = NodeProxy::start(topo.ns(0), on_node("n1"), orig_src);
        let mismatches = mesh.refused("identity_mismatch");
        let payload: &'static [u8] = if orig_src { b"orig-src" } else { b"node-proxy" };
        assert_eq!(
            roundtrip(&topo.ns(1), dst, payload),
            payload,
            "orig_src={orig_src}: a -> b over HBONE\n{}",
            common::logs()
        );
        let seen = peers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            seen.ip(),
            IpAddr::V4(seen_src),
            "orig_src={orig_src}: address b sees"
        );
        assert_eq!(mesh.refused("identity_mismatch"), mismatches);
        // Node 2's inbound access log: a's identity, the source address it came from.
        let from = format!("{seen_src}:");
        common::wait_until(
            &format!("orig_src={orig_src}: inbound access log from {seen_src}"),
            Duration::from_secs(5),
            || {
                !common::log_lines(&["direction=\"inbound\"", a_id, "10.64.2.1:8080", &from])
                    .is_empty()
            },
        );
        zt1.stop();
    }
    zt2.stop();
}
