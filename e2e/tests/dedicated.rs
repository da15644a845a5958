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
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::dedicated_mesh::{DedicatedMesh, EchoServer, MeshPod, echo, wait_until, workload_entry};
use e2e::netsim::{can_create_netns, capture_during};

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

/// Two meshed pods on one node, A (`default/a`, sa `sa-a`) and B (`default/b`, sa `sa-b`),
/// on the shared dedicated-mode harness (`e2e::dedicated_mesh`).
struct Mesh {
    m: DedicatedMesh,
}

impl Mesh {
    fn new(tag: &str) -> Mesh {
        let mut m = DedicatedMesh::new(tag).expect("mesh");
        m.add_pod("a", "default", "sa-a").expect("pod a");
        m.add_pod("b", "default", "sa-b").expect("pod b");
        let yaml = format!(
            "workloads:\n{}{}",
            workload_entry(m.pod("a"), "HBONE", "{}", ""),
            workload_entry(m.pod("b"), "HBONE", "{}", "")
        );
        m.write_config(&yaml);
        m.start_ztunnel("a");
        m.start_ztunnel("b");
        Mesh { m }
    }

    fn a(&self) -> &MeshPod {
        self.m.pod("a")
    }

    fn b(&self) -> &MeshPod {
        self.m.pod("b")
    }

    /// A TCP connection from pod A to `B:port` (captured by A's rules).
    fn connect_a_to_b(&self, port: u16) -> TcpStream {
        let dst = SocketAddr::from((self.b().ip(), port));
        let s = self.a().connect(dst).expect("connect from pod a to pod b");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Stops both ztunnels with SIGTERM; both must drain and exit 0.
    fn shutdown(self) {
        self.m.shutdown();
    }
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

#[test]
fn plain_client_reaches_server_only_through_hbone() {
    require_root!();
    let mesh = Mesh::new("ztdedbasic");
    let _echo = EchoServer::start(mesh.b().netns(), ECHO_PORT, None);

    let marker = b"PLAINTEXT-MARKER-6f1c2a9e-dedicated-mode";
    let node = mesh.m.node();
    let pcap = mesh.m.cluster().scope().dir().join("bridge.pcap");
    let (back, report) = capture_during(node.netns(), node.bridge(), &pcap, Some("tcp"), || {
        let s = mesh.connect_a_to_b(ECHO_PORT);
        echo(s, marker).expect("echo through the mesh")
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
    let b_ip = mesh.b().ip().to_string();
    wait_until("access logs", Duration::from_secs(5), || {
        mesh.a().log().lines().any(|l| {
            l.contains("connection complete")
                && l.contains("direction=\"outbound\"")
                && l.contains("dst.identity=spiffe://cluster.local/ns/default/sa/sa-b")
                && l.contains(&format!("dst.addr={b_ip}:15008"))
        }) && mesh.b().log().lines().any(|l| {
            l.contains("connection complete")
                && l.contains("direction=\"inbound\"")
                && l.contains("src.identity=spiffe://cluster.local/ns/default/sa/sa-a")
        })
    });

    // Metrics on B, reporter destination, name the source principal.
    let (status, metrics) = mesh.b().http_get(15020, "/metrics").expect("metrics");
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
    let (_, dump) = mesh
        .a()
        .http_get(15000, "/config_dump")
        .expect("config_dump");
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
    let _echo = EchoServer::start(mesh.b().netns(), ECHO_PORT, None);

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
                let back = echo(s, &data).expect("echo");
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
        .b()
        .netns()
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
