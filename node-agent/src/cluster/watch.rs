//! kube-rs watchers feeding the [`ClusterCache`]: all Namespaces, and the
//! Pods of this node (field selector `spec.nodeName=<node>`). Each cache
//! update's [`Change`]s go to the control loop through `changes`.
//!
//! The watchers retry with kube-rs' default backoff after errors (API
//! unreachable, `410 Gone` → re-list); a re-list replaces the cache
//! contents and reports what disappeared meanwhile.

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use super::cache::{Change, ClusterCache};
use super::pod::{NamespaceInfo, PodInfo};
use super::resources::{NamespaceObject, PodObject};

/// Handles of the two watcher tasks; aborted on drop.
pub struct Watchers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Watchers {
    /// Starts both watchers on the current runtime.
    pub fn start(
        client: kube::Client,
        node_name: &str,
        cache: Arc<ClusterCache>,
        changes: UnboundedSender<Change>,
    ) -> Self {
        let pods: Api<PodObject> = Api::all(client.clone());
        let pod_client = client.clone();
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let namespaces: Api<NamespaceObject> = Api::all(client);
        let node = node_name.to_string();
        let (c1, c2) = (cache.clone(), cache);
        let (tx1, tx2) = (changes.clone(), changes);
        let pod_task = tokio::spawn(async move {
            let stream = watcher::watcher(pods, pod_cfg).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => {
                        // Only a finished list leaves pods to confirm.
                        let list_done = matches!(ev, Event::InitDone);
                        send(&tx1, apply_pod_event(&c1, ev, &node));
                        for pod in list_done
                            .then(|| c1.take_unconfirmed())
                            .into_iter()
                            .flatten()
                        {
                            let (client, cache, tx) = (pod_client.clone(), c1.clone(), tx1.clone());
                            tokio::spawn(async move {
                                send(&tx, confirm_pod(&client, &cache, &pod).await)
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "pod watch failed; retrying")
                    }
                }
            }
        });
        let ns_task = tokio::spawn(async move {
            let stream = watcher::watcher(namespaces, watcher::Config::default()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => send(&tx2, apply_namespace_event(&c2, ev)),
                    Err(e) => tracing::warn!(error = %e, "namespace watch failed; retrying"),
                }
            }
        });
        Self {
            tasks: vec![pod_task, ns_task],
        }
    }
}

fn send(tx: &UnboundedSender<Change>, changes: Vec<Change>) {
    for c in changes {
        // The receiver is gone only at shutdown.
        let _ = tx.send(c);
    }
}

/// Applies one pod watcher event to the cache.
pub fn apply_pod_event(cache: &ClusterCache, ev: Event<PodObject>, node: &str) -> Vec<Change> {
    match ev {
        Event::Init => {
            cache.pods_init();
            Vec::new()
        }
        Event::InitApply(p) => {
            if let Some(info) = PodInfo::from_pod(&p) {
                cache.pods_init_apply(info);
            }
            Vec::new()
        }
        Event::InitDone => {
            let changes = cache.pods_init_done();
            tracing::info!(node, pods = cache.pod_count(), "pods of this node listed");
            changes
        }
        Event::Apply(p) => match PodInfo::from_pod(&p) {
            Some(info) => cache.apply_pod(info),
            None => Vec::new(),
        },
        Event::Delete(p) => match p.metadata.uid.as_deref() {
            Some(uid) => cache.delete_pod(uid),
            None => Vec::new(),
        },
    }
}

/// GETs a pod a list did not contain although an API read during the list
/// did (see [`ClusterCache::take_unconfirmed`]): deleted from the cache when
/// it no longer exists (or its name is another pod's now); kept when it
/// exists (the watch delivers it) or the GET fails (the next list decides).
pub async fn confirm_pod(
    client: &kube::Client,
    cache: &ClusterCache,
    pod: &PodInfo,
) -> Vec<Change> {
    let api: Api<PodObject> = Api::namespaced(client.clone(), &pod.namespace);
    match api.get_opt(&pod.name).await {
        Ok(Some(p)) if p.metadata.uid.as_deref() == Some(pod.uid.as_str()) => Vec::new(),
        Ok(_) => {
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), uid = %pod.uid,
                "pod read during a list no longer exists; forgetting it");
            cache.delete_pod(&pod.uid)
        }
        Err(e) => {
            tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e,
                "cannot confirm a pod read during a list; keeping it until the next list");
            Vec::new()
        }
    }
}

/// Applies one namespace watcher event to the cache.
pub fn apply_namespace_event(cache: &ClusterCache, ev: Event<NamespaceObject>) -> Vec<Change> {
    match ev {
        Event::Init => {
            cache.namespaces_init();
            Vec::new()
        }
        Event::InitApply(n) => {
            if let Some(info) = NamespaceInfo::from_namespace(&n) {
                cache.namespaces_init_apply(info);
            }
            Vec::new()
        }
        Event::InitDone => {
            tracing::info!("namespaces listed");
            cache.namespaces_init_done()
        }
        Event::Apply(n) => match NamespaceInfo::from_namespace(&n) {
            Some(info) => cache.apply_namespace(info),
            None => Vec::new(),
        },
        Event::Delete(n) => match n.metadata.name.as_deref() {
            Some(name) => cache.delete_namespace(name),
            None => Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::PodPhase;
    use crate::cluster::stub_server::{client, status};

    fn cached(cache: &ClusterCache) -> PodInfo {
        let pod = PodInfo {
            uid: "u2".into(),
            namespace: "demo".into(),
            name: "b".into(),
            phase: PodPhase::Running,
            ..Default::default()
        };
        cache.pods_init();
        cache.insert_from_api(pod);
        cache.pods_init_done();
        let mut late = cache.take_unconfirmed();
        assert_eq!(late.len(), 1);
        late.pop().unwrap()
    }

    fn pod_object(uid: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "b", "namespace": "demo", "uid": uid},
            "spec": {"nodeName": "node1"}})
    }

    #[tokio::test]
    async fn an_unconfirmed_pod_that_exists_is_kept() {
        let cache = ClusterCache::new("istio-system");
        let pod = cached(&cache);
        let c = client("200 OK", pod_object("u2")).await;
        assert!(confirm_pod(&c, &cache, &pod).await.is_empty());
        assert!(cache.pod("u2").is_some());
    }

    #[tokio::test]
    async fn an_unconfirmed_pod_that_is_gone_or_replaced_is_deleted() {
        for (line, body) in [
            ("404 Not Found", status(404, "NotFound")),
            ("200 OK", pod_object("u3-another-incarnation")),
        ] {
            let cache = ClusterCache::new("istio-system");
            let pod = cached(&cache);
            let c = client(line, body).await;
            assert_eq!(
                confirm_pod(&c, &cache, &pod).await,
                vec![Change::Pod("u2".into())],
                "{line}"
            );
            assert!(cache.pod("u2").is_none(), "{line}");
        }
    }

    #[tokio::test]
    async fn an_unconfirmed_pod_is_kept_when_the_api_fails() {
        let cache = ClusterCache::new("istio-system");
        let pod = cached(&cache);
        let c = client("500 Internal Server Error", status(500, "InternalError")).await;
        assert!(confirm_pod(&c, &cache, &pod).await.is_empty());
        assert!(cache.pod("u2").is_some());
    }
}
