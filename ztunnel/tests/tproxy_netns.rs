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

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use node_agent::redirect::netns::Netns;
use ztunnel::proxy::{ProxyFactory, ProxyScope, ProxySpec};
use ztunnel::redirect::tproxy::TproxySocketFactory;

const A: Ipv4Addr = Ipv4Addr::new(10, 61, 1, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 61, 1, 2);
const GW: Ipv4Addr = Ipv4Addr::new(10, 61, 1, 254);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 62, 0, 5);

fn ip(ns: &str, args: &str) {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Named namespaces for one test, deleted on drop.
struct Topology {
    names: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

impl Topology {
    fn zt(&self) -> &str {
        &self.names[0]
    }

    fn ns(&self, i: usize) -> Netns {
        Netns::open(format!("/run/netns/{}", self.names[i])).unwrap()
    }

    fn new() -> Self {
        let p = format!("zttp{}", std::process::id());
        let t = Topology {
            names: ["zt", "a", "b", "r"]
                .iter()
                .map(|n| format!("{p}-{n}"))
                .collect(),
        };
        for n in &t.names {
            let out = Command::new("ip")
                .args(["netns", "add", n])
                .output()
                .unwrap();
            assert!(out.status.success(), "ip netns add {n}");
            ip(n, "link set lo up");
        }
        let zt = t.zt().to_string();
        for (i, (link, addr)) in [("za", A), ("zb", B), ("zr", REMOTE)].iter().enumerate() {
            let pod = &t.names[i + 1];
            ip(
                &zt,
                &format!("link add {link} type veth peer name eth0 netns {pod}"),
            );
            ip(&zt, &format!("addr add {GW}/32 dev {link}"));
            ip(&zt, &format!("link set {link} up"));
            ip(&zt, &format!("route add {addr}/32 dev {link} scope link"));
            ip(pod, &format!("addr add {addr}/32 dev eth0"));
            ip(pod, "link set eth0 up");
            ip(pod, &format!("route add {GW}/32 dev eth0 scope link"));
            ip(pod, &format!("route add default via {GW} dev eth0"));
        }
        // What the node agent sets up in the ztunnel pod (GENEVE mode), with these links
        // in place of pistioout (za) / pistioin (zr) / eth0 (zb).
        ip(&zt, "rule add fwmark 0x400/0xfff lookup 100 priority 20000");
        ip(&zt, "rule add fwmark 0x4d3/0xfff lookup 100 priority 20003");
        ip(&zt, "route add local 0.0.0.0/0 dev lo table 100");
        let rules = format!(
            "*mangle\n\
             -A PREROUTING -i za -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff\n\
             -A PREROUTING -i zr -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff\n\
             -A PREROUTING ! -d {GW}/32 -i zb -p tcp -j MARK --set-xmark 0x4d3/0xfff\n\
             COMMIT\n"
        );
        t.ns(0)
            .run(move || {
                for k in ["all", "default", "za", "zb", "zr"] {
                    std::fs::write(format!("/proc/sys/net/ipv4/conf/{k}/rp_filter"), "0").unwrap();
                }
                let mut child = Command::new("iptables-restore")
                    .arg("--noflush")
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(rules.as_bytes())
                    .unwrap();
                assert!(
                    child.wait().unwrap().success(),
                    "iptables-restore in ztunnel netns"
                );
            })
            .unwrap();
        t
    }
}

/// Echo server on b:8080; reports each client's address.
fn echo_server(ns: &Netns) -> mpsc::Receiver<SocketAddr> {
    let l = ns.run(|| TcpListener::bind((B, 8080))).unwrap().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = tx.send(s.peer_addr().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx
}

fn roundtrip(ns: &Netns, dst: SocketAddr, payload: &'static [u8]) -> Vec<u8> {
    ns.run(move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(payload)?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("round trip to {dst}: {e}"))
}

#[test]
fn node_proxy_with_tproxy_in_its_own_netns() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces, TPROXY)");
        return;
    }
    let topo = Topology::new();
    let mesh = Arc::new(common::Mesh::new("10.61.1", |c| {
        c.node_name = Some("n1".into());
    }));

    // The proxy runs on a thread inside the ztunnel netns, so every socket the TPROXY
    // factory makes (listeners, upstream connects) lives there.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let zt = topo.ns(0);
    let m = mesh.clone();
    let proxy_thread = std::thread::spawn(move || {
        nix::sched::setns(&zt, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let handle = ProxyFactory::new(m.inputs.clone())
                .start(ProxySpec {
                    scope: ProxyScope::Node,
                    sockets: Arc::new(TproxySocketFactory::new()),
                    bind_ip: IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                    orig_src: true,
                    dns: false,
                })
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
            handle.drain(Duration::from_millis(200)).await;
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("proxy started");
    let peers = echo_server(&topo.ns(2));

    // a → b: outbound capture, node-local fast path, a's IP kept as source.
    let dst = SocketAddr::from((B, 8080));
    assert_eq!(roundtrip(&topo.ns(1), dst, b"from-a"), b"from-a");
    let seen = peers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(A), "b must see a's address");
    let a_id = "spiffe://cluster.local/ns/ns-a/sa/sa-a";
    let b_id = "spiffe://cluster.local/ns/ns-b/sa/sa-b";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = common::log_lines(&["direction=\"outbound\"", a_id, b_id, "10.61.1.2:8080"]);
        let inb = common::log_lines(&["direction=\"inbound\"", a_id, b_id, "10.61.1.2:8080"]);
        if !out.is_empty() && !inb.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no outbound+inbound access log lines for a -> b:\n{}",
            common::logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // remote → b: inbound plaintext capture, remote's IP kept as source.
    assert_eq!(roundtrip(&topo.ns(3), dst, b"from-remote"), b"from-remote");
    let seen = peers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        seen.ip(),
        IpAddr::V4(REMOTE),
        "b must see the remote's address"
    );

    stop_tx.send(()).unwrap();
    proxy_thread.join().unwrap();
}

// ---- two nodes: HBONE between two node proxies ----------------------------------------

/// Two "nodes", each a ztunnel netns with one pod; the link between the two ztunnel
/// namespaces stands for node 1 → underlay → node 2 → `istioin` (GENEVE mode), with the
/// same TPROXY (15008 on the inbound link) and 0x4d3 return marks the node agent installs:
///
/// ```text
///   pod a 10.64.1.1 ─za─ zt1 (10.64.1.3 on z12) ═z12/z21═ zt2 (10.64.2.3 on z21) ─zb─ pod b 10.64.2.1
/// ```
struct TwoNodes {
    names: Vec<String>,
}

const A1: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 1);
const ZT1: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 3);
const GW1: Ipv4Addr = Ipv4Addr::new(10, 64, 1, 254);
const B2: Ipv4Addr = Ipv4Addr::new(10, 64, 2, 1);
const ZT2: Ipv4Addr = Ipv4Addr::new(10, 64, 2, 3);
const GW2: Ipv4Addr = Ipv4Addr::new(10, 64, 2, 254);

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn iptables_restore(ns: &Netns, rules: String, links: &'static [&'static str]) {
    ns.run(move || {
        for k in ["all", "default"].iter().chain(links) {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{k}/rp_filter"), "0").unwrap();
        }
        let mut child = Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "iptables-restore");
    })
    .unwrap();
}

impl TwoNodes {
    fn ns(&self, i: usize) -> Netns {
        Netns::open(format!("/run/netns/{}", self.names[i])).unwrap()
    }

    /// Namespaces: 0 zt1, 1 pod a, 2 zt2, 3 pod b.
    fn new() -> Self {
        let p = format!("zttp2n{}", std::process::id());
        let t = TwoNodes {
            names: ["zt1", "a", "zt2", "b"]
                .iter()
                .map(|n| format!("{p}-{n}"))
                .collect(),
        };
        for n in &t.names {
            let out = Command::new("ip")
                .args(["netns", "add", n])
                .output()
                .unwrap();
            assert!(out.status.success(), "ip netns add {n}");
            ip(n, "link set lo up");
        }
        let (zt1, a, zt2, b) = (&t.names[0], &t.names[1], &t.names[2], &t.names[3]);
        // pods
        for (zt, link, pod, addr, gw) in [(zt1, "za", a, A1, GW1), (zt2, "zb", b, B2, GW2)] {
            ip(
                zt,
                &format!("link add {link} type veth peer name eth0 netns {pod}"),
            );
            ip(zt, &format!("addr add {gw}/32 dev {link}"));
            ip(zt, &format!("link set {link} up"));
            ip(zt, &format!("route add {addr}/32 dev {link} scope link"));
            ip(pod, &format!("addr add {addr}/32 dev eth0"));
            ip(pod, "link set eth0 up");
            ip(pod, &format!("route add {gw}/32 dev eth0 scope link"));
            ip(pod, &format!("route add default via {gw} dev eth0"));
        }
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
            ip(zt, "rule add fwmark 0x400/0xfff lookup 100 priority 20000");
            ip(zt, "rule add fwmark 0x4d3/0xfff lookup 100 priority 20003");
            ip(zt, "route add local 0.0.0.0/0 dev lo table 100");
        }
        // zt1: a's outbound → 15001 (pistioout); replies to a's address arriving from
        // node 2 → local (0x4d3). zt2: HBONE from node 1 → 15008 (pistioin); b's replies
        // to other addresses → local (0x4d3).
        iptables_restore(
            &t.ns(0),
            format!(
                "*mangle\n\
                 -A PREROUTING -i za -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff\n\
                 -A PREROUTING ! -d {ZT1}/32 -i z12 -p tcp -j MARK --set-xmark 0x4d3/0xfff\n\
                 COMMIT\n"
            ),
            &["za", "z12"],
        );
        iptables_restore(
            &t.ns(2),
            format!(
                "*mangle\n\
                 -A PREROUTING -i z21 -p tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff\n\
                 -A PREROUTING ! -d {GW2}/32 -i zb -p tcp -j MARK --set-xmark 0x4d3/0xfff\n\
                 COMMIT\n"
            ),
            &["zb", "z21"],
        );
        t
    }
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

/// A node proxy running on a thread inside `ns`; stops when the sender is dropped or used.
fn node_proxy(
    ns: Netns,
    inputs: ztunnel::proxy::ProxyInputs,
    orig_src: bool,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let handle = ProxyFactory::new(inputs)
                .start(ProxySpec {
                    scope: ProxyScope::Node,
                    sockets: Arc::new(TproxySocketFactory::new()),
                    bind_ip: IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                    orig_src,
                    dns: false,
                })
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
            handle.drain(Duration::from_millis(200)).await;
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("proxy started");
    (stop_tx, thread)
}

/// GENEVE-mode regression: node 1's ztunnel tunnels a's connection to b on node 2.
/// With original source, the HBONE connection comes from a's own IP, so node 2's source
/// check compares a's certificate with a (before the fix it came from ztunnel-n1's IP and
/// was refused as an identity mismatch). Without original source it comes from
/// ztunnel-n1's IP and is accepted because ztunnel-n1 is a node proxy presenting the
/// identity of a workload on its own node.
#[test]
fn hbone_between_node_proxies_with_and_without_original_source() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces, TPROXY)");
        return;
    }
    let topo = TwoNodes::new();
    let mesh = common::Mesh::new("10.64.9", |_| {});
    let lc = ztunnel::state::file::parse(
        TWO_NODES_YAML,
        std::path::Path::new("two-nodes.yaml"),
        &ztunnel::state::file::FileDefaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        },
    )
    .unwrap();
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
    let (stop2, zt2) = node_proxy(topo.ns(2), on_node("n2"), true);
    let b_ns = topo.ns(3);
    let peers = {
        let l = b_ns.run(|| TcpListener::bind((B2, 8080))).unwrap().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = tx.send(s.peer_addr().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        rx
    };
    let dst = SocketAddr::from((B2, 8080));
    let a_id = "spiffe://cluster.local/ns/ns-a/sa/sa-a";

    for (orig_src, seen_src) in [(true, A1), (false, ZT1)] {
        let (stop1, zt1) = node_proxy(topo.ns(0), on_node("n1"), orig_src);
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
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while common::log_lines(&["direction=\"inbound\"", a_id, "10.64.2.1:8080", &from])
            .is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "orig_src={orig_src}: no inbound access log from {seen_src}:\n{}",
                common::logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        stop1.send(()).unwrap();
        zt1.join().unwrap();
    }
    stop2.send(()).unwrap();
    zt2.join().unwrap();
}
