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
        (
            vec![("PROXY_CONFIG", "concurrency: [")],
            vec!["PROXY_CONFIG", "not a ProxyConfig"],
        ),
        (
            vec![
                ("LOCAL_XDS", "workloads:\n- namespace: a\n  protocol: UDP\n"),
                ("CA_ROOT_CERT", ca_cert),
                ("CA_ROOT_KEY", ca_key),
            ],
            vec!["LOCAL_XDS", "workloads[0].protocol"],
        ),
        (
            vec![("LOCAL_XDS", "workloads: []"), ("LOCAL_XDS_PATH", bad_yaml)],
            vec!["LOCAL_XDS", "only one of"],
        ),
        (
            vec![
                ("CA_ROOT_CERT", ca_cert),
                ("CA_ROOT_KEY", ca_key),
                ("CRL_PATH", bad_yaml),
            ],
            vec!["CRL_PATH", bad_yaml, "neither PEM nor a DER CRL"],
        ),
    ] {
        let (code, _, err) = ztunnel(&["proxy"], &env);
        assert_eq!(code, 1, "{env:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{env:?}: {w:?} not in {err}");
        }
    }
}

/// In-pod mode without the capability to mark sockets (no CAP_NET_ADMIN) stops at start-up
/// naming the cause, instead of running unready while every pod's proxy fails.
#[test]
fn inpod_mode_without_net_admin_fails_at_start() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to start the binary as an unprivileged user");
        return;
    }
    // Readable by the unprivileged user: the development CA and the directory around it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let testdata = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/ca");
    for f in ["ec-root.pem", "ec-root.key"] {
        let to = dir.path().join(f);
        std::fs::copy(format!("{testdata}/{f}"), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let path = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .arg("proxy")
        .env_clear()
        .env("RUST_LOG", "error")
        .env("PROXY_MODE", "shared")
        .env("INPOD_ENABLED", "true")
        .env("INPOD_UDS", path("ztunnel.sock"))
        .env("CA_ROOT_CERT", path("ec-root.pem"))
        .env("CA_ROOT_KEY", path("ec-root.key"))
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("STATS_ADDR", "127.0.0.1:0")
        .env("READINESS_ADDR", "127.0.0.1:0")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot set SO_MARK 0x539") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
}

/// The soft open-files limit is raised to the hard one at start (as upstream): runtimes
/// often start containers at 1024, too few for a node's pods and their connections.
#[test]
fn the_open_files_limit_is_raised_at_start() {
    use std::os::unix::process::CommandExt;
    let testdata = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/ca");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    cmd.arg("proxy")
        .env_clear()
        .env("RUST_LOG", "error")
        .env("PROXY_MODE", "shared")
        .env("INPOD_ENABLED", "true")
        .env("INPOD_UDS", dir.path().join("absent.sock"))
        .env("CA_ROOT_CERT", format!("{testdata}/ec-root.pem"))
        .env("CA_ROOT_KEY", format!("{testdata}/ec-root.key"))
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("STATS_ADDR", "127.0.0.1:0")
        .env("READINESS_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only an async-signal-safe syscall between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 256, 4096)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    let soft = || -> Option<String> {
        let text = std::fs::read_to_string(&limits).ok()?;
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3).map(str::to_string)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = soft();
    while seen.as_deref() != Some("4096") && std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        seen = soft();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.as_deref(), Some("4096"), "soft limit not raised");
}
