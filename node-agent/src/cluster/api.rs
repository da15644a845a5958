//! The few direct API calls the agent makes besides its watchers, behind
//! [`ClusterApi`] so the control loop can be tested with a fake:
//! GET a pod or namespace the cache has not seen yet (CNI ADD), patch the
//! `ambient.istio.io/redirection` annotation through `pods/status`, and GET
//! the agent's own DaemonSet on shutdown (upgrade or uninstall?).

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::pod::{NamespaceInfo, PodInfo, REDIRECTION_ANNOTATION};
use super::resources::{NamespaceObject, PodObject};

/// A failed API call, naming the verb and the object.
#[derive(Debug, thiserror::Error)]
#[error("{verb} {object}: {reason}")]
pub struct ApiError {
    pub verb: &'static str,
    /// e.g. `pod demo/web-1`, `daemonset istio-system/node-agent`.
    pub object: String,
    pub reason: String,
}

/// Direct API calls of the control loop.
pub trait ClusterApi: Send + Sync {
    /// `Ok(None)`: the pod does not exist.
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, ApiError>>;

    /// `Ok(None)`: the namespace does not exist.
    fn get_namespace<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>>;

    /// Sets (`Some`) or removes (`None`) `ambient.istio.io/redirection` on
    /// the pod, through `pods/status`. A pod that no longer exists is not an
    /// error.
    fn set_redirection<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Whether DaemonSet `namespace/name` exists and is not being deleted.
    fn daemonset_exists<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<bool, ApiError>>;

    /// DaemonSet `namespace/name` as the shutdown's upgrade-or-uninstall
    /// decision sees it. `Err`: cannot tell. The default (for fakes) derives
    /// it from [`ClusterApi::daemonset_exists`].
    fn daemonset_state<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<DaemonSetState, ApiError>> {
        Box::pin(async move {
            Ok(if self.daemonset_exists(namespace, name).await? {
                DaemonSetState::Present
            } else {
                DaemonSetState::Gone("the DaemonSet does not exist")
            })
        })
    }
}

/// What the agent's own DaemonSet says when the agent stops. As upstream's
/// install-cni decides: the DaemonSet not found, marked for deletion
/// (`metadata.deletionTimestamp`, e.g. `helm uninstall` with a foreground
/// delete or a finalizer), the agent no longer authenticated (401: its
/// ServiceAccount was deleted with the chart) or no longer authorised (403:
/// its RBAC was deleted — `helm uninstall` deletes the DaemonSet first and the
/// RoleBindings right after, so the terminating agent usually sees this) mean
/// uninstall. Wrongly taking an upgrade for an uninstall costs a short window
/// until the new agent chains the plugin again; the opposite leaves the plugin
/// chained on the node after the product is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonSetState {
    /// Present and not being deleted: an upgrade, a restart or a node reboot.
    Present,
    /// Uninstall, with the reason.
    Gone(&'static str),
}

/// Maps the DaemonSet GET to a [`DaemonSetState`]; other errors (5xx,
/// timeouts, network) are "cannot tell".
fn daemonset_state_from(
    got: Result<Option<DaemonSet>, kube::Error>,
    namespace: &str,
    name: &str,
) -> Result<DaemonSetState, ApiError> {
    match got {
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => Ok(DaemonSetState::Gone(
            "the DaemonSet is marked for deletion (deletionTimestamp is set)",
        )),
        Ok(Some(_)) => Ok(DaemonSetState::Present),
        Ok(None) => Ok(DaemonSetState::Gone("the DaemonSet does not exist")),
        Err(kube::Error::Api(s)) if s.code == 401 => Ok(DaemonSetState::Gone(
            "the API server no longer accepts the agent's credentials (401 Unauthorized)",
        )),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(DaemonSetState::Gone(
            "the agent may no longer read its DaemonSet (403 Forbidden: its RBAC was deleted, as helm uninstall does)",
        )),
        Err(e) => Err(ApiError {
            verb: "GET",
            object: format!("daemonset {namespace}/{name}"),
            reason: e.to_string(),
        }),
    }
}

/// [`ClusterApi`] over a kube-rs client.
#[derive(Clone)]
pub struct KubeApi {
    client: kube::Client,
}

impl KubeApi {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

/// The merge patch that sets or removes the redirection annotation.
pub fn redirection_patch(value: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } } })
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl ClusterApi for KubeApi {
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, ApiError>> {
        Box::pin(async move {
            let api: Api<PodObject> = Api::namespaced(self.client.clone(), namespace);
            api.get_opt(name)
                .await
                .map(|p| p.as_ref().and_then(PodInfo::from_pod))
                .map_err(|e| ApiError {
                    verb: "GET",
                    object: format!("pod {namespace}/{name}"),
                    reason: e.to_string(),
                })
        })
    }

    fn get_namespace<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>> {
        Box::pin(async move {
            let api: Api<NamespaceObject> = Api::all(self.client.clone());
            api.get_opt(name)
                .await
                .map(|n| n.as_ref().and_then(NamespaceInfo::from_namespace))
                .map_err(|e| ApiError {
                    verb: "GET",
                    object: format!("namespace {name}"),
                    reason: e.to_string(),
                })
        })
    }

    fn set_redirection<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let api: Api<PodObject> = Api::namespaced(self.client.clone(), namespace);
            let patch = redirection_patch(value);
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(ApiError {
                    verb: "PATCH",
                    object: format!("pods/status {namespace}/{name}"),
                    reason: e.to_string(),
                }),
            }
        })
    }

    fn daemonset_exists<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(async move {
            Ok(self.daemonset_state(namespace, name).await? == DaemonSetState::Present)
        })
    }

    fn daemonset_state<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<DaemonSetState, ApiError>> {
        Box::pin(async move {
            let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), namespace);
            daemonset_state_from(api.get_opt(name).await, namespace, name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_sets_and_removes_the_annotation() {
        assert_eq!(
            redirection_patch(Some("enabled")).to_string(),
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"}}}"#
        );
        assert_eq!(
            redirection_patch(None).to_string(),
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":null}}}"#
        );
    }

    async fn stub(status: &'static str, body: serde_json::Value) -> KubeApi {
        KubeApi::new(crate::cluster::stub_server::client(status, body).await)
    }

    fn daemonset(deleting: bool) -> serde_json::Value {
        let mut ds = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "node-agent", "namespace": "istio-system"},
        });
        if deleting {
            ds["metadata"]["deletionTimestamp"] = "2026-11-27T08:00:00Z".into();
        }
        ds
    }

    use crate::cluster::stub_server::status;

    async fn state(api: &KubeApi) -> Result<DaemonSetState, ApiError> {
        api.daemonset_state("istio-system", "node-agent").await
    }

    #[tokio::test]
    async fn daemonset_present_means_upgrade() {
        let api = stub("200 OK", daemonset(false)).await;
        assert_eq!(state(&api).await.unwrap(), DaemonSetState::Present);
        assert!(
            api.daemonset_exists("istio-system", "node-agent")
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn daemonset_marked_for_deletion_means_uninstall() {
        let api = stub("200 OK", daemonset(true)).await;
        let DaemonSetState::Gone(why) = state(&api).await.unwrap() else {
            panic!("a DaemonSet being deleted is an uninstall");
        };
        assert!(why.contains("deletionTimestamp"), "{why}");
        assert!(
            !api.daemonset_exists("istio-system", "node-agent")
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn daemonset_not_found_unauthenticated_or_forbidden_means_uninstall() {
        let api = stub("404 Not Found", status(404, "NotFound")).await;
        assert!(
            matches!(state(&api).await.unwrap(), DaemonSetState::Gone(w) if w.contains("does not exist"))
        );
        let api = stub("401 Unauthorized", status(401, "Unauthorized")).await;
        assert!(matches!(state(&api).await.unwrap(), DaemonSetState::Gone(w) if w.contains("401")));
        let api = stub("403 Forbidden", status(403, "Forbidden")).await;
        assert!(matches!(state(&api).await.unwrap(), DaemonSetState::Gone(w) if w.contains("403")));
    }

    #[tokio::test]
    async fn other_errors_cannot_tell_and_name_the_daemonset() {
        for (line, code, reason) in [
            ("500 Internal Server Error", 500, "InternalError"),
            ("502 Bad Gateway", 502, "BadGateway"),
        ] {
            let api = stub(line, status(code, reason)).await;
            let e = state(&api).await.unwrap_err();
            assert_eq!(e.object, "daemonset istio-system/node-agent", "{e}");
        }
    }
}
