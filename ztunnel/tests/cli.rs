//! The binary's command line and start-up rejections.

use std::process::Command;

fn ztunnel(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    c.args(args).env_clear().env("RUST_LOG", "error");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn commands() {
    let (code, out, _) = ztunnel(&["version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ztunnel "), "{out}");
    let (code, out, _) = ztunnel(&["help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("proxy") && out.contains("version"), "{out}");
    let (code, _, err) = ztunnel(&["frobnicate"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown command \"frobnicate\"") && err.contains("proxy"),
        "{err}"
    );
}

#[test]
fn bad_configuration_is_rejected_naming_field_or_file() {
    let ca_cert = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/ca/ec-root.pem");
    let ca_key = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/ca/ec-root.key");
    let dir = tempfile::tempdir().unwrap();
    let bad_yaml = dir.path().join("local.yaml");
    std::fs::write(&bad_yaml, "workloads:\n- namespace: a\n  protocol: UDP\n").unwrap();
    let bad_yaml = bad_yaml.to_str().unwrap();
    for (env, want) in [
        (
            vec![("PROXY_MODE", "sidecar")],
            vec!["PROXY_MODE", "sidecar"],
        ),
        (
            vec![("PROXY_MODE", "dedicated")],
            vec!["PROXY_WORKLOAD_INFO"],
        ),
        (vec![("SECRET_TTL", "soon")], vec!["SECRET_TTL", "soon"]),
        (
            vec![
                ("LOCAL_XDS_PATH", bad_yaml),
                ("CA_ROOT_CERT", ca_cert),
                ("CA_ROOT_KEY", ca_key),
            ],
            vec!["LOCAL_XDS_PATH", bad_yaml, "workloads[0].protocol"],
        ),
        (
            vec![
                ("CA_ROOT_CERT", "/nonexistent/root.pem"),
                ("CA_ROOT_KEY", ca_key),
            ],
            vec!["CA_ROOT_CERT", "/nonexistent/root.pem"],
        ),
        (
            vec![("CA_ROOT_CERT", ca_cert), ("CA_ROOT_KEY", bad_yaml)],
            vec!["CA_ROOT_KEY", bad_yaml],
        ),
        (vec![("RUST_LOG", "info,[=bad")], vec!["RUST_LOG"]),
    ] {
        let (code, _, err) = ztunnel(&["proxy"], &env);
        assert_eq!(code, 1, "{env:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{env:?}: {w:?} not in {err}");
        }
    }
}
