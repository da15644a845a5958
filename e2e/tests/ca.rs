//! The built-in CA (`node-agent ca`) against the Kubernetes API double: real
//! TokenReview authentication with TokenRequest-minted (pod-bound) tokens, node
//! authorization from the API's pods, issuance through the gRPC API with
//! ztunnel's Istio CA client, and every refusal with its gRPC status. The last
//! test runs the real binary (`cargo build --bins` first).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use e2e::apiserver::{ApiServer, ApiServerHandle, TokenSpec};
use e2e::dedicated_mesh::{EchoServer, connect_in, echo_checked};
use e2e::inpod_agent::{InpodAgent, pod_redirect};
use e2e::istio_ztunnel::{local_workload, write_credentials};
use e2e::netsim::{Cluster, can_create_netns};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use node_agent::ca::CaServer;
use node_agent::ca::authn::TokenReviewAuthenticator;
use node_agent::ca::authority::testing::{generate_root, write_root_dir};
use node_agent::ca::config::CaConfig;
use node_agent::ca::pods::KubePodDirectory;
use node_agent::redirect::{PodRedirect, Redirector};
use serde_json::json;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use ztunnel::identity::Identity;
use ztunnel::identity::istio_ca::{IstioCaClient, IstioCaOptions};
use ztunnel::identity::manager::{generate_csr, request_certificate};

const TD: &str = "cluster.local";

/// Namespaces, service accounts and pods: ztunnels on node-1 and node-2, `web` on
/// node-1, `db` on node-2.
fn populate(api: &ApiServerHandle) {
    for ns in ["istio-system", "app"] {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .unwrap();
    }
    for (ns, sa) in [("istio-system", "ztunnel"), ("app", "web"), ("app", "db")] {
        api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": sa, "namespace": ns}}))
            .unwrap();
    }
    for (ns, name, sa, node) in [
        ("istio-system", "ztunnel-n1", "ztunnel", "node-1"),
        ("istio-system", "ztunnel-n2", "ztunnel", "node-2"),
        ("app", "web-1", "web", "node-1"),
        ("app", "db-1", "db", "node-2"),
    ] {
        pod(api, ns, name, sa, node);
    }
}

fn pod(api: &ApiServerHandle, ns: &str, name: &str, sa: &str, node: &str) {
    api.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"serviceAccountName": sa, "nodeName": node,
            "containers": [{"name": "c", "image": "x"}]}}))
        .unwrap();
    api.merge_patch(
        "v1",
        "Pod",
        Some(ns),
        name,
        &json!({"status": {"phase": "Running"}}),
        true,
    )
    .unwrap();
}

/// A projected-style token from the TokenRequest API (bound to `pod` when given).
async fn token_request(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    pod: Option<&str>,
    audience: &str,
) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let mut spec = json!({"audiences": [audience], "expirationSeconds": 3600});
    if let Some(p) = pod {
        spec["boundObjectRef"] = json!({"apiVersion": "v1", "kind": "Pod", "name": p});
    }
    let req: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec
    }))
    .unwrap();
    let answer = api
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap();
    serde_json::to_value(&answer).unwrap()["status"]["token"]
        .as_str()
        .expect("a token")
        .to_string()
}

struct RunningCa {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_ca(api: &ApiServerHandle) -> RunningCa {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = generate_root("e2e mesh root");
    write_root_dir(dir.path(), &cert, &key);
    let mut cfg = CaConfig::from_lookup(|k| match k {
        "CA_SERVER_DNS_NAMES" => Some("127.0.0.1".into()),
        _ => None,
    })
    .unwrap();
    cfg.listen_addr = "127.0.0.1:0".parse().unwrap();
    cfg.cert_dir = dir.path().to_path_buf();
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let pods = KubePodDirectory::start(client.clone());
    tokio::time::timeout(Duration::from_secs(10), pods.wait_synced())
        .await
        .expect("pod index synced");
    let authn = Arc::new(TokenReviewAuthenticator::new(
        client,
        cfg.token_audiences.clone(),
    ));
    let server = CaServer::bind(&cfg, authn, pods).await.unwrap();
    let addr = server.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    RunningCa {
        addr,
        dir,
        _stop: tx,
    }
}

impl RunningCa {
    fn root(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("root-cert.pem")).unwrap()
    }

    /// One raw CreateCertificate call; the CSR is for `csr_id`.
    async fn call(
        &self,
        token: Option<&str>,
        csr_id: &str,
        impersonate: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        call(self.addr, &self.root(), token, csr_id, impersonate).await
    }
}

async fn call(
    addr: SocketAddr,
    root: &str,
    token: Option<&str>,
    csr_id: &str,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("127.0.0.1"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let id: Identity = csr_id.parse().unwrap();
    let (_key, csr) = generate_csr(&id).unwrap();
    let metadata = impersonate.map(prost_types_struct);
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

fn prost_types_struct(identity: &str) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
            },
        )]
        .into_iter()
        .collect(),
    }
}

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

fn ztunnel_client(ca: &RunningCa, token_path: &Path, root_path: &Path) -> IstioCaClient {
    IstioCaClient::new(IstioCaOptions {
        address: format!("https://127.0.0.1:{}", ca.addr.port()),
        roots: ztunnel::config::ControlPlaneRoots::File(root_path.to_path_buf()),
        alt_hostname: None,
        token_path: token_path.to_path_buf(),
        cluster_id: "Kubernetes".into(),
        impersonate: true,
        extra_headers: vec![],
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        mark: None,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_and_refusals_with_token_review_and_node_authorization() {
    let api = ApiServer::start().unwrap();
    populate(&api);
    let ca = start_ca(&api).await;
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let zt1 = token_request(
        &client,
        "istio-system",
        "ztunnel",
        Some("ztunnel-n1"),
        "istio-ca",
    )
    .await;
    let zt2 = token_request(
        &client,
        "istio-system",
        "ztunnel",
        Some("ztunnel-n2"),
        "istio-ca",
    )
    .await;
    let (web, db) = (id("app", "web"), id("app", "db"));

    // ztunnel's own client, token read from a file: node-1's ztunnel gets web's
    // certificate (web runs on node-1).
    let tmp = tempfile::tempdir().unwrap();
    let token_path = tmp.path().join("istio-token");
    let root_path = tmp.path().join("root-cert.pem");
    std::fs::write(&token_path, &zt1).unwrap();
    std::fs::write(&root_path, ca.root()).unwrap();
    let zt = ztunnel_client(&ca, &token_path, &root_path);
    let cert = request_certificate(&zt, &web.parse().unwrap(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(cert.identity().to_string(), web);
    assert_eq!(cert.chain_pem().last().unwrap().trim(), ca.root().trim());

    // Node authorization: db runs on node-2 only.
    let e = ca.call(Some(&zt1), &db, Some(&db)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node-1"), "{e:?}");
    ca.call(Some(&zt2), &db, Some(&db)).await.unwrap();

    // A pod created a moment ago is found (index or API fallback).
    pod(&api, "app", "db-2", "db", "node-1");
    ca.call(Some(&zt1), &db, Some(&db)).await.unwrap();

    // No token, wrong audience, expired, forged.
    let e = ca.call(None, &web, Some(&web)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let other_aud = token_request(
        &client,
        "istio-system",
        "ztunnel",
        Some("ztunnel-n1"),
        "other",
    )
    .await;
    let e = ca
        .call(Some(&other_aud), &web, Some(&web))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let expired = api.mint_token(
        &TokenSpec::expired(
            "istio-system",
            "ztunnel",
            &["istio-ca"],
            Duration::from_secs(60),
        )
        .bound_to_pod("ztunnel-n1", ""),
    );
    let e = ca.call(Some(&expired), &web, Some(&web)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let forged = format!("{}x", &zt1[..zt1.len() - 1]);
    let e = ca.call(Some(&forged), &web, Some(&web)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // CSR for another identity than the one requested.
    let e = ca.call(Some(&zt1), &db, Some(&web)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A workload's own token: its own identity only.
    let web_token = token_request(&client, "app", "web", Some("web-1"), "istio-ca").await;
    ca.call(Some(&web_token), &web, None).await.unwrap();
    let e = ca.call(Some(&web_token), &db, Some(&db)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A node-account token not bound to a pod cannot use node authorization.
    let unbound = token_request(&client, "istio-system", "ztunnel", None, "istio-ca").await;
    let e = ca.call(Some(&unbound), &web, Some(&web)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("pod-bound"), "{e:?}");

    // The caller's pod is deleted: its bound token is no longer valid.
    api.delete("v1", "Pod", Some("istio-system"), "ztunnel-n1")
        .unwrap();
    let e = ca.call(Some(&zt1), &web, Some(&web)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

/// Reads an HTTP response from `addr` `path`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agent_ca_binary_serves_readiness_metrics_and_certificates() {
    let bin = e2e::bin_path("node-agent");
    let api = ApiServer::start().unwrap();
    populate(&api);
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let certs = tmp.path().join("cacerts");
    std::fs::create_dir(&certs).unwrap();
    let (cert, key) = generate_root("binary root");
    write_root_dir(&certs, &cert, &key);
    // Ports are picked free and then bound by the child: another process may take one
    // in between, so a start that fails with "Address already in use" is retried.
    let mut started = None;
    for attempt in 0..5 {
        let (grpc, ready, metrics) = (e2e::free_port(), e2e::free_port(), e2e::free_port());
        let log_path = tmp.path().join(format!("ca-{attempt}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = tokio::process::Command::new(&bin)
            .arg("ca")
            .env_clear()
            .env("KUBECONFIG", &kubeconfig)
            .env("CA_LISTEN_ADDR", format!("127.0.0.1:{grpc}"))
            .env("CA_CERT_DIR", &certs)
            .env("CA_SERVER_DNS_NAMES", "mesh-ca,127.0.0.1")
            .env("READY_PORT", ready.to_string())
            .env("METRICS_PORT", metrics.to_string())
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "json")
            .kill_on_drop(true)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let ready_addr: SocketAddr = format!("127.0.0.1:{ready}").parse().unwrap();
        let (mut exited, mut ready_seen) = (false, false);
        for _ in 0..200 {
            if e2e::http::get(ready_addr, "/readyz")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                ready_seen = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                exited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if exited && log_text.contains("Address already in use") {
            continue;
        }
        assert!(!exited, "node-agent ca exited:\n{log_text}");
        assert!(ready_seen, "node-agent ca never became ready:\n{log_text}");
        started = Some((child, grpc, metrics, log_path));
        break;
    }
    let (mut child, grpc, metrics, log_path) =
        started.expect("node-agent ca started (ports kept colliding)");
    // LOG_FORMAT=json: Istio's Go keys (as istio-cni writes them), scope = the module.
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let lines: Vec<serde_json::Value> = log_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|v| v["scope"] == "ca"
            && v["msg"].is_string()
            && v["level"] == "info"
            && v["time"].as_str().is_some_and(|t| t.ends_with('Z'))),
        "{log_text}"
    );

    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let zt1 = token_request(
        &client,
        "istio-system",
        "ztunnel",
        Some("ztunnel-n1"),
        "istio-ca",
    )
    .await;
    let grpc_addr: SocketAddr = format!("127.0.0.1:{grpc}").parse().unwrap();
    let web = id("app", "web");
    let chain = call(grpc_addr, &cert, Some(&zt1), &web, Some(&web))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    let e = call(
        grpc_addr,
        &cert,
        Some(&zt1),
        &id("app", "db"),
        Some(&id("app", "db")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let m = e2e::http::get(format!("127.0.0.1:{metrics}").parse().unwrap(), "/metrics")
        .await
        .unwrap();
    assert!(
        m.contains("mesh_ca_requests_total{outcome=\"issued\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("mesh_ca_requests_total{outcome=\"permission_denied\"} 1"),
        "{m}"
    );

    // SIGTERM: a clean exit.
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The Istio ztunnel tests run it in this netns (admin 15000, readiness 15021, ...): one at
/// a time.
static ISTIO_IN_ROOT_NETNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Istio's own ztunnel (`e2e::istio_ztunnel`; skipped without a build) gets its workload
/// certificate from the built-in CA: its Istio CA client (token file, CA root, ClusterID)
/// against our gRPC server, TokenReview and the pod check included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_ztunnel_gets_its_certificate_from_the_built_in_ca() {
    let _root_netns_ports = ISTIO_IN_ROOT_NETNS.lock().await;
    let Some(istio) = e2e::istio_ztunnel::find_or_skip() else {
        return;
    };
    let api = ApiServer::start().unwrap();
    populate(&api);
    let ca = start_ca(&api).await;
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let token = token_request(&client, "app", "web", Some("web-1"), "istio-ca").await;
    let cwd = tempfile::tempdir().unwrap();
    let root = write_credentials(cwd.path(), &token, &ca.root());
    let config = cwd.path().join("local-config.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n{}",
            local_workload(
                "uid-web-1",
                "web-1",
                "app",
                "web",
                [10, 0, 9, 9].into(),
                "node-1"
            )
        ),
    )
    .unwrap();
    let log_path = cwd.path().join("istio-ztunnel.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // Dedicated mode without capture rules: nothing reaches its listeners; only its
    // certificate is of interest.
    let mut child = tokio::process::Command::new(&istio.binary)
        .arg("proxy")
        .current_dir(cwd.path())
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "app/web-1/web")
        .env("LOCAL_XDS_PATH", &config)
        .env("XDS_ADDRESS", "")
        .env(
            "CA_ADDRESS",
            format!("https://127.0.0.1:{}", ca.addr.port()),
        )
        .env("CA_ROOT_CA", &root)
        .env("CLUSTER_ID", "Kubernetes")
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let web = id("app", "web");
    // It fetches certificates on demand: a TLS handshake on its HBONE port makes it need
    // its own (the handshake itself fails: no client certificate).
    let mut dump = String::new();
    for attempt in 0..200 {
        if attempt % 20 == 0 {
            let _ = tokio::process::Command::new("openssl")
                .args(["s_client", "-connect", "127.0.0.1:15008", "-alpn", "h2"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await;
        }
        dump = e2e::http::get(admin, "/config_dump")
            .await
            .unwrap_or_default();
        if dump.contains(&web) && dump.contains("Available") {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "Istio's ztunnel exited:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        dump.contains(&web) && dump.contains("Available"),
        "no certificate for {web} in Istio's config dump:\n{dump}\nlog:\n{log}"
    );
    // Its certificate for web chains to our root: the dump's root PEMs (base64-encoded
    // there) are the built-in CA's root certificate.
    use base64::Engine;
    let body: serde_json::Value =
        serde_json::from_str(&dump[dump.find("\r\n\r\n").map_or(0, |i| i + 4)..])
            .expect("config dump JSON");
    let squash = |pem: &str| pem.split_whitespace().collect::<String>();
    let roots: Vec<String> = body["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["identity"] == web.as_str())
        .flat_map(|c| c["rootCerts"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(r["pem"].as_str()?)
                .ok()?;
            Some(squash(&String::from_utf8(pem).ok()?))
        })
        .collect();
    assert!(
        roots.contains(&squash(&ca.root())),
        "Istio's certificate for {web} does not chain to the built-in CA's root:\n{dump}"
    );
    child.kill().await.unwrap();
}

/// Istio's own ztunnel in shared (in-pod) mode with this project's control pieces: the node
/// agent's in-pod redirector and ZDS server hand it two pods, and it gets their
/// certificates from the built-in CA on their behalf (node authorization:
/// `ImpersonatedIdentity`, its own pod-bound ztunnel token, pods on its node), then carries
/// one pod's plain TCP to the other over HBONE with both identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_ztunnel_serves_agent_enrolled_pods_with_certificates_from_the_built_in_ca() {
    let _root_netns_ports = ISTIO_IN_ROOT_NETNS.lock().await;
    if !can_create_netns() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    let Some(istio) = e2e::istio_ztunnel::find_or_skip() else {
        return;
    };
    let api = ApiServer::start().unwrap();
    populate(&api);
    // db also runs on node-1 here, so node-1's ztunnel may ask for its identity.
    pod(&api, "app", "db-n1", "db", "node-1");
    let ca = start_ca(&api).await;
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let token = token_request(
        &client,
        "istio-system",
        "ztunnel",
        Some("ztunnel-n1"),
        "istio-ca",
    )
    .await;

    let cluster = Cluster::new("caistio", 1).unwrap();
    let node = cluster.node(1);
    let web_pod = node.add_pod("web").unwrap();
    let db_pod = node.add_pod("db").unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let root = write_credentials(cwd.path(), &token, &ca.root());
    let config = cwd.path().join("local-config.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n{}{}",
            local_workload(
                "uid-web",
                web_pod.name(),
                "app",
                "web",
                web_pod.ip(),
                "node-1"
            ),
            local_workload("uid-db", db_pod.name(), "app", "db", db_pod.ip(), "node-1")
        ),
    )
    .unwrap();
    let uds = cwd.path().join("ztunnel.sock");
    let agent = InpodAgent::start(&uds, node.netns().path(), &[]).await;

    let log_path = cwd.path().join("istio-ztunnel.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(&istio.binary)
        .arg("proxy")
        .current_dir(cwd.path())
        .env("PROXY_MODE", "shared")
        .env("INPOD_UDS", &uds)
        .env("LOCAL_XDS_PATH", &config)
        .env("XDS_ADDRESS", "")
        .env(
            "CA_ADDRESS",
            format!("https://127.0.0.1:{}", ca.addr.port()),
        )
        .env("CA_ROOT_CA", &root)
        .env("CLUSTER_ID", "Kubernetes")
        .env("NODE_NAME", "node-1")
        .env("POD_NAME", "ztunnel-n1")
        .env("POD_NAMESPACE", "istio-system")
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Ready once connected to the agent's ZDS socket and given its (empty) snapshot.
    let ready: SocketAddr = "127.0.0.1:15021".parse().unwrap();
    let mut attempts = 0;
    while !e2e::http::get(ready, "/healthz/ready")
        .await
        .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        attempts += 1;
        assert!(attempts < 200, "Istio's ztunnel not ready:\n{}", read_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let in_app = |redirect: PodRedirect| PodRedirect {
        namespace: "app".into(),
        ..redirect
    };
    agent
        .redirector
        .enrol(&in_app(pod_redirect(&web_pod, "uid-web", "web")))
        .await
        .expect("enrol web");
    agent
        .redirector
        .enrol(&in_app(pod_redirect(&db_pod, "uid-db", "db")))
        .await
        .expect("enrol db");
    let _server = EchoServer::start(db_pod.netns(), 8080, None);
    let dst = SocketAddr::from((db_pod.ip(), 8080));
    let mut delivered = false;
    for _ in 0..20 {
        let attempt = tokio::task::block_in_place(|| {
            echo_checked(connect_in(web_pod.netns(), dst)?, 256 << 10)
        });
        if attempt.is_ok() {
            delivered = true;
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "Istio's ztunnel exited:\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        delivered,
        "web could not reach db through Istio's ztunnel:\n{}",
        read_log()
    );
    let (web, db) = (id("app", "web"), id("app", "db"));
    let hbone = format!("{}:15008", db_pod.ip());
    tokio::task::block_in_place(|| {
        e2e::istio_ztunnel::assert_hbone_both_directions(read_log, &web, &db, &hbone)
    });
    agent.zds.shutdown();
    agent.redirector.cleanup_all().await.expect("clean up");
    child.kill().await.unwrap();
}
