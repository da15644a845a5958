//! The DNS proxy's metric families, with upstream's names and labels:
//! `istio_dns_requests_total` (every query), `istio_dns_upstream_requests_total` and
//! `istio_dns_upstream_failures_total` (queries forwarded to the upstream resolvers), and
//! `istio_dns_upstream_request_duration_seconds`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Labels of every DNS family. Unknown values are `"unknown"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// `a`, `aaaa`, `srv`, ... (lower case).
    pub request_query_type: String,
    /// `udp` or `tcp`.
    pub request_protocol: &'static str,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

impl DnsLabels {
    /// The labels of a query of `query_type` over `protocol` from a workload with
    /// `source` (canonical service, revision); unknown or empty values are `"unknown"`,
    /// as upstream.
    pub fn new(query_type: String, protocol: &'static str, source: Option<(&str, &str)>) -> Self {
        let or_unknown = |v: Option<&str>| match v {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => "unknown".to_string(),
        };
        DnsLabels {
            request_query_type: or_unknown(Some(&query_type)),
            request_protocol: protocol,
            source_canonical_service: or_unknown(source.map(|s| s.0)),
            source_canonical_revision: or_unknown(source.map(|s| s.1)),
        }
    }
}

/// Upstream's buckets for the forwarding duration.
#[derive(Clone)]
pub struct DurationBuckets;

impl MetricConstructor<Histogram> for DurationBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new([0.0005, 0.001, 0.01, 0.1, 1.0, 5.0])
    }
}

#[derive(Clone)]
pub struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Family<DnsLabels, Histogram, DurationBuckets>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(DurationBuckets),
        }
    }
}

impl std::fmt::Debug for DnsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsMetrics")
    }
}

impl DnsMetrics {
    /// Registers the families under `istio_` in `istio` (the prefixed sub-registry).
    pub fn register(&self, istio: &mut Registry) {
        istio.register(
            "dns_requests",
            "Total number of DNS requests (unstable)",
            self.requests.clone(),
        );
        istio.register(
            "dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream (unstable)",
            self.upstream_requests.clone(),
        );
        istio.register(
            "dns_upstream_failures",
            "Total number of DNS requests that failed to forward upstream (unstable)",
            self.upstream_failures.clone(),
        );
        istio.register_with_unit(
            "dns_upstream_request_duration",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_upstream_names() {
        let m = DnsMetrics::default();
        let mut registry = Registry::default();
        m.register(registry.sub_registry_with_prefix("istio"));
        let labels = DnsLabels::new("a".into(), "udp", None);
        m.requests.get_or_create(&labels).inc();
        m.upstream_duration.get_or_create(&labels).observe(0.002);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\",\
             source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("istio_dns_upstream_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("le=\"0.01\""), "{text}");
    }

    #[test]
    fn empty_source_labels_are_unknown() {
        // A workload without canonical labels (upstream's `DefaultedUnknown`).
        let l = DnsLabels::new("aaaa".into(), "tcp", Some(("", "")));
        assert_eq!(l.source_canonical_service, "unknown");
        assert_eq!(l.source_canonical_revision, "unknown");
        let l = DnsLabels::new("a".into(), "udp", Some(("web", "v1")));
        assert_eq!(
            (
                l.source_canonical_service.as_str(),
                l.source_canonical_revision.as_str()
            ),
            ("web", "v1")
        );
        assert_eq!(l.request_query_type, "a");
        assert_eq!(l.request_protocol, "udp");
    }
}
