//! Helpers for the in-process proxy tests: a CA, a state store, a loopback socket factory
//! that plays the role of nat REDIRECT, log capture and metric scraping.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use ztunnel::config::{Config, WorkloadInfo};
use ztunnel::identity::local_ca::LocalCa;
use ztunnel::identity::manager::generate_csr;
use ztunnel::identity::{Identity, SecretManager, WorkloadCertificate};
use ztunnel::proxy::{
    ListenerKind, OriginalDestination, ProxyFactory, ProxyHandle, ProxyInputs, ProxyScope,
    ProxySpec, SocketFactory,
};
use ztunnel::redirect::BoxFuture;
use ztunnel::state::Store;
use ztunnel::state::file::{FileDefaults, LocalConfig, parse};
use ztunnel::telemetry::ProxyMetrics;
use ztunnel::tls::TrustRoots;

pub fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/ca")
        .join(name)
}

pub fn ca(kind: &str) -> Arc<LocalCa> {
    Arc::new(
        LocalCa::from_files(
            &testdata(&format!("{kind}-root.pem")),
            &testdata(&format!("{kind}-root.key")),
        )
        .unwrap(),
    )
}

pub fn roots(ca: &LocalCa) -> TrustRoots {
    TrustRoots::from_der([ca.root_certificate().clone()], "test root").unwrap()
}

/// A certificate for `id` from `ca`, valid in `valid`.
pub fn leaf(
    ca: &LocalCa,
    id: &Identity,
    valid: std::ops::Range<SystemTime>,
) -> WorkloadCertificate {
    let (key, csr) = generate_csr(id).unwrap();
    let chain = ca
        .sign_csr_with_validity(&csr, id, valid.start, valid.end)
        .unwrap();
    WorkloadCertificate::from_pem(id, &key, &chain).unwrap()
}

pub fn valid_now() -> std::ops::Range<SystemTime> {
    let now = SystemTime::now();
    now - Duration::from_secs(60)..now + Duration::from_secs(3600)
}

/// Global log capture (every test of the binary shares it; tests search for their own IPs).
#[derive(Clone)]
struct LogBuf;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(b);
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = io::stderr().write_all(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let sub = tracing_subscriber::fmt()
            .with_writer(|| LogBuf)
            .with_ansi(false)
            .with_env_filter("info,access=debug")
            .finish();
        let _ = tracing::subscriber::set_global_default(sub);
    });
}

pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

/// Log lines containing every needle.
pub fn log_lines(needles: &[&str]) -> Vec<String> {
    logs()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Blocking: polls `f` until it holds; panics after `timeout` with `what` and the logs.
pub fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Polls `f` every 25 ms for up to 10 s (generous: several test binaries share two
/// CPUs under `cargo test`).
pub async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Loopback sockets: listeners in this netns, outbound connections from a fixed source IP
/// (the "pod IP"), original destinations registered by the test client (what nat REDIRECT
/// does for real).
pub struct LoopbackSockets {
    pub src_ip: IpAddr,
    redirects: Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>,
}

impl LoopbackSockets {
    pub fn new(src_ip: IpAddr) -> Arc<Self> {
        Arc::new(LoopbackSockets {
            src_ip,
            redirects: Default::default(),
        })
    }

    /// Connects to `listener` from `client_ip` as if the connection had been redirected from
    /// `orig_dst`.
    pub async fn redirected_connect(
        &self,
        client_ip: IpAddr,
        listener: SocketAddr,
        orig_dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(client_ip, 0))?;
        let local = sock.local_addr()?;
        self.redirects.lock().unwrap().insert(local, orig_dst);
        sock.connect(listener).await
    }
}

impl SocketFactory for LoopbackSockets {
    fn bind_listener(
        &self,
        addr: SocketAddr,
        _kind: ListenerKind,
    ) -> BoxFuture<'_, io::Result<TcpListener>> {
        Box::pin(async move {
            let sock = TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            sock.bind(addr)?;
            sock.listen(1024)
        })
    }

    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<tokio::net::UdpSocket>> {
        Box::pin(async move { tokio::net::UdpSocket::bind(addr).await })
    }

    fn connect(
        &self,
        dst: SocketAddr,
        _orig_src: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        let src = self.src_ip;
        Box::pin(async move {
            let sock = TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(src, 0))?;
            let s = sock.connect(dst).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    }

    fn original_destination_mode(&self) -> OriginalDestination {
        OriginalDestination::SoOriginalDst
    }

    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let peer = stream.peer_addr()?;
        self.redirects
            .lock()
            .unwrap()
            .get(&peer)
            .copied()
            .ok_or_else(|| io::Error::other(format!("no redirect registered for {peer}")))
    }

    fn describe(&self) -> String {
        format!("loopback from {}", self.src_ip)
    }
}

/// A two-workload mesh on loopback: `a` at `base.1`, `b` at `base.2` (both HBONE), plus a
/// TCP-only workload `plain` at `base.3`. `base` is e.g. `127.77.1`.
pub struct Mesh {
    pub base: String,
    pub ca: Arc<LocalCa>,
    pub store: Store,
    pub registry: Arc<Mutex<Registry>>,
    pub metrics: Arc<ProxyMetrics>,
    pub inputs: ProxyInputs,
    pub a_ip: IpAddr,
    pub b_ip: IpAddr,
    pub plain_ip: IpAddr,
}

pub fn mesh_yaml(base: &str) -> String {
    format!(
        r#"
workloads:
- uid: a
  name: a
  namespace: ns-a
  serviceAccount: sa-a
  trustDomain: cluster.local
  workloadIps: ["{base}.1"]
  protocol: HBONE
  node: n1
  services: {{}}
- uid: b
  name: b
  namespace: ns-b
  serviceAccount: sa-b
  trustDomain: cluster.local
  workloadIps: ["{base}.2"]
  protocol: HBONE
  node: n1
  services: {{"ns-b/b.ns-b.svc.cluster.local": {{80: 8080}}}}
- uid: plain
  name: plain
  namespace: ns-b
  trustDomain: cluster.local
  workloadIps: ["{base}.3"]
  protocol: TCP
  services: {{}}
services:
- name: b
  namespace: ns-b
  hostname: b.ns-b.svc.cluster.local
  vips: ["/{base}.100"]
  ports: {{80: 8080}}
"#
    )
}

/// A state file's workloads, services and policies, parsed with trust domain
/// `cluster.local` and cluster `Kubernetes`; `name` is the file name errors show.
pub fn local_config(yaml: &str, name: &str) -> LocalConfig {
    let defaults = FileDefaults {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    };
    parse(yaml, std::path::Path::new(name), &defaults).unwrap()
}

impl Mesh {
    pub fn new(base: &str, cfg_edit: impl FnOnce(&mut Config)) -> Mesh {
        init_logs();
        let ca = ca("ec");
        let store = Store::new();
        let lc = local_config(&mesh_yaml(base), "mesh.yaml");
        store
            .source("file")
            .replace_all(lc.workloads, lc.services, lc.policies);
        let mut cfg = Config {
            handshake_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            ..Config::default()
        };
        cfg_edit(&mut cfg);
        let mut registry = Registry::default();
        let metrics = Arc::new(ProxyMetrics::new(&mut registry));
        let certs = SecretManager::new(ca.clone(), cfg.secret_ttl);
        let inputs = ProxyInputs {
            cfg: Arc::new(cfg),
            state: store.clone(),
            certs,
            roots: roots(&ca),
            metrics: metrics.clone(),
        };
        Mesh {
            base: base.to_string(),
            ca,
            store,
            registry: Arc::new(Mutex::new(registry)),
            metrics,
            inputs,
            a_ip: format!("{base}.1").parse().unwrap(),
            b_ip: format!("{base}.2").parse().unwrap(),
            plain_ip: format!("{base}.3").parse().unwrap(),
        }
    }

    /// Starts the proxy of workload `name` (`a` or `b`) on its IP.
    pub async fn proxy(&self, name: &str) -> (ProxyHandle, Arc<LoopbackSockets>) {
        let (ip, info) = match name {
            "a" => (self.a_ip, "ns-a/a/sa-a"),
            "b" => (self.b_ip, "ns-b/b/sa-b"),
            _ => panic!("unknown workload {name}"),
        };
        let sockets = LoopbackSockets::new(ip);
        let handle = ProxyFactory::new(self.inputs.clone())
            .start(ProxySpec {
                scope: ProxyScope::Workload(info.parse::<WorkloadInfo>().unwrap()),
                sockets: sockets.clone(),
                bind_ip: ip,
                orig_src: false,
                dns: false,
            })
            .await
            .unwrap();
        (handle, sockets)
    }

    /// A raw TLS client to B's HBONE port (15008) from `src_ip`, presenting `cert` and
    /// trusting `trust`.
    pub async fn tls_to_b(
        &self,
        src_ip: IpAddr,
        cert: &WorkloadCertificate,
        trust: &TrustRoots,
    ) -> Result<ztunnel::hbone::ClientTls, String> {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src_ip, 0)).unwrap();
        let dst = SocketAddr::new(self.b_ip, 15008);
        let tcp = sock.connect(dst).await.unwrap();
        let cfg = ztunnel::tls::client_config(cert, trust, vec![self.identity("sa-b", "ns-b")]);
        ztunnel::hbone::tls_connect(tcp, cfg, dst)
            .await
            .map_err(|e| e.to_string())
    }

    /// An HTTP/2 client over mutual TLS straight to B's 15008, as `id` from `src_ip`,
    /// ready for a request; `None` when TLS or HTTP/2 is refused.
    pub async fn h2_to_b(
        &self,
        src_ip: IpAddr,
        id: &Identity,
    ) -> Option<h2::client::SendRequest<bytes::Bytes>> {
        let cert = leaf(&self.ca, id, valid_now());
        let tls = self.tls_to_b(src_ip, &cert, &roots(&self.ca)).await.ok()?;
        let (send, conn) = h2::client::handshake(tls).await.ok()?;
        tokio::spawn(conn);
        send.ready().await.ok()
    }

    pub fn identity(&self, sa: &str, ns: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    pub fn metrics_text(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry.lock().unwrap()).unwrap();
        s
    }

    /// Value of the first sample line starting with `prefix` and containing all `labels`.
    pub fn metric(&self, prefix: &str, labels: &[&str]) -> u64 {
        self.metrics_text()
            .lines()
            .filter(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
            .sum()
    }

    /// `istio_crl_policy_rejections_total` of `reporter` (`source` or `destination`).
    pub fn crl_rejections(&self, reporter: &str) -> u64 {
        self.metric(
            "istio_crl_policy_rejections_total",
            &[&format!("reporter=\"{reporter}\"")],
        )
    }

    /// Writes a revocation list to `path` that revokes the current certificate of each of
    /// `ids` (as the proxies hold it) and every serial in `serials`.
    pub fn revoke(&self, path: &std::path::Path, ids: &[&Identity], serials: &[&str]) {
        let current: Vec<String> = ids
            .iter()
            .map(|id| self.inputs.certs.current(id).unwrap().serial().to_string())
            .collect();
        let all: Vec<&str> = serials
            .iter()
            .copied()
            .chain(current.iter().map(String::as_str))
            .collect();
        std::fs::write(path, self.ca.revocation_list_pem(&all).unwrap()).unwrap();
    }

    pub fn refused(&self, reason: &str) -> u64 {
        self.metric(
            "ztunnel_connections_refused_total",
            &[&format!("reason=\"{reason}\"")],
        )
    }
}

/// An echo server on `addr`; returns its task.
pub async fn echo_server(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// Writes `data` on `c` and reads the same number of bytes back (the socket stays open).
pub async fn echo_open(c: &mut TcpStream, data: &[u8]) {
    c.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Writes `data` and reads the echo concurrently; returns what came back.
pub async fn echo_roundtrip(stream: TcpStream, data: Arc<Vec<u8>>) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    writer.await.unwrap()?;
    Ok(back)
}

/// The local CA, counting what it signs per identity (certificate renewal and release tests).
pub struct CountingCa {
    ca: Arc<LocalCa>,
    signed: Mutex<HashMap<String, usize>>,
}

impl CountingCa {
    pub fn new(ca: Arc<LocalCa>) -> Self {
        CountingCa {
            ca,
            signed: Mutex::new(HashMap::new()),
        }
    }

    /// Certificates signed for `id` so far.
    pub fn count(&self, id: &Identity) -> usize {
        let signed = self.signed.lock().unwrap();
        signed.get(&id.to_string()).copied().unwrap_or(0)
    }
}

impl ztunnel::identity::CertificateProvider for CountingCa {
    fn name(&self) -> &str {
        "counting-ca"
    }

    fn sign(
        &self,
        request: ztunnel::identity::CertificateRequest,
    ) -> ztunnel::identity::provider::SignFuture<'_> {
        *self
            .signed
            .lock()
            .unwrap()
            .entry(request.identity.to_string())
            .or_insert(0) += 1;
        self.ca.sign(request)
    }
}
