//! Two in-process proxies on loopback (see `hbone_proxy.rs`): what they refuse and how.
//! Connections to the proxy's own ports, a peer that never completes the TLS handshake,
//! peers with a wrong trust domain, an untrusted root, an expired certificate or another
//! workload's identity, malformed CONNECT requests and garbage on 15008.
//! A CONNECT the client resets while the app connect is pending.
//! Each test uses its own 127.77.x.0/24 addresses (x = 4, 5, 11, 71, 72 here).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sa(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// A workload connecting to the proxy's own port on loopback (never captured by the pod
/// rules) or on its own address is refused: passed through, the proxy would connect to
/// itself again and again until the node's ztunnel ran out of sockets.
#[tokio::test(flavor = "current_thread")]
async fn connections_to_the_proxys_own_ports_are_refused() {
    let mesh = Mesh::new("127.77.71", |_| {});
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
        log_lines(&["127.77.71", "connection complete", "127.0.0.1:15001"]).is_empty(),
        "no connection was proxied to the proxy itself"
    );
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

/// A client that resets its CONNECT while B is still connecting to the app: B gives up
/// the connect at once, logging why, instead of finishing it (up to the connect timeout)
/// and opening a connection to the app for a stream nobody waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_reset_by_the_client_ends_the_upstream_attempt() {
    use socket2::{Domain, Socket, Type};
    let mesh = Mesh::new("127.77.72", |c| c.connect_timeout = Duration::from_secs(60));
    // An app whose accept queue is full: a connect to it hangs (its SYNs are dropped).
    let app = sa(mesh.b_ip, 8080);
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener.bind(&app.into()).unwrap();
    listener.listen(0).unwrap();
    let _queued = TcpStream::connect(app).await.unwrap();
    let (_pb, _) = mesh.proxy("b").await;

    let mut send = h2_as_a(&mesh).await.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(app.to_string())
        .body(())
        .unwrap();
    let (resp, stream) = send.send_request(req, false).unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(500), resp).await;
    assert!(waiting.is_err(), "B answered while its connect should hang");
    // Dropping the client's handles resets the stream (CANCEL).
    drop(stream);
    let logged = format!("client reset the stream (CANCEL) while connecting to {app}");
    wait_for("B to give up the connect", || {
        !log_lines(&["access", &logged]).is_empty()
    })
    .await;
    drop(listener);
}
