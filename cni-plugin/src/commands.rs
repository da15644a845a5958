//! One plugin run: read the invocation and config, dispatch the command,
//! produce stdout and the exit status.

use std::io::Read;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use mesh_proto::cni_event::CmdAddEvent;

use crate::add::{self, Backends, Plan};
use crate::agent_client::{self, AgentAnswer, AgentUnreachable};
use crate::cni::error::{CniError, ErrorCode};
use crate::cni::invocation::{Command, Invocation};
use crate::cni::version::{self, LATEST};
use crate::config::PluginConf;
use crate::pod_lookup::{self, LookupError};
use mesh_proto::enablement::Decision;

/// A runtime closes our stdin once the config is written; should one not,
/// we give up rather than hang.
pub const STDIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to print on stdout and how to exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub success: bool,
}

/// Runs the plugin for the given environment and stdin.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: impl Read + Send + 'static) -> Output {
    let mut version_for_errors = LATEST.to_string();
    let out = match dispatch(env, stdin, &mut version_for_errors) {
        Ok(stdout) => Output {
            stdout: stdout.unwrap_or_default(),
            success: true,
        },
        Err(e) => {
            tracing::error!(
                code = e.code as u32,
                details = e.details.as_deref().unwrap_or(""),
                "{}",
                e.msg
            );
            Output {
                stdout: e.to_json(&version_for_errors),
                success: false,
            }
        }
    };
    crate::logging::forward_to_agent();
    out
}

fn dispatch(
    env: impl Fn(&str) -> Option<String>,
    stdin: impl Read + Send + 'static,
    version_for_errors: &mut String,
) -> Result<Option<String>, CniError> {
    let inv = Invocation::from_env(&env)?;
    if inv.command == Command::Version {
        return Ok(Some(version::version_info_json()));
    }
    let stdin = read_stdin(stdin, STDIN_TIMEOUT)?;
    if inv.command == Command::Del {
        let (_, _, version) = PluginConf::envelope(&stdin)?;
        version_for_errors.clone_from(&version);
        return Ok(None);
    }
    let conf = PluginConf::parse(&stdin)?;
    version_for_errors.clone_from(&conf.cni_version);
    crate::logging::init(&conf.log_level, &conf.run_dir);
    match inv.command {
        Command::Add => cmd_add(&conf, &inv).map(Some),
        // Answered above, from the envelope alone.
        Command::Del => Ok(None),
        Command::Check => {
            if !conf.version.allows_check() {
                return Err(CniError::new(
                    ErrorCode::IncompatibleVersion,
                    "config version does not allow CHECK",
                )
                .with_details(format!(
                    "config is {:?}; CHECK needs 0.4.0 or later",
                    conf.cni_version
                )));
            }
            if conf.prev_result.is_none() {
                return Err(CniError::new(
                    ErrorCode::InvalidNetworkConfig,
                    format!("network {:?}: CHECK without prevResult", conf.name),
                ));
            }
            Ok(None)
        }
        Command::Status | Command::Gc => {
            if !conf.version.allows_status_and_gc() {
                return Err(CniError::new(
                    ErrorCode::IncompatibleVersion,
                    format!(
                        "config version does not allow {}",
                        if inv.command == Command::Status {
                            "STATUS"
                        } else {
                            "GC"
                        }
                    ),
                )
                .with_details(format!(
                    "config is {:?}; needs 1.1.0 or later",
                    conf.cni_version
                )));
            }
            // STATUS always succeeds: failing it would stop the runtime from
            // starting any pod on the node, mesh or not, whenever the agent
            // restarts. GC has nothing to collect: the plugin keeps no state.
            Ok(None)
        }
        Command::Version => unreachable!("handled above"),
    }
}

fn cmd_add(conf: &PluginConf, inv: &Invocation) -> Result<String, CniError> {
    let event = match add::plan(conf, inv) {
        Plan::PassThrough(why) => {
            tracing::info!(container = %inv.container_id, pod = %pod_label(inv), "skipped: {why}");
            return Ok(add_result(conf));
        }
        Plan::AskAgent(event) => event,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CniError::new(ErrorCode::Internal, "cannot start the async runtime")
                .with_details(e.to_string())
        })?;
    let started = std::time::Instant::now();
    let why = rt.block_on(add::resolve(conf, &event, &RealBackends))?;
    tracing::info!(container = %inv.container_id, took = ?started.elapsed(), "{why}");
    Ok(add_result(conf))
}

/// ADD's result: `prevResult` passed through in the config's version, or,
/// without one (not chained after an interface plugin), an empty result in
/// that version, as upstream.
fn add_result(conf: &PluginConf) -> String {
    match &conf.prev_result {
        Some(prev) => prev.render(&conf.cni_version, conf.version),
        None => {
            tracing::info!(network = %conf.name, "no prevResult: printing an empty result");
            serde_json::json!({ "cniVersion": conf.cni_version }).to_string()
        }
    }
}

fn pod_label(inv: &Invocation) -> String {
    match inv.args.k8s_pod() {
        Some(p) => format!("{}/{}", p.namespace, p.name),
        None => "-".into(),
    }
}

struct RealBackends;

impl Backends for RealBackends {
    async fn ask_agent(
        &self,
        socket: &Path,
        event: &CmdAddEvent,
    ) -> Result<AgentAnswer, AgentUnreachable> {
        agent_client::send_cmd_add(socket, event, add::AGENT_TIMEOUT).await
    }

    async fn lookup(
        &self,
        conf: &PluginConf,
        namespace: &str,
        name: &str,
    ) -> Result<Decision, LookupError> {
        let selectors = conf
            .enablement_selectors
            .as_ref()
            .map_err(|e| LookupError::Selectors(e.clone()))?;
        let path = conf.kubeconfig.clone();
        let kubeconfig = tokio::task::spawn_blocking(move || pod_lookup::load_kubeconfig(&path))
            .await
            .map_err(|e| LookupError::Client {
                path: conf.kubeconfig.clone(),
                reason: e.to_string(),
            })??;
        pod_lookup::decide_from_api(
            kubeconfig,
            &conf.kubeconfig,
            selectors,
            namespace,
            name,
            add::LOOKUP_TIMEOUT,
        )
        .await
    }
}

/// Reads all of stdin on a helper thread, bounded by `timeout`.
fn read_stdin(
    mut stdin: impl Read + Send + 'static,
    timeout: Duration,
) -> Result<Vec<u8>, CniError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = Vec::new();
            let r = stdin.read_to_end(&mut buf).map(|_| buf);
            let _ = tx.send(r);
        })
        .map_err(|e| {
            CniError::new(ErrorCode::IoFailure, "cannot start the stdin reader")
                .with_details(e.to_string())
        })?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(buf)) => Ok(buf),
        Ok(Err(e)) => Err(CniError::new(
            ErrorCode::IoFailure,
            "cannot read the network config from stdin",
        )
        .with_details(e.to_string())),
        Err(_) => Err(CniError::new(
            ErrorCode::IoFailure,
            format!("stdin not closed within {timeout:?}; no network config read"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn add_env(args: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "c1".into()),
            ("CNI_NETNS", "/var/run/netns/x".into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_ARGS", args.into()),
        ]
    }

    fn run_with(pairs: &[(&str, String)], stdin: &str) -> Output {
        let p: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run(env(&p), std::io::Cursor::new(stdin.as_bytes().to_vec()))
    }

    #[test]
    fn add_passes_prev_result_through_for_skipped_pods() {
        let conf = r#"{"cniVersion":"0.4.0","name":"net","type":"istio-cni","ambient_enabled":true,
            "prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.2/24"}],"dns":{}}}"#;
        let out = run_with(
            &add_env("K8S_POD_NAME=a;K8S_POD_NAMESPACE=kube-system"),
            conf,
        );
        assert!(out.success, "{}", out.stdout);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["address"], "10.0.0.2/24");
    }

    /// Without `prevResult` ADD succeeds with an empty result in the
    /// config's version (upstream prints `{"cniVersion": "<version>"}`).
    #[test]
    fn add_without_prev_result_prints_an_empty_result() {
        for (version, args) in [
            ("0.4.0", "K8S_POD_NAME=a;K8S_POD_NAMESPACE=kube-system"),
            ("1.0.0", "IgnoreUnknown=1"),
        ] {
            let conf = format!(
                r#"{{"cniVersion":"{version}","name":"net","type":"istio-cni","ambient_enabled":true}}"#
            );
            let out = run_with(&add_env(args), &conf);
            assert!(out.success, "{}", out.stdout);
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(v, serde_json::json!({ "cniVersion": version }));
        }
        let off =
            r#"{"cniVersion":"1.1.0","name":"net","type":"istio-cni","ambient_enabled":false}"#;
        let out = run_with(&add_env("K8S_POD_NAME=a;K8S_POD_NAMESPACE=demo"), off);
        assert!(out.success, "{}", out.stdout);
        assert_eq!(out.stdout, r#"{"cniVersion":"1.1.0"}"#);
    }

    #[test]
    fn version_needs_no_stdin() {
        let out = run(env(&[("CNI_COMMAND", "VERSION")]), std::io::empty());
        assert!(out.success);
        assert!(out.stdout.contains("supportedVersions"));
    }

    #[test]
    fn check_gated_by_version_and_prev_result() {
        let mut e = add_env("");
        e[0].1 = "CHECK".into();
        let out = run_with(
            &e,
            r#"{"cniVersion":"0.3.1","name":"n","type":"istio-cni","prevResult":{}}"#,
        );
        assert!(!out.success);
        assert!(out.stdout.contains("\"code\":1"));
        assert!(out.stdout.contains("\"cniVersion\":\"0.3.1\""));
        let out = run_with(
            &e,
            r#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni"}"#,
        );
        assert!(!out.success);
        assert!(out.stdout.contains("\"code\":7"));
        let out = run_with(
            &e,
            r#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni","prevResult":{}}"#,
        );
        assert!(out.success);
        assert_eq!(out.stdout, "");
    }

    #[test]
    fn status_and_gc_need_1_1_0() {
        for cmd in ["STATUS", "GC"] {
            let e = vec![("CNI_COMMAND", cmd.to_string())];
            assert!(
                run_with(
                    &e,
                    r#"{"cniVersion":"1.1.0","name":"n","type":"istio-cni"}"#
                )
                .success
            );
            let out = run_with(
                &e,
                r#"{"cniVersion":"1.0.0","name":"n","type":"istio-cni"}"#,
            );
            assert!(!out.success);
            assert!(out.stdout.contains("\"code\":1"), "{}", out.stdout);
        }
    }

    struct NeverEnds;
    impl Read for NeverEnds {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(0)
        }
    }

    #[test]
    fn stdin_that_never_closes_times_out() {
        let e = read_stdin(NeverEnds, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.code, ErrorCode::IoFailure);
        assert!(e.msg.contains("stdin"));
    }
}
