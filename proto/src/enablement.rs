//! Which pods are ambient: one pure function, the same for the node agent
//! (which decides from its informers) and the CNI plugin (which decides from
//! two API GETs when the agent cannot be reached), so the two cannot differ.
//!
//! Upstream's default enablement selectors (pod label
//! `istio.io/dataplane-mode=ambient`, or namespace label `ambient` with the
//! pod label not `none`), plus the pods that are never enrolled: host-network
//! pods, sidecar-injected pods (`sidecar.istio.io/status`), pods in excluded
//! namespaces and the agent's own pods.
//!
//! Table-driven vectors: `proto/testdata/enablement-cases.json`.

use std::collections::BTreeMap;

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Name prefixes of the agent's own pods in its namespace: ours (DaemonSet
/// `node-agent`) and upstream's (`istio-cni-node`, which the plugin checks).
pub const AGENT_POD_PREFIXES: [&str; 2] = ["node-agent-", "istio-cni-node-"];

/// Node-wide inputs of the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnablementConfig {
    /// `EXCLUDE_NAMESPACES`.
    pub exclude_namespaces: Vec<String>,
    /// `POD_NAMESPACE`: the agent's namespace.
    pub agent_namespace: String,
    /// `POD_NAME`: the agent's own pod.
    pub agent_pod: Option<String>,
}

/// What the rules look at for one pod.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Value of the `istio.io/dataplane-mode` pod label.
    pub mode_label: Option<&'a str>,
    pub host_network: bool,
    /// The pod carries `sidecar.istio.io/status`.
    pub sidecar: bool,
}

/// The decision with its reason, for logs and the plugin's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Ambient(&'static str),
    NotAmbient(&'static str),
}

impl Decision {
    pub fn is_ambient(self) -> bool {
        matches!(self, Self::Ambient(_))
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Ambient(r) | Self::NotAmbient(r) => r,
        }
    }
}

/// Decides whether `pod` belongs in the mesh. `namespace_mode` is the value
/// of its namespace's `istio.io/dataplane-mode` label (`None`: no label, or
/// the namespace is not known).
pub fn decide(pod: PodFacts<'_>, namespace_mode: Option<&str>, cfg: &EnablementConfig) -> Decision {
    if cfg.exclude_namespaces.iter().any(|n| n == pod.namespace) {
        return Decision::NotAmbient("namespace is excluded (EXCLUDE_NAMESPACES)");
    }
    if pod.namespace == cfg.agent_namespace
        && (cfg.agent_pod.as_deref() == Some(pod.name)
            || AGENT_POD_PREFIXES.iter().any(|p| pod.name.starts_with(p)))
    {
        return Decision::NotAmbient("the node agent's own pod");
    }
    if pod.host_network {
        return Decision::NotAmbient("pod uses the host network");
    }
    if pod.sidecar {
        return Decision::NotAmbient("pod has a sidecar (sidecar.istio.io/status)");
    }
    match pod.mode_label {
        Some(DATAPLANE_MODE_NONE) => {
            return Decision::NotAmbient("pod label istio.io/dataplane-mode=none");
        }
        Some(DATAPLANE_MODE_AMBIENT) => {
            return Decision::Ambient("pod label istio.io/dataplane-mode=ambient");
        }
        _ => {}
    }
    if namespace_mode == Some(DATAPLANE_MODE_AMBIENT) {
        return Decision::Ambient("namespace label istio.io/dataplane-mode=ambient");
    }
    Decision::NotAmbient("neither pod nor namespace is labelled istio.io/dataplane-mode=ambient")
}

/// The `istio.io/dataplane-mode` value in a label map.
pub fn mode_label(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels.get(DATAPLANE_MODE_LABEL).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Case {
        name: String,
        #[serde(default)]
        pod_labels: BTreeMap<String, String>,
        #[serde(default)]
        pod_annotations: BTreeMap<String, String>,
        #[serde(default)]
        host_network: bool,
        #[serde(default)]
        namespace_labels: BTreeMap<String, String>,
        ambient: bool,
    }

    #[derive(Deserialize)]
    struct Cases {
        cases: Vec<Case>,
    }

    fn cfg() -> EnablementConfig {
        EnablementConfig {
            exclude_namespaces: vec!["kube-system".into()],
            agent_namespace: "istio-system".into(),
            agent_pod: Some("agent-pod-1".into()),
        }
    }

    #[test]
    fn table_vectors() {
        let text = include_str!("../testdata/enablement-cases.json");
        let cases: Cases = serde_json::from_str(text).unwrap();
        assert!(cases.cases.len() >= 10);
        for c in &cases.cases {
            let pod = PodFacts {
                namespace: "demo",
                name: "app-1",
                mode_label: mode_label(&c.pod_labels),
                host_network: c.host_network,
                sidecar: c.pod_annotations.contains_key(SIDECAR_STATUS_ANNOTATION),
            };
            let d = decide(pod, mode_label(&c.namespace_labels), &cfg());
            assert_eq!(
                d.is_ambient(),
                c.ambient,
                "case {:?}: {}",
                c.name,
                d.reason()
            );
        }
    }

    #[test]
    fn excluded_namespaces_and_own_pods_never_enrol() {
        let labelled = |namespace, name| PodFacts {
            namespace,
            name,
            mode_label: Some("ambient"),
            host_network: false,
            sidecar: false,
        };
        let c = cfg();
        for (pod, why) in [
            (labelled("kube-system", "coredns-1"), "excluded"),
            (labelled("istio-system", "agent-pod-1"), "own pod"),
            (labelled("istio-system", "node-agent-x7z"), "own pod"),
            (labelled("istio-system", "istio-cni-node-abc"), "own pod"),
        ] {
            let d = decide(pod, Some("ambient"), &c);
            assert!(!d.is_ambient(), "{why}: {}", d.reason());
        }
        // Same names elsewhere are ordinary pods.
        assert!(decide(labelled("demo", "node-agent-x7z"), None, &c).is_ambient());
        // ztunnel pods in the agent's namespace are decided by the rules.
        assert!(decide(labelled("istio-system", "ztunnel-1"), None, &c).is_ambient());
    }

    #[test]
    fn reasons_say_which_rule_applied() {
        let pod = PodFacts {
            namespace: "demo",
            name: "a",
            mode_label: None,
            host_network: false,
            sidecar: false,
        };
        assert_eq!(
            decide(pod, Some("ambient"), &cfg()),
            Decision::Ambient("namespace label istio.io/dataplane-mode=ambient")
        );
        assert!(decide(pod, None, &cfg()).reason().contains("neither"));
    }
}
