//! The xDS client's metrics, with upstream's names (registered under the `istio`
//! prefix): `istio_xds_connection_terminations_total{reason}`,
//! `istio_xds_message_total{url}` and `istio_xds_message_bytes_total{url}`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

/// Why a stream ended, as upstream counts it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Termination {
    /// istiod could not be reached (connect, TLS, token, root).
    ConnectionError,
    /// The stream failed with an error status.
    Error,
    /// istiod ended the stream as it does routinely (max connection age, GOAWAY,
    /// cancellation): reconnect at once.
    Reconnect,
    /// The stream ended without an error.
    Complete,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Termination,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrlLabel {
    url: String,
}

/// Counters shared with the registry (cloning shares them).
#[derive(Debug, Clone, Default)]
pub struct XdsMetrics {
    terminations: Family<ReasonLabel, Counter>,
    messages: Family<UrlLabel, Counter>,
    bytes: Family<UrlLabel, Counter>,
}

impl XdsMetrics {
    /// Registers the families in `registry` (give it the `istio`-prefixed one).
    pub fn new(registry: &mut Registry) -> XdsMetrics {
        let m = XdsMetrics::default();
        registry.register(
            "xds_connection_terminations",
            "Streams to the xDS server that ended, by reason",
            m.terminations.clone(),
        );
        registry.register(
            "xds_message",
            "xDS responses received, by type URL",
            m.messages.clone(),
        );
        registry.register_with_unit(
            "xds_message",
            "Bytes of resources received over xDS, by type URL",
            Unit::Bytes,
            m.bytes.clone(),
        );
        m
    }

    pub fn terminated(&self, reason: Termination) {
        self.terminations
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// One response of `type_url` carrying `bytes` of resources.
    pub fn received(&self, type_url: &str, bytes: u64) {
        let label = UrlLabel {
            url: type_url.to_string(),
        };
        self.messages.get_or_create(&label).inc();
        self.bytes.get_or_create(&label).inc_by(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names_and_labels() {
        let mut registry = Registry::default();
        let m = XdsMetrics::new(registry.sub_registry_with_prefix("istio"));
        m.terminated(Termination::Reconnect);
        m.received("type.googleapis.com/istio.workload.Address", 120);
        m.received("type.googleapis.com/istio.workload.Address", 30);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "istio_xds_connection_terminations_total{reason=\"Reconnect\"} 1",
            "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 2",
            "istio_xds_message_bytes_total{url=\"type.googleapis.com/istio.workload.Address\"} 150",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
