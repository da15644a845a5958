//! The DNS proxy end to end: real UDP and TCP sockets, a fake upstream resolver.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::forward::{Upstreams, read_framed, write_framed};
use super::server::{DnsClient, DnsHandler, SearchDomains, serve};
use crate::config::WorkloadInfo;
use crate::proxy::sockets::{BoxFuture, ListenerKind, OriginalDestination, SocketFactory};
use crate::state::Store;
use crate::state::file::{FileDefaults, parse};
use crate::telemetry::dns_metrics::{DnsLabels, DnsMetrics};

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

const STATE: &str = r#"
workloads:
  - uid: c1
    name: client
    namespace: ns1
    serviceAccount: sa
    workloadIps: ["127.0.0.1"]
    canonicalName: client
    canonicalRevision: v1
services:
  - name: web
    namespace: ns1
    hostname: web.ns1.svc.cluster.local
    vips: ["/10.96.0.10"]
    ports: {80: 8080}
"#;

fn store() -> Store {
    let lc = parse(
        STATE,
        std::path::Path::new("dns.yaml"),
        &FileDefaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        },
    )
    .unwrap();
    let store = Store::new();
    store
        .source("file")
        .replace_all(lc.workloads, lc.services, lc.policies);
    store
}

/// The upstream resolver's answer: `known.example.` has 192.0.2.1, every other name is
/// NXDOMAIN.
fn upstream_answer(query: &[u8]) -> Vec<u8> {
    let q = Message::from_vec(query).unwrap();
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.add_queries(q.queries.iter().cloned());
    let name = q.queries[0].name().clone();
    if name.to_ascii() == "known.example." && q.queries[0].query_type() == RecordType::A {
        m.add_answer(Record::from_rdata(
            name,
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
    } else {
        m.metadata.response_code = ResponseCode::NXDomain;
    }
    m.to_vec().unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Answers,
    Silent,
    /// Loses the first UDP datagram.
    DropsFirst,
}

/// A fake upstream resolver on UDP and TCP (same port).
async fn upstream(behaviour: Upstream) -> SocketAddr {
    let silent = behaviour == Upstream::Silent;
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut drop = behaviour == Upstream::DropsFirst;
        while let Ok((n, src)) = udp.recv_from(&mut buf).await {
            if std::mem::take(&mut drop) {
                continue;
            }
            if !silent {
                let _ = udp.send_to(&upstream_answer(&buf[..n]), src).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(q)) = read_framed(&mut s).await {
                    if silent {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    let _ = write_framed(&mut s, &upstream_answer(&q)).await;
                }
            });
        }
    });
    addr
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
    let metrics = DnsMetrics::default();
    let handler = Arc::new(DnsHandler {
        state: store(),
        client: DnsClient::Workload(WorkloadInfo {
            namespace: "ns1".into(),
            name: "client".into(),
            service_account: "sa".into(),
        }),
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

fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
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

fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
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
