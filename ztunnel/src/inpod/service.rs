//! In-pod mode assembled from the configuration, for `app`: the per-workload
//! proxies over the shared proxy engine and the ZDS client that drives them.
//!
//! ```ignore
//! let inpod = InpodService::new(&cfg, proxy_factory)?;   // checks SO_MARK
//! readiness.add(inpod.readiness());                      // /healthz/ready
//! inpod.run(shutdown_signal).await;                      // drains on return
//! ```

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use super::client::{InpodClient, InpodClientConfig};
use super::proxies::EngineWorkloadProxies;
use super::socket_factory::DEFAULT_MARK;
use crate::config::Config;
use crate::proxy::ProxyFactory;

#[derive(Debug, thiserror::Error)]
pub enum InpodStartError {
    #[error("cannot set SO_MARK {mark:#x} on a socket ({source}): in-pod mode needs CAP_NET_ADMIN")]
    Mark {
        mark: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The in-pod half of a shared-mode ztunnel.
pub struct InpodService {
    client: Arc<InpodClient<EngineWorkloadProxies>>,
    proxies: Arc<EngineWorkloadProxies>,
}

/// Fails when this process may not mark sockets: without the mark the pod
/// rules would capture ztunnel's own traffic.
pub fn check_mark(mark: u32) -> Result<(), InpodStartError> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|s| s.set_mark(mark).map(|_| s));
    s.map(drop)
        .map_err(|source| InpodStartError::Mark { mark, source })
}

impl InpodService {
    /// `PACKET_MARK` (default 1337), `INPOD_PORT_REUSE`, `INPOD_UDS`, and
    /// [`Config::drain_budget`] as the drain time of removed workloads.
    pub fn new(cfg: &Config, factory: ProxyFactory) -> Result<Self, InpodStartError> {
        let mark = cfg.packet_mark.unwrap_or(DEFAULT_MARK);
        check_mark(mark)?;
        let proxies = Arc::new(EngineWorkloadProxies::new(
            factory,
            Some(mark),
            cfg.inpod_port_reuse,
            cfg.drain_budget(),
        ));
        let client = Arc::new(InpodClient::new(
            InpodClientConfig {
                uds: cfg.inpod_uds.clone(),
                ..Default::default()
            },
            proxies.clone(),
        ));
        Ok(Self { client, proxies })
    }

    /// Ready once a snapshot was received and no workload is pending.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.client.readiness()
    }

    pub fn client(&self) -> &Arc<InpodClient<EngineWorkloadProxies>> {
        &self.client
    }

    pub fn proxies(&self) -> &Arc<EngineWorkloadProxies> {
        &self.proxies
    }

    /// Serves the agent connection until `shutdown`, then drains every
    /// workload proxy (each for at most the grace period).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        self.client.run(shutdown).await;
        self.proxies.drain_all().await;
    }
}
