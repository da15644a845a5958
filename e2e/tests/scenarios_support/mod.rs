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

pub mod trust_bundle;

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
    let t0 = Instant::now();
    let mut cfg = SimClusterConfig::new(tag, mode);
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
    /// rules in its netns and its entry in the node's probe ipset
    /// (in-pod); its ipset entry and route on the node (GENEVE).
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

// ---------------------------------------------------------------------------
// The scenarios

/// Client on node1 (sa `client`), server on node2 (sa `server`); returns
/// the server IP.
pub fn client_server(ctx: &Ctx<'_>) -> IpAddr {
    let server = ctx.run("server", 2, "server", &[]);
    ctx.run("client", 1, "client", &[]);
    server
}

/// [`client_server`] in an ambient namespace: both enrolled; returns the
/// server IP.
pub fn enrolled_client_server(ctx: &Ctx<'_>) -> IpAddr {
    let server = client_server(ctx);
    ctx.label_ambient();
    ctx.wait_enrolled("client", 5 * SECOND);
    ctx.wait_enrolled("server", 5 * SECOND);
    server
}

/// Scenario 1: labelling the namespace with kubectl enrols every pod within
/// 1 s; new cross-node connections are TLS on 15008 only; both ztunnels'
/// access logs name both SPIFFE identities. Returns the server IP.
pub fn s1_label_enrols(ctx: &Ctx<'_>) -> IpAddr {
    let server = client_server(ctx);
    ctx.assert_plaintext("client", server, "server", "s1-before-label");
    assert_eq!(ctx.annotation("client"), None);

    ctx.label_ambient();
    let labelled = Instant::now();
    ctx.wait("client and server annotated enabled", SECOND, || {
        (ctx.annotation("client").as_deref() == Some("enabled")
            && ctx.annotation("server").as_deref() == Some("enabled"))
        .then_some(())
    });
    eprintln!(
        "[{}] label -> all pods annotated in {:?}",
        ctx.ns,
        labelled.elapsed()
    );
    for p in ["client", "server"] {
        ctx.wait_enrolled(p, 5 * SECOND);
    }
    ctx.assert_mtls("client", server, "server", "s1-after-label");
    let n1 = ctx.node(1);
    let n2 = ctx.node(2);
    let out = ctx.access_log_line(&n1, "client", "server");
    let inb = ctx.access_log_line(&n2, "client", "server");
    eprintln!(
        "[{}] {n1} ztunnel: {out}\n[{}] {n2} ztunnel: {inb}",
        ctx.ns, ctx.ns
    );
    // Metrics of the destination ztunnel name the source principal.
    let metrics = ctx
        .sim
        .ztunnel_metrics(&n2)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    let want = format!("source_principal=\"{}\"", ctx.spiffe("client"));
    if !metrics
        .lines()
        .any(|l| l.starts_with("istio_tcp_connections_opened_total") && l.contains(&want))
    {
        ctx.fail(&format!(
            "no istio_tcp_connections_opened_total with {want} on {n2}"
        ));
    }
    server
}

/// Scenario 2: removing the label restores plaintext, restarts no pod and
/// leaves no redirection state behind.
pub fn s2_unlabel_restores_plaintext(ctx: &Ctx<'_>) {
    let server = s1_label_enrols(ctx);
    let before: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.process(p))
        .collect();
    let netns: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.sim.pod_info(&ctx.ns, p).unwrap().1.netns)
        .collect();

    ctx.unlabel();
    ctx.wait(
        "annotations removed and no redirection left",
        5 * SECOND,
        || {
            ["client", "server"]
                .iter()
                .all(|p| ctx.annotation(p).is_none() && ctx.traces(p).is_empty())
                .then_some(())
        },
    );
    ctx.assert_plaintext("client", server, "server", "s2-after-unlabel");
    let after: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.process(p))
        .collect();
    let netns_after: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.sim.pod_info(&ctx.ns, p).unwrap().1.netns)
        .collect();
    if before != after || netns != netns_after || after.iter().any(|(_, r)| *r != 0) {
        ctx.fail(&format!(
            "pods restarted: before {before:?} {netns:?}, after {after:?} {netns_after:?}"
        ));
    }
}

/// Scenario 3: a pod labelled `istio.io/dataplane-mode=none` in an ambient
/// namespace (created before and after the label) stays out: never
/// annotated, no redirection, its traffic plaintext; its enrolled
/// neighbour's traffic is mTLS.
pub fn s3_opt_out_pod_stays_out(ctx: &Ctx<'_>) {
    let server = client_server(ctx);
    ctx.run(
        "optout-early",
        1,
        "client",
        &[("istio.io/dataplane-mode", "none")],
    );
    ctx.label_ambient();
    ctx.wait_enrolled("client", 5 * SECOND);
    ctx.wait_enrolled("server", 5 * SECOND);
    ctx.run(
        "optout-late",
        1,
        "client",
        &[("istio.io/dataplane-mode", "none")],
    );
    // Give the agent time to (wrongly) act.
    std::thread::sleep(t(SECOND / 2));
    for p in ["optout-early", "optout-late"] {
        if ctx.annotation(p).is_some() || !ctx.traces(p).is_empty() {
            ctx.fail(&format!(
                "{p} was enrolled: annotation {:?}, state {:?}",
                ctx.annotation(p),
                ctx.traces(p)
            ));
        }
        ctx.assert_plaintext(p, server, "server", &format!("s3-{p}"));
    }
    ctx.assert_mtls("client", server, "server", "s3-enrolled");
}

/// Scenario 4: an AuthorizationPolicy applied with kubectl allows only
/// service account `client-a`: `client-b` is refused, `client-a` works.
pub fn s4_policy_allows_one_account(ctx: &Ctx<'_>) {
    let server = ctx.run("server", 2, "server", &[]);
    ctx.run("client-a", 1, "client-a", &[]);
    ctx.run("client-b", 1, "client-b", &[]);
    ctx.label_ambient();
    for p in ["server", "client-a", "client-b"] {
        ctx.wait_enrolled(p, 5 * SECOND);
    }
    ctx.expect_reply("client-b", server, "server", "s4-before-policy");

    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-client-a\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/{ns}/sa/client-a\"]\n",
        ns = ctx.ns
    );
    let out = ctx
        .sim
        .kubectl_apply(&policy)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    eprintln!("[{}] {}", ctx.ns, out.trim());
    let applied = Instant::now();
    ctx.wait("client-b refused", 10 * SECOND, || {
        ctx.request("client-b", server, "s4-probe")
            .is_err()
            .then_some(())
    });
    eprintln!(
        "[{}] policy enforced {:?} after kubectl apply",
        ctx.ns,
        applied.elapsed()
    );
    for i in 0..3 {
        ctx.assert_mtls("client-a", server, "server", &format!("s4-allowed-{i}"));
        if let Ok(r) = ctx.request("client-b", server, &format!("s4-denied-{i}")) {
            ctx.fail(&format!("client-b got through the policy: {r:?}"));
        }
    }
    // The denial is visible at the destination.
    let n2 = ctx.node(2);
    ctx.wait("denial in the server-side access log", 5 * SECOND, || {
        ctx.sim
            .component_log(ZTUNNEL, &n2)
            .lines()
            .any(|l| l.contains(&ctx.spiffe("client-b")) && l.contains("error"))
            .then_some(())
    });
    ctx.sim
        .kubectl(&[
            "delete",
            "authorizationpolicy",
            "only-client-a",
            "-n",
            &ctx.ns,
        ])
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    ctx.wait("client-b allowed again", 10 * SECOND, || {
        ctx.request("client-b", server, "s4-after-delete").ok()
    });
}

/// Scenario 5: the node agent killed while traffic flows: the established
/// connection keeps working; a pod created while the agent is down is not
/// started unredirected (its sandbox fails closed) and is enrolled once
/// the agent is back.
pub fn s5_agent_restart(ctx: &Ctx<'_>) {
    let server = enrolled_client_server(ctx);
    ctx.wait_mtls("client", server, "server", "s5-before-stream");
    eprintln!(
        "[{}] client -> server is HBONE; starting the stream",
        ctx.ns
    );
    let stream = Stream::start(ctx, "client", server, Duration::from_millis(50));
    let n1 = ctx.node(1);
    ctx.sim
        .kill_component(NODE_AGENT, &n1, Signal::SIGKILL, true)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    let killed_at = Instant::now();
    ctx.wait("node agent down", 5 * SECOND, || {
        let p = ctx
            .sim
            .pod_info(
                e2e::simcluster::SYSTEM_NAMESPACE,
                &e2e::simcluster::component_pod_name(NODE_AGENT, &n1),
            )?
            .1;
        (!p.containers.values().next()?.running).then_some(())
    });
    // A pod created while the agent is down.
    let late = WorkloadSpec::server(&ctx.ns, "late", &n1, "client");
    ctx.sim
        .create_workload(&late)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    let started_unredirected = |p: &e2e::kubelet::PodInfo| {
        if p.containers.values().any(|c| c.pid.is_some()) {
            ctx.fail(&format!(
                "late pod started while the agent was down; CNI ADD said:\n{}\n{p:?}",
                p.cni_log
            ));
        }
    };
    ctx.wait("late pod's sandbox refused", 10 * SECOND, || {
        let (_, p) = ctx.sim.pod_info(&ctx.ns, "late")?;
        started_unredirected(&p);
        (p.sandbox_failures >= 2).then_some(())
    });
    let refused = ctx.sim.pod_info(&ctx.ns, "late").unwrap().1;
    started_unredirected(&refused);
    eprintln!(
        "[{}] late pod refused {} times; last: {}",
        ctx.ns,
        refused.sandbox_failures,
        refused.last_error.as_deref().unwrap_or("-")
    );
    // The stream must keep making progress with the agent down. Progress is
    // awaited (not sampled over a fixed window) so a loaded CI machine that
    // delays one request does not read as a stall; an error always fails.
    let during = stream.ok();
    ctx.wait(
        "the established connection progressing while the agent is down",
        5 * SECOND,
        || {
            if stream.failed.load(Ordering::Relaxed) > 0 {
                ctx.fail("the established connection failed while the agent was down");
            }
            (stream.ok() > during).then_some(())
        },
    );
    ctx.sim
        .release_component(NODE_AGENT, &n1)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    ctx.wait_pod_ready(
        e2e::simcluster::SYSTEM_NAMESPACE,
        &e2e::simcluster::component_pod_name(NODE_AGENT, &n1),
        30 * SECOND,
    );
    eprintln!("[{}] agent down for {:?}", ctx.ns, killed_at.elapsed());
    ctx.wait_pod_ready(&ctx.ns, "late", 30 * SECOND);
    ctx.wait_enrolled("late", 5 * SECOND);
    if let Some((_, p)) = ctx.sim.pod_info(&ctx.ns, "late") {
        eprintln!("[{}] late pod's CNI ADD: {}", ctx.ns, p.cni_log.trim_end());
    }
    ctx.assert_mtls("late", server, "server", "s5-late-pod");
    let before_end = stream.ok();
    ctx.wait(
        "the established connection progressing after the restart",
        5 * SECOND,
        || (stream.ok() > before_end || stream.failed.load(Ordering::Relaxed) > 0).then_some(()),
    );
    let (ok, errors) = stream.finish();
    if !errors.is_empty() || ok <= before_end {
        ctx.fail(&format!(
            "established connection broke across the agent restart: {ok} ok, errors {errors:?}"
        ));
    }
    eprintln!(
        "[{}] established connection: {ok} requests, no error",
        ctx.ns
    );
}

/// Scenario 6: ztunnel killed (on the client's node, then the server's)
/// and restarted by the kubelet: new connections work within 1 s of its
/// readiness, and nothing leaks in plaintext meanwhile.
pub fn s6_ztunnel_restart(ctx: &Ctx<'_>) {
    let server = enrolled_client_server(ctx);
    ctx.expect_reply("client", server, "server", "s6-before");
    for node in [ctx.node(1), ctx.node(2)] {
        let pod = e2e::simcluster::component_pod_name(ZTUNNEL, &node);
        let restarts = |ctx: &Ctx<'_>| {
            ctx.sim
                .pod_info(e2e::simcluster::SYSTEM_NAMESPACE, &pod)
                .and_then(|(_, p)| {
                    p.containers
                        .values()
                        .next()
                        .map(|c| (c.restarts, c.running))
                })
        };
        let (r0, _) = restarts(ctx).unwrap();
        let marker = format!("s6-{node}");
        let ((ready_to_ok, attempts), cap) = ctx.captured(&format!("zt-restart-{node}"), || {
            ctx.sim
                .kill_component(ZTUNNEL, &node, Signal::SIGKILL, false)
                .unwrap_or_else(|e| ctx.fail(&e.to_string()));
            ctx.wait("ztunnel restarted by the kubelet", 10 * SECOND, || {
                restarts(ctx).filter(|(r, run)| *r > r0 && *run).map(|_| ())
            });
            let ready_at = ctx.wait("restarted ztunnel ready", 30 * SECOND, || {
                ctx.sim.ztunnel_ready(&node).then(Instant::now)
            });
            let mut attempts = 0;
            let ok_at = ctx.wait(
                "a new connection through the restarted ztunnel",
                10 * SECOND,
                || {
                    attempts += 1;
                    ctx.request("client", server, &marker)
                        .ok()
                        .map(|_| Instant::now())
                },
            );
            (ok_at.saturating_duration_since(ready_at), attempts)
        });
        eprintln!(
            "[{}] ztunnel on {node} restarted: new connection {ready_to_ok:?} after readiness ({attempts} attempts)",
            ctx.ns
        );
        if ready_to_ok > t(SECOND) {
            ctx.fail(&format!(
                "new connections took {ready_to_ok:?} after ztunnel {node} was ready"
            ));
        }
        if cap.contains(marker.as_bytes()) {
            ctx.fail(&format!(
                "plaintext {marker:?} on the underlay while ztunnel {node} restarted"
            ));
        }
        ctx.assert_mtls("client", server, "server", &format!("s6-after-{node}"));
    }
}

/// Scenario 7: the primary CNI config rewritten without our entry (as a
/// primary CNI does at reboot): the agent repairs it, and pods created
/// right after the rewrite and right after the repair are enrolled.
pub fn s7_cni_config_rewrite(ctx: &Ctx<'_>) {
    let server = ctx.run("server", 2, "server", &[]);
    ctx.label_ambient();
    ctx.wait_enrolled("server", 5 * SECOND);
    let n1 = ctx.node(1);
    let path = ctx.sim.primary_cni_config_path(&n1);
    let chained = || {
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| {
                v["plugins"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["type"] == "istio-cni"))
            })
    };
    if !chained() {
        ctx.fail(&format!(
            "{} is not chained before the test",
            path.display()
        ));
    }
    let node = ctx.sim.net().node_named(&n1).unwrap();
    let (_, original) = ctx.sim.primary_cni_config(node);
    SimCluster::write_atomically(&path, &serde_json::to_vec_pretty(&original).unwrap())
        .unwrap_or_else(|e| ctx.fail(&format!("rewrite {}: {e}", path.display())));
    let rewritten = Instant::now();
    // Right after the rewrite, before looking at the repair.
    ctx.sim
        .create_workload(&WorkloadSpec::server(
            &ctx.ns,
            "after-rewrite",
            &n1,
            "client",
        ))
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    ctx.wait("config repaired", 10 * SECOND, || chained().then_some(()));
    eprintln!(
        "[{}] primary CNI config repaired {:?} after the rewrite",
        ctx.ns,
        rewritten.elapsed()
    );
    ctx.sim
        .create_workload(&WorkloadSpec::server(
            &ctx.ns,
            "after-repair",
            &n1,
            "client",
        ))
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    for p in ["after-rewrite", "after-repair"] {
        ctx.wait_pod_ready(&ctx.ns, p, 30 * SECOND);
        ctx.wait_enrolled(p, 5 * SECOND);
        ctx.assert_mtls(p, server, "server", &format!("s7-{p}"));
    }
}
