//! This project's ztunnel binary as a process in the test's own network namespace
//! (shared mode, no pods served): admin, metrics and readiness on free loopback
//! ports, certificates from a fresh local CA, its log in a scratch directory. For
//! tests of what ztunnel learns (`/config_dump`) and how it reports readiness.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A running ztunnel; killed when dropped.
pub struct LocalZtunnel {
    child: tokio::process::Child,
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub ready: SocketAddr,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl LocalZtunnel {
    /// A scratch directory for the files `env` will name ([`Self::spawn`] takes it).
    pub fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().expect("scratch directory")
    }

    /// Starts `ztunnel proxy` with only `env` (plus the local CA, `INPOD_UDS` and the
    /// three listener addresses) in its environment; `dir` holds its files.
    pub fn spawn(dir: tempfile::TempDir, env: &[(&str, String)]) -> LocalZtunnel {
        let p = dir.path();
        let (ca_cert, ca_key) = node_agent::ca::authority::testing::generate_root("zt root");
        std::fs::write(p.join("ca.pem"), &ca_cert).expect("CA certificate");
        std::fs::write(p.join("ca.key"), &ca_key).expect("CA key");
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let (admin, stats, ready) = (
            addr(crate::free_port()),
            addr(crate::free_port()),
            addr(crate::free_port()),
        );
        let log = p.join("ztunnel.log");
        let out = std::fs::File::create(&log).expect("ztunnel log");
        let child = tokio::process::Command::new(crate::bin_path("ztunnel"))
            .arg("proxy")
            .env_clear()
            .env("CA_ROOT_CERT", p.join("ca.pem"))
            .env("CA_ROOT_KEY", p.join("ca.key"))
            .env("INPOD_UDS", p.join("ztunnel.sock"))
            .env("ADMIN_ADDR", admin.to_string())
            .env("STATS_ADDR", stats.to_string())
            .env("READINESS_ADDR", ready.to_string())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .kill_on_drop(true)
            .stdout(out.try_clone().expect("ztunnel log"))
            .stderr(out)
            .spawn()
            .expect("spawn ztunnel");
        LocalZtunnel {
            child,
            admin,
            stats,
            ready,
            log,
            dir,
        }
    }

    /// Its scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/config_dump` until `f` holds (panics with the log after 20 s, or when
    /// ztunnel exits); returns that dump.
    pub async fn dump_until(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let dump = crate::http::get(self.admin, "/config_dump").await;
            if let Some(d) = &dump
                && f(d)
            {
                return d.clone();
            }
            if let Some(status) = self.child.try_wait().expect("ztunnel status") {
                panic!("ztunnel exited ({status}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}; last dump: {dump:?}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The readiness endpoint's answer (empty when nothing answers).
    pub async fn readiness(&self) -> String {
        crate::http::get(self.ready, "/healthz/ready")
            .await
            .unwrap_or_default()
    }
}
