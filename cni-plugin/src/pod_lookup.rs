//! Fallback when the node agent cannot be reached: read the pod and its
//! namespace from the API server (kubeconfig written by the agent) and apply
//! the enablement rules, with the selectors the agent wrote into the CNI
//! config (`enablement_selectors`). Slow path only; every request is bounded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use mesh_proto::enablement::{self, Decision, EnablementConfig, EnablementSelectors, PodFacts};

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
    #[error("cannot decide: the CNI config's {0}")]
    Selectors(String),
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

/// The enablement rules applied to a pod and its namespace as the API returns them.
/// Excluded namespaces and the agent's own pods were skipped before any lookup
/// (`PluginConf::static_skip`), so no node-wide exclusions apply here.
fn decide_pod(pod: &Pod, ns: &Namespace, selectors: &EnablementSelectors) -> Decision {
    let no_labels = Default::default();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
    let ns_labels = ns.metadata.labels.as_ref().unwrap_or(&no_labels);
    let facts = PodFacts {
        namespace: pod.metadata.namespace.as_deref().unwrap_or_default(),
        name: pod.metadata.name.as_deref().unwrap_or_default(),
        labels,
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
    let cfg = EnablementConfig {
        selectors: selectors.clone(),
        ..Default::default()
    };
    enablement::decide(facts, ns_labels, &cfg)
}

/// GETs the pod and its namespace concurrently and decides.
pub async fn decide_from_api(
    kubeconfig: Kubeconfig,
    kubeconfig_path: &Path,
    selectors: &EnablementSelectors,
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
        Ok(decide_pod(&pod, &ns, selectors))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| LookupError::Timeout {
            namespace: namespace.into(),
            name: name.into(),
            after: timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PluginConf;
    use serde_json::{Value, json};

    /// Every vector of the shared table, as Pod and Namespace objects and the
    /// selectors in a CNI config: the plugin's mapping from API objects and
    /// its config feeds the rules what the vectors say.
    #[test]
    fn vectors_through_api_objects() {
        let text = include_str!("../../proto/testdata/enablement-cases.json");
        let table: Value = serde_json::from_str(text).unwrap();
        let cases = table["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for c in cases {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {
                    "name": "app-1", "namespace": "demo",
                    "labels": c.get("pod_labels").cloned().unwrap_or(json!({})),
                    "annotations": c.get("pod_annotations").cloned().unwrap_or(json!({})),
                },
                "spec": {"containers": [], "hostNetwork": c.get("host_network").cloned().unwrap_or(json!(false))},
            }))
            .unwrap();
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": "demo", "labels": c.get("namespace_labels").cloned().unwrap_or(json!({}))},
            }))
            .unwrap();
            let mut conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"});
            if let Some(s) = c.get("selectors") {
                conf["enablement_selectors"] = s.clone();
            }
            let conf = PluginConf::parse(conf.to_string().as_bytes()).unwrap();
            let d = decide_pod(&pod, &ns, conf.enablement_selectors.as_ref().unwrap());
            assert_eq!(
                d.is_ambient(),
                c["ambient"].as_bool().unwrap(),
                "case {}: {}",
                c["name"],
                d.reason()
            );
        }
    }
}
