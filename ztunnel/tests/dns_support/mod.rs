//! Shared by the DNS proxy tests (`dns_proxy`, `dns_proxy_inpod`): the mesh state the
//! proxy answers from, a fake upstream resolver and DNS message helpers.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::{TcpListener, UdpSocket};
use ztunnel::config::WorkloadInfo;
use ztunnel::proxy::dns::forward::{read_framed, write_framed};
use ztunnel::state::Store;
use ztunnel::state::file::{FileDefaults, parse};

/// The asking workload `ns1/client` and the services it may (`web`, `mine`, dual-stack
/// `dual`) or may not
/// (`theirs`, namespace-scoped to `ns2`) resolve from the mesh.
pub const STATE: &str = r#"
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
  - name: mine
    namespace: ns1
    hostname: mine.ns1.svc.cluster.local
    vips: ["/10.96.0.11"]
    ports: {80: 8080}
    visibility: Namespace
  - name: dual
    namespace: ns1
    hostname: dual.ns1.svc.cluster.local
    vips: ["/10.96.0.13", "/fd00::13"]
    ports: {80: 8080}
  - name: theirs
    namespace: ns2
    hostname: theirs.ns2.svc.cluster.local
    vips: ["/10.96.0.12"]
    ports: {80: 8080}
    visibility: Namespace
"#;

/// The store of [`STATE`].
pub fn store() -> Store {
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

/// The client of [`STATE`].
pub fn client() -> WorkloadInfo {
    WorkloadInfo {
        namespace: "ns1".into(),
        name: "client".into(),
        service_account: "sa".into(),
    }
}

/// The upstream resolver's answer: `known.example.` has 192.0.2.1, every other name is
/// NXDOMAIN.
pub fn upstream_answer(query: &[u8]) -> Vec<u8> {
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

/// How the fake upstream resolver behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Answers,
    Silent,
    /// Loses the first UDP datagram.
    DropsFirst,
}

/// A fake upstream resolver on 127.0.0.1, UDP and TCP (same port), in this netns.
pub async fn upstream(behaviour: Upstream) -> SocketAddr {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    serve_upstream(udp, tcp, behaviour);
    addr
}

/// Answers [`upstream_answer`] on sockets the caller bound (here or in a pod's netns).
pub fn serve_upstream(udp: UdpSocket, tcp: TcpListener, behaviour: Upstream) {
    let silent = behaviour == Upstream::Silent;
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
}

/// A query for `name` (id 0x4242, recursion desired).
pub fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
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

/// The A records of an answer.
pub fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}
