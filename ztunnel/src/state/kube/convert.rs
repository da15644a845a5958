//! Pure conversions from Kubernetes objects to compact facts, and from facts to the
//! store's [`Workload`] and [`Service`] (what istiod would send over xDS).
//!
//! - A pod becomes a workload when it has an IP and has not terminated. Its uid is
//!   upstream's `<cluster>//v1/Pod/<namespace>/<name>`; protocol HBONE when the node
//!   agent annotated it `ambient.istio.io/redirection: enabled`, else TCP; healthy
//!   when its Ready condition is True (also while terminating, as istiod).
//! - Workload name and type from the controller owner (a ReplicaSet named
//!   `<deployment>-<pod-template-hash>` means a Deployment; a Job named
//!   `<cronjob>-<8+ digits>` a CronJob); canonical service and revision from
//!   Istio's labels, in Istio's order of precedence.
//! - A Service becomes `<name>.<namespace>.svc.<cluster domain>` with its cluster
//!   IPs as VIPs and its TCP ports; a numeric `targetPort` is kept, a named one is
//!   resolved per endpoint (EndpointSlice port of the same name, else the pod's
//!   container port of that name).
//! - EndpointSlices (label `kubernetes.io/service-name`) give service membership:
//!   each endpoint whose `targetRef` is a Pod. Every other endpoint (no `targetRef`, or
//!   another kind: `default/kubernetes`, Services without a selector) becomes a workload of
//!   its own, as istiod makes it: uid `<cluster>/discovery.k8s.io/EndpointSlice/<ns>/<slice>/<ip>`,
//!   host network (its address may be shared), plain TCP, no service account, healthy unless
//!   `conditions.ready` is false, with the slice's ports joined to the Service's by name.
//! - A pod's locality is its node's (`topology.kubernetes.io/region`,
//!   `topology.kubernetes.io/zone`, `topology.istio.io/subzone` labels), as istiod
//!   gives it to ambient workloads; unknown while the node is not known.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::state::workload::{
    HealthStatus, LoadBalancer, LoadBalancerMode, LoadBalancerScope, Locality, NetworkMode,
    PortMap, Protocol, Service, Workload,
};

/// Pod annotation set by the node agent once redirection is in place.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Label binding a namespace, Service or pod to a waypoint. Kubernetes discovery does not
/// resolve waypoints (istiod's job); a pod or Service carrying it is warned about, since its
/// traffic then goes directly to the endpoints and waypoint policies are not enforced.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Node labels a workload's locality comes from (Kubernetes' and Istio's).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

/// Settings the conversions need.
#[derive(Debug, Clone)]
pub struct ConvertSettings {
    pub trust_domain: String,
    pub cluster_id: String,
    /// Service hostnames are `<name>.<namespace>.svc.<cluster_domain>`.
    pub cluster_domain: String,
}

/// What discovery keeps of a pod (everything a workload is built from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub hbone: bool,
    pub host_network: bool,
    pub ready: bool,
    pub deleting: bool,
    pub terminated: bool,
    /// `(kind, name)` of the controller owner.
    pub controller: Option<(String, String)>,
    /// Container port name → port (TCP).
    pub named_ports: BTreeMap<String, u16>,
}

impl PodFacts {
    pub fn from_pod(pod: &Pod) -> PodFacts {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let phase = status.and_then(|s| s.phase.as_deref());
        let controller = meta.owner_references.as_ref().and_then(|refs| {
            refs.iter()
                .find(|r| r.controller == Some(true))
                .map(|r| (r.kind.clone(), r.name.clone()))
        });
        let mut named_ports = BTreeMap::new();
        for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            for p in c.ports.as_deref().unwrap_or_default() {
                if let Some(name) = &p.name
                    && is_tcp(p.protocol.as_deref())
                    && let Ok(port) = u16::try_from(p.container_port)
                {
                    named_ports.insert(name.clone(), port);
                }
            }
        }
        PodFacts {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips,
            hbone: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .is_some_and(|v| v == "enabled"),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ready,
            deleting: meta.deletion_timestamp.is_some(),
            terminated: matches!(phase, Some("Succeeded") | Some("Failed")),
            controller,
            named_ports,
        }
    }

    pub fn key(&self) -> ObjectKey {
        (self.namespace.clone(), self.name.clone())
    }

    /// Whether the pod is a workload at all (has an address, still running).
    pub fn is_workload(&self) -> bool {
        !self.ips.is_empty() && !self.terminated
    }

    /// `(workload type, workload name)` as Istio derives them.
    pub fn workload_name_and_type(&self) -> (String, String) {
        match &self.controller {
            None => ("pod".into(), self.name.clone()),
            Some((kind, name)) if kind == "ReplicaSet" => {
                match self.labels.get(POD_TEMPLATE_HASH) {
                    Some(hash) if name.ends_with(&format!("-{hash}")) => (
                        "deployment".into(),
                        name[..name.len() - hash.len() - 1].to_string(),
                    ),
                    _ => ("replicaset".into(), name.clone()),
                }
            }
            Some((kind, name)) if kind == "Job" => match name.rsplit_once('-') {
                Some((cron, stamp))
                    if stamp.len() >= 8 && stamp.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    ("cronjob".into(), cron.to_string())
                }
                _ => ("job".into(), name.clone()),
            },
            Some((kind, name)) => (kind.to_ascii_lowercase(), name.clone()),
        }
    }

    /// Canonical service name and revision (Istio's label precedence).
    pub fn canonical(&self, workload_name: &str) -> (String, String) {
        let first = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| self.labels.get(*k).filter(|v| !v.is_empty()).cloned())
        };
        let name = first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload_name.to_string());
        let revision = first(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_string());
        (name, revision)
    }
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortFacts {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// What discovery keeps of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    /// TCP ports only (ztunnel proxies TCP).
    pub ports: Vec<ServicePortFacts>,
    /// `type: ExternalName` (no VIP, no endpoints: not a mesh service).
    pub external_name: bool,
    /// Label `istio.io/use-waypoint` (not acted on: see [`USE_WAYPOINT_LABEL`]).
    pub use_waypoint: Option<String>,
    /// Endpoint preference from `internalTrafficPolicy` / `trafficDistribution`.
    pub load_balancer: Option<LoadBalancer>,
}

impl ServiceFacts {
    pub fn from_service(svc: &KubeService) -> ServiceFacts {
        let spec = svc.spec.as_ref();
        let mut cluster_ips: Vec<IpAddr> = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .map(|v| v.iter().filter_map(|ip| ip.parse().ok()).collect())
            .unwrap_or_default();
        if cluster_ips.is_empty()
            && let Some(ip) = spec
                .and_then(|s| s.cluster_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
        {
            cluster_ips.push(ip);
        }
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter(|p| is_tcp(p.protocol.as_deref()))
                    .filter_map(|p| {
                        let port = u16::try_from(p.port).ok()?;
                        let target = match &p.target_port {
                            None => TargetPort::Number(port),
                            Some(IntOrString::Int(n)) => {
                                TargetPort::Number(u16::try_from(*n).unwrap_or(port))
                            }
                            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                                Ok(n) => TargetPort::Number(n),
                                Err(_) => TargetPort::Name(s.clone()),
                            },
                        };
                        Some(ServicePortFacts {
                            name: p.name.clone().unwrap_or_default(),
                            port,
                            target,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        ServiceFacts {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
            cluster_ips,
            ports,
            external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
            load_balancer: load_balancer_of(spec),
            use_waypoint: svc
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(USE_WAYPOINT_LABEL))
                .cloned(),
        }
    }

    pub fn key(&self) -> ObjectKey {
        (self.namespace.clone(), self.name.clone())
    }

    pub fn hostname(&self, cluster_domain: &str) -> String {
        format!("{}.{}.svc.{cluster_domain}", self.name, self.namespace)
    }

    /// The store's service.
    pub fn to_service(&self, settings: &ConvertSettings) -> Service {
        Service {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: self.hostname(&settings.cluster_domain),
            vips: self
                .cluster_ips
                .iter()
                .map(|ip| crate::state::NetworkAddress::new("", *ip))
                .collect(),
            ports: self
                .ports
                .iter()
                .map(|p| match p.target {
                    TargetPort::Number(n) => (p.port, n),
                    // Resolved per endpoint.
                    TargetPort::Name(_) => (p.port, 0),
                })
                .collect(),
            subject_alt_names: Vec::new(),
            waypoint: None,
            canonical: true,
            load_balancer: self.load_balancer.clone(),
            ip_families: None,
        }
    }
}

/// As istiod: `internalTrafficPolicy: Local` = only endpoints on the client's node
/// (none there: no endpoint, like kube-proxy); `trafficDistribution: PreferClose` = the
/// closest endpoints (network, region, zone, subzone), others when none are close;
/// `publishNotReadyAddresses: true` = unready endpoints are picked too (`AllowAll`).
fn load_balancer_of(
    spec: Option<&k8s_openapi::api::core::v1::ServiceSpec>,
) -> Option<LoadBalancer> {
    let spec = spec?;
    let health_policy = (spec.publish_not_ready_addresses == Some(true))
        .then(|| serde_yaml_ng::Value::String("AllowAll".into()));
    let (routing_preferences, mode) = if spec.internal_traffic_policy.as_deref() == Some("Local") {
        (vec![LoadBalancerScope::Node], LoadBalancerMode::Strict)
    } else if spec.traffic_distribution.as_deref() == Some("PreferClose") {
        (
            vec![
                LoadBalancerScope::Network,
                LoadBalancerScope::Region,
                LoadBalancerScope::Zone,
                LoadBalancerScope::Subzone,
            ],
            LoadBalancerMode::Failover,
        )
    } else if health_policy.is_some() {
        (Vec::new(), LoadBalancerMode::Standard)
    } else {
        return None;
    };
    Some(LoadBalancer {
        routing_preferences,
        mode,
        health_policy,
    })
}

/// What discovery keeps of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: Option<String>,
    /// Port name (`""` when unnamed) → endpoint port.
    pub ports: BTreeMap<String, u16>,
    /// Pods referenced by the endpoints.
    pub pods: Vec<ObjectKey>,
    /// Endpoints that are not pods: first address and readiness.
    pub others: Vec<(IpAddr, bool)>,
}

impl SliceFacts {
    pub fn from_slice(slice: &EndpointSlice) -> SliceFacts {
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let usable = slice.address_type == "IPv4" || slice.address_type == "IPv6";
        let ports = slice
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let mut pods: Vec<ObjectKey> = if usable {
            slice
                .endpoints
                .as_deref()
                .unwrap_or_default()
                .iter()
                .filter_map(|e| e.target_ref.as_ref())
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .filter_map(|r| {
                    Some((
                        r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                        r.name.clone()?,
                    ))
                })
                .collect()
        } else {
            Vec::new()
        };
        pods.sort();
        pods.dedup();
        let mut others: Vec<(IpAddr, bool)> = Vec::new();
        if usable {
            for e in slice.endpoints.as_deref().unwrap_or_default() {
                if e.target_ref.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod") {
                    continue;
                }
                let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    continue;
                };
                if others.iter().any(|(seen, _)| *seen == ip) {
                    continue;
                }
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                others.push((ip, ready));
            }
        }
        SliceFacts {
            service: slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned(),
            namespace,
            name: slice.metadata.name.clone().unwrap_or_default(),
            ports,
            pods,
            others,
        }
    }

    pub fn key(&self) -> ObjectKey {
        (self.namespace.clone(), self.name.clone())
    }

    /// The Service key, when the slice names one.
    pub fn service_key(&self) -> Option<ObjectKey> {
        self.service
            .as_ref()
            .map(|s| (self.namespace.clone(), s.clone()))
    }
}

/// Service port → target port of `pod` as an endpoint of `svc` through `slice`.
pub fn endpoint_ports(svc: &ServiceFacts, slice: &SliceFacts, pod: &PodFacts) -> PortMap {
    let mut out = HashMap::new();
    for p in &svc.ports {
        let target = match slice.ports.get(&p.name) {
            Some(port) => Some(*port),
            None => match &p.target {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => pod.named_ports.get(name).copied(),
            },
        };
        match target {
            Some(t) => {
                out.insert(p.port, t);
            }
            None => tracing::debug!(
                service = %format!("{}/{}", svc.namespace, svc.name),
                pod = %format!("{}/{}", pod.namespace, pod.name),
                port = p.port,
                "named target port not found on the pod; port skipped for this endpoint"
            ),
        }
    }
    out
}

/// Upstream's uid of the workload of a non-pod endpoint.
pub fn slice_workload_uid(cluster_id: &str, slice: &SliceFacts, ip: IpAddr) -> String {
    format!(
        "{cluster_id}/discovery.k8s.io/EndpointSlice/{}/{}/{ip}",
        slice.namespace, slice.name
    )
}

/// The workloads of `slice`'s endpoints that are not pods (see the module docs), as
/// endpoints of `svc`.
pub fn slice_workloads(
    svc: &ServiceFacts,
    slice: &SliceFacts,
    settings: &ConvertSettings,
) -> Vec<Workload> {
    let ports: PortMap = svc
        .ports
        .iter()
        .filter_map(|p| slice.ports.get(&p.name).map(|t| (p.port, *t)))
        .collect();
    let services: HashMap<String, PortMap> = [(
        format!(
            "{}/{}",
            svc.namespace,
            svc.hostname(&settings.cluster_domain)
        ),
        ports,
    )]
    .into();
    slice
        .others
        .iter()
        .map(|(ip, ready)| Workload {
            uid: slice_workload_uid(&settings.cluster_id, slice, *ip),
            name: slice.name.clone(),
            namespace: slice.namespace.clone(),
            service_account: String::new(),
            trust_domain: settings.trust_domain.clone(),
            workload_ips: vec![*ip],
            protocol: Protocol::TCP,
            network_mode: NetworkMode::HostNetwork,
            node: String::new(),
            network: String::new(),
            services: services.clone(),
            waypoint: None,
            network_gateway: None,
            workload_name: String::new(),
            workload_type: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            hostname: String::new(),
            native_tunnel: false,
            application_tunnel: None,
            authorization_policies: Vec::new(),
            status: if *ready {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            },
            cluster_id: settings.cluster_id.clone(),
            locality: Locality::default(),
            capacity: 1,
        })
        .collect()
}

/// The store's workload for `pod`. `services` is the membership map
/// (`"<ns>/<hostname>"` → ports); `policies` the bound selector policies.
/// The locality a node's labels give the pods on it (`None`: the node has none of
/// the topology labels).
pub fn node_locality(labels: Option<&BTreeMap<String, String>>) -> Option<Locality> {
    let get = |k: &str| labels.and_then(|l| l.get(k)).cloned().unwrap_or_default();
    let locality = Locality {
        region: get(REGION_LABEL),
        zone: get(ZONE_LABEL),
        subzone: get(SUBZONE_LABEL),
    };
    (locality != Locality::default()).then_some(locality)
}

/// `pod` as a workload; `locality` is its node's.
pub fn to_workload(
    pod: &PodFacts,
    settings: &ConvertSettings,
    services: HashMap<String, PortMap>,
    policies: Vec<String>,
    locality: Locality,
) -> Workload {
    let (workload_type, workload_name) = pod.workload_name_and_type();
    let (canonical_name, canonical_revision) = pod.canonical(&workload_name);
    Workload {
        uid: workload_uid(&settings.cluster_id, &pod.namespace, &pod.name),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        trust_domain: settings.trust_domain.clone(),
        workload_ips: pod.ips.clone(),
        protocol: if pod.hbone && !pod.host_network {
            Protocol::HBONE
        } else {
            Protocol::TCP
        },
        network_mode: if pod.host_network {
            NetworkMode::HostNetwork
        } else {
            NetworkMode::Standard
        },
        node: pod.node.clone(),
        network: String::new(),
        services,
        waypoint: None,
        network_gateway: None,
        workload_name,
        workload_type,
        canonical_name,
        canonical_revision,
        hostname: String::new(),
        native_tunnel: false,
        application_tunnel: None,
        authorization_policies: policies,
        // As istiod (IsPodReady): a terminating pod serves while it stays Ready (preStop
        // sleeps, single-replica workloads); kubelet clears Ready when it stops serving.
        status: if pod.ready {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        },
        cluster_id: settings.cluster_id.clone(),
        locality,
        capacity: 1,
    }
}

/// Upstream's workload uid for a pod.
pub fn workload_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("{cluster_id}//v1/Pod/{namespace}/{name}")
}

fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(extra: serde_json::Value) -> Pod {
        let mut base = serde_json::json!({
            "metadata": {
                "name": "web-7d9f8-abcde", "namespace": "app",
                "labels": {"app": "web", "pod-template-hash": "7d9f8"},
                "annotations": {"ambient.istio.io/redirection": "enabled"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d9f8", "uid": "rs", "controller": true}]
            },
            "spec": {
                "serviceAccountName": "web-sa", "nodeName": "node-1",
                "containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn settings() -> ConvertSettings {
        ConvertSettings {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    #[test]
    fn pod_to_workload() {
        let facts = PodFacts::from_pod(&pod_json(serde_json::json!({})));
        assert!(facts.is_workload());
        assert_eq!(facts.named_ports.get("http"), Some(&8080));
        assert!(
            !facts.named_ports.contains_key("dns"),
            "UDP ports are not kept"
        );
        let w = to_workload(
            &facts,
            &settings(),
            HashMap::new(),
            vec!["app/p".into()],
            Locality::default(),
        );
        assert_eq!(w.uid, "Kubernetes//v1/Pod/app/web-7d9f8-abcde");
        assert_eq!(w.service_account, "web-sa");
        assert_eq!(w.protocol, Protocol::HBONE);
        assert_eq!(w.workload_ips.len(), 2);
        assert_eq!(
            (w.workload_type.as_str(), w.workload_name.as_str()),
            ("deployment", "web")
        );
        assert_eq!(
            (w.canonical_name.as_str(), w.canonical_revision.as_str()),
            ("web", "latest")
        );
        assert_eq!(w.status, HealthStatus::Healthy);
        assert_eq!(w.node, "node-1");
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/app/sa/web-sa"
        );
        assert_eq!(w.authorization_policies, vec!["app/p".to_string()]);
    }

    #[test]
    fn pod_variants() {
        let not_ambient = PodFacts::from_pod(&pod_json(serde_json::json!({
            "metadata": {"annotations": {"ambient.istio.io/redirection": "disabled"}}})));
        assert!(!not_ambient.hbone);
        let unready = PodFacts::from_pod(&pod_json(serde_json::json!({
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}})));
        let w = to_workload(
            &unready,
            &settings(),
            HashMap::new(),
            vec![],
            Locality::default(),
        );
        assert_eq!(w.status, HealthStatus::Unhealthy);
        let deleting = PodFacts::from_pod(&pod_json(serde_json::json!({
            "metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}})));
        assert_eq!(
            to_workload(
                &deleting,
                &settings(),
                HashMap::new(),
                vec![],
                Locality::default()
            )
            .status,
            HealthStatus::Healthy,
            "terminating but still Ready: still an endpoint"
        );
        let done = PodFacts::from_pod(&pod_json(
            serde_json::json!({"status": {"phase": "Succeeded"}}),
        ));
        assert!(!done.is_workload());
        let pending = PodFacts::from_pod(&pod_json(serde_json::json!({
            "status": {"podIP": null, "podIPs": null, "phase": "Pending"}})));
        assert!(!pending.is_workload());
        let host = PodFacts::from_pod(&pod_json(
            serde_json::json!({"spec": {"hostNetwork": true}}),
        ));
        let w = to_workload(
            &host,
            &settings(),
            HashMap::new(),
            vec![],
            Locality::default(),
        );
        assert_eq!(
            (w.protocol, w.network_mode),
            (Protocol::TCP, NetworkMode::HostNetwork)
        );
        let default_sa = PodFacts::from_pod(&pod_json(serde_json::json!({
            "spec": {"serviceAccountName": null}})));
        assert_eq!(default_sa.service_account, "default");
    }

    #[test]
    fn workload_names_from_owners_and_canonical_labels() {
        let mut f = PodFacts::from_pod(&pod_json(serde_json::json!({})));
        for (controller, hash, want) in [
            (None, None, ("pod", "web-7d9f8-abcde")),
            (
                Some(("ReplicaSet", "web-7d9f8")),
                Some("7d9f8"),
                ("deployment", "web"),
            ),
            (
                Some(("ReplicaSet", "web-x")),
                Some("7d9f8"),
                ("replicaset", "web-x"),
            ),
            (
                Some(("Job", "backup-28910220")),
                None,
                ("cronjob", "backup"),
            ),
            (Some(("Job", "migrate-1")), None, ("job", "migrate-1")),
            (Some(("StatefulSet", "db")), None, ("statefulset", "db")),
            (Some(("DaemonSet", "agent")), None, ("daemonset", "agent")),
        ] {
            f.controller = controller.map(|(k, n)| (k.to_string(), n.to_string()));
            match hash {
                Some(h) => f.labels.insert(POD_TEMPLATE_HASH.into(), h.into()),
                None => f.labels.remove(POD_TEMPLATE_HASH),
            };
            let (t, n) = f.workload_name_and_type();
            assert_eq!((t.as_str(), n.as_str()), want);
        }
        f.labels = BTreeMap::from([
            ("app".to_string(), "a".to_string()),
            ("app.kubernetes.io/name".to_string(), "b".to_string()),
            ("version".to_string(), "v1".to_string()),
        ]);
        assert_eq!(f.canonical("wl"), ("b".to_string(), "v1".to_string()));
        f.labels
            .insert("service.istio.io/canonical-name".into(), "c".into());
        f.labels
            .insert("service.istio.io/canonical-revision".into(), "r".into());
        assert_eq!(f.canonical("wl"), ("c".to_string(), "r".to_string()));
        f.labels.clear();
        assert_eq!(f.canonical("wl"), ("wl".to_string(), "latest".to_string()));
    }

    #[test]
    fn service_and_slice_ports() {
        let svc: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "app"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http"},
                    {"name": "admin", "port": 9000, "targetPort": 9090},
                    {"name": "metrics", "port": 9100, "targetPort": "metrics"},
                    {"name": "plain", "port": 7000},
                    {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))
        .unwrap();
        let facts = ServiceFacts::from_service(&svc);
        let s = facts.to_service(&settings());
        assert_eq!(s.hostname, "web.app.svc.cluster.local");
        assert_eq!(s.vips.len(), 2);
        assert_eq!(s.ports.get(&80), Some(&0), "named: resolved per endpoint");
        assert_eq!(s.ports.get(&9000), Some(&9090));
        assert_eq!(s.ports.get(&7000), Some(&7000));
        assert!(!s.ports.contains_key(&53));

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "app",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}],
            "endpoints": [
                {"addresses": ["10.0.0.5"], "targetRef": {"kind": "Pod", "name": "web-7d9f8-abcde"}},
                {"addresses": ["10.0.0.9"]}]
        }))
        .unwrap();
        let sf = SliceFacts::from_slice(&slice);
        assert_eq!(sf.service_key(), Some(("app".into(), "web".into())));
        assert_eq!(
            sf.pods,
            vec![("app".to_string(), "web-7d9f8-abcde".to_string())]
        );
        let pod = PodFacts::from_pod(&pod_json(serde_json::json!({})));
        let ports = endpoint_ports(&facts, &sf, &pod);
        assert_eq!(ports.get(&80), Some(&8080), "from the slice");
        assert_eq!(ports.get(&9000), Some(&9090));
        assert_eq!(
            ports.get(&7000),
            Some(&7000),
            "not in the slice: numeric target"
        );
        assert!(
            !ports.contains_key(&9100),
            "named port the pod does not have"
        );

        // A slice without ports yet: named targets resolved from the pod's containers.
        let mut bare = sf.clone();
        bare.ports.clear();
        let ports = endpoint_ports(&facts, &bare, &pod);
        assert_eq!(
            ports.get(&80),
            Some(&8080),
            "from the container port named http"
        );
    }

    #[test]
    fn external_name_and_headless() {
        let ext: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ext", "namespace": "a"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}))
        .unwrap();
        assert!(ServiceFacts::from_service(&ext).external_name);
        let headless: KubeService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h", "namespace": "a"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}))
        .unwrap();
        let f = ServiceFacts::from_service(&headless);
        assert!(f.cluster_ips.is_empty() && !f.external_name);
    }

    #[test]
    fn node_labels_give_the_locality() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let full = labels(&[
            (REGION_LABEL, "eu-west1"),
            (ZONE_LABEL, "eu-west1-b"),
            (SUBZONE_LABEL, "rack7"),
            ("kubernetes.io/hostname", "n1"),
        ]);
        assert_eq!(
            node_locality(Some(&full)),
            Some(Locality {
                region: "eu-west1".into(),
                zone: "eu-west1-b".into(),
                subzone: "rack7".into(),
            })
        );
        let zone_only = labels(&[(ZONE_LABEL, "z1")]);
        let l = node_locality(Some(&zone_only)).unwrap();
        assert_eq!((l.region.as_str(), l.zone.as_str()), ("", "z1"));
        // The legacy failure-domain labels are not read (neither does istiod for ambient).
        let legacy = labels(&[("failure-domain.beta.kubernetes.io/zone", "z1")]);
        assert_eq!(node_locality(Some(&legacy)), None);
        assert_eq!(node_locality(None), None);
    }
}
