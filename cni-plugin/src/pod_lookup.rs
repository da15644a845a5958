//! Fallback when the node agent cannot be reached: read the pod and its
//! namespace from the API server (kubeconfig written by the agent) and apply
//! the enablement rules. Slow path only; every request is bounded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use mesh_proto::enablement::{self, Decision, EnablementConfig, PodFacts};

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client from {path}: {reason}")]
    Client { path: PathBuf, reason: String },
    #[error("cannot get {what}: {source}")]
    Get {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("looking up pod {namespace}/{name} took longer than {after:?}")]
    Timeout {
        namespace: String,
        name: String,
        after: Duration,
    },
}

/// Loads the kubeconfig (a small file read; done before the async part).
pub fn load_kubeconfig(path: &Path) -> Result<Kubeconfig, LookupError> {
    Kubeconfig::read_from(path).map_err(|source| LookupError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    })
}

/// GETs the pod and its namespace concurrently and decides.
pub async fn decide_from_api(
    kubeconfig: Kubeconfig,
    kubeconfig_path: &Path,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Decision, LookupError> {
    let work = async {
        let client_err = |reason: String| LookupError::Client {
            path: kubeconfig_path.to_path_buf(),
            reason,
        };
        let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| client_err(e.to_string()))?;
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        // Retries are the caller's decision (enable_ambient_detection_retry).
        config.default_retry = false;
        let client = Client::try_from(config).map_err(|e| client_err(e.to_string()))?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let namespaces: Api<Namespace> = Api::all(client);
        let (pod, ns) = tokio::join!(pods.get(name), namespaces.get(namespace));
        let pod = pod.map_err(|source| LookupError::Get {
            what: format!("pod {namespace}/{name}"),
            source,
        })?;
        let ns = ns.map_err(|source| LookupError::Get {
            what: format!("namespace {namespace}"),
            source,
        })?;
        let labels = pod.metadata.labels.unwrap_or_default();
        let facts = PodFacts {
            namespace,
            name,
            mode_label: enablement::mode_label(&labels),
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
            sidecar: pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(enablement::SIDECAR_STATUS_ANNOTATION)),
        };
        let ns_labels = ns.metadata.labels.unwrap_or_default();
        // Excluded namespaces and the agent's own pods were skipped before any lookup
        // (`PluginConf::static_skip`), so no node-wide exclusions apply here.
        Ok(enablement::decide(
            facts,
            enablement::mode_label(&ns_labels),
            &EnablementConfig::default(),
        ))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| LookupError::Timeout {
            namespace: namespace.into(),
            name: name.into(),
            after: timeout,
        })?
}
