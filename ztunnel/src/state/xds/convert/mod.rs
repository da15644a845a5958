//! istiod's xDS resources → the store's types (pure functions, no I/O).
//!
//! Two resource types arrive on the delta ADS stream:
//! - `istio.workload.Address` ([`mesh_proto::xds::ADDRESS_TYPE`]): a workload or a
//!   service, see [`decode_address`];
//! - `istio.security.Authorization` ([`mesh_proto::xds::AUTHORIZATION_TYPE`]): an L4
//!   policy, see [`decode_authorization`].
//!
//! Semantics follow upstream ztunnel's conversions, with these choices of ours:
//! - empty `trust_domain` / `cluster_id` of a workload are filled from
//!   [`ConvertDefaults`] (upstream hard-codes `cluster.local` / `Kubernetes`, the
//!   [`Default`] here); an empty `service_account` becomes `default`, as upstream;
//! - `LEGACY_ISTIO_MTLS` is treated as plaintext TCP (upstream rejects the workload);
//! - a port above 65535, an IP block whose prefix is longer than its family allows and a
//!   string match with no kind are errors (upstream truncates the port or silently drops
//!   the entry, which can widen a policy);
//! - `hbone_mtls_port` 0 means 15008 (the local-config default);
//! - a service needs a namespace and a hostname (its key in the store);
//! - a service address whose `length` is shorter than its family's full prefix is a CIDR
//!   VIP (`cidr_vips`), one with a longer prefix an error (upstream's too); a gateway
//!   address's `length` is ignored, as upstream;
//! - an unknown `visibility` is `PUBLIC`, as upstream (fail open rather than drop the
//!   service);
//! - `load_balancing.health_policy` and `ip_families` are kept as upstream's serde names
//!   (`OnlyHealthy`/`AllowAll`, `IPv4`/`IPv6`/`Dual`; AUTOMATIC: none).
//!
//! - a workload needs a uid (its key in the store and its xDS resource name).
//!
//! Unknown enum values (except `workload_type`, read as `deployment` as upstream's
//! accessor does), an UNSPECIFIED routing scope and a gateway address with no destination
//! are errors, as upstream. Every error names the object (workload uid,
//! service `<ns>/<hostname>`, policy `<ns>/<name>`) and the field.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_proto::security as xsec;
use mesh_proto::workload as xwl;
use prost::Message;
use serde_yaml_ng::Value;

use crate::policy::model::{self, Authorization, IpBlock, ServiceAccountMatch, StringMatch};
use crate::state::workload::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus,
    LoadBalancer, LoadBalancerMode, LoadBalancerScope, Locality, NamespacedHostname,
    NetworkAddress, NetworkCidr, NetworkMode, PortMap, Protocol, Service, Visibility,
    WeightedWaypoint, Workload,
};

/// HBONE port of a gateway address that does not give one.
const DEFAULT_HBONE_PORT: u16 = 15008;

/// Values a workload gets where istiod leaves the field empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertDefaults {
    /// Needed for the workload's SPIFFE identity; normally the `TRUST_DOMAIN` config.
    pub trust_domain: String,
    /// Normally the `CLUSTER_ID` config.
    pub cluster_id: String,
}

impl Default for ConvertDefaults {
    /// Upstream ztunnel's fallbacks: `cluster.local`, `Kubernetes`.
    fn default() -> Self {
        ConvertDefaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        }
    }
}

/// A decoded `istio.workload.Address` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // short-lived, moved straight into the store
pub enum AddressResource {
    Workload(Workload),
    Service(Service),
}

/// Why a resource was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("resource type {got:?}: want {want:?}")]
    WrongType { got: String, want: &'static str },
    #[error("resource of type {type_url} does not decode: {source}")]
    Decode {
        type_url: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("address resource holds neither a workload nor a service")]
    EmptyAddress,
    /// `kind` is `workload`, `service` or `authorization policy`; `name` the workload's
    /// uid (`<namespace>/<name>` when it has none), the service's `<namespace>/<hostname>`
    /// or the policy's `<namespace>/<name>`.
    #[error("{kind} {name}: {field}: {reason}")]
    Invalid {
        kind: &'static str,
        name: String,
        field: String,
        reason: String,
    },
}

/// Decodes a workload or service (`type.googleapis.com/istio.workload.Address`).
pub fn decode_address(
    any: &prost_types::Any,
    defaults: &ConvertDefaults,
) -> Result<AddressResource, ConvertError> {
    let address: xwl::Address = decode(any, mesh_proto::xds::ADDRESS_TYPE)?;
    match address.r#type {
        Some(xwl::address::Type::Workload(w)) => {
            workload(w, defaults).map(AddressResource::Workload)
        }
        Some(xwl::address::Type::Service(s)) => service(s).map(AddressResource::Service),
        None => Err(ConvertError::EmptyAddress),
    }
}

/// Decodes an L4 policy (`type.googleapis.com/istio.security.Authorization`).
pub fn decode_authorization(any: &prost_types::Any) -> Result<Authorization, ConvertError> {
    authorization(decode(any, mesh_proto::xds::AUTHORIZATION_TYPE)?)
}

fn decode<M: Message + Default>(
    any: &prost_types::Any,
    type_url: &'static str,
) -> Result<M, ConvertError> {
    if any.type_url != type_url {
        return Err(ConvertError::WrongType {
            got: any.type_url.clone(),
            want: type_url,
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| ConvertError::Decode { type_url, source })
}

/// A field error, before the object is named.
struct Bad {
    field: String,
    reason: String,
}

type Res<T> = Result<T, Bad>;

impl Bad {
    fn of(self, kind: &'static str, name: String) -> ConvertError {
        let Bad { field, reason } = self;
        ConvertError::Invalid {
            kind,
            name,
            field,
            reason,
        }
    }
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Bad {
    Bad {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Converts every item of a repeated field, naming the failing one `field[i]`.
fn each<I, O>(items: &[I], field: &str, f: impl Fn(&I, &str) -> Res<O>) -> Res<Vec<O>> {
    let name = |i| format!("{field}[{i}]");
    items
        .iter()
        .enumerate()
        .map(|(i, x)| f(x, &name(i)))
        .collect()
}

/// 4 bytes: IPv4; 16: IPv6.
fn ip(bytes: &[u8], field: &str) -> Res<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(v6));
    }
    let reason = format!("address {} bytes long (want 4 or 16)", bytes.len());
    Err(bad(field, reason))
}

fn port(value: u32, field: &str) -> Res<u16> {
    u16::try_from(value).map_err(|_| bad(field, format!("port {value} out of range (max 65535)")))
}

/// A protobuf enum field; an unknown value is an error.
fn enum_value<E: TryFrom<i32>>(value: i32, field: &str) -> Res<E> {
    E::try_from(value).map_err(|_| bad(field, format!("unknown enum value {value}")))
}

/// Service port → target port (the application protocol is not kept).
fn port_map(ports: &[xwl::Port], field: &str) -> Res<PortMap> {
    let pairs = each(ports, field, |p, f| {
        let service_port = port(p.service_port, &format!("{f}.service_port"))?;
        Ok((
            service_port,
            port(p.target_port, &format!("{f}.target_port"))?,
        ))
    })?;
    Ok(pairs.into_iter().collect())
}

fn network_address(a: &xwl::NetworkAddress, field: &str) -> Res<NetworkAddress> {
    Ok(NetworkAddress::new(
        a.network.clone(),
        ip(&a.address, field)?,
    ))
}

fn gateway(g: &xwl::GatewayAddress, field: &str) -> Res<GatewayAddress> {
    use xwl::gateway_address::Destination;
    let destination = match &g.destination {
        Some(Destination::Address(a)) => {
            GatewayDestination::Address(network_address(a, &format!("{field}.address"))?)
        }
        Some(Destination::Hostname(h)) => GatewayDestination::Hostname(NamespacedHostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        }),
        None => return Err(bad(field, "neither hostname nor address set")),
    };
    let hbone_mtls_port = match g.hbone_mtls_port {
        0 => DEFAULT_HBONE_PORT,
        p => port(p, &format!("{field}.hbone_mtls_port"))?,
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

fn application_tunnel(t: &xwl::ApplicationTunnel) -> Res<ApplicationTunnel> {
    use xwl::application_tunnel::Protocol as P;
    let protocol = match enum_value(t.protocol, "application_tunnel.protocol")? {
        P::None => ApplicationTunnelProtocol::NONE,
        P::Proxy => ApplicationTunnelProtocol::PROXY,
    };
    let port = match t.port {
        0 => None,
        p => Some(port(p, "application_tunnel.port")?),
    };
    Ok(ApplicationTunnel { protocol, port })
}

fn or_default(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_owned()
    } else {
        value
    }
}

/// Converts a workload; `defaults` fill an empty trust domain and cluster id.
pub fn workload(w: xwl::Workload, defaults: &ConvertDefaults) -> Result<Workload, ConvertError> {
    let uid = if w.uid.is_empty() {
        format!("{}/{}", w.namespace, w.name)
    } else {
        w.uid.clone()
    };
    convert_workload(w, defaults).map_err(|b| b.of("workload", uid))
}

fn convert_workload(w: xwl::Workload, defaults: &ConvertDefaults) -> Res<Workload> {
    if w.uid.is_empty() {
        return Err(bad("uid", "must not be empty"));
    }
    let workload_ips = each(&w.addresses, "addresses", |a, f| ip(a, f))?;
    let protocol = match enum_value(w.tunnel_protocol, "tunnel_protocol")? {
        xwl::TunnelProtocol::Hbone => Protocol::HBONE,
        // No sidecar-mTLS client here; such a workload accepts plaintext when PERMISSIVE.
        xwl::TunnelProtocol::None | xwl::TunnelProtocol::LegacyIstioMtls => Protocol::TCP,
    };
    let network_mode = match enum_value(w.network_mode, "network_mode")? {
        xwl::NetworkMode::Standard => NetworkMode::Standard,
        xwl::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
    };
    let status = match enum_value(w.status, "status")? {
        xwl::WorkloadStatus::Healthy => HealthStatus::Healthy,
        xwl::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
    };
    // "deployment", "cronjob", "pod", "job": the strings the Kubernetes source uses. As
    // upstream, a kind this proto does not know (a newer istiod) is read as the default
    // (deployment): it only names telemetry, never a reason to drop the workload.
    let workload_type = xwl::WorkloadType::try_from(w.workload_type)
        .unwrap_or_default()
        .as_str_name()
        .to_ascii_lowercase();
    let mut services = HashMap::with_capacity(w.services.len());
    for (key, list) in w.services {
        let field = format!("services[{key:?}]");
        if !key.contains('/') {
            return Err(bad(field, "key is not <namespace>/<hostname>"));
        }
        let ports = port_map(&list.ports, &format!("{field}.ports"))?;
        services.insert(key, ports);
    }
    let gw = |g: &Option<xwl::GatewayAddress>, field| g.as_ref().map(|g| gateway(g, field));
    let locality = w.locality.map(|l| Locality {
        region: l.region,
        zone: l.zone,
        subzone: l.subzone,
    });
    Ok(Workload {
        workload_ips,
        protocol,
        network_mode,
        status,
        workload_type,
        services,
        waypoint: gw(&w.waypoint, "waypoint").transpose()?,
        network_gateway: gw(&w.network_gateway, "network_gateway").transpose()?,
        application_tunnel: w
            .application_tunnel
            .as_ref()
            .map(application_tunnel)
            .transpose()?,
        locality: locality.unwrap_or_default(),
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: or_default(w.service_account, "default"),
        trust_domain: or_default(w.trust_domain, &defaults.trust_domain),
        cluster_id: or_default(w.cluster_id, &defaults.cluster_id),
        node: w.node,
        network: w.network,
        workload_name: w.workload_name,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        hostname: w.hostname,
        native_tunnel: w.native_tunnel,
        authorization_policies: w.authorization_policies,
        capacity: w.capacity.unwrap_or(1),
    })
}

/// Converts a service.
pub fn service(s: xwl::Service) -> Result<Service, ConvertError> {
    let key = format!("{}/{}", s.namespace, s.hostname);
    convert_service(s).map_err(|b| b.of("service", key))
}

fn convert_service(s: xwl::Service) -> Res<Service> {
    if s.namespace.is_empty() {
        return Err(bad("namespace", "must not be empty"));
    }
    if s.hostname.is_empty() {
        return Err(bad("hostname", "must not be empty"));
    }
    let mut vips = Vec::new();
    let mut cidr_vips = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        match service_address(a, &format!("addresses[{i}]"))? {
            VipKind::Host(v) => vips.push(v),
            VipKind::Cidr(c) => cidr_vips.push(c),
        }
    }
    let weighted_waypoints = each(&s.weighted_waypoints, "weighted_waypoints", |w, f| {
        let destination = w
            .destination
            .as_ref()
            .ok_or_else(|| bad(format!("{f}.destination"), "missing"))?;
        Ok(WeightedWaypoint {
            destination: gateway(destination, &format!("{f}.destination"))?,
            weight: w.weight,
        })
    })?;
    use xwl::service::Visibility as V;
    let visibility = match V::try_from(s.visibility).unwrap_or(V::Public) {
        V::Public => Visibility::Public,
        V::Namespace => Visibility::Namespace,
    };
    let ip_families = match enum_value(s.ip_families, "ip_families")? {
        xwl::IpFamilies::Automatic => None,
        xwl::IpFamilies::Ipv4Only => Some("IPv4"),
        xwl::IpFamilies::Ipv6Only => Some("IPv6"),
        xwl::IpFamilies::Dual => Some("Dual"),
    };
    Ok(Service {
        vips,
        cidr_vips,
        weighted_waypoints,
        visibility,
        ports: port_map(&s.ports, "ports")?,
        waypoint: s
            .waypoint
            .as_ref()
            .map(|g| gateway(g, "waypoint"))
            .transpose()?,
        load_balancer: s.load_balancing.as_ref().map(load_balancer).transpose()?,
        ip_families: ip_families.map(|f| Value::String(f.into())),
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        subject_alt_names: s.subject_alt_names,
        canonical: s.canonical,
    })
}

enum VipKind {
    Host(NetworkAddress),
    Cidr(NetworkCidr),
}

/// A service address: a host VIP, or a CIDR VIP when `length` is below the full prefix.
fn service_address(a: &xwl::NetworkAddress, field: &str) -> Res<VipKind> {
    let host = network_address(a, field)?;
    let max = if host.address.is_ipv4() { 32 } else { 128 };
    match a.length {
        None => Ok(VipKind::Host(host)),
        Some(len) if len == max => Ok(VipKind::Host(host)),
        Some(len) => {
            let too_long = || {
                let reason = format!("prefix length {len} longer than {max}");
                bad(format!("{field}.length"), reason)
            };
            let prefix = u8::try_from(len).map_err(|_| too_long())?;
            let cidr = IpNet::new(host.address, prefix).map_err(|_| too_long())?;
            Ok(VipKind::Cidr(NetworkCidr {
                network: host.network,
                cidr,
            }))
        }
    }
}

fn load_balancer(lb: &xwl::LoadBalancing) -> Res<LoadBalancer> {
    use xwl::load_balancing::{HealthPolicy, Mode, Scope};
    let field = "load_balancing.routing_preference";
    let routing_preferences = each(&lb.routing_preference, field, |&v, f| {
        Ok(match enum_value(v, f)? {
            Scope::UnspecifiedScope => return Err(bad(f, "UNSPECIFIED_SCOPE is not a scope")),
            Scope::Region => LoadBalancerScope::Region,
            Scope::Zone => LoadBalancerScope::Zone,
            Scope::Subzone => LoadBalancerScope::Subzone,
            Scope::Node => LoadBalancerScope::Node,
            Scope::Cluster => LoadBalancerScope::Cluster,
            Scope::Network => LoadBalancerScope::Network,
        })
    })?;
    let mode = match enum_value(lb.mode, "load_balancing.mode")? {
        Mode::UnspecifiedMode => LoadBalancerMode::Standard,
        Mode::Strict => LoadBalancerMode::Strict,
        Mode::Failover => LoadBalancerMode::Failover,
        Mode::Passthrough => LoadBalancerMode::Passthrough,
    };
    let health_policy = match enum_value(lb.health_policy, "load_balancing.health_policy")? {
        HealthPolicy::OnlyHealthy => "OnlyHealthy",
        HealthPolicy::AllowAll => "AllowAll",
    };
    Ok(LoadBalancer {
        routing_preferences,
        mode,
        health_policy: Some(Value::String(health_policy.into())),
    })
}

/// Converts an L4 authorization policy.
pub fn authorization(a: xsec::Authorization) -> Result<Authorization, ConvertError> {
    let key = format!("{}/{}", a.namespace, a.name);
    convert_authorization(a).map_err(|b| b.of("authorization policy", key))
}

fn convert_authorization(a: xsec::Authorization) -> Res<Authorization> {
    let scope = match enum_value(a.scope, "scope")? {
        xsec::Scope::Global => model::Scope::Global,
        xsec::Scope::Namespace => model::Scope::Namespace,
        xsec::Scope::WorkloadSelector => model::Scope::WorkloadSelector,
    };
    let action = match enum_value(a.action, "action")? {
        xsec::Action::Allow => model::Action::Allow,
        xsec::Action::Deny => model::Action::Deny,
    };
    let rules = each(&a.rules, "rules", |rule, f| {
        each(&rule.clauses, &format!("{f}.clauses"), |clause, f| {
            each(&clause.matches, &format!("{f}.matches"), convert_match)
        })
    })?;
    Ok(Authorization {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}

fn convert_match(m: &xsec::Match, at: &str) -> Res<model::Match> {
    let strings = |v: &[xsec::StringMatch], name| each(v, &format!("{at}.{name}"), string_match);
    let blocks = |v: &[xsec::Address], name| each(v, &format!("{at}.{name}"), ip_block);
    let ports = |v: &[u32], name| each(v, &format!("{at}.{name}"), |p, f| port(*p, f));
    let accounts = |v: &[xsec::ServiceAccountMatch]| {
        let sa = |s: &xsec::ServiceAccountMatch| ServiceAccountMatch {
            namespace: s.namespace.clone(),
            service_account: s.service_account.clone(),
        };
        v.iter().map(sa).collect()
    };
    Ok(model::Match {
        namespaces: strings(&m.namespaces, "namespaces")?,
        not_namespaces: strings(&m.not_namespaces, "not_namespaces")?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals, "principals")?,
        not_principals: strings(&m.not_principals, "not_principals")?,
        source_ips: blocks(&m.source_ips, "source_ips")?,
        not_source_ips: blocks(&m.not_source_ips, "not_source_ips")?,
        destination_ips: blocks(&m.destination_ips, "destination_ips")?,
        not_destination_ips: blocks(&m.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports(&m.destination_ports, "destination_ports")?,
        not_destination_ports: ports(&m.not_destination_ports, "not_destination_ports")?,
    })
}

fn string_match(s: &xsec::StringMatch, field: &str) -> Res<StringMatch> {
    use xsec::string_match::MatchType;
    match &s.match_type {
        Some(MatchType::Exact(x)) => Ok(StringMatch::Exact(x.clone())),
        Some(MatchType::Prefix(x)) => Ok(StringMatch::Prefix(x.clone())),
        Some(MatchType::Suffix(x)) => Ok(StringMatch::Suffix(x.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err(bad(field, "no exact, prefix, suffix or presence set")),
    }
}

/// `{address, length}` → CIDR; the length must fit the family (≤ 32 or ≤ 128).
fn ip_block(a: &xsec::Address, field: &str) -> Res<IpBlock> {
    let addr = ip(&a.address, field)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let too_long = || {
        bad(
            field,
            format!("prefix length {} longer than {max}", a.length),
        )
    };
    let len = u8::try_from(a.length).map_err(|_| too_long())?;
    IpNet::new(addr, len).map(IpBlock).map_err(|_| too_long())
}

#[cfg(test)]
mod tests;
