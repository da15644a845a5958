//! Node-wide (TPROXY) mode: certificates follow the workloads the state lists on this node.
//! The real node proxy in a "ztunnel pod" namespace with the TPROXY rules the node agent
//! installs (as in `tproxy_netns.rs`), the real store, the node-certificates watcher
//! (`app::node_certs`) and a counting CA:
//!
//! ```text
//!   pod a 10.66.1.1 ──za── ztunnel netns (TPROXY za→15001)   remote r 10.66.2.1 (node n2, unreachable)
//! ```
//!
//! a's connection to r makes the node proxy fetch a's certificate on demand (the HBONE
//! connect then fails: no route to node n2). While a replica of a's identity stays on the
//! node the certificate is renewed; once the last one is removed from the store, no more
//! CSRs and it is gone from the dump.
//!
//! Needs root (network namespaces, TPROXY).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use node_agent::redirect::netns::Netns;
use prometheus_client::registry::Registry;
use ztunnel::app::node_certs;
use ztunnel::config::Config;
use ztunnel::identity::{Identity, SecretManager};
use ztunnel::proxy::{ProxyFactory, ProxyInputs, ProxyScope, ProxySpec};
use ztunnel::redirect::tproxy::TproxySocketFactory;
use ztunnel::state::Store;
use ztunnel::state::file::{FileDefaults, parse};
use ztunnel::telemetry::ProxyMetrics;

const A: Ipv4Addr = Ipv4Addr::new(10, 66, 1, 1);
const GW: Ipv4Addr = Ipv4Addr::new(10, 66, 1, 254);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 66, 2, 1);

const WORKLOADS: &str = r#"
workloads:
- {uid: a, name: a, namespace: ns-a, serviceAccount: sa-a, workloadIps: ["10.66.1.1"],
   protocol: HBONE, node: n1, services: {}}
- {uid: a-2, name: a-2, namespace: ns-a, serviceAccount: sa-a, workloadIps: ["10.66.1.3"],
   protocol: HBONE, node: n1, services: {}}
- {uid: r, name: r, namespace: ns-r, serviceAccount: sa-r, workloadIps: ["10.66.2.1"],
   protocol: HBONE, node: n2, services: {}}
"#;

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

/// The ztunnel netns and pod a's netns, deleted on drop.
struct Topology {
    zt: String,
    a: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in [&self.zt, &self.a] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

impl Topology {
    fn new() -> Self {
        let p = format!("ztnc{}", std::process::id());
        let t = Topology {
            zt: format!("{p}-zt"),
            a: format!("{p}-a"),
        };
        for n in [&t.zt, &t.a] {
            let out = Command::new("ip")
                .args(["netns", "add", n])
                .output()
                .unwrap();
            assert!(out.status.success(), "ip netns add {n}");
            ip(n, "link set lo up");
        }
        let (zt, a) = (&t.zt, &t.a);
        ip(
            zt,
            &format!("link add za type veth peer name eth0 netns {a}"),
        );
        ip(zt, &format!("addr add {GW}/32 dev za"));
        ip(zt, "link set za up");
        ip(zt, &format!("route add {A}/32 dev za scope link"));
        ip(a, &format!("addr add {A}/32 dev eth0"));
        ip(a, "link set eth0 up");
        ip(a, &format!("route add {GW}/32 dev eth0 scope link"));
        ip(a, &format!("route add default via {GW} dev eth0"));
        ip(zt, "rule add fwmark 0x400/0xfff lookup 100 priority 20000");
        ip(zt, "route add local 0.0.0.0/0 dev lo table 100");
        let rules = "*mangle\n\
             -A PREROUTING -i za -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff\n\
             COMMIT\n";
        t.ns(zt)
            .run(move || {
                for k in ["all", "default", "za"] {
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
        t
    }

    fn ns(&self, name: &str) -> Netns {
        Netns::open(format!("/run/netns/{name}")).unwrap()
    }
}

fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            common::logs()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn node_proxy_forgets_the_certificate_of_the_last_workload_that_left() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces, TPROXY)");
        return;
    }
    common::init_logs();
    let topo = Topology::new();
    let ca = common::ca("ec");
    let provider = Arc::new(common::CountingCa::new(ca.clone()));
    // Shorter than the CA's one-minute back-dating: renewed every second.
    let cfg = Config {
        secret_ttl: Duration::from_secs(2),
        node_name: Some("n1".into()),
        handshake_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let certs = SecretManager::new(provider.clone(), cfg.secret_ttl);
    let store = Store::new();
    let lc = parse(
        WORKLOADS,
        std::path::Path::new("node-certs.yaml"),
        &FileDefaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        },
    )
    .unwrap();
    let src = store.source("file");
    src.replace_all(lc.workloads, lc.services, lc.policies);
    let inputs = ProxyInputs {
        cfg: Arc::new(cfg),
        state: store.clone(),
        certs: certs.clone(),
        roots: common::roots(&ca),
        metrics: Arc::new(ProxyMetrics::new(&mut Registry::default())),
    };

    // The node proxy and the watcher, on a thread inside the ztunnel netns.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let zt = topo.ns(&topo.zt);
    let proxy_thread = std::thread::spawn(move || {
        nix::sched::setns(&zt, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let node = inputs.cfg.node_name.clone();
            let _watch = node_certs::watch(
                inputs.state.clone(),
                inputs.certs.clone(),
                node,
                Duration::from_millis(100),
            );
            let handle = ProxyFactory::new(inputs)
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

    let a_id = Identity::new("cluster.local", "ns-a", "sa-a");
    let listed = || {
        certs
            .dump(&[])
            .iter()
            .any(|d| d.identity == a_id.to_string())
    };
    assert!(!listed(), "nothing fetched before traffic");

    // a → r (node n2): captured, a's certificate fetched for the HBONE connection.
    topo.ns(&topo.a)
        .run(|| {
            let dst = SocketAddr::from((REMOTE, 8080));
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                .expect("captured by the node proxy");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"hello");
            let _ = s.read(&mut [0u8; 16]);
        })
        .unwrap();
    wait_until(
        "a's certificate fetched on demand",
        Duration::from_secs(5),
        || certs.current(&a_id).is_some(),
    );

    // The workload that made the connection leaves; its replica on the node keeps the
    // identity in use.
    src.remove_workload("a");
    std::thread::sleep(Duration::from_millis(400));
    assert!(listed(), "replica a-2 still on n1");
    let before = provider.count(&a_id);
    wait_until("renewal while a-2 runs", Duration::from_secs(5), || {
        provider.count(&a_id) > before
    });

    // The last one is rescheduled to another node.
    let mut moved = store
        .snapshot()
        .workload_by_uid("a-2")
        .unwrap()
        .as_ref()
        .clone();
    moved.node = "n2".into();
    src.upsert_workload(moved);
    wait_until("a's certificate dropped", Duration::from_secs(5), || {
        !listed()
    });
    assert!(certs.current(&a_id).is_none());
    let after = provider.count(&a_id);
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(
        provider.count(&a_id),
        after,
        "no CSR once no workload of n1 has it"
    );
    assert!(!listed());
    assert!(
        !common::log_lines(&["certificate dropped", "ns-a/sa/sa-a"]).is_empty(),
        "the drop is logged with the identity:\n{}",
        common::logs()
    );

    stop_tx.send(()).unwrap();
    proxy_thread.join().unwrap();
}
