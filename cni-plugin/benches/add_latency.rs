//! ADD latency of the plugin as a runtime sees it (process spawn to exit),
//! for the paths every non-mesh pod takes:
//! - excluded namespace (no I/O at all);
//! - non-mesh pod, agent up (one round trip on the plugin-event socket,
//!   the agent's real endpoint with a handler that answers at once);
//! - mesh pod, agent up (same round trip, "enrolled" answer).
//!
//! Each run also forwards its log lines to the agent's log socket at the end, as
//! against the real agent.
//!
//! Run: `cargo bench -p istio-cni --bench add_latency` (release build).
//! `ADD_LATENCY_ITERATIONS` (default 1000) sets the sample count, `ADD_LATENCY_PLUGIN`
//! another plugin binary. Prints
//! p50/p90/p99/max per path; target p99 <= 10 ms.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use mesh_proto::cni_event::{CmdAddEvent, CmdAddReply, Enrolment};
use node_agent::plugin_events::{CmdAddRefusal, PluginEventListener, PodEventHandler};
use node_agent::plugin_log::PluginLogListener;
use serde_json::json;

/// The plugin measured: this build's, or `ADD_LATENCY_PLUGIN` (another build, for an
/// A/B comparison in one run of the harness).
fn plugin() -> String {
    std::env::var("ADD_LATENCY_PLUGIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_istio-cni").into())
}

struct Immediate;

impl PodEventHandler for Immediate {
    fn cmd_add(&self, ev: CmdAddEvent) -> BoxFuture<'_, Result<CmdAddReply, CmdAddRefusal>> {
        let enrolment = if ev.pod_name.starts_with("mesh-") {
            Enrolment::Enrolled
        } else {
            Enrolment::NotAmbient
        };
        Box::pin(async move {
            Ok(CmdAddReply {
                enrolment,
                reason: "bench".into(),
            })
        })
    }
}

fn run_once(run_dir: &Path, namespace: &str, pod: &str) -> Duration {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
        "plugin_log_level": "info", "cni_agent_run_dir": run_dir,
        "ambient_enabled": true, "pod_namespace": "istio-system",
        "exclude_namespaces": ["kube-system"],
        "prevResult": {"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/bench"}],
            "ips": [{"address": "10.9.0.5/24", "gateway": "10.9.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
    })
    .to_string();
    let start = Instant::now();
    let mut child = Command::new(plugin())
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "bench")
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID=u"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    elapsed
}

/// Spawn-to-exit of another program: what any exec costs on this machine
/// right now (the floor under every number above it).
fn baseline(program: &str, command: &str) -> Duration {
    let start = Instant::now();
    let out = Command::new(program)
        .env_clear()
        .env("CNI_COMMAND", command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn baseline");
    let elapsed = start.elapsed();
    assert!(out.success(), "{program}");
    elapsed
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "{name:<32} n={:<5} p50={:>7.3}ms p90={:>7.3}ms p99={:>7.3}ms max={:>7.3}ms",
        samples.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
    );
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is ignored.
    let n: usize = std::env::var("ADD_LATENCY_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let (listener, log_listener) = {
        let _g = rt.enter();
        (
            PluginEventListener::bind(run_dir.path()).unwrap(),
            PluginLogListener::bind(run_dir.path()).unwrap(),
        )
    };
    rt.spawn(listener.serve(
        Arc::new(Immediate),
        Duration::from_secs(4),
        std::future::pending(),
    ));
    // As the real agent: the plugin forwards its log lines at the end of each run.
    rt.spawn(log_listener.serve(Arc::new(|_| {}), std::future::pending()));
    println!("plugin: {}", plugin());
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average: {}", load.trim());
    }
    println!(
        "plugin size: {:.1} MB",
        std::fs::metadata(plugin()).unwrap().len() as f64 / 1e6
    );
    for _ in 0..20 {
        run_once(run_dir.path(), "demo", "warmup");
    }
    let paths = [
        ("excluded namespace", "kube-system", "coredns"),
        ("non-mesh pod, agent up", "demo", "web"),
        ("mesh pod, agent up", "demo", "mesh-web"),
    ];
    report(
        "baseline: /bin/true",
        (0..n).map(|_| baseline("/bin/true", "")).collect(),
    );
    if Path::new("/usr/lib/cni/bridge").exists() {
        report(
            "baseline: bridge VERSION",
            (0..n)
                .map(|_| baseline("/usr/lib/cni/bridge", "VERSION"))
                .collect(),
        );
    }
    report(
        "istio-cni VERSION",
        (0..n).map(|_| baseline(&plugin(), "VERSION")).collect(),
    );
    for (name, ns, pod) in paths {
        let samples = (0..n).map(|_| run_once(run_dir.path(), ns, pod)).collect();
        report(name, samples);
    }
}
