//! Node authorization facts: which node a caller's pod runs on, and whether a
//! pod with a given service account runs on a node (istiod's node authorizer).
//!
//! [`KubePodDirectory`] keeps a compact index of every pod (one cluster-wide
//! watch, the only one the CA makes) and asks the API directly when the index
//! has not seen an object yet (a pod created a moment ago), so a fresh pod never
//! waits for the watch to catch up.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::authn::Caller;

/// Node authorization could not grant the request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NodeAuthError {
    /// The facts say no (gRPC `PermissionDenied`).
    #[error("{0}")]
    Denied(String),
    /// The facts could not be read (gRPC `Unavailable`).
    #[error("pod lookup failed: {0}")]
    Unavailable(String),
}

/// Pod facts for node authorization.
pub trait PodDirectory: Send + Sync + 'static {
    /// The node of the pod `caller`'s token is bound to. Denied when the token is not
    /// pod-bound, the pod does not exist (or has another uid), or runs under another
    /// service account.
    fn caller_node<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<String, NodeAuthError>>;

    /// Whether a (non-terminated) pod of service account `namespace/service_account`
    /// is scheduled on `node`.
    fn runs_on_node<'a>(
        &'a self,
        node: &'a str,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<bool, NodeAuthError>>;
}

/// What the index keeps per pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    /// Empty while unscheduled.
    pub node: String,
    /// Succeeded or Failed.
    pub terminated: bool,
}

impl PodFacts {
    pub fn from_pod(pod: &Pod) -> PodFacts {
        let spec = pod.spec.as_ref();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        PodFacts {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            terminated: matches!(phase, Some("Succeeded") | Some("Failed")),
        }
    }
}

type PodKey = (String, String);
type NodeKey = (String, String, String);

/// Pods by name and a count of live pods per (node, namespace, service account).
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<PodKey, PodFacts>,
    by_node: HashMap<NodeKey, usize>,
    /// Objects listed since the last watcher `Init` (replaces `pods` on `InitDone`).
    relist: Option<HashMap<PodKey, PodFacts>>,
}

impl PodIndex {
    fn node_key(ns: &str, f: &PodFacts) -> Option<NodeKey> {
        (!f.node.is_empty() && !f.terminated)
            .then(|| (f.node.clone(), ns.to_string(), f.service_account.clone()))
    }

    fn insert(&mut self, key: PodKey, facts: PodFacts) {
        self.remove(&key);
        if let Some(nk) = Self::node_key(&key.0, &facts) {
            *self.by_node.entry(nk).or_default() += 1;
        }
        self.pods.insert(key, facts);
    }

    fn remove(&mut self, key: &PodKey) {
        if let Some(old) = self.pods.remove(key)
            && let Some(nk) = Self::node_key(&key.0, &old)
            && let Some(n) = self.by_node.get_mut(&nk)
        {
            *n -= 1;
            if *n == 0 {
                self.by_node.remove(&nk);
            }
        }
    }

    /// Applies one watcher event.
    pub fn apply(&mut self, event: Event<Pod>) {
        let key_of = |p: &Pod| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        };
        match event {
            Event::Apply(p) => self.insert(key_of(&p), PodFacts::from_pod(&p)),
            Event::Delete(p) => self.remove(&key_of(&p)),
            Event::Init => self.relist = Some(HashMap::new()),
            Event::InitApply(p) => {
                let facts = PodFacts::from_pod(&p);
                self.relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(&p), facts);
            }
            Event::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                self.pods.clear();
                self.by_node.clear();
                for (k, f) in fresh {
                    self.insert(k, f);
                }
            }
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&PodFacts> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn runs_on_node(&self, node: &str, namespace: &str, sa: &str) -> bool {
        self.by_node
            .contains_key(&(node.to_string(), namespace.to_string(), sa.to_string()))
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// Checks a caller's pod facts (shared by the index and the API fallback).
pub fn check_caller_pod(
    caller: &Caller,
    pod_name: &str,
    facts: &PodFacts,
) -> Result<String, NodeAuthError> {
    let who = format!("pod {}/{pod_name}", caller.namespace);
    if let Some(uid) = &caller.pod_uid
        && uid != &facts.uid
    {
        return Err(NodeAuthError::Denied(format!(
            "{who} has uid {} but the token is bound to uid {uid}",
            facts.uid
        )));
    }
    if facts.service_account != caller.service_account {
        return Err(NodeAuthError::Denied(format!(
            "{who} runs as service account {} but the token is for {}",
            facts.service_account,
            caller.account()
        )));
    }
    if facts.node.is_empty() {
        return Err(NodeAuthError::Denied(format!(
            "{who} is not scheduled on a node"
        )));
    }
    Ok(facts.node.clone())
}

/// [`PodDirectory`] over the Kubernetes API with a watched index.
pub struct KubePodDirectory {
    api: Api<Pod>,
    index: Arc<RwLock<PodIndex>>,
    synced: watch::Receiver<bool>,
}

impl KubePodDirectory {
    /// Starts the cluster-wide pod watch on the current runtime.
    pub fn start(client: kube::Client) -> Arc<KubePodDirectory> {
        let api: Api<Pod> = Api::all(client);
        let index = Arc::new(RwLock::new(PodIndex::default()));
        let (synced_tx, synced) = watch::channel(false);
        let cfg = watcher::Config::default().any_semantic();
        let stream = watcher::watcher(api.clone(), cfg).default_backoff();
        let task_index = index.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => {
                        let done = matches!(event, Event::InitDone);
                        let mut idx = task_index.write().unwrap_or_else(|e| e.into_inner());
                        idx.apply(event);
                        if done {
                            tracing::info!(pods = idx.len(), "CA pod index synced");
                            synced_tx.send_replace(true);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "CA pod watch failed; retrying"),
                }
            }
        });
        Arc::new(KubePodDirectory { api, index, synced })
    }

    /// Resolves once the first full list has been indexed.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }
}

impl PodDirectory for KubePodDirectory {
    fn caller_node<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<String, NodeAuthError>> {
        Box::pin(async move {
            let pod_name = caller.pod_name.as_deref().ok_or_else(|| {
                NodeAuthError::Denied(format!(
                    "token of {} is not bound to a pod; node authorization needs a pod-bound (projected) token",
                    caller.account()
                ))
            })?;
            let cached = self
                .index
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&caller.namespace, pod_name)
                .cloned();
            let facts = match cached {
                Some(f) if caller.pod_uid.as_ref().is_none_or(|u| u == &f.uid) => f,
                _ => {
                    // Not indexed yet (or replaced): ask the API.
                    let api: Api<Pod> =
                        Api::namespaced(self.api.clone().into_client(), &caller.namespace);
                    match api.get_opt(pod_name).await {
                        Ok(Some(p)) => PodFacts::from_pod(&p),
                        Ok(None) => {
                            return Err(NodeAuthError::Denied(format!(
                                "pod {}/{pod_name} of the token does not exist",
                                caller.namespace
                            )));
                        }
                        Err(e) => {
                            return Err(NodeAuthError::Unavailable(format!(
                                "GET pod {}/{pod_name}: {e}",
                                caller.namespace
                            )));
                        }
                    }
                }
            };
            check_caller_pod(caller, pod_name, &facts)
        })
    }

    fn runs_on_node<'a>(
        &'a self,
        node: &'a str,
        namespace: &'a str,
        service_account: &'a str,
    ) -> BoxFuture<'a, Result<bool, NodeAuthError>> {
        Box::pin(async move {
            if self
                .index
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .runs_on_node(node, namespace, service_account)
            {
                return Ok(true);
            }
            // Not in the index: the pod may be newer than the watch. Ask the API.
            let api: Api<Pod> = Api::namespaced(self.api.clone().into_client(), namespace);
            let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
            let pods = api.list(&lp).await.map_err(|e| {
                NodeAuthError::Unavailable(format!("LIST pods in {namespace} on node {node}: {e}"))
            })?;
            Ok(pods.items.iter().any(|p| {
                let f = PodFacts::from_pod(p);
                f.node == node && !f.terminated && f.service_account == service_account
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                node_name: (!node.is_empty()).then(|| node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn index_counts_live_pods_per_node_and_account() {
        let mut idx = PodIndex::default();
        idx.apply(Event::Apply(pod("a", "p1", "sa", "n1", "Running")));
        idx.apply(Event::Apply(pod("a", "p2", "sa", "n1", "Running")));
        idx.apply(Event::Apply(pod("a", "p3", "sa", "n2", "Succeeded")));
        assert!(idx.runs_on_node("n1", "a", "sa"));
        assert!(
            !idx.runs_on_node("n2", "a", "sa"),
            "terminated pods do not count"
        );
        assert!(!idx.runs_on_node("n1", "b", "sa"));
        idx.apply(Event::Delete(pod("a", "p1", "sa", "n1", "Running")));
        assert!(idx.runs_on_node("n1", "a", "sa"));
        // A pod moving to another account (recreated under the same name).
        idx.apply(Event::Apply(pod("a", "p2", "other", "n1", "Running")));
        assert!(!idx.runs_on_node("n1", "a", "sa"));
        assert!(idx.runs_on_node("n1", "a", "other"));
    }

    #[test]
    fn relist_replaces_everything() {
        let mut idx = PodIndex::default();
        idx.apply(Event::Apply(pod("a", "gone", "sa", "n1", "Running")));
        idx.apply(Event::Init);
        idx.apply(Event::InitApply(pod("a", "new", "sa2", "n1", "Running")));
        // Until InitDone the old state is still served.
        assert!(idx.runs_on_node("n1", "a", "sa"));
        idx.apply(Event::InitDone);
        assert!(!idx.runs_on_node("n1", "a", "sa"));
        assert!(idx.runs_on_node("n1", "a", "sa2"));
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn caller_pod_checks() {
        let caller = Caller {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            pod_name: Some("zt".into()),
            pod_uid: Some("uid-zt".into()),
        };
        let facts = PodFacts::from_pod(&pod("istio-system", "zt", "ztunnel", "n1", "Running"));
        assert_eq!(check_caller_pod(&caller, "zt", &facts).unwrap(), "n1");
        let mut wrong_uid = facts.clone();
        wrong_uid.uid = "uid-other".into();
        assert!(matches!(
            check_caller_pod(&caller, "zt", &wrong_uid),
            Err(NodeAuthError::Denied(m)) if m.contains("uid")
        ));
        let mut wrong_sa = facts.clone();
        wrong_sa.service_account = "default".into();
        assert!(matches!(
            check_caller_pod(&caller, "zt", &wrong_sa),
            Err(NodeAuthError::Denied(m)) if m.contains("service account")
        ));
        let mut unscheduled = facts;
        unscheduled.node.clear();
        assert!(check_caller_pod(&caller, "zt", &unscheduled).is_err());
    }
}
