//! The ZDS client loop: connect to the agent with backoff (10 ms doubling to
//! 15 s), send `ZdsHello{V1}`, then handle requests one at a time, answering
//! each with an Ack or a Nack. A malformed datagram, a wrong fd count, a
//! non-netns fd or a request the phase does not allow closes the connection
//! (logged with its reason); proxies keep running and the client reconnects.
//! Pending proxies are retried every 5 s, connected or not.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};

use super::protocol::{ProtocolError, ZdsConnection};
use super::state::{Violation, WorkloadProxyManager, WorkloadState};

#[derive(Debug, Clone)]
pub struct InpodClientConfig {
    /// `INPOD_UDS`.
    pub uds: PathBuf,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often pending proxies are retried.
    pub retry_interval: Duration,
}

impl Default for InpodClientConfig {
    fn default() -> Self {
        Self {
            uds: PathBuf::from("/var/run/ztunnel/ztunnel.sock"),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(15),
            retry_interval: Duration::from_secs(5),
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Violation(#[from] Violation),
    #[error("sending to the agent: {0}")]
    Send(#[source] std::io::Error),
}

/// The in-pod (ZDS) client. Clone-free: share it in an `Arc` if needed.
pub struct InpodClient<P: WorkloadProxyManager> {
    cfg: InpodClientConfig,
    state: Arc<Mutex<WorkloadState<P>>>,
    ready: watch::Receiver<bool>,
}

/// Exponential backoff: `initial`, doubling, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl<P: WorkloadProxyManager> InpodClient<P> {
    pub fn new(cfg: InpodClientConfig, proxies: Arc<P>) -> Self {
        let state = WorkloadState::new(proxies);
        let ready = state.readiness();
        Self {
            cfg,
            state: Arc::new(Mutex::new(state)),
            ready,
        }
    }

    /// True once a snapshot completed and nothing is pending (`/healthz/ready`).
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// The state machine, for inspection (admin, tests).
    pub fn state(&self) -> &Arc<Mutex<WorkloadState<P>>> {
        &self.state
    }

    /// Runs until `shutdown` resolves: connect, serve, reconnect; retries
    /// pending proxies in the background. Proxies are left running on
    /// return (the caller drains them with [`WorkloadState::drain_all`]).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let retry = {
            let state = self.state.clone();
            let every = self.cfg.retry_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    state.lock().await.retry_pending().await;
                }
            })
        };
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
        loop {
            let attempt = async {
                match ZdsConnection::connect(&self.cfg.uds) {
                    Ok(conn) => {
                        tracing::info!(uds = %self.cfg.uds.display(), "connected to the node agent");
                        let end = self.serve_connection(conn, &mut backoff).await;
                        tracing::warn!(reason = %end, "node agent connection closed");
                    }
                    Err(e) => {
                        tracing::debug!(uds = %self.cfg.uds.display(), error = %e, "cannot connect to the node agent");
                    }
                }
                self.state.lock().await.connection_lost();
                tokio::time::sleep(backoff.next_delay()).await;
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = attempt => {}
            }
        }
        retry.abort();
        self.state.lock().await.connection_lost();
    }

    /// Serves one connection until it ends; returns why. `backoff` is reset
    /// once the agent has sent a valid request.
    pub async fn serve_connection(
        &self,
        conn: ZdsConnection,
        backoff: &mut Backoff,
    ) -> ConnectionEnd {
        if let Err(e) = conn.send_hello().await {
            return ConnectionEnd::Send(e);
        }
        self.state.lock().await.connection_started();
        loop {
            let req = match conn.recv_request().await {
                Ok(r) => r,
                Err(e) => return e.into(),
            };
            backoff.reset();
            let kind = req.kind();
            let answer = self.state.lock().await.handle(req).await;
            match answer {
                Ok(nack) => {
                    if let Some(reason) = &nack {
                        tracing::warn!(request = kind, %reason, "nacking ZDS request");
                    }
                    if let Err(e) = conn.send_ack(nack).await {
                        return ConnectionEnd::Send(e);
                    }
                }
                Err(v) => return v.into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(15));
        let seq: Vec<u128> = (0..13).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(
            seq,
            vec![
                10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 15000, 15000
            ]
        );
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
