//! The node, the API, the agent: [`Env`] sets up one simulated node with the API double
//! reachable from it and the node's primary CNI config, and runs the real `node-agent`
//! binary (and the ZDS client) there.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use e2e::apiserver::{ApiServer, ApiServerHandle, write_kubeconfig_for};
use e2e::netsim::{Cluster, Node, Process};
use serde_json::{Value, json};

use super::zds_client::Ztunnel;
use super::{AGENT_NS, wait_for};

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

    /// HTTP GET to the agent (`127.0.0.1:port`) inside the node netns; (status, body).
    pub fn agent_http(&self, port: u16, path: &str) -> Option<(u16, String)> {
        e2e::dedicated_mesh::http_get(self.node().netns(), port, path)
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
