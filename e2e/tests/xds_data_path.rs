//! The data path with the istiod double as the ztunnels' only source: two pods with
//! dedicated ztunnels (real binaries, capture rules, netns) get their workloads and
//! policies over xDS, pushed or looked up on demand (`XDS_ON_DEMAND`), and carry TCP
//! between them as HBONE. The xDS client itself is tested in `xds.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::xds_server::{XdsHandle, XdsServer};
use mesh_proto::workload as wl;

const TOKEN: &str = "istio-token-for-ztunnel";

/// Two pods with dedicated ztunnels (capture rules, real netns) whose only source is
/// the istiod double in the simulated underlay, which holds both pods' workloads plus
/// `extra`; returns the mesh (ztunnels running) and the double.
fn mesh_from_istiod(
    tag: &str,
    on_demand: bool,
    extra: &[wl::Workload],
) -> Option<(
    e2e::dedicated_mesh::DedicatedMesh,
    XdsHandle,
    tempfile::TempDir,
)> {
    use e2e::dedicated_mesh::{DedicatedMesh, Flavor};
    if !e2e::netsim::can_create_netns() {
        eprintln!("skipped: needs root to create network namespaces");
        return None;
    }
    let mut mesh = DedicatedMesh::new(tag).expect("mesh");
    mesh.add_pod("client", "app", "client").unwrap();
    mesh.add_pod("server", "app", "server").unwrap();
    let root = node_agent::ca::authority::testing::generate_root("istiod root");
    let host = mesh.cluster().host_ip();
    let listener = mesh
        .cluster()
        .bind_host_tcp(0)
        .expect("bind in the underlay");
    let port = listener.local_addr().unwrap().port();
    let (cert, key) = e2e::xds_server::serving_cert(&root.0, &root.1, &[host.to_string()]).unwrap();
    let xds = XdsServer::new()
        .tls(cert, key)
        .require_token(TOKEN)
        .start_on(listener)
        .unwrap();
    for p in mesh.pods() {
        xds.set_workload(wl::Workload {
            uid: p.uid(),
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            addresses: vec![p.ip().octets().to_vec()],
            service_account: p.service_account.clone(),
            trust_domain: "cluster.local".into(),
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            node: "node1".into(),
            ..Default::default()
        });
    }
    for w in extra {
        xds.set_workload(w.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let istiod_root = dir.path().join("istiod-root.pem");
    let token = dir.path().join("istio-token");
    std::fs::write(&istiod_root, &root.0).unwrap();
    std::fs::write(&token, TOKEN).unwrap();
    let address = format!("https://{host}:{port}");
    for name in ["client", "server"] {
        mesh.start_ztunnel_as(
            name,
            Flavor::OursFromXds {
                address: &address,
                istiod_root: &istiod_root,
                token: &token,
                on_demand,
            },
        );
    }
    Some((mesh, xds, dir))
}

/// `client` reaches the echo server in `server` on 8080 through both ztunnels.
fn reaches(mesh: &e2e::dedicated_mesh::DedicatedMesh) -> bool {
    let dst = SocketAddr::from((mesh.pod("server").ip(), 8080));
    mesh.pod("client")
        .connect(dst)
        .and_then(|s| e2e::dedicated_mesh::echo_checked(s, 64 * 1024))
        .is_ok()
}

/// Waits for both ztunnels' access lines of a client -> server connection naming both
/// identities (so it was HBONE with mTLS).
fn wait_for_mtls_access_lines(mesh: &e2e::dedicated_mesh::DedicatedMesh) {
    let (client_id, server_id) = (mesh.pod("client").identity(), mesh.pod("server").identity());
    e2e::dedicated_mesh::wait_until(
        "access lines naming both identities",
        Duration::from_secs(10),
        || {
            !mesh
                .pod("client")
                .log_lines(&["direction=\"outbound\"", &server_id, &client_id, ":15008"])
                .is_empty()
                && !mesh
                    .pod("server")
                    .log_lines(&["direction=\"inbound\"", &client_id, &server_id])
                    .is_empty()
        },
    );
}

/// The data path with istiod as the only source: two pods with dedicated ztunnels get
/// their workloads and a policy over xDS; TCP between them is carried over HBONE with
/// both identities in the access logs; a DENY policy pushed by "istiod" refuses new
/// connections, and removing it lets them through again.
#[test]
fn istiod_pushes_reach_the_data_path() {
    use e2e::dedicated_mesh::{EchoServer, wait_until};
    let Some((mesh, xds, _dir)) = mesh_from_istiod("xds", false, &[]) else {
        return;
    };
    let _echo = EchoServer::start(mesh.pod("server").netns(), 8080, None);
    assert!(reaches(&mesh), "client -> server through both ztunnels");
    wait_for_mtls_access_lines(&mesh);

    // A DENY policy from istiod: the server's ztunnel refuses the client's identity.
    xds.set_authorization(e2e::xds_server::deny_principal(
        "app",
        "deny-client",
        "cluster.local/ns/app/sa/client",
    ));
    wait_until(
        "the pushed DENY policy enforced",
        Duration::from_secs(10),
        || !reaches(&mesh),
    );
    assert!(
        mesh.pod("server").log().contains("deny-client"),
        "the refusal names the policy:\n{}",
        mesh.pod("server").log()
    );
    xds.remove_authorization("app/deny-client");
    wait_until(
        "allowed again once the policy is removed",
        Duration::from_secs(10),
        || reaches(&mesh),
    );
    mesh.shutdown();
}

/// `XDS_ON_DEMAND=true`: the ztunnels start with no addresses (ready on the
/// authorizations alone), and the data path asks istiod for what it meets: the client's
/// ztunnel for the server's IP (outbound), the server's for its own workload (inbound
/// target). The connection is HBONE with both identities, as with full pushes, while a
/// workload nobody connected to is never sent; a non-mesh address is answered as
/// absent and passes through; an address istiod does not answer about is refused.
#[test]
fn on_demand_lookups_reach_the_data_path() {
    use e2e::dedicated_mesh::EchoServer;
    let bystander = wl::Workload {
        uid: "Kubernetes//v1/Pod/app/bystander".into(),
        name: "bystander".into(),
        namespace: "app".into(),
        addresses: vec![vec![10, 99, 0, 1]],
        service_account: "sa-bystander".into(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        node: "node-1".into(),
        ..Default::default()
    };
    let Some((mut mesh, xds, _dir)) = mesh_from_istiod("xdsod", true, &[bystander]) else {
        return;
    };
    // A pod outside the mesh (no ztunnel, unknown to istiod): plaintext to the server.
    mesh.add_pod("legacy", "other", "legacy").unwrap();
    let dump = |pod: &str| mesh.pod(pod).admin("/config_dump");
    let server_uid = mesh.pod("server").uid();
    assert!(
        !dump("client").contains(&server_uid),
        "nothing pushed before a lookup:\n{}",
        dump("client")
    );
    assert!(xds.demanded().is_empty(), "{:?}", xds.demanded());

    let _echo = EchoServer::start(mesh.pod("server").netns(), 8080, None);
    // First plaintext from outside the mesh: the server's ztunnel (inbound 15006)
    // asks istiod for the workload it serves before it can admit the connection.
    let dst = SocketAddr::from((mesh.pod("server").ip(), 8080));
    let plain = mesh
        .pod("legacy")
        .connect(dst)
        .and_then(|s| e2e::dedicated_mesh::echo_checked(s, 4096));
    assert!(
        plain.is_ok(),
        "plaintext from outside the mesh: {plain:?}\n{}",
        mesh.pod("server").log()
    );
    assert!(reaches(&mesh), "client -> server through both ztunnels");
    wait_for_mtls_access_lines(&mesh);
    assert!(
        !mesh
            .pod("client")
            .log_lines(&["direction=\"outbound\"", "src.workload=\"client\""])
            .is_empty(),
        "the client's own workload, asked for by its address, names the source:\n{}",
        mesh.pod("client").log()
    );
    let server_key = format!("/{}", mesh.pod("server").ip());
    let demanded = xds.demanded();
    assert!(
        demanded.iter().filter(|n| **n == server_key).count() >= 2,
        "both ztunnels asked for {server_key}: {demanded:?}"
    );
    assert!(dump("client").contains(&server_uid));
    assert!(
        !dump("client").contains("bystander"),
        "only what was asked for is held:\n{}",
        dump("client")
    );

    // ztunnel's own xDS stream (to the underlay host) left the pod marked 0x539, not
    // through its outbound proxy (which would have asked istiod about istiod).
    let istiod_key = format!("/{}", mesh.cluster().host_ip());
    assert!(
        !xds.demanded().contains(&istiod_key),
        "the xDS connection was captured: {:?}",
        xds.demanded()
    );

    // An address istiod does not know: answered as removed, so the connection is
    // passthrough (to a listener in the underlay), not HBONE.
    let outside = mesh
        .cluster()
        .bind_host_tcp(0)
        .expect("bind in the underlay");
    let outside_addr = outside.local_addr().unwrap();
    let accept = std::thread::spawn(move || {
        let first = outside.accept().map(|(s, _)| s);
        let second = outside.accept().map(|(s, _)| s);
        (first, second)
    });
    let conn = mesh.pod("client").connect(outside_addr);
    assert!(conn.is_ok(), "passthrough to {outside_addr}: {conn:?}");
    // A second connection there: istiod already said it does not know the address
    // (and would push it if it appeared), so it is not asked again.
    let again = mesh.pod("client").connect(outside_addr);
    assert!(again.is_ok(), "passthrough again: {again:?}");
    let (first, second) = accept.join().unwrap();
    assert!(first.is_ok() && second.is_ok());
    let outside_key = format!("/{}", outside_addr.ip());
    let asked = xds.demanded().iter().filter(|n| **n == outside_key).count();
    assert_eq!(
        asked,
        1,
        "asked for {outside_key} once: {:?}",
        xds.demanded()
    );
    let lines = mesh
        .pod("client")
        .log_lines(&["on-demand request not answered in time"]);
    assert!(
        lines.is_empty(),
        "istiod's answers end the waits: {lines:?}"
    );

    // istiod silent about an address: after the wait the connection is refused, not
    // sent out of the mesh in plaintext (the address could be a mesh workload's).
    // The non-mesh pod: not asked for by the client's ztunnel yet, and listening (so
    // a passthrough would be echoed).
    let _legacy_echo = EchoServer::start(mesh.pod("legacy").netns(), 9090, None);
    let silent_key = format!("/{}", mesh.pod("legacy").ip());
    xds.withhold(&silent_key);
    let conn = mesh
        .pod("client")
        .connect(SocketAddr::from((mesh.pod("legacy").ip(), 9090)));
    let refused = match conn {
        Err(_) => true,
        Ok(mut s) => {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = s.write_all(b"ping");
            // Closed or reset by ztunnel; a read timeout would mean it hung instead.
            match s.read(&mut [0u8; 4]) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        }
    };
    assert!(
        refused,
        "a connection istiod did not answer about is closed"
    );
    assert!(
        xds.demanded().contains(&silent_key),
        "asked for {silent_key}: {:?}",
        xds.demanded()
    );
    // The access line is written when ztunnel closes the connection, which the client may
    // see first: poll for it.
    let logged = || {
        !mesh
            .pod("client")
            .log_lines(&[
                "direction=\"outbound\"",
                "istiod did not answer the on-demand lookup of",
                &silent_key,
            ])
            .is_empty()
    };
    if !logged() {
        e2e::dedicated_mesh::wait_until(
            "the access line of the refused connection",
            Duration::from_secs(10),
            logged,
        );
    }
    mesh.shutdown();
}
