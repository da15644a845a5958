//! The DNS proxy end to end (root): a pod with its dedicated ztunnel (the real binary) and
//! the in-pod capture rules with DNS capture (UDP/TCP port 53 → 15053, ztunnel's marked
//! sockets exempt), and a "cluster DNS" stub in another pod that answers every A query
//! with 192.0.2.53 (not authoritative), records who asked, and never answers names under
//! `blackhole.example.org`.
//!
//! - Mesh Services and ServiceEntries (short names, FQDNs, headless) are answered by
//!   ztunnel itself: authoritative, their VIPs (or endpoint addresses), never reaching
//!   the stub; over UDP and over TCP.
//! - Other names and record types are relayed to the stub from inside the pod (the stub
//!   sees the pod's address: the marked query was not captured again) and its answer
//!   comes back; an upstream that does not answer gives SERVFAIL.
//! - `istio_dns_*` metrics count it all.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use e2e::dedicated_mesh::{DedicatedMesh, MeshPod, workload_entry};
use e2e::dns_probe::{self, a_records, read_framed, write_framed};
use e2e::netsim::{NamedNetns, can_create_netns};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

const STUB_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

/// A query the stub received: transport, source address, queried name.
type Seen = (&'static str, SocketAddr, String);

/// The "cluster DNS" stand-in.
struct StubDns {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn stub_answer(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    if question.name().to_ascii().contains("blackhole.example.org") {
        return None;
    }
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(question.clone());
    if question.query_type() == RecordType::A {
        m.add_answer(Record::from_rdata(
            question.name().clone(),
            60,
            RData::A(A(STUB_ANSWER)),
        ));
    }
    m.to_vec().ok()
}

impl StubDns {
    fn start(ns: &NamedNetns) -> StubDns {
        let (udp, tcp) = ns
            .run(|| {
                let udp = UdpSocket::bind("0.0.0.0:53")?;
                let tcp = TcpListener::bind("0.0.0.0:53")?;
                std::io::Result::Ok((udp, tcp))
            })
            .expect("enter stub netns")
            .expect("bind stub DNS on port 53");
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let name_of = |q: &[u8]| {
            Message::from_vec(q)
                .ok()
                .and_then(|m| m.queries.first().map(|q| q.name().to_ascii()))
                .unwrap_or_default()
        };
        let udp_thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, src)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    seen.lock().unwrap().push(("udp", src, name_of(&buf[..n])));
                    if let Some(a) = stub_answer(&buf[..n]) {
                        let _ = udp.send_to(&a, src);
                    }
                }
            })
        };
        let tcp_thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, src)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let Ok(q) = read_framed(&mut s) else { continue };
                    seen.lock().unwrap().push(("tcp", src, name_of(&q)));
                    if let Some(a) = stub_answer(&q) {
                        let _ = write_framed(&mut s, &a);
                    }
                }
            })
        };
        StubDns {
            seen,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    fn seen(&self, name: &str) -> Vec<(&'static str, SocketAddr)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, n)| n.trim_end_matches('.') == name)
            .map(|(t, s, _)| (*t, *s))
            .collect()
    }
}

impl Drop for StubDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn udp_query(pod: &MeshPod, server: Ipv4Addr, name: &str, rtype: RecordType) -> Message {
    dns_probe::udp_query(pod.netns(), SocketAddr::from((server, 53)), name, rtype)
}

fn tcp_query(pod: &MeshPod, server: Ipv4Addr, name: &str, rtype: RecordType) -> Message {
    dns_probe::tcp_query(pod.netns(), SocketAddr::from((server, 53)), name, rtype)
}

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn dns_proxy_answers_mesh_names_and_forwards_the_rest() {
    if !can_create_netns() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    let mut m = DedicatedMesh::new("dns").expect("mesh");
    m.add_pod("client", "ns1", "sa").expect("client pod");
    m.add_pod("kube-dns", "kube-system", "coredns")
        .expect("dns pod");
    let dns_ip = m.pod("kube-dns").ip();
    let stub = StubDns::start(m.pod("kube-dns").netns());
    let resolv = m.cluster().scope().dir().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "nameserver {dns_ip}\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\n\
             options ndots:5 timeout:1\n"
        ),
    )
    .unwrap();
    let client_ip = m.pod("client").ip();
    m.write_config(&format!(
        "workloads:\n{}services:\n\
         - name: web\n  namespace: ns1\n  hostname: web.ns1.svc.cluster.local\n  \
           vips: [\"/10.96.7.7\"]\n  ports: {{80: 8080}}\n\
         - name: db\n  namespace: ns1\n  hostname: db.ns1.svc.cluster.local\n  \
           ports: {{5432: 5432}}\n\
         - name: api\n  namespace: ns2\n  hostname: api.example.com\n  \
           vips: [\"/240.240.0.1\"]\n  ports: {{443: 443}}\n",
        workload_entry(
            m.pod("client"),
            "HBONE",
            "{\"ns1/db.ns1.svc.cluster.local\": {5432: 5432}}",
            ""
        )
    ));
    m.capture_dns(&resolv);
    m.start_ztunnel("client");
    let client = m.pod("client");

    // Mesh names: ztunnel's own authoritative answers, over UDP and TCP.
    for name in ["web", "web.ns1", "web.ns1.svc.cluster.local"] {
        let a = udp_query(client, dns_ip, name, RecordType::A);
        assert_eq!(
            a.metadata.response_code,
            ResponseCode::NoError,
            "{name}: {a:?}"
        );
        assert!(a.metadata.authoritative, "{name}: {a:?}");
        assert_eq!(
            a_records(&a),
            [Ipv4Addr::new(10, 96, 7, 7)],
            "{name}: {a:?}"
        );
    }
    let a = tcp_query(client, dns_ip, "api.example.com", RecordType::A);
    assert!(a.metadata.authoritative, "{a:?}");
    assert_eq!(a_records(&a), [Ipv4Addr::new(240, 240, 0, 1)], "{a:?}");
    // Headless: the endpoints' addresses.
    let a = udp_query(client, dns_ip, "db.ns1.svc.cluster.local", RecordType::A);
    assert_eq!(a_records(&a), [client_ip], "{a:?}");
    // A known name without IPv6 addresses: NOERROR, no records (not NXDOMAIN).
    let a = udp_query(
        client,
        dns_ip,
        "web.ns1.svc.cluster.local",
        RecordType::AAAA,
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NoError, "{a:?}");
    assert!(a.answers.is_empty(), "{a:?}");
    for name in [
        "web",
        "web.ns1",
        "web.ns1.svc.cluster.local",
        "api.example.com",
        "db.ns1.svc.cluster.local",
    ] {
        assert!(
            stub.seen(name).is_empty(),
            "mesh name {name} reached the upstream"
        );
    }

    // Everything else goes upstream from the pod's own address, and comes back.
    let a = udp_query(client, dns_ip, "www.example.org", RecordType::A);
    assert!(!a.metadata.authoritative, "{a:?}");
    assert_eq!(a_records(&a), [STUB_ANSWER], "{a:?}");
    let seen = stub.seen("www.example.org");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "udp");
    assert_eq!(seen[0].1.ip(), client_ip, "forwarded from inside the pod");
    let a = udp_query(
        client,
        dns_ip,
        "_http._tcp.web.ns1.svc.cluster.local",
        RecordType::SRV,
    );
    assert_eq!(a.metadata.response_code, ResponseCode::NoError, "{a:?}");
    assert_eq!(stub.seen("_http._tcp.web.ns1.svc.cluster.local").len(), 1);
    let a = tcp_query(client, dns_ip, "tcp.example.org", RecordType::A);
    assert_eq!(a_records(&a), [STUB_ANSWER], "{a:?}");
    let seen = stub.seen("tcp.example.org");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].0, seen[0].1.ip()), ("tcp", client_ip.into()));

    // An upstream that never answers: SERVFAIL after its timeout.
    let a = udp_query(client, dns_ip, "x.blackhole.example.org", RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::ServFail, "{a:?}");

    let metrics = client.metrics();
    let udp_a = ["request_query_type=\"a\"", "request_protocol=\"udp\""];
    assert!(
        metric(&metrics, "istio_dns_requests_total", &udp_a) >= 6.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "istio_dns_upstream_requests_total", &udp_a),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "istio_dns_upstream_failures_total", &udp_a),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "istio_dns_upstream_requests_total",
            &["request_protocol=\"tcp\""]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "istio_dns_requests_total",
            &["request_query_type=\"srv\""]
        ),
        1.0,
        "{metrics}"
    );
    drop(stub);
    m.shutdown();
}
