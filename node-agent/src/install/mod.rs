//! Install and repair of the CNI plugin on the node: the binary in the CNI
//! bin dir(s), the istio-cni entry in the node's CNI config, and the
//! kubeconfig the plugin uses for its fallback lookup.
//!
//! [`Installer::reconcile`] is one idempotent pass (write only what is
//! missing or wrong); [`Installer::run`] repeats it whenever the bin or conf
//! dirs change (inotify) and at least every `resync_interval`, and keeps a
//! readiness flag false while the install is invalid. On shutdown the caller
//! decides: [`Installer::uninstall`] (the DaemonSet is gone) or
//! [`Installer::keep_for_upgrade`] (leave everything, so new ambient pods
//! fail closed until the next agent is up).

pub mod atomic_write;
pub mod binary;
pub mod chain;
pub mod cni_config;
pub mod kubeconfig;
pub mod loadable;
mod watch;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use mesh_proto::cni_event::DEFAULT_AGENT_RUN_DIR;
use serde_json::Value;

use crate::health::ReadyFlag;
use binary::{BinaryError, Fingerprint};
use chain::PluginSettings;
use cni_config::{ConfigError, WriteSettings};
use kubeconfig::{KubeconfigError, KubeconfigSource};

/// Readiness component name of the installer.
pub const READY_COMPONENT: &str = "cni-install";

/// How the istio-cni entry gets into the runtime's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigMode {
    /// Append to the primary config (`CHAINED_CNI_PLUGIN=true`, default).
    Chained,
    /// Write `02-istio-cni.conflist`, a copy of the primary plus istio-cni
    /// (`ISTIO_OWNED_CNI_CONFIG=true`).
    IstioOwned,
    /// Leave CNI configs alone (`CHAINED_CNI_PLUGIN=false`: the operator
    /// references the plugin, e.g. from Multus).
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallConfig {
    /// The plugin binary shipped in the agent's image (`CNI_PLUGIN_SRC`).
    pub plugin_src: PathBuf,
    /// The host's CNI bin dir (`CNI_BIN_DIR`).
    pub bin_dir: PathBuf,
    /// Also install here when it is writable (`SECONDARY_BIN_DIR`).
    pub secondary_bin_dir: Option<PathBuf>,
    /// The host's CNI config dir (`CNI_CONF_DIR`).
    pub conf_dir: PathBuf,
    /// The primary config's file name; `None` = libcni's choice
    /// (`CNI_CONF_NAME`).
    pub primary_conf_name: Option<String>,
    pub mode: ConfigMode,
    /// How configs are written: the istio-owned config's file name
    /// (`ISTIO_OWNED_CNI_CONFIG_FILENAME`, or `ISTIO_OWNED_CNI_CONF_FILENAME`
    /// as upstream's chart spells it; default `02-istio-cni.conflist`;
    /// checked by `AgentConfig`) and the file mode (0600, 0640 with
    /// `CNI_CONF_GROUP_READ=true`).
    pub write: WriteSettings,
    /// What goes into the istio-cni entry.
    pub plugin: PluginSettings,
    /// Credentials to give the plugin; `None` = write no kubeconfig.
    pub kubeconfig_source: Option<KubeconfigSource>,
    /// Where the agent writes the plugin kubeconfig.
    pub kubeconfig_path: PathBuf,
    /// Its file mode (`KUBECONFIG_MODE`, default 0600; checked by
    /// `AgentConfig`).
    pub kubeconfig_mode: u32,
    /// Re-check at least this often, even without inotify events.
    pub resync_interval: Duration,
}

impl InstallConfig {
    /// Reads the environment the chart sets: `CNI_PLUGIN_SRC`,
    /// `CNI_BIN_DIR`, `SECONDARY_BIN_DIR`, `CNI_CONF_DIR`, `CNI_CONF_NAME`,
    /// `CHAINED_CNI_PLUGIN`, `ISTIO_OWNED_CNI_CONFIG`,
    /// `ISTIO_OWNED_CNI_CONFIG_FILENAME`, `CNI_AGENT_RUN_DIR`,
    /// `PLUGIN_LOG_LEVEL`, `AMBIENT_ENABLED`, `EXCLUDE_NAMESPACES`,
    /// `POD_NAMESPACE`, `ENABLE_AMBIENT_DETECTION_RETRY`, and `KUBECONFIG` /
    /// `KUBERNETES_SERVICE_HOST` / `KUBE_CA_FILE` / `SKIP_TLS_VERIFY` /
    /// `KUBECONFIG_MODE` for the plugin's credentials.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str, default: &str| {
            env(k)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        let flag = |k: &str, default: bool| match env(k).as_deref().map(str::trim) {
            Some("true" | "1" | "yes") => true,
            Some("false" | "0" | "no") => false,
            _ => default,
        };
        let run_dir = PathBuf::from(get("CNI_AGENT_RUN_DIR", DEFAULT_AGENT_RUN_DIR));
        let kubeconfig_path = run_dir.join(kubeconfig::PLUGIN_KUBECONFIG);
        let mode = if !flag("CHAINED_CNI_PLUGIN", true) {
            ConfigMode::Off
        } else if flag("ISTIO_OWNED_CNI_CONFIG", false) {
            ConfigMode::IstioOwned
        } else {
            ConfigMode::Chained
        };
        Self {
            plugin_src: get("CNI_PLUGIN_SRC", "/opt/istio-cni/bin/istio-cni").into(),
            bin_dir: get("CNI_BIN_DIR", "/host/opt/cni/bin").into(),
            secondary_bin_dir: env("SECONDARY_BIN_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            conf_dir: get("CNI_CONF_DIR", "/host/etc/cni/net.d").into(),
            primary_conf_name: env("CNI_CONF_NAME").filter(|v| !v.is_empty()),
            mode,
            write: WriteSettings {
                // The name upstream's program reads; upstream's chart writes
                // the second one (which its program ignores): both work here.
                owned_name: env("ISTIO_OWNED_CNI_CONFIG_FILENAME")
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| {
                        get(
                            "ISTIO_OWNED_CNI_CONF_FILENAME",
                            cni_config::OWNED_CONFIG_NAME,
                        )
                    }),
                mode: if flag("CNI_CONF_GROUP_READ", false) {
                    cni_config::CONFIG_MODE_GROUP_READ
                } else {
                    cni_config::CONFIG_MODE
                },
            },
            plugin: PluginSettings {
                log_level: get("PLUGIN_LOG_LEVEL", "info"),
                run_dir,
                ambient_enabled: flag("AMBIENT_ENABLED", true),
                exclude_namespaces: get("EXCLUDE_NAMESPACES", "kube-system")
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                pod_namespace: get("POD_NAMESPACE", "istio-system"),
                detection_retry: flag("ENABLE_AMBIENT_DETECTION_RETRY", false),
                kubeconfig: kubeconfig_path.clone(),
                // Set by `AgentConfig` from the validated AMBIENT_ENABLEMENT_SELECTOR.
                enablement_selectors: Default::default(),
            },
            kubeconfig_source: KubeconfigSource::from_env(&env),
            kubeconfig_path,
            kubeconfig_mode: env("KUBECONFIG_MODE")
                .and_then(|v| parse_mode(&v).ok())
                .unwrap_or(kubeconfig::DEFAULT_MODE),
            resync_interval: Duration::from_secs(1),
        }
    }
}

/// Parses a file mode the way upstream istio-cni reads its integer settings
/// (Go's base prefixes: `0600` and `0o600` are octal, `0x180` hex, `384`
/// decimal). Permission bits only (at most 0777), and the owner (root: the
/// plugin reads the file as the runtime's user) must be able to read it.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let parsed = if let Some(oct) = t.strip_prefix("0o").or_else(|| t.strip_prefix("0O")) {
        u32::from_str_radix(oct, 8)
    } else if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u32::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u32>()
    };
    let mode = parsed.map_err(|_| "not a file mode (e.g. 0600)".to_string())?;
    if mode > 0o777 {
        return Err(format!(
            "{mode:#o} has bits beyond the permission bits 0777"
        ));
    }
    if mode & 0o400 == 0 {
        return Err(format!("{mode:#o} does not let the owner read the file"));
    }
    Ok(mode)
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error("cannot remove plugin kubeconfig {path}: {source}")]
    RemoveKubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Installs, checks and repairs; owns the installer's readiness flag.
#[derive(Debug)]
pub struct Installer {
    cfg: InstallConfig,
    entry: Value,
    ready: ReadyFlag,
    /// Last verified binaries (primary, secondary); also serialises passes.
    known: Mutex<[Option<Fingerprint>; 2]>,
    /// Unloadable CNI config files already warned about by this installer.
    skip_warnings: cni_config::SkipWarnings,
}

impl Installer {
    pub fn new(cfg: InstallConfig, ready: ReadyFlag) -> Self {
        let entry = chain::plugin_entry(&cfg.plugin);
        Self {
            cfg,
            entry,
            ready,
            known: Mutex::new([None, None]),
            skip_warnings: cni_config::SkipWarnings::default(),
        }
    }

    pub fn config(&self) -> &InstallConfig {
        &self.cfg
    }

    /// The istio-cni object chained into the CNI config.
    pub fn plugin_entry(&self) -> &Value {
        &self.entry
    }

    pub fn is_ready(&self) -> bool {
        self.ready.is_ready()
    }

    /// One pass: binary, kubeconfig, then config (so the runtime never
    /// sees the entry before the binary exists). Blocking file I/O: call
    /// from a blocking thread. Sets readiness from the outcome; returns what
    /// was changed.
    pub fn reconcile(&self) -> Result<Vec<String>, InstallError> {
        let r = self.reconcile_inner();
        match &r {
            Ok(changes) => {
                for c in changes {
                    tracing::info!(change = %c, "CNI install repaired");
                }
                self.ready.set_ready();
            }
            Err(e) => {
                tracing::warn!(error = %e, "CNI install is not valid");
                self.ready.set_not_ready(e.to_string());
            }
        }
        r
    }

    fn reconcile_inner(&self) -> Result<Vec<String>, InstallError> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = Vec::new();
        if binary::ensure_binary(&self.cfg.plugin_src, &self.cfg.bin_dir, &mut known[0])? {
            changes.push(format!(
                "installed {}",
                self.cfg.bin_dir.join(binary::PLUGIN_BINARY).display()
            ));
        }
        if let Some(dir) = &self.cfg.secondary_bin_dir {
            match binary::ensure_binary(&self.cfg.plugin_src, dir, &mut known[1]) {
                Ok(true) => changes.push(format!(
                    "installed {}",
                    dir.join(binary::PLUGIN_BINARY).display()
                )),
                Ok(false) => {}
                // Optional: only when writable.
                Err(e) => tracing::debug!(error = %e, "secondary CNI bin dir skipped"),
            }
        }
        if let Some(src) = &self.cfg.kubeconfig_source {
            let text = kubeconfig::render(src)?;
            if kubeconfig::write_if_changed(
                &self.cfg.kubeconfig_path,
                &text,
                self.cfg.kubeconfig_mode,
            )? {
                changes.push(format!("wrote {}", self.cfg.kubeconfig_path.display()));
            }
        }
        let primary = self.cfg.primary_conf_name.as_deref();
        let config_change = match self.cfg.mode {
            ConfigMode::Chained => cni_config::ensure_chained(
                &self.cfg.conf_dir,
                &self.cfg.write,
                &self.entry,
                primary,
                &self.skip_warnings,
            )?,
            ConfigMode::IstioOwned => cni_config::ensure_owned(
                &self.cfg.conf_dir,
                &self.cfg.write,
                &self.entry,
                primary,
                &self.skip_warnings,
            )?,
            ConfigMode::Off => None,
        };
        changes.extend(config_change);
        Ok(changes)
    }

    /// Watches and repairs until `shutdown` completes (see module docs).
    pub async fn run(self: std::sync::Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        watch::run(self, shutdown).await
    }

    /// Uninstall (the DaemonSet is gone): removes the config entry
    /// (restoring a wrapped `.conf`) and the plugin kubeconfig. Blocking.
    /// Marks the installer not ready.
    ///
    /// The plugin binary stays on purpose: container runtimes tear down pods
    /// created before the uninstall with the network config they cached,
    /// which still names `istio-cni`; without the binary that DEL fails
    /// ("failed to find plugin istio-cni") and the pod stays Terminating.
    /// Our DEL does nothing, so a leftover binary is harmless.
    pub fn uninstall(&self) -> Result<Vec<String>, InstallError> {
        let _guard = self.known.lock().unwrap_or_else(|p| p.into_inner());
        self.ready.set_not_ready("uninstalled");
        // Both modes clean both: the node may have run the other one before.
        let mut changes = match self.cfg.mode {
            ConfigMode::Chained | ConfigMode::IstioOwned => {
                cni_config::remove_all(&self.cfg.conf_dir, &self.cfg.write)?
            }
            ConfigMode::Off => Vec::new(),
        };
        for dir in std::iter::once(&self.cfg.bin_dir).chain(self.cfg.secondary_bin_dir.as_ref()) {
            let bin = dir.join(binary::PLUGIN_BINARY);
            if bin.exists() {
                tracing::info!(binary = %bin.display(), "leaving the plugin binary in place on purpose: runtimes still run its (no-op) DEL for pods created before the uninstall");
            }
        }
        if self.cfg.kubeconfig_source.is_some() {
            let removed = kubeconfig::remove(&self.cfg.kubeconfig_path).map_err(|source| {
                InstallError::RemoveKubeconfig {
                    path: self.cfg.kubeconfig_path.clone(),
                    source,
                }
            })?;
            if removed {
                changes.push(format!("removed {}", self.cfg.kubeconfig_path.display()));
            }
        }
        for c in &changes {
            tracing::info!(change = %c, "CNI uninstall");
        }
        Ok(changes)
    }

    /// Upgrade (the DaemonSet still exists): leaves binary, config and
    /// kubeconfig in place. New ambient pods fail ADD (agent unreachable,
    /// API says ambient) until the next agent answers.
    pub fn keep_for_upgrade(&self) {
        tracing::info!(
            conf_dir = %self.cfg.conf_dir.display(),
            "leaving the CNI plugin installed for the next agent"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn defaults_match_the_chart() {
        let c = InstallConfig::from_env(env(&[]));
        assert_eq!(c.bin_dir, PathBuf::from("/host/opt/cni/bin"));
        assert_eq!(c.conf_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(c.plugin_src, PathBuf::from("/opt/istio-cni/bin/istio-cni"));
        assert_eq!(c.mode, ConfigMode::Chained);
        assert_eq!(c.plugin.exclude_namespaces, vec!["kube-system"]);
        assert_eq!(
            c.kubeconfig_path,
            PathBuf::from("/var/run/istio-cni/istio-cni-kubeconfig")
        );
        assert_eq!(c.plugin.kubeconfig, c.kubeconfig_path);
        assert!(c.plugin.ambient_enabled);
        assert_eq!(c.kubeconfig_source, None);
    }

    #[test]
    fn env_overrides() {
        let c = InstallConfig::from_env(env(&[
            ("ISTIO_OWNED_CNI_CONFIG", "true"),
            ("EXCLUDE_NAMESPACES", "kube-system, infra ,"),
            ("CNI_AGENT_RUN_DIR", "/run/x"),
            ("CNI_CONF_NAME", "10-calico.conflist"),
            ("KUBECONFIG", "/etc/kubeconfig"),
            ("ISTIO_OWNED_CNI_CONFIG_FILENAME", "00-mesh.conflist"),
            ("ISTIO_OWNED_CNI_CONF_FILENAME", "01-ignored.conflist"),
            ("CNI_CONF_GROUP_READ", "true"),
            ("KUBECONFIG_MODE", "0640"),
        ]));
        assert_eq!(c.mode, ConfigMode::IstioOwned);
        assert_eq!(c.kubeconfig_mode, 0o640);
        assert_eq!(c.write.owned_name, "00-mesh.conflist");
        assert_eq!(c.write.mode, 0o640);
        assert_eq!(c.plugin.exclude_namespaces, vec!["kube-system", "infra"]);
        assert_eq!(c.plugin.run_dir, PathBuf::from("/run/x"));
        assert_eq!(c.primary_conf_name.as_deref(), Some("10-calico.conflist"));
        assert_eq!(
            c.kubeconfig_source,
            Some(KubeconfigSource::File("/etc/kubeconfig".into()))
        );
        let off = InstallConfig::from_env(env(&[
            ("CHAINED_CNI_PLUGIN", "false"),
            ("ISTIO_OWNED_CNI_CONFIG", "true"),
        ]));
        assert_eq!(off.mode, ConfigMode::Off);
        assert_eq!(off.kubeconfig_mode, 0o600);
    }

    #[test]
    fn file_modes_parse_like_upstream() {
        for (text, mode) in [
            ("0600", 0o600),
            ("0o640", 0o640),
            ("384", 0o600),
            ("0x1a0", 0o640),
            (" 0644 ", 0o644),
            ("0400", 0o400),
        ] {
            assert_eq!(parse_mode(text), Ok(mode), "{text}");
        }
        for bad in ["", "rw-------", "0800", "04600", "0244", "0o7777", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad} accepted");
        }
    }
}
