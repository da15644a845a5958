//! The node agent's configuration: environment variables (names and defaults
//! in ARCHITECTURE.md, "node-agent" and "Chart ↔ program contract
//! additions") → one typed [`AgentConfig`]. A bad value is an error naming
//! the variable; nothing is silently defaulted except unset variables.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_proto::cni_event::DEFAULT_AGENT_RUN_DIR;
use mesh_proto::enablement::{EnablementSelector, EnablementSelectors, SELECTOR_ENV};

use crate::install::InstallConfig;
use crate::redirect::inpod::RuleConfig;
use crate::zds::DEFAULT_SOCKET;

/// `REDIRECT_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectMode {
    /// Capture rules in each pod's netns, netns handed to ztunnel over ZDS.
    Inpod,
    /// Node-level redirection through GENEVE tunnels to the ztunnel pod.
    Geneve,
}

impl RedirectMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inpod => "inpod",
            Self::Geneve => "geneve",
        }
    }
}

/// A rejected setting: names the variable, its value and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

/// Everything the agent reads from its environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `REDIRECT_MODE` (`inpod`).
    pub redirect_mode: RedirectMode,
    /// `NODE_NAME` (required): pods are watched with
    /// `spec.nodeName=<node_name>`.
    pub node_name: String,
    /// `POD_NAME`: the agent's own pod (never enrolled).
    pub pod_name: Option<String>,
    /// `POD_NAMESPACE` (`istio-system`): where the agent's DaemonSet and, in
    /// GENEVE mode, the ztunnel pods live.
    pub pod_namespace: String,
    /// `CNI_AGENT_RUN_DIR` (`/var/run/istio-cni`): plugin event socket,
    /// plugin kubeconfig, remembered pod netns paths.
    pub run_dir: PathBuf,
    /// `ZTUNNEL_UDS` (`/var/run/ztunnel/ztunnel.sock`): the ZDS socket.
    pub ztunnel_uds: PathBuf,
    /// `EXCLUDE_NAMESPACES` (`kube-system`), comma-separated.
    pub exclude_namespaces: Vec<String>,
    /// `AMBIENT_ENABLEMENT_SELECTOR` (upstream's default list): which pods
    /// are ambient.
    pub enablement_selectors: EnablementSelectors,
    /// `AMBIENT_DNS_CAPTURE` (`false`).
    pub dns_capture: bool,
    /// `AMBIENT_IPV6` (`true`).
    pub ipv6: bool,
    /// `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP` (`true`).
    pub reconcile_rules_on_startup: bool,
    /// `AMBIENT_DISABLE_SAFE_UPGRADE` (`false`): every shutdown is an
    /// uninstall (plugin taken out of the CNI config, redirection removed),
    /// without asking the API whether the DaemonSet is still there (upstream's
    /// setting).
    pub disable_safe_upgrade: bool,
    /// `NATIVE_NFTABLES` (`false`): in-pod mode programs native nftables
    /// tables instead of iptables rules (upstream istio-cni's setting; not
    /// available in GENEVE mode).
    pub native_nftables: bool,
    /// `HOST_PROBE_SNAT_IP` (`169.254.7.127`) and `HOST_PROBE_SNAT_IPV6`.
    pub probe_snat_v4: Ipv4Addr,
    pub probe_snat_v6: Ipv6Addr,
    /// `HOST_PROC_DIR` (`/proc`): the node's /proc as the agent sees it.
    pub host_proc_dir: PathBuf,
    /// `READY_PORT` (8000), all addresses: `/readyz`.
    pub ready_addr: SocketAddr,
    /// `METRICS_PORT` (15014), all addresses: `/metrics`.
    pub metrics_addr: SocketAddr,
    /// Installer settings (`CNI_BIN_DIR`, `CNI_CONF_DIR`, `CNI_CONF_NAME`,
    /// `CNI_PLUGIN_SRC`, `CHAINED_CNI_PLUGIN`, `ISTIO_OWNED_CNI_CONFIG`, ...).
    pub install: InstallConfig,
    /// Name of the agent's DaemonSet, read on SIGTERM to tell an upgrade
    /// (still there) from an uninstall (gone). Not an environment setting.
    pub daemonset_name: String,
    /// How long a CNI ADD for an ambient pod waits for a ztunnel before it is
    /// refused. Not an environment setting (below the plugin-event timeout).
    pub cni_add_ztunnel_wait: Duration,
    /// `GENEVE_RECHECK_SECONDS` (60): how often GENEVE mode compares the node's
    /// and ztunnel's rules, routes and devices with what it built, and re-applies
    /// them when something else changed them.
    pub geneve_recheck: Duration,
}

impl AgentConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `env` (`None` or blank = unset). Where
    /// upstream istio-cni names a setting differently ([`upstream_alias`]),
    /// its name is read when ours is unset.
    pub fn from_lookup(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let value = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let get = |k: &str| value(k).or_else(|| upstream_alias(k).and_then(value));
        let err = |var: &'static str, value: &str, reason: &str| ConfigError {
            var,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let flag = |var: &'static str, default: bool| -> Result<bool, ConfigError> {
            match get(var) {
                None => Ok(default),
                Some(v) => match v.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => Ok(true),
                    "false" | "0" | "no" => Ok(false),
                    _ => Err(err(var, &v, "expected true or false")),
                },
            }
        };
        // The name a value came from, for errors: upstream's when only it is set.
        let named = |var: &'static str| match upstream_alias(var) {
            Some(alias) if value(var).is_none() && value(alias).is_some() => alias,
            _ => var,
        };
        let port = |var: &'static str, default: u16| -> Result<SocketAddr, ConfigError> {
            let p = match get(var) {
                None => default,
                Some(v) => v
                    .parse::<u16>()
                    .map_err(|_| err(named(var), &v, "not a port number (0-65535)"))?,
            };
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), p))
        };

        let redirect_mode = match get("REDIRECT_MODE").as_deref() {
            None | Some("inpod") => RedirectMode::Inpod,
            Some("geneve") => RedirectMode::Geneve,
            Some(v) => return Err(err("REDIRECT_MODE", v, "expected inpod or geneve")),
        };
        let node_name = get("NODE_NAME").ok_or_else(|| {
            err(
                "NODE_NAME",
                "",
                "required: the node this agent runs on (downward API spec.nodeName)",
            )
        })?;
        if node_name.contains(',') || node_name.contains('=') {
            return Err(err("NODE_NAME", &node_name, "not a node name"));
        }
        let probe_snat_v4 = match get("HOST_PROBE_SNAT_IP") {
            None => RuleConfig::default().probe_snat_v4,
            Some(v) => v
                .parse()
                .map_err(|_| err("HOST_PROBE_SNAT_IP", &v, "not an IPv4 address"))?,
        };
        let probe_snat_v6 = match get("HOST_PROBE_SNAT_IPV6") {
            None => RuleConfig::default().probe_snat_v6,
            Some(v) => v
                .parse()
                .map_err(|_| err("HOST_PROBE_SNAT_IPV6", &v, "not an IPv6 address"))?,
        };
        // Validate the installer's flags strictly before it reads them
        // leniently.
        flag("CHAINED_CNI_PLUGIN", true)?;
        flag("ISTIO_OWNED_CNI_CONFIG", false)?;
        flag("AMBIENT_ENABLED", true)?;
        flag("ENABLE_AMBIENT_DETECTION_RETRY", false)?;
        flag("SKIP_TLS_VERIFY", false)?;
        if let Some(v) = get("KUBECONFIG_MODE") {
            crate::install::parse_mode(&v).map_err(|reason| err("KUBECONFIG_MODE", &v, &reason))?;
        }
        let selector_text = get(SELECTOR_ENV);
        let enablement_selectors =
            enablement_selectors(selector_text.as_deref()).map_err(|reason| {
                err(
                    SELECTOR_ENV,
                    selector_text.as_deref().unwrap_or(""),
                    &reason,
                )
            })?;
        let mut install = InstallConfig::from_env(|k| get(k));
        // The plugin's fallback decides with the same list.
        install.plugin.enablement_selectors = enablement_selectors.clone();
        let exclude_namespaces = install.plugin.exclude_namespaces.clone();
        let owned = &install.write.owned_name;
        if owned.contains('/') || !owned.ends_with(".conflist") || owned == ".conflist" {
            return Err(err(
                "ISTIO_OWNED_CNI_CONFIG_FILENAME",
                owned,
                "expected a file name ending in .conflist (no directory)",
            ));
        }
        let native_nftables = flag("NATIVE_NFTABLES", false)?;
        if native_nftables && redirect_mode == RedirectMode::Geneve {
            return Err(err(
                "NATIVE_NFTABLES",
                "true",
                "native nftables rules exist for REDIRECT_MODE=inpod only; GENEVE mode programs iptables",
            ));
        }

        Ok(Self {
            redirect_mode,
            node_name,
            pod_name: get("POD_NAME"),
            pod_namespace: get("POD_NAMESPACE").unwrap_or_else(|| "istio-system".into()),
            run_dir: get("CNI_AGENT_RUN_DIR")
                .unwrap_or_else(|| DEFAULT_AGENT_RUN_DIR.into())
                .into(),
            ztunnel_uds: get("ZTUNNEL_UDS")
                .unwrap_or_else(|| DEFAULT_SOCKET.into())
                .into(),
            exclude_namespaces,
            enablement_selectors,
            dns_capture: flag("AMBIENT_DNS_CAPTURE", false)?,
            ipv6: flag("AMBIENT_IPV6", true)?,
            reconcile_rules_on_startup: flag("AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", true)?,
            native_nftables,
            disable_safe_upgrade: flag("AMBIENT_DISABLE_SAFE_UPGRADE", false)?,
            probe_snat_v4,
            probe_snat_v6,
            host_proc_dir: get("HOST_PROC_DIR")
                .unwrap_or_else(|| "/proc".into())
                .into(),
            ready_addr: port("READY_PORT", 8000)?,
            metrics_addr: port("METRICS_PORT", 15014)?,
            install,
            daemonset_name: "node-agent".into(),
            cni_add_ztunnel_wait: Duration::from_secs(2),
            geneve_recheck: match get("GENEVE_RECHECK_SECONDS") {
                None => Duration::from_secs(60),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n > 0 => Duration::from_secs(n),
                    _ => {
                        return Err(err(
                            "GENEVE_RECHECK_SECONDS",
                            &v,
                            "not a positive number of seconds",
                        ));
                    }
                },
            },
        })
    }

    /// The enablement rules' node-wide settings.
    pub fn enablement(&self) -> crate::cluster::EnablementConfig {
        crate::cluster::EnablementConfig {
            exclude_namespaces: self.exclude_namespaces.clone(),
            agent_namespace: self.pod_namespace.clone(),
            agent_pod: self.pod_name.clone(),
            selectors: self.enablement_selectors.clone(),
        }
    }

    /// The in-pod rule generator's node-wide settings.
    pub fn rule_config(&self) -> RuleConfig {
        RuleConfig {
            probe_snat_v4: self.probe_snat_v4,
            probe_snat_v6: self.probe_snat_v6,
            ..RuleConfig::default()
        }
    }
}

/// Upstream istio-cni's name for a setting this agent names differently:
/// `CNI_CONF_DIR` is upstream's `MOUNTED_CNI_NET_DIR`, `METRICS_PORT` its
/// `MONITORING_PORT`, `ZTUNNEL_UDS` its `ZTUNNEL_UDS_ADDRESS`, `PLUGIN_LOG_LEVEL`
/// (the CNI plugin's level) its `LOG_LEVEL`. Ours wins when both are set.
pub fn upstream_alias(var: &str) -> Option<&'static str> {
    match var {
        "CNI_CONF_DIR" => Some("MOUNTED_CNI_NET_DIR"),
        "METRICS_PORT" => Some("MONITORING_PORT"),
        "ZTUNNEL_UDS" => Some("ZTUNNEL_UDS_ADDRESS"),
        "PLUGIN_LOG_LEVEL" => Some("LOG_LEVEL"),
        _ => None,
    }
}

/// Parses `AMBIENT_ENABLEMENT_SELECTOR`: a YAML (or JSON) list of
/// `{podSelector, namespaceSelector}`. Unset, blank, `null` or an empty list
/// is upstream's default list.
fn enablement_selectors(text: Option<&str>) -> Result<EnablementSelectors, String> {
    let list = match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Vec::new(),
        Some(t) => serde_yaml_ng::from_str::<Option<Vec<EnablementSelector>>>(t)
            .map_err(|e| format!("not a YAML list of {{podSelector, namespaceSelector}}: {e}"))?
            .unwrap_or_default(),
    };
    EnablementSelectors::compile(list).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AgentConfig::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_architecture_table() {
        let c = cfg(&[("NODE_NAME", "node1")]).unwrap();
        assert_eq!(c.redirect_mode, RedirectMode::Inpod);
        assert_eq!(c.node_name, "node1");
        assert_eq!(c.pod_namespace, "istio-system");
        assert_eq!(c.run_dir, PathBuf::from("/var/run/istio-cni"));
        assert_eq!(
            c.ztunnel_uds,
            PathBuf::from("/var/run/ztunnel/ztunnel.sock")
        );
        assert_eq!(c.exclude_namespaces, vec!["kube-system".to_string()]);
        assert!(!c.dns_capture && c.ipv6 && c.reconcile_rules_on_startup);
        assert!(!c.native_nftables && !c.disable_safe_upgrade);
        assert_eq!(c.probe_snat_v4, Ipv4Addr::new(169, 254, 7, 127));
        assert_eq!(c.host_proc_dir, PathBuf::from("/proc"));
        assert_eq!(c.ready_addr.port(), 8000);
        assert_eq!(c.metrics_addr.port(), 15014);
        assert!(c.ready_addr.ip().is_unspecified());
        assert_eq!(c.install.bin_dir, PathBuf::from("/host/opt/cni/bin"));
        assert_eq!(c.install.conf_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(c.daemonset_name, "node-agent");
        assert_eq!(c.geneve_recheck, Duration::from_secs(60));
        assert_eq!(
            cfg(&[("NODE_NAME", "n"), ("GENEVE_RECHECK_SECONDS", "5")])
                .unwrap()
                .geneve_recheck,
            Duration::from_secs(5)
        );
        assert!(cfg(&[("NODE_NAME", "n"), ("GENEVE_RECHECK_SECONDS", "0")]).is_err());
    }

    #[test]
    fn chart_environment_parses() {
        // charts/tests/golden/env-geneve.txt, node-agent container.
        let c = cfg(&[
            ("AMBIENT_DNS_CAPTURE", "false"),
            ("AMBIENT_IPV6", "true"),
            ("AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", "true"),
            ("CHAINED_CNI_PLUGIN", "true"),
            ("CNI_AGENT_RUN_DIR", "/var/run/istio-cni"),
            ("CNI_BIN_DIR", "/host/opt/cni/bin"),
            ("CNI_CONF_DIR", "/host/etc/cni/net.d"),
            ("CNI_PLUGIN_SRC", "/opt/istio-cni/bin/istio-cni"),
            ("EXCLUDE_NAMESPACES", "kube-system, other"),
            ("HOST_PROBE_SNAT_IP", "169.254.7.127"),
            ("HOST_PROC_DIR", "/host/proc"),
            ("ISTIO_OWNED_CNI_CONFIG", "false"),
            ("METRICS_PORT", "15014"),
            ("NODE_NAME", "worker-1"),
            ("POD_NAME", "node-agent-x7z"),
            ("POD_NAMESPACE", "mesh"),
            ("READY_PORT", "8001"),
            ("REDIRECT_MODE", "geneve"),
            ("RUST_LOG", "info"),
        ])
        .unwrap();
        assert_eq!(c.redirect_mode, RedirectMode::Geneve);
        assert_eq!(c.pod_name.as_deref(), Some("node-agent-x7z"));
        assert_eq!(c.pod_namespace, "mesh");
        assert_eq!(c.exclude_namespaces, vec!["kube-system", "other"]);
        assert_eq!(c.host_proc_dir, PathBuf::from("/host/proc"));
        assert_eq!(c.ready_addr.port(), 8001);
        assert_eq!(c.install.plugin.pod_namespace, "mesh");
    }

    #[test]
    fn upstream_names_are_read_when_ours_are_unset() {
        let upstream = [
            ("NODE_NAME", "n1"),
            ("MOUNTED_CNI_NET_DIR", "/host/cni/conf"),
            ("MONITORING_PORT", "9014"),
            ("ZTUNNEL_UDS_ADDRESS", "/run/zt/zds.sock"),
            ("LOG_LEVEL", "warn"),
        ];
        let c = cfg(&upstream).unwrap();
        assert_eq!(c.install.conf_dir, PathBuf::from("/host/cni/conf"));
        assert_eq!(c.install.plugin.log_level, "warn");
        assert_eq!(c.metrics_addr.port(), 9014);
        assert_eq!(c.ztunnel_uds, PathBuf::from("/run/zt/zds.sock"));
        let mut both = upstream.to_vec();
        both.extend([
            ("CNI_CONF_DIR", "/etc/cni/net.d"),
            ("METRICS_PORT", "15014"),
            ("ZTUNNEL_UDS", "/var/run/ztunnel/ztunnel.sock"),
            ("PLUGIN_LOG_LEVEL", "debug"),
        ]);
        let c = cfg(&both).unwrap();
        assert_eq!(c.install.plugin.log_level, "debug");
        assert_eq!(c.install.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(c.metrics_addr.port(), 15014);
        assert_eq!(c.ztunnel_uds, PathBuf::from(DEFAULT_SOCKET));
        // The plugin kubeconfig settings reach the installer.
        let c = cfg(&[
            ("NODE_NAME", "n1"),
            ("KUBECONFIG_MODE", "0640"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("SKIP_TLS_VERIFY", "true"),
        ])
        .unwrap();
        assert_eq!(c.install.kubeconfig_mode, 0o640);
        assert!(matches!(
            c.install.kubeconfig_source,
            Some(crate::install::kubeconfig::KubeconfigSource::InCluster { insecure: true, .. })
        ));
    }

    #[test]
    fn rejections_name_the_variable() {
        for (vars, var) in [
            (vec![], "NODE_NAME"),
            (vec![("REDIRECT_MODE", "tproxy")], "REDIRECT_MODE"),
            (vec![("AMBIENT_IPV6", "maybe")], "AMBIENT_IPV6"),
            (vec![("AMBIENT_DNS_CAPTURE", "on")], "AMBIENT_DNS_CAPTURE"),
            (vec![("CHAINED_CNI_PLUGIN", "y")], "CHAINED_CNI_PLUGIN"),
            (vec![("READY_PORT", "http")], "READY_PORT"),
            (vec![("METRICS_PORT", "70000")], "METRICS_PORT"),
            (vec![("MONITORING_PORT", "x")], "MONITORING_PORT"),
            (vec![("KUBECONFIG_MODE", "0800")], "KUBECONFIG_MODE"),
            (vec![("KUBECONFIG_MODE", "0o1600")], "KUBECONFIG_MODE"),
            (vec![("SKIP_TLS_VERIFY", "off")], "SKIP_TLS_VERIFY"),
            (vec![("HOST_PROBE_SNAT_IP", "::1")], "HOST_PROBE_SNAT_IP"),
            (
                vec![(
                    "AMBIENT_ENABLEMENT_SELECTOR",
                    "- podSelector: {matchExpressions: [{key: k, operator: Has}]}",
                )],
                "AMBIENT_ENABLEMENT_SELECTOR",
            ),
            (
                vec![("AMBIENT_ENABLEMENT_SELECTOR", "- podSelecter: {}")],
                "AMBIENT_ENABLEMENT_SELECTOR",
            ),
            (vec![("NATIVE_NFTABLES", "sure")], "NATIVE_NFTABLES"),
            (
                vec![("ISTIO_OWNED_CNI_CONFIG_FILENAME", "../02-istio.conflist")],
                "ISTIO_OWNED_CNI_CONFIG_FILENAME",
            ),
            (
                vec![("ISTIO_OWNED_CNI_CONF_FILENAME", "02-istio.conf")],
                "ISTIO_OWNED_CNI_CONFIG_FILENAME",
            ),
            (
                vec![("AMBIENT_DISABLE_SAFE_UPGRADE", "y")],
                "AMBIENT_DISABLE_SAFE_UPGRADE",
            ),
            (
                vec![("NATIVE_NFTABLES", "true"), ("REDIRECT_MODE", "geneve")],
                "NATIVE_NFTABLES",
            ),
        ] {
            let mut vars = vars;
            if var != "NODE_NAME" {
                vars.push(("NODE_NAME", "n1"));
            }
            let e = cfg(&vars).unwrap_err();
            assert_eq!(e.var, var, "{e}");
            assert!(e.to_string().contains(var), "{e}");
        }
    }

    #[test]
    fn enablement_selector_yaml() {
        // Unset, blank, null or an empty list: upstream's default list.
        for v in [None, Some(""), Some("  "), Some("null"), Some("[]")] {
            let mut vars = vec![("NODE_NAME", "n1")];
            if let Some(v) = v {
                vars.push(("AMBIENT_ENABLEMENT_SELECTOR", v));
            }
            let c = cfg(&vars).unwrap();
            assert!(c.enablement_selectors.is_default(), "{v:?}");
            assert!(c.install.plugin.enablement_selectors.is_default());
        }
        // The chart's rendering of ambient.enablementSelectors (toYaml).
        let yaml = "- podSelector:\n    matchLabels:\n      mesh: \"on\"\n- namespaceSelector:\n    matchExpressions:\n    - key: team\n      operator: In\n      values:\n      - a\n      - b\n  podSelector:\n    matchExpressions:\n    - key: mesh\n      operator: DoesNotExist\n";
        let c = cfg(&[("NODE_NAME", "n1"), ("AMBIENT_ENABLEMENT_SELECTOR", yaml)]).unwrap();
        assert!(!c.enablement_selectors.is_default());
        assert_eq!(c.enablement_selectors.source().len(), 2);
        assert_eq!(c.enablement().selectors, c.enablement_selectors);
        // The installer writes the same list into the plugin's config.
        assert_eq!(
            c.install.plugin.enablement_selectors,
            c.enablement_selectors
        );
        assert_eq!(
            crate::install::chain::plugin_entry(&c.install.plugin)["enablement_selectors"],
            serde_json::json!([
                {"podSelector": {"matchLabels": {"mesh": "on"}}, "namespaceSelector": {}},
                {"podSelector": {"matchExpressions": [{"key": "mesh", "operator": "DoesNotExist"}]},
                 "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]}}
            ])
        );
        // JSON is YAML too.
        let c = cfg(&[
            ("NODE_NAME", "n1"),
            (
                "AMBIENT_ENABLEMENT_SELECTOR",
                r#"[{"podSelector":{"matchLabels":{"mesh":"on"}}}]"#,
            ),
        ])
        .unwrap();
        assert_eq!(c.enablement_selectors.source().len(), 1);
        // Errors name the entry and key.
        let e = cfg(&[
            ("NODE_NAME", "n1"),
            (
                "AMBIENT_ENABLEMENT_SELECTOR",
                "- {}\n- namespaceSelector: {matchExpressions: [{key: team, operator: Exists, values: [a]}]}",
            ),
        ])
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("AMBIENT_ENABLEMENT_SELECTOR")
                && text.contains("enablement selector 1")
                && text.contains("\"team\"")
                && text.contains("takes no values"),
            "{text}"
        );
    }
}
