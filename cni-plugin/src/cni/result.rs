//! The previous plugin's result (`prevResult`), passed through unchanged.
//!
//! Result formats of 0.3.0, 0.3.1, 0.4.0 and 1.0.0/1.1.0 share every field
//! except one: before 1.0.0 each `ips[]` entry carries `"version": "4"|"6"`,
//! from 1.0.0 on it must not. A runtime hands us `prevResult` in the config's
//! version already (it comes from the plugin before us in the same list), so
//! normally only `cniVersion` is (re)stated; should a runtime pass it in the
//! other family, `ips[].version` is added or dropped so that what we print
//! is valid for the version the runtime asked for.

use mesh_proto::cni_event::PodIp;
use serde_json::{Map, Value};

use super::version::SpecVersion;

#[derive(Debug, Clone, PartialEq)]
pub struct PrevResult(Map<String, Value>);

impl PrevResult {
    /// Accepts any JSON object (the spec lets plugins add fields we do not
    /// know; we keep them).
    pub fn from_value(v: Value) -> Result<Self, String> {
        match v {
            Value::Object(m) => Ok(Self(m)),
            other => Err(format!(
                "prevResult must be a JSON object, got {}",
                json_kind(&other)
            )),
        }
    }

    /// The pod's addresses, for the agent.
    pub fn pod_ips(&self) -> Vec<PodIp> {
        let Some(Value::Array(ips)) = self.0.get("ips") else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|ip| {
                let address = ip.get("address")?.as_str()?.to_string();
                Some(PodIp {
                    interface: ip
                        .get("interface")
                        .and_then(Value::as_u64)
                        .and_then(|i| u32::try_from(i).ok()),
                    address,
                    gateway: ip.get("gateway").and_then(Value::as_str).map(String::from),
                })
            })
            .collect()
    }

    /// The result to print for a config of version `raw_version` (parsed as
    /// `version`).
    pub fn render(&self, raw_version: &str, version: SpecVersion) -> String {
        let mut out = self.0.clone();
        out.insert("cniVersion".into(), Value::String(raw_version.into()));
        if let Some(Value::Array(ips)) = out.get_mut("ips") {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                if version.result_has_ip_version() {
                    if !ip.contains_key("version") {
                        let family = ip
                            .get("address")
                            .and_then(Value::as_str)
                            .map(|a| if a.contains(':') { "6" } else { "4" })
                            .unwrap_or("4");
                        ip.insert("version".into(), Value::String(family.into()));
                    }
                } else {
                    ip.remove("version");
                }
            }
        }
        Value::Object(out).to_string()
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(s: &str) -> SpecVersion {
        SpecVersion::negotiate(Some(s)).unwrap()
    }

    fn bridge_result_040() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "vethX", "mac": "aa:bb:cc:dd:ee:00"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/p"}
            ],
            "ips": [
                {"version": "4", "interface": 2, "address": "10.22.0.5/16", "gateway": "10.22.0.1"},
                {"version": "6", "interface": 2, "address": "fd00::5/64"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {},
            "somethingNew": {"kept": true}
        })
    }

    #[test]
    fn passes_through_in_the_same_version_unchanged() {
        let prev = PrevResult::from_value(bridge_result_040()).unwrap();
        let out: Value = serde_json::from_str(&prev.render("0.4.0", v("0.4.0"))).unwrap();
        assert_eq!(out, bridge_result_040());
    }

    #[test]
    fn converts_ip_version_field_between_families() {
        let prev = PrevResult::from_value(bridge_result_040()).unwrap();
        let out: Value = serde_json::from_str(&prev.render("1.0.0", v("1.0.0"))).unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert!(out["ips"][0].get("version").is_none());
        assert_eq!(out["ips"][0]["address"], "10.22.0.5/16");
        assert_eq!(out["routes"], bridge_result_040()["routes"]);

        let prev10 = PrevResult::from_value(out).unwrap();
        let back: Value = serde_json::from_str(&prev10.render("0.3.1", v("0.3.1"))).unwrap();
        assert_eq!(back["ips"][0]["version"], "4");
        assert_eq!(back["ips"][1]["version"], "6");
        assert_eq!(back["cniVersion"], "0.3.1");
    }

    #[test]
    fn extracts_pod_ips() {
        let prev = PrevResult::from_value(bridge_result_040()).unwrap();
        let ips = prev.pod_ips();
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].address, "10.22.0.5/16");
        assert_eq!(ips[0].interface, Some(2));
        assert_eq!(ips[0].gateway.as_deref(), Some("10.22.0.1"));
        assert_eq!(ips[1].gateway, None);
    }

    #[test]
    fn rejects_non_objects() {
        assert!(
            PrevResult::from_value(json!([1]))
                .unwrap_err()
                .contains("array")
        );
        assert!(PrevResult::from_value(json!(null)).is_err());
    }
}
