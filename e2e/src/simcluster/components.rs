//! Pod objects: the chart's components (from [`super::chart`] plus the
//! template facts the golden files do not list) and the test workloads.
//!
//! Added from the chart templates (`charts/geneva-mesh/templates/*`):
//! labels and annotations, image names, container ports, readiness probes
//! (`/readyz` on 8000 for the agent and the CA, `/healthz/ready` on 15021
//! for ztunnel), termination grace periods, ztunnel's `runAsGroup: 1337`
//! and `allowPrivilegeEscalation`, the CA's pod-level `runAsUser`/
//! `runAsGroup` 65532, and the projected token (`audience: istio-ca`,
//! `expirationSeconds: 43200`, `path: istio-token`). Volume names are
//! derived from mount paths (the golden files do not name volumes).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};

use super::chart::{ChartContainer, EnvValue, MountSource};
use crate::workloads;

/// The chart's release namespace in the harness.
pub const SYSTEM_NAMESPACE: &str = "istio-system";
/// Workload names (DaemonSets / Deployment) of the chart.
pub const NODE_AGENT: &str = "node-agent";
pub const ZTUNNEL: &str = "ztunnel";
pub const MESH_CA: &str = "mesh-ca";
/// Image references (kubelet-lite maps them to the built binaries).
pub const ZTUNNEL_IMAGE: &str = "localhost/geneva-mesh/ztunnel:dev";
pub const NODE_AGENT_IMAGE: &str = "localhost/geneva-mesh/node-agent:dev";

/// A volume name for a mount path (`/host/opt/cni/bin` → `host-opt-cni-bin`).
pub fn volume_name(path: &str) -> String {
    let s: String = path
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() { "root".into() } else { s }
}

fn host_path_type(path: &str) -> &'static str {
    match path {
        "/proc" | "/proc/sys/net" => "Directory",
        "/run/xtables.lock" => "FileOrCreate",
        _ => "DirectoryOrCreate",
    }
}

/// The Pod a DaemonSet/Deployment of the chart would create for `c` on
/// `node`. `env_overrides` replace (or add) environment values;
/// `host_aliases` become the pod's `hostAliases`.
pub fn component_pod(
    c: &ChartContainer,
    pod_name: &str,
    node: &str,
    redirect_mode: &str,
    env_overrides: &[(String, String)],
    host_aliases: &[(IpAddr, Vec<String>)],
) -> Value {
    let workload = c.workload_name.as_str();
    let mut env: Vec<Value> = Vec::new();
    for (k, v) in &c.env {
        if env_overrides.iter().any(|(o, _)| o == k) {
            continue;
        }
        env.push(match v {
            EnvValue::Literal(s) => json!({"name": k, "value": s}),
            EnvValue::FieldRef(p) => {
                json!({"name": k, "valueFrom": {"fieldRef": {"fieldPath": p}}})
            }
            EnvValue::ResourceFieldRef(c, r) => json!({"name": k, "valueFrom":
                {"resourceFieldRef": {"containerName": c, "resource": r, "divisor": "1"}}}),
        });
    }
    for (k, v) in env_overrides {
        env.push(json!({"name": k, "value": v}));
    }
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for m in &c.mounts {
        let name = volume_name(&m.path);
        let source = match &m.source {
            MountSource::HostPath(p) => json!({"hostPath": {"path": p, "type": host_path_type(p)}}),
            MountSource::EmptyDir => json!({"emptyDir": {}}),
            MountSource::Secret(s) => json!({"secret": {"secretName": s}}),
            MountSource::ConfigMap(s) => json!({"configMap": {"name": s}}),
            MountSource::Projected => json!({"projected": {"sources": [{"serviceAccountToken": {
                "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}}),
        };
        let mut v = json!({"name": name});
        v.as_object_mut()
            .unwrap()
            .extend(source.as_object().unwrap().clone());
        volumes.push(v);
        mounts.push(json!({"name": name, "mountPath": m.path, "readOnly": m.read_only}));
    }
    let (labels, annotations, image, probe, ports, grace) = match workload {
        ZTUNNEL => (
            json!({"app": ZTUNNEL, "istio.io/dataplane-mode": "none", "sidecar.istio.io/inject": "false"}),
            json!({"ambient.istio.io/redirection": "disabled", "prometheus.io/scrape": "true",
                   "prometheus.io/port": "15020"}),
            ZTUNNEL_IMAGE,
            json!({"httpGet": {"path": "/healthz/ready", "port": 15021},
                   "initialDelaySeconds": 1, "periodSeconds": 5, "failureThreshold": 2}),
            json!([{"name": "http-metrics", "containerPort": 15020},
                   {"name": "http-health", "containerPort": 15021}]),
            30,
        ),
        MESH_CA => (
            json!({"app": MESH_CA}),
            json!({"prometheus.io/scrape": "true", "prometheus.io/port": "15014"}),
            NODE_AGENT_IMAGE,
            json!({"httpGet": {"path": "/readyz", "port": 8000},
                   "initialDelaySeconds": 1, "periodSeconds": 5}),
            json!([{"name": "grpc", "containerPort": 15012}, {"name": "http-ready", "containerPort": 8000}]),
            30,
        ),
        _ => (
            json!({"app": NODE_AGENT, "istio.io/dataplane-mode": "none", "sidecar.istio.io/inject": "false"}),
            json!({"prometheus.io/scrape": "true", "prometheus.io/port": "15014"}),
            NODE_AGENT_IMAGE,
            json!({"httpGet": {"path": "/readyz", "port": 8000},
                   "initialDelaySeconds": 1, "periodSeconds": 5, "failureThreshold": 2}),
            json!([{"name": "http-ready", "containerPort": 8000},
                   {"name": "http-metrics", "containerPort": 15014}]),
            30,
        ),
    };
    let mut security = json!({
        "runAsUser": c.uid,
        "capabilities": {"drop": ["ALL"], "add": c.capabilities},
    });
    if workload == ZTUNNEL {
        security["runAsGroup"] = json!(1337);
        security["allowPrivilegeEscalation"] = json!(redirect_mode == "inpod");
    } else if workload == MESH_CA {
        security["allowPrivilegeEscalation"] = json!(false);
    }
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": SYSTEM_NAMESPACE,
                     "labels": labels, "annotations": annotations},
        "spec": {
            "nodeName": node,
            "serviceAccountName": workload,
            "hostNetwork": c.host_network,
            "terminationGracePeriodSeconds": grace,
            "containers": [{
                "name": c.container,
                "image": image,
                "command": [c.command[0]],
                "args": c.command[1..],
                "env": env,
                "ports": ports,
                "readinessProbe": probe,
                "securityContext": security,
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    });
    if c.host_network {
        pod["spec"]["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    }
    if workload == MESH_CA {
        pod["spec"]["securityContext"] = json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532});
    }
    if !host_aliases.is_empty() {
        pod["spec"]["hostAliases"] = host_aliases
            .iter()
            .map(|(ip, names)| json!({"ip": ip.to_string(), "hostnames": names}))
            .collect();
    }
    pod
}

/// A test application pod.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// `e2e-workload` arguments, e.g. `["echo"]`.
    pub args: Vec<String>,
    /// TCP readiness probe on this port (servers).
    pub readiness_port: Option<u16>,
}

impl WorkloadSpec {
    /// An echo server on [`workloads::DEFAULT_PORT`] (label `app=<name>`).
    pub fn server(namespace: &str, name: &str, node: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            service_account: service_account.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            args: vec!["echo".into()],
            readiness_port: Some(workloads::DEFAULT_PORT),
        }
    }

    /// A pod whose container only idles (tests connect from its netns):
    /// `e2e-workload echo` as well, so it also answers.
    pub fn client(namespace: &str, name: &str, node: &str, service_account: &str) -> Self {
        Self::server(namespace, name, node, service_account)
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn to_pod(&self) -> Value {
        let mut c = json!({
            "name": "app",
            "image": workloads::IMAGE,
            "command": [workloads::ENTRYPOINT],
            "args": self.args,
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "ports": [{"name": "echo", "containerPort": workloads::DEFAULT_PORT}],
        });
        if let Some(p) = self.readiness_port {
            c["readinessProbe"] = json!({"tcpSocket": {"port": p}, "periodSeconds": 1});
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {
                "nodeName": self.node,
                "serviceAccountName": self.service_account,
                "terminationGracePeriodSeconds": 1,
                "containers": [c],
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simcluster::chart;

    #[test]
    fn volume_names_are_dns_labels() {
        assert_eq!(volume_name("/host/opt/cni/bin"), "host-opt-cni-bin");
        assert_eq!(volume_name("/run/xtables.lock"), "run-xtables-lock");
        assert_eq!(volume_name("/"), "root");
    }

    /// The environment, command, user and capabilities the kubelet gives
    /// each component equal the chart's golden files, with exactly two
    /// documented differences: values that are paths under a volume mount
    /// point at the host directory backing that mount (hostPath per node,
    /// other volumes in the pod directory), and the kubelet adds
    /// `KUBECONFIG` (and a default `PATH`).
    #[test]
    fn kubelet_runs_components_with_the_charts_environment() {
        use crate::kubelet::container::{LaunchContext, cap_names, launch_spec};
        use crate::kubelet::volumes::{Images, NodeFs};
        use std::collections::{BTreeMap, BTreeSet};
        use std::path::{Path, PathBuf};

        let node = NodeFs { root: "/n1".into() };
        let mut images = Images::default();
        images.add_file("ztunnel", "/usr/local/bin/ztunnel", "/bin/ztunnel-built");
        images.add_file(
            "node-agent",
            "/usr/local/bin/node-agent",
            "/bin/node-agent-built",
        );
        images.add_file(
            "node-agent",
            "/opt/istio-cni/bin/istio-cni",
            "/bin/istio-cni-built",
        );
        let injected = [("KUBECONFIG".to_string(), "/k".to_string())];
        for mode in ["inpod", "geneve"] {
            let g = chart::golden(mode).unwrap();
            for w in [NODE_AGENT, ZTUNNEL, MESH_CA] {
                let c = g.workload(w).unwrap();
                let v = component_pod(c, "p", "node1", mode, &[], &[]);
                let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).unwrap();
                let spec = pod.spec.as_ref().unwrap();
                // Backing paths as kubelet-lite's volumes::prepare chooses them.
                let mut volumes = BTreeMap::new();
                for vol in spec.volumes.iter().flatten() {
                    let path = match &vol.host_path {
                        Some(h) => node.host_path(&h.path),
                        None => PathBuf::from("/pod/volumes").join(&vol.name),
                    };
                    volumes.insert(vol.name.clone(), path);
                }
                let ip: IpAddr = if c.host_network {
                    "172.30.0.11"
                } else {
                    "10.244.1.9"
                }
                .parse()
                .unwrap();
                let ctx = LaunchContext {
                    pod_ip: Some(ip),
                    host_ip: "172.30.0.11".parse().unwrap(),
                    volumes: &volumes,
                    images: &images,
                    injected_env: &injected,
                };
                let l = launch_spec(&pod, &spec.containers[0], &ctx).unwrap();
                let env: BTreeMap<String, String> = l.env.iter().cloned().collect();
                let what = format!("{mode} {w}");
                for (k, gv) in &c.env {
                    let want = match gv {
                        EnvValue::FieldRef(p) => match p.as_str() {
                            "metadata.name" => "p".to_string(),
                            "metadata.namespace" => SYSTEM_NAMESPACE.to_string(),
                            "spec.nodeName" => "node1".to_string(),
                            "status.podIP" => ip.to_string(),
                            other => panic!("{what}: fieldRef {other} not covered"),
                        },
                        // No limit or request on the component pod: the node's CPUs for
                        // the limit and 0 for the request, as kubelet.
                        EnvValue::ResourceFieldRef(_, r) => match r.as_str() {
                            "limits.cpu" => std::thread::available_parallelism()
                                .unwrap()
                                .get()
                                .to_string(),
                            "requests.cpu" => "0".to_string(),
                            other => panic!("{what}: resourceFieldRef {other} not covered"),
                        },
                        EnvValue::Literal(s) => {
                            // A path under a mount: the mount's backing path.
                            let m = c
                                .mounts
                                .iter()
                                .filter(|m| Path::new(s).starts_with(&m.path))
                                .max_by_key(|m| m.path.len());
                            match m {
                                Some(m) => {
                                    let rest = Path::new(s).strip_prefix(&m.path).unwrap();
                                    let base = match &m.source {
                                        MountSource::HostPath(h) => node.host_path(h),
                                        _ => {
                                            PathBuf::from("/pod/volumes").join(volume_name(&m.path))
                                        }
                                    };
                                    let p = if rest.as_os_str().is_empty() {
                                        base
                                    } else {
                                        base.join(rest)
                                    };
                                    p.display().to_string()
                                }
                                None if s == "/opt/istio-cni/bin/istio-cni" => {
                                    "/bin/istio-cni-built".into()
                                }
                                None => s.clone(),
                            }
                        }
                    };
                    assert_eq!(env.get(k), Some(&want), "{what}: {k}");
                }
                let names: BTreeSet<&str> = env.keys().map(String::as_str).collect();
                let mut golden: BTreeSet<&str> = c.env.iter().map(|(k, _)| k.as_str()).collect();
                golden.extend(["KUBECONFIG", "PATH"]);
                assert_eq!(names, golden, "{what}: variable names");
                assert!(l.program.starts_with("/bin/"), "{what}: {:?}", l.program);
                assert_eq!(l.args, c.command[1..], "{what}: arguments");
                assert_eq!(l.user, Some(c.uid), "{what}: user");
                let caps: BTreeSet<&str> = cap_names(l.capabilities.unwrap()).into_iter().collect();
                let want: BTreeSet<&str> = c.capabilities.iter().map(String::as_str).collect();
                assert_eq!(caps, want, "{what}: capabilities");
            }
        }
    }

    #[test]
    fn component_pods_parse_as_pods() {
        for mode in ["inpod", "geneve"] {
            let g = chart::golden(mode).unwrap();
            for w in [NODE_AGENT, ZTUNNEL, MESH_CA] {
                let c = g.workload(w).unwrap();
                let v = component_pod(c, &format!("{w}-x"), "node1", mode, &[], &[]);
                let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).unwrap();
                let spec = p.spec.unwrap();
                assert_eq!(spec.containers[0].env.as_ref().unwrap().len(), c.env.len());
                assert_eq!(spec.volumes.as_ref().map_or(0, Vec::len), c.mounts.len());
            }
        }
    }
}
