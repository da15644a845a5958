//! The CA's gRPC endpoint over TLS, and the reload of `CA_CERT_DIR`.
//!
//! The serving certificate is issued by the CA itself (from `ca-cert.pem`) for
//! `CA_SERVER_DNS_NAMES`, so clients verify it with the same `root-cert.pem` they
//! trust for workloads. It sits behind a resolver that is swapped when the CA
//! files change (the mounted Secret is updated in place) or at half of its
//! lifetime; open connections are unaffected.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures::Stream;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::authority::{Authority, ServingCert, read_sources};
use super::metrics::CaMetrics;
use super::service::CaService;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The current serving certificate, read at every handshake.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ServingCertResolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(ServingCertResolver {
            current: ArcSwap::new(key),
        })
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A TLS connection handed to tonic.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: SocketAddr,
}

impl Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.inner.get_ref().0.local_addr().ok(),
            remote_addr: Some(self.peer),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// rustls server settings: TLS 1.2/1.3, ALPN `h2`, certificate from `resolver`.
pub fn tls_config(resolver: Arc<ServingCertResolver>) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

/// Accepts TCP connections, completes TLS handshakes concurrently (each with a
/// timeout) and yields the established connections.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
    let (tx, mut rx) = mpsc::channel::<TlsConn>(64);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(target: "ca", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx.send(TlsConn { inner, peer }).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(target: "ca", %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(target: "ca", %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    // The accept loop ends with the stream.
    let guard = AbortOnDrop(accept_loop);
    futures::stream::poll_fn(move |cx| {
        let _keep = &guard;
        rx.poll_recv(cx).map(|c| c.map(Ok))
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the CA API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    service: CaService,
    resolver: Arc<ServingCertResolver>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(resolver)));
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(tls_incoming(listener, acceptor), shutdown)
        .await
}

/// Keeps the authority and serving certificate current.
pub struct Reloader {
    pub dir: PathBuf,
    pub interval: Duration,
    pub dns_names: Vec<String>,
    pub authority: Arc<ArcSwap<Authority>>,
    pub resolver: Arc<ServingCertResolver>,
    pub metrics: CaMetrics,
}

impl Reloader {
    /// Runs forever: re-reads `dir` every `interval`, swaps in a changed CA when it loads
    /// (a broken update is logged and the previous CA stays), and renews the serving
    /// certificate on change or at half-life.
    pub async fn run(self, mut serving: ServingCert) {
        loop {
            tokio::time::sleep(self.interval).await;
            let current = self.authority.load_full();
            let changed = match read_sources(&self.dir) {
                Ok(bytes) => bytes != current.source(),
                Err(e) => {
                    tracing::error!(target: "ca", error = %e, "cannot read CA files; keeping the loaded CA");
                    false
                }
            };
            let mut authority = current;
            if changed {
                match Authority::load(&self.dir) {
                    Ok(a) => {
                        tracing::info!(target: "ca", dir = %self.dir.display(), "CA files changed; new CA loaded");
                        let a = Arc::new(a);
                        self.authority.store(a.clone());
                        set_expiry(&self.metrics, &a);
                        authority = a;
                    }
                    Err(e) => {
                        tracing::error!(target: "ca", error = %e, "CA files changed but do not load; keeping the previous CA");
                        continue;
                    }
                }
            }
            if changed || SystemTime::now() >= serving.refresh_at() {
                match authority.issue_serving_cert(&self.dns_names) {
                    Ok(s) => {
                        self.resolver.set(s.key.clone());
                        serving = s;
                        tracing::info!(target: "ca", "serving certificate renewed");
                    }
                    Err(e) => {
                        tracing::error!(target: "ca", error = %e, "serving certificate renewal failed")
                    }
                }
            }
        }
    }
}

/// Publishes the expiry of the root and signing certificates.
pub fn set_expiry(metrics: &CaMetrics, a: &Authority) {
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    };
    metrics.set_expiry(unix(a.root_not_after()), unix(a.ca_not_after()));
}
