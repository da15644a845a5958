//! Double HBONE through the real proxies (the `common` loopback harness): workload A on
//! network `east` reaches service `b` whose only endpoint, B, is on network `west`, behind
//! west's east-west gateway. The gateway here is a test double with upstream's contract: it
//! terminates the outer mTLS + HTTP/2 CONNECT (`hostname:port`), then relays the stream's
//! bytes, unread, to the endpoint's HBONE port. B's ztunnel terminates the inner tunnel,
//! whose TLS is A's own. A gateway that tries to terminate the inner TLS itself is refused.
//! Addresses: 127.79.34.0/24, 127.79.35.0/24 and 127.79.38.0/24, one per test (gateway
//! at .9).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use ztunnel::hbone::H2Stream;
use ztunnel::hbone::double::StreamIo;
use ztunnel::hbone::headers::X_FORWARDED_NETWORK;

const AUTHORITY: &str = "b.ns-b.svc.cluster.local:80";

/// A on `east` at `.1`; B on `west` at `.2` behind the gateway at `.9`, a known west
/// workload; service `b` at `.100` (for `east`).
fn state(base: &str) -> String {
    format!(
        r#"
workloads:
- {{uid: a, name: a, namespace: ns-a, serviceAccount: sa-a, network: east,
   workloadIps: ["{base}.1"], protocol: HBONE, node: n1, services: {{}}}}
- uid: b
  name: b
  namespace: ns-b
  serviceAccount: sa-b
  network: west
  workloadIps: ["{base}.2"]
  protocol: HBONE
  node: n2
  networkGateway: {{destination: "west/{base}.9", hboneMtlsPort: 15008}}
  services: {{"ns-b/b.ns-b.svc.cluster.local": {{80: 8080}}}}
- {{uid: ew, name: ew, namespace: istio-system, serviceAccount: istio-eastwestgateway,
   network: west, workloadIps: ["{base}.9"], protocol: TCP, services: {{}}}}
services:
- name: b
  namespace: ns-b
  hostname: b.ns-b.svc.cluster.local
  vips: ["east/{base}.100"]
  ports: {{80: 8080}}
"#
    )
}

/// What the gateway saw of one outer CONNECT.
#[derive(Clone)]
struct Seen {
    client_identity: String,
    authority: String,
    forwarded_network: Option<String>,
    /// The bytes relayed towards B.
    relayed: Vec<u8>,
}

/// The test east-west gateway on `GATEWAY:15008`, proving `identity`. Honest: relays
/// `AUTHORITY` to B's 15008 from its own address. Dishonest: answers 200 and then tries to
/// terminate the inner TLS with its own certificate.
async fn gateway(mesh: &Mesh, identity: &str, honest: bool) -> Arc<Mutex<Vec<Seen>>> {
    let gateway = gateway_ip(mesh);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let cert = leaf(
        &mesh.ca,
        &mesh.identity(identity, "istio-system"),
        valid_now(),
    );
    let server_cfg = ztunnel::tls::server_config(&cert, &roots(&mesh.ca), "cluster.local");
    let listener = TcpListener::bind(SocketAddr::new(gateway, 15008))
        .await
        .unwrap();
    let b_hbone = SocketAddr::new(mesh.b_ip, 15008);
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (server_cfg, log) = (server_cfg.clone(), log.clone());
            tokio::spawn(async move {
                let accept = ztunnel::hbone::server::tls_accept(tcp, server_cfg.clone(), SECS_5);
                let Ok(tls) = accept.await else { return };
                let client_identity = ztunnel::tls::peer_identity(
                    tls.get_ref().1.peer_certificates(),
                    "cluster.local",
                )
                .map(|i| i.to_string())
                .unwrap_or_default();
                let mut conn = h2::server::handshake(tls).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let seen = Seen {
                        client_identity: client_identity.clone(),
                        authority: req.uri().to_string(),
                        forwarded_network: req
                            .headers()
                            .get(X_FORWARDED_NETWORK)
                            .map(|v| v.to_str().unwrap().to_string()),
                        relayed: Vec::new(),
                    };
                    if seen.authority != AUTHORITY {
                        let r = Response::builder().status(503).body(()).unwrap();
                        let _ = respond.send_response(r, true);
                        log.lock().unwrap().push(seen);
                        continue;
                    }
                    let send = respond.send_response(Response::new(()), false).unwrap();
                    let recv = req.into_body();
                    let (cfg, log) = (server_cfg.clone(), log.clone());
                    tokio::spawn(async move {
                        if honest {
                            relay(send, recv, seen, log, gateway, b_hbone).await;
                        } else {
                            // Terminates the inner TLS itself: the client must refuse it.
                            log.lock().unwrap().push(seen);
                            let io = StreamIo::new(H2Stream::new(send, recv));
                            let _ = tokio_rustls::TlsAcceptor::from(cfg).accept(io).await;
                        }
                    });
                }
            });
        }
    });
    seen
}

/// Relays one outer stream to B's HBONE port from the gateway's address, unread; what went
/// towards B is kept in `seen` (in the log once the client's side has ended).
async fn relay(
    mut send: h2::SendStream<Bytes>,
    mut recv: h2::RecvStream,
    mut seen: Seen,
    log: Arc<Mutex<Vec<Seen>>>,
    gateway: IpAddr,
    b_hbone: SocketAddr,
) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(gateway, 0)).unwrap();
    let tcp = sock.connect(b_hbone).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let back = tokio::spawn(async move {
        let count = Default::default();
        ztunnel::hbone::stream::tcp_to_h2(&mut rd, &mut send, &count).await
    });
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        seen.relayed.extend_from_slice(&chunk);
        wr.write_all(&chunk).await.unwrap();
    }
    wr.shutdown().await.unwrap();
    log.lock().unwrap().push(seen);
    let _ = back.await;
}

fn gateway_ip(mesh: &Mesh) -> IpAddr {
    format!("{}.9", mesh.base).parse().unwrap()
}

/// Service `b`'s VIP, port 80.
fn vip(mesh: &Mesh) -> SocketAddr {
    format!("{}.100:80", mesh.base).parse().unwrap()
}

const SECS_5: Duration = Duration::from_secs(5);

fn mesh(base: &str) -> Mesh {
    let mesh = Mesh::new(base, |_| {});
    let lc = local_config(&state(base), "multi-network.yaml");
    mesh.store
        .source("file")
        .replace_all(lc.workloads, lc.services, lc.policies);
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_another_network_is_reached_through_its_gateway() {
    let mesh = mesh("127.79.34");
    let _echo = echo_server(SocketAddr::new(mesh.b_ip, 8080)).await;
    let seen = gateway(&mesh, "istio-eastwestgateway", true).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;

    let marker = b"plaintext-the-gateway-must-not-see";
    let data = Arc::new([&marker[..], &vec![7u8; 1 << 20]].concat());
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, vip(&mesh))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(20), echo_roundtrip(c, data.clone()))
        .await
        .expect("echo through the gateway")
        .unwrap();
    assert_eq!(sha256(&echoed), sha256(&data));

    // The gateway: A's own identity on the outer tunnel, the service hostname and port,
    // no network header there; what it relayed is TLS records (starting with the
    // handshake), at least the payload's size, never the payload in the clear.
    wait_for("the gateway's relay to end", || {
        seen.lock().unwrap().len() == 1
    })
    .await;
    let s = seen.lock().unwrap()[0].clone();
    assert_eq!(s.client_identity, "spiffe://cluster.local/ns/ns-a/sa/sa-a");
    assert_eq!(s.authority, AUTHORITY);
    assert_eq!(s.forwarded_network, None);
    assert_eq!(
        s.relayed.first(),
        Some(&0x16),
        "a TLS handshake record first"
    );
    assert!(
        s.relayed.len() > data.len(),
        "{} bytes relayed",
        s.relayed.len()
    );
    assert!(!s.relayed.windows(marker.len()).any(|w| w == marker));

    // B terminated the inner tunnel: its access line names A's identity (proved by the
    // inner TLS, not the gateway's) and the service; A's names the gateway as the address
    // and the hostname as the HBONE target.
    for needles in [
        &[
            "direction=\"inbound\"",
            "src.identity=spiffe://cluster.local/ns/ns-a/sa/sa-a",
            "src.addr=127.79.34.9:",
            "src.workload=\"a\"",
            "dst.service=\"b.ns-b.svc.cluster.local\"",
            "bytes_recv=1048610",
        ][..],
        &[
            "direction=\"outbound\"",
            "dst.addr=127.79.34.9:15008",
            "dst.hbone_addr=b.ns-b.svc.cluster.local:80",
            "dst.identity=spiffe://cluster.local/ns/ns-b/sa/sa-b",
            "bytes_sent=1048610",
        ][..],
    ] {
        wait_for("the access lines of both ends", || {
            !log_lines(needles).is_empty()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cannot_impersonate_the_destination() {
    let mesh = mesh("127.79.35");
    let (pa, socks) = mesh.proxy("a").await;
    let refused_before = mesh.refused("tls_handshake");

    // The gateway proves its identity, then answers the inner TLS itself: refused.
    let seen = gateway(&mesh, "istio-eastwestgateway", false).await;
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, vip(&mesh))
        .await
        .unwrap();
    let out = echo_roundtrip(c, Arc::new(b"secret".to_vec())).await;
    assert!(out.map(|v| v.is_empty()).unwrap_or(true), "nothing echoed");
    wait_for("the outer tunnel to be opened", || {
        seen.lock().unwrap().len() == 1
    })
    .await;
    wait_for("the refusal names the inner tunnel and the service", || {
        !log_lines(&[
            "inner tunnel to b.ns-b.svc.cluster.local:80 through the east-west gateway",
            "TLS handshake",
            "direction=\"outbound\"",
        ])
        .is_empty()
    })
    .await;
    assert_eq!(mesh.refused("tls_handshake"), refused_before + 1);
}

/// `CRL_PATH` applies to the inner tunnel as to a direct one: revoking the destination's
/// certificate closes the open inner tunnel (the gateway's pooled connection stays: its
/// certificate is fine) and refuses new inner handshakes, each counted at the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_destination_is_cut_off_inside_the_tunnel() {
    use ztunnel::tls::crl::RevocationLists;
    let dir = tempfile::tempdir().unwrap();
    let crl_path = dir.path().join("ca-crl.pem");
    let mut mesh = mesh("127.79.38");
    let (lists, _watch) = RevocationLists::watch_file(&crl_path).unwrap();
    mesh.inputs.roots = mesh.inputs.roots.clone().with_revocation(lists);
    let _echo = echo_server(SocketAddr::new(mesh.b_ip, 8080)).await;
    let _seen = gateway(&mesh, "istio-eastwestgateway", true).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let mut open = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, vip(&mesh))
        .await
        .unwrap();
    echo_open(&mut open, b"before").await;
    let crl = || mesh.crl_rejections("source");
    mesh.revoke(&crl_path, &[&mesh.identity("sa-b", "ns-b")], &[]);
    wait_for("revocation counted at the source", || crl() == 1).await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(SECS_5, open.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the inner tunnel to the revoked destination stayed open: {closed:?}"
    );
    assert_eq!(
        pa.pool_connections().len(),
        1,
        "the gateway's connection stays"
    );
    let c = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, vip(&mesh))
        .await
        .unwrap();
    let back = echo_roundtrip(c, Arc::new(b"x".to_vec())).await;
    assert!(back.map(|v| v.is_empty()).unwrap_or(true));
    wait_for("inner handshake refusal counted at the source", || {
        crl() == 2
    })
    .await;
}
