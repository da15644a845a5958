//! One access-log line and one set of metric updates per proxied connection.
//!
//! Tracing target `access`; "connection opened" at debug, "connection complete" at info, or
//! at error with `error=` when the connection failed. Fields (upstream's names and order):
//! `src.addr src.workload src.namespace src.identity src.cluster dst.addr dst.hbone_addr
//! dst.service dst.workload dst.namespace dst.identity dst.cluster direction bytes_sent
//! bytes_recv duration`. `*.workload` is the workload's own name (the pod), as upstream.
//! As upstream, byte counts are from the reporter's point of view: outbound `bytes_sent`
//! is what the source sent (request bytes), inbound `bytes_sent` what the destination sent
//! back (response bytes).
//!
//! Metric labels follow upstream: `source_principal` is set only when mTLS proved the
//! source (a plaintext source is `unknown` even when the mesh knows its workload); the
//! destination principal is the proven identity, else the configured one; app/version
//! are the canonical
//! service/revision, the destination service labels come from the Service object the
//! connection was for; `response_flags` is `-` on the opened counter and, on the closed
//! and failed counters, why the connection failed (`DENY`, `TLS_FAILURE`,
//! `H2_HANDSHAKE_FAILURE`, `NETWORK_POLICY`, `IDENTITY_ERROR`, else `CONNECT` for any
//! error, also one after the connection was established, as upstream counts it).
//!
//! Byte counters grow while the connection is open: once the copy starts, the proxy hands
//! its live counters over with [`ConnectionTelemetry::count_bytes`] and every scrape adds
//! what was copied since the previous one (see [`super::live`]); closing or dropping the
//! telemetry adds the rest. `istio_tcp_sockets_open` counts open connections per reporter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;

use super::live::{ByteSource, Live};
use super::metrics::{ProxyMetrics, Reporter, ResponseFlags, SocketLabels, TrafficLabels};
use crate::identity::Identity;
use crate::state::{HboneTarget, Service, Workload};

/// Which way the connection goes, seen from this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What is known about one end of a connection.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The workload's own name (the pod), for the access log.
    pub name: Option<String>,
    /// The controller's name (`workload_name`, e.g. the Deployment), for metric labels.
    pub workload: Option<String>,
    pub namespace: Option<String>,
    /// Set only when the identity is proven by mTLS (or is ours, presented over mTLS).
    pub identity: Option<Identity>,
    /// The identity the mesh configuration gives the workload (metric principal labels
    /// when mTLS proved nothing, as upstream).
    pub workload_identity: Option<Identity>,
    pub cluster: Option<String>,
    pub canonical_service: Option<String>,
    pub canonical_revision: Option<String>,
    /// Locality (metric labels `*_region`, `*_zone`).
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl PeerInfo {
    /// Workload details (the identity is left for the caller to set when mTLS proves it).
    pub fn from_workload(w: &Workload) -> Self {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        PeerInfo {
            name: non_empty(&w.name),
            workload: non_empty(w.telemetry_name()),
            namespace: non_empty(&w.namespace),
            identity: None,
            workload_identity: Some(w.identity()),
            cluster: non_empty(&w.cluster_id),
            canonical_service: non_empty(&w.canonical_name).or_else(|| non_empty(&w.name)),
            canonical_revision: non_empty(&w.canonical_revision),
            region: non_empty(&w.locality.region),
            zone: non_empty(&w.locality.zone),
        }
    }

    /// `*.workload` in the access log: the workload's own name, else the controller's.
    fn log_name(&self) -> Option<&str> {
        self.name.as_deref().or(self.workload.as_deref())
    }

    pub fn with_identity(mut self, id: Option<Identity>) -> Self {
        self.identity = id;
        self
    }

    /// The principal for metric labels: the proven identity, else the configured one.
    pub fn principal(&self) -> Option<&Identity> {
        self.identity.as_ref().or(self.workload_identity.as_ref())
    }
}

/// The Service a connection was addressed to (destination service labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceInfo {
    pub fn from_service(s: &Service) -> Self {
        ServiceInfo {
            hostname: s.hostname.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }
    }
}

/// Everything the access log and the metrics say about a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub src: PeerInfo,
    /// The address actually connected to (`peer:15008` for HBONE).
    pub dst_addr: SocketAddr,
    /// The HBONE target (`podIP:port`; `hostname:port` through an east-west gateway),
    /// when tunnelled.
    pub dst_hbone_addr: Option<HboneTarget>,
    /// The Service, when the client addressed a service VIP (or, inbound, the best guess
    /// among the destination workload's services).
    pub dst_service: Option<ServiceInfo>,
    pub dst: PeerInfo,
    pub mtls: bool,
}

impl ConnectionInfo {
    fn reporter(&self) -> Reporter {
        match self.direction {
            Direction::Outbound => Reporter::source,
            Direction::Inbound => Reporter::destination,
        }
    }

    fn labels(&self) -> TrafficLabels {
        let mut l = TrafficLabels::unknown(self.reporter());
        let set = |slot: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                slot.clone_from(v);
            }
        };
        set(&mut l.source_workload, &self.src.workload);
        set(&mut l.source_workload_namespace, &self.src.namespace);
        set(&mut l.source_cluster, &self.src.cluster);
        set(&mut l.source_region, &self.src.region);
        set(&mut l.source_zone, &self.src.zone);
        set(&mut l.source_canonical_service, &self.src.canonical_service);
        set(
            &mut l.source_canonical_revision,
            &self.src.canonical_revision,
        );
        set(&mut l.source_app, &self.src.canonical_service);
        set(&mut l.source_version, &self.src.canonical_revision);
        // As upstream: only a proven source identity (mTLS) is a principal.
        if let Some(id) = &self.src.identity {
            l.source_principal = id.to_string();
        }
        set(&mut l.destination_workload, &self.dst.workload);
        set(&mut l.destination_workload_namespace, &self.dst.namespace);
        set(&mut l.destination_cluster, &self.dst.cluster);
        set(&mut l.destination_region, &self.dst.region);
        set(&mut l.destination_zone, &self.dst.zone);
        set(
            &mut l.destination_canonical_service,
            &self.dst.canonical_service,
        );
        set(
            &mut l.destination_canonical_revision,
            &self.dst.canonical_revision,
        );
        set(&mut l.destination_app, &self.dst.canonical_service);
        set(&mut l.destination_version, &self.dst.canonical_revision);
        if let Some(id) = self.dst.principal() {
            l.destination_principal = id.to_string();
        }
        if let Some(svc) = &self.dst_service {
            let non_empty = |slot: &mut String, v: &str| {
                if !v.is_empty() {
                    *slot = v.to_string();
                }
            };
            non_empty(&mut l.destination_service, &svc.hostname);
            non_empty(&mut l.destination_service_name, &svc.name);
            non_empty(&mut l.destination_service_namespace, &svc.namespace);
        }
        if self.mtls {
            l.connection_security_policy = "mutual_tls".to_string();
        }
        l
    }
}

/// One `access` event at `$level` about the connection `$info` (a `&ConnectionInfo`): its
/// endpoints and direction (the fields in the order the module documentation lists), then
/// `$extra`.
macro_rules! access_event {
    ($level:ident, $info:expr, $message:literal, { $($extra:tt)* }) => {{
        let info: &ConnectionInfo = $info;
        tracing::$level!(
            target: "access",
            {
            src.addr = %info.src_addr,
            src.workload = info.src.log_name(),
            src.namespace = info.src.namespace.as_deref(),
            src.identity = info.src.identity.as_ref().map(display),
            src.cluster = info.src.cluster.as_deref(),
            dst.addr = %info.dst_addr,
            dst.hbone_addr = info.dst_hbone_addr.as_ref().map(display),
            dst.service = info.dst_service.as_ref().map(|s| s.hostname.as_str()),
            dst.workload = info.dst.log_name(),
            dst.namespace = info.dst.namespace.as_deref(),
            dst.identity = info.dst.identity.as_ref().map(display),
            dst.cluster = info.dst.cluster.as_deref(),
            direction = info.direction.as_str(),
            $($extra)*
            },
            $message
        )
    }};
}

/// Telemetry of one open connection. Call [`Self::close`] when it ends; dropping it without
/// closing (task cancelled, drain deadline) records it as failed with "connection aborted",
/// with the bytes its copy moved (see [`Self::count_bytes`]).
pub struct ConnectionTelemetry {
    info: ConnectionInfo,
    labels: TrafficLabels,
    metrics: Arc<ProxyMetrics>,
    /// `istio_tcp_sockets_open` of this connection's reporter; `None` for an HBONE stream
    /// (its TCP connection is counted, [`SocketOpen`]).
    socket_gauge: Option<Gauge>,
    /// Id in `metrics.live` once the copy's bytes are counted.
    live: Option<u64>,
    start: Instant,
    /// `response_flags` of the closed/failed counters.
    flag: ResponseFlags,
    closed: bool,
}

impl ConnectionTelemetry {
    /// Counts the connection opened and logs it at debug.
    pub fn open(metrics: &Arc<ProxyMetrics>, info: ConnectionInfo) -> Self {
        let socket = SocketOpen::new(metrics, info.reporter());
        let mut t = Self::open_stream(metrics, info);
        t.socket_gauge = Some(socket.into_gauge());
        t
    }

    /// [`Self::open`] for one stream of an inbound HBONE connection: as upstream,
    /// `istio_tcp_sockets_open` counts the TCP connection carrying the streams
    /// ([`SocketOpen`], held by the connection's task), not each stream.
    pub fn open_stream(metrics: &Arc<ProxyMetrics>, info: ConnectionInfo) -> Self {
        let labels = info.labels();
        metrics.connections_opened.get_or_create(&labels).inc();
        let socket_gauge = None;
        access_event!(debug, &info, "connection opened", {});
        ConnectionTelemetry {
            info,
            labels,
            metrics: metrics.clone(),
            socket_gauge,
            live: None,
            start: Instant::now(),
            flag: ResponseFlags::None,
            closed: false,
        }
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// From now on the byte counters follow `source`, the copy's live counters (read at
    /// every scrape and at the end; the copy itself only adds to its atomics).
    /// `request_to_tunnel`: the source's `to_tunnel` direction is source → destination.
    /// Only the first call counts.
    pub fn count_bytes(&mut self, source: Arc<dyn ByteSource>, request_to_tunnel: bool) {
        if self.live.is_some() || self.closed {
            return;
        }
        let m = &self.metrics;
        let mut live = Live {
            source,
            request_to_tunnel,
            base: (0, 0),
            flushed: (0, 0),
            received: m.received_bytes.get_or_create(&self.labels).clone(),
            sent: m.sent_bytes.get_or_create(&self.labels).clone(),
        };
        live.base = live.totals();
        live.flushed = live.base;
        self.live = Some(m.live.enter(live));
    }

    /// Records the end of the connection: counters and the access-log line.
    /// `sent` = source → destination bytes, `recv` = destination → source bytes. After
    /// [`Self::count_bytes`], the byte counters take what the live counters show instead.
    pub fn close(mut self, sent: u64, recv: u64, error: Option<&str>) {
        self.record(Some((sent, recv)), error);
    }

    /// [`Self::close`] with a `response_flags` value on the closed/failed counters.
    pub fn close_with_flag(
        mut self,
        sent: u64,
        recv: u64,
        error: Option<&str>,
        flag: ResponseFlags,
    ) {
        self.flag = flag;
        self.record(Some((sent, recv)), error);
    }

    /// `bytes`: `(sent, recv)` as the caller knows them; `None` (dropped): what the live
    /// counters show.
    fn record(&mut self, bytes: Option<(u64, u64)>, error: Option<&str>) {
        if self.closed {
            return;
        }
        self.closed = true;
        // As upstream: an error without a more precise flag is `CONNECT`, and every
        // connection that ends with a flag (established or not) counts as failed. The
        // flag labels only these two counters; the byte counters keep the opening labels.
        if error.is_some() && self.flag == ResponseFlags::None {
            self.flag = ResponseFlags::ConnectionFailure;
        }
        let m = &self.metrics;
        if let Some(g) = &self.socket_gauge {
            g.dec();
        }
        let mut ended = self.labels.clone();
        ended.response_flags = self.flag.as_str().to_string();
        m.connections_closed.get_or_create(&ended).inc();
        if self.flag != ResponseFlags::None {
            m.connections_failed.get_or_create(&ended).inc();
        }
        // Counted live: the final flush adds the rest. Otherwise the caller's numbers.
        let counted = self.live.take().and_then(|id| m.live.finish(id));
        if counted.is_none()
            && let Some((sent, recv)) = bytes
        {
            if sent > 0 {
                m.received_bytes.get_or_create(&self.labels).inc_by(sent);
            }
            if recv > 0 {
                m.sent_bytes.get_or_create(&self.labels).inc_by(recv);
            }
        }
        let (sent, recv) = bytes.or(counted).unwrap_or((0, 0));
        let info = &self.info;
        // The reporter's point of view (upstream "unflips" only for the source).
        let (sent, recv) = match info.direction {
            Direction::Outbound => (sent, recv),
            Direction::Inbound => (recv, sent),
        };
        let duration = format!("{}ms", self.start.elapsed().as_millis());
        macro_rules! complete {
            ($level:ident, { $($extra:tt)* }) => {
                access_event!($level, info, "connection complete", {
                    bytes_sent = sent,
                    bytes_recv = recv,
                    duration = duration.as_str(),
                    $($extra)*
                })
            };
        }
        match error {
            Some(e) => complete!(error, { error = e }),
            None => complete!(info, {}),
        }
    }
}

/// One accepted socket in `istio_tcp_sockets_open{reporter}` while held (upstream counts
/// sockets from accept to close: an inbound HBONE connection once, whatever its streams).
pub struct SocketOpen(Option<Gauge>);

impl SocketOpen {
    pub fn new(metrics: &ProxyMetrics, reporter: Reporter) -> Self {
        let gauge = metrics
            .sockets_open
            .get_or_create(&SocketLabels { reporter })
            .clone();
        gauge.inc();
        SocketOpen(Some(gauge))
    }

    /// The gauge, to be decremented by the new owner.
    fn into_gauge(mut self) -> Gauge {
        self.0
            .take()
            .expect("a SocketOpen holds its gauge until dropped")
    }
}

impl Drop for SocketOpen {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

/// A connection refused before it had an upstream (no route, nowhere to send it): as
/// upstream's ztunnel, only an access-log line (warn, "connection failed", with `error=`),
/// not counted as opened or closed in the `istio_tcp_*` families.
pub fn log_early_deny(
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    dst_service: Option<&str>,
    error: &str,
) {
    tracing::warn!(
        target: "access",
        {
        src.addr = %src,
        dst.addr = %dst,
        dst.service = dst_service,
        direction = direction.as_str(),
        error = error,
        },
        "connection failed"
    );
}

impl Drop for ConnectionTelemetry {
    fn drop(&mut self) {
        self.record(None, Some("connection aborted"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn counts_open_close_bytes_and_failures() {
        let mut reg = Registry::default();
        let m = Arc::new(ProxyMetrics::new(&mut reg));
        let info = ConnectionInfo {
            direction: Direction::Inbound,
            src_addr: "10.0.0.1:1234".parse().unwrap(),
            src: PeerInfo {
                workload: Some("sleep".into()),
                namespace: Some("default".into()),
                identity: Some(Identity::new("cluster.local", "default", "sleep")),
                ..Default::default()
            },
            dst_addr: "10.0.0.2:8080".parse().unwrap(),
            dst_hbone_addr: None,
            dst_service: Some(ServiceInfo {
                hostname: "echo.default.svc.cluster.local".into(),
                name: "echo".into(),
                namespace: "default".into(),
            }),
            dst: PeerInfo::default(),
            mtls: true,
        };
        let t = ConnectionTelemetry::open(&m, info.clone());
        t.close(100, 7, None);
        // Broke after the upstream connection was up: failed with CONNECT, as upstream.
        let broken = ConnectionTelemetry::open(&m, info.clone());
        broken.close(5, 0, Some("connection reset by peer"));
        let failed = ConnectionTelemetry::open(&m, info);
        drop(failed);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
                .to_string()
        };
        let opened = line("istio_tcp_connections_opened_total{");
        assert!(opened.ends_with(" 3"), "{opened}");
        assert!(opened.contains("reporter=\"destination\""), "{opened}");
        assert!(
            opened.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""),
            "{opened}"
        );
        assert!(opened.contains("connection_security_policy=\"mutual_tls\""));
        assert!(opened.contains("destination_service_name=\"echo\""));
        assert!(opened.contains("destination_service_namespace=\"default\""));
        assert!(opened.contains("destination_workload=\"unknown\""));
        let with_flag = |name: &str, flag: &str| {
            text.lines()
                .filter(|l| {
                    l.starts_with(name) && l.contains(&format!("response_flags=\"{flag}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let closed = "istio_tcp_connections_closed_total{";
        let failed = "istio_tcp_connections_failed_total{";
        assert_eq!(with_flag(closed, "-"), ["1"], "{text}");
        assert_eq!(with_flag(closed, "CONNECT"), ["2"], "{text}");
        assert_eq!(with_flag(failed, "CONNECT"), ["2"], "{text}");
        assert_eq!(with_flag(failed, "-"), Vec::<String>::new(), "{text}");
        // Bytes keep the opening labels (`-`), the broken connection's included.
        assert_eq!(
            with_flag("istio_tcp_received_bytes_total{", "-"),
            ["105"],
            "{text}"
        );
        assert!(line("istio_tcp_sent_bytes_total{").ends_with(" 7"));
        assert!(line("istio_tcp_sockets_open").ends_with(" 0"));
        let build = line("istio_build{");
        assert!(
            build.contains("component=\"ztunnel\"") && build.ends_with(" 1"),
            "{build}"
        );
    }

    #[test]
    fn principals_services_and_response_flags_as_upstream() {
        let mut reg = Registry::default();
        let m = Arc::new(ProxyMetrics::new(&mut reg));
        let w: Workload = serde_yaml_ng::from_str(
            "name: echo-1\nnamespace: ns\nserviceAccount: echo\ntrustDomain: td\n\
             workloadName: echo\ncanonicalName: echo-app\ncanonicalRevision: v3\nclusterId: c1\n\
             locality: {region: eu-west1, zone: eu-west1-b}\n",
        )
        .unwrap();
        let svc: Service =
            serde_yaml_ng::from_str("name: echo\nnamespace: svc-ns\nhostname: echo.example.com\n")
                .unwrap();
        // Plaintext: no proven identity, the configured one labels the principal.
        let info = ConnectionInfo {
            direction: Direction::Outbound,
            src_addr: "10.0.0.1:1234".parse().unwrap(),
            src: PeerInfo::default(),
            dst_addr: "10.0.0.2:80".parse().unwrap(),
            dst_hbone_addr: None,
            dst_service: Some(ServiceInfo::from_service(&svc)),
            dst: PeerInfo::from_workload(&w),
            mtls: false,
        };
        let l = info.labels();
        assert_eq!(l.destination_principal, "spiffe://td/ns/ns/sa/echo");
        assert_eq!(l.source_principal, "unknown");
        assert_eq!(l.destination_workload, "echo");
        assert_eq!(l.destination_app, "echo-app");
        assert_eq!(l.destination_version, "v3");
        assert_eq!(l.destination_canonical_service, "echo-app");
        assert_eq!(l.destination_cluster, "c1");
        // Locality labels as Istio's ztunnel: the workload's, `unknown` when not known.
        assert_eq!(
            (l.destination_region.as_str(), l.destination_zone.as_str()),
            ("eu-west1", "eu-west1-b")
        );
        assert_eq!(
            (l.source_region.as_str(), l.source_zone.as_str()),
            ("unknown", "unknown")
        );
        assert_eq!(l.destination_service, "echo.example.com");
        assert_eq!(l.destination_service_name, "echo");
        assert_eq!(l.destination_service_namespace, "svc-ns");
        assert_eq!(l.connection_security_policy, "unknown");
        assert_eq!(l.request_protocol, "tcp");
        let t = ConnectionTelemetry::open(&m, info);
        t.close_with_flag(
            0,
            0,
            Some("denied"),
            ResponseFlags::AuthorizationPolicyDenied,
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        let find = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} missing in\n{text}"))
                .to_string()
        };
        // Inbound plaintext from a known workload: its configured identity is not a
        // principal (nothing proved it), as upstream.
        let plain_in = ConnectionInfo {
            direction: Direction::Inbound,
            src_addr: "10.0.0.2:5555".parse().unwrap(),
            src: PeerInfo::from_workload(&w),
            dst_addr: "10.0.0.1:80".parse().unwrap(),
            dst_hbone_addr: None,
            dst_service: None,
            dst: PeerInfo::default(),
            mtls: false,
        };
        assert_eq!(plain_in.labels().source_principal, "unknown");
        assert_eq!(plain_in.labels().source_workload, "echo");
        assert!(find("istio_tcp_connections_opened_total{").contains("response_flags=\"-\""));
        assert!(find("istio_tcp_connections_closed_total{").contains("response_flags=\"DENY\""));
        assert!(find("istio_tcp_connections_failed_total{").contains("response_flags=\"DENY\""));
    }
}

#[cfg(test)]
mod log_format_tests {
    use super::*;
    use crate::test_logs::capture;
    use prometheus_client::registry::Registry;

    #[test]
    fn access_line_has_upstream_fields() {
        let m = Arc::new(ProxyMetrics::new(&mut Registry::default()));
        let out = capture(|| {
            let info = ConnectionInfo {
                direction: Direction::Outbound,
                src_addr: "10.0.0.1:1234".parse().unwrap(),
                src: PeerInfo {
                    workload: Some("sleep".into()),
                    namespace: Some("default".into()),
                    identity: Some(Identity::new("cluster.local", "default", "sleep")),
                    ..Default::default()
                },
                dst_addr: "10.0.0.2:15008".parse().unwrap(),
                dst_hbone_addr: Some(HboneTarget::Addr("10.0.0.2:80".parse().unwrap())),
                dst_service: None,
                dst: PeerInfo {
                    workload: Some("echo".into()),
                    namespace: Some("default".into()),
                    identity: Some(Identity::new("cluster.local", "default", "echo")),
                    ..Default::default()
                },
                mtls: true,
            };
            let t = ConnectionTelemetry::open(&m, info);
            t.close(5, 6, Some("boom"));
        });
        for want in [
            "ERROR access: connection complete",
            "src.addr=10.0.0.1:1234",
            "src.workload=\"sleep\"",
            "src.identity=spiffe://cluster.local/ns/default/sa/sleep",
            "dst.addr=10.0.0.2:15008",
            "dst.hbone_addr=10.0.0.2:80",
            "dst.identity=spiffe://cluster.local/ns/default/sa/echo",
            "direction=\"outbound\"",
            "bytes_sent=5",
            "bytes_recv=6",
            "error=\"boom\"",
        ] {
            assert!(out.contains(want), "{want} not in {out}");
        }
        assert!(!out.contains("dst.service"), "{out}");
    }

    #[test]
    fn inbound_lines_count_bytes_from_the_destination_and_name_pods_and_clusters() {
        let m = Arc::new(ProxyMetrics::new(&mut Registry::default()));
        let w: Workload = serde_yaml_ng::from_str(
            "name: echo-1\nnamespace: ns\nserviceAccount: echo\ntrustDomain: td\n\
             workloadName: echo\nclusterId: c1\n",
        )
        .unwrap();
        let out = capture(|| {
            let info = ConnectionInfo {
                direction: Direction::Inbound,
                src_addr: "10.0.0.1:1234".parse().unwrap(),
                src: PeerInfo::default(),
                dst_addr: "10.0.0.2:80".parse().unwrap(),
                dst_hbone_addr: None,
                dst_service: None,
                dst: PeerInfo::from_workload(&w),
                mtls: false,
            };
            // 100 request bytes in, 7 response bytes back.
            ConnectionTelemetry::open(&m, info).close(100, 7, None);
        });
        for want in [
            "direction=\"inbound\"",
            "bytes_sent=7 bytes_recv=100",
            "dst.workload=\"echo-1\"",
            "dst.cluster=\"c1\"",
        ] {
            assert!(out.contains(want), "{want} not in {out}");
        }
    }
}
