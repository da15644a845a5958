//! The Kubernetes API double driven by real clients: kubectl (the binary
//! installed on the machine) and kube-rs.
//!
//! Run: `cargo test -p e2e --test apiserver`.
//!
//! Split by client: `kubectl_cli` (the kubectl binary), `kube_rs` (typed and raw API,
//! watches), `tokens` (TokenRequest/TokenReview, the standalone binary, reachability).

mod kube_rs;
mod kubectl_cli;
mod tokens;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::apiserver::{ApiServer, ApiServerHandle, DEFAULT_AUDIENCE, TokenSigner, TokenSpec};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use serde_json::{Value, json};

/// Runs kubectl against `kubeconfig`; returns (success, stdout, stderr).
fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .args(args);
    let out = e2e::netsim::output_with_timeout(cmd, Duration::from_secs(60)).expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let (ok, out, err) = kubectl(kubeconfig, args);
    assert!(ok, "kubectl {args:?} failed: {err}");
    out
}

fn have_kubectl() -> bool {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok()
    {
        return true;
    }
    eprintln!("skipped: kubectl is not installed (scripts/install-deps.sh installs it)");
    false
}

fn server_with_kubeconfig() -> (ApiServerHandle, tempfile::TempDir) {
    let api = ApiServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    api.write_kubeconfig(&dir.path().join("kubeconfig"))
        .unwrap();
    (api, dir)
}
