//! Finding the project's binaries from tests.
//!
//! End-to-end tests run the real programs (`ztunnel`, `node-agent`,
//! `istio-cni`, `kube-api-double`). They are found in `$E2E_BIN_DIR` when
//! set, else in `$CARGO_TARGET_DIR/debug`, else in `<workspace>/target/debug`
//! (the Makefile builds `--bins` before running tests).

use std::path::PathBuf;

/// Where binaries are looked up (see the module docs).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("E2E_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("debug");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e crate lives inside the workspace")
        .join("target")
        .join("debug")
}

/// Path of binary `name`, or an error telling how to build it.
pub fn try_bin_path(name: &str) -> Result<PathBuf, String> {
    let p = bin_dir().join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "binary {name} not found at {}: run `cargo build --bins` first (or set E2E_BIN_DIR)",
            p.display()
        ))
    }
}

/// Path of binary `name`; panics with a message telling how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    try_bin_path(name).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_how_to_build_it() {
        let err = try_bin_path("no-such-binary-xyz").unwrap_err();
        assert!(err.contains("cargo build --bins"), "{err}");
        assert!(err.contains("no-such-binary-xyz"), "{err}");
    }
}
