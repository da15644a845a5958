//! The "kubelet": pods created in the API, given a netns, wired by the CNI chain the
//! agent chained into (reference plugins + `istio-cni`), reported Running with their IP,
//! and torn down again.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::netsim::NamedNetns;
use serde_json::{Value, json};

use super::{Env, REFERENCE_PLUGINS, time_scale};

pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub netns: NamedNetns,
    pub ip: Ipv4Addr,
    pub container: String,
}

impl Env {
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
        let run = |command: &str, plugin: &Value, prev: Option<&Value>| {
            self.run_plugin(
                command, &conflist, plugin, prev, namespace, name, uid, netns, container,
            )
        };
        for plugin in conflist["plugins"].as_array().cloned().unwrap_or_default() {
            match run("ADD", &plugin, prev.as_ref()) {
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
                        let _ = run("DEL", p, prev.as_ref());
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
}
