//! The plugin's network configuration (stdin), with upstream istio-cni's keys.

use std::path::PathBuf;

use mesh_proto::cni_event::{DEFAULT_AGENT_RUN_DIR, PLUGIN_EVENT_SOCKET};
use mesh_proto::enablement::{EnablementSelector, EnablementSelectors, SELECTOR_CNI_KEY};
use serde::Deserialize;
use serde_json::Value;

use crate::cni::error::{CniError, ErrorCode};
use crate::cni::result::PrevResult;
use crate::cni::version::SpecVersion;

/// File name of the kubeconfig the agent writes for the plugin, inside the
/// run dir; used when the config does not name one.
pub const PLUGIN_KUBECONFIG: &str = "istio-cni-kubeconfig";
/// Namespaces skipped when the config does not list any.
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];
/// Name prefix of the node agent's own pods (in `pod_namespace`).
pub const AGENT_POD_PREFIX: &str = "istio-cni-node-";

#[derive(Debug, Default, Deserialize)]
struct Raw {
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    plugin_log_level: Option<String>,
    cni_agent_run_dir: Option<String>,
    #[serde(default)]
    ambient_enabled: bool,
    exclude_namespaces: Option<Vec<String>>,
    pod_namespace: Option<String>,
    #[serde(default)]
    enable_ambient_detection_retry: bool,
    /// Upstream's key; kept raw, checked by [`enablement_selectors`].
    enablement_selectors: Option<Value>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Default, Deserialize)]
struct RawKubernetes {
    kubeconfig: Option<String>,
    /// Older upstream configs put the list here.
    exclude_namespaces: Option<Vec<String>>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct PluginConf {
    /// `cniVersion` as written (echoed back in results and errors).
    pub cni_version: String,
    pub version: SpecVersion,
    pub name: String,
    pub prev_result: Option<PrevResult>,
    pub log_level: String,
    pub run_dir: PathBuf,
    pub ambient_enabled: bool,
    pub exclude_namespaces: Vec<String>,
    /// The node agent's namespace (its own pods are never enrolled).
    pub agent_namespace: Option<String>,
    pub detection_retry: bool,
    pub kubeconfig: PathBuf,
    /// `enablement_selectors` (the agent's `AMBIENT_ENABLEMENT_SELECTOR`),
    /// for the fallback decision; absent, `null` or empty = upstream's
    /// default list. A bad value fails only that decision (it is needed only
    /// when the agent cannot be reached).
    pub enablement_selectors: Result<EnablementSelectors, String>,
}

impl PluginConf {
    /// Parses stdin. Not JSON (or not an object): code 6; unsupported
    /// `cniVersion`: code 1; a known key of the wrong type, or a missing
    /// `name`/`type`: code 7.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let (value, version, cni_version) = Self::envelope(stdin)?;
        let raw: Raw = serde_json::from_value(value).map_err(|e| {
            CniError::new(ErrorCode::InvalidNetworkConfig, "invalid istio-cni config")
                .with_details(e.to_string())
        })?;
        let name = raw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "network config has no \"name\"",
            )
        })?;
        if raw.plugin_type.as_deref().is_none_or(str::is_empty) {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("network config {name:?} has no \"type\""),
            ));
        }
        let prev_result = raw
            .prev_result
            .map(PrevResult::from_value)
            .transpose()
            .map_err(|e| {
                CniError::new(ErrorCode::InvalidNetworkConfig, "invalid prevResult").with_details(e)
            })?;
        let run_dir = PathBuf::from(
            raw.cni_agent_run_dir
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| DEFAULT_AGENT_RUN_DIR.into()),
        );
        let kube = raw.kubernetes.unwrap_or_default();
        // No list at all: the default. A list the agent wrote empty (its
        // `EXCLUDE_NAMESPACES` cleared) excludes nothing, as the agent does.
        let exclude: Vec<String> =
            if raw.exclude_namespaces.is_none() && kube.exclude_namespaces.is_none() {
                DEFAULT_EXCLUDED_NAMESPACES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            } else {
                raw.exclude_namespaces
                    .into_iter()
                    .chain(kube.exclude_namespaces)
                    .flatten()
                    .filter(|n| !n.is_empty())
                    .collect()
            };
        let kubeconfig = kube
            .kubeconfig
            .filter(|k| !k.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| run_dir.join(PLUGIN_KUBECONFIG));
        Ok(Self {
            cni_version,
            version,
            name,
            prev_result,
            log_level: raw.plugin_log_level.unwrap_or_else(|| "info".into()),
            run_dir,
            ambient_enabled: raw.ambient_enabled,
            exclude_namespaces: exclude,
            agent_namespace: raw.pod_namespace.filter(|n| !n.is_empty()),
            detection_retry: raw.enable_ambient_detection_retry,
            kubeconfig,
            enablement_selectors: enablement_selectors(raw.enablement_selectors),
        })
    }

    /// What every command needs of stdin, and all that DEL checks (DEL has nothing to undo,
    /// so a key this version does not accept must not block a sandbox's teardown): a JSON
    /// object with a supported `cniVersion`. Not JSON (or not an object): code 6;
    /// unsupported `cniVersion`: code 1.
    pub fn envelope(stdin: &[u8]) -> Result<(Value, SpecVersion, String), CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            let what = if stdin.iter().all(u8::is_ascii_whitespace) {
                "no network config on stdin".to_string()
            } else {
                format!("network config on stdin is not JSON: {e}")
            };
            CniError::new(ErrorCode::DecodingFailure, what)
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                ErrorCode::DecodingFailure,
                "network config on stdin is not a JSON object",
            ));
        }
        let raw_version = value.get("cniVersion").and_then(Value::as_str);
        let version = SpecVersion::negotiate(raw_version)?;
        let cni_version = raw_version.unwrap_or_default().to_string();
        Ok((value, version, cni_version))
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join(PLUGIN_EVENT_SOCKET)
    }

    /// Why this pod is skipped without asking anyone, if it is.
    pub fn static_skip(&self, pod_name: &str, pod_namespace: &str) -> Option<&'static str> {
        if self.exclude_namespaces.iter().any(|n| n == pod_namespace) {
            return Some("namespace is excluded");
        }
        if self.agent_namespace.as_deref() == Some(pod_namespace)
            && pod_name.starts_with(AGENT_POD_PREFIX)
        {
            return Some("pod is the node agent itself");
        }
        None
    }
}

/// The selector list from the config's raw value.
fn enablement_selectors(raw: Option<Value>) -> Result<EnablementSelectors, String> {
    let list: Vec<EnablementSelector> = match raw {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v).map_err(|e| {
            format!("{SELECTOR_CNI_KEY} is not a list of {{podSelector, namespaceSelector}}: {e}")
        })?,
    };
    EnablementSelectors::compile(list).map_err(|e| format!("{SELECTOR_CNI_KEY}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PluginConf, CniError> {
        PluginConf::parse(s.as_bytes())
    }

    /// An empty list, as the agent writes it with `EXCLUDE_NAMESPACES` cleared, excludes
    /// nothing (the agent excludes nothing either); only a missing list means the default.
    #[test]
    fn an_empty_exclusion_list_excludes_nothing() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni","exclude_namespaces":[]}"#,
        )
        .unwrap();
        assert!(c.exclude_namespaces.is_empty());
        assert_eq!(c.static_skip("a", "kube-system"), None);
    }

    #[test]
    fn upstream_config_parses_with_defaults() {
        let c = parse(
            r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"istio-cni",
                "plugin_log_level":"debug","ambient_enabled":true,
                "pod_namespace":"istio-system",
                "kubernetes":{"kubeconfig":"/etc/cni/net.d/ZZZ-istio-cni-kubeconfig"},
                "unknownKey":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, "0.3.1");
        assert!(c.ambient_enabled);
        assert_eq!(c.exclude_namespaces, vec!["kube-system"]);
        assert_eq!(c.run_dir, PathBuf::from("/var/run/istio-cni"));
        assert_eq!(
            c.agent_socket(),
            PathBuf::from("/var/run/istio-cni/pluginevent.sock")
        );
        assert_eq!(
            c.kubeconfig,
            PathBuf::from("/etc/cni/net.d/ZZZ-istio-cni-kubeconfig")
        );
        assert!(c.prev_result.is_none());
        assert!(!c.detection_retry);
        assert!(
            c.enablement_selectors.unwrap().is_default(),
            "absent: the default list"
        );
    }

    #[test]
    fn enablement_selectors_are_read_and_checked() {
        let with = |v: &str| {
            parse(&format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"istio-cni","enablement_selectors":{v}}}"#
            ))
            .unwrap()
            .enablement_selectors
        };
        let s = with(r#"[{"podSelector":{"matchLabels":{"mesh":"on"}},"namespaceSelector":{}}]"#)
            .unwrap();
        assert!(!s.is_default());
        assert_eq!(s.source().len(), 1);
        assert!(with("null").unwrap().is_default());
        assert!(with("[]").unwrap().is_default());
        // A bad list is kept as an error (only the fallback needs it), naming
        // the key and the entry.
        let e = with(r#"[{},{"podSelector":{"matchExpressions":[{"key":"k","operator":"Has"}]}}]"#)
            .unwrap_err();
        assert!(
            e.contains("enablement_selectors") && e.contains("enablement selector 1"),
            "{e}"
        );
        assert!(
            with(r#""mesh=on""#)
                .unwrap_err()
                .contains("enablement_selectors")
        );
    }

    #[test]
    fn defaults_when_keys_absent() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni","cni_agent_run_dir":"/r"}"#,
        )
        .unwrap();
        assert!(!c.ambient_enabled, "upstream default is off");
        assert_eq!(c.kubeconfig, PathBuf::from("/r/istio-cni-kubeconfig"));
        assert_eq!(c.log_level, "info");
    }

    #[test]
    fn bad_inputs_map_to_spec_codes() {
        assert_eq!(parse("").unwrap_err().code, ErrorCode::DecodingFailure);
        assert!(parse("  ").unwrap_err().msg.contains("no network config"));
        assert_eq!(parse("{nope").unwrap_err().code, ErrorCode::DecodingFailure);
        assert_eq!(parse("[1]").unwrap_err().code, ErrorCode::DecodingFailure);
        assert_eq!(
            parse(r#"{"cniVersion":"7.0.0","name":"n","type":"t"}"#)
                .unwrap_err()
                .code,
            ErrorCode::IncompatibleVersion
        );
        assert_eq!(
            parse(r#"{"name":"n","type":"t"}"#).unwrap_err().code,
            ErrorCode::IncompatibleVersion
        );
        let e = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ambient_enabled":"yes"}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidNetworkConfig);
        assert!(e.details.unwrap().contains("boolean"));
        let e = parse(r#"{"cniVersion":"1.0.0","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidNetworkConfig);
        assert!(e.msg.contains("name"));
        let e =
            parse(r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":3}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidNetworkConfig);
    }

    #[test]
    fn static_skips() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni","pod_namespace":"istio-system",
                "exclude_namespaces":["kube-system","infra"]}"#,
        )
        .unwrap();
        assert_eq!(c.static_skip("a", "infra"), Some("namespace is excluded"));
        assert_eq!(
            c.static_skip("istio-cni-node-x7z", "istio-system"),
            Some("pod is the node agent itself")
        );
        assert_eq!(c.static_skip("istio-cni-node-x7z", "demo"), None);
        assert_eq!(c.static_skip("web", "istio-system"), None);
    }
}
