//! The in-pod workload state machine: which per-workload proxies run, which
//! are pending (failed to start, retried), the snapshot phase of the current
//! agent connection, and readiness.
//!
//! - Snapshot phase (from connect until `SnapshotSent`): `AddWorkload` starts
//!   (or restarts) a proxy, `KeepWorkload` keeps one, both mark the uid as
//!   "named". `SnapshotSent` drains every proxy the snapshot did not name and
//!   ends the phase.
//! - Steady phase: `AddWorkload` (a duplicate uid drains the old proxy
//!   first), `DelWorkload` drains one. `KeepWorkload` or a second
//!   `SnapshotSent` is a protocol violation (the connection is closed).
//! - Readiness: a snapshot was completed on this connection and nothing is
//!   pending. Losing the connection keeps the proxies but reports not ready.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;
use tokio::sync::watch;

use super::netns::InpodNetns;
use super::protocol::Request;
use crate::telemetry::metrics::WorkloadManagerMetrics;

/// Error from [`WorkloadProxyManager::start`].
pub type StartError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the state machine drives: per-workload proxies. Implemented by the
/// proxy engine (and by fakes in tests).
pub trait WorkloadProxyManager: Send + Sync + 'static {
    /// Starts the proxy for `uid` in `netns` (listeners bound before this
    /// resolves). An error is Nacked as "failure to start proxy: ..." and
    /// retried later.
    fn start<'a>(
        &'a self,
        uid: &'a str,
        info: &'a WorkloadInfo,
        netns: Arc<InpodNetns>,
    ) -> BoxFuture<'a, Result<(), StartError>>;

    /// Drains and stops the proxy for `uid` (no-op when none runs).
    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()>;

    /// Where the state machine counts proxies (`workload_manager_*`).
    fn manager_metrics(&self) -> Option<WorkloadManagerMetrics> {
        None
    }
}

/// A request the current phase does not allow: the connection is closed.
#[derive(Debug, thiserror::Error)]
#[error("protocol violation: {0}")]
pub struct Violation(pub String);

struct Workload {
    info: WorkloadInfo,
    netns: Arc<InpodNetns>,
}

pub struct WorkloadState<P: WorkloadProxyManager> {
    proxies: Arc<P>,
    running: HashMap<String, Workload>,
    pending: HashMap<String, Workload>,
    /// `Some` during the snapshot phase: uids named so far.
    snapshot: Option<HashSet<String>>,
    snapshot_done: bool,
    ready: watch::Sender<bool>,
    metrics: WorkloadManagerMetrics,
}

impl<P: WorkloadProxyManager> WorkloadState<P> {
    pub fn new(proxies: Arc<P>) -> Self {
        Self {
            metrics: proxies.manager_metrics().unwrap_or_default(),
            proxies,
            running: HashMap::new(),
            pending: HashMap::new(),
            snapshot: None,
            snapshot_done: false,
            ready: watch::Sender::new(false),
        }
    }

    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// UIDs with a running proxy.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.running.keys().cloned().collect();
        v.sort();
        v
    }

    /// UIDs whose proxy failed to start and will be retried.
    pub fn pending(&self) -> Vec<String> {
        let mut v: Vec<String> = self.pending.keys().cloned().collect();
        v.sort();
        v
    }

    fn update_ready(&self) {
        self.metrics
            .active_proxy_count
            .set(self.running.len() as i64);
        self.metrics
            .pending_proxy_count
            .set(self.pending.len() as i64);
        let ready = self.snapshot_done && self.pending.is_empty();
        self.ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    /// A new agent connection: a new snapshot follows.
    pub fn connection_started(&mut self) {
        self.snapshot = Some(HashSet::new());
        self.snapshot_done = false;
        self.update_ready();
    }

    /// The agent connection is gone: proxies keep running, not ready.
    pub fn connection_lost(&mut self) {
        self.snapshot = None;
        self.snapshot_done = false;
        self.update_ready();
    }

    /// Handles one request. `Ok(None)` = Ack, `Ok(Some(reason))` = Nack,
    /// `Err` = close the connection.
    pub async fn handle(&mut self, req: Request) -> Result<Option<String>, Violation> {
        let out = match req {
            Request::Add { uid, info, netns } => {
                if let Some(named) = &mut self.snapshot {
                    named.insert(uid.clone());
                }
                Ok(self.add(uid, info, Arc::new(netns)).await)
            }
            Request::Keep { uid } => match &mut self.snapshot {
                Some(named) => {
                    named.insert(uid);
                    Ok(None)
                }
                None => Err(Violation(format!("KeepWorkload {uid} after the snapshot"))),
            },
            Request::Del { uid } => {
                if let Some(named) = &mut self.snapshot {
                    named.remove(&uid);
                }
                self.remove(&uid).await;
                Ok(None)
            }
            Request::SnapshotSent => match self.snapshot.take() {
                Some(named) => {
                    let stale: Vec<String> = self
                        .running
                        .keys()
                        .chain(self.pending.keys())
                        .filter(|uid| !named.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in stale {
                        tracing::info!(%uid, "not in the ZDS snapshot: draining");
                        self.remove(&uid).await;
                    }
                    self.snapshot_done = true;
                    Ok(None)
                }
                None => Err(Violation("second SnapshotSent".into())),
            },
        };
        self.update_ready();
        out
    }

    async fn add(
        &mut self,
        uid: String,
        info: WorkloadInfo,
        netns: Arc<InpodNetns>,
    ) -> Option<String> {
        if let Some(w) = self.running.get(&uid)
            && w.netns.inode() == netns.inode()
        {
            // Same pod, same netns (typically the agent's snapshot after a
            // reconnect): keep serving its connections.
            tracing::debug!(%uid, "AddWorkload for a running workload in the same netns: kept");
            return None;
        }
        if self.running.contains_key(&uid) || self.pending.contains_key(&uid) {
            tracing::info!(%uid, "AddWorkload for a running workload in another netns: draining the old proxy");
            self.remove(&uid).await;
        }
        match self.proxies.start(&uid, &info, netns.clone()).await {
            Ok(()) => {
                tracing::info!(%uid, namespace = %info.namespace, name = %info.name, netns = netns.inode(), "workload proxy started");
                self.metrics.proxies_started.inc();
                self.running.insert(uid, Workload { info, netns });
                None
            }
            Err(e) => {
                tracing::warn!(%uid, error = %e, "workload proxy failed to start; will retry");
                self.pending.insert(uid, Workload { info, netns });
                Some(format!("failure to start proxy: {e}"))
            }
        }
    }

    async fn remove(&mut self, uid: &str) {
        if self.running.remove(uid).is_some() {
            self.proxies.stop(uid).await;
            self.metrics.proxies_stopped.inc();
            tracing::info!(%uid, "workload proxy drained");
        }
        self.pending.remove(uid);
    }

    /// Tries to start every pending proxy again.
    pub async fn retry_pending(&mut self) {
        let uids: Vec<String> = self.pending.keys().cloned().collect();
        for uid in uids {
            let Some(w) = self.pending.remove(&uid) else {
                continue;
            };
            match self.proxies.start(&uid, &w.info, w.netns.clone()).await {
                Ok(()) => {
                    tracing::info!(%uid, "pending workload proxy started");
                    self.metrics.proxies_started.inc();
                    self.running.insert(uid, w);
                }
                Err(e) => {
                    tracing::debug!(%uid, error = %e, "pending workload proxy still failing");
                    self.pending.insert(uid, w);
                }
            }
        }
        self.update_ready();
    }

    /// Drains every proxy (shutdown).
    pub async fn drain_all(&mut self) {
        let uids: Vec<String> = self
            .running
            .keys()
            .chain(self.pending.keys())
            .cloned()
            .collect();
        for uid in uids {
            self.remove(&uid).await;
        }
        self.update_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        log: Mutex<Vec<String>>,
        failing: Mutex<HashSet<String>>,
        metrics: WorkloadManagerMetrics,
    }

    impl WorkloadProxyManager for Fake {
        fn start<'a>(
            &'a self,
            uid: &'a str,
            _info: &'a WorkloadInfo,
            _netns: Arc<InpodNetns>,
        ) -> BoxFuture<'a, Result<(), StartError>> {
            Box::pin(async move {
                self.log.lock().unwrap().push(format!("start {uid}"));
                if self.failing.lock().unwrap().contains(uid) {
                    return Err("listener bind failed".into());
                }
                Ok(())
            })
        }

        fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                self.log.lock().unwrap().push(format!("stop {uid}"));
            })
        }

        fn manager_metrics(&self) -> Option<WorkloadManagerMetrics> {
            Some(self.metrics.clone())
        }
    }

    fn add(uid: &str) -> Request {
        Request::Add {
            uid: uid.into(),
            info: WorkloadInfo {
                name: uid.into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            },
            netns: InpodNetns::current().unwrap(),
        }
    }

    fn log(f: &Fake) -> Vec<String> {
        std::mem::take(&mut *f.log.lock().unwrap())
    }

    #[tokio::test]
    async fn snapshot_drains_unnamed_and_gates_readiness() {
        let fake = Arc::new(Fake::default());
        let mut s = WorkloadState::new(fake.clone());
        s.connection_started();
        for uid in ["a", "b", "c"] {
            assert_eq!(s.handle(add(uid)).await.unwrap(), None);
        }
        assert!(!s.is_ready(), "not ready before SnapshotSent");
        s.handle(Request::SnapshotSent).await.unwrap();
        assert!(s.is_ready());
        log(&fake);

        // Agent restarts: b kept (no netns), a re-added, c gone.
        s.connection_lost();
        assert!(!s.is_ready());
        assert_eq!(s.running(), vec!["a", "b", "c"], "proxies survive");
        s.connection_started();
        s.handle(add("a")).await.unwrap();
        s.handle(Request::Keep { uid: "b".into() }).await.unwrap();
        s.handle(Request::SnapshotSent).await.unwrap();
        assert_eq!(s.running(), vec!["a", "b"]);
        assert_eq!(log(&fake), vec!["stop c"], "a (same netns) kept running");
        assert!(s.is_ready());
    }

    #[tokio::test]
    async fn steady_state_add_del_and_violations() {
        let fake = Arc::new(Fake::default());
        let mut s = WorkloadState::new(fake.clone());
        s.connection_started();
        s.handle(Request::SnapshotSent).await.unwrap();
        s.handle(add("x")).await.unwrap();
        s.handle(add("x")).await.unwrap(); // same netns: kept
        assert_eq!(log(&fake), vec!["start x"]);
        // same uid, another netns (sandbox re-created): old drained first
        if nix::unistd::geteuid().is_root() {
            let other = std::thread::spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                InpodNetns::current().unwrap()
            })
            .join()
            .unwrap();
            let Request::Add { uid, info, .. } = add("x") else {
                unreachable!()
            };
            s.handle(Request::Add {
                uid,
                info,
                netns: other,
            })
            .await
            .unwrap();
            assert_eq!(log(&fake), vec!["stop x", "start x"]);
        }
        s.handle(Request::Del { uid: "x".into() }).await.unwrap();
        s.handle(Request::Del { uid: "nope".into() }).await.unwrap();
        assert_eq!(log(&fake), vec!["stop x"]);
        assert!(s.handle(Request::Keep { uid: "x".into() }).await.is_err());
        assert!(s.handle(Request::SnapshotSent).await.is_err());
    }

    #[tokio::test]
    async fn failed_start_is_nacked_pending_and_retried() {
        let fake = Arc::new(Fake::default());
        fake.failing.lock().unwrap().insert("p".into());
        let mut s = WorkloadState::new(fake.clone());
        s.connection_started();
        let nack = s.handle(add("p")).await.unwrap().expect("nack");
        assert!(nack.starts_with("failure to start proxy"), "{nack}");
        s.handle(Request::SnapshotSent).await.unwrap();
        assert!(!s.is_ready(), "pending keeps us not ready");
        assert_eq!(s.pending(), vec!["p"]);
        let m = &fake.metrics;
        assert_eq!(
            (m.active_proxy_count.get(), m.pending_proxy_count.get()),
            (0, 1)
        );
        s.retry_pending().await;
        assert!(!s.is_ready());
        fake.failing.lock().unwrap().clear();
        s.retry_pending().await;
        assert!(s.is_ready());
        assert_eq!(s.running(), vec!["p"]);
        assert_eq!(
            (
                m.active_proxy_count.get(),
                m.pending_proxy_count.get(),
                m.proxies_started.get()
            ),
            (1, 0, 1)
        );
        // a pending workload not in the next snapshot is forgotten
        fake.failing.lock().unwrap().insert("q".into());
        s.handle(add("q")).await.unwrap();
        s.connection_started();
        s.handle(Request::SnapshotSent).await.unwrap();
        assert!(s.pending().is_empty() && s.running().is_empty());
        assert_eq!(
            (
                m.active_proxy_count.get(),
                m.pending_proxy_count.get(),
                m.proxies_stopped.get()
            ),
            (0, 0, 1)
        );
    }
}
