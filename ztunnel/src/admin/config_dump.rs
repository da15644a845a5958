//! The `/config_dump` and `/debug/connections` documents.

use std::collections::BTreeMap;

use serde::Serialize;

use super::AdminState;
use crate::hbone::pool::PooledConnectionInfo;
use crate::identity::manager::CertificateDump;
use crate::policy::model::Authorization;
use crate::proxy::ConnectionSummary;
use crate::state::workload::{HealthStatus, PortMap};
use crate::state::{Service, Snapshot, Workload};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump<'a> {
    pub config: &'a crate::config::Config,
    pub state_version: u64,
    pub workloads: Vec<&'a Workload>,
    pub services: Vec<ServiceDump<'a>>,
    pub policies: Vec<&'a Authorization>,
    pub certificates: Vec<CertificateDump>,
    pub certificate_provider: &'a str,
    pub proxies: Vec<ProxyDump>,
}

/// A service with its endpoints keyed by workload uid, as upstream dumps it
/// (`istioctl ztunnel-config services` counts them).
#[derive(Serialize)]
pub struct ServiceDump<'a> {
    #[serde(flatten)]
    pub service: &'a Service,
    pub endpoints: BTreeMap<&'a str, EndpointDump<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDump<'a> {
    pub workload_uid: &'a str,
    pub status: HealthStatus,
    pub port: &'a PortMap,
}

fn service_dump<'a>(snap: &'a Snapshot, service: &'a Service) -> ServiceDump<'a> {
    let endpoints = snap
        .endpoints(&service.key())
        .iter()
        .map(|e| {
            let uid = e.workload.uid.as_str();
            let dump = EndpointDump {
                workload_uid: uid,
                status: e.workload.status,
                port: &e.ports,
            };
            (uid, dump)
        })
        .collect();
    ServiceDump { service, endpoints }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyDump {
    pub name: String,
    pub outbound: String,
    pub inbound_plain: String,
    pub hbone: String,
    /// The SOCKS5 listener (`UNSTABLE_ENABLE_SOCKS5`), absent when off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socks5: Option<String>,
    pub active_connections: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsDump {
    pub name: String,
    pub connections: Vec<ConnectionSummary>,
    pub pool: Vec<PooledConnectionInfo>,
}

pub fn config_dump(state: &AdminState) -> String {
    let snap = state.store.snapshot();
    let mut workloads: Vec<&Workload> = snap.workloads().map(|w| w.as_ref()).collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Service> = snap.services().map(|s| s.as_ref()).collect();
    services.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
    let proxies = (state.proxies)()
        .into_iter()
        .map(|(name, h)| {
            let a = h.addresses();
            ProxyDump {
                name,
                outbound: a.outbound.to_string(),
                inbound_plain: a.inbound_plain.to_string(),
                hbone: a.hbone.to_string(),
                socks5: a.socks5.map(|s| s.to_string()),
                active_connections: h.active_connections(),
            }
        })
        .collect();
    let dump = ConfigDump {
        config: &state.cfg,
        state_version: snap.version,
        workloads,
        services: services
            .into_iter()
            .map(|s| service_dump(&snap, s))
            .collect(),
        policies: snap.policies().iter().collect(),
        certificates: state.certs.dump(&state.roots.certificates()),
        certificate_provider: state.certs.provider_name(),
        proxies,
    };
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

pub fn connections(state: &AdminState) -> String {
    let dump: Vec<ConnectionsDump> = (state.proxies)()
        .into_iter()
        .map(|(name, h)| ConnectionsDump {
            name,
            connections: h.connections(),
            pool: h.pool_connections(),
        })
        .collect();
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
