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
//! - SIGTERM: each ztunnel drains and exits 0: new connections are refused at once, open
//!   ones keep flowing and the process exits as soon as they finish; connections still open
//!   when `TERMINATION_GRACE_PERIOD_SECONDS` ends are closed and the exit status is still 0.
//! - An application tunnel (PROXY) on B is reached on loopback inside B's netns, behind a
//!   PROXY v2 header naming A's address, the target and A's identity.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::dedicated_mesh::{
    DedicatedMesh, EchoServer, MeshPod, echo, http_request_bytes, wait_until, workload_entry,
};
use e2e::netsim::{can_create_netns, capture_during};

const ECHO_PORT: u16 = 8080;
const SINK_PORT: u16 = 8081;
const NODE_PORT: u16 = 8082;
/// A Service in front of pod B (local-config `services` entry).
const SERVICE_B: &str = "- name: b\n  namespace: default\n  hostname: b.default.svc.cluster.local\n  \
                         vips: [\"/10.96.0.10\"]\n  ports: {80: 8080}\n";

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
        Self::with(tag, |_| {})
    }

    /// [`Self::new`] with `edit` applied to the harness before the ztunnels start.
    fn with(tag: &str, edit: impl FnOnce(&mut DedicatedMesh)) -> Mesh {
        let mut m = DedicatedMesh::new(tag).expect("mesh");
        edit(&mut m);
        m.add_pod("a", "default", "sa-a").expect("pod a");
        m.add_pod("b", "default", "sa-b").expect("pod b");
        let yaml = format!(
            "workloads:\n{}{}services:\n{SERVICE_B}",
            workload_entry(m.pod("a"), "HBONE", "{}", ""),
            workload_entry(
                m.pod("b"),
                "HBONE",
                "{\"default/b.default.svc.cluster.local\": {80: 8080}}",
                ""
            )
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
    let echo_server = EchoServer::start(mesh.b().netns(), ECHO_PORT, None);

    let marker = b"PLAINTEXT-MARKER-6f1c2a9e-dedicated-mode";
    let node = mesh.m.node();
    let pcap = mesh.m.cluster().scope().dir().join("bridge.pcap");
    let (back, report) = capture_during(node.netns(), node.bridge(), &pcap, Some("tcp"), || {
        let s = mesh.connect_a_to_b(ECHO_PORT);
        echo(s, marker).expect("echo through the mesh")
    })
    .expect("capture");
    assert_eq!(back, marker);
    // B's ztunnel connects to the app from A's address (ENABLE_ORIG_SRC detected), as
    // upstream's does: the app sees its real client, not its own pod IP.
    let peers: Vec<_> = echo_server.peers().iter().map(|p| p.ip()).collect();
    assert_eq!(peers, vec![mesh.a().ip()], "source addresses the app saw");
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
    // Upstream's process and runtime families, for the ztunnel dashboard.
    for name in [
        "process_open_fds ",
        "process_max_fds ",
        "tokio_num_workers ",
        "tokio_num_alive_tasks ",
        "tokio_worker_park_count_total{worker=\"0\"} ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name}missing:\n{metrics}"
        );
    }
    // The log filter follows the admin endpoint (istioctl ztunnel-config log).
    let a = mesh.a();
    assert_eq!(
        a.http_post(15000, "/logging?level=info%2Caccess%3Ddebug"),
        Some((200, "current log level is info,access=debug\n".into()))
    );
    assert_eq!(
        a.http_get(15000, "/logging"),
        Some((200, "current log level is info,access=debug\n".into()))
    );
    let (status, body) = a.http_post(15000, "/logging?level=ztunnel%3D%3D").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("ztunnel=="), "names the value: {body}");
    let (status, body) = a.http_post(15000, "/logging?reset").unwrap();
    assert_eq!((status, body.trim()), (200, "current log level is info"));
    assert!(a.log().contains("log filter changed"), "{}", a.log());
    // config_dump lists the workloads, the service and A's certificate with its expiry.
    let (status, dump) = mesh
        .a()
        .http_get(15000, "/config_dump")
        .expect("config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    let uids: Vec<&str> = dump["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter_map(|w| w["uid"].as_str())
        .collect();
    assert_eq!(uids, [mesh.a().uid(), mesh.b().uid()], "{dump:#}");
    let hosts: Vec<&str> = dump["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s["hostname"].as_str())
        .collect();
    assert_eq!(hosts, ["b.default.svc.cluster.local"], "{dump:#}");
    // Upstream's field, always present (istioctl shows it).
    assert_eq!(dump["services"][0]["visibility"], "Public", "{dump:#}");
    // Upstream's shape (istioctl ztunnel-config services): endpoints by workload uid.
    let ep = &dump["services"][0]["endpoints"][mesh.b().uid()];
    assert_eq!(ep["workloadUid"], mesh.b().uid().as_str(), "{dump:#}");
    assert_eq!(ep["status"], "Healthy", "{dump:#}");
    assert!(ep["port"].is_object(), "{dump:#}");
    let certs = dump["certificates"].as_array().expect("certificates");
    let cert = certs
        .iter()
        .find(|c| c["identity"] == mesh.a().identity().as_str())
        .unwrap_or_else(|| panic!("no certificate for A: {dump:#}"));
    // Upstream's shape (istioctl ztunnel-config certificates): the leaf first, then the
    // trust roots, each with a decimal serial and RFC 3339 validity.
    assert_eq!(cert["state"], "Available", "{cert:#}");
    let leaf = &cert["certChain"][0];
    assert!(
        leaf["serialNumber"]
            .as_str()
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())),
        "{cert:#}"
    );
    assert_eq!(
        cert["rootCerts"].as_array().map(Vec::len),
        Some(1),
        "{cert:#}"
    );
    let expires = humantime::parse_rfc3339(leaf["expirationTime"].as_str().expect("expiration"))
        .expect("RFC 3339 expiration");
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .expect("certificate expires in the future");
    assert!(
        left > Duration::from_secs(23 * 3600) && left <= Duration::from_secs(24 * 3600),
        "default SECRET_TTL is 24h, {left:?} left"
    );

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

/// Writes `data` on an open connection to an echo server and reads it back.
fn roundtrip(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

#[test]
fn sigterm_refuses_new_connections_drains_open_ones_and_exits_zero() {
    require_root!();
    let mut mesh = Mesh::new("ztdeddrain");
    // Signalled and awaited here, not by `Mesh::shutdown`.
    let mut za = mesh.m.take_ztunnel("a").expect("ztunnel a");
    let mut zb = mesh.m.take_ztunnel("b").expect("ztunnel b");
    let _echo = EchoServer::start(mesh.b().netns(), ECHO_PORT, None);
    // A non-mesh server on the node: pod A reaches it through ztunnel A only (passthrough).
    let node = mesh.m.node();
    let _node_echo = EchoServer::start(node.netns(), NODE_PORT, None);
    let node_dst = SocketAddr::from((node.gateway(), NODE_PORT));
    let hbone_b = SocketAddr::from((mesh.b().ip(), 15008));
    let from_node = |dst: SocketAddr| {
        node.netns()
            .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(2)))
            .expect("enter node netns")
    };

    let mut through_both = mesh.connect_a_to_b(ECHO_PORT);
    assert_eq!(roundtrip(&mut through_both, b"one").unwrap(), b"one");
    let mut through_a = mesh.a().connect(node_dst).expect("pod a to the node");
    through_a
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(roundtrip(&mut through_a, b"one").unwrap(), b"one");
    assert!(from_node(hbone_b).is_ok(), "B's HBONE port before SIGTERM");

    // B: stops accepting at once, keeps the open tunnel, exits 0 once it is closed, without
    // waiting for the rest of the grace period.
    zb.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until(
        "B refuses new HBONE connections",
        Duration::from_secs(2),
        || from_node(hbone_b).is_err(),
    );
    assert_eq!(roundtrip(&mut through_both, b"two").unwrap(), b"two");
    assert!(zb.is_running(), "B exited with a connection open");
    through_both.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    through_both.read_to_end(&mut rest).unwrap();
    drop(through_both);
    let status = zb
        .wait_timeout(Duration::from_secs(10))
        .expect("B exits after its last connection");
    let log_b = mesh.b().log();
    assert!(status.success(), "ztunnel b: {status}\n{log_b}");
    assert!(
        log_b.contains("SIGTERM: draining") && log_b.contains("drained; exiting"),
        "{log_b}"
    );
    assert!(
        !log_b.contains("grace period over"),
        "B waited for the grace period:\n{log_b}"
    );

    // A: a connection that never ends is closed when the drain budget (grace 3 s − 1 s)
    // is over; the exit status is still 0. Meanwhile new connections from pod A are
    // refused (15001 is closed, the capture rule still points there).
    za.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("A refuses new connections", Duration::from_secs(2), || {
        mesh.a().connect(node_dst).is_err()
    });
    assert_eq!(roundtrip(&mut through_a, b"two").unwrap(), b"two");
    let status = za
        .wait_timeout(Duration::from_secs(15))
        .expect("A exits after the grace period");
    let log_a = mesh.a().log();
    assert!(status.success(), "ztunnel a: {status}\n{log_a}");
    assert!(
        log_a.contains("grace period over") && log_a.contains("drained; exiting"),
        "{log_a}"
    );
    let mut buf = [0u8; 16];
    let closed = matches!(through_a.read(&mut buf), Ok(0) | Err(_));
    assert!(closed, "the connection outlived ztunnel a");
}

/// `CRL_PATH` as an operator uses it: both ztunnels follow a revocation list file that does
/// not exist at start; once the CA's list names A's certificate (serial from A's
/// `/config_dump`), B closes A's open tunnel (the app connection ends), counts it, and
/// refuses A's new handshakes.
#[test]
fn a_revoked_certificate_cuts_the_workload_off() {
    require_root!();
    let crl_dir = tempfile::tempdir().unwrap();
    let crl_path = crl_dir.path().join("ca-crl.pem");
    let mesh = Mesh::with("ztdedcrl", |m| {
        m.set_ztunnel_env("CRL_PATH", crl_path.to_str().unwrap())
    });
    let _echo = EchoServer::start(mesh.b().netns(), ECHO_PORT, None);
    let mut open = mesh.connect_a_to_b(ECHO_PORT);
    assert_eq!(roundtrip(&mut open, b"one").unwrap(), b"one");

    let (_, dump) = mesh
        .a()
        .http_get(15000, "/config_dump")
        .expect("config_dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    let serial: u64 = dump["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .find(|c| c["identity"] == mesh.a().identity().as_str())
        .and_then(|c| c["certChain"][0]["serialNumber"].as_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no serial for A: {dump:#}"));
    let hex = format!("{serial:x}");
    let hex = if hex.len().is_multiple_of(2) {
        hex
    } else {
        format!("0{hex}")
    };
    let ca = ztunnel::identity::local_ca::LocalCa::from_files(
        &e2e::dedicated_mesh::ca_file("ec-root.pem"),
        &e2e::dedicated_mesh::ca_file("ec-root.key"),
    )
    .unwrap();
    let tmp = crl_dir.path().join("ca-crl.pem.tmp");
    std::fs::write(&tmp, ca.revocation_list_pem(&[&hex]).unwrap()).unwrap();
    std::fs::rename(&tmp, &crl_path).unwrap();

    let revoked = |reporter: &str| {
        e2e::prom_text::sum(
            &mesh.b().metrics(),
            "istio_crl_policy_rejections_total",
            &[("reporter", reporter)],
        )
    };
    wait_until("B closes A's tunnel", Duration::from_secs(20), || {
        revoked("destination") >= 1.0
    });
    let mut buf = [0u8; 8];
    let _ = open.write_all(b"two");
    assert!(
        matches!(open.read(&mut buf), Ok(0) | Err(_)),
        "the revoked workload's connection stayed open"
    );
    assert!(
        mesh.b()
            .log()
            .contains("the peer's certificate was revoked"),
        "{}",
        mesh.b().log()
    );
    // A new connection: B refuses A's handshake (A still holds the revoked certificate).
    let mut again = mesh.connect_a_to_b(ECHO_PORT);
    assert!(
        !matches!(roundtrip(&mut again, b"three"), Ok(v) if v == b"three"),
        "the revoked workload connected again"
    );
    wait_until(
        "B counts the refused handshake",
        Duration::from_secs(10),
        || revoked("destination") >= 2.0,
    );
    mesh.shutdown();
}

/// Admin `POST /quitquitquit` (upstream's endpoint) drains and exits 0 like SIGTERM; other
/// methods are refused.
#[test]
fn quitquitquit_drains_and_exits_zero() {
    require_root!();
    let mut mesh = Mesh::new("ztdedquit");
    let mut za = mesh.m.take_ztunnel("a").expect("ztunnel a");
    let (status, _) = mesh
        .a()
        .http_get(15000, "/quitquitquit")
        .expect("admin answers");
    assert_eq!(status, 405);
    assert!(za.is_running());
    let (status, body) = mesh
        .a()
        .http_post(15000, "/quitquitquit")
        .expect("admin answers");
    assert_eq!((status, body.trim()), (200, "draining"));
    let status = za
        .wait_timeout(Duration::from_secs(15))
        .expect("A exits after /quitquitquit");
    let log = mesh.a().log();
    assert!(status.success(), "ztunnel a: {status}\n{log}");
    assert!(
        log.contains("/quitquitquit: draining") && log.contains("drained; exiting"),
        "{log}"
    );
    mesh.shutdown();
}

/// Admin `GET /debug/pprof/profile` (upstream's endpoint) answers with a CPU profile in
/// pprof's protobuf format, sampled while traffic flows through the tunnel; one capture at
/// a time; bad parameters and the heap endpoint are refused with the reason.
#[test]
fn pprof_profile_samples_the_data_path() {
    use ztunnel::admin::pprof::format::Profile;
    require_root!();
    let mesh = Mesh::new("ztdedpprof");
    let _echo = EchoServer::start(mesh.b().netns(), ECHO_PORT, None);
    let (status, body) = std::thread::scope(|scope| {
        let profile = scope.spawn(|| {
            http_request_bytes(
                mesh.a().netns(),
                "GET",
                15000,
                "/debug/pprof/profile?seconds=2&frequency=499",
            )
        });
        // While it runs: a second capture is refused, and traffic keeps ztunnel A busy.
        wait_until("the capture to start", Duration::from_secs(5), || {
            mesh.a().log().contains("capturing a CPU profile")
        });
        let (status, body) = mesh
            .a()
            .http_get(15000, "/debug/pprof/profile?seconds=1")
            .expect("admin answers");
        assert_eq!(status, 409, "{body}");
        let mut s = mesh.connect_a_to_b(ECHO_PORT);
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut back = vec![0_u8; chunk.len()];
        let end = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < end {
            s.write_all(&chunk).unwrap();
            s.read_exact(&mut back).unwrap();
        }
        profile.join().unwrap().expect("admin answers")
    });
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let p = <Profile as prost::Message>::decode(body.as_slice()).expect("a pprof profile");
    let s = |i: i64| p.string_table[i as usize].as_str();
    let types: Vec<_> = p
        .sample_type
        .iter()
        .map(|t| (s(t.r#type), s(t.unit)))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    assert_eq!(p.period, 1_000_000_000 / 499);
    assert!(!p.sample.is_empty(), "no samples");
    let functions: Vec<&str> = p.function.iter().map(|f| s(f.name)).collect();
    // The relay itself was sampled: its TLS or HTTP/2 code is in some stack.
    assert!(
        functions
            .iter()
            .any(|f| f.contains("rustls") || f.contains("h2::")),
        "functions: {functions:?}"
    );
    for sample in &p.sample {
        for id in &sample.location_id {
            assert!(
                p.location.iter().any(|l| l.id == *id),
                "dangling location {id}"
            );
        }
    }
    // Bad parameters and heap profiles: refused with the reason.
    let (status, body) = mesh
        .a()
        .http_get(15000, "/debug/pprof/profile?seconds=301")
        .expect("admin answers");
    assert_eq!(
        (status, body.trim()),
        (400, "invalid seconds value \"301\"; expected 1-300")
    );
    let (status, body) = mesh
        .a()
        .http_get(15000, "/debug/pprof/heap")
        .expect("admin answers");
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("jemalloc"), "{body}");
    mesh.shutdown();
}

/// `LOCAL_XDS` (the local config inline, upstream's variable) instead of a file, with
/// `IPV6_ENABLED=false`: the mesh works from the inline config (HBONE between the pods,
/// both identities logged) and every listener is IPv4-only.
#[test]
fn inline_local_config_and_ipv4_only_listeners() {
    require_root!();
    let mut m = DedicatedMesh::new("ztdedinline").expect("mesh");
    m.add_pod("a", "default", "sa-a").expect("pod a");
    m.add_pod("b", "default", "sa-b").expect("pod b");
    let yaml = format!(
        "workloads:\n{}{}",
        workload_entry(m.pod("a"), "HBONE", "{}", ""),
        workload_entry(m.pod("b"), "HBONE", "{}", "")
    );
    m.set_ztunnel_env("LOCAL_XDS", &yaml);
    m.set_ztunnel_env("IPV6_ENABLED", "false");
    m.start_ztunnel("a");
    m.start_ztunnel("b");
    let mesh = Mesh { m };
    assert!(
        !mesh.a().log().contains("LOCAL_XDS_PATH"),
        "{}",
        mesh.a().log()
    );
    let _echo = EchoServer::start(mesh.b().netns(), ECHO_PORT, None);
    let back = echo(mesh.connect_a_to_b(ECHO_PORT), b"inline").expect("echo through the mesh");
    assert_eq!(back, b"inline");
    let a_identity = mesh.a().identity();
    wait_until("B logs A's identity", Duration::from_secs(5), || {
        mesh.b().log().contains(&a_identity)
    });
    // Listening sockets of ztunnel B (state 0A) by family, from B's netns.
    let listening = |table: &'static str| -> Vec<u16> {
        let text = mesh
            .b()
            .netns()
            .run(move || std::fs::read_to_string(format!("/proc/thread-self/net/{table}")))
            .unwrap()
            .unwrap();
        text.lines()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
            .filter_map(|l| l.split_whitespace().nth(1)?.rsplit(':').next())
            .filter_map(|port| u16::from_str_radix(port, 16).ok())
            .collect()
    };
    let (v4, v6) = (listening("tcp"), listening("tcp6"));
    for port in [15001, 15006, 15008, 15000, 15020, 15021, 15053] {
        assert!(v4.contains(&port), "{port} not on IPv4: {v4:?}");
        assert!(!v6.contains(&port), "{port} on IPv6: {v6:?}");
    }
    mesh.shutdown();
}

/// An application tunnel (`applicationTunnel: {protocol: PROXY, port: 15088}` on B, what
/// istiod sets for a sandwiched waypoint): A's plain connection to B:8080 reaches the app
/// listening on 127.0.0.1:15088 only, inside B's netns, starting with a PROXY v2 header
/// that names A's address, the target B:8080 and A's SPIFFE identity (TLV 0xD0).
#[test]
fn application_tunnel_gets_proxy_protocol_on_loopback() {
    use ppp::v2::{Addresses, Header};
    require_root!();
    let mut m = DedicatedMesh::new("ztdedtunnel").expect("mesh");
    m.add_pod("a", "default", "sa-a").expect("pod a");
    m.add_pod("b", "default", "sa-b").expect("pod b");
    let yaml = format!(
        "workloads:\n{}{}",
        workload_entry(m.pod("a"), "HBONE", "{}", ""),
        workload_entry(
            m.pod("b"),
            "HBONE",
            "{}",
            "  applicationTunnel: {protocol: PROXY, port: 15088}\n"
        )
    );
    m.write_config(&yaml);
    m.start_ztunnel("a");
    m.start_ztunnel("b");
    let mesh = Mesh { m };
    let listener = mesh
        .b()
        .netns()
        .run(|| TcpListener::bind("127.0.0.1:15088"))
        .unwrap()
        .expect("bind 127.0.0.1:15088 in pod b");
    let app = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = vec![0u8; 16];
        s.read_exact(&mut head).unwrap();
        let rest = u16::from_be_bytes([head[14], head[15]]) as usize;
        head.resize(16 + rest, 0);
        s.read_exact(&mut head[16..]).unwrap();
        let h = Header::try_from(&head[..]).expect("PROXY v2 header");
        let Addresses::IPv4(addrs) = h.addresses else {
            panic!("IPv4 addresses expected: {:?}", h.addresses)
        };
        let identity = h
            .tlvs()
            .filter_map(Result::ok)
            .find(|t| t.kind == 0xD0)
            .map(|t| String::from_utf8_lossy(&t.value).into_owned());
        let mut payload = [0u8; 6];
        s.read_exact(&mut payload).unwrap();
        s.write_all(&payload).unwrap();
        (peer, addrs, identity)
    });
    let mut c = mesh.connect_a_to_b(ECHO_PORT);
    c.write_all(b"tunnel").unwrap();
    let mut back = [0u8; 6];
    c.read_exact(&mut back).expect("echo through the tunnel");
    assert_eq!(&back, b"tunnel");
    let (peer, addrs, identity) = app.join().unwrap();
    assert!(peer.ip().is_loopback(), "delivered from {peer}");
    assert_eq!(addrs.source_address, mesh.a().ip(), "{addrs:?}");
    assert_eq!(
        (addrs.destination_address, addrs.destination_port),
        (mesh.b().ip(), ECHO_PORT)
    );
    assert_eq!(identity, Some(mesh.a().identity()));
    mesh.shutdown();
}
