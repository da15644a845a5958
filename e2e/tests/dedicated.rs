//! Dedicated mode end to end (root): two pods (netns + veth on the node's bridge), each
//! with its own ztunnel process (the real binary, configured by environment as documented)
//! inside the pod's netns, and the in-pod capture rules (outbound TCP → 15001 except
//! ztunnel's marked sockets, inbound TCP except 15008 → 15006) applied in each pod by the
//! node agent's rule generator and applier.
//!
//! - A plain TCP client in pod A reaches a server in pod B; a capture on the bridge shows
//!   payload only on port 15008 and never the plaintext; both access logs name the other
//!   side's SPIFFE identity; metrics count the connection.
//! - 200 concurrent connections and a 1 GiB transfer arrive intact (SHA-256).
//! - SIGTERM: each ztunnel drains and exits 0.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::bin_path;
use e2e::netsim::{Cluster, NamedNetns, Pod, Process, can_create_netns, capture_during};
use node_agent::redirect::inpod::apply::apply_pod_here;
use node_agent::redirect::inpod::{PodNetConfig, PodRuleOptions, RuleConfig};
use node_agent::redirect::iptables::detect_backend;

const ECHO_PORT: u16 = 8080;
const SINK_PORT: u16 = 8081;

macro_rules! require_root {
    () => {
        if !can_create_netns() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
    };
}

fn ca_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ztunnel/testdata/ca")
        .join(name)
}

/// A pod with capture rules and its dedicated ztunnel.
struct MeshPod {
    pod: Pod,
    ztunnel: Process,
    log: PathBuf,
}

impl MeshPod {
    fn ns(&self) -> &NamedNetns {
        self.pod.netns()
    }

    fn ip(&self) -> Ipv4Addr {
        self.pod.ip()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Two meshed pods on one node, A (`default/a`, sa `sa-a`) and B (`default/b`, sa `sa-b`).
struct Mesh {
    a: MeshPod,
    b: MeshPod,
    cluster: Cluster,
}

fn local_config(a: Ipv4Addr, b: Ipv4Addr) -> String {
    format!(
        r#"workloads:
- uid: Kubernetes//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: sa-a
  trustDomain: cluster.local
  workloadIps: ["{a}"]
  protocol: HBONE
  node: node1
  services: {{}}
- uid: Kubernetes//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: sa-b
  trustDomain: cluster.local
  workloadIps: ["{b}"]
  protocol: HBONE
  node: node1
  services: {{}}
"#
    )
}

/// Applies the in-pod capture rules in `pod` (dedicated mode uses the same rules).
fn capture_rules(pod: &Pod) {
    let cfg = PodNetConfig {
        backend: detect_backend(),
        ipv6: false,
        rules: RuleConfig::default(),
    };
    let label = pod.netns().path().to_path_buf();
    pod.netns()
        .run(move || {
            apply_pod_here(&cfg, &PodRuleOptions::default(), &label).map_err(|e| e.to_string())
        })
        .expect("enter pod netns")
        .expect("apply capture rules");
}

fn start_ztunnel(pod: &Pod, name: &str, sa: &str, config: &Path, dir: &Path) -> (Process, PathBuf) {
    let log = dir.join(format!("ztunnel-{name}.log"));
    let mut cmd = pod.netns().command(bin_path("ztunnel"));
    cmd.arg("proxy")
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", format!("default/{name}/{sa}"))
        .env("LOCAL_XDS_PATH", config)
        .env("CA_ROOT_CERT", ca_file("ec-root.pem"))
        .env("CA_ROOT_KEY", ca_file("ec-root.key"))
        .env("TRUST_DOMAIN", "cluster.local")
        .env("NODE_NAME", "node1")
        .env("TERMINATION_GRACE_PERIOD_SECONDS", "3")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap());
    (Process::spawn(cmd).expect("spawn ztunnel"), log)
}

/// `GET path` on `127.0.0.1:port` inside `ns`: (status, body).
fn http_get(ns: &NamedNetns, port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = ns
        .run(move || {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(1),
            )
        })
        .ok()?
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Some((status, body))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

impl Mesh {
    fn new(tag: &str) -> Mesh {
        let cluster = Cluster::new(tag, 1).expect("cluster");
        let node = cluster.node(1);
        let a = node.add_pod("a").expect("pod a");
        let b = node.add_pod("b").expect("pod b");
        let dir = cluster.scope().dir().to_path_buf();
        let config = dir.join("local-config.yaml");
        std::fs::write(&config, local_config(a.ip(), b.ip())).unwrap();
        capture_rules(&a);
        capture_rules(&b);
        let (za, la) = start_ztunnel(&a, "a", "sa-a", &config, &dir);
        let (zb, lb) = start_ztunnel(&b, "b", "sa-b", &config, &dir);
        let mesh = Mesh {
            a: MeshPod {
                pod: a,
                ztunnel: za,
                log: la,
            },
            b: MeshPod {
                pod: b,
                ztunnel: zb,
                log: lb,
            },
            cluster,
        };
        for p in [&mesh.a, &mesh.b] {
            wait_until("ztunnel ready", Duration::from_secs(15), || {
                matches!(http_get(p.ns(), 15021, "/healthz/ready"), Some((200, _)))
            });
        }
        mesh
    }

    /// A TCP connection from pod A to `B:port` (captured by A's rules).
    fn connect_a_to_b(&self, port: u16) -> TcpStream {
        let dst = SocketAddr::from((self.b.ip(), port));
        let s = self
            .a
            .ns()
            .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .expect("enter pod a")
            .expect("connect from pod a to pod b");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Stops both ztunnels with SIGTERM; both must exit 0.
    fn shutdown(mut self) {
        for (name, p) in [("a", &mut self.a), ("b", &mut self.b)] {
            p.ztunnel.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = p
                .ztunnel
                .wait_timeout(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("ztunnel {name} did not exit after SIGTERM"));
            assert!(status.success(), "ztunnel {name}: {status}\n{}", p.log());
            assert!(p.log().contains("drained; exiting"), "{}", p.log());
        }
    }
}

/// An echo server bound inside `ns` on `port` (threads; socket lives in the pod netns).
fn echo_server(ns: &NamedNetns, port: u16) {
    let l = ns
        .run(move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

fn echo(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let out = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&out).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    back
}

#[test]
fn plain_client_reaches_server_only_through_hbone() {
    require_root!();
    let mesh = Mesh::new("ztdedbasic");
    echo_server(mesh.b.ns(), ECHO_PORT);

    let marker = b"PLAINTEXT-MARKER-6f1c2a9e-dedicated-mode";
    let node = mesh.cluster.node(1);
    let pcap = mesh.cluster.scope().dir().join("bridge.pcap");
    let (back, report) = capture_during(node.netns(), node.bridge(), &pcap, Some("tcp"), || {
        let s = mesh.connect_a_to_b(ECHO_PORT);
        echo(s, marker)
    })
    .expect("capture");
    assert_eq!(back, marker);
    assert!(!report.is_empty(), "nothing captured on the bridge");
    assert!(
        !report.contains(marker),
        "plaintext payload seen on the bridge"
    );
    let ports = report.tcp_payload_server_ports();
    assert_eq!(
        ports,
        [15008].into_iter().collect(),
        "payload on ports other than 15008: {ports:?}"
    );
    assert!(
        report.tcp_syn_dst_ports().iter().all(|&p| p == 15008),
        "{:?}",
        report.tcp_syn_dst_ports()
    );

    // Both access logs name the other side's identity.
    let b_ip = mesh.b.ip().to_string();
    wait_until("access logs", Duration::from_secs(5), || {
        mesh.a.log().lines().any(|l| {
            l.contains("connection complete")
                && l.contains("direction=\"outbound\"")
                && l.contains("dst.identity=spiffe://cluster.local/ns/default/sa/sa-b")
                && l.contains(&format!("dst.addr={b_ip}:15008"))
        }) && mesh.b.log().lines().any(|l| {
            l.contains("connection complete")
                && l.contains("direction=\"inbound\"")
                && l.contains("src.identity=spiffe://cluster.local/ns/default/sa/sa-a")
        })
    });

    // Metrics on B, reporter destination, name the source principal.
    let (status, metrics) = http_get(mesh.b.ns(), 15020, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sa-a\"")),
        "{metrics}"
    );
    // config_dump lists the workloads and the certificate with its expiry.
    let (_, dump) = http_get(mesh.a.ns(), 15000, "/config_dump").expect("config_dump");
    assert!(
        dump.contains("spiffe://cluster.local/ns/default/sa/sa-a"),
        "{dump}"
    );
    assert!(dump.contains("\"expiration\""), "{dump}");

    mesh.shutdown();
}

#[test]
fn concurrent_connections_and_a_gigabyte_arrive_intact() {
    require_root!();
    let mesh = Mesh::new("ztdedload");
    echo_server(mesh.b.ns(), ECHO_PORT);

    // 200 concurrent connections, each with its own data.
    let conns: Vec<TcpStream> = (0..200).map(|_| mesh.connect_a_to_b(ECHO_PORT)).collect();
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..64 * 1024u32)
                    .map(|x| (x.wrapping_mul(2654435761) >> 13) as u8 ^ i as u8)
                    .collect();
                let back = echo(s, &data);
                assert_eq!(sha256(&back), sha256(&data), "connection {i}");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a concurrent connection failed");
    }

    // 1 GiB one way, checksummed at both ends.
    const SIZE: usize = 1 << 30;
    let sink = mesh
        .b
        .ns()
        .run(|| TcpListener::bind(("0.0.0.0", SINK_PORT)))
        .unwrap()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            total += n;
        }
        tx.send((total, ctx.finish().as_ref().to_vec())).unwrap();
    });
    let mut s = mesh.connect_a_to_b(SINK_PORT);
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut block = vec![0u8; 1 << 20];
    let started = Instant::now();
    for i in 0..(SIZE >> 20) {
        for (j, b) in block.iter_mut().enumerate().step_by(512) {
            *b = (i ^ j) as u8;
        }
        ctx.update(&block);
        s.write_all(&block).unwrap();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (total, digest) = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("sink finished");
    eprintln!("1 GiB through two ztunnels in {:?}", started.elapsed());
    assert_eq!(total, SIZE);
    assert_eq!(digest, ctx.finish().as_ref().to_vec());
    drop(s);
    mesh.shutdown();
}
