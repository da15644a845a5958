//! Slim Pod and Namespace types for the agent's watches and GETs: standard
//! `metadata`, and of `spec`/`status` only the fields the agent reads
//! (serde skips the rest). Decoding a full `k8s_openapi` Pod (containers,
//! volumes, probes, ...) for every watch event costs memory and code the
//! agent never uses; these keep the agent small (see the memory benchmark,
//! `e2e/tests/control_loop_memory.rs`).

use std::borrow::Cow;

use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};

/// A Pod with only what the agent reads.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PodObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpecLite>,
    #[serde(default)]
    pub status: Option<PodStatusLite>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecLite {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub service_account_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusLite {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIpLite>>,
    #[serde(default)]
    pub conditions: Option<Vec<ConditionLite>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PodIpLite {
    #[serde(default)]
    pub ip: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ConditionLite {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub status: String,
}

/// A Namespace's metadata (its labels are all the agent reads).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct NamespaceObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

impl kube::Resource for PodObject {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl kube::Resource for NamespaceObject {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Namespace".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "namespaces".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_match_the_core_resources() {
        use kube::Resource;
        assert_eq!(
            PodObject::url_path(&(), Some("demo")),
            "/api/v1/namespaces/demo/pods"
        );
        assert_eq!(NamespaceObject::url_path(&(), None), "/api/v1/namespaces");
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let p: PodObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "n", "uid": "u",
                         "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:x": {}}}]},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}], "nodeName": "node1"},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                       "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": null}],
                       "containerStatuses": [{"name": "c", "ready": true}]}
        }))
        .unwrap();
        assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("node1"));
        let st = p.status.unwrap();
        assert_eq!(st.pod_ips.unwrap()[0].ip, "10.0.0.1");
        assert_eq!(st.conditions.unwrap()[0].type_, "Ready");
    }
}
