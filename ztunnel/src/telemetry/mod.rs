//! Metrics (Prometheus, Istio names) and the per-connection access log.
//!
//! Entry points for the proxy:
//! - [`metrics::ProxyMetrics::new`] registers the `istio_tcp_*` families into a registry;
//! - [`ConnectionTelemetry::open`] at the start of a connection (counts it opened, logs
//!   "connection opened" at debug), [`ConnectionTelemetry::close`] at its end (closed and
//!   byte counters, the access-log line at info, or at error with `error=`);
//!   [`ConnectionTelemetry::count_bytes`] once the copy starts, so the byte counters grow
//!   while the connection is open (flushed at every scrape, [`live`]);
//! - [`metrics::ProxyMetrics::refused`] for connections refused before they had a destination
//!   (TLS failures, identity mismatches, malformed requests), with [`log_early_deny`] for
//!   the outbound ones that found no route (logged, not counted in `istio_tcp_*`, as
//!   upstream).

pub mod access_log;
pub mod dns_metrics;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod runtime;

pub use access_log::{
    ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, ServiceInfo, SocketOpen,
    log_early_deny,
};
pub use live::ByteSource;
pub use metrics::{
    OnDemandDnsLabels, ProxyMetrics, RefusalReason, Reporter, ResponseFlags, TrafficLabels,
};
