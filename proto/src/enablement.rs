//! Which pods are ambient: one pure function, the same for the node agent
//! (which decides from its informers) and the CNI plugin (which decides from
//! two API GETs when the agent cannot be reached), so the two cannot differ.
//!
//! First the pods that are never enrolled: pods in excluded namespaces, the
//! agent's own pods, host-network pods and sidecar-injected pods
//! (`sidecar.istio.io/status`). Then upstream istio-cni's enablement
//! selectors (`AMBIENT_ENABLEMENT_SELECTOR`): a list of
//! `{podSelector, namespaceSelector}` label selectors; a pod is ambient when
//! any entry's two selectors both match (an absent or empty selector matches
//! everything). The default list is upstream's: pod label
//! `istio.io/dataplane-mode=ambient`, or namespace label `ambient` with the
//! pod label not `none`.
//!
//! Table-driven vectors: `proto/testdata/enablement-cases.json`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::label_selector::{LabelSelector, Requirement, RequirementError, Selector};

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Name prefixes of the agent's own pods in its namespace: ours (DaemonSet
/// `node-agent`) and upstream's (`istio-cni-node`, which the plugin checks).
pub const AGENT_POD_PREFIXES: [&str; 2] = ["node-agent-", "istio-cni-node-"];
/// The node agent's setting holding the selectors (YAML).
pub const SELECTOR_ENV: &str = "AMBIENT_ENABLEMENT_SELECTOR";
/// Key of the compiled list (JSON) in the plugin's CNI config, as upstream.
pub const SELECTOR_CNI_KEY: &str = "enablement_selectors";

/// One entry of the selector list, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnablementSelector {
    #[serde(default, deserialize_with = "crate::label_selector::null_is_default")]
    pub pod_selector: LabelSelector,
    #[serde(default, deserialize_with = "crate::label_selector::null_is_default")]
    pub namespace_selector: LabelSelector,
}

/// Upstream's default list (istio-cni's `ambient.enablementSelectors`).
pub fn default_selectors() -> Vec<EnablementSelector> {
    let mode = |v: &str| BTreeMap::from([(DATAPLANE_MODE_LABEL.to_string(), v.to_string())]);
    vec![
        EnablementSelector {
            pod_selector: LabelSelector {
                match_labels: mode(DATAPLANE_MODE_AMBIENT),
                ..Default::default()
            },
            namespace_selector: LabelSelector::default(),
        },
        EnablementSelector {
            pod_selector: LabelSelector {
                match_expressions: vec![Requirement {
                    key: DATAPLANE_MODE_LABEL.into(),
                    operator: "NotIn".into(),
                    values: vec![DATAPLANE_MODE_NONE.into()],
                }],
                ..Default::default()
            },
            namespace_selector: LabelSelector {
                match_labels: mode(DATAPLANE_MODE_AMBIENT),
                ..Default::default()
            },
        },
    ]
}

/// An entry that does not compile: its index in the list, which of its two
/// selectors, and the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("enablement selector {index} ({field}): {error}")]
pub struct SelectorError {
    pub index: usize,
    /// `podSelector` or `namespaceSelector`.
    pub field: &'static str,
    pub error: RequirementError,
}

/// The validated selector list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnablementSelectors {
    source: Vec<EnablementSelector>,
    /// (pod, namespace) per entry.
    compiled: Vec<(Selector, Selector)>,
    is_default: bool,
}

impl Default for EnablementSelectors {
    fn default() -> Self {
        Self::compile(Vec::new()).expect("the default enablement selectors compile")
    }
}

impl EnablementSelectors {
    /// Validates `source`; an empty list means the default list.
    pub fn compile(source: Vec<EnablementSelector>) -> Result<Self, SelectorError> {
        let source = if source.is_empty() {
            default_selectors()
        } else {
            source
        };
        let compiled = source
            .iter()
            .enumerate()
            .map(|(index, e)| {
                let one = |field, s| {
                    Selector::compile(s).map_err(|error| SelectorError {
                        index,
                        field,
                        error,
                    })
                };
                Ok((
                    one("podSelector", &e.pod_selector)?,
                    one("namespaceSelector", &e.namespace_selector)?,
                ))
            })
            .collect::<Result<_, SelectorError>>()?;
        let is_default = source == default_selectors();
        Ok(Self {
            source,
            compiled,
            is_default,
        })
    }

    /// The list as written (after defaulting): what the installer puts in
    /// the plugin's CNI config.
    pub fn source(&self) -> &[EnablementSelector] {
        &self.source
    }

    /// The list as JSON (upstream's form: camelCase keys).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.source).expect("selectors serialise")
    }

    /// The list equals upstream's default.
    pub fn is_default(&self) -> bool {
        self.is_default
    }

    /// Index of the first entry whose pod and namespace selectors both match.
    pub fn matching_entry(
        &self,
        pod_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Option<usize> {
        self.compiled
            .iter()
            .position(|(p, n)| p.matches(pod_labels) && n.matches(namespace_labels))
    }
}

/// Node-wide inputs of the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnablementConfig {
    /// `EXCLUDE_NAMESPACES`.
    pub exclude_namespaces: Vec<String>,
    /// `POD_NAMESPACE`: the agent's namespace.
    pub agent_namespace: String,
    /// `POD_NAME`: the agent's own pod.
    pub agent_pod: Option<String>,
    /// `AMBIENT_ENABLEMENT_SELECTOR`.
    pub selectors: EnablementSelectors,
}

/// What the rules look at for one pod.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// The pod's labels.
    pub labels: &'a BTreeMap<String, String>,
    pub host_network: bool,
    /// The pod carries `sidecar.istio.io/status`.
    pub sidecar: bool,
}

/// Which rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    ExcludedNamespace,
    AgentPod,
    HostNetwork,
    Sidecar,
    /// Entry `index` of the selector list matched (`default`: the list is
    /// upstream's default).
    Selector {
        index: usize,
        default: bool,
    },
    /// No entry matched.
    NoSelector {
        default: bool,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ExcludedNamespace => f.write_str("namespace is excluded (EXCLUDE_NAMESPACES)"),
            Self::AgentPod => f.write_str("the node agent's own pod"),
            Self::HostNetwork => f.write_str("pod uses the host network"),
            Self::Sidecar => f.write_str("pod has a sidecar (sidecar.istio.io/status)"),
            Self::Selector {
                index: 0,
                default: true,
            } => write!(
                f,
                "pod label {DATAPLANE_MODE_LABEL}=ambient (default enablement selector 0)"
            ),
            Self::Selector {
                index,
                default: true,
            } => write!(
                f,
                "namespace label {DATAPLANE_MODE_LABEL}=ambient, pod not opted out (default enablement selector {index})"
            ),
            Self::Selector { index, .. } => write!(
                f,
                "enablement selector {index} ({SELECTOR_ENV}) matches the pod and its namespace"
            ),
            Self::NoSelector { default: true } => write!(
                f,
                "neither pod nor namespace is labelled {DATAPLANE_MODE_LABEL}=ambient, or the pod opts out with {DATAPLANE_MODE_NONE} (default enablement selectors)"
            ),
            Self::NoSelector { default: false } => write!(
                f,
                "no enablement selector ({SELECTOR_ENV}) matches the pod and its namespace"
            ),
        }
    }
}

/// The decision with its reason, for logs and the plugin's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Ambient(Reason),
    NotAmbient(Reason),
}

impl Decision {
    pub fn is_ambient(self) -> bool {
        matches!(self, Self::Ambient(_))
    }

    pub fn reason(self) -> Reason {
        match self {
            Self::Ambient(r) | Self::NotAmbient(r) => r,
        }
    }
}

/// Decides whether `pod` belongs in the mesh. `namespace_labels` are its
/// namespace's labels (empty when the namespace is not known).
pub fn decide(
    pod: PodFacts<'_>,
    namespace_labels: &BTreeMap<String, String>,
    cfg: &EnablementConfig,
) -> Decision {
    if cfg.exclude_namespaces.iter().any(|n| n == pod.namespace) {
        return Decision::NotAmbient(Reason::ExcludedNamespace);
    }
    if pod.namespace == cfg.agent_namespace
        && (cfg.agent_pod.as_deref() == Some(pod.name)
            || AGENT_POD_PREFIXES.iter().any(|p| pod.name.starts_with(p)))
    {
        return Decision::NotAmbient(Reason::AgentPod);
    }
    if pod.host_network {
        return Decision::NotAmbient(Reason::HostNetwork);
    }
    if pod.sidecar {
        return Decision::NotAmbient(Reason::Sidecar);
    }
    let default = cfg.selectors.is_default();
    match cfg.selectors.matching_entry(pod.labels, namespace_labels) {
        Some(index) => Decision::Ambient(Reason::Selector { index, default }),
        None => Decision::NotAmbient(Reason::NoSelector { default }),
    }
}

#[cfg(test)]
#[path = "enablement_tests.rs"]
mod tests;
