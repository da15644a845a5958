//! **kubelet-lite**: the part of a kubelet and container runtime the
//! node-in-a-box harness needs, for one simulated node. A test double, not
//! a product.
//!
//! It registers its Node object, watches the Pods bound to its node
//! (`spec.nodeName`, through the Kubernetes API like the real kubelet) and
//! for each one:
//!
//! 1. prepares the volumes ([`volumes`]: hostPath per node, emptyDir,
//!    configMap, secret, projected service-account tokens via
//!    TokenRequest); a missing object keeps the pod waiting;
//! 2. creates the sandbox: a named netns (`<scope>-<node>-<pod>-<uid4>`)
//!    and the CNI chain ADD exactly as containerd runs it ([`cni`]: the
//!    first config of the node's conf dir — the one the node agent chained
//!    `istio-cni` into —, plugins from the node's CNI bin dir, run in the
//!    node netns, `prevResult` chaining). A failed ADD is retried with
//!    backoff while the pod stays `Pending` (condition
//!    `PodReadyToStartContainers=False` with the error); the containers are
//!    never started without a successful ADD. `hostNetwork` pods skip this
//!    and run in the node netns;
//! 3. starts each container as a process in the pod's netns
//!    ([`container`]: command, environment with the downward API, paths
//!    through the volume mounts, kubelet-managed `/etc/hosts` with
//!    `hostAliases`, user and capabilities from the security context), in a
//!    per-pod cgroup ([`cgroup`]) so `/proc` shows which pod a process
//!    belongs to; output to `<node root>/var/log/pods/<ns>_<pod>_<uid>/<container>.log`;
//! 4. reports `status` through `pods/status` (phase, pod IP, host IP,
//!    conditions, container statuses with restart counts), runs readiness
//!    probes from the node netns ([`probe`]) and restarts exited containers
//!    with backoff (`restartPolicy` Always/OnFailure/Never);
//! 5. when the Pod object goes: SIGTERM, SIGKILL after the grace period,
//!    CNI DEL of the chain in reverse order with the cached ADD result,
//!    netns, cgroup and pod directory removed.
//!
//! Test hooks ([`Kubelet::kill_container`], [`Kubelet::release_container`])
//! stand in for a crashing container or a node component that stays down
//! (crash-loop backoff) for as long as a test needs.
//!
//! Simplifications (documented where they matter): no image pulls (an
//! image is a set of host files, [`volumes::Images`]), no per-container
//! filesystem (paths are mapped through environment values, see
//! [`volumes`]), probe periods and termination grace capped by
//! [`KubeletConfig`] to keep tests fast, no liveness probes, no init
//! containers, no resource limits.

pub mod cgroup;
pub mod cni;
pub mod container;
pub mod probe;
pub mod status;
pub mod volumes;
mod worker;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use nix::sys::signal::Signal;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::netsim::Scope;
pub use cni::{CniRuntime, NetworkConfigList};
pub use volumes::{Images, NodeFs};

/// Errors starting a kubelet.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubelet {node}: cannot start its runtime: {source}")]
    Runtime {
        node: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubelet {node}: Kubernetes client: {source}")]
    Client {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("kubelet {node}: cannot register Node object: {source}")]
    Register {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("kubelet {node}: pod {pod}: {reason}")]
    Pod {
        node: String,
        pod: String,
        reason: String,
    },
}

/// How a kubelet runs one node.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub node_name: String,
    /// Full name of the node's netns (`/run/netns/<name>`).
    pub node_netns: String,
    pub node_ip: Ipv4Addr,
    /// The node's pod CIDR (reported in the Node object).
    pub pod_cidr: String,
    /// Where node-local host paths live.
    pub fs: NodeFs,
    /// The node's CNI conf dir and `CNI_PATH`.
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The scope pod netns are created in (and the processes' owner marker).
    pub scope: Arc<Scope>,
    pub images: Images,
    /// Variables added to every container's environment (e.g.
    /// `KUBECONFIG`, standing in for the in-cluster service account).
    pub injected_env: Vec<(String, String)>,
    /// Cgroup hierarchy for pod cgroups (`None`: no pod cgroups).
    pub cgroup_hierarchy: Option<PathBuf>,
    /// Each CNI plugin run is killed after this long.
    pub plugin_timeout: Duration,
    /// Sandbox (CNI ADD) and volume retries: first delay, maximum delay.
    pub sandbox_backoff: (Duration, Duration),
    /// Container restarts: first delay, maximum delay.
    pub restart_backoff: (Duration, Duration),
    /// Probe periods (and initial delays) are capped at this.
    pub max_probe_period: Duration,
    /// Termination grace periods are capped at this.
    pub max_grace: Duration,
    /// ConfigMap/Secret volumes of running pods are re-read this often
    /// (the real kubelet: about a minute).
    pub volume_resync: Duration,
}

impl KubeletConfig {
    /// Defaults tuned for tests around the given node.
    pub fn new(
        node_name: &str,
        node_netns: &str,
        node_ip: Ipv4Addr,
        pod_cidr: &str,
        root: PathBuf,
        scope: Arc<Scope>,
    ) -> Self {
        let fs = NodeFs { root: root.clone() };
        Self {
            node_name: node_name.into(),
            node_netns: node_netns.into(),
            node_ip,
            pod_cidr: pod_cidr.into(),
            cni_conf_dir: root.join("etc/cni/net.d"),
            cni_bin_dirs: vec![root.join("opt/cni/bin")],
            fs,
            scope,
            images: Images::default(),
            injected_env: Vec::new(),
            cgroup_hierarchy: cgroup::hierarchy(),
            plugin_timeout: Duration::from_secs(30),
            sandbox_backoff: (Duration::from_millis(100), Duration::from_secs(1)),
            restart_backoff: (Duration::from_millis(200), Duration::from_secs(2)),
            max_probe_period: Duration::from_millis(200),
            max_grace: Duration::from_secs(5),
            volume_resync: Duration::from_secs(3),
        }
    }
}

/// What the kubelet knows about one of its pods (a snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub phase: PodPhase,
    /// Full netns name (`None` for hostNetwork pods or before the sandbox).
    pub netns: Option<String>,
    pub ip: Option<IpAddr>,
    /// Failed sandbox attempts so far, and the last error.
    pub sandbox_failures: u32,
    pub last_error: Option<String>,
    /// The plugins' stderr from the successful CNI ADD.
    pub cni_log: String,
    pub ready: bool,
    pub containers: BTreeMap<String, ContainerInfo>,
}

/// Lifecycle as the kubelet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    /// Volumes or sandbox not done yet.
    Pending,
    /// Containers started.
    Running,
    /// Being torn down.
    Terminating,
    /// Torn down.
    Gone,
}

/// One container of a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerInfo {
    pub pid: Option<u32>,
    pub running: bool,
    pub ready: bool,
    pub restarts: u32,
    /// Held down by [`Kubelet::kill_container`] with `hold`.
    pub held: bool,
    pub log: PathBuf,
}

/// Commands from tests to a pod worker.
#[derive(Debug)]
pub(crate) enum PodCommand {
    Kill {
        container: String,
        signal: Signal,
        hold: bool,
    },
    Release {
        container: String,
    },
}

pub(crate) struct PodEntry {
    pub key: String,
    pub update: watch::Sender<Option<Pod>>,
    pub commands: mpsc::UnboundedSender<PodCommand>,
    pub info: Arc<Mutex<PodInfo>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

pub(crate) struct Shared {
    pub cfg: KubeletConfig,
    pub client: kube::Client,
    pub cni: CniRuntime,
    pub pods: Mutex<BTreeMap<String, PodEntry>>,
}

impl Shared {
    pub fn pods(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodEntry>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running kubelet-lite. Dropping it terminates all its pods (containers
/// stopped, CNI DEL, netns removed) and stops it.
pub struct Kubelet {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet")
            .field("node", &self.shared.cfg.node_name)
            .finish_non_exhaustive()
    }
}

fn pod_uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

impl Kubelet {
    /// Registers the Node and starts watching its pods. `api` is a
    /// client configuration reachable from the calling (root) netns.
    pub fn start(cfg: KubeletConfig, api: kube::Config) -> Result<Self, KubeletError> {
        let node = cfg.node_name.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("kubelet-{node}"))
            .enable_all()
            .build()
            .map_err(|source| KubeletError::Runtime {
                node: node.clone(),
                source,
            })?;
        let client = {
            let _g = runtime.enter();
            kube::Client::try_from(api).map_err(|source| KubeletError::Client {
                node: node.clone(),
                source,
            })?
        };
        // Pod cgroups of killed runs with this tag (their scope is gone).
        cgroup::sweep_stale(cfg.scope.tag());
        for d in [&cfg.cni_conf_dir]
            .into_iter()
            .chain(cfg.cni_bin_dirs.iter())
        {
            let _ = std::fs::create_dir_all(d);
        }
        let cni = CniRuntime {
            conf_dir: cfg.cni_conf_dir.clone(),
            bin_dirs: cfg.cni_bin_dirs.clone(),
            node_netns: cfg.node_netns.clone(),
            owner: cfg.scope.prefix().to_string(),
            plugin_timeout: cfg.plugin_timeout,
        };
        let shared = Arc::new(Shared {
            cfg,
            client,
            cni,
            pods: Mutex::new(BTreeMap::new()),
        });
        runtime.block_on(register_node(&shared))?;
        let watcher = runtime.spawn(watch_pods(shared.clone()));
        Ok(Self {
            shared,
            runtime: Some(runtime),
            watcher: Some(watcher),
        })
    }

    pub fn node_name(&self) -> &str {
        &self.shared.cfg.node_name
    }

    pub fn config(&self) -> &KubeletConfig {
        &self.shared.cfg
    }

    /// The current (not terminating) pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        let key = format!("{namespace}/{name}");
        let pods = self.shared.pods();
        let mut found: Vec<PodInfo> = pods
            .values()
            .filter(|e| e.key == key)
            .map(|e| e.info.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        found.sort_by_key(|p| matches!(p.phase, PodPhase::Terminating | PodPhase::Gone));
        found.into_iter().next()
    }

    /// All pods the kubelet currently runs (any phase).
    pub fn pods(&self) -> Vec<PodInfo> {
        self.shared
            .pods()
            .values()
            .map(|e| e.info.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Waits until `pred` holds for pod `namespace/name`.
    pub fn wait_pod(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&PodInfo) -> bool,
    ) -> Result<PodInfo, KubeletError> {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.pod(namespace, name);
            if let Some(p) = &p
                && pred(p)
            {
                return Ok(p.clone());
            }
            if Instant::now() >= deadline {
                return Err(KubeletError::Pod {
                    node: self.node_name().into(),
                    pod: format!("{namespace}/{name}"),
                    reason: format!("not {what} after {timeout:?}; kubelet state: {p:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the pod's containers all run and are ready.
    pub fn wait_ready(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<PodInfo, KubeletError> {
        self.wait_pod(namespace, name, timeout, "ready", |p| {
            p.phase == PodPhase::Running && p.ready
        })
    }

    fn send(&self, namespace: &str, name: &str, cmd: PodCommand) -> Result<(), KubeletError> {
        let key = format!("{namespace}/{name}");
        let pods = self.shared.pods();
        let e = pods
            .values()
            .find(|e| {
                e.key == key
                    && !matches!(
                        e.info.lock().unwrap_or_else(|e| e.into_inner()).phase,
                        PodPhase::Terminating | PodPhase::Gone
                    )
            })
            .ok_or_else(|| KubeletError::Pod {
                node: self.node_name().into(),
                pod: key.clone(),
                reason: "not running on this node".into(),
            })?;
        e.commands.send(cmd).map_err(|_| KubeletError::Pod {
            node: self.node_name().into(),
            pod: key,
            reason: "its worker has stopped".into(),
        })
    }

    /// Sends `signal` to container `container` of the pod (its whole
    /// process group). With `hold`, the kubelet does not restart it until
    /// [`Kubelet::release_container`] (a crash-looping container).
    pub fn kill_container(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
        signal: Signal,
        hold: bool,
    ) -> Result<(), KubeletError> {
        self.send(
            namespace,
            name,
            PodCommand::Kill {
                container: container.into(),
                signal,
                hold,
            },
        )
    }

    /// Lets the kubelet restart a held container now.
    pub fn release_container(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<(), KubeletError> {
        self.send(
            namespace,
            name,
            PodCommand::Release {
                container: container.into(),
            },
        )
    }

    /// Terminates every pod now (as on node shutdown) and waits for the
    /// teardown (bounded).
    pub fn shutdown(&mut self) {
        let Some(rt) = self.runtime.take() else {
            return;
        };
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        let tasks: Vec<_> = {
            let mut pods = self.shared.pods();
            pods.values_mut()
                .filter_map(|e| {
                    e.update.send_replace(None);
                    e.task.take()
                })
                .collect()
        };
        rt.block_on(async {
            let all = futures::future::join_all(tasks);
            let _ = tokio::time::timeout(Duration::from_secs(30), all).await;
        });
        rt.shutdown_timeout(Duration::from_secs(1));
        if let Some(h) = &self.shared.cfg.cgroup_hierarchy {
            let prefix = self.shared.cfg.scope.prefix();
            cgroup::remove_tree(&cgroup::node_dir(h, prefix, &self.shared.cfg.node_name));
            let _ = std::fs::remove_dir(h.join(prefix).join(&self.shared.cfg.node_name));
            // Empty once the last node of the scope is gone.
            let _ = std::fs::remove_dir(h.join(prefix));
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Region every simulated node is in; each node is a zone of its own, [`node_zone`].
pub const NODE_REGION: &str = "sim-region";

/// The `topology.kubernetes.io/zone` label a simulated node gets (a cloud's node
/// controller sets it on real nodes).
pub fn node_zone(node_name: &str) -> String {
    format!("zone-{node_name}")
}

/// Creates (or refreshes) the Node object.
async fn register_node(shared: &Shared) -> Result<(), KubeletError> {
    let c = &shared.cfg;
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": c.node_name, "labels": {
            "kubernetes.io/hostname": c.node_name, "kubernetes.io/os": "linux",
            "topology.kubernetes.io/region": NODE_REGION,
            "topology.kubernetes.io/zone": node_zone(&c.node_name)}},
        "spec": {"podCIDR": c.pod_cidr, "podCIDRs": [c.pod_cidr]},
    }))
    .expect("node object");
    let api: Api<Node> = Api::all(shared.client.clone());
    let err = |source| KubeletError::Register {
        node: c.node_name.clone(),
        source,
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(err(e)),
    }
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": c.node_ip.to_string()},
                      {"type": "Hostname", "address": c.node_name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet-lite is posting ready status",
                        "lastHeartbeatTime": status::now_rfc3339(),
                        "lastTransitionTime": status::now_rfc3339()}],
        "nodeInfo": {"kubeletVersion": "v1.32.0-lite", "operatingSystem": "linux", "architecture": "amd64",
                     "containerRuntimeVersion": "kubelet-lite://0", "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
                     "machineID": "", "systemUUID": "", "bootID": ""}
    }});
    api.patch_status(
        &c.node_name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .map_err(err)?;
    Ok(())
}

/// Watches this node's pods and feeds the pod workers.
async fn watch_pods(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", shared.cfg.node_name));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut listing: Option<std::collections::BTreeSet<String>> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing = Some(Default::default()),
            Ok(watcher::Event::InitApply(p)) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(pod_uid(&p));
                }
                apply(&shared, p);
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = listing.take() {
                    let pods = shared.pods();
                    for (uid, e) in pods.iter() {
                        if !seen.contains(uid) {
                            e.update.send_replace(None);
                        }
                    }
                }
            }
            Ok(watcher::Event::Apply(p)) => apply(&shared, p),
            Ok(watcher::Event::Delete(p)) => {
                if let Some(e) = shared.pods().get(&pod_uid(&p)) {
                    e.update.send_replace(None);
                }
            }
            Err(e) => {
                tracing::warn!(node = %shared.cfg.node_name, error = %e, "kubelet-lite: pod watch failed (retrying)")
            }
        }
    }
}

/// A pod added or changed: new worker, or an update for the running one.
fn apply(shared: &Arc<Shared>, pod: Pod) {
    let uid = pod_uid(&pod);
    if uid.is_empty() {
        return;
    }
    let mut pods = shared.pods();
    if let Some(e) = pods.get(&uid) {
        e.update.send_replace(Some(pod));
        return;
    }
    let key = pod_key(&pod);
    let (ns, name) = key.split_once('/').unwrap_or(("", ""));
    let info = Arc::new(Mutex::new(PodInfo {
        namespace: ns.into(),
        name: name.into(),
        uid: uid.clone(),
        phase: PodPhase::Pending,
        netns: None,
        ip: None,
        sandbox_failures: 0,
        last_error: None,
        cni_log: String::new(),
        ready: false,
        containers: BTreeMap::new(),
    }));
    let (utx, urx) = watch::channel(Some(pod));
    let (ctx, crx) = mpsc::unbounded_channel();
    let task = tokio::spawn(worker::run(
        shared.clone(),
        uid.clone(),
        urx,
        crx,
        info.clone(),
    ));
    pods.insert(
        uid,
        PodEntry {
            key,
            update: utx,
            commands: ctx,
            info,
            task: Some(task),
        },
    );
}
