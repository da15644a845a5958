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
    /// `spec.ipFamilies` as istiod sends it (`IPv4`, `IPv6`, `Dual`; none when unset).
    pub ip_families: Option<&'static str>,
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
            ip_families: ip_families_of(spec),
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
            weighted_waypoints: Vec::new(),
            cidr_vips: Vec::new(),
            visibility: Default::default(),
            canonical: true,
            load_balancer: self.load_balancer.clone(),
            ip_families: self
                .ip_families
                .map(|f| serde_yaml_ng::Value::String(f.into())),
        }
    }
}

/// As istiod: two families are `Dual`, one is that family only (the DNS proxy then
/// answers no records of the other), none is automatic.
fn ip_families_of(spec: Option<&k8s_openapi::api::core::v1::ServiceSpec>) -> Option<&'static str> {
    match spec
        .and_then(|s| s.ip_families.as_deref())
        .unwrap_or_default()
    {
        [_, _] => Some("Dual"),
        [f] if f == "IPv4" => Some("IPv4"),
        [_] => Some("IPv6"),
        _ => None,
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
mod tests;
