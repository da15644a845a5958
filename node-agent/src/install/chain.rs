//! Pure CNI config transforms: chain the istio-cni entry into a primary
//! config, check that it is there, and take it out again.
//!
//! - `.conflist`: every `istio-cni` entry is removed and ours appended as
//!   the last plugin.
//! - `.conf`: wrapped as `{cniVersion, name, plugins: [original, istio-cni]}`
//!   (the caller writes it as `.conflist` and removes the `.conf`).
//! - Unchaining removes every `istio-cni` entry; a list that is then exactly
//!   one plugin carrying the list's own `cniVersion` and `name` is what
//!   wrapping a `.conf` produces, so it is given back as that `.conf`.

use std::path::PathBuf;

use mesh_proto::enablement::{EnablementSelectors, SELECTOR_CNI_KEY};
use serde_json::{Map, Value, json};

/// The `type` (and `name`) of our plugin entry.
pub const PLUGIN_TYPE: &str = "istio-cni";

/// CNI versions whose chained plugins get a `prevResult` (0.3.0 on).
const CHAINABLE_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// What the plugin entry says (upstream istio-cni keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSettings {
    pub log_level: String,
    /// Run dir as the plugin (on the host) sees it.
    pub run_dir: PathBuf,
    pub ambient_enabled: bool,
    pub exclude_namespaces: Vec<String>,
    /// The agent's namespace.
    pub pod_namespace: String,
    pub detection_retry: bool,
    /// Kubeconfig path as the plugin sees it.
    pub kubeconfig: PathBuf,
    /// `AMBIENT_ENABLEMENT_SELECTOR`, for the plugin's fallback decision.
    pub enablement_selectors: EnablementSelectors,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("{file}: not a JSON object")]
    NotObject { file: String },
    #[error("{file}: field {field:?} is missing or not {expected}")]
    Field {
        file: String,
        field: &'static str,
        expected: &'static str,
    },
    #[error(
        "{file}: cniVersion {version:?} cannot chain plugins (needs 0.3.0 or later); istio-cni cannot be added"
    )]
    Unchainable { file: String, version: String },
}

/// The kind of a config file, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfKind {
    /// `.conf` or `.json`: one plugin.
    Single,
    /// `.conflist`: a plugin list.
    List,
}

/// Our plugin object as it appears in a list (no `cniVersion`: the list's
/// applies).
pub fn plugin_entry(s: &PluginSettings) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "name": PLUGIN_TYPE,
        "plugin_log_level": s.log_level,
        "cni_agent_run_dir": s.run_dir.to_string_lossy(),
        "ambient_enabled": s.ambient_enabled,
        "exclude_namespaces": s.exclude_namespaces,
        "pod_namespace": s.pod_namespace,
        "enable_ambient_detection_retry": s.detection_retry,
        SELECTOR_CNI_KEY: s.enablement_selectors.to_json(),
        "kubernetes": { "kubeconfig": s.kubeconfig.to_string_lossy() },
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn object<'a>(v: &'a Value, file: &str) -> Result<&'a Map<String, Value>, ChainError> {
    v.as_object()
        .ok_or_else(|| ChainError::NotObject { file: file.into() })
}

fn str_field<'a>(
    m: &'a Map<String, Value>,
    field: &'static str,
    file: &str,
) -> Result<&'a str, ChainError> {
    m.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| ChainError::Field {
            file: file.into(),
            field,
            expected: "a string",
        })
}

fn check_version(m: &Map<String, Value>, file: &str) -> Result<(), ChainError> {
    let version = str_field(m, "cniVersion", file)?;
    if CHAINABLE_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(ChainError::Unchainable {
            file: file.into(),
            version: version.into(),
        })
    }
}

fn plugins<'a>(m: &'a Map<String, Value>, file: &str) -> Result<&'a Vec<Value>, ChainError> {
    m.get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| ChainError::Field {
            file: file.into(),
            field: "plugins",
            expected: "an array",
        })
}

/// The conflist that results from chaining `entry` into `primary` (a file
/// of kind `kind`, named `file` in errors).
pub fn chain(
    primary: &Value,
    kind: ConfKind,
    entry: &Value,
    file: &str,
) -> Result<Value, ChainError> {
    let m = object(primary, file)?;
    check_version(m, file)?;
    match kind {
        ConfKind::List => {
            let mut out = m.clone();
            let mut list: Vec<Value> = plugins(m, file)?
                .iter()
                .filter(|p| !is_ours(p))
                .cloned()
                .collect();
            list.push(entry.clone());
            out.insert("plugins".into(), Value::Array(list));
            Ok(Value::Object(out))
        }
        ConfKind::Single => {
            if is_ours(primary) {
                // A lone istio-cni .conf cannot be a primary network.
                return Err(ChainError::Field {
                    file: file.into(),
                    field: "type",
                    expected: "an interface plugin (it is istio-cni itself)",
                });
            }
            str_field(m, "type", file)?;
            let name = m
                .get("name")
                .cloned()
                .unwrap_or_else(|| json!("k8s-pod-network"));
            Ok(json!({
                "cniVersion": m["cniVersion"],
                "name": name,
                "plugins": [primary, entry],
            }))
        }
    }
}

/// True when `conflist` holds exactly one istio-cni entry and it equals
/// `entry`. Position is not checked, so another tool appending after us
/// does not make the two rewrite the file in turn.
pub fn is_chained(conflist: &Value, entry: &Value) -> bool {
    let Some(list) = conflist.get("plugins").and_then(Value::as_array) else {
        return false;
    };
    let ours: Vec<&Value> = list.iter().filter(|p| is_ours(p)).collect();
    ours.len() == 1 && ours[0] == entry
}

/// A config with istio-cni taken out.
#[derive(Debug, Clone, PartialEq)]
pub enum Unchained {
    /// No istio-cni entry was there.
    Unchanged,
    /// Still a list.
    List(Value),
    /// It was a wrapped `.conf`: here is the original.
    Single(Value),
}

pub fn unchain(conflist: &Value) -> Unchained {
    let Some(m) = conflist.as_object() else {
        return Unchained::Unchanged;
    };
    let Some(list) = m.get("plugins").and_then(Value::as_array) else {
        return Unchained::Unchanged;
    };
    if !list.iter().any(is_ours) {
        return Unchained::Unchanged;
    }
    let rest: Vec<Value> = list.iter().filter(|p| !is_ours(p)).cloned().collect();
    if let [only] = rest.as_slice()
        && only.get("cniVersion").is_some()
        && only.get("cniVersion") == m.get("cniVersion")
        && only.get("name") == m.get("name")
    {
        return Unchained::Single(only.clone());
    }
    let mut out = m.clone();
    out.insert("plugins".into(), Value::Array(rest));
    Unchained::List(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PluginSettings {
        PluginSettings {
            log_level: "info".into(),
            run_dir: "/var/run/istio-cni".into(),
            ambient_enabled: true,
            exclude_namespaces: vec!["kube-system".into()],
            pod_namespace: "istio-system".into(),
            detection_retry: false,
            kubeconfig: "/var/run/istio-cni/istio-cni-kubeconfig".into(),
            enablement_selectors: Default::default(),
        }
    }

    #[test]
    fn list_replaces_stale_entries_and_appends_last() {
        let entry = plugin_entry(&settings());
        let primary = json!({"cniVersion":"1.0.0","name":"net","plugins":[
            {"type":"istio-cni","old":true},
            {"type":"bridge"},
            {"type":"portmap"}
        ]});
        let out = chain(&primary, ConfKind::List, &entry, "f").unwrap();
        let list = out["plugins"].as_array().unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0]["type"], "bridge");
        assert_eq!(list[2], entry);
        assert!(is_chained(&out, &entry));
        assert!(!is_chained(&primary, &entry));
        // idempotent
        assert_eq!(chain(&out, ConfKind::List, &entry, "f").unwrap(), out);
    }

    #[test]
    fn single_is_wrapped_and_restored() {
        let entry = plugin_entry(&settings());
        let primary =
            json!({"cniVersion":"0.3.1","name":"k8s","type":"bridge","ipam":{"type":"host-local"}});
        let out = chain(&primary, ConfKind::Single, &entry, "f").unwrap();
        assert_eq!(out["cniVersion"], "0.3.1");
        assert_eq!(out["name"], "k8s");
        assert_eq!(out["plugins"][0], primary);
        assert!(is_chained(&out, &entry));
        assert_eq!(unchain(&out), Unchained::Single(primary));
    }

    #[test]
    fn unchain_keeps_lists_lists() {
        let entry = plugin_entry(&settings());
        let primary = json!({"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge"},{"type":"portmap"}]});
        let out = chain(&primary, ConfKind::List, &entry, "f").unwrap();
        assert_eq!(unchain(&out), Unchained::List(primary.clone()));
        assert_eq!(unchain(&primary), Unchained::Unchanged);
    }

    #[test]
    fn is_chained_detects_drift_and_duplicates() {
        let entry = plugin_entry(&settings());
        let mut other = settings();
        other.log_level = "debug".into();
        let drifted = json!({"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}, plugin_entry(&other)]});
        assert!(!is_chained(&drifted, &entry));
        let dup = json!({"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}, entry.clone(), entry.clone()]});
        assert!(!is_chained(&dup, &entry));
    }

    #[test]
    fn rejects_what_cannot_be_chained() {
        let entry = plugin_entry(&settings());
        let e = chain(
            &json!({"cniVersion":"0.2.0","name":"n","type":"bridge"}),
            ConfKind::Single,
            &entry,
            "10-x.conf",
        )
        .unwrap_err();
        assert!(matches!(e, ChainError::Unchainable { .. }));
        assert!(e.to_string().contains("10-x.conf"));
        let e = chain(
            &json!({"cniVersion":"1.0.0","name":"n"}),
            ConfKind::List,
            &entry,
            "10-x.conflist",
        )
        .unwrap_err();
        assert!(e.to_string().contains("plugins"));
        assert!(chain(&json!([1]), ConfKind::List, &entry, "f").is_err());
        assert!(
            chain(
                &json!({"name":"n","type":"bridge"}),
                ConfKind::Single,
                &entry,
                "f"
            )
            .is_err()
        );
    }
}
