//! Node-wide (TPROXY) mode: certificates follow the workloads of this node.
//!
//! The node proxy fetches a certificate on demand for every workload of its node it carries
//! traffic for. This watcher keeps the certificate manager's node claim
//! ([`SecretManager::claim_for_node`]) equal to the identities of the workloads the state
//! lists on this node, so when the last workload of an identity leaves the node (deleted,
//! rescheduled elsewhere) its certificate is forgotten: no more CSRs (which the CA would
//! refuse anyway: it only issues a node proxy the identities of pods on its node), gone from
//! `/config_dump`. In-pod holds ([`SecretManager::hold`]) still keep what they hold.
//!
//! The set is computed from the newest snapshot once per state change, never per
//! connection, after [`SETTLE`]: changes within that time are coalesced, so a workload that
//! moves (removed and re-added, in one snapshot or in two close ones) keeps its certificate.
//!
//! "On this node" is what the node proxy serves: `workload.node == NODE_NAME`, or every
//! workload when `NODE_NAME` is unset.
//!
//! As upstream, the certificates of this node's mesh workloads (HBONE, or a native tunnel)
//! are also prefetched when they appear (at [`Priority::Warmup`](crate::identity::limiter::Priority),
//! behind any request a connection waits for), so a new pod's first connection does not wait
//! for a CSR. Only with `NODE_NAME` set: without it every workload of the mesh would count.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;

use crate::identity::{Identity, SecretManager};
use crate::state::workload::Protocol;
use crate::state::{Snapshot, Store};

/// How long after a state change the node claim is recomputed (coalescing bursts).
pub const SETTLE: Duration = Duration::from_secs(1);

/// The running watcher; stops when dropped.
#[derive(Debug)]
pub struct NodeCertificates {
    task: AbortHandle,
}

impl Drop for NodeCertificates {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The identities of the workloads of `node` in `snap` (all workloads when `node` is `None`).
pub fn node_identities(snap: &Snapshot, node: Option<&str>) -> HashSet<Identity> {
    snap.workloads()
        .filter(|w| node.is_none_or(|n| w.node == n))
        .map(|w| w.identity())
        .collect()
}

/// The identities whose certificates are prefetched: those of `node`'s mesh workloads
/// (none when `node` is `None`).
pub fn prefetch_identities(snap: &Snapshot, node: Option<&str>) -> HashSet<Identity> {
    let Some(node) = node else {
        return HashSet::new();
    };
    snap.workloads()
        .filter(|w| w.node == node && (w.protocol == Protocol::HBONE || w.native_tunnel))
        .map(|w| w.identity())
        .collect()
}

/// Claims the identities of `node`'s workloads now and after every change of `store`
/// (waiting `settle` first). Spawned on the current tokio runtime.
pub fn watch(
    store: Store,
    certs: Arc<SecretManager>,
    node: Option<String>,
    settle: Duration,
) -> NodeCertificates {
    let mut changes = store.subscribe();
    let task = tokio::spawn(async move {
        loop {
            // Marked seen before reading the snapshot: a change after this wakes us again.
            let version = *changes.borrow_and_update();
            let snap = store.snapshot();
            let claim = node_identities(&snap, node.as_deref());
            let claimed = claim.len();
            let forgotten = certs.claim_for_node(claim);
            for identity in prefetch_identities(&snap, node.as_deref()) {
                certs.prefetch(&identity);
            }
            drop(snap);
            let node_name = node.as_deref().unwrap_or("(every node: NODE_NAME unset)");
            if forgotten.is_empty() {
                tracing::debug!(
                    node = node_name,
                    version,
                    claimed,
                    "node identities claimed"
                );
            } else {
                tracing::info!(
                    node = node_name,
                    version,
                    claimed,
                    forgotten = ?forgotten.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "certificates of identities no workload on this node has any more dropped"
                );
            }
            if changes.changed().await.is_err() {
                return;
            }
            tokio::time::sleep(settle).await;
        }
    });
    NodeCertificates {
        task: task.abort_handle(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::local_ca::LocalCa;
    use crate::identity::provider::{CertificateProvider, CertificateRequest, SignFuture};
    use crate::state::{SourceBatch, Workload};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// The local CA, counting what it signs per identity.
    struct CountingCa {
        ca: LocalCa,
        signed: Mutex<HashMap<Identity, usize>>,
    }

    impl CountingCa {
        fn new() -> Arc<Self> {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ca");
            let ca = LocalCa::from_files(&dir.join("ec-root.pem"), &dir.join("ec-root.key"));
            Arc::new(CountingCa {
                ca: ca.unwrap(),
                signed: Mutex::default(),
            })
        }

        fn count(&self, id: &Identity) -> usize {
            self.signed.lock().unwrap().get(id).copied().unwrap_or(0)
        }
    }

    impl CertificateProvider for CountingCa {
        fn name(&self) -> &str {
            "counting-ca"
        }
        fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
            *self
                .signed
                .lock()
                .unwrap()
                .entry(request.identity.clone())
                .or_insert(0) += 1;
            self.ca.sign(request)
        }
    }

    fn workload(uid: &str, sa: &str, node: &str) -> Workload {
        // A distinct address per uid (IPs are indexed).
        let host: u32 = uid.bytes().map(u32::from).sum();
        serde_yaml_ng::from_str(&format!(
            "uid: {uid}\nname: {uid}\nnamespace: ns1\nserviceAccount: {sa}\n\
             trustDomain: cluster.local\nworkloadIps: [\"10.9.{}.{}\"]\nprotocol: HBONE\n\
             node: {node}\n",
            host / 256,
            host % 256
        ))
        .unwrap()
    }

    fn listed(certs: &SecretManager, id: &Identity) -> bool {
        certs.dump(&[]).iter().any(|d| d.identity == id.to_string())
    }

    /// Shorter than the CA's back-dating: certificates are renewed every second.
    const TTL: Duration = Duration::from_secs(2);
    const SETTLE_TEST: Duration = Duration::from_millis(50);
    /// Long enough for at least one renewal.
    const RENEWAL: Duration = Duration::from_millis(1700);

    async fn settled() {
        tokio::time::sleep(SETTLE_TEST * 4).await;
    }

    /// Removing the last workload of an identity from this node forgets its certificate (no
    /// further CSR, gone from the dump) while a replica of another identity on the node,
    /// one moved within one snapshot, and another node's workloads change nothing else.
    #[tokio::test]
    async fn last_node_workload_gone_forgets_the_identity() {
        let ca = CountingCa::new();
        let certs = SecretManager::new(ca.clone(), TTL);
        let store = Store::new();
        let src = store.source("file");
        src.replace_all(
            vec![
                workload("a", "sa-a", "n1"),
                workload("b1", "sa-b", "n1"),
                workload("b2", "sa-b", "n1"),
                workload("c", "sa-c", "n1"),
                workload("r", "sa-r", "n2"),
            ],
            vec![],
            vec![],
        );
        let _watch = watch(store.clone(), certs.clone(), Some("n1".into()), SETTLE_TEST);
        let id = |sa: &str| Identity::new("cluster.local", "ns1", sa);
        let (a, b, c) = (id("sa-a"), id("sa-b"), id("sa-c"));
        for i in [&a, &b, &c] {
            certs.fetch_certificate(i).await.unwrap();
        }

        // One replica of b leaves; c moves (new uid, same node) within one snapshot.
        src.remove_workload("b1");
        src.apply(SourceBatch {
            upsert_workloads: vec![workload("c-new", "sa-c", "n1")],
            remove_workloads: vec!["c".into()],
            ..SourceBatch::default()
        });
        // a leaves this node.
        src.upsert_workload(workload("a", "sa-a", "n2"));
        settled().await;
        assert!(!listed(&certs, &a), "a has no workload on n1 any more");
        assert!(certs.current(&a).is_none());
        assert!(listed(&certs, &b), "b2 still runs on n1");
        assert!(listed(&certs, &c), "c moved within one snapshot");
        let before: Vec<usize> = [&a, &b, &c].iter().map(|i| ca.count(i)).collect();
        tokio::time::sleep(RENEWAL).await;
        assert_eq!(ca.count(&a), before[0], "no CSR for a after it left");
        assert!(ca.count(&b) > before[1], "b renewed");
        assert!(ca.count(&c) > before[2], "c renewed");

        src.remove_workload("b2");
        settled().await;
        assert!(!listed(&certs, &b), "last replica of b gone");
        assert_eq!(certs.dump(&[]).len(), 1, "{:?}", certs.dump(&[]));
    }

    /// A workload removed and re-added in two changes closer than the settle time keeps its
    /// certificate (the claim is computed on the newest snapshot once things settle).
    #[tokio::test]
    async fn remove_and_readd_within_settle_keeps_the_certificate() {
        let ca = CountingCa::new();
        let certs = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let store = Store::new();
        let src = store.source("file");
        src.upsert_workload(workload("a", "sa-a", "n1"));
        let _watch = watch(
            store.clone(),
            certs.clone(),
            Some("n1".into()),
            Duration::from_millis(300),
        );
        let a = Identity::new("cluster.local", "ns1", "sa-a");
        certs.fetch_certificate(&a).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        src.remove_workload("a");
        tokio::time::sleep(Duration::from_millis(50)).await;
        src.upsert_workload(workload("a2", "sa-a", "n1"));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(listed(&certs, &a));
        assert_eq!(ca.count(&a), 1, "the same certificate, not a new one");
    }

    /// In-pod holds compose with the node claim: a held identity stays when its last node
    /// workload leaves.
    #[tokio::test]
    async fn held_identity_survives_the_node_claim() {
        let ca = CountingCa::new();
        let certs = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let store = Store::new();
        let src = store.source("file");
        src.upsert_workload(workload("a", "sa-a", "n1"));
        let _watch = watch(store.clone(), certs.clone(), Some("n1".into()), SETTLE_TEST);
        let a = Identity::new("cluster.local", "ns1", "sa-a");
        let hold = certs.hold("ns1", "sa-a");
        certs.fetch_certificate(&a).await.unwrap();
        src.remove_workload("a");
        settled().await;
        assert!(listed(&certs, &a), "held in-pod");
        drop(hold);
        assert!(!listed(&certs, &a), "no owner left");
    }

    /// A mesh workload appearing on this node gets its certificate without any connection
    /// asking; plaintext workloads, other nodes' and (without `NODE_NAME`) any do not.
    #[tokio::test]
    async fn this_nodes_mesh_workloads_are_prefetched() {
        let ca = CountingCa::new();
        let certs = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let store = Store::new();
        let src = store.source("file");
        let _watch = watch(store.clone(), certs.clone(), Some("n1".into()), SETTLE_TEST);
        let mut plain = workload("p", "sa-plain", "n1");
        plain.protocol = Protocol::TCP;
        src.upsert_workload(plain);
        src.upsert_workload(workload("a", "sa-a", "n1"));
        src.upsert_workload(workload("r", "sa-r", "n2"));
        let id = |sa: &str| Identity::new("cluster.local", "ns1", sa);
        for _ in 0..100 {
            if certs.current(&id("sa-a")).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(certs.current(&id("sa-a")).is_some(), "prefetched");
        assert_eq!(ca.count(&id("sa-a")), 1);
        assert_eq!(ca.count(&id("sa-plain")), 0, "plaintext workload");
        assert_eq!(ca.count(&id("sa-r")), 0, "another node's");

        let everyone = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let _all = watch(store.clone(), everyone.clone(), None, SETTLE_TEST);
        settled().await;
        assert!(
            everyone.dump(&[]).is_empty(),
            "no NODE_NAME: nothing prefetched"
        );
    }

    #[test]
    fn node_identities_are_those_the_node_proxy_serves() {
        let store = Store::new();
        let src = store.source("file");
        for w in [
            workload("a", "sa-a", "n1"),
            workload("b", "sa-b", "n2"),
            workload("c", "sa-c", "\"\""),
        ] {
            src.upsert_workload(w);
        }
        let snap = store.snapshot();
        let id = |sa: &str| Identity::new("cluster.local", "ns1", sa);
        assert_eq!(
            node_identities(&snap, Some("n1")),
            HashSet::from([id("sa-a")])
        );
        assert_eq!(
            node_identities(&snap, None),
            HashSet::from([id("sa-a"), id("sa-b"), id("sa-c")])
        );
    }
}
