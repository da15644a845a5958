//! The seven node-in-a-box scenarios of issue 8, written once against a
//! running [`SimCluster`] and used by `scenarios.rs` (in-pod mode, one
//! cluster per scenario) and `scenarios_geneve.rs` (GENEVE mode, one
//! cluster for all, in the VM).
//!
//! Each scenario works in its own Kubernetes namespace, leaves the shared
//! components running and panics with the cluster's diagnostics (pod
//! states, component log tails) when a check fails.
//!
//! Topology: client pods on node1, the server on node2, so every checked
//! connection crosses the underlay, where the captures are taken
//! (pod-to-pod traffic only; see `POD_TRAFFIC_FILTER`).

#![allow(dead_code)]

mod cases;
pub mod istiod_xds;
pub mod trust_bundle;

pub use cases::*;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::netsim::CaptureReport;
use e2e::simcluster::{
    NODE_AGENT, REDIRECTION_ANNOTATION, RedirectMode, SimCluster, SimClusterConfig, WorkloadSpec,
    ZTUNNEL,
};
use e2e::workloads::{self, Conn};
use nix::sys::signal::Signal;
use node_agent::redirect::inpod::rules_nft;

pub const SECOND: Duration = Duration::from_secs(1);
pub const PORT: u16 = workloads::DEFAULT_PORT;
const POD_TIMEOUT: Duration = Duration::from_secs(30);

static TIME_SCALE: AtomicU32 = AtomicU32::new(1);

/// Multiplies every time limit of the scenarios (waits, deadlines, the
/// "within 1 s" checks): for slow machines, e.g. the emulated VM of the
/// GENEVE batch. `E2E_TIME_SCALE` sets it too.
pub fn set_time_scale(n: u32) {
    TIME_SCALE.store(n.max(1), Ordering::Relaxed);
}

pub fn time_scale() -> u32 {
    std::env::var("E2E_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or_else(|| TIME_SCALE.load(Ordering::Relaxed))
        .max(1)
}

/// `d` times [`time_scale`].
pub fn t(d: Duration) -> Duration {
    d * time_scale()
}

/// Prints why and returns from the test when the machine cannot run it.
#[macro_export]
macro_rules! require_harness {
    () => {
        if let Some(why) = e2e::simcluster::missing_prerequisite() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// Starts a cluster for `tag` in `mode`, panicking with the reason.
pub fn start(tag: &str, mode: RedirectMode) -> SimCluster {
    start_with(SimClusterConfig::new(tag, mode))
}

/// [`start`] with a configuration of the caller's.
pub fn start_with(mut cfg: SimClusterConfig) -> SimCluster {
    let (tag, mode) = (cfg.tag.clone(), cfg.mode);
    let t0 = Instant::now();
    cfg.ready_timeout = t(cfg.ready_timeout);
    let sim = SimCluster::start(cfg).unwrap_or_else(|e| panic!("cluster start failed: {e}"));
    eprintln!(
        "[{tag}] {} cluster ready in {:?}",
        mode.as_str(),
        t0.elapsed()
    );
    sim
}

/// A scenario's view: the cluster and its namespace.
pub struct Ctx<'a> {
    pub sim: &'a SimCluster,
    pub ns: String,
}

impl<'a> Ctx<'a> {
    /// Creates the namespace (unlabelled).
    pub fn new(sim: &'a SimCluster, ns: &str) -> Self {
        sim.create_namespace(ns, &[])
            .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
        Self { sim, ns: ns.into() }
    }

    pub fn fail(&self, msg: &str) -> ! {
        panic!("[{}] {msg}\n{}", self.ns, self.sim.diagnostics())
    }

    pub fn node(&self, i: usize) -> String {
        self.sim.node(i).name().to_string()
    }

    /// Polls `f` every 10 ms for up to `max`.
    /// `max` is scaled by [`time_scale`].
    pub fn wait<T>(&self, what: &str, max: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let max = t(max);
        let start = Instant::now();
        let deadline = start + max;
        let mut report = start + REPORT_EVERY;
        loop {
            if let Some(v) = f() {
                return v;
            }
            let now = Instant::now();
            if now >= deadline {
                self.fail(&format!("timed out after {max:?} waiting for {what}"));
            }
            if now >= report {
                // Long waits (scaled up in the VM) say what they wait for.
                eprintln!(
                    "[{}] still waiting for {what} after {:?}",
                    self.ns,
                    now - start
                );
                report = now + REPORT_EVERY;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An echo workload (`e2e-workload echo`) on node `node`, service
    /// account `sa`; waits until Ready; returns its IP.
    pub fn run(&self, name: &str, node: usize, sa: &str, labels: &[(&str, &str)]) -> IpAddr {
        let mut spec = WorkloadSpec::server(&self.ns, name, &self.node(node), sa);
        for (k, v) in labels {
            spec = spec.label(k, v);
        }
        let info = self
            .sim
            .run_workload(&spec, t(POD_TIMEOUT))
            .unwrap_or_else(|e| self.fail(&e.to_string()));
        info.ip
            .unwrap_or_else(|| self.fail(&format!("pod {name} has no IP")))
    }

    /// One request from pod `from` to `to:PORT` (a new connection).
    pub fn request(&self, from: &str, to: IpAddr, msg: &str) -> Result<String, String> {
        let msg = msg.to_string();
        let addr = SocketAddr::new(to, PORT);
        self.sim
            .in_pod(&self.ns, from, move || {
                workloads::exchange(addr, &msg, t(3 * SECOND)).map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())?
    }

    /// Like [`Ctx::request`] but the reply must come from `server`.
    pub fn expect_reply(&self, from: &str, to: IpAddr, server: &str, msg: &str) {
        match self.request(from, to, msg) {
            Ok(r) if r == format!("{server} {msg}") => {}
            Ok(r) => self.fail(&format!("{from} -> {server}: unexpected reply {r:?}")),
            Err(e) => self.fail(&format!("{from} -> {server}: {e}")),
        }
    }

    /// Runs `f` while capturing pod-to-pod traffic on the underlay.
    pub fn captured<T>(&self, label: &str, f: impl FnOnce() -> T) -> (T, CaptureReport) {
        let cap = self
            .sim
            .capture_pod_traffic(&format!("{}-{label}", self.ns))
            .unwrap_or_else(|e| self.fail(&e.to_string()));
        let out = f();
        let report = cap.stop().unwrap_or_else(|e| self.fail(&e.to_string()));
        (out, report)
    }

    /// A request from `from` to the server, captured: asserts the payload
    /// was in plaintext on the wire to the app port.
    pub fn assert_plaintext(&self, from: &str, to: IpAddr, server: &str, marker: &str) {
        let (_, cap) = self.captured(&format!("plain-{from}"), || {
            self.expect_reply(from, to, server, marker)
        });
        if !cap.contains(marker.as_bytes()) || !cap.tcp_syn_dst_ports().contains(&PORT) {
            self.fail(&format!(
                "{from} -> {server}: expected plaintext to port {PORT}; SYN ports {:?}, marker seen {}",
                cap.tcp_syn_dst_ports(),
                cap.contains(marker.as_bytes())
            ));
        }
    }

    /// A request from `from` to the server, captured: asserts only TLS to
    /// 15008 crossed the underlay: no plaintext marker, every segment with
    /// payload to or from port 15008 (the request may ride an HTTP/2
    /// connection ztunnel pooled earlier, so no SYN need be seen), every
    /// connection opened to 15008.
    pub fn assert_mtls(&self, from: &str, to: IpAddr, server: &str, marker: &str) {
        if let Some(e) = self.mtls_violation(from, to, server, marker) {
            self.fail(&e);
        }
    }

    /// Waits until a request from `from` to the server crosses the underlay
    /// as HBONE only: the source's ztunnel learns that the destination is
    /// in the mesh from discovery, a moment after the destination's
    /// annotation is visible in the API; a connection opened before that
    /// is (correctly) passed through in plaintext.
    pub fn wait_mtls(&self, from: &str, to: IpAddr, server: &str, marker: &str) {
        let mut last = String::new();
        let deadline = Instant::now() + t(5 * SECOND);
        while let Some(e) = self.mtls_violation(from, to, server, marker) {
            if Instant::now() >= deadline {
                self.fail(&format!("timed out waiting for HBONE: {last}"));
            }
            last = e;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Why a captured request from `from` to the server was not TLS to
    /// 15008 only, if it was not.
    fn mtls_violation(&self, from: &str, to: IpAddr, server: &str, marker: &str) -> Option<String> {
        let (_, cap) = self.captured(&format!("mtls-{from}"), || {
            self.expect_reply(from, to, server, marker)
        });
        if cap.contains(marker.as_bytes()) {
            return Some(format!(
                "{from} -> {server}: plaintext {marker:?} seen on the underlay"
            ));
        }
        let syn = cap.tcp_syn_dst_ports();
        let data: Vec<_> = cap
            .packets
            .iter()
            .filter(|p| p.is_tcp() && !p.payload.is_empty())
            .collect();
        let stray: Vec<String> = data
            .iter()
            .filter(|p| p.src_port != 15008 && p.dst_port != 15008)
            .map(|p| format!("{}:{} -> {}:{}", p.src, p.src_port, p.dst, p.dst_port))
            .collect();
        if syn.iter().any(|p| *p != 15008) || data.is_empty() || !stray.is_empty() {
            return Some(format!(
                "{from} -> {server}: expected TLS to 15008 only; SYN ports {syn:?}, {} data segments, not HBONE: {stray:?}",
                data.len()
            ));
        }
        None
    }

    /// The simulated kubelet reports `namespace/name` Ready (announced, so
    /// a long wait in the VM shows what it is waiting for).
    pub fn wait_pod_ready(&self, namespace: &str, name: &str, max: Duration) {
        eprintln!("[{}] waiting for {namespace}/{name} to be Ready", self.ns);
        self.sim
            .wait_ready(namespace, name, t(max))
            .unwrap_or_else(|e| self.fail(&e.to_string()));
    }

    pub fn annotation(&self, pod: &str) -> Option<String> {
        self.sim.annotation(&self.ns, pod, REDIRECTION_ANNOTATION)
    }

    /// What redirection state exists for `pod` (empty = none): in-pod
    /// rules (iptables or nft) in its netns and its entry in the node's probe
    /// ipset or nft set (in-pod); its ipset entry and route on the node
    /// (GENEVE).
    pub fn traces(&self, pod: &str) -> Vec<String> {
        let (node, info) = self
            .sim
            .pod_info(&self.ns, pod)
            .unwrap_or_else(|| self.fail(&format!("pod {pod} not running")));
        let ip = info.ip.map(|i| i.to_string()).unwrap_or_default();
        let node_ns = self.sim.net().node_named(&node).unwrap().netns();
        let mut out = Vec::new();
        if self.sim.mode() == RedirectMode::Inpod {
            out.extend(self.sim.pod_rules(&self.ns, pod).unwrap_or_default());
        }
        let sets = node_ns
            .exec("ipset", ["save"], t(5 * SECOND))
            .unwrap_or_default();
        out.extend(
            sets.lines()
                .filter(|l| {
                    l.starts_with("add ") && l.split_whitespace().nth(2) == Some(ip.as_str())
                })
                .map(|l| format!("{node} ipset: {l}")),
        );
        // Native nftables: the probe set elements of the node's table, read
        // with the agent's own parser of `nft -j` output.
        let nft = node_ns
            .exec(
                "nft",
                ["-j", "list", "table", "inet", rules_nft::HOST_TABLE],
                t(5 * SECOND),
            )
            .unwrap_or_default();
        let sets = rules_nft::parse_host_sets(&nft).unwrap_or_default();
        let node = node.as_str();
        out.extend(sets.iter().flat_map(|set| {
            set.members
                .iter()
                .filter(|(member, _)| member.to_string() == ip)
                .map(move |(member, uid)| {
                    format!(
                        "{node} nft set element: {member} comment {:?} in {}",
                        uid.as_deref().unwrap_or(""),
                        set.name
                    )
                })
        }));
        if self.sim.mode() == RedirectMode::Geneve {
            let routes = node_ns
                .exec("ip", ["-4", "route", "show", "table", "all"], t(5 * SECOND))
                .unwrap_or_default();
            out.extend(
                routes
                    .lines()
                    .filter(|l| {
                        l.split_whitespace().next() == Some(ip.as_str()) && l.contains("istio")
                    })
                    .map(|l| format!("{node} route: {l}")),
            );
        }
        out
    }

    /// Waits until `pod` carries the enabled annotation and its
    /// redirection state exists.
    pub fn wait_enrolled(&self, pod: &str, max: Duration) {
        self.wait(&format!("{pod} enrolled"), max, || {
            (self.annotation(pod).as_deref() == Some("enabled") && !self.traces(pod).is_empty())
                .then_some(())
        });
    }

    pub fn label_ambient(&self) {
        self.sim
            .kubectl(&[
                "label",
                "namespace",
                &self.ns,
                "istio.io/dataplane-mode=ambient",
            ])
            .unwrap_or_else(|e| self.fail(&e.to_string()));
    }

    pub fn unlabel(&self) {
        self.sim
            .kubectl(&["label", "namespace", &self.ns, "istio.io/dataplane-mode-"])
            .unwrap_or_else(|e| self.fail(&e.to_string()));
    }

    /// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn spiffe(&self, sa: &str) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{sa}", self.ns)
    }

    /// Waits for an access-log line of ztunnel on `node` naming both
    /// identities; returns it.
    pub fn access_log_line(&self, node: &str, src_sa: &str, dst_sa: &str) -> String {
        let src = format!("src.identity={}", self.spiffe(src_sa));
        let dst = format!("dst.identity={}", self.spiffe(dst_sa));
        self.wait(
            &format!("ztunnel {node} access log {src} {dst}"),
            5 * SECOND,
            || {
                self.sim
                    .component_log(ZTUNNEL, node)
                    .lines()
                    .find(|l| l.contains(&src) && l.contains(&dst))
                    .map(str::to_string)
            },
        )
    }

    /// (pid, restarts) of a workload's container.
    pub fn process(&self, pod: &str) -> (Option<u32>, u32) {
        let (_, info) = self.sim.pod_info(&self.ns, pod).unwrap();
        let c = info.containers.values().next().unwrap();
        (c.pid, c.restarts)
    }
}

/// How often a long wait reports that it is still waiting.
const REPORT_EVERY: Duration = Duration::from_secs(20);

/// Requests over one long-lived connection from a background thread,
/// every `interval`, counting successes and failures.
pub struct Stream {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Stream {
    /// Opens the connection inside pod `from` (the socket stays in its
    /// netns) and starts the requests.
    pub fn start(ctx: &Ctx<'_>, from: &str, to: IpAddr, interval: Duration) -> Self {
        let addr = SocketAddr::new(to, PORT);
        let mut conn: Conn = ctx
            .sim
            .in_pod(&ctx.ns, from, move || Conn::open(addr, t(3 * SECOND)))
            .unwrap_or_else(|e| ctx.fail(&e.to_string()))
            .unwrap_or_else(|e| ctx.fail(&format!("long-lived connection: {e}")));
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                match conn.request(&format!("stream {i}")) {
                    Ok(r) if r.ends_with(&format!("stream {i}")) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("#{i}: wrong reply {r:?}"));
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("#{i}: {e}"));
                        break;
                    }
                }
                std::thread::sleep(interval);
            }
            errors
        });
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops; returns (successes, error descriptions).
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.thread.take().unwrap().join().unwrap_or_default();
        (self.ok(), errors)
    }
}
