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
