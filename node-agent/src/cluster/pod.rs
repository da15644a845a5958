//! What the agent keeps about each pod and namespace: a small extract of the
//! Kubernetes objects (the informer cache holds these, not whole objects, to
//! keep the agent's memory small: labels, which the enablement selectors
//! read, but only the annotations that matter), and the pure queries over
//! them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::enablement::{self, Decision, EnablementConfig, PodFacts, SIDECAR_STATUS_ANNOTATION};
use super::resources::{NamespaceObject, PodObject};
use crate::redirect::PodRedirect;
use crate::redirect::inpod::rules::{
    ANNOTATION_BYPASS_INBOUND, ANNOTATION_DNS_CAPTURE, ANNOTATION_REROUTE_VIRTUAL_INTERFACES,
};

/// The annotation the agent writes on enrolled pods (through `pods/status`).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Its value after a complete enrolment.
pub const REDIRECTION_ENABLED: &str = "enabled";
/// Its value while ztunnel has not taken the pod (retried).
pub const REDIRECTION_PENDING: &str = "pending";
/// Label of ztunnel pods (the chart sets `app: ztunnel`).
pub const APP_LABEL: &str = "app";
pub const ZTUNNEL_APP: &str = "ztunnel";

/// Pod annotations that change a pod's redirection rules; the only
/// annotations kept besides the agent's own.
const RULE_ANNOTATIONS: [&str; 3] = [
    ANNOTATION_DNS_CAPTURE,
    ANNOTATION_BYPASS_INBOUND,
    ANNOTATION_REROUTE_VIRTUAL_INTERFACES,
];

/// `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    fn parse(s: Option<&str>) -> Self {
        match s {
            Some("Running") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            Some("Unknown") => Self::Unknown,
            _ => Self::Pending,
        }
    }

    /// Its containers have all stopped for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// One pod as the agent knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node_name: Option<String>,
    pub service_account: String,
    /// All labels (the enablement selectors may look at any).
    pub labels: BTreeMap<String, String>,
    /// `app` label.
    pub app_label: Option<String>,
    pub host_network: bool,
    /// Carries `sidecar.istio.io/status`.
    pub sidecar: bool,
    pub phase: PodPhase,
    /// `status.podIPs` (else `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// Condition `Ready` is `True`.
    pub ready: bool,
    /// `metadata.creationTimestamp`, Unix seconds.
    pub created: i64,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// Current value of `ambient.istio.io/redirection`.
    pub redirection: Option<String>,
    /// Annotations that change the pod's rules.
    pub rule_annotations: BTreeMap<String, String>,
}

impl PodInfo {
    /// Extracts what the agent needs; `None` when the object has no
    /// namespace, name or UID.
    pub fn from_pod(pod: &PodObject) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
        let namespace = meta.namespace.clone()?;
        let name = meta.name.clone()?;
        let labels = meta.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
        let annotations = meta.annotations.as_ref();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Some(Self {
            uid,
            namespace,
            name,
            node_name: spec.and_then(|s| s.node_name.clone()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            labels: labels.cloned().unwrap_or_default(),
            app_label: label(APP_LABEL),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            sidecar: annotations.is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION)),
            phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
            ips,
            ready,
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(0),
            deleting: meta.deletion_timestamp.is_some(),
            redirection: annotations.and_then(|a| a.get(REDIRECTION_ANNOTATION).cloned()),
            rule_annotations: annotations
                .map(|a| {
                    a.iter()
                        .filter(|(k, _)| RULE_ANNOTATIONS.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The enablement rules applied to this pod; `namespace_labels` are its
    /// namespace's (empty when the namespace is not known).
    pub fn decide(
        &self,
        namespace_labels: &BTreeMap<String, String>,
        cfg: &EnablementConfig,
    ) -> Decision {
        enablement::decide(
            PodFacts {
                namespace: &self.namespace,
                name: &self.name,
                labels: &self.labels,
                host_network: self.host_network,
                sidecar: self.sidecar,
            },
            namespace_labels,
            cfg,
        )
    }

    /// Sets (`Some`) or removes (`None`) label `key`.
    pub fn set_label(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.labels.insert(key.to_string(), v.to_string()),
            None => self.labels.remove(key),
        };
    }

    /// What a redirector needs; `netns` is the pod's netns path if known.
    pub fn to_redirect(&self, netns: Option<std::path::PathBuf>) -> PodRedirect {
        PodRedirect {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            ips: self.ips.clone(),
            netns,
            annotations: self.rule_annotations.clone(),
        }
    }
}

/// One namespace as the agent knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    /// All labels (the enablement selectors may look at any): any change
    /// re-evaluates the namespace's pods.
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    pub fn from_namespace(ns: &NamespaceObject) -> Option<Self> {
        Some(Self {
            name: ns.metadata.name.clone()?,
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        })
    }

    /// A namespace named `name` with `labels`.
    pub fn new(name: impl Into<String>, labels: &[(&str, &str)]) -> Self {
        Self {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// GENEVE mode's active ztunnel: the newest Ready, running, not terminating
/// pod labelled `app=ztunnel` in `namespace` with an IP (ties: larger name).
pub fn active_ztunnel<'a>(
    pods: impl IntoIterator<Item = &'a PodInfo>,
    namespace: &str,
) -> Option<&'a PodInfo> {
    pods.into_iter()
        .filter(|p| {
            p.namespace == namespace
                && p.app_label.as_deref() == Some(ZTUNNEL_APP)
                && p.ready
                && p.phase == PodPhase::Running
                && !p.deleting
                && !p.ips.is_empty()
        })
        .max_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::resources::{PodSpecLite, PodStatusLite};
    use kube::api::ObjectMeta;

    fn pod_json() -> PodObject {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1", "namespace": "demo", "uid": "u-1",
                "creationTimestamp": "2025-01-02T03:04:05Z",
                "labels": {"istio.io/dataplane-mode": "ambient", "app": "web", "x": "y"},
                "annotations": {
                    "ambient.istio.io/redirection": "enabled",
                    "ambient.istio.io/dns-capture": "true",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...big...}"
                }
            },
            "spec": {"nodeName": "node1", "serviceAccountName": "web-sa", "containers": []},
            "status": {
                "phase": "Running", "podIP": "10.244.1.5",
                "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn extracts_only_what_is_needed() {
        let p = PodInfo::from_pod(&pod_json()).unwrap();
        assert_eq!(p.key(), "demo/web-1");
        assert_eq!(p.uid, "u-1");
        assert_eq!(p.node_name.as_deref(), Some("node1"));
        assert_eq!(p.service_account, "web-sa");
        assert_eq!(p.labels["istio.io/dataplane-mode"], "ambient");
        assert_eq!(p.labels.len(), 3, "every label kept: {:?}", p.labels);
        assert_eq!(p.app_label.as_deref(), Some("web"));
        assert_eq!(p.phase, PodPhase::Running);
        assert!(p.ready && !p.deleting && !p.host_network && !p.sidecar);
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.created, 1_735_787_045);
        assert_eq!(p.redirection.as_deref(), Some("enabled"));
        assert_eq!(p.rule_annotations.len(), 1, "only rule annotations kept");
        let r = p.to_redirect(Some("/var/run/netns/x".into()));
        assert_eq!(r.uid, "u-1");
        assert_eq!(r.annotations["ambient.istio.io/dns-capture"], "true");
    }

    #[test]
    fn objects_without_identity_are_ignored_and_defaults_apply() {
        let mut pod = PodObject::default();
        assert!(PodInfo::from_pod(&pod).is_none());
        pod.metadata = ObjectMeta {
            name: Some("a".into()),
            namespace: Some("n".into()),
            uid: Some("u".into()),
            ..Default::default()
        };
        let p = PodInfo::from_pod(&pod).unwrap();
        assert_eq!(p.service_account, "default");
        assert_eq!(p.phase, PodPhase::Pending);
        assert!(p.ips.is_empty() && !p.ready);
        // podIP alone is used when podIPs is absent
        pod.status = Some(PodStatusLite {
            pod_ip: Some("10.0.0.9".into()),
            pod_ips: Some(vec![]),
            ..Default::default()
        });
        pod.spec = Some(PodSpecLite {
            host_network: Some(true),
            ..Default::default()
        });
        let p = PodInfo::from_pod(&pod).unwrap();
        assert_eq!(p.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert!(p.host_network);
    }

    fn zt(name: &str, created: i64, ready: bool) -> PodInfo {
        PodInfo {
            uid: format!("uid-{name}"),
            namespace: "istio-system".into(),
            name: name.into(),
            app_label: Some("ztunnel".into()),
            phase: PodPhase::Running,
            ready,
            created,
            ips: vec!["10.244.1.9".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn active_ztunnel_is_the_newest_ready_one() {
        let a = zt("ztunnel-a", 100, true);
        let b = zt("ztunnel-b", 200, true);
        let c = zt("ztunnel-c", 300, false);
        let mut d = zt("ztunnel-d", 400, true);
        d.deleting = true;
        let mut other_ns = zt("ztunnel-e", 500, true);
        other_ns.namespace = "demo".into();
        let mut not_zt = zt("web", 600, true);
        not_zt.app_label = Some("web".into());
        let pods = [a.clone(), b.clone(), c, d, other_ns, not_zt];
        assert_eq!(
            active_ztunnel(&pods, "istio-system").map(|p| p.name.as_str()),
            Some("ztunnel-b")
        );
        assert_eq!(
            active_ztunnel(std::slice::from_ref(&a), "istio-system").map(|p| p.name.as_str()),
            Some("ztunnel-a")
        );
        assert!(active_ztunnel(&[] as &[PodInfo], "istio-system").is_none());
    }
}
