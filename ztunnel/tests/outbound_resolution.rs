//! Outbound decisions taken when a connection arrives: service endpoints known only by
//! hostname (ServiceEntry `resolution: DNS`) resolved on demand, and connections refused
//! before any upstream connect (logged, not counted as TCP connections, as upstream).
//! Each test uses its own 127.77.x.0/24 addresses.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::state::file::{FileDefaults, parse};

/// Adds the workloads and services of `yaml` (local-config form) to the mesh.
fn add(mesh: &Mesh, yaml: &str) {
    let defaults = FileDefaults {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    };
    let lc = parse(yaml, std::path::Path::new("extra.yaml"), &defaults).unwrap();
    let src = mesh.store.source("file");
    for w in lc.workloads {
        src.upsert_workload(w);
    }
    for s in lc.services {
        src.upsert_service(s);
    }
}

/// A ServiceEntry-like service `ext.example.com` at VIP `<base>.200:80` whose only
/// endpoint is known by `hostname`, plaintext, target port `port`.
fn add_dns_service(mesh: &Mesh, hostname: &str, port: u16) {
    let base = &mesh.base;
    add(
        mesh,
        &format!(
            r#"
workloads:
- {{uid: ext-ep, name: ext-ep, namespace: ns-b, hostname: "{hostname}", protocol: TCP,
   services: {{"ns-b/ext.example.com": {{80: {port}}}}}}}
services:
- {{name: ext, namespace: ns-b, hostname: ext.example.com, vips: ["/{base}.200"],
   ports: {{80: {port}}}}}
"#
        ),
    );
}

/// Whether the proxy closes `c` (EOF or reset) within 5 s without sending anything.
async fn refused(mut c: TcpStream) -> bool {
    let _ = c.write_all(b"ping").await;
    let mut buf = [0u8; 8];
    match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// The endpoint's hostname (`localhost`) is resolved when the client connects, the
/// original destination's family (IPv4) picked, and the connection goes in plaintext to
/// `127.0.0.1:targetPort`; `istio_on_demand_dns_total` counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostname_endpoint_is_resolved_when_connecting() {
    let mesh = Mesh::new("127.77.40", |_| {});
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let local = s.local_addr().unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
        local
    });
    add_dns_service(&mesh, "localhost", port);
    let (pa, socks) = mesh.proxy("a").await;
    let c = socks
        .redirected_connect(
            mesh.a_ip,
            pa.addresses().outbound,
            "127.77.40.200:80".parse().unwrap(),
        )
        .await
        .unwrap();
    let data = Arc::new(b"through a resolved name".repeat(100));
    assert_eq!(echo_roundtrip(c, data.clone()).await.unwrap(), *data);
    let reached = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the upstream saw the connection")
        .unwrap();
    assert_eq!(reached, SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(pa.pool_connections().is_empty(), "plaintext, no HBONE");

    let dst = format!("dst.addr=127.0.0.1:{port}");
    wait_for("the access log", || {
        !log_lines(&["connection complete", "src.addr=127.77.40.1:", &dst]).is_empty()
    })
    .await;
    let line = &log_lines(&["connection complete", "src.addr=127.77.40.1:", &dst])[0];
    assert!(line.contains("dst.service=\"ext.example.com\""), "{line}");
    assert!(!line.contains("error="), "{line}");
    assert_eq!(
        mesh.metric(
            "istio_on_demand_dns_total{",
            &[
                "hostname=\"localhost\"",
                "source_workload=\"a\"",
                "source_workload_namespace=\"ns-a\"",
                "source_principal=\"spiffe://cluster.local/ns/ns-a/sa/sa-a\"",
                "source_cluster=\"Kubernetes\"",
            ]
        ),
        1,
        "{}",
        mesh.metrics_text()
    );
}

/// A hostname that does not resolve refuses the connection: the access log names the
/// hostname and the service, the lookup is counted, no TCP connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_hostname_refuses_the_connection() {
    let mesh = Mesh::new("127.77.41", |_| {});
    add_dns_service(&mesh, "nonexistent.invalid", 9000);
    let (pa, socks) = mesh.proxy("a").await;
    let c = socks
        .redirected_connect(
            mesh.a_ip,
            pa.addresses().outbound,
            "127.77.41.200:80".parse().unwrap(),
        )
        .await
        .unwrap();
    assert!(refused(c).await, "the connection is closed");
    let needles = [
        "connection failed",
        "src.addr=127.77.41.1:",
        "direction=\"outbound\"",
        "error=",
        "on-demand DNS lookup of nonexistent.invalid",
        "service ns-b/ext.example.com",
    ];
    wait_for("the refusal in the access log", || {
        !log_lines(&needles).is_empty()
    })
    .await;
    assert_eq!(
        mesh.metric(
            "istio_on_demand_dns_total{",
            &["hostname=\"nonexistent.invalid\"", "source_workload=\"a\""]
        ),
        1,
        "{}",
        mesh.metrics_text()
    );
    assert_eq!(mesh.refused("upstream_unavailable"), 1);
    assert_eq!(mesh.metric("istio_tcp_connections_opened_total{", &[]), 0);
}

/// Refused before any upstream connect (a service without endpoints, a port the service
/// does not have): as upstream, an access-log warning with `error=`, nothing in
/// `istio_tcp_connections_{opened,closed,failed}_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refusals_are_logged_not_counted_as_connections() {
    let mesh = Mesh::new("127.77.42", |_| {});
    add(
        &mesh,
        r#"
services:
- {name: empty, namespace: ns-b, hostname: empty.ns-b.svc.cluster.local,
   vips: ["/127.77.42.201"], ports: {80: 8080}}
"#,
    );
    let (pa, socks) = mesh.proxy("a").await;
    for (dst, why) in [
        ("127.77.42.201:80", "has no healthy endpoint"),
        ("127.77.42.100:81", "has no port 81"),
    ] {
        let c = socks
            .redirected_connect(mesh.a_ip, pa.addresses().outbound, dst.parse().unwrap())
            .await
            .unwrap();
        assert!(refused(c).await, "{dst}: the connection is closed");
        let dst_addr = format!("dst.addr={dst}");
        let needles = [
            "WARN",
            "connection failed",
            "src.addr=127.77.42.1:",
            &dst_addr,
            "direction=\"outbound\"",
            why,
        ];
        wait_for("the refusal in the access log", || {
            !log_lines(&needles).is_empty()
        })
        .await;
    }
    assert_eq!(mesh.refused("upstream_unavailable"), 2);
    for family in [
        "istio_tcp_connections_opened_total{",
        "istio_tcp_connections_closed_total{",
        "istio_tcp_connections_failed_total{",
    ] {
        assert_eq!(mesh.metric(family, &[]), 0, "{}", mesh.metrics_text());
    }
    assert!(
        log_lines(&["connection complete", "src.addr=127.77.42.1:"]).is_empty(),
        "no connection line for refused connections"
    );
}

/// A service owning a whole range (a CIDR VIP, upstream's `cidrVips`): a connection to any
/// address in it goes, over HBONE, to the service's endpoint on its target port, as one
/// to a host VIP would; an address outside it is not the service's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_a_cidr_vip_reaches_the_services_endpoint() {
    let mesh = Mesh::new("127.77.60", |_| {});
    let _echo = echo_server(SocketAddr::new(mesh.b_ip, 8080)).await;
    add(
        &mesh,
        r#"
workloads:
- uid: b
  name: b
  namespace: ns-b
  serviceAccount: sa-b
  trustDomain: cluster.local
  workloadIps: ["127.77.60.2"]
  protocol: HBONE
  node: n1
  services: {"ns-b/b.ns-b.svc.cluster.local": {80: 8080}, "ns-b/range.example.com": {80: 8080}}
services:
- {name: range, namespace: ns-b, hostname: range.example.com, ports: {80: 8080},
   cidrVips: [{network: "", cidr: 127.77.60.128/25}]}
"#,
    );
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let data = Arc::new(b"into the range".repeat(100));
    for dst in ["127.77.60.130:80", "127.77.60.254:80"] {
        let c = socks
            .redirected_connect(mesh.a_ip, pa.addresses().outbound, dst.parse().unwrap())
            .await
            .unwrap();
        assert_eq!(
            echo_roundtrip(c, data.clone()).await.unwrap(),
            *data,
            "{dst}"
        );
    }
    let needles = [
        "connection complete",
        "direction=\"outbound\"",
        "src.addr=127.77.60.1:",
        "dst.service=\"range.example.com\"",
        "dst.hbone_addr=127.77.60.2:8080",
    ];
    wait_for("both connections in the access log", || {
        log_lines(&needles).len() >= 2
    })
    .await;
    assert!(
        log_lines(&needles)[0].contains("dst.identity=spiffe://cluster.local/ns/ns-b/sa/sa-b"),
        "{:?}",
        log_lines(&needles)
    );
    assert!(!pa.pool_connections().is_empty(), "over pooled HBONE");
    // Outside the range (and no workload there): plaintext to the address itself, which
    // nothing serves.
    let c = socks
        .redirected_connect(
            mesh.a_ip,
            pa.addresses().outbound,
            "127.77.60.99:80".parse().unwrap(),
        )
        .await
        .unwrap();
    assert!(refused(c).await);
}
