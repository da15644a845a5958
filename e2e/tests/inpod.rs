//! In-pod mode end to end on one simulated node (root): the node agent's
//! in-pod redirector + ZDS server and ztunnel's in-pod service, in this test
//! process, with pods in real network namespaces (e2e netsim).
//!
//! - Two pods enrolled through ZDS: a plain TCP client in pod A reaches an
//!   echo server in pod B through both pods' ztunnel proxies over HBONE; a
//!   capture on the node bridge shows only port 15008 carrying payload and
//!   never the plaintext.
//! - A pod that is not enrolled has no rules and no proxy.
//! - Unenrol B (rules removed + ZDS Del; B's workload becomes TCP in the
//!   discovery state, as the control plane would make it): traffic is
//!   plaintext again and still works.
//! - ztunnel restart: the agent replays the snapshot; new connections work
//!   within 1 s of readiness.
//! - Agent restart: ztunnel keeps serving an open connection; after the new
//!   agent's reconcile + snapshot nothing still enrolled is restarted.
//!
//! ztunnel runs in the test process' netns, as in a real node, where the
//! ztunnel pod has its own netns: in in-pod mode all of its data-plane
//! sockets are created inside the pods' namespaces.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::dns_probe;
use e2e::inpod_agent::{InpodAgent, pod_redirect};
use e2e::netsim::{Cluster, Pod, can_create_netns, capture_during};
use hickory_proto::rr::RecordType;
use node_agent::redirect::Redirector;
use node_agent::redirect::inpod::rules;
use prometheus_client::registry::Registry;
use ztunnel::config::Config;
use ztunnel::identity::SecretManager;
use ztunnel::identity::local_ca::LocalCa;
use ztunnel::inpod::InpodService;
use ztunnel::proxy::{ProxyFactory, ProxyInputs};
use ztunnel::state::Store;
use ztunnel::state::file::{FileDefaults, parse};
use ztunnel::telemetry::ProxyMetrics;
use ztunnel::tls::TrustRoots;

const APP_PORT: u16 = 8080;

macro_rules! require_root {
    () => {
        if !can_create_netns() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
    };
}

/// The VIP of Service `b.default.svc.cluster.local` (in front of pod B).
const B_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 42);

fn mesh_yaml(a: Ipv4Addr, b: Ipv4Addr, b_protocol: &str) -> String {
    format!(
        r#"
workloads:
- uid: uid-a
  name: a
  namespace: default
  serviceAccount: sa-a
  workloadIps: ["{a}"]
  protocol: HBONE
- uid: uid-b
  name: b
  namespace: default
  serviceAccount: sa-b
  workloadIps: ["{b}"]
  protocol: {b_protocol}
services:
- name: b
  namespace: default
  hostname: b.default.svc.cluster.local
  vips: ["/{B_VIP}"]
  ports: {{80: 8080}}
"#
    )
}

fn set_state(store: &Store, a: Ipv4Addr, b: Ipv4Addr, b_protocol: &str) {
    let defaults = FileDefaults {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    };
    let lc = parse(
        &mesh_yaml(a, b, b_protocol),
        Path::new("inpod-e2e.yaml"),
        &defaults,
    )
    .unwrap();
    store
        .source("file")
        .replace_all(lc.workloads, lc.services, lc.policies);
}

fn ca() -> Arc<LocalCa> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ztunnel/testdata/ca");
    Arc::new(LocalCa::from_files(&dir.join("ec-root.pem"), &dir.join("ec-root.key")).unwrap())
}

/// ztunnel's in-pod half, running until dropped/stopped.
struct Ztunnel {
    service: Arc<InpodService>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ztunnel {
    fn start(uds: &Path, store: &Store, ca: &Arc<LocalCa>) -> Self {
        let cfg = Config {
            inpod_uds: uds.to_path_buf(),
            packet_mark: Some(1337),
            termination_grace_period: Duration::from_millis(500),
            ..Config::default()
        };
        let mut registry = Registry::default();
        let inputs = ProxyInputs {
            certs: SecretManager::new(ca.clone(), cfg.secret_ttl),
            cfg: Arc::new(cfg.clone()),
            state: store.clone(),
            roots: TrustRoots::from_der([ca.root_certificate().clone()], "test root").unwrap(),
            metrics: Arc::new(ProxyMetrics::new(&mut registry)),
        };
        let service = Arc::new(InpodService::new(&cfg, ProxyFactory::new(inputs)).unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s = service.clone();
        let task = tokio::spawn(async move {
            s.run(async {
                let _ = rx.await;
            })
            .await
        });
        Self {
            service,
            stop: Some(tx),
            task,
        }
    }

    fn ready(&self) -> bool {
        *self.service.readiness().borrow()
    }

    async fn wait_ready(&self) {
        wait_until("ztunnel ready", || self.ready()).await;
    }

    /// Open connections per workload proxy, by ZDS uid.
    fn connections(&self) -> BTreeMap<String, usize> {
        self.service
            .proxies()
            .handles()
            .into_iter()
            .map(|(uid, h)| (uid, h.active_connections()))
            .collect()
    }

    fn running(&self) -> Vec<String> {
        self.connections().into_keys().collect()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An echo server on 0.0.0.0:8080 inside `pod`, serving on this runtime.
fn echo_server(pod: &Pod) -> tokio::task::JoinHandle<()> {
    let std_listener = pod
        .netns()
        .run(|| {
            let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, APP_PORT))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// From inside `pod` (a plain client: no mark), connects to `dst`, sends
/// `payload`, reads it back. Blocking; run from a blocking thread.
fn roundtrip_blocking(pod: &Pod, dst: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let payload = payload.to_vec();
    pod.netns()
        .run(move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&payload)?;
            let mut back = vec![0u8; payload.len()];
            s.read_exact(&mut back)?;
            Ok(back)
        })
        .map_err(std::io::Error::other)?
}

/// A connection from inside `pod` kept open by the caller.
fn connect_in(pod: &Pod, dst: SocketAddr) -> TcpStream {
    pod.netns()
        .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap()
}

fn echo(s: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, payload);
    Ok(())
}

fn has_istio_rules(pod: &Pod) -> bool {
    let out = pod
        .netns()
        .exec("iptables-save", Vec::<&str>::new(), Duration::from_secs(5))
        .unwrap();
    out.contains(rules::CHAIN_OUTPUT)
}

fn dst(pod: &Pod) -> SocketAddr {
    SocketAddr::from((pod.ip(), APP_PORT))
}

fn socket_path(cluster: &Cluster) -> PathBuf {
    cluster.scope().dir().join("ztunnel/ztunnel.sock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pods_through_both_ztunnels_then_unenrol() {
    require_root!();
    let cluster = Cluster::new("inpode2e", 1).unwrap();
    let node = cluster.node(1);
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let c = node.add_pod("c").unwrap();
    let _server_b = echo_server(&b);
    let _server_c = echo_server(&c);
    let uds = socket_path(&cluster);

    let store = Store::new();
    set_state(&store, a.ip(), b.ip(), "HBONE");
    let ca = ca();
    let agent = InpodAgent::start(&uds, node.netns().path(), &[]).await;
    let z = Ztunnel::start(&uds, &store, &ca);
    z.wait_ready().await;

    // A's DNS is captured (per-pod annotation), B's is not.
    let mut pa = pod_redirect(&a, "uid-a", "sa-a");
    pa.annotations
        .insert("ambient.istio.io/dns-capture".into(), "true".into());
    let pb = pod_redirect(&b, "uid-b", "sa-b");
    agent.redirector.enrol(&pa).await.unwrap();
    agent.redirector.enrol(&pb).await.unwrap();
    assert_eq!(z.running(), vec!["uid-a", "uid-b"]);
    assert!(has_istio_rules(&a) && has_istio_rules(&b));
    // The pod that is not enrolled is untouched.
    assert!(!has_istio_rules(&c));
    assert!(!agent.zds.known_uids().contains(&"uid-c".to_string()));
    // Host probe SNAT knows exactly the enrolled pods.
    let members = node
        .netns()
        .exec(
            "ipset",
            ["save", rules::DEFAULT_PROBE_IPSET_V4],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(members.contains(&a.ip().to_string()) && members.contains(&b.ip().to_string()));
    assert!(!members.contains(&c.ip().to_string()));

    // A's DNS queries (to any server: C has none) reach ztunnel's DNS proxy inside A's
    // netns, which answers B's Service by its short name for A's namespace.
    let server = SocketAddr::from((c.ip(), 53));
    let (udp, tcp) = tokio::task::block_in_place(|| {
        (
            dns_probe::udp_query(a.netns(), server, "b", RecordType::A),
            dns_probe::tcp_query(a.netns(), server, "b.default", RecordType::A),
        )
    });
    for m in [udp, tcp] {
        assert!(m.metadata.authoritative, "{m:?}");
        assert_eq!(dns_probe::a_records(&m), [B_VIP], "{m:?}");
    }

    // A -> B through both proxies over HBONE: only 15008 carries payload on
    // the bridge, the plaintext never appears.
    let secret = b"IN-POD-SECRET-PAYLOAD-0123456789".repeat(64);
    let file = cluster.scope().dir().join("inpod-hbone.pcap");
    let (res, cap) = tokio::task::block_in_place(|| {
        capture_during(node.netns(), node.bridge(), &file, Some("tcp"), || {
            roundtrip_blocking(&a, dst(&b), &secret)
        })
    })
    .unwrap();
    assert_eq!(res.unwrap(), secret);
    assert!(!cap.contains(b"IN-POD-SECRET"), "plaintext on the wire");
    assert_eq!(
        cap.tcp_payload_server_ports(),
        [15008].into_iter().collect(),
        "only HBONE carries payload"
    );

    // Unenrol B: rules gone, its proxy drained, B is plain TCP in the
    // discovery state; A -> B is plaintext and still works.
    agent.redirector.unenrol(&pb).await.unwrap();
    set_state(&store, a.ip(), b.ip(), "TCP");
    assert!(!has_istio_rules(&b));
    wait_until("B's proxy removed", || z.running() == vec!["uid-a"]).await;
    let plain = b"NOW-PLAINTEXT-PAYLOAD".repeat(16);
    let file = cluster.scope().dir().join("inpod-plain.pcap");
    let (res, cap) = tokio::task::block_in_place(|| {
        capture_during(node.netns(), node.bridge(), &file, Some("tcp"), || {
            roundtrip_blocking(&a, dst(&b), &plain)
        })
    })
    .unwrap();
    assert_eq!(res.unwrap(), plain);
    assert!(cap.contains(b"NOW-PLAINTEXT"), "expected plaintext to B");
    assert!(!cap.tcp_payload_server_ports().contains(&15008));

    // The non-enrolled pod reaches B directly as before.
    let back = tokio::task::block_in_place(|| roundtrip_blocking(&c, dst(&b), b"hello")).unwrap();
    assert_eq!(back, b"hello");

    z.stop().await;
    agent.zds.shutdown();
    agent.redirector.cleanup_all().await.unwrap();
    for p in [&a, &b, &c] {
        assert!(!has_istio_rules(p));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ztunnel_and_agent_restarts() {
    require_root!();
    let cluster = Cluster::new("inpodrst", 1).unwrap();
    let node = cluster.node(1);
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let _server = echo_server(&b);
    let uds = socket_path(&cluster);
    let store = Store::new();
    set_state(&store, a.ip(), b.ip(), "HBONE");
    let ca = ca();
    let pa = pod_redirect(&a, "uid-a", "sa-a");
    let pb = pod_redirect(&b, "uid-b", "sa-b");

    let agent = InpodAgent::start(&uds, node.netns().path(), &[]).await;
    let z = Ztunnel::start(&uds, &store, &ca);
    z.wait_ready().await;
    agent.redirector.enrol(&pa).await.unwrap();
    agent.redirector.enrol(&pb).await.unwrap();
    let ok = tokio::task::block_in_place(|| roundtrip_blocking(&a, dst(&b), b"before"));
    assert_eq!(ok.unwrap(), b"before");

    // ztunnel restart: the agent replays its snapshot to the new one; new
    // connections work within 1 s of readiness.
    z.stop().await;
    let z = Ztunnel::start(&uds, &store, &ca);
    z.wait_ready().await;
    assert_eq!(z.running(), vec!["uid-a", "uid-b"]);
    // The very first attempt right after readiness works (no retry).
    let ok =
        tokio::task::block_in_place(|| roundtrip_blocking(&a, dst(&b), b"after-ztunnel-restart"));
    assert_eq!(ok.unwrap(), b"after-ztunnel-restart");

    // Agent restart with a connection open through both proxies.
    let mut open = tokio::task::block_in_place(|| connect_in(&a, dst(&b)));
    tokio::task::block_in_place(|| echo(&mut open, b"open-before")).unwrap();
    wait_until("the open connection is tracked", || {
        z.connections().values().all(|n| *n >= 1)
    })
    .await;
    agent.zds.shutdown();
    drop(agent);
    wait_until("ztunnel notices the agent is gone", || !z.ready()).await;
    // Proxies keep serving while the agent is away.
    tokio::task::block_in_place(|| echo(&mut open, b"open-during")).unwrap();

    let agent = InpodAgent::start(&uds, node.netns().path(), &[pa.clone(), pb.clone()]).await;
    z.wait_ready().await;
    assert_eq!(z.running(), vec!["uid-a", "uid-b"]);
    // Nothing still enrolled was drained: the old connection still works.
    tokio::task::block_in_place(|| echo(&mut open, b"open-after")).unwrap();
    let ok = tokio::task::block_in_place(|| roundtrip_blocking(&a, dst(&b), b"new-after"));
    assert_eq!(ok.unwrap(), b"new-after");
    drop(open);

    z.stop().await;
    agent.zds.shutdown();
    agent.redirector.cleanup_all().await.unwrap();
}
