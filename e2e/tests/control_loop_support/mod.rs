//! Shared set-up of the control-loop end-to-end tests: one simulated node
//! (e2e netsim), the Kubernetes API double reachable from it, the real
//! `node-agent` binary running in the node's netns with the chart's
//! environment, a ztunnel-side ZDS client (ztunnel's own `InpodClient`
//! with a recording proxy manager) and a tiny "kubelet": pods created in
//! the API, given a netns, wired by the real CNI chain (`bridge` +
//! `host-local` + our `istio-cni`, from the conflist the agent chained) and
//! reported Running with their IP.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::apiserver::{ApiServer, ApiServerHandle, write_kubeconfig_for};
use e2e::netsim::{Cluster, NamedNetns, Node, Process};
use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;
use serde_json::{Value, json};
use ztunnel::inpod::{
    InpodClient, InpodClientConfig, InpodNetns, StartError, WorkloadProxyManager,
};

pub const AGENT_NS: &str = "istio-system";
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

pub fn skip_reason() -> Option<String> {
    if !e2e::netsim::can_create_netns() {
        return Some("needs root to create network namespaces".into());
    }
    for p in ["bridge", "host-local"] {
        if !Path::new(REFERENCE_PLUGINS).join(p).exists() {
            return Some(format!(
                "CNI reference plugin {REFERENCE_PLUGINS}/{p} missing (package containernetworking-plugins)"
            ));
        }
    }
    for b in ["node-agent", "istio-cni"] {
        if let Err(e) = e2e::binaries::try_bin_path(b) {
            return Some(e);
        }
    }
    None
}

#[macro_export]
macro_rules! require_env {
    () => {
        if let Some(why) = control_loop_support::skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// How much longer than on the host waits may take: `E2E_TIME_SCALE`, else
/// x20 inside scripts/vm-tests.sh's VM (`GENEVE_TESTS_REQUIRED=1`: an
/// emulated machine, tens of times slower), else 1. Functional checks
/// stay the same; only time limits stretch.
pub fn time_scale() -> u32 {
    if let Some(n) = std::env::var("E2E_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        return n.max(1);
    }
    if std::env::var("GENEVE_TESTS_REQUIRED").as_deref() == Ok("1") {
        20
    } else {
        1
    }
}

/// Polls `f` every 10 ms until it returns `Some`, or panics after `max`
/// (times [`time_scale`]) with `what` and `context()`.
pub fn wait_for<T>(
    what: &str,
    max: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let max = max * time_scale();
    let deadline = Instant::now() + max;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {max:?} waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// ztunnel side of ZDS

/// Records what ztunnel was asked to run.
#[derive(Default)]
pub struct RecordingProxies {
    /// uid → netns inode of the running proxy.
    pub running: Mutex<BTreeMap<String, u64>>,
    /// Every start, in order.
    pub starts: Mutex<Vec<String>>,
}

impl WorkloadProxyManager for RecordingProxies {
    fn start<'a>(
        &'a self,
        uid: &'a str,
        _info: &'a WorkloadInfo,
        netns: Arc<InpodNetns>,
    ) -> BoxFuture<'a, Result<(), StartError>> {
        Box::pin(async move {
            self.running
                .lock()
                .unwrap()
                .insert(uid.to_string(), netns.inode());
            self.starts.lock().unwrap().push(uid.to_string());
            Ok(())
        })
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.running.lock().unwrap().remove(uid);
        })
    }
}

/// ztunnel's real ZDS client on its own runtime thread.
pub struct Ztunnel {
    pub proxies: Arc<RecordingProxies>,
    client: Arc<InpodClient<RecordingProxies>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ztunnel {
    pub fn start(uds: &Path) -> Self {
        let proxies = Arc::new(RecordingProxies::default());
        let client = Arc::new(InpodClient::new(
            InpodClientConfig {
                uds: uds.to_path_buf(),
                backoff_initial: Duration::from_millis(10),
                backoff_max: Duration::from_millis(100),
                retry_interval: Duration::from_secs(1),
            },
            proxies.clone(),
        ));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = client.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(c.run(async {
                let _ = rx.await;
            }));
        });
        Self {
            proxies,
            client,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn running(&self) -> Vec<String> {
        self.proxies
            .running
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    pub fn starts(&self) -> usize {
        self.proxies.starts.lock().unwrap().len()
    }

    /// A snapshot completed on the current connection (ztunnel readiness).
    pub fn ready(&self) -> bool {
        *self.client.readiness().borrow()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The node, the API, the agent

pub struct Env {
    // Drop order: agent, ztunnel, then the cluster (namespaces).
    pub agent: Option<Process>,
    pub ztunnel: Option<Ztunnel>,
    pub api: ApiServerHandle,
    /// kubeconfig for processes in the root netns (kubectl).
    pub kubectl_config: PathBuf,
    /// kubeconfig for processes in the node (agent, plugin).
    pub node_config: PathBuf,
    pub dir: PathBuf,
    pub agent_log: PathBuf,
    /// File name of the primary CNI config in the conf dir.
    pub primary: &'static str,
    pub cluster: Cluster,
    /// Variables added to (or overriding) [`Env::agent_env`].
    pub extra_agent_env: Vec<(String, String)>,
}

pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub netns: NamedNetns,
    pub ip: Ipv4Addr,
    pub container: String,
}

impl Env {
    /// One node (`node1`), the API with namespace `istio-system`, the
    /// agent's DaemonSet object, the node's primary CNI config; nothing
    /// running yet.
    pub fn new(tag: &str) -> Self {
        Self::with_primary(tag, false)
    }

    /// Like [`Env::new`]; `ptp` = routed pods (`ptp` + `host-local`, as
    /// kindnet gives), which GENEVE mode needs, instead of the `bridge`.
    pub fn with_primary(tag: &str, ptp: bool) -> Self {
        let cluster = Cluster::new(tag, 1).expect("simulated cluster");
        let dir = cluster.scope().dir().to_path_buf();
        let mut api = ApiServer::default()
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .run()
            .expect("API double");
        let node_addr = api
            .add_listener(cluster.bind_host_tcp(0).expect("bind in underlay"))
            .unwrap();
        let kubectl_config = dir.join("kubeconfig");
        api.write_kubeconfig(&kubectl_config).unwrap();
        let node_config = dir.join("node-kubeconfig");
        write_kubeconfig_for(&node_config, &format!("http://{node_addr}")).unwrap();
        let node = cluster.node(1);
        for d in ["bin", "net.d", "run"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let (primary, conf) = if ptp {
            ("10-ptp.conflist", ptp_conflist(node))
        } else {
            ("10-bridge.conflist", node.cni_conflist("k8s-pod-network"))
        };
        std::fs::write(
            dir.join("net.d").join(primary),
            serde_json::to_vec_pretty(&conf).unwrap(),
        )
        .unwrap();
        api.create(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": AGENT_NS}}),
        )
        .unwrap();
        api.create(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "node-agent", "namespace": AGENT_NS},
            "spec": {"selector": {"matchLabels": {"app": "node-agent"}},
                     "template": {"metadata": {"labels": {"app": "node-agent"}},
                                  "spec": {"containers": [{"name": "node-agent", "image": "x"}]}}}
        }))
        .unwrap();
        let agent_log = dir.join("agent.log");
        Self {
            agent: None,
            ztunnel: None,
            api,
            kubectl_config,
            node_config,
            dir,
            agent_log,
            primary,
            cluster,
            extra_agent_env: Vec::new(),
        }
    }

    pub fn node(&self) -> &Node {
        self.cluster.node(1)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    pub fn uds(&self) -> PathBuf {
        self.run_dir().join("ztunnel.sock")
    }

    /// The chart's environment for the node agent, pointed at this node.
    pub fn agent_env(&self, mode: &str) -> Vec<(String, String)> {
        let v = |k: &str, v: &str| (k.to_string(), v.to_string());
        let p = |k: &str, p: PathBuf| (k.to_string(), p.display().to_string());
        vec![
            v("REDIRECT_MODE", mode),
            v("NODE_NAME", self.node().name()),
            v("POD_NAME", "node-agent-test"),
            v("POD_NAMESPACE", AGENT_NS),
            v("AMBIENT_DNS_CAPTURE", "false"),
            v("AMBIENT_IPV6", "true"),
            v("AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", "true"),
            v("CHAINED_CNI_PLUGIN", "true"),
            v("ISTIO_OWNED_CNI_CONFIG", "false"),
            p("CNI_AGENT_RUN_DIR", self.run_dir()),
            p("CNI_BIN_DIR", self.bin_dir()),
            p("CNI_CONF_DIR", self.conf_dir()),
            p("CNI_PLUGIN_SRC", e2e::bin_path("istio-cni")),
            v("EXCLUDE_NAMESPACES", "kube-system"),
            v("HOST_PROBE_SNAT_IP", "169.254.7.127"),
            v("HOST_PROC_DIR", "/proc"),
            p("ZTUNNEL_UDS", self.uds()),
            v("READY_PORT", "8000"),
            v("METRICS_PORT", "15014"),
            p("KUBECONFIG", self.node_config.clone()),
            v("RUST_LOG", "info,node_agent=debug"),
            // GENEVE: drift is found within a second (the default is a minute).
            v("GENEVE_RECHECK_SECONDS", "1"),
        ]
    }

    /// Starts the agent binary in the node's netns (in-pod mode).
    pub fn start_agent(&mut self) {
        self.start_agent_mode("inpod");
    }

    pub fn start_agent_mode(&mut self, mode: &str) {
        assert!(self.agent.is_none(), "agent already running");
        let mut cmd = self.node().netns().command(e2e::bin_path("node-agent"));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(self.agent_env(mode))
            .envs(self.extra_agent_env.clone())
            .env(e2e::netsim::OWNER_ENV, self.cluster.scope().prefix())
            .stdin(Stdio::null());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent_log)
            .unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        let mut p = Process::spawn(cmd).expect("spawn node-agent");
        p.set_grace(Duration::from_secs(10));
        self.agent = Some(p);
    }

    /// SIGTERM and wait for the exit; returns whether it exited 0.
    pub fn stop_agent(&mut self) -> bool {
        let mut p = self.agent.take().expect("agent running");
        let st = p.terminate(Duration::from_secs(15));
        st.is_some_and(|s| s.success())
    }

    pub fn start_ztunnel(&mut self) {
        assert!(self.ztunnel.is_none());
        self.ztunnel = Some(Ztunnel::start(&self.uds()));
    }

    pub fn zt(&self) -> &Ztunnel {
        self.ztunnel.as_ref().expect("ztunnel running")
    }

    /// The last lines of the agent's log, for failure messages.
    pub fn agent_log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.agent_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(60);
        format!("--- agent log (tail) ---\n{}", lines[from..].join("\n"))
    }

    /// HTTP GET to the agent inside the node netns; (status, body).
    pub fn agent_http(&self, port: u16, path: &str) -> Option<(u16, String)> {
        let path = path.to_string();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.node()
            .netns()
            .run(move || -> std::io::Result<(u16, String)> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                let code = out
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let body = out
                    .split_once("\r\n\r\n")
                    .map(|x| x.1)
                    .unwrap_or("")
                    .to_string();
                Ok((code, body))
            })
            .ok()?
            .ok()
    }

    pub fn wait_agent_ready(&self) {
        wait_for(
            "agent /readyz 200",
            Duration::from_secs(20),
            || matches!(self.agent_http(8000, "/readyz"), Some((200, _))).then_some(()),
            || {
                format!(
                    "readyz: {:?}\n{}",
                    self.agent_http(8000, "/readyz"),
                    self.agent_log_tail()
                )
            },
        );
    }

    /// Waits until the primary config carries the istio-cni entry.
    pub fn wait_chained(&self) {
        wait_for(
            "istio-cni chained into the primary CNI config",
            Duration::from_secs(10),
            || {
                let c = self.conflist();
                c["plugins"]
                    .as_array()?
                    .iter()
                    .any(|p| p["type"] == "istio-cni")
                    .then_some(())
            },
            || self.agent_log_tail(),
        );
    }

    pub fn conflist(&self) -> Value {
        let path = self.conf_dir().join(self.primary);
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    // ---- Kubernetes objects ---------------------------------------------

    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubectl_config)
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn create_namespace(&self, name: &str, labels: Value) {
        self.api
            .create(json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "labels": labels}}))
            .unwrap();
    }

    pub fn pod_object(&self, namespace: &str, name: &str) -> Value {
        self.api
            .get("v1", "Pod", Some(namespace), name)
            .unwrap_or(Value::Null)
    }

    pub fn annotation(&self, namespace: &str, name: &str) -> Option<String> {
        self.pod_object(namespace, name)
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(REDIRECTION))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    // ---- kubelet-lite ---------------------------------------------------

    /// Creates the Pod object (bound to the node) and returns its UID.
    pub fn create_pod_object(&self, namespace: &str, name: &str, labels: Value) -> String {
        let obj = self
            .api
            .create(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": {"nodeName": self.node().name(), "serviceAccountName": "default",
                         "containers": [{"name": "app", "image": "app"}]}
            }))
            .unwrap();
        obj["metadata"]["uid"].as_str().unwrap().to_string()
    }

    /// Runs the CNI chain ADD for the pod once; Err = the failing plugin's
    /// output.
    pub fn cni_add(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        netns: &NamedNetns,
        container: &str,
    ) -> Result<Value, String> {
        let conflist = self.conflist();
        let mut prev: Option<Value> = None;
        let mut done: Vec<Value> = Vec::new();
        for plugin in conflist["plugins"].as_array().cloned().unwrap_or_default() {
            let run = self.run_plugin(
                "ADD",
                &conflist,
                &plugin,
                prev.as_ref(),
                namespace,
                name,
                uid,
                netns,
                container,
            );
            match run {
                Ok(out) => {
                    prev = Some(serde_json::from_str(&out).map_err(|e| {
                        format!(
                            "plugin {} printed no JSON result ({e}): {out}",
                            plugin["type"]
                        )
                    })?);
                    done.push(plugin);
                }
                Err(e) => {
                    // As runtimes do: DEL what was added.
                    for p in done.iter().rev() {
                        let _ = self.run_plugin(
                            "DEL",
                            &conflist,
                            p,
                            prev.as_ref(),
                            namespace,
                            name,
                            uid,
                            netns,
                            container,
                        );
                    }
                    return Err(e);
                }
            }
        }
        prev.ok_or_else(|| "empty CNI chain".to_string())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_plugin(
        &self,
        command: &str,
        conflist: &Value,
        plugin: &Value,
        prev: Option<&Value>,
        namespace: &str,
        name: &str,
        uid: &str,
        netns: &NamedNetns,
        container: &str,
    ) -> Result<String, String> {
        let kind = plugin["type"].as_str().unwrap_or("?").to_string();
        let bin = [self.bin_dir(), PathBuf::from(REFERENCE_PLUGINS)]
            .iter()
            .map(|d| d.join(&kind))
            .find(|p| p.exists())
            .ok_or_else(|| format!("CNI plugin {kind} not found"))?;
        let mut conf = plugin.clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let mut cmd = self.node().netns().command(&bin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns.path())
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID={uid}"
                ),
            )
            .env(
                "CNI_PATH",
                format!("{}:{REFERENCE_PLUGINS}", self.bin_dir().display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn {kind}: {e}"))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(&conf).unwrap())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "CNI {command} {kind} failed ({}): {stdout} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// What kubelet does for a new pod: the Pod object, a netns, the CNI
    /// chain (retried like kubelet until `max`), then status Running with
    /// the IP. The ADD's duration is returned too.
    pub fn run_pod(&self, namespace: &str, name: &str, labels: Value, max: Duration) -> PodRef {
        let uid = self.create_pod_object(namespace, name, labels);
        self.start_sandbox(namespace, name, &uid, max)
    }

    /// Sandbox for an existing Pod object.
    pub fn start_sandbox(&self, namespace: &str, name: &str, uid: &str, max: Duration) -> PodRef {
        let netns = self
            .cluster
            .scope()
            .create_netns(&format!("{}-{name}", self.node().name()))
            .expect("pod netns");
        let container = format!("c-{name}");
        let deadline = Instant::now() + max * time_scale();
        let result = loop {
            match self.cni_add(namespace, name, uid, &netns, &container) {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("CNI ADD of {namespace}/{name} failed (kubelet retries): {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!(
                    "CNI ADD of {namespace}/{name}: {e}\n{}",
                    self.agent_log_tail()
                ),
            }
        };
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no IP in CNI result {result}"));
        self.set_running(namespace, name, ip);
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            netns,
            ip,
            container,
        }
    }

    pub fn set_running(&self, namespace: &str, name: &str, ip: Ipv4Addr) {
        self.api
            .merge_patch(
                "v1",
                "Pod",
                Some(namespace),
                name,
                &json!({"status": {
                    "phase": "Running", "podIP": ip.to_string(),
                    "podIPs": [{"ip": ip.to_string()}],
                    "conditions": [{"type": "Ready", "status": "True"}]
                }}),
                true,
            )
            .unwrap();
    }

    /// What kubelet does when a pod is deleted: CNI DEL, netns removed,
    /// object gone.
    pub fn delete_pod(&self, pod: PodRef) {
        let conflist = self.conflist();
        for p in conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .rev()
        {
            let _ = self.run_plugin(
                "DEL",
                &conflist,
                p,
                None,
                &pod.namespace,
                &pod.name,
                &pod.uid,
                &pod.netns,
                &pod.container,
            );
        }
        let _ = self
            .api
            .delete("v1", "Pod", Some(&pod.namespace), &pod.name);
        pod.netns.delete();
    }

    // ---- what is in a pod's netns ----------------------------------------

    /// `ISTIO` lines of iptables-save in `netns` (both backends).
    pub fn istio_rules(netns: &NamedNetns) -> Vec<String> {
        let mut lines = Vec::new();
        for save in [
            "iptables-nft-save",
            "iptables-legacy-save",
            "ip6tables-nft-save",
            "ip6tables-legacy-save",
        ] {
            if let Ok(out) = netns.output(save, Vec::<&str>::new(), Duration::from_secs(10)) {
                lines.extend(
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.contains("ISTIO") && !l.starts_with('#'))
                        .map(|l| format!("{save}: {l}")),
                );
            }
        }
        lines
    }

    pub fn redirected(netns: &NamedNetns) -> bool {
        Self::istio_rules(netns)
            .iter()
            .any(|l| l.contains("-A ISTIO_OUTPUT") && l.contains("15001"))
    }
}

/// A `ptp` + `host-local` network for `node` (pods routed through their
/// own veth).
fn ptp_conflist(node: &Node) -> Value {
    let o = node.pod_cidr().network().octets();
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [{
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1500,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": node.pod_cidr().to_string(),
                             "rangeStart": Ipv4Addr::new(o[0], o[1], o[2], 2).to_string(),
                             "rangeEnd": Ipv4Addr::new(o[0], o[1], o[2], 199).to_string(),
                             "gateway": node.gateway().to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": node.cni_ipam_dir().display().to_string(),
            }
        }]
    })
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.terminate(Duration::from_secs(10));
        }
        self.ztunnel.take();
        if std::thread::panicking() {
            eprintln!("{}", self.agent_log_tail());
        }
    }
}
