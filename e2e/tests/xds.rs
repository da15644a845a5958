//! ztunnel's xDS client (`XDS_ADDRESS`) against the istiod double
//! (`e2e::xds_server`), the way a user runs it: the real ztunnel binary, TLS to the
//! double with a certificate from a test root, the projected-token file, node
//! metadata from the environment. Workloads, services and policies pushed by
//! "istiod" appear in `/config_dump` and gate readiness; changes and removals
//! follow; a malformed resource is NACKed by name without holding back the rest; a
//! dropped stream reconnects and resumes; a wrong token is refused and logged.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::local_ztunnel::LocalZtunnel;
use e2e::xds_server::{ADDRESS_TYPE, AUTHORIZATION_TYPE, XdsHandle, XdsServer};
use mesh_proto::security as sec;
use mesh_proto::workload as wl;

const TOKEN: &str = "istio-token-for-ztunnel";

/// Istio's ztunnel binds fixed ports (15000, 15001, ...): its tests take turns.
static ISTIO_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The istiod double with TLS (a certificate for 127.0.0.1 from a fresh root), the
/// token [`TOKEN`] required, serving workload `web-1` at `web_ip`, the `web` service and
/// the DENY policy; the root's certificate (PEM) for the clients.
fn istiod(web_ip: [u8; 4]) -> (XdsHandle, String) {
    let (xds, root) = istiod_named(web_ip, "127.0.0.1");
    xds.set_service(service());
    xds.set_authorization(deny_policy());
    (xds, root)
}

/// The istiod double (TLS certificate for `name` only, token required) serving workload
/// `web-1` at `web_ip`; the root's certificate (PEM).
fn istiod_named(web_ip: [u8; 4], name: &str) -> (XdsHandle, String) {
    let (root, root_key) = node_agent::ca::authority::testing::generate_root("istiod root");
    let (cert, key) = e2e::xds_server::serving_cert(&root, &root_key, &[name.into()])
        .expect("istiod serving certificate");
    let xds = XdsServer::new()
        .tls(cert, key)
        .require_token(TOKEN)
        .start("127.0.0.1:0".parse().unwrap())
        .unwrap();
    xds.set_workload(workload("web-1", web_ip));
    (xds, root)
}

fn workload(name: &str, ip: [u8; 4]) -> wl::Workload {
    wl::Workload {
        uid: format!("Kubernetes//v1/Pod/app/{name}"),
        name: name.into(),
        namespace: "app".into(),
        addresses: vec![ip.to_vec()],
        service_account: format!("sa-{name}"),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        node: "node-1".into(),
        workload_name: name.into(),
        canonical_name: name.into(),
        services: [(
            "app/web.app.svc.cluster.local".to_string(),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn service() -> wl::Service {
    wl::Service {
        name: "web".into(),
        namespace: "app".into(),
        hostname: "web.app.svc.cluster.local".into(),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 5, 1],
            length: None,
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn deny_policy() -> sec::Authorization {
    e2e::xds_server::deny_principal("app", "deny-from-legacy", "cluster.local/ns/legacy/sa/old")
}

/// The ztunnel binary with `XDS_ADDRESS` pointing at `xds`, its token file holding
/// `token`, istiod's root in `ROOT_CA_PATH`, and pod facts for its node metadata.
fn start_ztunnel(xds: &XdsHandle, istiod_root: &str, token: &str) -> LocalZtunnel {
    start_ztunnel_with(xds, istiod_root, token, &[])
}

/// [`start_ztunnel`] with `extra` variables.
fn start_ztunnel_with(
    xds: &XdsHandle,
    istiod_root: &str,
    token: &str,
    extra: &[(&str, String)],
) -> LocalZtunnel {
    let dir = LocalZtunnel::scratch();
    let (root, token_file) = (
        dir.path().join("istiod-root.pem"),
        dir.path().join("istio-token"),
    );
    std::fs::write(&root, istiod_root).unwrap();
    std::fs::write(&token_file, token).unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    LocalZtunnel::spawn(
        dir,
        &[
            (
                "XDS_ADDRESS",
                format!("https://127.0.0.1:{}", xds.addr().port()),
            ),
            ("ROOT_CA_PATH", path(&root)),
            ("CA_TOKEN_PATH", path(&token_file)),
            ("POD_NAME", "ztunnel-x1".into()),
            ("POD_NAMESPACE", "istio-system".into()),
            ("INSTANCE_IP", "10.0.0.9".into()),
            ("NODE_NAME", "node-1".into()),
            ("ISTIO_META_CLUSTER_ID", "east".into()),
            ("XDS_HEADER_X_TENANT", "blue".into()),
        ]
        .into_iter()
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>(),
    )
}

/// Istio's ztunnel (dedicated mode, its built-in test CA) against `xds`, with the same
/// pod facts as [`start_ztunnel`] plus `extra`; its log is `<dir>/istio-ztunnel.log`.
fn spawn_istio(
    istio: &e2e::istio_ztunnel::IstioZtunnel,
    xds: &XdsHandle,
    root: &str,
    dir: &std::path::Path,
    extra: &[(&str, String)],
) -> tokio::process::Child {
    let root_path = e2e::istio_ztunnel::write_credentials(dir, TOKEN, root);
    let log = std::fs::File::create(dir.join("istio-ztunnel.log")).unwrap();
    tokio::process::Command::new(&istio.binary)
        .arg("proxy")
        .current_dir(dir)
        .env_clear()
        .env("FAKE_CA", "true")
        .env("CA_ADDRESS", "")
        .env(
            "XDS_ADDRESS",
            format!("https://127.0.0.1:{}", xds.addr().port()),
        )
        .env("XDS_ROOT_CA", &root_path)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "app/web-1/sa-web-1")
        .env("POD_NAME", "ztunnel-x1")
        .env("POD_NAMESPACE", "istio-system")
        .env("INSTANCE_IP", "10.0.0.9")
        .env("NODE_NAME", "node-1")
        .env("ISTIO_META_CLUSTER_ID", "east")
        .env("RUST_LOG", "info")
        .envs(extra.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_follows_istiod_over_delta_xds() {
    let (xds, root) = istiod([10, 244, 5, 1]);
    let mut zt = start_ztunnel(&xds, &root, TOKEN);
    zt.dump_until("istiod's workload, service and policy", |d| {
        d.contains("Kubernetes//v1/Pod/app/web-1")
            && d.contains("10.244.5.1")
            && d.contains("web.app.svc.cluster.local")
            && d.contains("10.96.5.1")
            && d.contains("deny-from-legacy")
    })
    .await;
    for t in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        xds.wait_acked(t, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{t}: {e}\n{}", zt.log()));
    }
    // What istiod sees of this ztunnel.
    let node = xds.nodes().into_iter().next().expect("a stream");
    assert_eq!(
        node.id,
        "ztunnel~10.0.0.9~ztunnel-x1.istio-system~istio-system.svc.cluster.local"
    );
    assert_eq!(node.token.as_deref(), Some(TOKEN));
    assert_eq!(node.cluster_id.as_deref(), Some("east"));
    for (k, v) in [
        ("NAME", "ztunnel-x1"),
        ("NAMESPACE", "istio-system"),
        ("NODE_NAME", "node-1"),
        ("INSTANCE_IPS", "10.0.0.9"),
        ("CLUSTER_ID", "east"),
    ] {
        assert_eq!(node.metadata[k], v, "metadata {k}: {}", node.metadata);
    }
    // Synced: readiness no longer waits for xDS (it still waits for the in-pod
    // snapshot, there is no node agent here).
    let start = Instant::now();
    loop {
        let r = zt.readiness().await;
        assert!(!r.starts_with("HTTP/1.1 200"), "{r}");
        if !r.contains("xDS synced") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A malformed resource is NACKed by name; a valid one in the same push is applied.
    xds.push_raw(
        ADDRESS_TYPE,
        mesh_proto::xds::Resource {
            name: "Kubernetes//v1/Pod/app/broken".into(),
            resource: Some(prost_types::Any {
                type_url: ADDRESS_TYPE.into(),
                value: vec![0xff, 0xff, 0xff],
            }),
            ..Default::default()
        },
    );
    xds.set_workload(workload("web-2", [10, 244, 5, 2]));
    assert!(
        xds.wait_for(Duration::from_secs(10), |h| h.acks().iter().any(|a| a
            .error
            .as_deref()
            .is_some_and(|e| e.contains("app/broken"))))
            .await,
        "no NACK naming the broken resource: {:?}\n{}",
        xds.acks(),
        zt.log()
    );
    zt.dump_until("web-2 despite the broken resource", |d| {
        d.contains("10.244.5.2")
    })
    .await;
    xds.remove_raw(ADDRESS_TYPE, "Kubernetes//v1/Pod/app/broken");

    // Removals follow.
    xds.remove_address("Kubernetes//v1/Pod/app/web-1");
    xds.remove_authorization("app/deny-from-legacy");
    zt.dump_until("web-1 and the policy removed", |d| {
        !d.contains("10.244.5.1") && !d.contains("deny-from-legacy") && d.contains("10.244.5.2")
    })
    .await;

    // A dropped stream: ztunnel reconnects, keeps what it had, follows new changes.
    xds.close_streams();
    assert!(
        xds.wait_for(Duration::from_secs(15), |h| h.nodes().len() >= 2
            && h.connected() == 1)
            .await,
        "no reconnect: {:?}\n{}",
        xds.nodes(),
        zt.log()
    );
    xds.set_workload(workload("web-3", [10, 244, 5, 3]));
    zt.dump_until("web-3 after the reconnect, web-2 kept", |d| {
        d.contains("10.244.5.3") && d.contains("10.244.5.2") && d.contains("10.96.5.1")
    })
    .await;
    let log = zt.log();
    assert!(log.contains("xDS stream open"), "{log}");
    // Upstream's xDS metrics: responses and bytes per type, the ended stream.
    let metrics = e2e::http::get(zt.stats, "/metrics")
        .await
        .unwrap_or_default();
    let count = |name: &str, labels: &[(&str, &str)]| e2e::prom_text::sum(&metrics, name, labels);
    assert!(
        count("istio_xds_message_total", &[("url", ADDRESS_TYPE)]) >= 4.0,
        "{metrics}"
    );
    assert!(
        count("istio_xds_message_total", &[("url", AUTHORIZATION_TYPE)]) >= 2.0,
        "{metrics}"
    );
    assert!(
        count("istio_xds_message_bytes_total", &[("url", ADDRESS_TYPE)]) > 0.0,
        "{metrics}"
    );
    assert_eq!(
        count("istio_xds_connection_terminations_total", &[]),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_logged_and_keeps_ztunnel_unready() {
    let (xds, root) = istiod([10, 244, 6, 1]);
    let zt = start_ztunnel(&xds, &root, "a-stale-token");
    assert!(
        xds.wait_for(Duration::from_secs(15), |h| !h.rejected_tokens().is_empty())
            .await,
        "the double saw no stream\n{}",
        zt.log()
    );
    let start = Instant::now();
    while !zt.log().contains("Unauthenticated") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", zt.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = zt.readiness().await;
    assert!(r.contains("xDS synced"), "still waiting for xDS: {r}");
    assert_eq!(
        xds.rejected_tokens()[0].as_deref(),
        Some("a-stale-token"),
        "bearer token sent"
    );
}

/// `ALT_XDS_HOSTNAME`: istiod reached at an address its certificate does not name (here
/// 127.0.0.1; the certificate names only `istiod.istio-system.svc`) is refused, with the
/// reason logged; with the alternative name the certificate is checked for that name and
/// the workloads arrive. Its root given as `XDS_ROOT_CA` (not `ROOT_CA_PATH`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_xds_hostname_is_the_name_istiods_certificate_must_carry() {
    let (xds, root) = istiod_named([10, 244, 7, 1], "istiod.istio-system.svc");
    let dir = tempfile::tempdir().unwrap();
    let xds_root = dir.path().join("xds-root.pem");
    std::fs::write(&xds_root, &root).unwrap();
    let xds_root = xds_root.display().to_string();
    // ROOT_CA_PATH (what XDS_ROOT_CA defaults to) is another root: XDS_ROOT_CA must win.
    let (other_root, _) = node_agent::ca::authority::testing::generate_root("other root");

    let plain = start_ztunnel_with(
        &xds,
        &other_root,
        TOKEN,
        &[("XDS_ROOT_CA", xds_root.clone())],
    );
    let start = Instant::now();
    while !plain.log().contains("not valid for name") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no name mismatch logged:\n{}",
            plain.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(xds.nodes().is_empty(), "a stream despite the name mismatch");
    drop(plain);

    let mut alt = start_ztunnel_with(
        &xds,
        &other_root,
        TOKEN,
        &[
            ("XDS_ROOT_CA", xds_root),
            ("ALT_XDS_HOSTNAME", "istiod.istio-system.svc".into()),
        ],
    );
    alt.dump_until("istiod's workload through the alternative name", |d| {
        d.contains("10.244.7.1")
    })
    .await;
}

/// Istio's own ztunnel against the same double: it accepts what the double sends
/// (ACKs both types, shows the workload, service and policy in its config dump), and
/// it identifies itself to "istiod" exactly as this ztunnel does (node id, metadata
/// keys, token, cluster id) — the check that the double, and so the tests above, speak
/// istiod's protocol. Skipped without a build of Istio's ztunnel (`make istio-ztunnel`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_ztunnel_accepts_the_double_and_identifies_itself_alike() {
    let Some(istio) = e2e::istio_ztunnel::find_or_skip() else {
        return;
    };
    let _turn = ISTIO_PORTS.lock().await;
    let (xds, root) = istiod([10, 244, 7, 1]);
    // Ours first, to compare what each sends.
    let mut ours = start_ztunnel(&xds, &root, TOKEN);
    ours.dump_until("our ztunnel synced", |d| d.contains("10.244.7.1"))
        .await;

    let cwd = tempfile::tempdir().unwrap();
    let log_path = cwd.path().join("istio-ztunnel.log");
    let mut child = spawn_istio(&istio, &xds, &root, cwd.path(), &[]);
    let istio_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let start = Instant::now();
    let mut dump = None;
    while start.elapsed() < Duration::from_secs(30) {
        dump = e2e::http::get(admin, "/config_dump").await;
        if dump.as_deref().is_some_and(|d| {
            d.contains("Kubernetes//v1/Pod/app/web-1")
                && d.contains("web.app.svc.cluster.local")
                && d.contains("deny-from-legacy")
        }) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "Istio's ztunnel exited:\n{}",
            istio_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dump.as_deref().is_some_and(
            |d| d.contains("Kubernetes//v1/Pod/app/web-1") && d.contains("deny-from-legacy")
        ),
        "Istio's ztunnel did not take the double's resources: {dump:?}\n{}",
        istio_log()
    );
    // Its ACKs may trail its config dump.
    xds.wait_for(Duration::from_secs(10), |h| {
        let Some(theirs) = h.nodes().get(1).map(|n| n.stream) else {
            return false;
        };
        [ADDRESS_TYPE, AUTHORIZATION_TYPE].iter().all(|t| {
            h.acks()
                .iter()
                .any(|a| a.stream == theirs && a.type_url == *t)
        })
    })
    .await;
    let acks = xds.acks();
    let streams = xds.nodes();
    assert_eq!(streams.len(), 2, "{streams:?}");
    let (mine, theirs) = (&streams[0], &streams[1]);
    for t in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        assert!(
            acks.iter()
                .any(|a| a.stream == theirs.stream && a.type_url == t && a.error.is_none()),
            "Istio's ztunnel did not ACK {t}: {acks:?}\n{}",
            istio_log()
        );
        assert!(!acks.iter().any(|a| a.error.is_some()), "a NACK: {acks:?}");
    }
    assert_eq!(mine.id, theirs.id, "node id");
    assert_eq!(mine.token, theirs.token, "bearer token");
    assert_eq!(mine.cluster_id, theirs.cluster_id, "clusterid header");
    for k in [
        "NAME",
        "NAMESPACE",
        "NODE_NAME",
        "INSTANCE_IPS",
        "CLUSTER_ID",
    ] {
        assert_eq!(
            mine.metadata[k], theirs.metadata[k],
            "metadata {k}: ours {} / Istio's {}",
            mine.metadata, theirs.metadata
        );
    }
    child.kill().await.unwrap();
}

/// `XDS_ON_DEMAND=true` in Istio's ztunnel and ours: both start their address
/// subscription the same way (`*` subscribed and unsubscribed in one request, so
/// nothing is sent until asked), keep authorizations wildcard, ACK, and hold no
/// workload. Skipped without a build of Istio's ztunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_ztunnel_starts_on_demand_as_ours_does() {
    let Some(istio) = e2e::istio_ztunnel::find_or_skip() else {
        return;
    };
    let _turn = ISTIO_PORTS.lock().await;
    let (xds, root) = istiod([10, 244, 7, 1]);
    let on_demand = [
        ("XDS_ON_DEMAND", "true".to_string()),
        ("ISTIO_META_DNS_CAPTURE", "false".to_string()),
    ];
    let mut ours = start_ztunnel_with(&xds, &root, TOKEN, &on_demand);
    let dump = ours
        .dump_until("our ztunnel holds the policy", |d| {
            d.contains("deny-from-legacy")
        })
        .await;
    assert!(!dump.contains("10.244.7.1"), "no address pushed: {dump}");
    let cwd = tempfile::tempdir().unwrap();
    let mut child = spawn_istio(&istio, &xds, &root, cwd.path(), &on_demand);
    let acked_both = xds
        .wait_for(Duration::from_secs(30), |h| {
            let streams: Vec<u64> = h.nodes().iter().map(|n| n.stream).collect();
            streams.len() == 2
                && streams.iter().all(|s| {
                    h.acks()
                        .iter()
                        .any(|a| a.stream == *s && a.type_url == AUTHORIZATION_TYPE)
                })
        })
        .await;
    let istio_log =
        std::fs::read_to_string(cwd.path().join("istio-ztunnel.log")).unwrap_or_default();
    assert!(
        acked_both,
        "both ztunnels ACK the authorizations:\n{istio_log}"
    );
    let subs = xds.subscriptions();
    let nodes = xds.nodes();
    let first = |stream: u64, t: &str| {
        subs.iter()
            .find(|s| s.stream == stream && s.type_url == t)
            .map(|s| (s.subscribe.clone(), s.unsubscribe.clone()))
    };
    let (mine, theirs) = (nodes[0].stream, nodes[1].stream);
    let star = || (vec!["*".to_string()], vec!["*".to_string()]);
    assert_eq!(
        first(theirs, ADDRESS_TYPE),
        Some(star()),
        "Istio's: {subs:?}"
    );
    assert_eq!(
        first(mine, ADDRESS_TYPE),
        first(theirs, ADDRESS_TYPE),
        "{subs:?}"
    );
    assert_eq!(
        first(mine, AUTHORIZATION_TYPE),
        first(theirs, AUTHORIZATION_TYPE),
        "{subs:?}"
    );
    assert!(
        !xds.acks().iter().any(|a| a.error.is_some()),
        "{:?}",
        xds.acks()
    );
    let theirs_dump = e2e::http::get("127.0.0.1:15000".parse().unwrap(), "/config_dump")
        .await
        .expect("Istio's ztunnel admin /config_dump");
    assert!(
        !theirs_dump.contains("Kubernetes//v1/Pod/app/web-1"),
        "Istio's ztunnel holds no workload either: {theirs_dump}"
    );
    child.kill().await.unwrap();
}

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
    let bystander = workload("bystander", [10, 99, 0, 1]);
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
