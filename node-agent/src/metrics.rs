//! The agent's Prometheus metrics and the `/metrics` endpoint
//! (`METRICS_PORT`, 15014, all addresses).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `node_agent_pods_enrolled` | gauge | pods whose redirection is complete |
//! | `node_agent_pods_pending` | gauge | pods redirected but not yet taken by ztunnel (annotated `pending`) |
//! | `node_agent_redirection_failures_total{operation,retryable}` | counter | failed enrol/unenrol operations |
//! | `node_agent_reconcile_duration_seconds{operation}` | histogram | start-up reconcile, per-pod enrol/unenrol, CNI ADD |
//! | `node_agent_cni_add_total{result}` | counter | CNI ADD events: `enrolled`, `not_ambient`, `refused` |
//! | `node_agent_ztunnel_connected` | gauge | 1 while a ztunnel is connected (in-pod) / the active ztunnel is set (GENEVE) |
//! | `istio_cni_install_ready` | gauge | 1 while the plugin and its config entry are installed (upstream istio-cni's name, so its alerts work) |

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::http_endpoint;

pub const METRICS_PATH: &str = "/metrics";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `enrol` or `unenrol`.
    pub operation: &'static str,
    pub retryable: bool,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `startup`, `enrol`, `unenrol`, `cni_add`.
    pub operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `enrolled`, `not_ambient`, `refused`.
    pub result: &'static str,
}

/// The agent's metric families; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    pub pods_enrolled: Gauge<i64, AtomicI64>,
    pub pods_pending: Gauge<i64, AtomicI64>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<OperationLabels, Histogram>,
    pub cni_add: Family<ResultLabels, Counter>,
    pub ztunnel_connected: Gauge<i64, AtomicI64>,
    pub install_ready: Gauge<i64, AtomicI64>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let pods_enrolled = Gauge::<i64, AtomicI64>::default();
        r.register(
            "node_agent_pods_enrolled",
            "Pods whose redirection is complete",
            pods_enrolled.clone(),
        );
        let pods_pending = Gauge::<i64, AtomicI64>::default();
        r.register(
            "node_agent_pods_pending",
            "Pods redirected but not yet taken by ztunnel",
            pods_pending.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        r.register(
            "node_agent_redirection_failures",
            "Failed enrol and unenrol operations",
            failures.clone(),
        );
        let duration =
            Family::<OperationLabels, Histogram>::new_with_constructor(new_duration_histogram);
        r.register(
            "node_agent_reconcile_duration_seconds",
            "Duration of reconcile operations",
            duration.clone(),
        );
        let cni_add = Family::<ResultLabels, Counter>::default();
        r.register(
            "node_agent_cni_add",
            "CNI ADD events handled, by result",
            cni_add.clone(),
        );
        let ztunnel_connected = Gauge::<i64, AtomicI64>::default();
        r.register(
            "node_agent_ztunnel_connected",
            "1 while a ztunnel can take pods",
            ztunnel_connected.clone(),
        );
        let install_ready = Gauge::<i64, AtomicI64>::default();
        r.register(
            "istio_cni_install_ready",
            "1 while the CNI plugin and its config entry are installed",
            install_ready.clone(),
        );
        Self {
            registry: Arc::new(r),
            pods_enrolled,
            pods_pending,
            failures,
            duration,
            cni_add,
            ztunnel_connected,
            install_ready,
        }
    }

    pub fn observe(&self, operation: &'static str, elapsed: Duration) {
        self.duration
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    pub fn failure(&self, operation: &'static str, retryable: bool) {
        self.failures
            .get_or_create(&FailureLabels {
                operation,
                retryable,
            })
            .inc();
    }

    pub fn cni_add(&self, result: &'static str) {
        self.cni_add.get_or_create(&ResultLabels { result }).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn new_duration_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: AgentMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let answer = move |req: &_| http_endpoint::metrics(req, METRICS_PATH, || metrics.render());
    http_endpoint::serve("metrics", listener, answer, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_their_names() {
        let m = AgentMetrics::new();
        m.pods_enrolled.set(3);
        m.failure("enrol", true);
        m.observe("startup", Duration::from_millis(12));
        m.cni_add("enrolled");
        m.ztunnel_connected.set(1);
        let text = m.render();
        for want in [
            "node_agent_pods_enrolled 3",
            "node_agent_redirection_failures_total{operation=\"enrol\",retryable=\"true\"} 1",
            "node_agent_reconcile_duration_seconds_count{operation=\"startup\"} 1",
            "node_agent_cni_add_total{result=\"enrolled\"} 1",
            "node_agent_ztunnel_connected 1",
            "istio_cni_install_ready 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
