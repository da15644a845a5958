//! Application tunnels through the real proxy (the `common` loopback harness): a workload
//! whose `applicationTunnel` asks for PROXY gets each inbound HBONE stream on the tunnel's
//! port, starting with a PROXY v2 header that names the client's address, the HBONE
//! target and the client's SPIFFE identity (TLV 0xD0), as upstream's ztunnel writes it; a
//! sandwiched target (a service VIP) is accepted and named in the header; `NONE` only moves
//! the port; with `LOCALHOST_APP_TUNNEL` the tunnel is reached on loopback. Each test uses
//! its own 127.79.3x.0/24 addresses.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use ppp::v2::{Addresses, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztunnel::identity::Identity;
use ztunnel::state::workload::{ApplicationTunnel, ApplicationTunnelProtocol};

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// What the app behind the tunnel saw on one connection.
#[derive(Debug)]
struct Received {
    /// The PROXY header's (source, destination) and TLV 0xD0, when there was one.
    proxy: Option<(SocketAddr, SocketAddr, String)>,
    /// The bytes after it.
    payload: Vec<u8>,
}

/// Accepts one connection on `listener`; with `expect_header`, parses the PROXY v2 header
/// first; then reads `len` payload bytes and answers them back.
async fn app(listener: TcpListener, expect_header: bool, len: usize) -> Received {
    let (mut s, _) = listener.accept().await.unwrap();
    let proxy = if expect_header {
        let mut head = vec![0u8; 16];
        s.read_exact(&mut head).await.unwrap();
        let rest = u16::from_be_bytes([head[14], head[15]]) as usize;
        head.resize(16 + rest, 0);
        s.read_exact(&mut head[16..]).await.unwrap();
        let h = Header::try_from(&head[..]).expect("a PROXY v2 header");
        let (src, dst) = match h.addresses {
            Addresses::IPv4(a) => (
                sa(a.source_address.into(), a.source_port),
                sa(a.destination_address.into(), a.destination_port),
            ),
            other => panic!("IPv4 addresses expected: {other:?}"),
        };
        let id = h
            .tlvs()
            .map(Result::unwrap)
            .find(|t| t.kind == 0xD0)
            .map(|t| String::from_utf8(t.value.to_vec()).unwrap())
            .unwrap_or_default();
        Some((src, dst, id))
    } else {
        None
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    s.write_all(&payload).await.unwrap();
    Received { proxy, payload }
}

/// An HBONE CONNECT for `authority` to B's 15008 as `id` from A's address, sending
/// `data` and reading as much back: the status and the echo.
async fn tunnel(mesh: &Mesh, id: &Identity, authority: &str, data: &[u8]) -> (StatusCode, Vec<u8>) {
    let mut send = mesh
        .h2_to_b(mesh.a_ip, id)
        .await
        .expect("mTLS and HTTP/2 to B");
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap();
    let (resp, mut body_out) = send.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    let status = resp.status();
    if status != StatusCode::OK {
        return (status, Vec::new());
    }
    body_out
        .send_data(Bytes::copy_from_slice(data), false)
        .unwrap();
    let mut body_in = resp.into_body();
    let mut back = Vec::new();
    while back.len() < data.len() {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body_in.data())
            .await
            .expect("echo within 5 s")
            .expect("stream open")
            .unwrap();
        let _ = body_in.flow_control().release_capacity(chunk.len());
        back.extend_from_slice(&chunk);
    }
    (status, back)
}

/// Gives B an application tunnel.
fn set_tunnel(mesh: &Mesh, protocol: ApplicationTunnelProtocol, port: Option<u16>) {
    let snap = mesh.store.snapshot();
    let mut b = (**snap.workload_by_uid("b").unwrap()).clone();
    drop(snap);
    b.application_tunnel = Some(ApplicationTunnel { protocol, port });
    mesh.store.source("file").upsert_workload(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_tunnel_gets_a_header_naming_client_target_and_identity() {
    let mesh = Mesh::new("127.79.31", |c| c.localhost_app_tunnel = false);
    set_tunnel(&mesh, ApplicationTunnelProtocol::PROXY, Some(15088));
    let (_pb, _) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");

    // A CONNECT for B itself: delivered on the tunnel port, not 8080 (nothing listens there).
    let listener = TcpListener::bind(sa(mesh.b_ip, 15088)).await.unwrap();
    let seen = tokio::spawn(app(listener, true, 5));
    let target = format!("{}:8080", mesh.b_ip);
    let (status, back) = tunnel(&mesh, &a, &target, b"hello").await;
    assert_eq!((status, &back[..]), (StatusCode::OK, &b"hello"[..]));
    let seen = seen.await.unwrap();
    let (src, dst, id) = seen.proxy.clone().expect("PROXY header");
    assert_eq!(src.ip(), mesh.a_ip, "{seen:?}");
    assert_eq!(dst, sa(mesh.b_ip, 8080));
    assert_eq!(id, "spiffe://cluster.local/ns/ns-a/sa/sa-a");
    assert_eq!(seen.payload, b"hello");

    // A sandwiched target, B's service VIP: B is not its waypoint, but a workload with a
    // tunnel gets any target, named in the header.
    let listener = TcpListener::bind(sa(mesh.b_ip, 15088)).await.unwrap();
    let seen = tokio::spawn(app(listener, true, 3));
    let vip = format!("{}.100:80", mesh.base);
    let (status, back) = tunnel(&mesh, &a, &vip, b"vip").await;
    assert_eq!((status, &back[..]), (StatusCode::OK, &b"vip"[..]));
    let (_, dst, _) = seen.await.unwrap().proxy.expect("PROXY header");
    assert_eq!(dst, vip.parse::<SocketAddr>().unwrap());

    // Without the tunnel the same VIP target is refused (B is not its waypoint).
    let snap = mesh.store.snapshot();
    let mut b = (**snap.workload_by_uid("b").unwrap()).clone();
    drop(snap);
    b.application_tunnel = None;
    mesh.store.source("file").upsert_workload(b);
    let (status, _) = tunnel(&mesh, &a, &vip, b"x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_tunnel_only_moves_the_port() {
    let mesh = Mesh::new("127.79.32", |_| {});
    set_tunnel(&mesh, ApplicationTunnelProtocol::NONE, Some(15089));
    let (_pb, _) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");
    // Not on loopback even with LOCALHOST_APP_TUNNEL: only PROXY carries the client.
    let listener = TcpListener::bind(sa(mesh.b_ip, 15089)).await.unwrap();
    let seen = tokio::spawn(app(listener, false, 4));
    let (status, back) = tunnel(&mesh, &a, &format!("{}:8080", mesh.b_ip), b"data").await;
    assert_eq!((status, &back[..]), (StatusCode::OK, &b"data"[..]));
    assert_eq!(seen.await.unwrap().payload, b"data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_tunnel_is_reached_on_loopback_by_default() {
    // The proxy runs "in the pod" (workload scope): the app may listen on localhost only.
    let mesh = Mesh::new("127.79.33", |_| {});
    set_tunnel(&mesh, ApplicationTunnelProtocol::PROXY, Some(39188));
    let (_pb, _) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");
    let listener = TcpListener::bind("127.0.0.1:39188").await.unwrap();
    let seen = tokio::spawn(app(listener, true, 2));
    let (status, back) = tunnel(&mesh, &a, &format!("{}:8080", mesh.b_ip), b"lo").await;
    assert_eq!((status, &back[..]), (StatusCode::OK, &b"lo"[..]));
    let (src, dst, id) = seen.await.unwrap().proxy.expect("PROXY header");
    assert_eq!(
        (src.ip(), dst),
        (mesh.a_ip, sa(mesh.b_ip, 8080)),
        "the header still names the client and the target"
    );
    assert_eq!(id, "spiffe://cluster.local/ns/ns-a/sa/sa-a");
}
