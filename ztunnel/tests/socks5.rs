//! SOCKS5 (`UNSTABLE_ENABLE_SOCKS5`): a client that asks the proxy for a destination is
//! proxied as a captured outbound connection to it (HBONE to a mesh service, access log,
//! metrics), by IP or by a service's name; requests the proxy does not serve get their
//! RFC 1928 answer. The SOCKS5 client is written by hand. Meshes on 127.79.36.0/24 and
//! 127.79.37.0/24; A's SOCKS5 listener is on A's address (127.0.0.1 in a real pod netns).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ztunnel::config::{Config, WorkloadInfo};
use ztunnel::proxy::{ProxyFactory, ProxyHandle, ProxyInputs, ProxyScope, ProxySpec};

/// Starts A's proxy with SOCKS5 on `<A's IP>:15080` (its own inputs: B's proxy, started
/// with the mesh's, must not bind it too).
async fn proxy_a_with_socks5(mesh: &Mesh) -> ProxyHandle {
    let cfg = Config {
        socks5_addr: Some(SocketAddr::new(mesh.a_ip, 15080)),
        ..(*mesh.inputs.cfg).clone()
    };
    let inputs = ProxyInputs {
        cfg: Arc::new(cfg),
        ..mesh.inputs.clone()
    };
    ProxyFactory::new(inputs)
        .start(ProxySpec {
            scope: ProxyScope::Workload("ns-a/a/sa-a".parse::<WorkloadInfo>().unwrap()),
            sockets: LoopbackSockets::new(mesh.a_ip),
            bind_ip: mesh.a_ip,
            orig_src: false,
            dns: false,
        })
        .await
        .unwrap()
}

/// A TCP connection from `from` to `proxy`.
async fn dial(from: IpAddr, proxy: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    sock.connect(proxy).await.unwrap()
}

/// `CONNECT ip:port` (address type 1).
fn connect_ipv4(dst: SocketAddr) -> Vec<u8> {
    let IpAddr::V4(ip) = dst.ip() else {
        panic!("IPv4 only: {dst}")
    };
    let mut r = vec![5, 1, 0, 1];
    r.extend_from_slice(&ip.octets());
    r.extend_from_slice(&dst.port().to_be_bytes());
    r
}

/// `CONNECT name:port` (address type 3).
fn connect_domain(name: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, 1, 0, 3, name.len() as u8];
    r.extend_from_slice(name.as_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r
}

/// Greets with "no authentication", sends `request`, returns the stream and the reply.
async fn socks(from: IpAddr, proxy: SocketAddr, request: &[u8]) -> (TcpStream, [u8; 10]) {
    let mut c = dial(from, proxy).await;
    c.write_all(&[5, 1, 0]).await.unwrap();
    let mut method = [0u8; 2];
    c.read_exact(&mut method).await.unwrap();
    assert_eq!(method, [5, 0], "no authentication selected");
    c.write_all(request).await.unwrap();
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply).await.unwrap();
    (c, reply)
}

/// Whether the proxy closes `c` (EOF or reset) within 5 s without sending more.
async fn closed(mut c: TcpStream) -> bool {
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

const SUCCESS: [u8; 10] = [5, 0, 0, 1, 0, 0, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_by_vip_and_by_service_name_goes_through_hbone() {
    let mesh = Mesh::new("127.79.36", |_| {});
    let _echo = echo_server(SocketAddr::new(mesh.b_ip, 8080)).await;
    let (_pb, _) = mesh.proxy("b").await;
    let pa = proxy_a_with_socks5(&mesh).await;
    let proxy = SocketAddr::new(mesh.a_ip, 15080);
    assert_eq!(pa.addresses().socks5, Some(proxy));
    let data = Arc::new(b"through socks5".repeat(500));

    // By the service VIP, by its full name, by a short name of it from A's namespace.
    let requests = [
        connect_ipv4("127.79.36.100:80".parse().unwrap()),
        connect_domain("b.ns-b.svc.cluster.local", 80),
        connect_domain("b.ns-b", 80),
    ];
    for request in &requests {
        let (c, reply) = socks(mesh.a_ip, proxy, request).await;
        assert_eq!(reply, SUCCESS, "{request:?}");
        let back = echo_roundtrip(c, data.clone()).await.unwrap();
        assert_eq!(back.len(), data.len(), "{request:?}");
        assert_eq!(back, *data, "{request:?}");
    }

    let needles = [
        "connection complete",
        "direction=\"outbound\"",
        "src.addr=127.79.36.1:",
        "dst.addr=127.79.36.2:15008",
    ];
    wait_for("three outbound access lines", || {
        log_lines(&needles).len() >= 3
    })
    .await;
    for line in log_lines(&needles) {
        assert!(
            line.contains("dst.identity=spiffe://cluster.local/ns/ns-b/sa/sa-b"),
            "{line}"
        );
        assert!(line.contains("dst.hbone_addr=127.79.36.2:8080"), "{line}");
        assert!(
            line.contains("dst.service=\"b.ns-b.svc.cluster.local\""),
            "{line}"
        );
        assert!(!line.contains("error="), "{line}");
    }
    let opened = mesh.metric(
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            "source_principal=\"spiffe://cluster.local/ns/ns-a/sa/sa-a\"",
            "destination_principal=\"spiffe://cluster.local/ns/ns-b/sa/sa-b\"",
            "destination_service=\"b.ns-b.svc.cluster.local\"",
        ],
    );
    assert_eq!(opened, 3, "{}", mesh.metrics_text());
    assert_eq!(mesh.refused("bad_request"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_it_does_not_serve_get_their_rfc_1928_answer() {
    let mesh = Mesh::new("127.79.37", |_| {});
    let _pa = proxy_a_with_socks5(&mesh).await;
    let proxy = SocketAddr::new(mesh.a_ip, 15080);

    // Only username/password and GSSAPI offered: no acceptable method (0xFF), closed.
    let mut c = dial(mesh.a_ip, proxy).await;
    c.write_all(&[5, 2, 2, 1]).await.unwrap();
    let mut method = [0u8; 2];
    c.read_exact(&mut method).await.unwrap();
    assert_eq!(method, [5, 0xFF]);
    assert!(closed(c).await, "closed after 0xFF");

    // BIND: command not supported (0x07), closed.
    let mut bind = connect_ipv4("127.79.37.2:80".parse().unwrap());
    bind[1] = 2;
    let (c, reply) = socks(mesh.a_ip, proxy, &bind).await;
    assert_eq!(reply[..2], [5, 0x07]);
    assert!(closed(c).await, "closed after 0x07");

    // A name neither the mesh nor the system resolver knows: host unreachable (0x04).
    let (c, reply) = socks(mesh.a_ip, proxy, &connect_domain("nowhere.invalid", 80)).await;
    assert_eq!(reply[..2], [5, 0x04]);
    assert!(closed(c).await, "closed after 0x04");

    // The proxy's own SOCKS5 port is a self-call: accepted (as upstream, the reply
    // precedes routing), then closed by the outbound path.
    let (c, reply) = socks(mesh.a_ip, proxy, &connect_ipv4(proxy)).await;
    assert_eq!(reply, SUCCESS);
    assert!(closed(c).await, "self-call closed");

    // Not SOCKS5 at all: closed without an answer.
    let mut c = dial(mesh.a_ip, proxy).await;
    c.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
    assert!(closed(c).await, "SOCKS4 closed");

    wait_for("the refusals counted", || mesh.refused("bad_request") == 4).await;
    assert_eq!(mesh.refused("upstream_unavailable"), 1);
    let refusals = log_lines(&["socks5: request refused", "src=127.79.37.1:"]);
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("command 0x02 not supported")),
        "{refusals:?}"
    );
    let unresolved = log_lines(&["socks5: cannot resolve", "target=nowhere.invalid:80"]);
    assert_eq!(unresolved.len(), 1, "{}", logs());
    let own_port = log_lines(&[
        "connection to the proxy's own port refused",
        "dst=127.79.37.1:15080",
    ]);
    assert_eq!(own_port.len(), 1, "{}", logs());
}
