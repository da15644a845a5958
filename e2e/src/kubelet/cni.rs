//! The CNI side of a container runtime, as containerd's CRI plugin drives it
//! through libcni:
//!
//! - the network configuration is the first file of the node's CNI conf dir
//!   in lexical order with extension `.conf`, `.conflist` or `.json`, re-read
//!   for every sandbox (a single-plugin `.conf` is wrapped into a list); a
//!   file that does not parse fails the sandbox (the runtime retries);
//! - ADD runs each plugin of the list in order, each with the list's
//!   `cniVersion` and `name`, and the previous plugin's result as
//!   `prevResult`; the first failure stops the chain, and the runtime then
//!   tears the whole network down (DEL of every plugin, in reverse order);
//! - DEL runs the plugins in reverse order with the cached ADD result as
//!   `prevResult` (libcni caches results per container);
//! - each plugin is an executable found in `CNI_PATH`, run in the node's
//!   network namespace with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//!   `CNI_IFNAME`, `CNI_ARGS` (`IgnoreUnknown=1;K8S_POD_NAMESPACE=…;
//!   K8S_POD_NAME=…;K8S_POD_INFRA_CONTAINER_ID=…;K8S_POD_UID=…`) and
//!   `CNI_PATH`, the configuration on stdin, the result (or a CNI error
//!   object) on stdout.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netsim::{NamedNetns, OWNER_ENV};

/// File extensions libcni loads from a conf dir.
pub const CONF_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// Why a CNI operation failed; each names the file, plugin or pod.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network config in {dir} (no .conf/.conflist/.json file)")]
    NoConfig { dir: PathBuf },
    #[error("cannot read CNI conf dir {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI config {file}: {reason}")]
    BadConfig { file: PathBuf, reason: String },
    #[error("CNI plugin {plugin:?} not found in CNI_PATH {path}")]
    PluginMissing { plugin: String, path: String },
    #[error("CNI {command} of pod {pod}: plugin {plugin}: {reason}")]
    Plugin {
        command: &'static str,
        pod: String,
        plugin: String,
        reason: String,
    },
}

/// A loaded network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfigList {
    /// The file it came from.
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// Each plugin's configuration object, in order.
    pub plugins: Vec<Value>,
}

impl NetworkConfigList {
    /// The `type` of each plugin, in order (for messages and tests).
    pub fn plugin_types(&self) -> Vec<String> {
        self.plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

/// Parses one config file's content (`.conflist`, or a single-plugin
/// `.conf`/`.json` that is wrapped into a list).
pub fn parse_config(file: &Path, data: &[u8]) -> Result<NetworkConfigList, CniError> {
    let bad = |reason: String| CniError::BadConfig {
        file: file.to_path_buf(),
        reason,
    };
    let v: Value = serde_json::from_slice(data).map_err(|e| bad(format!("not JSON: {e}")))?;
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist");
    let name = v["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("no network name".into()))?
        .to_string();
    let cni_version = v["cniVersion"].as_str().unwrap_or("0.1.0").to_string();
    let plugins = if is_list {
        let plugins = v["plugins"]
            .as_array()
            .ok_or_else(|| bad("a .conflist needs a \"plugins\" array".into()))?
            .clone();
        if plugins.is_empty() {
            return Err(bad("\"plugins\" is empty".into()));
        }
        plugins
    } else {
        vec![v.clone()]
    };
    for (i, p) in plugins.iter().enumerate() {
        if p["type"].as_str().is_none_or(str::is_empty) {
            return Err(bad(format!("plugin {i} has no \"type\"")));
        }
    }
    Ok(NetworkConfigList {
        file: file.to_path_buf(),
        name,
        cni_version,
        plugins,
    })
}

/// The first config file of `dir` in lexical order, loaded (blocking).
pub fn load_conf_dir(dir: &Path) -> Result<NetworkConfigList, CniError> {
    let rd = std::fs::read_dir(dir).map_err(|source| CniError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| CONF_EXTENSIONS.contains(&e))
        })
        .collect();
    files.sort();
    let file = files.into_iter().next().ok_or_else(|| CniError::NoConfig {
        dir: dir.to_path_buf(),
    })?;
    let data = std::fs::read(&file).map_err(|e| CniError::BadConfig {
        file: file.clone(),
        reason: format!("cannot read: {e}"),
    })?;
    parse_config(&file, &data)
}

/// The plugin's stdin: its object plus the list's `cniVersion` and `name`,
/// and `prevResult` when given.
pub fn plugin_stdin(list: &NetworkConfigList, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut conf = plugin.clone();
    conf["cniVersion"] = json!(list.cni_version);
    conf["name"] = json!(list.name);
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    conf
}

/// Identity of the pod sandbox a CNI call is about.
#[derive(Debug, Clone)]
pub struct SandboxRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox (infra container) id: `CNI_CONTAINERID`.
    pub container_id: String,
    /// `/run/netns/<name>`.
    pub netns_path: PathBuf,
    /// `CNI_IFNAME` (`eth0`).
    pub ifname: String,
}

impl SandboxRef {
    /// `CNI_ARGS` as containerd sets it.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where and how plugins run.
#[derive(Debug, Clone)]
pub struct CniRuntime {
    /// The node's conf dir.
    pub conf_dir: PathBuf,
    /// `CNI_PATH`: directories searched for plugin binaries, in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Name of the node netns the plugins run in (`/run/netns/<name>`).
    pub node_netns: String,
    /// Scope marker for the plugin processes (stale clean-up).
    pub owner: String,
    /// Each plugin execution is killed after this long.
    pub plugin_timeout: Duration,
}

/// The outcome of a successful ADD.
#[derive(Debug, Clone)]
pub struct AddResult {
    pub list: NetworkConfigList,
    /// The last plugin's result (cached for DEL).
    pub result: Value,
    /// What the plugins printed on stderr (their decision logs), one
    /// `type: line` per line, as a runtime keeps them for the operator.
    pub plugin_log: String,
}

impl AddResult {
    /// Pod IPs in the result, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        result_ips(&self.result)
    }
}

/// IP addresses (without prefix length) in a CNI result, IPv4 first.
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    ips.sort_by_key(|ip| !ip.is_ipv4());
    ips
}

impl CniRuntime {
    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    fn find_plugin(&self, kind: &str) -> Result<PathBuf, CniError> {
        if !kind.contains('/') {
            for d in &self.bin_dirs {
                let p = d.join(kind);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(CniError::PluginMissing {
            plugin: kind.to_string(),
            path: self.cni_path(),
        })
    }

    /// Loads the current network configuration (blocking file reads, small).
    pub fn load(&self) -> Result<NetworkConfigList, CniError> {
        load_conf_dir(&self.conf_dir)
    }

    /// ADD of the whole chain; on failure the network is torn down again
    /// (DEL of every plugin) before the error is returned.
    pub async fn add(&self, sb: &SandboxRef) -> Result<AddResult, CniError> {
        let conf_dir = self.conf_dir.clone();
        let list = tokio::task::spawn_blocking(move || load_conf_dir(&conf_dir))
            .await
            .expect("config loader panicked")?;
        let mut prev: Option<Value> = None;
        let mut plugin_log = String::new();
        for plugin in &list.plugins {
            match self.exec("ADD", sb, &list, plugin, prev.as_ref()).await {
                Ok((out, err)) => {
                    let kind = plugin["type"].as_str().unwrap_or("?");
                    for line in err.lines().filter(|l| !l.trim().is_empty()) {
                        plugin_log.push_str(&format!("{kind}: {line}\n"));
                    }
                    let v: Value = serde_json::from_str(&out).map_err(|e| CniError::Plugin {
                        command: "ADD",
                        pod: sb.key(),
                        plugin: plugin["type"].as_str().unwrap_or("?").into(),
                        reason: format!("printed no JSON result ({e}): {}", out.trim()),
                    })?;
                    prev = Some(v);
                }
                Err(e) => {
                    if let Err(del) = self.del_list(sb, &list, prev.as_ref()).await {
                        tracing::warn!(pod = %sb.key(), error = %del, "CNI DEL after a failed ADD failed");
                    }
                    return Err(e);
                }
            }
        }
        Ok(AddResult {
            list,
            result: prev.unwrap_or(Value::Null),
            plugin_log,
        })
    }

    /// DEL of the chain `list` (reverse order) with `cached` as
    /// `prevResult`. Every plugin is called; the first error is returned.
    pub async fn del_list(
        &self,
        sb: &SandboxRef,
        list: &NetworkConfigList,
        cached: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first = None;
        for plugin in list.plugins.iter().rev() {
            if let Err(e) = self.exec("DEL", sb, list, plugin, cached).await
                && first.is_none()
            {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// DEL with the configuration current now (when the ADD result is not
    /// known, e.g. a sandbox whose ADD never finished).
    pub async fn del(&self, sb: &SandboxRef, cached: Option<&AddResult>) -> Result<(), CniError> {
        match cached {
            Some(r) => self.del_list(sb, &r.list, Some(&r.result)).await,
            None => {
                let list = self.load()?;
                self.del_list(sb, &list, None).await
            }
        }
    }

    /// Runs one plugin; stdout and stderr on success, a described error
    /// otherwise.
    async fn exec(
        &self,
        command: &'static str,
        sb: &SandboxRef,
        list: &NetworkConfigList,
        plugin: &Value,
        prev: Option<&Value>,
    ) -> Result<(String, String), CniError> {
        let kind = plugin["type"].as_str().unwrap_or("?").to_string();
        let fail = |reason: String| CniError::Plugin {
            command,
            pod: sb.key(),
            plugin: kind.clone(),
            reason,
        };
        let bin = self.find_plugin(&kind)?;
        let stdin = serde_json::to_vec(&plugin_stdin(list, plugin, prev)).expect("JSON");
        let node = NamedNetns::open(&self.node_netns)
            .map_err(|e| fail(format!("cannot open the node netns: {e}")))?;
        let mut cmd = node.command(&bin);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env(OWNER_ENV, &self.owner)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sb.container_id)
            .env("CNI_NETNS", &sb.netns_path)
            .env("CNI_IFNAME", &sb.ifname)
            .env("CNI_ARGS", sb.cni_args())
            .env("CNI_PATH", self.cni_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", bin.display())))?;
        let mut input = child.stdin.take().expect("piped stdin");
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let run = async {
            // A plugin may exit before reading stdin: ignore write errors,
            // the exit status tells.
            let _ = input.write_all(&stdin).await;
            drop(input);
            let (mut o, mut e) = (Vec::new(), Vec::new());
            let (_, _, status) = tokio::join!(
                out.read_to_end(&mut o),
                err.read_to_end(&mut e),
                child.wait()
            );
            (o, e, status)
        };
        let (stdout, stderr, status) = tokio::time::timeout(self.plugin_timeout, run)
            .await
            .map_err(|_| {
                fail(format!(
                    "still running after {:?}, killed",
                    self.plugin_timeout
                ))
            })?;
        let status = status.map_err(|e| fail(format!("wait: {e}")))?;
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        if status.success() {
            Ok((stdout, String::from_utf8_lossy(&stderr).into_owned()))
        } else {
            Err(fail(format!(
                "{status}: {} {}",
                stdout.trim(),
                String::from_utf8_lossy(&stderr).trim()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_and_single_conf_are_loaded_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("README"), "not a config").unwrap();
        std::fs::write(
            dir.path().join("20-b.conf"),
            r#"{"cniVersion":"0.4.0","name":"b","type":"bridge"}"#,
        )
        .unwrap();
        let l = load_conf_dir(dir.path()).unwrap();
        assert_eq!(l.name, "b");
        assert_eq!(l.plugin_types(), ["bridge"]);
        assert_eq!(l.cni_version, "0.4.0");
        std::fs::write(
            dir.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"},{"type":"istio-cni"}]}"#,
        )
        .unwrap();
        let l = load_conf_dir(dir.path()).unwrap();
        assert_eq!(l.name, "a");
        assert_eq!(l.plugin_types(), ["bridge", "istio-cni"]);
    }

    #[test]
    fn bad_configs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_conf_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no CNI network config"), "{err}");
        let f = dir.path().join("05-x.conflist");
        for (content, want) in [
            ("{", "not JSON"),
            (r#"{"name":"x"}"#, "plugins"),
            (r#"{"name":"x","plugins":[]}"#, "empty"),
            (r#"{"name":"x","plugins":[{"a":1}]}"#, "no \"type\""),
            (r#"{"plugins":[{"type":"a"}]}"#, "no network name"),
        ] {
            std::fs::write(&f, content).unwrap();
            let err = load_conf_dir(dir.path()).unwrap_err().to_string();
            assert!(err.contains("05-x.conflist") && err.contains(want), "{err}");
        }
    }

    #[test]
    fn stdin_carries_version_name_and_prev_result() {
        let list = parse_config(
            Path::new("a.conflist"),
            br#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"istio-cni"}]}"#,
        )
        .unwrap();
        let first = plugin_stdin(&list, &list.plugins[0], None);
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["name"], "net");
        assert_eq!(first["bridge"], "cni0");
        assert!(first.get("prevResult").is_none());
        let prev = json!({"ips": [{"address": "10.244.1.5/24"}]});
        let second = plugin_stdin(&list, &list.plugins[1], Some(&prev));
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["type"], "istio-cni");
    }

    #[test]
    fn cni_args_and_result_ips() {
        let sb = SandboxRef {
            namespace: "demo".into(),
            name: "web".into(),
            uid: "u-1".into(),
            container_id: "c1".into(),
            netns_path: "/run/netns/x".into(),
            ifname: "eth0".into(),
        };
        assert_eq!(
            sb.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u-1"
        );
        let r = json!({"ips": [{"address": "fd00::5/64"}, {"address": "10.244.1.5/24"}]});
        assert_eq!(
            result_ips(&r),
            vec![
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }
}
