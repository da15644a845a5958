//! Two in-process proxies on loopback (see `hbone_proxy.rs`): open connections over time.
//! TCP keepalive on captured connections, draining, certificate rotation, idle pooled
//! connections, byte counters of open and force-drained connections, and revocation lists
//! closing a revoked peer's connections.
//! Each test uses its own 127.77.x.0/24 addresses (x = 6, 7, 8, 9, 12, 13, 70 here).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sa(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

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
    let mesh = Mesh::new("127.77.70", |_| {});
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
    let crl = |reporter: &str| mesh.crl_rejections(reporter);
    assert_eq!(crl("destination"), 0);

    // A list revoking someone else changes nothing.
    let other = leaf(&mesh.ca, &mesh.identity("sa-x", "ns-x"), valid_now());
    mesh.revoke(&crl_path, &[], &[other.serial()]);
    wait_for("first reload", || {
        !log_lines(&["revocation lists reloaded", "ca-crl.pem", "lists=1"]).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    echo_open(&mut open, b"still").await;

    // Revoking a's certificate: b closes the connection; the app connection ends.
    mesh.revoke(&crl_path, &[&a], &[other.serial()]);
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
    let crl = || mesh.crl_rejections("source");
    mesh.revoke(&crl_path, &[&mesh.identity("sa-b", "ns-b")], &[]);
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
