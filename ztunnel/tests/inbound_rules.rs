//! Inbound acceptance rules compared with upstream's ztunnel, through the real proxy (the
//! `common` loopback harness): refusals are access-logged like upstream's early denials,
//! and a waypoint "sandwich" target is looked up on demand before it is validated. Each
//! test uses its own 127.79.2x.0/24 addresses.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use http::{Method, Request, StatusCode};
use tokio::io::AsyncReadExt;
use ztunnel::identity::Identity;
use ztunnel::state::Store;
use ztunnel::state::file::{FileDefaults, parse};
use ztunnel::state::on_demand::{OnDemand, address_key};

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// A request with `method` for `uri` straight to B's 15008, as `id` from `src_ip`: its
/// status, or `None` when the connection or the stream was refused. A CONNECT leaves its
/// stream open, as a tunnel's; any other request ends it with its headers.
async fn hbone_status(
    mesh: &Mesh,
    src_ip: IpAddr,
    id: &Identity,
    method: Method,
    uri: &str,
) -> Option<StatusCode> {
    hbone_response(mesh, src_ip, id, method, uri)
        .await
        .map(|r| r.status())
}

/// [`hbone_status`] with the whole response.
async fn hbone_response(
    mesh: &Mesh,
    src_ip: IpAddr,
    id: &Identity,
    method: Method,
    uri: &str,
) -> Option<http::Response<h2::RecvStream>> {
    let mut send = mesh.h2_to_b(src_ip, id).await?;
    let end_of_stream = method != Method::CONNECT;
    let req = Request::builder().method(method).uri(uri).body(()).unwrap();
    let (resp, _) = send.send_request(req, end_of_stream).ok()?;
    resp.await.ok()
}

/// An HBONE connection or stream refused before it had a destination workload is an
/// access-log line ("connection failed", target `access`, with the reason), as upstream's
/// early denials, not only a line of ztunnel's own log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_refusals_are_access_logged() {
    let mesh = Mesh::new("127.79.24", |_| {});
    let (_pb, _) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");
    for authority in [
        "http://127.79.24.2:8080/",
        "example.com:8080",
        "127.79.24.1:8080",
        "127.79.24.2:15006",
    ] {
        let method = if authority.starts_with("http") {
            Method::GET
        } else {
            Method::CONNECT
        };
        let status = hbone_status(&mesh, mesh.a_ip, &a, method, authority).await;
        assert!(status.is_some_and(|s| s != StatusCode::OK), "{authority}");
    }
    // Another workload's certificate from a's address.
    let impostor = mesh.identity("sa-evil", "ns-a");
    assert_eq!(
        hbone_status(
            &mesh,
            mesh.a_ip,
            &impostor,
            Method::CONNECT,
            "127.79.24.2:8080"
        )
        .await,
        None
    );
    for reason in [
        "GET",
        "example.com:8080",
        "target 127.79.24.1:8080 is not the address this connection reached",
        "target 127.79.24.2:15006 is a proxy port",
        "sa-evil is not the identity of the workload at the source address",
    ] {
        let needles = [
            "connection failed",
            "direction=\"inbound\"",
            "src.addr=127.79.24.1:",
            "dst.addr=127.79.24.2:15008",
            reason,
        ];
        wait_for(&format!("access-log line {needles:?}"), || {
            !log_lines(&needles).is_empty()
        })
        .await;
    }
}

/// A plaintext connection refused before it had a destination workload (here: a proxy
/// port as original destination) is an access-log line, as upstream's early denials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_refusals_are_access_logged() {
    let mesh = Mesh::new("127.79.20", |_| {});
    let (pb, sockets_b) = mesh.proxy("b").await;
    let mut c = sockets_b
        .redirected_connect(
            mesh.plain_ip,
            pb.addresses().inbound_plain,
            sa(mesh.b_ip, 15008),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    wait_for("the refusal access-logged", || {
        !log_lines(&[
            "connection failed",
            "direction=\"inbound\"",
            "src.addr=127.79.20.3:",
            "dst.addr=127.79.20.2:15008",
            "target 127.79.20.2:15008 is a proxy port",
        ])
        .is_empty()
    })
    .await;
}

/// istiod's part for `XDS_ON_DEMAND`: answers every demand on `mesh`'s store, calling
/// `answer` with the store first when the demand is for `wanted`; ends (returning every key
/// asked) once `wanted` was asked for.
fn fake_istiod(
    mesh: &Mesh,
    wanted: String,
    answer: impl FnOnce(&Store) + Send + 'static,
) -> tokio::task::JoinHandle<Vec<String>> {
    let (demander, mut demands) = OnDemand::channel(Duration::from_secs(2));
    mesh.store.set_on_demand(demander);
    let store = mesh.store.clone();
    tokio::spawn(async move {
        let mut answer = Some(answer);
        let mut asked = Vec::new();
        while let Some(d) = demands.recv().await {
            asked.push(d.key.clone());
            if d.key == wanted
                && let Some(answer) = answer.take()
            {
                answer(&store);
            }
            let _ = d.answered.send(());
            if asked.contains(&wanted) {
                return asked;
            }
        }
        asked
    })
}

/// B is the waypoint of a service its ztunnel has not met yet (`XDS_ON_DEMAND`): a CONNECT
/// for the service's `VIP:port` is validated after asking for the VIP, as upstream does,
/// instead of being refused (400) as a target B is not the waypoint of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_sandwich_target_is_looked_up_on_demand() {
    let mesh = Mesh::new("127.79.21", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (_pb, _) = mesh.proxy("b").await;
    let vip: IpAddr = "127.79.21.101".parse().unwrap();
    // istiod's part: answers the VIP with a service whose waypoint is B.
    let istiod = fake_istiod(&mesh, address_key("", vip), |store| {
        let yaml = r#"
services:
- name: sandwiched
  namespace: ns-b
  hostname: sandwiched.ns-b.svc.cluster.local
  vips: ["/127.79.21.101"]
  ports: {80: 8080}
  waypoint: {destination: "/127.79.21.2", hboneMtlsPort: 15008}
"#;
        let defaults = FileDefaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        };
        let lc = parse(yaml, std::path::Path::new("od.yaml"), &defaults).unwrap();
        store
            .source("on-demand")
            .replace_all(lc.workloads, lc.services, lc.policies);
    });
    let a = mesh.identity("sa-a", "ns-a");
    assert_eq!(
        hbone_status(
            &mesh,
            mesh.a_ip,
            &a,
            Method::CONNECT,
            &format!("{vip}:8080")
        )
        .await,
        Some(StatusCode::OK)
    );
    let asked = tokio::time::timeout(Duration::from_secs(5), istiod)
        .await
        .expect("istiod asked")
        .unwrap();
    assert!(asked.contains(&address_key("", vip)), "{asked:?}");
    // An address istiod knows nothing about is still refused as before.
    assert_eq!(
        hbone_status(&mesh, mesh.a_ip, &a, Method::CONNECT, "127.79.21.102:8080").await,
        Some(StatusCode::BAD_REQUEST)
    );
}

/// A connection that reaches an in-pod proxy before the state knows its workload (istiod's
/// push still on its way) waits for it, as upstream (up to 5 s), instead of being refused
/// at once: HBONE gets its 200, plaintext its echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_wait_for_the_served_workload_to_be_known() {
    let mesh = Mesh::new("127.79.23", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let snap = mesh.store.snapshot();
    let b = (**snap.workload_by_uid("b").unwrap()).clone();
    drop(snap);
    mesh.store.source("file").remove_workload("b");
    let (pb, sockets_b) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");
    let store = mesh.store.clone();
    let push = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        store.source("file").upsert_workload(b);
    });
    let started = std::time::Instant::now();
    let plain = async {
        let data = std::sync::Arc::new(b"early plaintext".repeat(10));
        let c = sockets_b
            .redirected_connect(
                mesh.plain_ip,
                pb.addresses().inbound_plain,
                sa(mesh.b_ip, 8080),
            )
            .await
            .unwrap();
        matches!(echo_roundtrip(c, data.clone()).await, Ok(back) if back == *data)
    };
    let target = format!("{}:8080", mesh.b_ip);
    let hbone = hbone_status(&mesh, mesh.a_ip, &a, Method::CONNECT, &target);
    let (status, echoed) = tokio::join!(hbone, plain);
    assert_eq!(status, Some(StatusCode::OK));
    assert!(
        echoed,
        "plaintext connection refused before the workload was known"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    push.await.unwrap();
}

/// `istio_tcp_sockets_open{reporter="destination"}` counts accepted sockets, as upstream:
/// three client connections pooled into one HBONE connection are one socket at the
/// destination (three at the source), while `istio_tcp_connections_opened_total` counts
/// each stream. One runtime thread: the pool keeps connections per data-plane thread.
#[tokio::test(flavor = "current_thread")]
async fn destination_sockets_count_hbone_connections_not_streams() {
    use tokio::io::AsyncWriteExt;
    let mesh = Mesh::new("127.79.25", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let outbound = pa.addresses().outbound;
    let mut open = Vec::new();
    for i in 0..3u8 {
        let mut c = socks
            .redirected_connect(mesh.a_ip, outbound, sa(mesh.b_ip, 8080))
            .await
            .unwrap();
        c.write_all(&[i; 100]).await.unwrap();
        let mut back = [0u8; 100];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [i; 100]);
        open.push(c);
    }
    let opened = |reporter: &str| {
        mesh.metric(
            "istio_tcp_connections_opened_total",
            &[&format!("reporter=\"{reporter}\"")],
        )
    };
    wait_for("three streams opened at the destination", || {
        opened("destination") == 3
    })
    .await;
    let sockets = |reporter: &str| {
        mesh.metric(
            "istio_tcp_sockets_open",
            &[&format!("reporter=\"{reporter}\"")],
        )
    };
    assert_eq!(sockets("source"), 3, "{}", mesh.metrics_text());
    assert_eq!(sockets("destination"), 1, "{}", mesh.metrics_text());
    drop(open);
    pa.drain(Duration::from_millis(300)).await;
    wait_for("no socket open after the pool is gone", || {
        mesh.metric("istio_tcp_sockets_open", &[]) == 0
    })
    .await;
}

/// `ENABLE_RESPONSE_BAGGAGE` (on by default, as upstream): the 200 to a CONNECT carries
/// the destination workload's `baggage`; off, it carries none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_responses_carry_the_destinations_baggage() {
    for (base, enabled) in [("127.79.26", true), ("127.79.27", false)] {
        let mesh = Mesh::new(base, |c| c.enable_response_baggage = enabled);
        let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
        let (_pb, _) = mesh.proxy("b").await;
        let a = mesh.identity("sa-a", "ns-a");
        let target = format!("{}:8080", mesh.b_ip);
        let resp = hbone_response(&mesh, mesh.a_ip, &a, Method::CONNECT, &target)
            .await
            .expect("a response");
        assert_eq!(resp.status(), StatusCode::OK);
        let baggage = resp
            .headers()
            .get("baggage")
            .map(|v| v.to_str().unwrap().to_string());
        match enabled {
            true => {
                let b = baggage.expect("baggage on the 200");
                assert!(b.contains("k8s.namespace.name=ns-b"), "{b}");
            }
            false => assert_eq!(baggage, None),
        }
    }
}

/// `NETWORK`: a served workload the state does not know yet is asked for on this node's
/// network (`net1/<ip>`, the name istiod indexes it under), as upstream; asked as `/<ip>`
/// it would never be answered in a cluster with named networks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_asks_on_the_configured_network() {
    let mesh = Mesh::new("127.79.28", |c| c.network = "net1".into());
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let snap = mesh.store.snapshot();
    let mut b = (**snap.workload_by_uid("b").unwrap()).clone();
    drop(snap);
    b.network = "net1".into();
    mesh.store.source("file").remove_workload("b");
    let (_pb, _) = mesh.proxy("b").await;
    let istiod = fake_istiod(&mesh, address_key("net1", mesh.b_ip), move |store| {
        store.source("file").upsert_workload(b)
    });
    let a = mesh.identity("sa-a", "ns-a");
    let target = format!("{}:8080", mesh.b_ip);
    assert_eq!(
        hbone_status(&mesh, mesh.a_ip, &a, Method::CONNECT, &target).await,
        Some(StatusCode::OK)
    );
    let asked = tokio::time::timeout(Duration::from_secs(5), istiod)
        .await
        .expect("istiod asked")
        .unwrap();
    assert!(
        asked.contains(&address_key("net1", mesh.b_ip))
            && !asked.contains(&address_key("", mesh.b_ip)),
        "{asked:?}"
    );
}

/// Double HBONE, the destination side (as upstream): the network's east-west gateway relays
/// a remote network's client without terminating its mTLS, so the connection comes from the
/// gateway's address with the client's own certificate, and the CONNECT names the service
/// by `hostname:port`. B serves it on the service's target port; the gateway's address may
/// present no other identity once B stops naming it as its network gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn east_west_gateway_relays_hostname_targets() {
    let mesh = Mesh::new("127.79.29", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let gw_ip: IpAddr = "127.79.29.9".parse().unwrap();
    let with_gateway = |named: bool| {
        let gw = if named {
            "  networkGateway: {destination: \"/127.79.29.9\"}\n"
        } else {
            ""
        };
        let yaml = format!(
            "workloads:\n\
             - {{uid: ew, name: ew, namespace: istio-system, serviceAccount: istio-eastwestgateway,\n   \
             workloadIps: [\"127.79.29.9\"], protocol: TCP, services: {{}}}}\n\
             - uid: b\n  name: b\n  namespace: ns-b\n  serviceAccount: sa-b\n  \
             workloadIps: [\"127.79.29.2\"]\n  protocol: HBONE\n  node: n1\n  \
             services: {{\"ns-b/b.ns-b.svc.cluster.local\": {{80: 8080}}}}\n{gw}"
        );
        let lc = local_config(&yaml, "gateway.yaml");
        for w in lc.workloads {
            mesh.store.source("file").upsert_workload(w);
        }
    };
    with_gateway(true);
    let (_pb, _) = mesh.proxy("b").await;
    let remote = mesh.identity("sa-remote", "ns-far");

    let mut send = mesh.h2_to_b(gw_ip, &remote).await.expect("relayed mTLS");
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("b.ns-b.svc.cluster.local:80")
        .body(())
        .unwrap();
    let (resp, mut out) = send.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    out.send_data(bytes::Bytes::from_static(b"west"), false)
        .unwrap();
    let mut body = resp.into_body();
    let echoed = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .expect("echo")
        .unwrap()
        .unwrap();
    assert_eq!(&echoed[..], b"west");
    wait_for(
        "the access line names the remote identity and the service",
        || {
            !log_lines(&[
                "spiffe://cluster.local/ns/ns-far/sa/sa-remote",
                "b.ns-b.svc.cluster.local",
                "direction=\"inbound\"",
            ])
            .is_empty()
        },
    )
    .await;

    // A hostname B serves no service of: 503; another workload's address may still present
    // only its own identity.
    for (src, authority, status) in [
        (
            gw_ip,
            "nope.ns-b.svc.cluster.local:80",
            Some(StatusCode::SERVICE_UNAVAILABLE),
        ),
        (mesh.a_ip, "b.ns-b.svc.cluster.local:80", None),
    ] {
        assert_eq!(
            hbone_status(&mesh, src, &remote, Method::CONNECT, authority).await,
            status,
            "{src} {authority}"
        );
    }
    // No longer named as the network's gateway: an ordinary workload again.
    with_gateway(false);
    assert_eq!(
        hbone_status(
            &mesh,
            gw_ip,
            &remote,
            Method::CONNECT,
            "b.ns-b.svc.cluster.local:80"
        )
        .await,
        None
    );
}
