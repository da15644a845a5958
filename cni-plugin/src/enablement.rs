//! Which pods are ambient: upstream's default enablement selectors.
//!
//! The plugin needs these rules only on its fallback path (agent
//! unreachable). The node agent, which decides in the normal case, keeps its
//! own copy next to its informers (it also supports configurable selectors,
//! which this copy does not). Both run the shared vectors in
//! `cni-plugin/testdata/enablement-cases.json` so they cannot drift; the
//! plugin does not depend on the agent's crate to stay small.

use std::collections::BTreeMap;

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// What the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub host_network: bool,
}

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

/// Pod label `ambient`, or namespace label `ambient` with the pod label not
/// `none`; never host-network or sidecar-injected pods.
pub fn decide(pod: PodFacts<'_>, namespace_labels: &BTreeMap<String, String>) -> Decision {
    if pod.host_network {
        return Decision::NotAmbient("pod uses the host network");
    }
    if pod.annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
        return Decision::NotAmbient("pod has a sidecar (sidecar.istio.io/status)");
    }
    match pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some(DATAPLANE_MODE_NONE) => {
            return Decision::NotAmbient("pod label istio.io/dataplane-mode=none");
        }
        Some(DATAPLANE_MODE_AMBIENT) => {
            return Decision::Ambient("pod label istio.io/dataplane-mode=ambient");
        }
        _ => {}
    }
    if namespace_labels
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str)
        == Some(DATAPLANE_MODE_AMBIENT)
    {
        return Decision::Ambient("namespace label istio.io/dataplane-mode=ambient");
    }
    Decision::NotAmbient("neither pod nor namespace is labelled istio.io/dataplane-mode=ambient")
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

    #[test]
    fn shared_vectors() {
        let text = include_str!("../testdata/enablement-cases.json");
        let cases: Cases = serde_json::from_str(text).unwrap();
        assert!(cases.cases.len() >= 10);
        for c in &cases.cases {
            let pod = PodFacts {
                labels: &c.pod_labels,
                annotations: &c.pod_annotations,
                host_network: c.host_network,
            };
            let d = decide(pod, &c.namespace_labels);
            assert_eq!(
                d.is_ambient(),
                c.ambient,
                "case {:?}: {}",
                c.name,
                d.reason()
            );
        }
    }
}
