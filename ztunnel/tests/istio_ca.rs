//! ztunnel's Istio CA client against the built-in CA (`node-agent ca`), in process.
//!
//! The CA runs with test doubles for Kubernetes (token → caller, pod → node); the
//! same server against the Kubernetes API double (TokenReview, pod lookups) is
//! covered by the e2e tests. Here: issuance and refusals through the real gRPC/TLS
//! path, fresh token per request, CA key rotation, certificate rotation in the
//! SecretManager (including the CA being down), and rotation while HBONE
//! connections are open. Addresses: 127.78.x.y.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use node_agent::ca::CaServer;
use node_agent::ca::authn::{AuthError, Authenticator, Caller};
use node_agent::ca::authority::testing::{generate_root, write_root_dir};
use node_agent::ca::config::CaConfig;
use node_agent::ca::pods::{NodeAuthError, PodDirectory};
use tokio::sync::oneshot;
use ztunnel::config::ControlPlaneRoots;
use ztunnel::identity::istio_ca::{IstioCaClient, IstioCaOptions};
use ztunnel::identity::manager::request_certificate;
use ztunnel::identity::{CertificateProvider, Identity, ProviderError, SecretManager};

const TD: &str = "cluster.local";

/// Tokens are `<ns>:<sa>:<pod>`; anything else is rejected as expired.
struct Tokens;

impl Authenticator for Tokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            match token.split(':').collect::<Vec<_>>().as_slice() {
                [ns, sa, pod] => Ok(Caller {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                    pod_name: (!pod.is_empty()).then(|| pod.to_string()),
                    pod_uid: None,
                }),
                _ => Err(AuthError::Rejected("token has expired".into())),
            }
        })
    }
}

/// (namespace, pod) → (service account, node).
struct Pods(HashMap<(String, String), (String, String)>);

impl Pods {
    fn new(pods: &[(&str, &str, &str, &str)]) -> Arc<Pods> {
        Arc::new(Pods(
            pods.iter()
                .map(|(ns, name, sa, node)| {
                    (
                        (ns.to_string(), name.to_string()),
                        (sa.to_string(), node.to_string()),
                    )
                })
                .collect(),
        ))
    }
}

impl PodDirectory for Pods {
    fn caller_node<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<String, NodeAuthError>> {
        Box::pin(async move {
            let pod = caller.pod_name.clone().unwrap_or_default();
            self.0
                .get(&(caller.namespace.clone(), pod.clone()))
                .map(|(_, node)| node.clone())
                .ok_or_else(|| NodeAuthError::Denied(format!("no pod {pod}")))
        })
    }

    fn runs_on_node<'a>(
        &'a self,
        node: &'a str,
        namespace: &'a str,
        sa: &'a str,
    ) -> BoxFuture<'a, Result<bool, NodeAuthError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .any(|((ns, _), (s, n))| ns == namespace && s == sa && n == node))
        })
    }
}

/// A running in-process CA.
struct TestCa {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestCa {
    async fn start(listen: SocketAddr, dir: Option<tempfile::TempDir>, pods: Arc<Pods>) -> TestCa {
        Self::start_named(listen, dir, pods, "127.0.0.1").await
    }

    /// [`Self::start`] with the serving certificate for `dns_names` (comma-separated).
    async fn start_named(
        listen: SocketAddr,
        dir: Option<tempfile::TempDir>,
        pods: Arc<Pods>,
        dns_names: &str,
    ) -> TestCa {
        let dir = dir.unwrap_or_else(|| {
            let d = tempfile::tempdir().unwrap();
            let (cert, key) = generate_root("test mesh root");
            write_root_dir(d.path(), &cert, &key);
            d
        });
        let mut cfg = CaConfig::from_lookup(|k| match k {
            "CA_SERVER_DNS_NAMES" => Some(dns_names.into()),
            "MAX_WORKLOAD_CERT_TTL" => Some("1h".into()),
            _ => None,
        })
        .unwrap();
        cfg.listen_addr = listen;
        cfg.cert_dir = dir.path().to_path_buf();
        cfg.reload_interval = Duration::from_millis(100);
        let server = CaServer::bind(&cfg, Arc::new(Tokens), pods).await.unwrap();
        let addr = server.local_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestCa {
            addr,
            dir,
            stop: Some(tx),
            task,
        }
    }

    fn root_path(&self) -> PathBuf {
        self.dir.path().join("root-cert.pem")
    }

    /// Stops serving (graceful: open connections are closed) and returns the CA files.
    async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("CA stops")
            .unwrap();
        self.dir
    }
}

fn node_pods() -> Arc<Pods> {
    Pods::new(&[
        ("istio-system", "zt-1", "ztunnel", "node-1"),
        ("istio-system", "zt-2", "ztunnel", "node-2"),
        ("app", "web-1", "web", "node-1"),
        ("app", "db-1", "db", "node-2"),
        ("ns-a", "a", "sa-a", "node-1"),
        ("ns-b", "b", "sa-b", "node-1"),
    ])
}

fn client(ca: &TestCa, token_file: &Path, root: &Path, impersonate: bool) -> Arc<IstioCaClient> {
    client_with(
        ca,
        token_file,
        ControlPlaneRoots::File(root.to_path_buf()),
        None,
        impersonate,
    )
}

fn client_with(
    ca: &TestCa,
    token_file: &Path,
    roots: ControlPlaneRoots,
    alt_hostname: Option<&str>,
    impersonate: bool,
) -> Arc<IstioCaClient> {
    Arc::new(
        IstioCaClient::new(IstioCaOptions {
            address: format!("https://127.0.0.1:{}", ca.addr.port()),
            roots,
            alt_hostname: alt_hostname.map(str::to_string),
            token_path: token_file.to_path_buf(),
            cluster_id: "Kubernetes".into(),
            impersonate,
            extra_headers: vec![("x-test".into(), "1".into())],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            // As in dedicated mode: the channel's socket marked 0x539 (root here; the
            // connector is the one dedicated mode uses).
            mark: nix::unistd::geteuid().is_root().then_some(1337),
        })
        .unwrap(),
    )
}

fn token_file(dir: &Path, token: &str) -> PathBuf {
    let p = dir.join("istio-token");
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

async fn wait_until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rejected_with(e: &ztunnel::identity::manager::FetchError, code: &str) -> bool {
    e.reason.contains(code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_level_issuance_and_refusals_over_grpc() {
    let ca = TestCa::start("127.0.0.1:0".parse().unwrap(), None, node_pods()).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "istio-system:ztunnel:zt-1");
    let zt = client(&ca, &token, &ca.root_path(), true);

    // web runs on node-1 (zt-1's node): granted, chain leaf → root, SAN = identity.
    let cert = request_certificate(zt.as_ref(), &id("app", "web"), Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(cert.identity(), &id("app", "web"));
    let chain = cert.chain_pem();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        chain[1].trim(),
        std::fs::read_to_string(ca.root_path()).unwrap().trim()
    );
    let life = cert.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(
        life <= Duration::from_secs(600) && life > Duration::from_secs(500),
        "{life:?}"
    );
    // The leaf verifies against the root for TLS (the data plane's own trust check).
    let roots = ztunnel::tls::TrustRoots::from_pem(
        &std::fs::read_to_string(ca.root_path()).unwrap(),
        "root",
    )
    .unwrap();
    let _ = ztunnel::tls::server_config(&cert, &roots, TD);

    // db runs on node-2 only: PermissionDenied, and it is a refusal (not "unavailable").
    let e = request_certificate(zt.as_ref(), &id("app", "db"), Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(
        rejected_with(&e, "PermissionDenied") && e.reason.contains("node-1"),
        "{e}"
    );

    // A workload token (not a node account) may only get its own identity.
    std::fs::write(&token, "app:web:web-1").unwrap();
    let own = client(&ca, &token, &ca.root_path(), false);
    request_certificate(own.as_ref(), &id("app", "web"), Duration::from_secs(60))
        .await
        .unwrap();
    let e = request_certificate(zt.as_ref(), &id("app", "db"), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        rejected_with(&e, "PermissionDenied") && e.reason.contains("own identity"),
        "{e}"
    );

    // Bad token: Unauthenticated.
    std::fs::write(&token, "garbage").unwrap();
    let e = request_certificate(zt.as_ref(), &id("app", "web"), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(rejected_with(&e, "Unauthenticated"), "{e}");

    // A CSR whose SAN is not the requested identity: InvalidArgument.
    std::fs::write(&token, "istio-system:ztunnel:zt-1").unwrap();
    let (_key, csr) = ztunnel::identity::manager::generate_csr(&id("app", "db")).unwrap();
    let e = zt
        .sign(ztunnel::identity::CertificateRequest {
            identity: id("app", "web"),
            csr_pem: csr,
            ttl: Duration::from_secs(60),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ProviderError::Rejected { reason, .. } if reason.contains("InvalidArgument")),
        "{e}"
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_root_fails_tls_and_ca_key_rotation_is_followed() {
    let ca = TestCa::start("127.0.0.1:0".parse().unwrap(), None, node_pods()).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "istio-system:ztunnel:zt-1");
    let root_copy = tmp.path().join("root-cert.pem");
    std::fs::copy(ca.root_path(), &root_copy).unwrap();
    let zt = client(&ca, &token, &root_copy, true);
    let web = id("app", "web");
    request_certificate(zt.as_ref(), &web, Duration::from_secs(60))
        .await
        .unwrap();

    // The mounted Secret changes to a new root: the CA reloads it and re-issues its
    // serving certificate. A client still trusting the old root cannot connect...
    let (new_cert, new_key) = generate_root("rotated root");
    write_root_dir(ca.dir.path(), &new_cert, &new_key);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = client(&ca, &token, &root_copy, true);
    let e = request_certificate(fresh.as_ref(), &web, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(!e.reason.contains("PermissionDenied"), "a TLS failure: {e}");
    // ...until its ROOT_CA_PATH is updated (re-read on every request).
    std::fs::write(&root_copy, &new_cert).unwrap();
    let cert = request_certificate(zt.as_ref(), &web, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        cert.chain_pem()[1].trim(),
        new_cert.trim(),
        "signed by the new root"
    );
    ca.stop().await;
}

/// `ALT_CA_HOSTNAME`: a CA reached at an address its certificate does not name (here
/// 127.0.0.1, the certificate names only `ca.mesh.test`) is refused, unless the
/// certificate is checked for the alternative name. `CA_ROOT_CA=SYSTEM`: the system's
/// trust store (rustls-native-certs, here through `SSL_CERT_FILE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternative_ca_hostname_and_system_roots() {
    let ca = TestCa::start_named(
        "127.0.0.1:0".parse().unwrap(),
        None,
        node_pods(),
        "ca.mesh.test",
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "istio-system:ztunnel:zt-1");
    let web = id("app", "web");
    let file = ControlPlaneRoots::File(ca.root_path());
    let plain = client_with(&ca, &token, file.clone(), None, true);
    let e = request_certificate(plain.as_ref(), &web, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(!e.reason.contains("PermissionDenied"), "a TLS failure: {e}");
    let alt = client_with(&ca, &token, file, Some("ca.mesh.test"), true);
    request_certificate(alt.as_ref(), &web, Duration::from_secs(60))
        .await
        .unwrap();
    // The system store: this process's SSL_CERT_FILE is the mesh root (no other test of
    // this binary reads the system store).
    // SAFETY: set before the client that reads it is built; no other thread of this
    // binary reads SSL_CERT_FILE (only CA_ROOT_CA=SYSTEM clients do, and this is the only one).
    unsafe { std::env::set_var("SSL_CERT_FILE", ca.root_path()) };
    let system = client_with(
        &ca,
        &token,
        ControlPlaneRoots::System,
        Some("ca.mesh.test"),
        true,
    );
    request_certificate(system.as_ref(), &web, Duration::from_secs(60))
        .await
        .unwrap();
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_manager_rotates_and_survives_a_ca_outage() {
    let ca = TestCa::start("127.0.0.1:0".parse().unwrap(), None, node_pods()).await;
    let addr = ca.addr;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "istio-system:ztunnel:zt-1");
    let root = tmp.path().join("root.pem");
    std::fs::copy(ca.root_path(), &root).unwrap();
    // Leaves are back-dated one minute, so with a short TTL the half-life is already
    // past: the manager renews every MIN_REFRESH (1 s).
    let ttl = Duration::from_secs(4);
    let certs = SecretManager::new(client(&ca, &token, &root, true), ttl);
    let web = id("app", "web");
    let first = certs.fetch_certificate(&web).await.unwrap();
    wait_until("a rotation", Duration::from_secs(10), || {
        certs
            .current(&web)
            .is_some_and(|c| c.serial() != first.serial())
    })
    .await;

    // CA down: renewals fail, the last certificate stays in use until it expires.
    let dir = ca.stop().await;
    let last = certs.current(&web).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(certs.current(&web).unwrap().serial(), last.serial());
    assert!(certs.fetch_certificate(&web).await.is_ok(), "still valid");
    let until_expiry = last
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(until_expiry + Duration::from_millis(300)).await;
    let e = certs.fetch_certificate(&web).await.unwrap_err();
    assert!(e.reason.contains("expired"), "{e}");
    let dump = certs.dump(&[]);
    assert!(
        dump[0].state.starts_with("Unavailable") && dump[0].state.contains("expired"),
        "{}",
        dump[0].state
    );
    assert_eq!(
        dump[0].cert_chain.len(),
        1,
        "the expired leaf is still shown"
    );

    // CA back on the same address: the backed-off manager recovers.
    let ca = TestCa::start(addr, Some(dir), node_pods()).await;
    wait_until(
        "recovery after the CA returns",
        Duration::from_secs(20),
        || {
            certs
                .current(&web)
                .is_some_and(|c| !c.is_expired(SystemTime::now()))
        },
    )
    .await;
    ca.stop().await;
}

/// Runs `f` with a mesh of two proxies whose certificates come from the built-in CA.
async fn with_ca_mesh<F, Fut>(base: &str, ttl: Duration, f: F)
where
    F: FnOnce(common::Mesh, Arc<TestCa>) -> Fut,
    Fut: Future<Output = ()>,
{
    let ca = Arc::new(TestCa::start("127.0.0.1:0".parse().unwrap(), None, node_pods()).await);
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "istio-system:ztunnel:zt-1");
    let mut mesh = common::Mesh::new(base, |c| c.secret_ttl = ttl);
    mesh.inputs.certs = SecretManager::new(client(&ca, &token, &ca.root_path(), true), ttl);
    mesh.inputs.roots = ztunnel::tls::TrustRoots::from_pem(
        &std::fs::read_to_string(ca.root_path()).unwrap(),
        "built-in CA root",
    )
    .unwrap();
    f(mesh, ca.clone()).await;
    drop(ca); // the CA and its files live until the test body is done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_open_hbone_connections_and_new_handshakes_get_the_new_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    with_ca_mesh(
        "127.78.1",
        Duration::from_secs(30),
        |mesh, _ca| async move {
            let sa = |ip, port| SocketAddr::new(ip, port);
            let _echo = common::echo_server(sa(mesh.b_ip, 8080)).await;
            let (pa, socks) = mesh.proxy("a").await;
            let (_pb, _) = mesh.proxy("b").await;
            let b_id = mesh.identity("sa-b", "ns-b");
            let a_id = mesh.identity("sa-a", "ns-a");

            // A long-lived connection through both proxies.
            let mut long = socks
                .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
                .await
                .unwrap();
            let mut buf = [0u8; 5];
            long.write_all(b"hello").await.unwrap();
            long.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello");

            // The serving certificate b presents now.
            let presented = |certs: Arc<SecretManager>| {
                let roots = mesh.inputs.roots.clone();
                let (a_id, b_id, b_ip) = (a_id.clone(), b_id.clone(), mesh.b_ip);
                async move {
                    let client_cert = certs.fetch_certificate(&a_id).await.unwrap();
                    let tcp = tokio::net::TcpStream::connect(sa(b_ip, 15008))
                        .await
                        .unwrap();
                    let cfg = ztunnel::tls::client_config(&client_cert, &roots, vec![b_id]);
                    let tls = ztunnel::hbone::tls_connect(tcp, cfg, sa(b_ip, 15008))
                        .await
                        .unwrap();
                    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                    ztunnel::identity::certificate::LeafInfo::parse(&der)
                        .unwrap()
                        .serial
                }
            };
            let before = presented(mesh.inputs.certs.clone()).await;
            assert_eq!(before, mesh.inputs.certs.current(&b_id).unwrap().serial());

            // Wait for b's certificate to rotate.
            let certs = mesh.inputs.certs.clone();
            let b = b_id.clone();
            let old = before.clone();
            wait_until(
                "b's certificate to rotate",
                Duration::from_secs(15),
                move || certs.current(&b).is_some_and(|c| c.serial() != old),
            )
            .await;

            // The established connection still carries data...
            long.write_all(b"again").await.unwrap();
            long.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"again");
            // ...and a new handshake presents the new certificate.
            let after = presented(mesh.inputs.certs.clone()).await;
            assert_ne!(after, before);
            assert_eq!(after, mesh.inputs.certs.current(&b_id).unwrap().serial());
            // New connections through the proxies work too.
            let c = socks
                .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
                .await
                .unwrap();
            let data = Arc::new(b"after rotation".repeat(100));
            assert_eq!(
                common::echo_roundtrip(c, data.clone()).await.unwrap(),
                *data
            );
        },
    )
    .await;
}

/// A root rotation as Istio runs it, with ztunnel's trust bundle followed from its
/// `ROOT_CA_PATH` file (as `app` does): the bundle gains the new root, the CA switches to it
/// and certificates rotate, the old root leaves the bundle. No proxy restarts; an open
/// connection survives all of it; new connections work at every step; a peer still holding
/// an old-root certificate is refused at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_through_the_trust_bundle_file_needs_no_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::start("127.0.0.1:0".parse().unwrap(), None, node_pods()).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "istio-system:ztunnel:zt-1");
    let old_root = std::fs::read_to_string(ca.root_path()).unwrap();
    let bundle = tmp.path().join("root-cert.pem");
    std::fs::write(&bundle, &old_root).unwrap();
    let ttl = Duration::from_secs(4);
    let mut mesh = common::Mesh::new("127.78.2", |c| c.secret_ttl = ttl);
    mesh.inputs.certs = SecretManager::new(client(&ca, &token, &bundle, true), ttl);
    let (roots, _watch) = ztunnel::tls::roots::watch_file(&bundle, "ROOT_CA_PATH test").unwrap();
    mesh.inputs.roots = roots.clone();

    let sa = |ip, port| SocketAddr::new(ip, port);
    let _echo = common::echo_server(sa(mesh.b_ip, 8080)).await;
    let (pa, socks) = mesh.proxy("a").await;
    let (_pb, _) = mesh.proxy("b").await;
    let (a_id, b_id) = (mesh.identity("sa-a", "ns-a"), mesh.identity("sa-b", "ns-b"));
    let new_connection_works = |step: &'static str| {
        let socks = socks.clone();
        let (a_ip, b_ip, outbound) = (mesh.a_ip, mesh.b_ip, pa.addresses().outbound);
        async move {
            let c = socks
                .redirected_connect(a_ip, outbound, sa(b_ip, 8080))
                .await
                .unwrap_or_else(|e| panic!("{step}: connect: {e}"));
            let data = Arc::new(step.as_bytes().repeat(50));
            let back = common::echo_roundtrip(c, data.clone()).await;
            assert_eq!(back.ok().as_ref(), Some(&*data), "{step}: round trip");
        }
    };
    let mut long = socks
        .redirected_connect(mesh.a_ip, pa.addresses().outbound, sa(mesh.b_ip, 8080))
        .await
        .unwrap();
    let mut long_echo = async |what: &[u8; 5]| {
        let mut buf = [0u8; 5];
        long.write_all(what).await.unwrap();
        long.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, what, "the long-lived connection");
    };
    long_echo(b"first").await;
    let a_old_cert = mesh.inputs.certs.fetch_certificate(&a_id).await.unwrap();

    // 1. The bundle gains the new root.
    let (new_root, new_key) = generate_root("rotated mesh root");
    std::fs::write(&bundle, format!("{old_root}{new_root}")).unwrap();
    wait_until("the bundle to be reloaded", Duration::from_secs(10), || {
        roots.len() == 2
    })
    .await;
    new_connection_works("old and new roots trusted").await;

    // 2. The CA signs with the new root; both workloads' certificates rotate to it.
    write_root_dir(ca.dir.path(), &new_root, &new_key);
    let signed_by_new = |id: &Identity| {
        mesh.inputs.certs.current(id).is_some_and(|c| {
            c.chain_pem()
                .get(1)
                .is_some_and(|r| r.trim() == new_root.trim())
        })
    };
    wait_until(
        "a's and b's certificates from the new root",
        Duration::from_secs(30),
        || signed_by_new(&a_id) && signed_by_new(&b_id),
    )
    .await;
    new_connection_works("certificates from the new root").await;
    long_echo(b"again").await;
    // Without the reload this would have failed: the old root alone refuses b's certificate.
    let a_cert = mesh.inputs.certs.fetch_certificate(&a_id).await.unwrap();
    let old_only = ztunnel::tls::TrustRoots::from_pem(&old_root, "old root").unwrap();
    let hbone = sa(mesh.b_ip, 15008);
    let tcp = tokio::net::TcpStream::connect(hbone).await.unwrap();
    let cfg = ztunnel::tls::client_config(&a_cert, &old_only, vec![b_id.clone()]);
    assert!(
        ztunnel::hbone::tls_connect(tcp, cfg, hbone).await.is_err(),
        "a client trusting only the old root accepted b's new certificate"
    );

    // 3. The old root leaves the bundle.
    std::fs::write(&bundle, &new_root).unwrap();
    wait_until("the old root to leave", Duration::from_secs(10), || {
        roots.len() == 1
    })
    .await;
    new_connection_works("new root only").await;
    long_echo(b"third").await;
    // A peer presenting a certificate from the old root is refused by b now.
    let refused = mesh.refused("tls_handshake");
    let tcp = tokio::net::TcpStream::connect(hbone).await.unwrap();
    let cfg = ztunnel::tls::client_config(&a_old_cert, &roots, vec![b_id.clone()]);
    if let Ok(mut tls) = ztunnel::hbone::tls_connect(tcp, cfg, hbone).await {
        // TLS 1.3: the server judges the client certificate after the client's handshake
        // is done; its refusal arrives as an alert on the first read.
        let mut byte = [0u8; 1];
        assert!(
            !matches!(tls.read(&mut byte).await, Ok(n) if n > 0),
            "b sent data to a client certificate from the removed root"
        );
    }
    wait_until(
        "b to count the refused handshake",
        Duration::from_secs(5),
        || mesh.refused("tls_handshake") > refused,
    )
    .await;
    ca.stop().await;
}
