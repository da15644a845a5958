//! Workload and Service: the mesh's view of pods and service VIPs.
//!
//! The serde form is upstream ztunnel's local-config schema (camelCase keys, unknown keys
//! rejected), so the same YAML drives either implementation; other sources (Kubernetes)
//! build these structs directly.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::Identity;

/// How peers reach a workload.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// Plaintext TCP (not in the mesh, or no ztunnel in front of it).
    #[default]
    TCP,
    /// mTLS + HTTP/2 CONNECT to port 15008.
    HBONE,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

/// An IP on a network, written `"<network>/<ip>"` (`"/10.0.0.1"` on the default network).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl NetworkAddress {
    pub fn new(network: impl Into<String>, address: IpAddr) -> Self {
        NetworkAddress {
            network: network.into(),
            address,
        }
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl FromStr for NetworkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (network, ip) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("{s:?}: expected <network>/<ip>"))?;
        let address = ip
            .parse()
            .map_err(|e| format!("{s:?}: bad IP address: {e}"))?;
        Ok(NetworkAddress::new(network, address))
    }
}

impl Serialize for NetworkAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NetworkAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `<namespace>/<hostname>` of a service.
///
/// Read from upstream's string form `"<namespace>/<hostname>"` (how upstream's local config
/// writes a waypoint or gateway hostname) or from the map `{namespace, hostname}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl FromStr for NamespacedHostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, hostname)) if !namespace.is_empty() && !hostname.is_empty() => {
                Ok(NamespacedHostname {
                    namespace: namespace.to_string(),
                    hostname: hostname.to_string(),
                })
            }
            _ => Err(format!("{s:?}: expected <namespace>/<hostname>")),
        }
    }
}

impl<'de> Deserialize<'de> for NamespacedHostname {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Map {
            namespace: String,
            hostname: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Str(String),
            Map(Map),
        }
        match Form::deserialize(d)? {
            Form::Str(s) => s.parse().map_err(serde::de::Error::custom),
            Form::Map(Map {
                namespace,
                hostname,
            }) => Ok(NamespacedHostname {
                namespace,
                hostname,
            }),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

/// Where a waypoint or network gateway is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    15008
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum ApplicationTunnelProtocol {
    NONE,
    PROXY,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationTunnel {
    pub protocol: ApplicationTunnelProtocol,
    #[serde(default)]
    pub port: Option<u16>,
}

/// Service port → target port.
pub type PortMap = HashMap<u16, u16>;

/// A pod (or VM) known to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Empty: filled by the source with the configured `TRUST_DOMAIN`.
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub network_mode: NetworkMode,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub network: String,
    /// `"<ns>/<hostname>"` → service port → target port.
    #[serde(default)]
    pub services: HashMap<String, PortMap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_gateway: Option<GatewayAddress>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub canonical_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub canonical_revision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(default)]
    pub native_tunnel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// `"<ns>/<policy>"` of WorkloadSelector-scoped policies bound to this workload.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    #[serde(default)]
    pub status: HealthStatus,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub locality: Locality,
    #[serde(default = "default_capacity")]
    pub capacity: u32,
}

fn default_service_account() -> String {
    "default".to_string()
}

fn default_capacity() -> u32 {
    1
}

impl Workload {
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }

    /// `k8s.<workloadType>.name` key and value for baggage (`deployment` when unknown).
    pub fn workload_type_or_default(&self) -> &str {
        if self.workload_type.is_empty() {
            "deployment"
        } else {
            &self.workload_type
        }
    }

    /// The name to report in telemetry (`workloadName`, else the pod name).
    pub fn telemetry_name(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }
}

/// How a service's endpoints are chosen (upstream's `loadBalancer`; istiod sends
/// `{routingPreferences: [Node], mode: Strict}` for `internalTrafficPolicy: Local`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// Scopes to match with the client, most important first.
    #[serde(default)]
    pub routing_preferences: Vec<LoadBalancerScope>,
    #[serde(default)]
    pub mode: LoadBalancerMode,
    /// Upstream's `OnlyHealthy` (default) or `AllowAll` (unhealthy endpoints are
    /// picked too: istiod sends it for `publishNotReadyAddresses: true`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "health_policy"
    )]
    pub health_policy: Option<serde_yaml_ng::Value>,
}

/// Reads one of upstream's names into the loosely typed field other sources fill.
fn one_of<'de, D: Deserializer<'de>>(
    d: D,
    field: &str,
    allowed: &[&str],
) -> Result<Option<serde_yaml_ng::Value>, D::Error> {
    let s = String::deserialize(d)?;
    if allowed.contains(&s.as_str()) {
        Ok(Some(serde_yaml_ng::Value::String(s)))
    } else {
        let want = allowed.join(", ");
        Err(serde::de::Error::custom(format!(
            "{field}: unknown value {s:?}, expected one of {want}"
        )))
    }
}

/// `healthPolicy`: upstream's `OnlyHealthy` or `AllowAll`.
fn health_policy<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_yaml_ng::Value>, D::Error> {
    one_of(d, "healthPolicy", &["OnlyHealthy", "AllowAll"])
}

/// `ipFamilies`: upstream's `IPv4`, `IPv6` or `Dual`.
fn ip_families<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_yaml_ng::Value>, D::Error> {
    one_of(d, "ipFamilies", &["IPv4", "IPv6", "Dual"])
}

impl LoadBalancer {
    /// Whether unhealthy endpoints may be picked (`healthPolicy: AllowAll`).
    pub fn allows_unhealthy(&self) -> bool {
        self.health_policy
            .as_ref()
            .and_then(|v| v.as_str())
            .is_some_and(|p| p == "AllowAll" || p == "ALLOW_ALL")
    }
}

/// [`LoadBalancer::mode`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadBalancerMode {
    /// Preferences ignored.
    #[default]
    Standard,
    /// Only endpoints matching every preference; none: no endpoint.
    Strict,
    /// The endpoints matching the longest prefix of the preferences.
    Failover,
    /// No endpoint is picked: connections go, in plaintext, to the address the client
    /// dialled (istiod sends it for ServiceEntries with `resolution: NONE`; see
    /// `proxy::outbound::resolve`). Preferences ignored where endpoints are picked anyway
    /// (a waypoint or gateway service).
    Passthrough,
}

/// [`LoadBalancer::routing_preferences`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadBalancerScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// A range of addresses on a network: a service's CIDR VIP, written (upstream's form)
/// `{network: "", cidr: "10.96.8.0/24"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkCidr {
    #[serde(default)]
    pub network: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
}

/// `"<ip>/<prefix length>"`; a length the family cannot have is refused naming it.
fn cidr<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    let s = String::deserialize(d)?;
    let bad = |why: String| serde::de::Error::custom(format!("cidr {s:?}: {why}"));
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| bad("expected <ip>/<prefix length>".into()))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|e| bad(format!("bad IP address: {e}")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let too_long = || bad(format!("prefix length {len} longer than {max}"));
    let len: u8 = len.parse().map_err(|_| too_long())?;
    IpNet::new(ip, len).map_err(|_| too_long())
}

impl fmt::Display for NetworkCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.cidr)
    }
}

/// Which clients may resolve and reach a service (upstream's `visibility`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Visibility {
    /// Every client.
    #[default]
    Public,
    /// Only clients in the service's own namespace.
    Namespace,
}

/// One of a service's weighted waypoints (upstream's `weightedWaypoints` entry): chosen
/// for a connection with probability `weight` / the sum of the weights.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedWaypoint {
    pub destination: GatewayAddress,
    pub weight: u32,
}

/// A service VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// Host VIPs (one address each).
    #[serde(default)]
    pub vips: Vec<NetworkAddress>,
    /// CIDR VIPs: every address of the range is the service's (looked up only when no
    /// host VIP matches; see `Snapshot::service_by_vip_for`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidr_vips: Vec<NetworkCidr>,
    #[serde(default)]
    pub ports: PortMap,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    /// When some weight is non-zero, these replace `waypoint` (which then names the
    /// primary) for new connections: see `Service::pick_waypoint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    #[serde(default)]
    pub canonical: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ip_families"
    )]
    pub ip_families: Option<serde_yaml_ng::Value>,
    /// Always in `/config_dump`, as upstream (even the default `Public`).
    #[serde(default)]
    pub visibility: Visibility,
}

impl Service {
    /// Whether a client in `namespace` may resolve and reach this service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.visibility == Visibility::Public || self.namespace == namespace
    }

    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname {
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
        }
    }

    /// `subjectAltNames` that parse as SPIFFE identities.
    pub fn san_identities(&self) -> Vec<Identity> {
        self.subject_alt_names
            .iter()
            .filter_map(|s| {
                let full = if s.starts_with("spiffe://") {
                    s.clone()
                } else {
                    format!("spiffe://{s}")
                };
                full.parse().ok()
            })
            .collect()
    }
}
