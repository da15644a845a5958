//! The DNS proxy end to end: real UDP and TCP sockets, a fake upstream resolver
//! (`dns_support`, shared with `dns_proxy_inpod`).

mod dns_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dns_support::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ztunnel::proxy::dns::forward::{read_framed, write_framed};
use ztunnel::proxy::dns::server::serve;
use ztunnel::proxy::dns::{DnsClient, DnsHandler, SearchDomains, Upstreams};
use ztunnel::redirect::{BoxFuture, ListenerKind, OriginalDestination, SocketFactory};
use ztunnel::telemetry::dns_metrics::{DnsLabels, DnsMetrics};

/// Unmarked sockets in the current netns: all the DNS proxy needs here (the redirect
/// layer's factories sit above `proxy`).
struct PlainSockets;

impl SocketFactory for PlainSockets {
    fn bind_listener(
        &self,
        addr: SocketAddr,
        _kind: ListenerKind,
    ) -> BoxFuture<'_, std::io::Result<TcpListener>> {
        Box::pin(TcpListener::bind(addr))
    }

    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, std::io::Result<UdpSocket>> {
        Box::pin(UdpSocket::bind(addr))
    }

    fn connect(
        &self,
        dst: SocketAddr,
        _orig_src: Option<std::net::IpAddr>,
    ) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(dst))
    }

    fn original_destination_mode(&self) -> OriginalDestination {
        OriginalDestination::SoOriginalDst
    }

    fn original_destination(&self, stream: &TcpStream) -> std::io::Result<SocketAddr> {
        stream.local_addr()
    }

    fn describe(&self) -> String {
        "plain test sockets".into()
    }
}

struct Proxy {
    addr: SocketAddr,
    metrics: DnsMetrics,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The DNS proxy of workload `ns1/client` on 127.0.0.1 (UDP and TCP on one port),
/// forwarding to `servers` with a 1 s timeout.
async fn proxy(servers: Vec<SocketAddr>, attempts: u32) -> Proxy {
    proxy_with(servers, attempts, true).await
}

/// [`proxy`] with `IPV6_ENABLED` = `ipv6`.
async fn proxy_with(servers: Vec<SocketAddr>, attempts: u32, ipv6: bool) -> Proxy {
    let metrics = DnsMetrics::default();
    let handler = Arc::new(DnsHandler {
        state: store(),
        client: DnsClient::Workload(client()),
        node: None,
        cluster_domain: "cluster.local".into(),
        search: SearchDomains::PerNamespace,
        upstreams: Arc::new(Upstreams {
            servers,
            search: Vec::new(),
            timeout: Duration::from_secs(1),
            attempts,
        }),
        sockets: Arc::new(PlainSockets),
        metrics: metrics.clone(),
        preferred_namespace: None,
        ipv6,
        network: String::new(),
    });
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    loop {
        // A port free for both UDP and TCP.
        let port = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if serve(handler.clone(), &[(addr, true)], &tracker, &stop)
            .await
            .is_ok()
        {
            return Proxy {
                addr,
                metrics,
                stop,
            };
        }
    }
}

async fn ask_udp(proxy: &Proxy, q: &[u8]) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(proxy.addr).await.unwrap();
    sock.send(q).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("an answer over UDP")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn ask_tcp(proxy: &Proxy, q: &[u8]) -> Message {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    write_framed(&mut s, q).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_framed(&mut s))
        .await
        .expect("an answer over TCP")
        .unwrap()
        .unwrap();
    Message::from_vec(&answer).unwrap()
}

#[tokio::test]
async fn mesh_names_are_answered_locally_over_udp_and_tcp() {
    let proxy = proxy(vec![upstream(Upstream::Answers).await], 2).await;
    for tcp in [false, true] {
        let q = query("web.", RecordType::A, true);
        let m = if tcp {
            ask_tcp(&proxy, &q).await
        } else {
            ask_udp(&proxy, &q).await
        };
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative, "tcp {tcp}");
        assert_eq!(addrs(&m), ["10.96.0.10"], "tcp {tcp}");
        assert_eq!(m.answers[0].ttl, 30);
        assert!(m.edns.is_some());
        // AAAA of an IPv4-only Service: NOERROR without records (NODATA), not NXDOMAIN.
        let q = query("web.ns1.svc.cluster.local.", RecordType::AAAA, false);
        let m = if tcp {
            ask_tcp(&proxy, &q).await
        } else {
            ask_udp(&proxy, &q).await
        };
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.answers.is_empty());
    }
    let labels = DnsLabels::new("a".into(), "tcp", Some(("client", "v1")));
    assert_eq!(proxy.metrics.requests.get_or_create(&labels).get(), 1);
    assert_eq!(
        proxy.metrics.upstream_requests.get_or_create(&labels).get(),
        0
    );
}

/// `IPV6_ENABLED=false`: a dual-stack Service answers its IPv4 VIP and no AAAA records
/// (NOERROR, no data: the name is still the mesh's, not relayed).
#[tokio::test]
async fn ipv6_disabled_leaves_ipv6_addresses_out() {
    for ipv6 in [true, false] {
        let proxy = proxy_with(vec![upstream(Upstream::Answers).await], 2, ipv6).await;
        let m = ask_udp(
            &proxy,
            &query("dual.ns1.svc.cluster.local.", RecordType::A, false),
        )
        .await;
        assert_eq!(addrs(&m), ["10.96.0.13"], "ipv6 {ipv6}");
        let m = ask_udp(
            &proxy,
            &query("dual.ns1.svc.cluster.local.", RecordType::AAAA, false),
        )
        .await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(
            m.metadata.authoritative,
            "answered by the mesh, ipv6 {ipv6}"
        );
        let want: &[&str] = if ipv6 { &["fd00::13"] } else { &[] };
        assert_eq!(addrs(&m), want, "ipv6 {ipv6}");
    }
}

#[tokio::test]
async fn other_names_and_types_are_relayed_from_upstream() {
    let proxy = proxy(vec![upstream(Upstream::Answers).await], 2).await;
    for tcp in [false, true] {
        let ask = |q: Vec<u8>| {
            let proxy = &proxy;
            async move {
                if tcp {
                    ask_tcp(proxy, &q).await
                } else {
                    ask_udp(proxy, &q).await
                }
            }
        };
        let m = ask(query("known.example.", RecordType::A, false)).await;
        assert_eq!(m.metadata.id, 0x4242);
        assert!(!m.metadata.authoritative);
        assert_eq!(addrs(&m), ["192.0.2.1"], "tcp {tcp}");
        assert_eq!(m.answers[0].ttl, 300, "relayed unchanged");
        // Upstream's NXDOMAIN reaches the client.
        let m = ask(query("unknown.example.", RecordType::A, false)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Other types of mesh names are the upstream resolver's.
        let m = ask(query("web.ns1.svc.cluster.local.", RecordType::SRV, false)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(!m.metadata.authoritative);
    }
    let labels = DnsLabels::new("srv".into(), "udp", Some(("client", "v1")));
    assert_eq!(
        proxy.metrics.upstream_requests.get_or_create(&labels).get(),
        1
    );
    assert_eq!(
        proxy.metrics.upstream_failures.get_or_create(&labels).get(),
        0
    );
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_is_servfail() {
    let proxy = proxy(vec![upstream(Upstream::Silent).await], 2).await;
    for tcp in [false, true] {
        let q = query("known.example.", RecordType::A, false);
        let m = if tcp {
            ask_tcp(&proxy, &q).await
        } else {
            ask_udp(&proxy, &q).await
        };
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::ServFail,
            "tcp {tcp}"
        );
    }
    let labels = DnsLabels::new("a".into(), "udp", Some(("client", "v1")));
    assert_eq!(
        proxy.metrics.upstream_failures.get_or_create(&labels).get(),
        1
    );
}

#[tokio::test]
async fn a_lost_datagram_is_asked_again() {
    // resolv.conf's `attempts` (2), as upstream's resolver: one lost datagram is not
    // SERVFAIL.
    let proxy = proxy(vec![upstream(Upstream::DropsFirst).await], 2).await;
    let m = ask_udp(&proxy, &query("known.example.", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), ["192.0.2.1"]);
}

#[tokio::test]
async fn a_dead_first_server_does_not_delay_answers() {
    // Two servers are asked at once (upstream's resolver): the live one answers at once.
    let servers = vec![
        upstream(Upstream::Silent).await,
        upstream(Upstream::Answers).await,
    ];
    let proxy = proxy(servers, 1).await;
    for tcp in [false, true] {
        let q = query("known.example.", RecordType::A, false);
        let start = std::time::Instant::now();
        let m = if tcp {
            ask_tcp(&proxy, &q).await
        } else {
            ask_udp(&proxy, &q).await
        };
        assert_eq!(addrs(&m), ["192.0.2.1"], "tcp {tcp}");
        // Asked in turn, the answer would wait for the first server's 1 s timeout.
        assert!(
            start.elapsed() < Duration::from_millis(800),
            "tcp {tcp}: {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test]
async fn namespace_scoped_services_of_other_namespaces_are_forwarded() {
    let proxy = proxy(vec![upstream(Upstream::Answers).await], 2).await;
    // The client's own namespace's: answered from the mesh.
    let m = ask_udp(&proxy, &query("mine.", RecordType::A, false)).await;
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), ["10.96.0.11"]);
    // Another namespace's: not the mesh's name for this client, so the upstream
    // resolver's answer (NXDOMAIN here) comes back.
    let m = ask_udp(&proxy, &query("theirs.ns2.", RecordType::A, false)).await;
    assert!(!m.metadata.authoritative);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(addrs(&m).is_empty());
    let labels = DnsLabels::new("a".into(), "udp", Some(("client", "v1")));
    assert_eq!(
        proxy.metrics.upstream_requests.get_or_create(&labels).get(),
        1
    );
}
