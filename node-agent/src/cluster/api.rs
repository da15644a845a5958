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

    /// Whether DaemonSet `namespace/name` exists.
    fn daemonset_exists<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<bool, ApiError>>;
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
            let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), namespace);
            api.get_opt(name)
                .await
                .map(|d| d.is_some())
                .map_err(|e| ApiError {
                    verb: "GET",
                    object: format!("daemonset {namespace}/{name}"),
                    reason: e.to_string(),
                })
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
}
