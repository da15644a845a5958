//! Golden tests for CNI config chaining: each input in
//! `testdata/install/` is installed into a scratch conf dir and the result
//! compared with `<input>.golden`; uninstall must give the input back.
//! `UPDATE_GOLDENS=1 cargo test -p node-agent --test install_chain` rewrites
//! the goldens (review the diff).

use std::fs;
use std::path::{Path, PathBuf};

use node_agent::install::chain::{PluginSettings, plugin_entry};
use node_agent::install::cni_config::{self, OWNED_CONFIG_NAME, SkipWarnings, WriteSettings};
use serde_json::Value;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/install")
}

fn settings() -> PluginSettings {
    PluginSettings {
        log_level: "info".into(),
        run_dir: "/var/run/istio-cni".into(),
        ambient_enabled: true,
        exclude_namespaces: vec!["kube-system".into(), "istio-system".into()],
        pod_namespace: "istio-system".into(),
        detection_retry: false,
        kubeconfig: "/var/run/istio-cni/istio-cni-kubeconfig".into(),
        enablement_selectors: Default::default(),
    }
}

fn read_json(p: &Path) -> Value {
    let text = fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

/// Compares `actual` (a file) with the golden: JSON-equal (key order is not
/// significant to CNI; plugin order is, and arrays are compared in order).
fn check_golden(actual: &Path, golden_name: &str) {
    let golden = testdata().join(golden_name);
    if std::env::var_os("UPDATE_GOLDENS").is_some() {
        fs::copy(actual, &golden).unwrap();
    }
    let got = read_json(actual);
    let want = read_json(&golden);
    assert_eq!(
        got,
        want,
        "{} differs from {}:\n{}",
        actual.display(),
        golden.display(),
        serde_json::to_string_pretty(&got).unwrap()
    );
}

fn scratch_with(input: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::copy(testdata().join(input), d.path().join(input)).unwrap();
    d
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn without_istio(mut v: Value) -> Value {
    v["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "istio-cni");
    v
}

/// Chained mode in `dir` (default write settings, the entry for
/// [`settings`]): what changed.
fn chain(dir: &Path) -> Option<String> {
    cni_config::ensure_chained(
        dir,
        &WriteSettings::default(),
        &plugin_entry(&settings()),
        None,
        &SkipWarnings::default(),
    )
    .unwrap()
}

/// Istio-owned mode in `dir`, as [`chain`].
fn own(dir: &Path) -> Option<String> {
    cni_config::ensure_owned(
        dir,
        &WriteSettings::default(),
        &plugin_entry(&settings()),
        None,
        &SkipWarnings::default(),
    )
    .unwrap()
}

/// Uninstall from `dir` with the default settings: what changed.
fn uninstall(dir: &Path) -> Vec<String> {
    cni_config::remove_all(dir, &WriteSettings::default()).unwrap()
}

#[test]
fn conf_is_wrapped_into_a_conflist() {
    let d = scratch_with("bridge.conf");
    assert!(chain(d.path()).unwrap().contains("wrapped"));
    assert_eq!(names(d.path()), vec!["bridge.conflist"]);
    check_golden(&d.path().join("bridge.conflist"), "bridge.conf.golden");

    let undone = uninstall(d.path());
    assert_eq!(undone.len(), 1);
    assert_eq!(names(d.path()), vec!["bridge.conf"]);
    assert_eq!(
        read_json(&d.path().join("bridge.conf")),
        read_json(&testdata().join("bridge.conf"))
    );
}

#[test]
fn conflist_gets_istio_cni_appended() {
    let d = scratch_with("list.conflist");
    chain(d.path());
    check_golden(&d.path().join("list.conflist"), "list.conflist.golden");
    assert!(chain(d.path()).is_none(), "second pass changes nothing");
    uninstall(d.path());
    assert_eq!(names(d.path()), vec!["list.conflist"]);
    assert_eq!(
        read_json(&d.path().join("list.conflist")),
        read_json(&testdata().join("list.conflist"))
    );
}

#[test]
fn stale_istio_cni_entry_is_replaced() {
    let d = scratch_with("list-with-istio.conflist");
    chain(d.path());
    let path = d.path().join("list-with-istio.conflist");
    check_golden(&path, "list-with-istio.conflist.golden");
    uninstall(d.path());
    assert_eq!(
        read_json(&path),
        without_istio(read_json(&testdata().join("list-with-istio.conflist")))
    );
}

#[test]
fn owned_config_copies_the_primary() {
    let d = scratch_with("list.conflist");
    own(d.path());
    assert_eq!(names(d.path()), vec![OWNED_CONFIG_NAME, "list.conflist"]);
    check_golden(
        &d.path().join(OWNED_CONFIG_NAME),
        "owned-list.conflist.golden",
    );
    assert_eq!(
        read_json(&d.path().join("list.conflist")),
        read_json(&testdata().join("list.conflist")),
        "primary untouched"
    );
    uninstall(d.path());
    assert_eq!(names(d.path()), vec!["list.conflist"]);
}
