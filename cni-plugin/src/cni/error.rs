//! CNI errors in the spec's JSON form: `{"cniVersion", "code", "msg", "details"}`
//! printed on stdout, with a non-zero exit.

use serde::Serialize;

/// Well-known error codes of the CNI spec (1.0/1.1), plus ours (100+). The
/// list is complete on purpose; not every code is raised by this plugin.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodingFailure = 6,
    InvalidNetworkConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD requests (spec 1.1).
    PluginNotAvailable = 50,
    /// Our own: something inside the plugin failed that is none of the above.
    Internal = 100,
}

/// A CNI error. `msg` is short; `details` carries the specifics (object
/// names, the agent's reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {}: {msg}{}", *code as u32, details.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// The spec's JSON form. `cni_version` is the version the runtime asked
    /// for when we know it, else the newest we speak.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            details: Option<&'a str>,
        }
        let wire = Wire {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: self.details.as_deref(),
        };
        serde_json::to_string(&wire).expect("error JSON is always serialisable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_spec_keys_and_code_numbers() {
        let e = CniError::new(ErrorCode::TryAgainLater, "agent refused pod demo/a")
            .with_details("no ztunnel connection");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "agent refused pod demo/a");
        assert_eq!(v["details"], "no ztunnel connection");
        let e = CniError::new(ErrorCode::DecodingFailure, "bad");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.3.1")).unwrap();
        assert_eq!(v["code"], 6);
        assert!(v.get("details").is_none());
        assert_eq!(ErrorCode::IncompatibleVersion as u32, 1);
        assert_eq!(ErrorCode::InvalidEnvironment as u32, 4);
        assert_eq!(ErrorCode::InvalidNetworkConfig as u32, 7);
    }
}
