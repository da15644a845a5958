//! The built-in CA (`node-agent ca`): Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS for
//! clusters without istiod.
//!
//! - [`config`]: environment (`CA_LISTEN_ADDR`, `CA_CERT_DIR`, `CA_SERVER_DNS_NAMES`,
//!   `CA_TRUSTED_NODE_ACCOUNTS`, `TOKEN_AUDIENCES`, `MAX_WORKLOAD_CERT_TTL`, ...).
//! - [`authority`]: the signing certificate and key (Istio plugged-in CA layout),
//!   CSR checks and leaf issuance; [`bundle`]: the signing certificate must chain
//!   to the root before a bundle is used.
//! - [`authn`]: callers authenticated with TokenReview.
//! - [`pods`]: node authorization facts (caller's node, pods per node and account).
//! - [`service`]: the decision (who may get which identity) and the gRPC handler.
//! - [`server`]: TLS listener, serving certificate, reload of the mounted Secret.
//! - [`metrics`]: the metrics endpoint.
//!
//! [`run`] is the subcommand; [`CaServer`] lets tests run the same server in
//! process with their own [`authn::Authenticator`] and [`pods::PodDirectory`].

pub mod authn;
pub mod authority;
pub mod bundle;
pub mod config;
pub mod metrics;
pub mod pods;
pub mod server;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::health::Readiness;
use crate::http_endpoint;
pub use authority::Authority;
pub use config::CaConfig;
use metrics::CaMetrics;
use server::{Reloader, ServingCertResolver};
use service::{CaService, IssuePolicy};

/// The CA could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Load(#[from] authority::LoadError),
    #[error(transparent)]
    Sign(#[from] authority::SignError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    #[error("gRPC server on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A bound, loaded CA server, not yet serving.
pub struct CaServer {
    listener: TcpListener,
    addr: SocketAddr,
    service: CaService,
    resolver: Arc<ServingCertResolver>,
    reloader: Reloader,
    serving: authority::ServingCert,
    authority: Arc<ArcSwap<Authority>>,
    metrics: CaMetrics,
}

impl CaServer {
    /// Loads `CA_CERT_DIR`, issues the serving certificate and binds `CA_LISTEN_ADDR`.
    pub async fn bind(
        cfg: &CaConfig,
        authn: Arc<dyn authn::Authenticator>,
        pods: Arc<dyn pods::PodDirectory>,
    ) -> Result<CaServer, CaError> {
        let loaded = Arc::new(Authority::load(&cfg.cert_dir)?);
        let metrics = CaMetrics::new();
        server::set_expiry(&metrics, &loaded);
        let serving = loaded.issue_serving_cert(&cfg.server_dns_names)?;
        let resolver = ServingCertResolver::new(serving.key.clone());
        let authority = Arc::new(ArcSwap::new(loaded));
        let listener = bind("CA_LISTEN_ADDR", cfg.listen_addr).await?;
        let addr = listener.local_addr().map_err(|source| CaError::Listen {
            what: "CA_LISTEN_ADDR",
            addr: cfg.listen_addr,
            source,
        })?;
        let service = CaService::new(
            IssuePolicy {
                trust_domain: cfg.trust_domain.clone(),
                cluster_id: cfg.cluster_id.clone(),
                trusted_node_accounts: cfg.trusted_node_accounts.clone(),
                max_ttl: cfg.max_workload_cert_ttl,
            },
            authn,
            pods,
            authority.clone(),
            metrics.clone(),
        );
        let reloader = Reloader {
            dir: cfg.cert_dir.clone(),
            interval: cfg.reload_interval,
            dns_names: cfg.server_dns_names.clone(),
            authority: authority.clone(),
            resolver: resolver.clone(),
            metrics: metrics.clone(),
        };
        Ok(CaServer {
            listener,
            addr,
            service,
            resolver,
            reloader,
            serving,
            authority,
            metrics,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics(&self) -> CaMetrics {
        self.metrics.clone()
    }

    /// The currently loaded CA (swapped on reload).
    pub fn authority(&self) -> Arc<ArcSwap<Authority>> {
        self.authority.clone()
    }

    /// Serves until `shutdown` completes; reloads `CA_CERT_DIR` meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), CaError> {
        let reload = tokio::spawn(self.reloader.run(self.serving));
        tracing::info!(target: "ca", addr = %self.addr, "CA serving IstioCertificateService");
        let result = server::serve(self.listener, self.service, self.resolver, shutdown).await;
        reload.abort();
        result.map_err(|source| CaError::Serve {
            addr: self.addr,
            source,
        })
    }
}

/// `node-agent ca`: runs until SIGTERM or SIGINT.
pub async fn run(cfg: CaConfig) -> Result<(), CaError> {
    tracing::info!(
        target: "ca",
        pod = cfg.pod_name.as_deref().unwrap_or("-"),
        namespace = cfg.pod_namespace.as_deref().unwrap_or("-"),
        trust_domain = %cfg.trust_domain,
        trusted_node_accounts = ?cfg.trusted_node_accounts.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "starting built-in CA"
    );
    let readiness = Readiness::new();
    let grpc_ready = readiness.register("ca-grpc");
    let pods_ready = readiness.register("ca-pod-index");
    let ready_listener = bind("READY_PORT", cfg.ready_addr).await?;
    let metrics_listener = bind("METRICS_PORT", cfg.metrics_addr).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(crate::health::serve(
        ready_listener,
        readiness.clone(),
        stopped(),
    ));

    let client = kube::Client::try_default().await.map_err(CaError::Kube)?;
    let authn = Arc::new(authn::TokenReviewAuthenticator::new(
        client.clone(),
        cfg.token_audiences.clone(),
    ));
    let pods = pods::KubePodDirectory::start(client);
    {
        let pods = pods.clone();
        tokio::spawn(async move {
            pods.wait_synced().await;
            pods_ready.set_ready();
        });
    }
    let server = CaServer::bind(&cfg, authn, pods).await?;
    tokio::spawn(metrics::serve(
        metrics_listener,
        server.metrics(),
        stopped(),
    ));
    grpc_ready.set_ready();
    let result = server
        .run(async move {
            wait_for_signal().await;
            tracing::info!(target: "ca", "signal received; stopping");
        })
        .await;
    let _ = stop_tx.send(true);
    result
}

/// Binds one of the CA's listeners (`CA_LISTEN_ADDR`, `READY_PORT`, `METRICS_PORT`):
/// their default `[::]` falls back to `0.0.0.0` on a node without IPv6 (booted with
/// `ipv6.disable=1`), as the node agent's do ([`http_endpoint::bind`]).
async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, CaError> {
    http_endpoint::bind(addr)
        .await
        .map_err(|e| CaError::Listen {
            what,
            addr: e.addr,
            source: e.source,
        })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
