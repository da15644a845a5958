//! **SimCluster**: a whole simulated cluster on one Linux host, for the
//! end-to-end scenarios and `make demo`. A test harness, not a product.
//!
//! - N nodes ([`crate::netsim::Cluster`]: netns per node on an underlay,
//!   pod CIDR 10.244.N.0/24 per node, routes between them);
//! - the Kubernetes API double ([`crate::apiserver`]) on 127.0.0.1 (for
//!   `kubectl` and the kubelets) and on the underlay (for everything running
//!   in nodes and pods);
//! - per node a node-local filesystem root `<scope dir>/<node>` standing in
//!   for `/opt/cni/bin` (the reference plugins `bridge`, `host-local`,
//!   `ptp`, `loopback`, `portmap`, linked from the Debian package), `/etc/cni/net.d`
//!   (the primary config the harness writes: `bridge` + `host-local` in
//!   in-pod mode; `ptp` + `host-local` in GENEVE mode, which needs routed
//!   pods as kindnet/ptp CNIs give), `/var/run/istio-cni`, `/var/run/ztunnel`;
//! - per node a [`Kubelet`] (kubelet-lite);
//! - the chart's components as Pods the kubelets run with the real
//!   binaries, configured exactly by the chart's golden env files
//!   ([`chart`], [`components`]): the built-in CA (`node-agent ca`,
//!   Deployment `mesh-ca`, on node1, its root in Secret `mesh-ca-certs` and
//!   ConfigMap `istio-ca-root-cert`), per node the node agent (hostNetwork)
//!   and ztunnel (its own pod netns through the CNI chain, namespace
//!   `istio-system`), ztunnel reaching the CA through `hostAliases` for
//!   `mesh-ca.istio-system.svc` (no cluster DNS here) with a pod-bound
//!   projected token (TokenRequest) that the CA checks with TokenReview.
//!
//! Differences from a real cluster, and why: every container gets
//! `KUBECONFIG` (the API double speaks plain HTTP, so in-cluster config
//! cannot be used); node-local host paths are remapped through environment
//! values (see [`crate::kubelet::volumes`]); no kube-proxy and no DNS
//! (Service VIPs do not route outside the mesh; tests use pod IPs).
//!
//! Clean-up: dropping the cluster terminates all pods (CNI DEL), the
//! processes, namespaces, pod cgroups and the scratch directory; a killed
//! run's leftovers with the same tag are removed when the next one starts.

pub mod chart;
pub mod components;
mod observe;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::apiserver::{ApiServer, ApiServerHandle, write_kubeconfig_for};
use crate::kubelet::{Images, Kubelet, KubeletConfig, PodInfo, cgroup};
use crate::netsim::{Cluster, ClusterConfig, NamedNetns, Node, Scope};
use crate::workloads;
pub use components::{MESH_CA, NODE_AGENT, SYSTEM_NAMESPACE, WorkloadSpec, ZTUNNEL};

/// Where the reference CNI plugins are installed (Debian
/// `containernetworking-plugins`).
pub const REFERENCE_PLUGINS_DIR: &str = "/usr/lib/cni";
/// Plugins linked into each node's CNI bin dir.
pub const REFERENCE_PLUGINS: [&str; 5] = ["bridge", "host-local", "ptp", "loopback", "portmap"];
/// The annotation the node agent sets on enrolled pods.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Name of the primary network in the harness's CNI config.
pub const NETWORK_NAME: &str = "k8s-pod-network";

/// The redirection mode the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectMode {
    Inpod,
    Geneve,
}

impl RedirectMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectMode::Inpod => "inpod",
            RedirectMode::Geneve => "geneve",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("simulated cluster {tag}: {what}: {reason}")]
    Setup {
        tag: String,
        what: String,
        reason: String,
    },
    #[error("pod {pod}: {reason}")]
    Pod { pod: String, reason: String },
    #[error("kubectl {args}: {reason}")]
    Kubectl { args: String, reason: String },
}

/// How to build a [`SimCluster`].
#[derive(Debug, Clone)]
pub struct SimClusterConfig {
    /// Scope tag (1–12 of `[a-z0-9]`): names of netns, records, cgroups.
    pub tag: String,
    pub nodes: usize,
    pub mode: RedirectMode,
    /// (workload, variable, value): replaces the chart's value (e.g. a
    /// debug `RUST_LOG`). Empty by default: the chart's environment as is.
    pub env_overrides: Vec<(String, String, String)>,
    /// How long components may take to become Ready.
    pub ready_timeout: Duration,
    /// Serve ztunnel's workloads and policies from an istiod xDS double
    /// ([`SimCluster::xds`]) instead of the Kubernetes API: ztunnels run with
    /// `XDS_ADDRESS` (the chart's `xdsAddress`) and `KUBERNETES_DISCOVERY=false`;
    /// the test plays istiod and pushes what it wants ztunnel to know.
    pub istiod_xds: bool,
}

impl SimClusterConfig {
    pub fn new(tag: &str, mode: RedirectMode) -> Self {
        let mut env_overrides = Vec::new();
        // For debugging a run: E2E_RUST_LOG applies to every component.
        if let Ok(l) = std::env::var("E2E_RUST_LOG") {
            for w in [NODE_AGENT, ZTUNNEL, MESH_CA] {
                env_overrides.push((w.to_string(), "RUST_LOG".to_string(), l.clone()));
            }
        }
        Self {
            tag: tag.into(),
            nodes: 2,
            mode,
            env_overrides,
            ready_timeout: Duration::from_secs(90),
            istiod_xds: false,
        }
    }
}

/// A running simulated cluster (see the module docs).
pub struct SimCluster {
    // Drop order: kubelets (pods torn down while the API still answers),
    // then the API, then the netns topology and scope.
    kubelets: Vec<Kubelet>,
    xds: Option<crate::xds_server::XdsHandle>,
    api: ApiServerHandle,
    cluster: Cluster,
    cfg: SimClusterConfig,
    golden: chart::ChartGolden,
    kubectl_config: PathBuf,
    node_kubeconfig: PathBuf,
    ca_pod: String,
    ca_root_pem: String,
    ca_root_key_pem: String,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster")
            .field("prefix", &self.cluster.scope().prefix())
            .field("mode", &self.cfg.mode)
            .finish_non_exhaustive()
    }
}

/// Whether this machine can run the harness; `Some(reason)` when not.
pub fn missing_prerequisite() -> Option<String> {
    if !crate::netsim::can_create_netns() {
        return Some("needs root (network namespaces, iptables)".into());
    }
    for p in ["bridge", "host-local", "ptp"] {
        if !Path::new(REFERENCE_PLUGINS_DIR).join(p).exists() {
            return Some(format!(
                "CNI reference plugin {REFERENCE_PLUGINS_DIR}/{p} missing (apt-get install containernetworking-plugins; scripts/install-deps.sh does)"
            ));
        }
    }
    for b in ["node-agent", "istio-cni", "ztunnel", workloads::BINARY] {
        if let Err(e) = crate::binaries::try_bin_path(b) {
            return Some(e);
        }
    }
    for tool in ["kubectl", "tcpdump", "iptables-nft-restore", "ipset"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{tool} not on PATH (scripts/install-deps.sh installs it)"
            ));
        }
    }
    None
}

fn setup_err(tag: &str, what: impl Into<String>) -> impl FnOnce(String) -> HarnessError {
    let (tag, what) = (tag.to_string(), what.into());
    move |reason| HarnessError::Setup { tag, what, reason }
}

impl SimCluster {
    /// Builds the cluster and waits until the CA, every node agent and
    /// every ztunnel are Ready.
    pub fn start(cfg: SimClusterConfig) -> Result<Self, HarnessError> {
        let tag = cfg.tag.clone();
        let t0 = Instant::now();
        // Leftovers of killed runs: the scope sweeps netns/processes, the
        // kubelets their pod cgroups.
        let scope =
            Arc::new(Scope::new(&tag).map_err(|e| setup_err(&tag, "scope")(e.to_string()))?);
        let cluster = Cluster::in_scope(
            scope.clone(),
            ClusterConfig {
                nodes: cfg.nodes,
                ..Default::default()
            },
        )
        .map_err(|e| setup_err(&tag, "network topology")(e.to_string()))?;
        let dir = scope.dir().to_path_buf();
        let golden = chart::golden(cfg.mode.as_str())
            .map_err(|e| setup_err(&tag, "chart golden file")(e.to_string()))?;

        // The API: loopback for kubectl and kubelets, underlay for nodes.
        let mut api = ApiServer::default()
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .bookmark_interval(Duration::from_secs(2))
            .run()
            .map_err(|e| setup_err(&tag, "API double")(e.to_string()))?;
        let listener = cluster
            .bind_host_tcp(0)
            .map_err(|e| setup_err(&tag, "API listener on the underlay")(e.to_string()))?;
        let node_addr = api
            .add_listener(listener)
            .map_err(|e| setup_err(&tag, "API listener on the underlay")(e.to_string()))?;
        let kubectl_config = dir.join("kubeconfig");
        api.write_kubeconfig(&kubectl_config)
            .map_err(|e| setup_err(&tag, "kubeconfig")(e.to_string()))?;
        let node_kubeconfig = dir.join("node-kubeconfig");
        write_kubeconfig_for(&node_kubeconfig, &format!("http://{node_addr}"))
            .map_err(|e| setup_err(&tag, "kubeconfig")(e.to_string()))?;
        set_mode(&node_kubeconfig, 0o644);
        set_mode(&dir, 0o755);

        let mut me = Self {
            kubelets: Vec::new(),
            xds: None,
            api,
            cluster,
            cfg,
            golden,
            kubectl_config,
            node_kubeconfig,
            ca_pod: format!("{MESH_CA}-0"),
            ca_root_pem: String::new(),
            ca_root_key_pem: String::new(),
        };
        me.install_chart_objects()?;
        if me.cfg.istiod_xds {
            me.start_xds()?;
        }
        for i in 1..=me.cfg.nodes {
            me.prepare_node(i)?;
        }
        for i in 1..=me.cfg.nodes {
            let k = me.start_kubelet(i)?;
            me.kubelets.push(k);
        }
        me.start_components()?;
        tracing::info!(prefix = %me.prefix(), took = ?t0.elapsed(), "simulated cluster ready");
        Ok(me)
    }

    /// The istiod double on the underlay (certificate from the mesh root, which
    /// ztunnel's `ROOT_CA_PATH` trusts), and ztunnel's environment pointing at it.
    fn start_xds(&mut self) -> Result<(), HarnessError> {
        let tag = self.cfg.tag.clone();
        let fail = |what: &'static str| setup_err(&tag, what);
        let listener = self
            .cluster
            .bind_host_tcp(0)
            .map_err(|e| fail("xDS listener on the underlay")(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| fail("xDS listener")(e.to_string()))?;
        let (cert, key) = crate::xds_server::serving_cert(
            &self.ca_root_pem,
            &self.ca_root_key_pem,
            &[addr.ip().to_string()],
        )
        .map_err(|e| fail("istiod serving certificate")(e.to_string()))?;
        let handle = crate::xds_server::XdsServer::new()
            .tls(cert, key)
            .start_on(listener)
            .map_err(|e| fail("xDS double")(e.to_string()))?;
        for (k, v) in [
            ("XDS_ADDRESS", format!("https://{addr}")),
            ("KUBERNETES_DISCOVERY", "false".to_string()),
        ] {
            self.cfg
                .env_overrides
                .push((ZTUNNEL.to_string(), k.to_string(), v));
        }
        self.xds = Some(handle);
        Ok(())
    }

    /// The istiod double ztunnels get their state from
    /// ([`SimClusterConfig::istiod_xds`]).
    pub fn xds(&self) -> Option<&crate::xds_server::XdsHandle> {
        self.xds.as_ref()
    }

    /// The chart's non-Pod objects.
    fn install_chart_objects(&mut self) -> Result<(), HarnessError> {
        let tag = self.cfg.tag.clone();
        let (cert, key) = node_agent::ca::authority::testing::generate_root(&format!(
            "geneva-mesh root CA ({})",
            self.prefix()
        ));
        self.ca_root_pem = cert.clone();
        self.ca_root_key_pem = key.clone();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let selector = |app: &str| json!({"matchLabels": {"app": app}});
        let template = |app: &str| {
            json!({"metadata": {"labels": {"app": app}},
                   "spec": {"containers": [{"name": app, "image": NODE_AGENT_IMAGE_REF}]}})
        };
        let objects = vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NODE_AGENT, "namespace": SYSTEM_NAMESPACE}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ZTUNNEL, "namespace": SYSTEM_NAMESPACE}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": MESH_CA, "namespace": SYSTEM_NAMESPACE}}),
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": "mesh-ca-certs", "namespace": SYSTEM_NAMESPACE, "labels": {"app": MESH_CA}},
                   "data": {"ca-cert.pem": b64(&cert), "ca-key.pem": b64(&key),
                            "root-cert.pem": b64(&cert), "cert-chain.pem": b64(&cert)}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "istio-ca-root-cert", "namespace": SYSTEM_NAMESPACE, "labels": {"app": MESH_CA}},
                   "data": {"root-cert.pem": cert}}),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": MESH_CA, "namespace": SYSTEM_NAMESPACE},
                   "spec": {"selector": {"app": MESH_CA},
                            "ports": [{"name": "grpc", "port": 15012, "targetPort": 15012}]}}),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                   "metadata": {"name": NODE_AGENT, "namespace": SYSTEM_NAMESPACE},
                   "spec": {"selector": selector(NODE_AGENT), "template": template(NODE_AGENT)}}),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                   "metadata": {"name": ZTUNNEL, "namespace": SYSTEM_NAMESPACE},
                   "spec": {"selector": selector(ZTUNNEL), "template": template(ZTUNNEL)}}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": MESH_CA, "namespace": SYSTEM_NAMESPACE},
                   "spec": {"replicas": 1, "selector": selector(MESH_CA), "template": template(MESH_CA)}}),
        ];
        for o in objects {
            let what = format!("create {} {}", o["kind"], o["metadata"]["name"]);
            self.api
                .create(o)
                .map_err(|e| setup_err(&tag, what)(e.to_string()))?;
        }
        Ok(())
    }

    /// The node's filesystem root: CNI bin dir with the reference plugins,
    /// the primary CNI config.
    fn prepare_node(&self, i: usize) -> Result<(), HarnessError> {
        let node = self.cluster.node(i);
        let root = self.node_root(node.name());
        let err = |what: &str, e: std::io::Error| HarnessError::Setup {
            tag: self.cfg.tag.clone(),
            what: format!("node {} {what}", node.name()),
            reason: e.to_string(),
        };
        let bin = root.join("opt/cni/bin");
        let conf = root.join("etc/cni/net.d");
        for d in [
            &bin,
            &conf,
            &root.join("var/run/istio-cni"),
            &root.join("var/run/ztunnel"),
        ] {
            std::fs::create_dir_all(d).map_err(|e| err("directories", e))?;
        }
        for p in REFERENCE_PLUGINS {
            let src = Path::new(REFERENCE_PLUGINS_DIR).join(p);
            if src.exists() {
                let _ = std::fs::remove_file(bin.join(p));
                std::os::unix::fs::symlink(&src, bin.join(p)).map_err(|e| err("CNI bin dir", e))?;
            }
        }
        let (file, content) = self.primary_cni_config(node);
        std::fs::write(
            conf.join(file),
            serde_json::to_vec_pretty(&content).unwrap(),
        )
        .map_err(|e| err("primary CNI config", e))?;
        Ok(())
    }

    /// File name and content of the node's primary CNI config (what a
    /// primary CNI plugin would install, and rewrite at reboot).
    pub fn primary_cni_config(&self, node: &Node) -> (&'static str, Value) {
        match self.cfg.mode {
            RedirectMode::Inpod => ("10-bridge.conflist", node.cni_conflist(NETWORK_NAME)),
            RedirectMode::Geneve => {
                let o = node.pod_cidr().network().octets();
                let start = Ipv4Addr::new(o[0], o[1], o[2], 2);
                let end = Ipv4Addr::new(o[0], o[1], o[2], 199);
                (
                    "10-ptp.conflist",
                    json!({
                        "cniVersion": "1.0.0",
                        "name": NETWORK_NAME,
                        "plugins": [{
                            "type": "ptp",
                            "ipMasq": false,
                            "mtu": 1500,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": node.pod_cidr().to_string(),
                                             "rangeStart": start.to_string(), "rangeEnd": end.to_string(),
                                             "gateway": node.gateway().to_string()}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": node.cni_ipam_dir().display().to_string(),
                            }
                        }]
                    }),
                )
            }
        }
    }

    fn start_kubelet(&self, i: usize) -> Result<Kubelet, HarnessError> {
        let node = self.cluster.node(i);
        let mut cfg = KubeletConfig::new(
            node.name(),
            node.netns().name(),
            node.ip(),
            &node.pod_cidr().to_string(),
            self.node_root(node.name()),
            self.cluster.scope().clone(),
        );
        let mut images = Images::default();
        let bin = |b: &str| crate::binaries::bin_path(b);
        images.add_file("ztunnel", "/usr/local/bin/ztunnel", bin("ztunnel"));
        images.add_file("node-agent", "/usr/local/bin/node-agent", bin("node-agent"));
        images.add_file(
            "node-agent",
            "/opt/istio-cni/bin/istio-cni",
            bin("istio-cni"),
        );
        images.add_file(
            crate::kubelet::volumes::image_short_name(workloads::IMAGE),
            workloads::ENTRYPOINT,
            bin(workloads::BINARY),
        );
        cfg.images = images;
        cfg.injected_env = vec![(
            "KUBECONFIG".to_string(),
            self.node_kubeconfig.display().to_string(),
        )];
        Kubelet::start(cfg, self.api.kube_config()).map_err(|e| {
            setup_err(&self.cfg.tag, format!("kubelet on {}", node.name()))(e.to_string())
        })
    }

    fn overrides(&self, workload: &str) -> Vec<(String, String)> {
        self.cfg
            .env_overrides
            .iter()
            .filter(|(w, _, _)| w == workload)
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The CA (node1), then per node the agent and ztunnel; waits for all
    /// to be Ready.
    fn start_components(&mut self) -> Result<(), HarnessError> {
        let tag = self.cfg.tag.clone();
        let mode = self.cfg.mode.as_str();
        let node1 = self.cluster.node(1).name().to_string();
        let ca = self.golden.workload(MESH_CA).ok_or_else(|| {
            setup_err(&tag, "chart")("no mesh-ca container in the golden file".into())
        })?;
        let ca_pod = components::component_pod(
            ca,
            &self.ca_pod,
            &node1,
            mode,
            &self.overrides(MESH_CA),
            &[],
        );
        self.create(ca_pod)?;
        // ztunnel needs the CA's address for its hostAliases.
        let ca_info = self
            .kubelet(&node1)
            .wait_pod(
                SYSTEM_NAMESPACE,
                &self.ca_pod,
                self.cfg.ready_timeout,
                "given an IP",
                |p| p.ip.is_some(),
            )
            .map_err(|e| self.setup_failure(&e.to_string()))?;
        let ca_ip = ca_info.ip.expect("checked");
        let aliases = vec![(
            ca_ip,
            vec![
                format!("{MESH_CA}.{SYSTEM_NAMESPACE}.svc"),
                format!("{MESH_CA}.{SYSTEM_NAMESPACE}.svc.cluster.local"),
                format!("{MESH_CA}.{SYSTEM_NAMESPACE}"),
                MESH_CA.to_string(),
            ],
        )];
        let names: Vec<String> = self
            .cluster
            .nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        for node in &names {
            for w in [NODE_AGENT, ZTUNNEL] {
                let c = self.golden.workload(w).ok_or_else(|| {
                    setup_err(&tag, "chart")(format!("no {w} container in the golden file"))
                })?;
                let al: &[(IpAddr, Vec<String>)] = if w == ZTUNNEL { &aliases } else { &[] };
                let pod = components::component_pod(
                    c,
                    &component_pod_name(w, node),
                    node,
                    mode,
                    &self.overrides(w),
                    al,
                );
                self.create(pod)?;
            }
        }
        let deadline = Instant::now() + self.cfg.ready_timeout;
        let mut waits = vec![(node1.clone(), self.ca_pod.clone())];
        for node in &names {
            for w in [NODE_AGENT, ZTUNNEL] {
                waits.push((node.clone(), component_pod_name(w, node)));
            }
        }
        for (node, pod) in waits {
            let left = deadline.saturating_duration_since(Instant::now());
            self.kubelet(&node)
                .wait_ready(SYSTEM_NAMESPACE, &pod, left)
                .map_err(|e| self.setup_failure(&e.to_string()))?;
        }
        Ok(())
    }

    fn setup_failure(&self, reason: &str) -> HarnessError {
        HarnessError::Setup {
            tag: self.cfg.tag.clone(),
            what: "components".into(),
            reason: format!("{reason}\n{}", self.diagnostics()),
        }
    }

    fn create(&self, obj: Value) -> Result<Value, HarnessError> {
        let key = format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap_or("")
        );
        self.api.create(obj).map_err(|e| HarnessError::Pod {
            pod: key,
            reason: format!("create: {e}"),
        })
    }

    // ---- accessors ---------------------------------------------------------

    pub fn prefix(&self) -> &str {
        self.cluster.scope().prefix()
    }

    pub fn mode(&self) -> RedirectMode {
        self.cfg.mode
    }

    pub fn api(&self) -> &ApiServerHandle {
        &self.api
    }

    pub fn net(&self) -> &Cluster {
        &self.cluster
    }

    /// Node by 1-based number.
    pub fn node(&self, i: usize) -> &Node {
        self.cluster.node(i)
    }

    pub fn node_names(&self) -> Vec<String> {
        self.cluster
            .nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }

    /// The kubelet of `node` (panics for an unknown node: a test bug).
    pub fn kubelet(&self, node: &str) -> &Kubelet {
        self.kubelets
            .iter()
            .find(|k| k.node_name() == node)
            .unwrap_or_else(|| panic!("no kubelet for node {node}"))
    }

    pub fn kubelets(&self) -> &[Kubelet] {
        &self.kubelets
    }

    /// The node's filesystem root (`<scope dir>/<node>`).
    pub fn node_root(&self, node: &str) -> PathBuf {
        self.cluster.scope().dir().join(node)
    }

    /// The scope's scratch directory (captures, logs).
    pub fn dir(&self) -> &Path {
        self.cluster.scope().dir()
    }

    /// kubeconfig for tools in the root netns (kubectl).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubectl_config
    }

    /// The CA root certificate (PEM).
    pub fn ca_root_pem(&self) -> &str {
        &self.ca_root_pem
    }

    /// Path of the node's primary CNI config file.
    pub fn primary_cni_config_path(&self, node: &str) -> PathBuf {
        let n = self
            .cluster
            .node_named(node)
            .unwrap_or_else(|| panic!("no node {node}"));
        self.node_root(node)
            .join("etc/cni/net.d")
            .join(self.primary_cni_config(n).0)
    }

    // ---- pods ------------------------------------------------------------

    /// Creates a namespace with `labels` (through the API).
    pub fn create_namespace(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), HarnessError> {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.create(json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "labels": labels}}))
            .map(|_| ())
    }

    /// Creates a ServiceAccount unless it exists.
    pub fn ensure_service_account(&self, namespace: &str, name: &str) -> Result<(), HarnessError> {
        if self
            .api
            .get("v1", "ServiceAccount", Some(namespace), name)
            .is_ok()
        {
            return Ok(());
        }
        self.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                           "metadata": {"name": name, "namespace": namespace}}))
            .map(|_| ())
    }

    /// Creates a workload pod (and its service account); does not wait.
    pub fn create_workload(&self, spec: &WorkloadSpec) -> Result<(), HarnessError> {
        self.ensure_service_account(&spec.namespace, &spec.service_account)?;
        self.create(spec.to_pod()).map(|_| ())
    }

    /// Creates a workload pod and waits until it is Running and Ready.
    pub fn run_workload(
        &self,
        spec: &WorkloadSpec,
        timeout: Duration,
    ) -> Result<PodInfo, HarnessError> {
        self.create_workload(spec)?;
        self.wait_ready(&spec.namespace, &spec.name, timeout)
    }

    /// The kubelet's view of a pod, searching every node.
    pub fn pod_info(&self, namespace: &str, name: &str) -> Option<(String, PodInfo)> {
        self.kubelets.iter().find_map(|k| {
            k.pod(namespace, name)
                .map(|p| (k.node_name().to_string(), p))
        })
    }

    /// Waits until the pod runs and is ready on whichever node it is bound to.
    pub fn wait_ready(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<PodInfo, HarnessError> {
        let node = self
            .api
            .get("v1", "Pod", Some(namespace), name)
            .ok()
            .and_then(|p| {
                p.pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| HarnessError::Pod {
                pod: format!("{namespace}/{name}"),
                reason: "no such pod bound to a node".into(),
            })?;
        self.kubelet(&node)
            .wait_ready(namespace, name, timeout)
            .map_err(|e| HarnessError::Pod {
                pod: format!("{namespace}/{name}"),
                reason: format!("{e}\n{}", self.diagnostics()),
            })
    }

    /// Deletes a pod through the API (the kubelet tears it down).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), HarnessError> {
        self.api
            .delete("v1", "Pod", Some(namespace), name)
            .map(|_| ())
            .map_err(|e| HarnessError::Pod {
                pod: format!("{namespace}/{name}"),
                reason: format!("delete: {e}"),
            })
    }

    /// The pod's network namespace (opened; not removed on drop).
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Result<NamedNetns, HarnessError> {
        let fail = |reason: String| HarnessError::Pod {
            pod: format!("{namespace}/{name}"),
            reason,
        };
        let (_, info) = self
            .pod_info(namespace, name)
            .ok_or_else(|| fail("not running on any node".into()))?;
        let ns = info
            .netns
            .ok_or_else(|| fail("has no pod netns (hostNetwork or no sandbox yet)".into()))?;
        NamedNetns::open(&ns).map_err(|e| fail(e.to_string()))
    }

    /// The pod's IP (from the kubelet).
    pub fn pod_ip(&self, namespace: &str, name: &str) -> Result<IpAddr, HarnessError> {
        self.pod_info(namespace, name)
            .and_then(|(_, p)| p.ip)
            .ok_or_else(|| HarnessError::Pod {
                pod: format!("{namespace}/{name}"),
                reason: "has no IP".into(),
            })
    }

    /// Runs `f` on a thread inside the pod's netns (sockets it opens are
    /// the pod's).
    pub fn in_pod<T: Send>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce() -> T + Send,
    ) -> Result<T, HarnessError> {
        let ns = self.pod_netns(namespace, name)?;
        ns.run(f).map_err(|e| HarnessError::Pod {
            pod: format!("{namespace}/{name}"),
            reason: e.to_string(),
        })
    }

    /// Value of a pod annotation.
    pub fn annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        self.api
            .get("v1", "Pod", Some(namespace), name)
            .ok()?
            .pointer("/metadata/annotations")?
            .get(key)?
            .as_str()
            .map(str::to_string)
    }
}

/// Pod name the harness's "DaemonSet controller" gives `workload` on `node`.
pub fn component_pod_name(workload: &str, node: &str) -> String {
    format!("{workload}-{node}")
}

/// Image reference used in the informational workload templates.
const NODE_AGENT_IMAGE_REF: &str = components::NODE_AGENT_IMAGE;

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        for k in self.kubelets.iter_mut() {
            k.shutdown();
        }
        if let Some(h) = cgroup::hierarchy() {
            cgroup::remove_tree(&h.join(self.cluster.scope().prefix()));
        }
    }
}
