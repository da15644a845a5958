//! The `istio_tcp_*` metric families, `istio_on_demand_dns_total` and ztunnel's own refusal
//! counter.
//!
//! Byte counters follow Istio's convention, from the destination's point of view:
//! `istio_tcp_received_bytes_total` counts request bytes (source → destination),
//! `istio_tcp_sent_bytes_total` response bytes (destination → source). They grow while a
//! connection is open (flushed from the copy's counters at every scrape, see
//! [`super::live`]), not only when it closes.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

use super::live::{ByteFamilies, LiveConnections};

/// Which side reports.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

/// Istio's TCP label set. Unknown values are `"unknown"` (see [`TrafficLabels::unknown`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

pub const UNKNOWN: &str = "unknown";

/// Upstream's `response_flags` values: why a connection ended early.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, Default)]
pub enum ResponseFlags {
    /// `-`: nothing to report.
    #[default]
    None,
    /// `DENY`: denied by authorization policy.
    AuthorizationPolicyDenied,
    /// `CONNECT`: the upstream (or next-hop) connection could not be established, or
    /// broke (upstream's default for any error).
    ConnectionFailure,
    /// `TLS_FAILURE`: the mTLS handshake with the peer failed (certificate, identity,
    /// ALPN, timeout).
    TlsFailure,
    /// `H2_HANDSHAKE_FAILURE`: HTTP/2 with the peer failed.
    Http2HandshakeFailure,
    /// `NETWORK_POLICY`: the HBONE connect timed out, as when a NetworkPolicy drops 15008.
    NetworkPolicyError,
    /// `IDENTITY_ERROR`: no certificate for the workload's identity.
    IdentityError,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::AuthorizationPolicyDenied => "DENY",
            ResponseFlags::ConnectionFailure => "CONNECT",
            ResponseFlags::TlsFailure => "TLS_FAILURE",
            ResponseFlags::Http2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlags::NetworkPolicyError => "NETWORK_POLICY",
            ResponseFlags::IdentityError => "IDENTITY_ERROR",
        }
    }
}

impl TrafficLabels {
    /// Every label `unknown` except `reporter`, `request_protocol=tcp`, `response_flags=-`.
    pub fn unknown(reporter: Reporter) -> Self {
        let u = || UNKNOWN.to_string();
        TrafficLabels {
            reporter,
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "tcp".to_string(),
            response_flags: ResponseFlags::None.as_str().to_string(),
            connection_security_policy: UNKNOWN.to_string(),
            source_region: u(),
            source_zone: u(),
            destination_region: u(),
            destination_zone: u(),
        }
    }
}

/// Why a connection was refused before any data flowed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusalReason {
    /// TLS handshake failed (bad certificate, untrusted root, expired, wrong trust domain,
    /// not TLS at all, no ALPN h2).
    tls_handshake,
    /// The handshake did not finish in time.
    handshake_timeout,
    /// The peer's certificate identity is not the identity of the workload at its IP.
    identity_mismatch,
    /// Not a CONNECT, bad `:authority`, destination validation failed.
    bad_request,
    /// Denied by authorization policy.
    policy_denied,
    /// No workload or upstream for the target, or the upstream connect failed.
    upstream_unavailable,
    /// The source workload could not be determined or has no certificate.
    no_identity,
}

/// `istio_tcp_sockets_open` labels (upstream's: the reporter only).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    pub reporter: Reporter,
}

/// `istio_on_demand_dns_total` labels (upstream's set): the client, described as in the
/// `istio_tcp_*` source labels but with its configured identity as principal, and the
/// hostname resolved.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OnDemandDnsLabels {
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub hostname: String,
}

impl OnDemandDnsLabels {
    /// For client `src` (unknown parts `unknown`) resolving `hostname`.
    pub fn new(src: &super::PeerInfo, hostname: &str) -> Self {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| UNKNOWN.to_string());
        OnDemandDnsLabels {
            source_workload: or_unknown(&src.workload),
            source_canonical_service: or_unknown(&src.canonical_service),
            source_canonical_revision: or_unknown(&src.canonical_revision),
            source_workload_namespace: or_unknown(&src.namespace),
            source_principal: src
                .principal()
                .map_or_else(|| UNKNOWN.to_string(), |id| id.to_string()),
            source_app: or_unknown(&src.canonical_service),
            source_version: or_unknown(&src.canonical_revision),
            source_cluster: or_unknown(&src.cluster),
            hostname: if hostname.is_empty() {
                UNKNOWN.to_string()
            } else {
                hostname.to_string()
            },
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: &'static str,
    pub reason: RefusalReason,
}

/// The proxy's metric families.
#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    pub connections_opened: Family<TrafficLabels, Counter>,
    pub connections_closed: Family<TrafficLabels, Counter>,
    pub connections_failed: Family<TrafficLabels, Counter>,
    pub received_bytes: Family<TrafficLabels, Counter>,
    pub sent_bytes: Family<TrafficLabels, Counter>,
    /// Connections whose copy is running: their bytes are flushed into the two families
    /// above at every scrape.
    pub live: Arc<LiveConnections>,
    pub sockets_open: Family<SocketLabels, Gauge>,
    pub refused: Family<RefusalLabels, Counter>,
    /// `istio_crl_policy_rejections_total`: handshakes refused and established connections
    /// closed because a revocation list (`CRL_PATH`) names the peer's certificate.
    pub crl_rejections: Family<SocketLabels, Counter>,
    /// `istio_on_demand_dns_total`: connections whose destination endpoint was known only
    /// by hostname and resolved when connecting.
    pub on_demand_dns: Family<OnDemandDnsLabels, Counter>,
    pub workload_manager: WorkloadManagerMetrics,
    /// The DNS proxy's `istio_dns_*` families.
    pub dns: super::dns_metrics::DnsMetrics,
}

/// In-pod mode's workload proxies, as upstream's `workload_manager_*` (no `istio_`
/// prefix): Istio's ztunnel dashboard plots them.
#[derive(Debug, Clone, Default)]
pub struct WorkloadManagerMetrics {
    /// Workloads with a running proxy.
    pub active_proxy_count: Gauge,
    /// Workloads whose proxy failed to start and is retried.
    pub pending_proxy_count: Gauge,
    pub proxies_started: Counter,
    pub proxies_stopped: Counter,
}

/// Labels of `istio_build`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

impl ProxyMetrics {
    /// Registers the families: `istio_tcp_*` under prefix `istio`, the refusal counter as
    /// `ztunnel_connections_refused_total`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ProxyMetrics::default();
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.connections_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.connections_closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            m.connections_failed.clone(),
        );
        istio.register_collector(Box::new(ByteFamilies {
            live: m.live.clone(),
            received: m.received_bytes.clone(),
            sent: m.sent_bytes.clone(),
        }));
        istio.register(
            "tcp_sockets_open",
            "The current number of open proxied TCP connections",
            m.sockets_open.clone(),
        );
        // As upstream: which build runs (`istio_build{component="ztunnel",tag}` 1), for
        // the version panels of Istio's dashboards.
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        istio.register("build", "Istio component build info", build);
        m.dns.register(istio);
        istio.register(
            "crl_policy_rejections",
            "The total number of connections rejected due to CRL certificate revocation (unstable)",
            m.crl_rejections.clone(),
        );
        istio.register(
            "on_demand_dns",
            "The total number of requests that used on-demand DNS (unstable)",
            m.on_demand_dns.clone(),
        );
        let wm = registry.sub_registry_with_prefix("workload_manager");
        wm.register(
            "active_proxy_count",
            "The number of workloads with an active proxy",
            m.workload_manager.active_proxy_count.clone(),
        );
        wm.register(
            "pending_proxy_count",
            "The number of workloads whose proxy is pending (failed to start, retried)",
            m.workload_manager.pending_proxy_count.clone(),
        );
        wm.register(
            "proxies_started",
            "The total number of workload proxies started",
            m.workload_manager.proxies_started.clone(),
        );
        wm.register(
            "proxies_stopped",
            "The total number of workload proxies stopped",
            m.workload_manager.proxies_stopped.clone(),
        );
        registry.sub_registry_with_prefix("ztunnel").register(
            "connections_refused",
            "Connections refused before any data flowed, by direction and reason",
            m.refused.clone(),
        );
        m
    }

    /// The revocation counter of one side (`reporter`).
    pub fn crl_rejections(&self, reporter: Reporter) -> Counter {
        self.crl_rejections
            .get_or_create(&SocketLabels { reporter })
            .clone()
    }

    /// Counts a refusal.
    pub fn refused(&self, direction: super::Direction, reason: RefusalReason) {
        self.refused
            .get_or_create(&RefusalLabels {
                direction: direction.as_str(),
                reason,
            })
            .inc();
    }
}
