//! Looking at a running [`SimCluster`]: kubectl, container logs, the
//! components' HTTP endpoints (from the node netns, as Prometheus or the
//! kubelet would reach them), captures of pod-to-pod traffic, in-pod rules,
//! and the test hooks that kill and restart components.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{HarnessError, SYSTEM_NAMESPACE, SimCluster, ZTUNNEL, component_pod_name};
use crate::netsim::{Capture, NamedNetns, output_with_timeout};

/// How long one kubectl call may take before it counts as hung. Generous: on the host a
/// call takes well under a second, but in the emulated GENEVE test VM a Go binary's
/// start-up alone takes seconds, and a busy VM once pushed a `kubectl label` past 30 s.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(180);

/// tcpdump filter for data-plane traffic between pods on the underlay
/// (control-plane traffic to the API and the CA's gRPC port excluded).
pub const POD_TRAFFIC_FILTER: &str =
    "tcp and src net 10.244.0.0/16 and dst net 10.244.0.0/16 and not port 15012";

/// `GET path` over HTTP/1.1 to `addr` (blocking; run it inside a netns).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((code, body))
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl NamedNetns {
    /// Lines of iptables rules mentioning `ISTIO` in this netns (nft and legacy, IPv4 and
    /// IPv6), each prefixed with the tool, and the native nftables tables of in-pod mode
    /// (`nft: table inet istio-ambient-…`).
    pub fn istio_rules(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for save in [
            "iptables-nft-save",
            "iptables-legacy-save",
            "ip6tables-nft-save",
            "ip6tables-legacy-save",
        ] {
            if let Ok(out) = self.output(save, Vec::<&str>::new(), Duration::from_secs(10)) {
                lines.extend(
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.contains("ISTIO") && !l.starts_with('#'))
                        .map(|l| format!("{save}: {l}")),
                );
            }
        }
        if let Ok(out) = self.output("nft", ["list", "tables"], Duration::from_secs(10)) {
            lines.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("istio-ambient"))
                    .map(|l| format!("nft: {l}")),
            );
        }
        lines
    }
}

impl SimCluster {
    /// Runs real `kubectl` against the API double; stdout, or an error with
    /// stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, HarnessError> {
        self.kubectl_with_input(args, None)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn kubectl_apply(&self, yaml: &str) -> Result<String, HarnessError> {
        self.kubectl_with_input(&["apply", "-f", "-"], Some(yaml))
    }

    fn kubectl_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, HarnessError> {
        let fail = |reason: String| HarnessError::Kubectl {
            args: args.join(" "),
            reason,
        };
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(self.kubeconfig()).args(args);
        let out = match input {
            None => output_with_timeout(cmd, KUBECTL_TIMEOUT).map_err(|e| fail(e.to_string()))?,
            Some(text) => {
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
                child
                    .stdin
                    .take()
                    .expect("piped")
                    .write_all(text.as_bytes())
                    .map_err(|e| fail(e.to_string()))?;
                child.wait_with_output().map_err(|e| fail(e.to_string()))?
            }
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(fail(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Path of the log of `container` of pod `namespace/name`.
    pub fn log_path(&self, namespace: &str, name: &str, container: &str) -> Option<PathBuf> {
        let (_, info) = self.pod_info(namespace, name)?;
        info.containers.get(container).map(|c| c.log.clone())
    }

    /// The log of the pod's first container (empty when unknown).
    pub fn pod_log(&self, namespace: &str, name: &str) -> String {
        self.pod_info(namespace, name)
            .and_then(|(_, p)| p.containers.values().next().map(|c| c.log.clone()))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The log of a chart component (`ztunnel`, `node-agent`) on `node`.
    pub fn component_log(&self, workload: &str, node: &str) -> String {
        self.pod_log(SYSTEM_NAMESPACE, &component_pod_name(workload, node))
    }

    /// Where a component's container log is.
    pub fn component_log_path(&self, workload: &str, node: &str) -> Option<PathBuf> {
        let pod = component_pod_name(workload, node);
        let (_, info) = self.pod_info(SYSTEM_NAMESPACE, &pod)?;
        info.containers.values().next().map(|c| c.log.clone())
    }

    /// The pod state of every kubelet and the tail of each component's log,
    /// for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::from("--- simulated cluster state ---\n");
        for k in self.kubelets() {
            for p in k.pods() {
                s.push_str(&format!(
                    "{} {}/{} phase={:?} ready={} ip={:?} sandbox_failures={} last_error={:?}\n",
                    k.node_name(),
                    p.namespace,
                    p.name,
                    p.phase,
                    p.ready,
                    p.ip,
                    p.sandbox_failures,
                    p.last_error
                ));
                if p.namespace != SYSTEM_NAMESPACE && !p.cni_log.is_empty() {
                    s.push_str(&format!(
                        "    CNI ADD log: {}\n",
                        tail(&p.cni_log, 3).trim_end()
                    ));
                }
            }
        }
        for k in self.kubelets() {
            for p in k.pods().iter().filter(|p| p.namespace == SYSTEM_NAMESPACE) {
                for (c, info) in &p.containers {
                    let text = std::fs::read_to_string(&info.log).unwrap_or_default();
                    s.push_str(&format!(
                        "--- {}/{} container {c} (restarts {}) log tail ---\n{}\n",
                        p.namespace,
                        p.name,
                        info.restarts,
                        tail(&text, 25)
                    ));
                }
            }
        }
        s
    }

    /// HTTP GET from `node`'s netns (as the kubelet or Prometheus would).
    pub fn http_from_node(
        &self,
        node: &str,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String), HarnessError> {
        let n = self
            .net()
            .node_named(node)
            .ok_or_else(|| HarnessError::Pod {
                pod: node.into(),
                reason: "no such node".into(),
            })?;
        let path = path.to_string();
        let fail = |e: String| HarnessError::Pod {
            pod: format!("{node} -> {addr}"),
            reason: e,
        };
        n.netns()
            .run(move || http_get(addr, &path, Duration::from_secs(3)))
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))
    }

    /// The IP of a component's pod on `node`.
    pub fn component_ip(&self, workload: &str, node: &str) -> Result<IpAddr, HarnessError> {
        self.pod_ip(SYSTEM_NAMESPACE, &component_pod_name(workload, node))
    }

    /// ztunnel's `/metrics` (port 15020) on `node`.
    pub fn ztunnel_metrics(&self, node: &str) -> Result<String, HarnessError> {
        let ip = self.component_ip(ZTUNNEL, node)?;
        let (code, body) = self.http_from_node(node, SocketAddr::new(ip, 15020), "/metrics")?;
        if code != 200 {
            return Err(HarnessError::Pod {
                pod: component_pod_name(ZTUNNEL, node),
                reason: format!("/metrics answered {code}"),
            });
        }
        Ok(body)
    }

    /// Whether ztunnel on `node` answers `/healthz/ready` with 200 now.
    pub fn ztunnel_ready(&self, node: &str) -> bool {
        self.component_ip(ZTUNNEL, node)
            .ok()
            .and_then(|ip| {
                self.http_from_node(node, SocketAddr::new(ip, 15021), "/healthz/ready")
                    .ok()
            })
            .is_some_and(|(c, _)| c == 200)
    }

    /// Starts a capture of pod-to-pod traffic crossing the underlay
    /// ([`POD_TRAFFIC_FILTER`]) into `<scope dir>/<name>.pcap`.
    pub fn capture_pod_traffic(&self, name: &str) -> Result<Capture, HarnessError> {
        let file = self.dir().join(format!("{name}.pcap"));
        self.net()
            .capture_underlay(&file, Some(POD_TRAFFIC_FILTER))
            .map_err(|e| HarnessError::Setup {
                tag: self.prefix().into(),
                what: "capture".into(),
                reason: e.to_string(),
            })
    }

    /// In-pod rules (`ISTIO*` chains) in the pod's netns.
    pub fn pod_rules(&self, namespace: &str, name: &str) -> Result<Vec<String>, HarnessError> {
        Ok(self.pod_netns(namespace, name)?.istio_rules())
    }

    /// Signals a chart component's container on `node` (see
    /// [`crate::kubelet::Kubelet::kill_container`]).
    pub fn kill_component(
        &self,
        workload: &str,
        node: &str,
        signal: Signal,
        hold: bool,
    ) -> Result<(), HarnessError> {
        let pod = component_pod_name(workload, node);
        let container = self.component_container(workload);
        self.kubelet(node)
            .kill_container(SYSTEM_NAMESPACE, &pod, &container, signal, hold)
            .map_err(|e| HarnessError::Pod {
                pod,
                reason: e.to_string(),
            })
    }

    /// Lets the kubelet restart a held component.
    pub fn release_component(&self, workload: &str, node: &str) -> Result<(), HarnessError> {
        let pod = component_pod_name(workload, node);
        let container = self.component_container(workload);
        self.kubelet(node)
            .release_container(SYSTEM_NAMESPACE, &pod, &container)
            .map_err(|e| HarnessError::Pod {
                pod,
                reason: e.to_string(),
            })
    }

    fn component_container(&self, workload: &str) -> String {
        self.golden
            .workload(workload)
            .map(|c| c.container.clone())
            .unwrap_or_else(|| workload.to_string())
    }

    /// Writes `content` to `path` atomically (rename), as config writers do.
    pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension("e2e-tmp");
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, path)
    }
}
