//! Two pods on one simulated node (netns + veth + bridge, from `e2e::netsim`); optionally
//! meshed: the in-pod capture rules (node agent's generator + applier) and one dedicated
//! ztunnel per pod, as in `e2e/tests/dedicated.rs`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::dedicated_mesh::{apply_capture_rules, http_get};
use e2e::netsim::{Cluster, Pod, Process};

pub struct Topology {
    pub a: Pod,
    pub b: Pod,
    pub ztunnels: Vec<Ztunnel>,
    pub cluster: Cluster,
}

pub struct Ztunnel {
    pub name: &'static str,
    pub process: Process,
    pub log: PathBuf,
}

impl Ztunnel {
    pub fn pid(&self) -> i32 {
        self.process.pid() as i32
    }
}

fn local_config(a: Ipv4Addr, b: Ipv4Addr) -> String {
    let w = |name: &str, ip: Ipv4Addr| {
        format!(
            "- uid: Kubernetes//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
             serviceAccount: sa-{name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: node1\n  services: {{}}\n"
        )
    };
    format!("workloads:\n{}{}", w("a", a), w("b", b))
}

impl Topology {
    pub fn new(tag: &str) -> Result<Topology> {
        let cluster = Cluster::new(tag, 1).context("creating the simulated node")?;
        let node = cluster.node(1);
        let a = node.add_pod("a").context("pod a")?;
        let b = node.add_pod("b").context("pod b")?;
        Ok(Topology {
            a,
            b,
            ztunnels: Vec::new(),
            cluster,
        })
    }

    pub fn dir(&self) -> &Path {
        self.cluster.scope().dir()
    }

    /// The in-pod capture rules (node agent's generator + applier) in both pods.
    pub fn capture(&self) -> Result<()> {
        for pod in [&self.a, &self.b] {
            apply_capture_rules(pod).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// A dedicated ztunnel of `flavor` in each pod (capture rules must be in place); waits
    /// until both are ready.
    pub fn start_ztunnels(
        &mut self,
        flavor: &Flavor,
        extra_env: &[(String, String)],
    ) -> Result<()> {
        if !self.ztunnels.is_empty() {
            bail!("ztunnels already running; stop_ztunnels first");
        }
        let config = self.dir().join("local-config.yaml");
        std::fs::write(&config, local_config(self.a.ip(), self.b.ip()))?;
        for (name, pod) in [("a", &self.a), ("b", &self.b)] {
            let log = self
                .dir()
                .join(format!("ztunnel-{}-{name}.log", flavor.tag()));
            let mut cmd = pod.netns().command(flavor.binary());
            unblock_termination(&mut cmd);
            cmd.arg("proxy")
                .env("PROXY_MODE", "dedicated")
                .env("PROXY_WORKLOAD_INFO", format!("default/{name}/sa-{name}"))
                .env("LOCAL_XDS_PATH", &config)
                .env("NODE_NAME", "node1")
                .env("RUST_LOG", "warn")
                .envs(flavor.env())
                .envs(extra_env.iter().map(|(k, v)| (k, v)))
                .stdin(std::process::Stdio::null())
                // Appended: every phase restarts the ztunnels into the same log.
                .stdout(
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(&log)?,
                )
                .stderr(std::fs::File::options().append(true).open(&log)?);
            let process = Process::spawn(cmd)
                .with_context(|| format!("starting {} in pod {name}", flavor.binary().display()))?;
            self.ztunnels.push(Ztunnel { name, process, log });
        }
        for (pod, z) in [&self.a, &self.b].into_iter().zip(&self.ztunnels) {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                if http_get(pod.netns(), 15021, "/healthz/ready")
                    .is_some_and(|(status, _)| status == 200)
                {
                    break;
                }
                if Instant::now() > end {
                    bail!(
                        "{} ztunnel {} not ready within 30 s; log:\n{}",
                        flavor.tag(),
                        z.name,
                        std::fs::read_to_string(&z.log).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Stops both ztunnels (SIGTERM, then SIGKILL after 5 s).
    pub fn stop_ztunnels(&mut self) {
        for mut z in self.ztunnels.drain(..) {
            z.process.terminate(Duration::from_secs(5));
        }
    }
}

/// `--hold` blocks SIGTERM and SIGINT in every thread of the bench (it waits for them with
/// `sigwait`), and a blocked mask survives `exec`: the proxies get them unblocked again, so
/// that stopping one is a SIGTERM and its drain, not the SIGKILL after 5 s.
fn unblock_termination(cmd: &mut std::process::Command) {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
    use std::os::unix::process::CommandExt;
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // SAFETY: between fork and exec only sigprocmask runs, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None).map_err(std::io::Error::from)
        });
    }
}

/// Which ztunnel a mesh phase runs.
pub enum Flavor {
    /// This project's ztunnel, certificates from the test CA in `ca_dir`.
    Ours { binary: PathBuf, ca_dir: PathBuf },
    /// Istio's ztunnel (built with `--features testing`), same config file and capture
    /// rules; certificates from its built-in test CA (`FAKE_CA`), sockets marked 0x539
    /// like ours so the capture rules let its own traffic through.
    Istio { binary: PathBuf },
    /// `bench-floor-relay`: two minimal plaintext relays in place of the ztunnels, the
    /// floor of any two-proxy data path on the machine.
    Floor { binary: PathBuf },
}

impl Flavor {
    pub fn tag(&self) -> &'static str {
        match self {
            Flavor::Ours { .. } => "ours",
            Flavor::Istio { .. } => "istio",
            Flavor::Floor { .. } => "floor",
        }
    }

    pub fn binary(&self) -> &Path {
        match self {
            Flavor::Ours { binary, .. } | Flavor::Istio { binary } | Flavor::Floor { binary } => {
                binary
            }
        }
    }

    fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        match self {
            Flavor::Ours { ca_dir, .. } => vec![
                ("CA_ROOT_CERT", ca_dir.join("ec-root.pem").into()),
                ("CA_ROOT_KEY", ca_dir.join("ec-root.key").into()),
            ],
            Flavor::Istio { .. } => e2e::istio_ztunnel::FAKE_CA_ENV
                .iter()
                .map(|(k, v)| (*k, (*v).into()))
                .collect(),
            Flavor::Floor { .. } => Vec::new(),
        }
    }
}
