//! On-demand lookups (`XDS_ON_DEMAND=true`): when the data path meets an address the
//! store does not hold, it asks the source (istiod's xDS) for it and waits, bounded,
//! for the answer, as upstream's ztunnel does for large meshes where pushing every
//! workload to every node costs too much.
//!
//! Keys are upstream's resource names; the data path asks by address,
//! `<network>/<ip>` (a workload or a service VIP; istiod also accepts a workload uid
//! or `<namespace>/<hostname>`).
//!
//! ```ignore
//! let (demander, requests) = OnDemand::channel(Duration::from_secs(5));
//! store.set_on_demand(demander);              // the data path may now ask
//! // the source reads `requests`, subscribes, and completes each `Demand` once the
//! // response (resource or removal) has been applied to the store
//! let found = store.fetch_on_demand("/10.0.0.7".into(), |s| s.workload_by_ip("", ip).is_some()).await;
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Snapshot, Store};

/// One request from the data path: the key, and where to say it was answered.
#[derive(Debug)]
pub struct Demand {
    pub key: String,
    pub answered: oneshot::Sender<()>,
}

/// The data path's side: sends [`Demand`]s to the source.
#[derive(Debug, Clone)]
pub struct OnDemand {
    tx: mpsc::UnboundedSender<Demand>,
    timeout: Duration,
}

impl OnDemand {
    /// A demander whose waits end after `timeout`, and the receiver the source reads.
    pub fn channel(timeout: Duration) -> (OnDemand, mpsc::UnboundedReceiver<Demand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (OnDemand { tx, timeout }, rx)
    }
}

/// The on-demand key of an address: upstream's `<network>/<ip>`.
pub fn address_key(network: &str, ip: IpAddr) -> String {
    format!("{network}/{ip}")
}

impl Snapshot {
    /// Whether `ip` on `network` is a workload or a service VIP this snapshot holds.
    pub fn knows_address(&self, network: &str, ip: IpAddr) -> bool {
        self.workload_by_ip(network, ip).is_some() || self.service_by_vip(network, ip).is_some()
    }
}

/// How an on-demand lookup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The store holds it (already, or once the source's answer was applied).
    Found,
    /// The source answered that it does not know it (or there is no source and the
    /// store lacks it).
    Absent,
    /// The source did not answer in time, or is gone: nobody can say what it is.
    Unanswered,
}

/// istiod did not answer about an address in time: routing it as unknown would send a
/// mesh destination's traffic out of the mesh in plaintext.
#[derive(Debug, thiserror::Error)]
#[error("istiod did not answer the on-demand lookup of {key} in time")]
pub struct Unanswered {
    pub key: String,
    /// The store as it is (without the address).
    pub snapshot: Arc<Snapshot>,
}

impl Unanswered {
    /// The snapshot to go on with where an unknown address is refused anyway.
    pub fn into_snapshot(self) -> Arc<Snapshot> {
        self.snapshot
    }
}

impl Store {
    /// Lets the data path ask `demander`'s source for what the store lacks; set once
    /// (a second call is ignored).
    pub fn set_on_demand(&self, demander: OnDemand) {
        let _ = self.on_demand.set(demander);
    }

    /// Whether [`Store::fetch_on_demand`] can ask anyone.
    pub fn supports_on_demand(&self) -> bool {
        self.on_demand.get().is_some()
    }

    /// The snapshot to route `ip` with: the current one if it knows the address (or
    /// there is no on-demand source), else the one after asking for it.
    pub async fn snapshot_knowing(
        &self,
        network: &str,
        ip: IpAddr,
    ) -> Result<Arc<Snapshot>, Unanswered> {
        self.knowing(self.snapshot(), network, ip).await
    }

    /// `snap` itself when it knows `ip` on `network` or there is no on-demand source
    /// (the data path's common case: no second snapshot load); else the snapshot after
    /// asking for the address — with or without it, as istiod answered — or
    /// [`Unanswered`] when istiod did not answer in time.
    pub async fn knowing(
        &self,
        snap: Arc<Snapshot>,
        network: &str,
        ip: IpAddr,
    ) -> Result<Arc<Snapshot>, Unanswered> {
        if self.on_demand.get().is_none() || snap.knows_address(network, ip) {
            return Ok(snap);
        }
        drop(snap);
        let key = address_key(network, ip);
        let lookup = self
            .fetch_on_demand(key.clone(), |s| s.knows_address(network, ip))
            .await;
        let snapshot = self.snapshot();
        match lookup {
            Lookup::Unanswered => Err(Unanswered { key, snapshot }),
            Lookup::Found | Lookup::Absent => Ok(snapshot),
        }
    }

    /// [`Lookup::Found`] as soon as `found` holds for the current snapshot. Otherwise,
    /// with an on-demand source, asks it for `key` and waits until the source has
    /// answered (the resource or its absence), the store changed so that `found`
    /// holds, or the timeout passed. Without one, `Found` or `Absent` on the current
    /// snapshot at once.
    pub async fn fetch_on_demand(&self, key: String, found: impl Fn(&Snapshot) -> bool) -> Lookup {
        let on_snapshot = |s: &Snapshot| {
            if found(s) {
                Lookup::Found
            } else {
                Lookup::Absent
            }
        };
        let Some(demander) = self.on_demand.get() else {
            return on_snapshot(&self.snapshot());
        };
        let mut changes = self.subscribe();
        if found(&self.snapshot()) {
            return Lookup::Found;
        }
        let (answered, mut answer) = oneshot::channel();
        tracing::debug!(%key, "on-demand request");
        if demander
            .tx
            .send(Demand {
                key: key.clone(),
                answered,
            })
            .is_err()
        {
            tracing::warn!(%key, "on-demand source is gone; the address cannot be looked up");
            return Lookup::Unanswered;
        }
        let deadline = tokio::time::sleep(demander.timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                answer = &mut answer => {
                    if answer.is_err() {
                        tracing::warn!(%key, "on-demand source dropped the request");
                        return Lookup::Unanswered;
                    }
                    break;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if found(&self.snapshot()) {
                        return Lookup::Found;
                    }
                }
                _ = &mut deadline => {
                    tracing::warn!(%key, timeout = ?demander.timeout, "on-demand request not answered in time");
                    return Lookup::Unanswered;
                }
            }
        }
        let lookup = on_snapshot(&self.snapshot());
        tracing::debug!(%key, ?lookup, "on-demand request answered");
        lookup
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::workload::Workload;

    fn workload(uid: &str, ip: &str) -> Workload {
        let yaml = format!(
            "workloads:\n- {{uid: {uid}, name: {uid}, namespace: ns, workloadIps: [\"{ip}\"], protocol: HBONE}}\n"
        );
        let snap = crate::state::file::test_store(&yaml).snapshot();
        (**snap.workload_by_uid(uid).unwrap()).clone()
    }

    fn has(ip: &'static str) -> impl Fn(&Snapshot) -> bool {
        move |s| s.workload_by_ip("", ip.parse().unwrap()).is_some()
    }

    #[tokio::test]
    async fn without_a_source_only_the_snapshot_answers() {
        let store = Store::new();
        assert!(!store.supports_on_demand());
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.1".into(), has("10.0.0.1"))
                .await,
            Lookup::Absent
        );
        store
            .source("file")
            .upsert_workload(workload("a", "10.0.0.1"));
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.1".into(), has("10.0.0.1"))
                .await,
            Lookup::Found
        );
    }

    #[tokio::test]
    async fn waits_for_the_source_and_sees_what_it_applied() {
        let store = Store::new();
        let (demander, mut requests) = OnDemand::channel(Duration::from_secs(10));
        store.set_on_demand(demander);
        let src = store.source("xds");
        let source = tokio::spawn(async move {
            let d = requests.recv().await.unwrap();
            assert_eq!(d.key, "/10.0.0.2");
            src.upsert_workload(workload("b", "10.0.0.2"));
            let _ = d.answered.send(());
            // A second key that does not exist: answered without a resource.
            let d = requests.recv().await.unwrap();
            assert_eq!(d.key, "/10.0.0.3");
            let _ = d.answered.send(());
        });
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.2".into(), has("10.0.0.2"))
                .await,
            Lookup::Found
        );
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.3".into(), has("10.0.0.3"))
                .await,
            Lookup::Absent
        );
        source.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_change_ends_the_wait_before_the_answer() {
        let store = Store::new();
        let (demander, mut requests) = OnDemand::channel(Duration::from_secs(30));
        store.set_on_demand(demander);
        let src = store.source("xds");
        let keep = tokio::spawn(async move {
            let d = requests.recv().await.unwrap();
            src.upsert_workload(workload("c", "10.0.0.4"));
            // Never answers: the store change alone must end the wait.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(d);
        });
        let t = tokio::time::Instant::now();
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.4".into(), has("10.0.0.4"))
                .await,
            Lookup::Found
        );
        // Virtual time: the 30 s deadline did not pass.
        assert!(t.elapsed() < Duration::from_secs(30));
        keep.abort();
    }

    #[tokio::test]
    async fn snapshot_knowing_asks_only_for_unknown_addresses() {
        let store = Store::new();
        store
            .source("file")
            .upsert_workload(workload("known", "10.0.0.6"));
        let (demander, mut requests) = OnDemand::channel(Duration::from_secs(10));
        store.set_on_demand(demander);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let snap = store.snapshot_knowing("", ip("10.0.0.6")).await.unwrap();
        assert!(snap.knows_address("", ip("10.0.0.6")));
        assert!(
            requests.try_recv().is_err(),
            "a known address is not asked for"
        );
        let src = store.source("xds");
        let answer = tokio::spawn(async move {
            let d = requests.recv().await.unwrap();
            assert_eq!(d.key, "net1/10.0.0.7");
            src.upsert_workload(workload("new", "10.0.0.7"));
            let _ = d.answered.send(());
        });
        // Unknown on network "net1" (the workload above has network ""): asked for.
        let snap = store
            .snapshot_knowing("net1", ip("10.0.0.7"))
            .await
            .unwrap();
        answer.await.unwrap();
        assert!(snap.knows_address("", ip("10.0.0.7")));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_times_out_as_unanswered() {
        let store = Store::new();
        let (demander, mut requests) = OnDemand::channel(Duration::from_secs(5));
        store.set_on_demand(demander);
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(d) = requests.recv().await {
                held.push(d);
            }
        });
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.5".into(), has("10.0.0.5"))
                .await,
            Lookup::Unanswered
        );
        // Routing: not "unknown" (which would be passthrough), but an error naming it.
        let err = store
            .snapshot_knowing("", "10.0.0.5".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.key, "/10.0.0.5");
        assert!(err.to_string().contains("/10.0.0.5"), "{err}");
        hold.abort();
    }

    #[tokio::test]
    async fn a_source_that_drops_the_request_is_unanswered() {
        let store = Store::new();
        let (demander, mut requests) = OnDemand::channel(Duration::from_secs(3600));
        store.set_on_demand(demander);
        let drop_it = tokio::spawn(async move { drop(requests.recv().await) });
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.8".into(), has("10.0.0.8"))
                .await,
            Lookup::Unanswered
        );
        drop_it.await.unwrap();
        // The source gone altogether: not asked, unanswered at once.
        assert_eq!(
            store
                .fetch_on_demand("/10.0.0.8".into(), has("10.0.0.8"))
                .await,
            Lookup::Unanswered
        );
    }
}
