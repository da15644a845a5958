//! CA metrics (`/metrics` on `METRICS_PORT`): requests by outcome and the
//! expiry of the root and signing certificates.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::http_endpoint;

/// Outcome label of a CreateCertificate call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `issued`, `unauthenticated`, `permission_denied`, `invalid_argument`,
    /// `unavailable`, `internal`.
    pub outcome: String,
}

/// The CA's metric families.
#[derive(Clone)]
pub struct CaMetrics {
    registry: Arc<Registry>,
    requests: Family<OutcomeLabels, Counter>,
    root_expiry: Gauge<i64, AtomicI64>,
    ca_expiry: Gauge<i64, AtomicI64>,
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CaMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "mesh_ca_requests",
            "CreateCertificate requests by outcome",
            requests.clone(),
        );
        let root_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "mesh_ca_root_cert_expiry_timestamp_seconds",
            "Unix time at which the trust root expires",
            root_expiry.clone(),
        );
        let ca_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "mesh_ca_signing_cert_expiry_timestamp_seconds",
            "Unix time at which the signing certificate (ca-cert.pem) expires",
            ca_expiry.clone(),
        );
        CaMetrics {
            registry: Arc::new(registry),
            requests,
            root_expiry,
            ca_expiry,
        }
    }

    pub fn count(&self, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Requests counted with `outcome` so far.
    pub fn count_of(&self, outcome: &str) -> u64 {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .get()
    }

    pub fn set_expiry(&self, root_unix: i64, ca_unix: i64) {
        self.root_expiry.set(root_unix);
        self.ca_expiry.set(ca_unix);
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, metrics: CaMetrics, shutdown: impl Future<Output = ()>) {
    let answer = move |req: &_| http_endpoint::metrics(req, "/metrics", || metrics.encode());
    http_endpoint::serve("ca metrics", listener, answer, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_outcomes_and_expiry() {
        let m = CaMetrics::new();
        m.count("issued");
        m.count("issued");
        m.count("permission_denied");
        m.set_expiry(2_000_000_000, 1_900_000_000);
        let text = m.encode();
        assert!(
            text.contains("mesh_ca_requests_total{outcome=\"issued\"} 2"),
            "{text}"
        );
        assert!(text.contains("mesh_ca_requests_total{outcome=\"permission_denied\"} 1"));
        assert!(text.contains("mesh_ca_root_cert_expiry_timestamp_seconds 2000000000"));
        assert_eq!(m.count_of("issued"), 2);
    }
}
