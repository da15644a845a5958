//! The module layering ARCHITECTURE.md promises, checked from the source:
//! a module may import (`crate::<module>`) only modules of a lower layer or of
//! its own layer that it does not form a cycle with. Doc comments don't count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).unwrap().flatten() {
        out.extend(rust_files(&e.path()));
    }
    out
}

/// Top-level module → the crate's top-level modules it imports.
fn imports(crate_src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for e in std::fs::read_dir(crate_src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut deps = BTreeSet::new();
        for f in rust_files(&p) {
            for line in std::fs::read_to_string(&f).unwrap().lines() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                for (i, _) in code.match_indices("crate::") {
                    let rest = &code[i + "crate::".len()..];
                    let m: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !m.is_empty() && m != name {
                        deps.insert(m);
                    }
                }
            }
        }
        graph.insert(name, deps);
    }
    graph
}

/// Fails on any import from a lower rank to a higher one; every module of the
/// crate must have a rank.
fn check(crate_dir: &str, layers: &[&[&str]]) {
    let rank: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.iter().map(move |m| (*m, i)))
        .collect();
    let graph = imports(&workspace().join(crate_dir).join("src"));
    let mut bad = Vec::new();
    for (m, deps) in &graph {
        let Some(&r) = rank.get(m.as_str()) else {
            bad.push(format!(
                "{crate_dir}: module `{m}` has no layer in this test"
            ));
            continue;
        };
        for d in deps {
            match rank.get(d.as_str()) {
                Some(&dr) if dr <= r => {}
                Some(_) => bad.push(format!("{crate_dir}: `{m}` imports higher layer `{d}`")),
                None => bad.push(format!("{crate_dir}: `{m}` imports unknown `{d}`")),
            }
        }
    }
    // Same-layer imports must not form a cycle.
    for (m, deps) in &graph {
        for d in deps {
            if graph.get(d).is_some_and(|dd| dd.contains(m)) && m < d {
                bad.push(format!("{crate_dir}: `{m}` and `{d}` import each other"));
            }
        }
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn ztunnel_layers() {
    check(
        "ztunnel",
        &[
            &[
                "config",
                "file_watch",
                "policy",
                "process_memory",
                "test_logs",
            ],
            &["identity"],
            &["tls", "state"],
            &["telemetry"],
            &["hbone"],
            &["proxy"],
            &["redirect", "inpod"],
            &["readiness", "admin"],
            &["app"],
        ],
    );
}

#[test]
fn node_agent_layers() {
    check(
        "node-agent",
        &[
            &[
                "http_endpoint",
                "run_dir_socket",
                "log_scope",
                "test_support",
            ],
            &["health", "metrics", "memory"],
            &["redirect"],
            &["zds"],
            &["install", "plugin_events", "plugin_log", "cluster", "ca"],
            &["config"],
            &["reconcile"],
            &["app"],
        ],
    );
}
