//! L4 authorization through the real proxy: in-process proxies on loopback
//! (the `common` harness), HBONE clients with chosen identities, and
//! plaintext clients on the inbound plaintext port. Each test uses its own
//! 127.79.x.0/24 addresses.
//!
//! Denied HBONE gets 401; denied plaintext is reset; both are counted
//! (`reason="policy_denied"`) and access-logged with the policy key.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::*;
use http::{Method, Request, StatusCode};
use ztunnel::identity::Identity;
use ztunnel::policy::Authorization;
use ztunnel::policy::kube::{AuthorizationPolicy, ConvertOptions, convert, selector_matches};

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Replaces the policies of the test's own state source.
fn set_policies(mesh: &Mesh, yaml: &str) {
    let pols: Vec<Authorization> = serde_yaml_ng::from_str(yaml).expect(yaml);
    mesh.store
        .source("policy-test")
        .replace_all(vec![], vec![], pols);
}

/// HBONE CONNECT to `b:port` straight to B's 15008, as `id` from `src_ip`;
/// the response status.
async fn hbone_status(mesh: &Mesh, src_ip: IpAddr, id: &Identity, port: u16) -> StatusCode {
    let mut send = mesh
        .h2_to_b(src_ip, id)
        .await
        .expect("mTLS and HTTP/2 to B");
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{}:{port}", mesh.b_ip))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, false).unwrap();
    resp.await.unwrap().status()
}

/// Through A's proxy (outbound → HBONE → B's inbound) to `b:port`: whether
/// the echo comes back.
async fn via_proxy_a(
    mesh: &Mesh,
    pa: &ztunnel::proxy::ProxyHandle,
    sockets: &LoopbackSockets,
    port: u16,
) -> bool {
    let data = Arc::new(b"policy check".repeat(100));
    let c = sockets
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, port))
        .await
        .unwrap();
    matches!(echo_roundtrip(c, data.clone()).await, Ok(back) if back == *data)
}

/// Plaintext from the TCP-only workload `plain` into B's inbound plaintext
/// port, for `b:port`: whether the echo comes back.
async fn plaintext(
    mesh: &Mesh,
    pb: &ztunnel::proxy::ProxyHandle,
    sockets_b: &LoopbackSockets,
    port: u16,
) -> bool {
    let data = Arc::new(b"plaintext check".repeat(100));
    let c = sockets_b
        .redirected_connect(
            mesh.plain_ip,
            pb.addresses().inbound_plain,
            sa(mesh.b_ip, port),
        )
        .await;
    // A reset can arrive before the connect completes on our side.
    let c = match c {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return false,
        Err(e) => panic!("plaintext connect to {}:{port}: {e}", mesh.b_ip),
    };
    matches!(echo_roundtrip(c, data.clone()).await, Ok(back) if back == *data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_from_namespace_lets_it_in_and_keeps_others_out() {
    let mesh = Mesh::new("127.79.1", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, sockets_a) = mesh.proxy("a").await;
    let (pb, sockets_b) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");
    // An identity of another namespace, from an address that is no workload.
    let stranger_ip: IpAddr = "127.79.1.9".parse().unwrap();
    let y = mesh.identity("sa-y", "ns-y");

    // No policy: everything allowed.
    assert_eq!(
        hbone_status(&mesh, stranger_ip, &y, 8080).await,
        StatusCode::OK
    );
    assert!(plaintext(&mesh, &pb, &sockets_b, 8080).await);
    // The probe streams above must be gone: a stream still open when the policy below
    // arrives is closed by it, and counted as a denial.
    wait_for("B's probe streams closed", || {
        pb.connections().iter().all(|c| c.kind != "hbone_stream")
    })
    .await;

    set_policies(
        &mesh,
        r#"
- name: allow-ns-a
  namespace: ns-b
  scope: Namespace
  action: Allow
  rules: [[[{namespaces: [!Exact ns-a]}]]]
"#,
    );
    let denied_before = mesh.refused("policy_denied");
    assert_eq!(
        hbone_status(&mesh, mesh.a_ip, &a, 8080).await,
        StatusCode::OK
    );
    assert!(via_proxy_a(&mesh, &pa, &sockets_a, 8080).await);
    assert_eq!(
        hbone_status(&mesh, stranger_ip, &y, 8080).await,
        StatusCode::UNAUTHORIZED
    );
    // Plaintext has no identity: a namespace match fails for it.
    assert!(!plaintext(&mesh, &pb, &sockets_b, 8080).await);
    wait_for("two denials counted", || {
        mesh.refused("policy_denied") == denied_before + 2
    })
    .await;
    wait_for("denials access-logged with the policy", || {
        log_lines(&[
            "denied by policy ns-b/allow-ns-a",
            "no ALLOW policy matched",
        ])
        .len()
            >= 2
    })
    .await;

    // Another namespace's ALLOW policy does not apply to B.
    set_policies(
        &mesh,
        "[{name: allow-nothing, namespace: ns-a, scope: Namespace, action: Allow}]",
    );
    assert_eq!(
        hbone_status(&mesh, stranger_ip, &y, 8080).await,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_on_port_blocks_only_that_port_and_dry_run_is_not_enforced() {
    let mesh = Mesh::new("127.79.2", |_| {});
    let _echo1 = echo_server(sa(mesh.b_ip, 8080)).await;
    let _echo2 = echo_server(sa(mesh.b_ip, 8081)).await;
    let (pa, sockets_a) = mesh.proxy("a").await;
    let (pb, sockets_b) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");

    set_policies(
        &mesh,
        r#"
- name: deny-8081
  namespace: istio-system
  scope: Global
  action: Deny
  rules: [[[{destinationPorts: [8081]}]]]
- name: dry-deny-everything
  namespace: ns-b
  scope: Namespace
  action: Deny
  dryRun: true
  rules: [[]]
"#,
    );
    let denied_before = mesh.refused("policy_denied");
    assert_eq!(
        hbone_status(&mesh, mesh.a_ip, &a, 8080).await,
        StatusCode::OK
    );
    assert_eq!(
        hbone_status(&mesh, mesh.a_ip, &a, 8081).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(via_proxy_a(&mesh, &pa, &sockets_a, 8080).await);
    assert!(!via_proxy_a(&mesh, &pa, &sockets_a, 8081).await);
    assert!(plaintext(&mesh, &pb, &sockets_b, 8080).await);
    assert!(!plaintext(&mesh, &pb, &sockets_b, 8081).await);
    wait_for("three denials counted", || {
        mesh.refused("policy_denied") == denied_before + 3
    })
    .await;
    wait_for("denial access-logged with the policy", || {
        !log_lines(&[
            "denied by policy istio-system/deny-8081",
            "DENY policy matched",
        ])
        .is_empty()
    })
    .await;
    // The dry-run DENY matched every connection and was only logged.
    assert!(
        !log_lines(&[
            "dry-run authorization policy",
            "policy=ns-b/dry-deny-everything",
            "would_be=\"deny\"",
            "dst.ip=127.79.2.2",
        ])
        .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principal_wildcard_from_a_kubernetes_policy_bound_by_selector() {
    let mesh = Mesh::new("127.79.3", |_| {});
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (pb, sockets_b) = mesh.proxy("b").await;
    let a = mesh.identity("sa-a", "ns-a");
    let stranger_ip: IpAddr = "127.79.3.9".parse().unwrap();
    let same_sa_elsewhere = mesh.identity("sa-a", "ns-y");
    let other_sa = mesh.identity("sa-y", "ns-a");

    let object: AuthorizationPolicy = serde_yaml_ng::from_str(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sa-a, namespace: ns-b}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["*/sa/sa-a"]}}]
"#,
    )
    .unwrap();
    let opts = ConvertOptions::default();
    let converted = convert(&object, &opts).unwrap();
    assert!(converted.warnings.is_empty(), "{:?}", converted.warnings);
    let labels: BTreeMap<String, String> = [("app".to_owned(), "b".to_owned())].into();
    assert!(selector_matches(&object, &opts, "ns-b", &labels));
    mesh.store.source("policy-test").replace_all(
        vec![],
        vec![],
        vec![converted.authorization.unwrap()],
    );

    // Not bound yet: the selector policy does not apply to B.
    assert_eq!(
        hbone_status(&mesh, stranger_ip, &other_sa, 8080).await,
        StatusCode::OK
    );

    // Bind it to B (what the Kubernetes source does for matching workloads).
    let mut b = (**mesh.store.snapshot().workload_by_uid("b").unwrap()).clone();
    b.authorization_policies = vec!["ns-b/only-sa-a".into()];
    mesh.store.source("file").upsert_workload(b);

    assert_eq!(
        hbone_status(&mesh, mesh.a_ip, &a, 8080).await,
        StatusCode::OK
    );
    assert_eq!(
        hbone_status(&mesh, stranger_ip, &same_sa_elsewhere, 8080).await,
        StatusCode::OK
    );
    assert_eq!(
        hbone_status(&mesh, stranger_ip, &other_sa, 8080).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(!plaintext(&mesh, &pb, &sockets_b, 8080).await);
    wait_for("denial access-logged with the policy", || {
        !log_lines(&["denied by policy ns-b/only-sa-a", "127.79.3.9"]).is_empty()
    })
    .await;
}

/// Writes a short message and reads the echo back within a second: whether the
/// connection still carries data.
async fn echoes(c: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let msg = b"still there?";
    if c.write_all(msg).await.is_err() {
        return false;
    }
    let mut back = [0u8; 12];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(1), c.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == msg
    )
}

/// Resolves once the peer has closed `c` (EOF or reset); panics after `secs`.
async fn closed_within(c: &mut tokio::net::TcpStream, secs: u64, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let deadline = std::time::Duration::from_secs(secs);
    let closed = tokio::time::timeout(deadline, async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: still open {secs} s after the DENY");
}

/// A DENY added while connections are open closes the ones it matches (HBONE through
/// A's proxy and plaintext into B's), counted and access-logged as denials naming the
/// policy; a connection on another port stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_deny_closes_open_connections_it_matches() {
    let mesh = Mesh::new("127.79.4", |_| {});
    let _echo1 = echo_server(sa(mesh.b_ip, 8080)).await;
    let _echo2 = echo_server(sa(mesh.b_ip, 8081)).await;
    let (pa, sockets_a) = mesh.proxy("a").await;
    let (pb, sockets_b) = mesh.proxy("b").await;
    let through_a = |port| {
        sockets_a.redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, port))
    };
    let mut hbone_8080 = through_a(8080).await.unwrap();
    let mut hbone_8081 = through_a(8081).await.unwrap();
    let mut plain_8080 = sockets_b
        .redirected_connect(
            mesh.plain_ip,
            pb.addresses().inbound_plain,
            sa(mesh.b_ip, 8080),
        )
        .await
        .unwrap();
    for c in [&mut hbone_8080, &mut hbone_8081, &mut plain_8080] {
        assert!(echoes(c).await);
    }
    let denied_before = mesh.refused("policy_denied");

    // An unrelated change (a workload update, no policy) closes nothing.
    let a = (**mesh.store.snapshot().workload_by_uid("a").unwrap()).clone();
    mesh.store.source("file").upsert_workload(a);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(echoes(&mut hbone_8080).await);

    set_policies(
        &mesh,
        r#"
- name: deny-8080
  namespace: ns-b
  scope: Namespace
  action: Deny
  rules: [[[{destinationPorts: [8080]}]]]
"#,
    );
    closed_within(&mut hbone_8080, 5, "HBONE connection to b:8080").await;
    closed_within(&mut plain_8080, 5, "plaintext connection to b:8080").await;
    assert!(echoes(&mut hbone_8081).await, "b:8081 is not denied");
    wait_for("both revocations counted as denials", || {
        mesh.refused("policy_denied") == denied_before + 2
    })
    .await;
    wait_for("revocations access-logged with the policy", || {
        log_lines(&[
            "connection complete",
            "127.79.4.",
            "connection closed after a policy change: denied by policy ns-b/deny-8080",
        ])
        .len()
            >= 2
    })
    .await;
    // What B still carries: the stream to 8081 (and the HBONE connections from A).
    wait_for("the revoked connections gone from B", || {
        let open = pb.connections();
        let carried: Vec<_> = open.iter().filter(|c| c.kind != "hbone").collect();
        carried.len() == 1 && carried[0].hbone_target == Some(sa(mesh.b_ip, 8081).into())
    })
    .await;
    // New connections to 8080 are refused as before.
    assert!(!via_proxy_a(&mesh, &pa, &sockets_a, 8080).await);
}

/// A node proxy without original source (TPROXY mode) connects from its own address, not
/// the client's: policies cannot see the client's address, so source-IP conditions fail
/// closed (a DENY on the client's address still denies; before, it was checked against
/// the proxy's address and let the client in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_conditions_fail_closed_behind_a_node_proxy() {
    let mesh = Mesh::new("127.79.5", |cfg| {
        cfg.trusted_node_accounts = vec!["istio-system/ztunnel".parse().unwrap()];
    });
    let _echo = echo_server(sa(mesh.b_ip, 8080)).await;
    let (_pb, _) = mesh.proxy("b").await;
    // The node proxy of a's node, as a workload of the mesh.
    let zt_ip: IpAddr = "127.79.5.9".parse().unwrap();
    let zt: ztunnel::state::Workload = serde_yaml_ng::from_str(
        "uid: zt\nname: ztunnel-n1\nnamespace: istio-system\nserviceAccount: ztunnel\n\
         trustDomain: cluster.local\nworkloadIps: [\"127.79.5.9\"]\nprotocol: TCP\nnode: n1\n",
    )
    .unwrap();
    mesh.store.source("node-proxy").upsert_workload(zt);
    let a = mesh.identity("sa-a", "ns-a");
    // Acting for a (same node): accepted without policies.
    assert_eq!(hbone_status(&mesh, zt_ip, &a, 8080).await, StatusCode::OK);
    set_policies(
        &mesh,
        &format!(
            "- {{name: no-a, namespace: ns-b, scope: Namespace, action: Deny,\n   \
             rules: [[[{{sourceIps: [\"{}/32\"]}}]]]}}\n",
            mesh.a_ip
        ),
    );
    assert_eq!(
        hbone_status(&mesh, zt_ip, &a, 8080).await,
        StatusCode::UNAUTHORIZED
    );
}
