//! CNI spec versions this plugin speaks, and what each allows.

use super::error::{CniError, ErrorCode};

/// Versions accepted in a network config's `cniVersion`, oldest first.
/// 0.1.0/0.2.0 are left out: they predate chaining (`prevResult`), which is
/// all this plugin does.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used for output that is not tied to a config (VERSION,
/// errors raised before the config was read).
pub const LATEST: &str = "1.1.0";

/// A supported spec version, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpecVersion {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl SpecVersion {
    pub const V0_4_0: Self = Self::new(0, 4, 0);
    pub const V1_0_0: Self = Self::new(1, 0, 0);
    pub const V1_1_0: Self = Self::new(1, 1, 0);

    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `cniVersion` and checks that we support it (error code 1
    /// otherwise, like the reference plugins).
    pub fn negotiate(raw: Option<&str>) -> Result<Self, CniError> {
        let Some(raw) = raw else {
            return Err(
                CniError::new(ErrorCode::IncompatibleVersion, "incompatible CNI versions")
                    .with_details(format!(
                        "config has no cniVersion (0.1.0 implied), plugin supports {SUPPORTED:?}"
                    )),
            );
        };
        if !SUPPORTED.contains(&raw) {
            return Err(
                CniError::new(ErrorCode::IncompatibleVersion, "incompatible CNI versions")
                    .with_details(format!("config is {raw:?}, plugin supports {SUPPORTED:?}")),
            );
        }
        let mut parts = raw.split('.').map(|p| p.parse::<u16>().unwrap_or(0));
        Ok(Self::new(
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        ))
    }

    /// CHECK exists from 0.4.0 on.
    pub fn allows_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn allows_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }

    /// Results carry `ips[].version` before 1.0.0 and must not from 1.0.0 on.
    pub fn result_has_ip_version(self) -> bool {
        self < Self::V1_0_0
    }
}

/// Output of the VERSION command.
pub fn version_info_json() -> String {
    serde_json::json!({ "cniVersion": LATEST, "supportedVersions": SUPPORTED }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_supported_versions_only() {
        for v in SUPPORTED {
            assert!(SpecVersion::negotiate(Some(v)).is_ok(), "{v}");
        }
        for bad in ["0.1.0", "0.2.0", "9.9.9", "1.0", "", "latest"] {
            let e = SpecVersion::negotiate(Some(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::IncompatibleVersion, "{bad}");
            assert!(e.details.unwrap().contains(&format!("{bad:?}")));
        }
        assert_eq!(
            SpecVersion::negotiate(None).unwrap_err().code,
            ErrorCode::IncompatibleVersion
        );
    }

    #[test]
    fn feature_gates_follow_the_spec() {
        let v = |s| SpecVersion::negotiate(Some(s)).unwrap();
        assert!(!v("0.3.1").allows_check());
        assert!(v("0.4.0").allows_check());
        assert!(!v("1.0.0").allows_status_and_gc());
        assert!(v("1.1.0").allows_status_and_gc());
        assert!(v("0.4.0").result_has_ip_version());
        assert!(!v("1.0.0").result_has_ip_version());
    }

    #[test]
    fn version_output_lists_supported() {
        let v: serde_json::Value = serde_json::from_str(&version_info_json()).unwrap();
        assert_eq!(v["cniVersion"], LATEST);
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED.len()
        );
    }
}
