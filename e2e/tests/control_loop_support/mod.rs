//! Shared set-up of the control-loop end-to-end tests: one simulated node
//! (e2e netsim), the Kubernetes API double reachable from it, the real
//! `node-agent` binary running in the node's netns with the chart's
//! environment, a ztunnel-side ZDS client (ztunnel's own `InpodClient`
//! with a recording proxy manager) and a tiny "kubelet": pods created in
//! the API, given a netns, wired by the real CNI chain (`bridge` +
//! `host-local` + our `istio-cni`, from the conflist the agent chained) and
//! reported Running with their IP.
//!
//! - [`zds_client`]: ztunnel's side of ZDS;
//! - [`env`]: the node, the API double and the agent process ([`Env`]);
//! - [`kube_objects`]: Kubernetes objects through the API double and kubectl;
//! - [`kubelet`]: the "kubelet": pods, their netns and the CNI chain;
//! - [`pod_rules`]: what the agent left in a pod's netns.

#![allow(dead_code)]

mod env;
mod kube_objects;
mod kubelet;
mod pod_rules;
mod zds_client;

use std::path::Path;
use std::time::{Duration, Instant};

pub use env::Env;
#[allow(unused_imports)] // not every test binary names it
pub use kubelet::PodRef;

pub const AGENT_NS: &str = "istio-system";
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

pub fn skip_reason() -> Option<String> {
    if !e2e::netsim::can_create_netns() {
        return Some("needs root to create network namespaces".into());
    }
    for p in ["bridge", "host-local"] {
        if !Path::new(REFERENCE_PLUGINS).join(p).exists() {
            return Some(format!(
                "CNI reference plugin {REFERENCE_PLUGINS}/{p} missing (package containernetworking-plugins)"
            ));
        }
    }
    for b in ["node-agent", "istio-cni"] {
        if let Err(e) = e2e::binaries::try_bin_path(b) {
            return Some(e);
        }
    }
    None
}

#[macro_export]
macro_rules! require_env {
    () => {
        if let Some(why) = control_loop_support::skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// How much longer than on the host waits may take: `E2E_TIME_SCALE`, else
/// x20 inside scripts/vm-tests.sh's VM (`GENEVE_TESTS_REQUIRED=1`: an
/// emulated machine, tens of times slower), else 1. Functional checks
/// stay the same; only time limits stretch.
pub fn time_scale() -> u32 {
    if let Some(n) = std::env::var("E2E_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        return n.max(1);
    }
    if std::env::var("GENEVE_TESTS_REQUIRED").as_deref() == Ok("1") {
        20
    } else {
        1
    }
}

/// Polls `f` every 10 ms until it returns `Some`, or panics after `max`
/// (times [`time_scale`]) with `what` and `context()`.
pub fn wait_for<T>(
    what: &str,
    max: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let max = max * time_scale();
    let deadline = Instant::now() + max;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {max:?} waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
