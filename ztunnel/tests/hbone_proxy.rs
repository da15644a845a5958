//! Two in-process proxies with different identities on loopback, talking HBONE.
//! Each test uses its own 127.77.x.0/24 addresses.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sa(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

// One runtime thread: the pool keeps connections per worker thread, so
// "both streams share one connection" only holds when they run on one.
/// The kernel timer of the established TCP socket whose local address is `local`, from
/// `/proc/net/tcp` (`tr` column: 2 = keepalive timer pending).
fn tcp_timer(local: SocketAddr) -> Option<u8> {
    let SocketAddr::V4(v4) = local else {
        return None;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[1] == want && f[3] == "01")
        .and_then(|f| f[5].split(':').next()?.parse().ok())
}

/// Captured connections get TCP keepalive (as upstream: idle connections survive NAT and
/// load-balancer idle timeouts, vanished peers are detected): the accepted socket of an
/// idle connection has its keepalive timer armed.
#[tokio::test(flavor = "current_thread")]
async fn captured_connections_keep_alive() {
    let mesh = Mesh::new("127.77.7", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let listener = pa.addresses().outbound;
    let c = socks
        .redirected_connect(mesh.a_ip, listener, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let c = {
        let data = Arc::new(b"ping".to_vec());
        let mut c = c;
        c.write_all(&data).await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        c
    };
    assert_eq!(
        tcp_timer(listener),
        Some(2),
        "the accepted socket of {listener} has no keepalive timer"
    );
    drop(c);
}

/// A workload connecting to the proxy's own port on loopback (never captured by the pod
/// rules) or on its own address is refused: passed through, the proxy would connect to
/// itself again and again until the node's ztunnel ran out of sockets.
#[tokio::test(flavor = "current_thread")]
async fn connections_to_the_proxys_own_ports_are_refused() {
    let mesh = Mesh::new("127.77.8", |_| {});
    let (pa, socks) = mesh.proxy("a").await;
    let listener = pa.addresses().outbound;
    for dst in [
        sa("127.0.0.1".parse().unwrap(), listener.port()),
        sa(mesh.a_ip, 15006),
    ] {
        let mut c = socks
            .redirected_connect(mesh.a_ip, listener, dst)
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "{dst}");
        wait_for("the refusal is logged", || {
            !log_lines(&[
                "connection to the proxy's own port refused",
                &format!("dst={dst}"),
            ])
            .is_empty()
        })
        .await;
    }
    assert!(
        log_lines(&["127.77.8", "connection complete", "127.0.0.1:15001"]).is_empty(),
        "no connection was proxied to the proxy itself"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn two_proxies_exchange_data_over_hbone() {
    let mesh = Mesh::new("127.77.1", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, sa_sockets) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;

    let data = Arc::new(b"hello through the tunnel".repeat(1000));
    let c = sa_sockets
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let back = echo_roundtrip(c, data.clone()).await.unwrap();
    assert_eq!(back, *data);

    // Through the service VIP too (port 80 -> targetPort 8080).
    let c = sa_sockets
        .redirected_connect(
            mesh.a_ip,
            pa.addresses().outbound,
            "127.77.1.100:80".parse().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);

    // Both access logs name the other side's SPIFFE identity.
    wait_for("access logs", || {
        log_lines(&["connection complete", "direction=\"inbound\"", "127.77.1.1"]).len() >= 2
            && log_lines(&[
                "connection complete",
                "direction=\"outbound\"",
                "127.77.1.2:15008",
            ])
            .len()
                >= 2
    })
    .await;
    let inbound = log_lines(&["connection complete", "direction=\"inbound\"", "127.77.1.1"]);
    assert!(
        inbound[0].contains("src.identity=spiffe://cluster.local/ns/ns-a/sa/sa-a"),
        "{inbound:?}"
    );
    let outbound = log_lines(&[
        "connection complete",
        "direction=\"outbound\"",
        "127.77.1.2:15008",
    ]);
    assert!(
        outbound[0].contains("dst.identity=spiffe://cluster.local/ns/ns-b/sa/sa-b"),
        "{outbound:?}"
    );
    assert!(
        outbound[0].contains("dst.hbone_addr=127.77.1.2:8080"),
        "{outbound:?}"
    );
    assert!(
        outbound
            .iter()
            .any(|l| l.contains("dst.service=\"b.ns-b.svc.cluster.local\""))
    );
    assert!(
        outbound[0].contains(&format!("bytes_sent={}", data.len())),
        "{outbound:?}"
    );

    // Metrics from both reporters.
    let src_principal = "source_principal=\"spiffe://cluster.local/ns/ns-a/sa/sa-a\"";
    assert!(
        mesh.metric(
            "istio_tcp_connections_opened_total",
            &["reporter=\"destination\"", src_principal]
        ) >= 2
    );
    assert!(
        mesh.metric(
            "istio_tcp_received_bytes_total",
            &["reporter=\"source\"", src_principal]
        ) >= 2 * data.len() as u64
    );
    // One pooled HTTP/2 connection (per worker thread) carried both streams.
    let pooled = pa.pool_connections();
    assert_eq!(pooled.len(), 1, "{pooled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_to_non_mesh_destination() {
    let mesh = Mesh::new("127.77.2", |_| {});
    let _echo = echo_server(sa(mesh.plain_ip, 9000)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.plain_ip, 9000))
        .await
        .unwrap();
    let data = Arc::new(vec![7u8; 100_000]);
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    assert!(pa.pool_connections().is_empty(), "plaintext, no HBONE");
}

/// Workloads on a named network (`network: net1`): the inbound side looks the target (and
/// the source) up on the served workload's network, not the default one, so HBONE and
/// inbound plaintext both reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_on_a_named_network_talk_over_hbone() {
    let mesh = Mesh::new("127.77.10", |_| {});
    for uid in ["a", "b", "plain"] {
        let mut w = (**mesh.store.snapshot().workload_by_uid(uid).unwrap()).clone();
        w.network = "net1".into();
        mesh.store.source("file").upsert_workload(w);
    }
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks_a) = mesh.proxy("a").await;
    let (pb, socks_b) = mesh.proxy("b").await;
    let data = Arc::new(b"on net1".repeat(100));
    let c = socks_a
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    let c = socks_b
        .redirected_connect(
            mesh.plain_ip,
            pb.addresses().inbound_plain,
            sa(mesh.b_ip, 8080),
        )
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    // The inbound side knew both ends.
    wait_for("inbound access logs", || {
        log_lines(&[
            "connection complete",
            "direction=\"inbound\"",
            "src.addr=127.77.10.",
            "dst.workload=\"b\"",
        ])
        .len()
            >= 2
    })
    .await;
    let hbone = log_lines(&[
        "connection complete",
        "direction=\"inbound\"",
        "src.addr=127.77.10.1:",
    ]);
    assert!(hbone[0].contains("src.workload=\"a\""), "{hbone:?}");
}

/// Time until the proxy closes `c` (EOF or reset), at most `limit`.
async fn time_to_close(mut c: TcpStream, limit: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    tokio::time::timeout(limit, async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// A peer that accepts TCP on 15008 but never speaks TLS: every stream waiting for that
/// connection fails once the handshake deadline (1 s here) passes — together, not one
/// deadline after another — counted once as an outbound handshake timeout and
/// access-logged naming the peer. The failure is not sticky: a later stream tries again.
// One runtime thread: the streams share one pool entry (the pool is per thread).
#[tokio::test(flavor = "current_thread")]
async fn outbound_handshake_to_a_silent_peer_fails_promptly() {
    let mesh = Mesh::new("127.77.11", |_| {});
    let silent = tokio::net::TcpListener::bind(sa(mesh.b_ip, 15008))
        .await
        .unwrap();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let (pa, socks) = mesh.proxy("a").await;
    let open = || socks.redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080));
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(open().await.unwrap());
    }
    let limit = Duration::from_secs(10);
    let closed: Vec<Option<Duration>> =
        futures::future::join_all(clients.into_iter().map(|c| time_to_close(c, limit))).await;
    for (i, t) in closed.iter().enumerate() {
        let t = t.unwrap_or_else(|| panic!("stream {i} still open after {limit:?}"));
        assert!(
            t < Duration::from_millis(2500),
            "stream {i} failed after {t:?}: {closed:?}"
        );
    }
    assert_eq!(
        mesh.refused("handshake_timeout"),
        1,
        "{}",
        mesh.metrics_text()
    );
    wait_for("the failures access-logged naming the peer", || {
        log_lines(&[
            "connection complete",
            "direction=\"outbound\"",
            "TLS handshake with 127.77.11.2:15008 did not complete within 1s",
        ])
        .len()
            == 3
    })
    .await;
    assert_eq!(
        log_lines(&["127.77.11.2:15008 failed while this stream waited for it"]).len(),
        2
    );
    // A later stream makes its own attempt.
    let t = time_to_close(open().await.unwrap(), limit).await.unwrap();
    assert!(t >= Duration::from_millis(900), "{t:?}");
    assert_eq!(mesh.refused("handshake_timeout"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_and_large_transfer_keep_data_intact() {
    let mesh = Mesh::new("127.77.3", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (pb, _) = mesh.proxy("b").await;

    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let socks = socks.clone();
        let listener = pa.addresses().outbound;
        let (a_ip, b_ip) = (mesh.a_ip, mesh.b_ip);
        tasks.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..20_000u32)
                .map(|x| (x.wrapping_mul(31) ^ i) as u8)
                .collect();
            let data = Arc::new(data);
            let c = socks
                .redirected_connect(a_ip, listener, sa(b_ip, 8080))
                .await
                .unwrap();
            let back = echo_roundtrip(c, data.clone()).await.unwrap();
            assert_eq!(sha256(&back), sha256(&data), "connection {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 200 streams over pooled connections of at most 100 streams each.
    let pool = pa.pool_connections();
    assert!((2..=10).contains(&pool.len()), "{pool:?}");

    // A large transfer one way, checksummed on the far side.
    const SIZE: usize = 256 * 1024 * 1024;
    let sink = tokio::net::TcpListener::bind(sa(mesh.b_ip, 8081))
        .await
        .unwrap();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            total += n;
        }
        (total, ctx.finish().as_ref().to_vec())
    });
    let mut c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8081))
        .await
        .unwrap();
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut block = vec![0u8; 1 << 20];
    for i in 0..(SIZE >> 20) {
        for (j, b) in block.iter_mut().enumerate().step_by(4096) {
            *b = (i + j) as u8;
        }
        ctx.update(&block);
        c.write_all(&block).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let (total, digest) = receiver.await.unwrap();
    assert_eq!(total, SIZE);
    assert_eq!(digest, ctx.finish().as_ref().to_vec());
    drop(c);
    wait_for("connections to finish", || {
        pa.active_connections() == 0 && pb.active_connections() <= pool.len()
    })
    .await;
}

/// After a TLS handshake the server may still close: true when the connection is unusable.
async fn h2_refused(tls: ztunnel::hbone::ClientTls) -> bool {
    match h2::client::handshake(tls).await {
        Err(_) => true,
        Ok((send, conn)) => {
            let driver = tokio::spawn(conn);
            let r = async {
                let mut send = send.ready().await?;
                let req = Request::builder()
                    .method(Method::CONNECT)
                    .uri("127.0.0.1:1")
                    .body(())
                    .unwrap();
                let (resp, _) = send.send_request(req, false)?;
                resp.await
            }
            .await;
            driver.abort();
            r.is_err()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_bad_peers_with_logged_reason_and_metrics() {
    let mesh = Mesh::new("127.77.4", |_| {});
    let (pb, _) = mesh.proxy("b").await;
    let trust = roots(&mesh.ca);
    let a = mesh.identity("sa-a", "ns-a");

    // Wrong trust domain (same CA).
    let before = mesh.refused("tls_handshake");
    let other_td = ztunnel::identity::Identity::new("evil.domain", "ns-a", "sa-a");
    let cert = leaf(&mesh.ca, &other_td, valid_now());
    let r = mesh.tls_to_b(mesh.a_ip, &cert, &trust).await;
    assert!(r.is_err() || h2_refused(r.unwrap()).await);
    wait_for("trust domain refusal", || {
        mesh.refused("tls_handshake") == before + 1
    })
    .await;
    wait_for("trust domain log", || {
        !log_lines(&[
            "connection failed",
            "direction=\"inbound\"",
            "src.addr=127.77.4.1:",
            "dst.addr=127.77.4.2:15008",
            "not in trust domain",
        ])
        .is_empty()
    })
    .await;

    // Untrusted root.
    let rogue = ca("rsa");
    let cert = leaf(&rogue, &a, valid_now());
    let r = mesh.tls_to_b(mesh.a_ip, &cert, &trust).await;
    assert!(r.is_err() || h2_refused(r.unwrap()).await);
    wait_for("untrusted root refusal", || {
        mesh.refused("tls_handshake") == before + 2
    })
    .await;
    wait_for("untrusted root log", || {
        !log_lines(&["connection failed", "127.77.4.1", "UnknownIssuer"]).is_empty()
    })
    .await;

    // Expired certificate.
    let now = std::time::SystemTime::now();
    let expired = now - Duration::from_secs(7200)..now - Duration::from_secs(3600);
    let cert = leaf(&mesh.ca, &a, expired);
    let r = mesh.tls_to_b(mesh.a_ip, &cert, &trust).await;
    assert!(r.is_err() || h2_refused(r.unwrap()).await);
    wait_for("expired refusal", || {
        mesh.refused("tls_handshake") == before + 3
    })
    .await;
    wait_for("expired log", || {
        !log_lines(&["connection failed", "127.77.4.1", "expired"]).is_empty()
    })
    .await;

    // Valid certificate, but not the identity of the workload at the source IP.
    let impostor = mesh.identity("sa-evil", "ns-a");
    let cert = leaf(&mesh.ca, &impostor, valid_now());
    let tls = mesh.tls_to_b(mesh.a_ip, &cert, &trust).await.unwrap();
    assert!(h2_refused(tls).await);
    wait_for("identity mismatch refusal", || {
        mesh.refused("identity_mismatch") == 1
    })
    .await;
    let lines = log_lines(&[
        "client certificate identity is not the identity",
        "127.77.4.1",
    ]);
    assert!(
        lines[0].contains("sa-evil") && lines[0].contains("sa-a"),
        "{lines:?}"
    );

    // The same valid certificate from an address that is no known workload is accepted at
    // the TLS level (no workload to compare with).
    wait_for("no connection left", || pb.active_connections() == 0).await;
}

/// An h2 client over TLS as workload `a`.
async fn h2_as_a(mesh: &Mesh) -> h2::client::SendRequest<Bytes> {
    let a = mesh.identity("sa-a", "ns-a");
    let cert = leaf(&mesh.ca, &a, valid_now());
    let tls = mesh
        .tls_to_b(mesh.a_ip, &cert, &roots(&mesh.ca))
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn status_of(send: &h2::client::SendRequest<Bytes>, method: Method, uri: &str) -> StatusCode {
    let mut send = send.clone().ready().await.unwrap();
    let req = Request::builder().method(method).uri(uri).body(()).unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    resp.await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_right_status_and_leak_nothing() {
    let mesh = Mesh::new("127.77.5", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pb, _) = mesh.proxy("b").await;
    let baseline_tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    let send = h2_as_a(&mesh).await;
    assert_eq!(
        status_of(&send, Method::GET, "http://127.77.5.2:8080/").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(&send, Method::POST, "http://127.77.5.2:8080/").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status_of(&send, Method::CONNECT, "bad_host!:8080").await,
        StatusCode::BAD_REQUEST
    );
    // A hostname (double HBONE) that is no service of B: 503, as upstream.
    assert_eq!(
        status_of(&send, Method::CONNECT, "example.com:8080").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Authority IP is not where the connection went.
    assert_eq!(
        status_of(&send, Method::CONNECT, "127.77.5.1:8080").await,
        StatusCode::BAD_REQUEST
    );
    // A proxy port as target: 503, as upstream (once the destination is valid; an
    // address the connection did not reach is still a bad request).
    for port in [15001, 15006, 15008] {
        assert_eq!(
            status_of(&send, Method::CONNECT, &format!("127.77.5.2:{port}")).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "{port}"
        );
    }
    assert_eq!(
        status_of(&send, Method::CONNECT, "127.77.5.1:15008").await,
        StatusCode::BAD_REQUEST
    );
    // Nothing listens there: upstream unreachable.
    assert_eq!(
        status_of(&send, Method::CONNECT, "127.77.5.2:8999").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // And a good one still works on the same connection.
    assert_eq!(
        status_of(&send, Method::CONNECT, "127.77.5.2:8080").await,
        StatusCode::OK
    );
    assert!(mesh.refused("bad_request") >= 8);
    // The unreachable port and the hostname of no service of B.
    assert_eq!(mesh.refused("upstream_unavailable"), 2);
    drop(send);

    // Garbage before the TLS handshake.
    let mut s = TcpStream::connect(sa(mesh.b_ip, 15008)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("server closes after garbage");
    wait_for("garbage refusal", || mesh.refused("tls_handshake") >= 1).await;

    // A peer that stalls in the middle of the handshake (handshake timeout 1 s here).
    let mut s = TcpStream::connect(sa(mesh.b_ip, 15008)).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("server gives up on a stalled handshake");
    wait_for("stall refusal", || mesh.refused("handshake_timeout") == 1).await;
    assert!(!log_lines(&["connection failed", "did not complete within"]).is_empty());

    // Nothing left behind.
    wait_for("no open connection", || pb.active_connections() == 0).await;
    wait_for("no leaked task", || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            <= baseline_tasks
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_accepting_and_lets_open_connections_finish() {
    let mesh = Mesh::new("127.77.6", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (pb, _) = mesh.proxy("b").await;

    let mut open = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).await.unwrap();

    let drain_b = {
        let pb = pb.clone();
        tokio::spawn(async move { pb.drain(Duration::from_secs(10)).await })
    };
    // New connections to B are refused once its listeners are closed.
    wait_for("B stops listening", || {
        std::net::TcpStream::connect_timeout(&sa(mesh.b_ip, 15008), Duration::from_millis(100))
            .is_err()
    })
    .await;
    // The open tunnel still works.
    open.write_all(b"pong").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert!(!drain_b.is_finished());
    drop(open);
    tokio::time::timeout(Duration::from_secs(5), drain_b)
        .await
        .expect("drain ends once the last connection closed")
        .unwrap();

    // A drain with connections that never end gives up after the grace period.
    let (pb2, _) = mesh.proxy("b").await;
    let _stuck = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    wait_for("B2 has the connection", || pb2.active_connections() > 0).await;
    let t = std::time::Instant::now();
    pb2.drain(Duration::from_millis(300)).await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(pb2.active_connections(), 0);
    pa.drain(Duration::from_millis(300)).await;
    assert_eq!(pa.active_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_keeps_open_connections() {
    let mesh = Mesh::new("127.77.7", |c| c.secret_ttl = Duration::from_secs(4));
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");

    let mut open = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    open.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    open.read_exact(&mut b).await.unwrap();
    let first = mesh.inputs.certs.current(&a).unwrap();
    wait_for("rotation", || {
        mesh.inputs
            .certs
            .current(&a)
            .is_some_and(|c| c.serial() != first.serial())
    })
    .await;
    // Still flowing on the connection made with the old certificate.
    open.write_all(b"2").await.unwrap();
    open.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"2");
    // And a new connection works (new handshakes use the new certificate).
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let data = Arc::new(b"after rotation".to_vec());
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_released() {
    let mesh = Mesh::new("127.77.8", |c| {
        c.h2.pool_unused_release_timeout = Duration::from_millis(300);
        c.h2.keepalive_interval = Duration::from_millis(100);
    });
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let data = Arc::new(b"x".to_vec());
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    assert_eq!(pa.pool_connections().len(), 1);
    // No stream for longer than POOL_UNUSED_RELEASE_TIMEOUT: the connection goes away.
    wait_for("idle release", || pa.pool_connections().is_empty()).await;
    // And a new connection is made on demand.
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
}

/// Writes `data` on `c` and reads the same number of bytes back (the socket stays open).
async fn echo_open(c: &mut TcpStream, data: &[u8]) {
    c.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
}

// The byte counters grow while connections are open (HBONE and plaintext copies, both
// reporters), and a connection closed by a forced drain still counts every byte it copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_metrics_count_open_connections_and_forced_drains() {
    let mesh = Mesh::new("127.77.9", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let _plain = echo_server(sa(mesh.plain_ip, 9000)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let outbound = pa.addresses().outbound;
    let mut hbone = socks
        .redirected_connect(mesh.a_ip, outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let mut plain = socks
        .redirected_connect(mesh.a_ip, outbound, sa(mesh.plain_ip, 9000))
        .await
        .unwrap();
    echo_open(&mut hbone, &[1u8; 1000]).await;
    echo_open(&mut plain, &[2u8; 1000]).await;

    let bytes = |name: &str, reporter: &str, dst: &str| {
        let reporter = format!("reporter=\"{reporter}\"");
        let dst = format!("destination_workload=\"{dst}\"");
        mesh.metric(name, &[&reporter, &dst])
    };
    let series = [("source", "b"), ("destination", "b"), ("source", "plain")];
    let all_at = |n: u64| {
        series.iter().all(|(r, d)| {
            bytes("istio_tcp_received_bytes_total", r, d) == n
                && bytes("istio_tcp_sent_bytes_total", r, d) == n
        })
    };
    wait_for("1000 bytes each way in every series, sockets open", || {
        all_at(1000)
    })
    .await;
    assert_eq!(
        mesh.metric("istio_tcp_connections_closed_total", &[]),
        0,
        "{}",
        mesh.metrics_text()
    );
    assert_eq!(
        mesh.metric("istio_tcp_sockets_open", &["reporter=\"source\""]),
        2
    );
    assert_eq!(
        mesh.metric("istio_tcp_sockets_open", &["reporter=\"destination\""]),
        1
    );

    // More bytes, not scraped before the drain drops the connection tasks.
    echo_open(&mut hbone, &[3u8; 500]).await;
    echo_open(&mut plain, &[4u8; 500]).await;
    pa.drain(Duration::from_millis(300)).await;
    wait_for("1500 bytes each way after the forced drain", || {
        all_at(1500)
    })
    .await;
    // A scrape may have flushed the open connections' bytes before their tasks were
    // dropped: the access lines come with the drop, shortly after the drain returns. A
    // forced drain ends each copy either by dropping its task ("connection aborted") or
    // by closing the pooled HBONE connection under it (a copy error): both count.
    wait_for(
        "the access log of the dropped connections counts their bytes",
        || {
            log_lines(&[
                "connection complete",
                "src.addr=127.77.9.1:",
                "direction=\"outbound\"",
                "bytes_sent=1500 bytes_recv=1500",
                "error=",
            ])
            .len()
                >= 2
        },
    )
    .await;
    wait_for("no socket open", || {
        mesh.metric("istio_tcp_sockets_open", &[]) == 0
    })
    .await;
}

/// `CRL_PATH`: a reloaded revocation list closes the established HBONE connection of a
/// revoked peer (each side checks the other: here the client's certificate is revoked, so
/// the destination closes it), counts it, and refuses that peer's new handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_loses_its_connections_and_cannot_reconnect() {
    use ztunnel::tls::crl::RevocationLists;
    let dir = tempfile::tempdir().unwrap();
    let crl_path = dir.path().join("ca-crl.pem");
    std::fs::write(&crl_path, "").unwrap();
    let mut mesh = Mesh::new("127.77.12", |_| {});
    let (lists, _watch) = RevocationLists::watch_file(&crl_path).unwrap();
    mesh.inputs.roots = mesh.inputs.roots.clone().with_revocation(lists);
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (pb, _) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");

    let mut open = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    echo_open(&mut open, b"before").await;
    let crl = |reporter: &str| {
        mesh.metric(
            "istio_crl_policy_rejections_total",
            &[&format!("reporter=\"{reporter}\"")],
        )
    };
    assert_eq!(crl("destination"), 0);

    // A list revoking someone else changes nothing.
    let other = leaf(&mesh.ca, &mesh.identity("sa-x", "ns-x"), valid_now());
    std::fs::write(
        &crl_path,
        mesh.ca.revocation_list_pem(&[other.serial()]).unwrap(),
    )
    .unwrap();
    wait_for("first reload", || {
        !log_lines(&["revocation lists reloaded", "ca-crl.pem", "lists=1"]).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    echo_open(&mut open, b"still").await;

    // Revoking a's certificate: b closes the connection; the app connection ends.
    let a_serial = mesh.inputs.certs.current(&a).unwrap().serial().to_string();
    std::fs::write(
        &crl_path,
        mesh.ca
            .revocation_list_pem(&[other.serial(), &a_serial])
            .unwrap(),
    )
    .unwrap();
    wait_for("revocation counted", || crl("destination") == 1).await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = open.write_all(b"after").await;
        loop {
            match open.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the revoked peer's connection stayed open");
    assert!(
        !log_lines(&[
            "peer's certificate was revoked",
            "spiffe://cluster.local/ns/ns-a/sa/sa-a"
        ])
        .is_empty()
    );
    wait_for("no connection left at b", || pb.active_connections() == 0).await;

    // A new connection: a still presents the revoked certificate; b refuses the handshake.
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let back = echo_roundtrip(c, Arc::new(b"x".to_vec())).await;
    assert!(back.map(|v| v.is_empty()).unwrap_or(true));
    wait_for("handshake refusal counted", || crl("destination") == 2).await;
}

/// The other direction: revoking the destination's certificate closes the source's pooled
/// connection to it (counted by the source) and the source refuses its new handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_destination_loses_the_pooled_connection() {
    use ztunnel::tls::crl::RevocationLists;
    let dir = tempfile::tempdir().unwrap();
    let crl_path = dir.path().join("ca-crl.pem");
    let mut mesh = Mesh::new("127.77.13", |_| {});
    // CRL_PATH may name a file that appears later.
    let (lists, _watch) = RevocationLists::watch_file(&crl_path).unwrap();
    mesh.inputs.roots = mesh.inputs.roots.clone().with_revocation(lists);
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let mut open = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    echo_open(&mut open, b"before").await;
    assert_eq!(pa.pool_connections().len(), 1);
    let crl = || {
        mesh.metric(
            "istio_crl_policy_rejections_total",
            &["reporter=\"source\""],
        )
    };
    let b = mesh.identity("sa-b", "ns-b");
    let b_serial = mesh.inputs.certs.current(&b).unwrap().serial().to_string();
    std::fs::write(
        &crl_path,
        mesh.ca.revocation_list_pem(&[&b_serial]).unwrap(),
    )
    .unwrap();
    wait_for("revocation counted at the source", || crl() == 1).await;
    wait_for("pooled connection closed", || {
        pa.pool_connections().is_empty()
    })
    .await;
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let back = echo_roundtrip(c, Arc::new(b"x".to_vec())).await;
    assert!(back.map(|v| v.is_empty()).unwrap_or(true));
    wait_for("handshake refusal counted at the source", || crl() == 2).await;
}
