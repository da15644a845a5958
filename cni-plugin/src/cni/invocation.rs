//! The `CNI_*` environment a runtime sets when it runs the plugin.

use super::args::CniArgs;
use super::error::{CniError, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }

    /// Variables the spec requires for this command (CNI_PATH is left out:
    /// this plugin never runs other plugins).
    fn required(self) -> &'static [&'static str] {
        match self {
            Self::Add | Self::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Self::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Self::Version | Self::Status | Self::Gc => &[],
        }
    }
}

/// One run of the plugin, as described by its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
}

impl Invocation {
    /// Reads the invocation through `env` (the process environment in
    /// production). Missing or unknown variables are error code 4.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let raw = env("CNI_COMMAND")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "required env variables [CNI_COMMAND] missing",
                )
            })?;
        let command = Command::parse(&raw).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("unknown CNI_COMMAND {raw:?}"),
            )
            .with_details("expected one of ADD, DEL, CHECK, VERSION, STATUS, GC")
        })?;
        let get = |name: &str| env(name).unwrap_or_default();
        let missing: Vec<&str> = command
            .required()
            .iter()
            .copied()
            .filter(|name| get(name).is_empty())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!(
                    "required env variables [{}] missing for {raw}",
                    missing.join(" ")
                ),
            ));
        }
        let args = match CniArgs::parse(&get("CNI_ARGS")) {
            Ok(args) => args,
            // DEL uses none of them: a runtime's odd CNI_ARGS must not block a teardown.
            Err(_) if command == Command::Del => CniArgs::default(),
            Err(e) => {
                return Err(
                    CniError::new(ErrorCode::InvalidEnvironment, "invalid CNI_ARGS")
                        .with_details(e),
                );
            }
        };
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME=a;K8S_POD_NAMESPACE=demo"),
        ];
        let inv = Invocation::from_env(env(&full)).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.netns, "/var/run/netns/x");
        assert_eq!(inv.args.pod_name.as_deref(), Some("a"));

        let e = Invocation::from_env(env(&full[..2])).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidEnvironment);
        assert!(e.msg.contains("CNI_NETNS CNI_IFNAME"), "{}", e.msg);
    }

    #[test]
    fn del_does_not_need_netns() {
        let inv = Invocation::from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(inv.command, Command::Del);
        assert_eq!(inv.netns, "");
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        let e = Invocation::from_env(env(&[])).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidEnvironment);
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = Invocation::from_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidEnvironment);
        assert!(e.msg.contains("FROB"));
        assert!(Invocation::from_env(env(&[("CNI_COMMAND", "VERSION")])).is_ok());
    }
}
