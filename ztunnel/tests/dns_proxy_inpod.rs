//! The DNS proxy of an in-pod workload proxy: it listens on the pod's localhost:15053
//! and relays what the mesh does not know from inside the pod's netns, with the mark
//! (so the pod's capture rules let the query out), as upstream.
//!
//! Needs root (network namespaces, SO_MARK, iptables).

mod dns_support;
mod inpod_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dns_support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use inpod_support::*;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ztunnel::inpod::{InpodNetns, InpodSocketFactory};
use ztunnel::proxy::dns::forward::{read_framed, write_framed};
use ztunnel::proxy::dns::server::serve;
use ztunnel::proxy::dns::{DnsClient, DnsHandler, SearchDomains, Upstreams};
use ztunnel::redirect::{ListenerKind, SocketFactory};
use ztunnel::telemetry::dns_metrics::DnsMetrics;

/// The upstream resolver's port inside the pod netns.
const UPSTREAM_PORT: u16 = 5353;

/// Asks over UDP from inside the pod (an unmarked socket there); `None`: no answer.
async fn ask_udp(pod: &InpodSocketFactory, to: SocketAddr, q: &[u8]) -> Option<Message> {
    let sock = pod
        .bind_udp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .unwrap();
    sock.send_to(q, to).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(Message::from_vec(&buf[..n]).unwrap())
}

async fn ask_tcp(pod: &InpodSocketFactory, to: SocketAddr, q: &[u8]) -> Message {
    let mut s = pod.connect(to, None).await.unwrap();
    write_framed(&mut s, q).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), read_framed(&mut s))
        .await
        .expect("an answer over TCP")
        .unwrap()
        .unwrap();
    Message::from_vec(&answer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_answered_in_the_pod_and_forwarded_from_it_with_the_mark() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, SO_MARK)");
        return;
    }
    let ns = pod_netns();
    // Inside the pod only marked traffic reaches the upstream resolver: forwarding from
    // another netns, or without the mark, gets no answer.
    for proto in ["udp", "tcp"] {
        let port = UPSTREAM_PORT.to_string();
        let status = ns
            .run(|| {
                Command::new("iptables")
                    .args(["-w", "-A", "INPUT", "-p", proto, "--dport", &port])
                    .args(["-m", "mark", "!", "--mark", &MARK.to_string(), "-j", "DROP"])
                    .status()
            })
            .unwrap()
            .expect("iptables runs");
        assert!(status.success(), "iptables in the pod netns: {status}");
    }
    let netns = || Arc::new(InpodNetns::new(ns.as_fd().try_clone_to_owned().unwrap()).unwrap());
    let pod = InpodSocketFactory::new(netns(), None, false);

    // The upstream resolver, in the pod netns on 127.0.0.1:5353.
    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, UPSTREAM_PORT));
    let udp = pod.bind_udp(upstream).await.unwrap();
    let tcp = pod
        .bind_listener(upstream, ListenerKind::Dns)
        .await
        .unwrap();
    serve_upstream(udp, tcp, Upstream::Answers);
    // Unmarked, the pod's own query does not get through (the rule works).
    assert!(
        ask_udp(
            &pod,
            upstream,
            &query("known.example.", RecordType::A, false)
        )
        .await
        .is_none(),
        "unmarked query reached the upstream resolver"
    );

    let handler = Arc::new(DnsHandler {
        state: store(),
        client: DnsClient::Workload(client()),
        node: None,
        cluster_domain: "cluster.local".into(),
        search: SearchDomains::PerNamespace,
        upstreams: Arc::new(Upstreams {
            servers: vec![upstream],
            search: Vec::new(),
            timeout: Duration::from_secs(1),
            attempts: 1,
        }),
        sockets: Arc::new(InpodSocketFactory::new(netns(), Some(MARK), true)),
        metrics: DnsMetrics::default(),
        preferred_namespace: None,
        ipv6: true,
        network: String::new(),
    });
    let dns = SocketAddr::from((Ipv4Addr::LOCALHOST, 15053));
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    let bound = serve(handler, &[(dns, true)], &tracker, &stop)
        .await
        .unwrap();
    assert_eq!(bound, [dns]);

    // A mesh name, answered locally; another, forwarded from the pod with the mark.
    let m = ask_udp(&pod, dns, &query("web.", RecordType::A, false))
        .await
        .expect("an answer");
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), ["10.96.0.10"]);
    let m = ask_udp(&pod, dns, &query("known.example.", RecordType::A, false))
        .await
        .expect("an answer");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), ["192.0.2.1"]);
    let m = ask_tcp(&pod, dns, &query("known.example.", RecordType::A, false)).await;
    assert_eq!(addrs(&m), ["192.0.2.1"]);
    let m = ask_tcp(&pod, dns, &query("other.example.", RecordType::A, false)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // A namespace-scoped service: answered in its namespace, forwarded from any other.
    let m = ask_udp(&pod, dns, &query("mine.", RecordType::A, false))
        .await
        .expect("an answer");
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), ["10.96.0.11"]);
    let m = ask_udp(&pod, dns, &query("theirs.ns2.", RecordType::A, false))
        .await
        .expect("an answer");
    assert!(!m.metadata.authoritative);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
