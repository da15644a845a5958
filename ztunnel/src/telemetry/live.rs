//! Byte counts of open connections, visible in `/metrics` while the connections last.
//!
//! The copy loops count into per-connection atomics (one atomic add per write, nothing
//! else). Once a connection's copy starts, its telemetry enters it here with those atomics
//! ([`ByteSource`]) and its two labelled byte counters, taken once. What it copied since the
//! last flush is added to `istio_tcp_received_bytes_total` / `istio_tcp_sent_bytes_total`
//! on every scrape ([`ByteFamilies`] flushes before encoding them) and when the connection
//! ends, closed or dropped (drain deadline). The lock here is taken when a connection
//! starts or ends and per scrape, never per read or write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::metrics::TrafficLabels;

/// Live byte counts of one connection's copy (the proxy's per-connection counters).
pub trait ByteSource: Send + Sync + 'static {
    /// `(to_tunnel, from_tunnel)` so far: the copy's two directions.
    fn load(&self) -> (u64, u64);
}

/// One connection whose bytes are being counted.
pub(super) struct Live {
    pub source: Arc<dyn ByteSource>,
    /// The copy's `to_tunnel` direction is source → destination (request bytes).
    pub request_to_tunnel: bool,
    /// `(request, response)` the source showed when the connection was entered (not its
    /// bytes).
    pub base: (u64, u64),
    /// `(request, response)` the source showed at the last flush.
    pub flushed: (u64, u64),
    /// `istio_tcp_received_bytes_total` of the connection's labels (request bytes).
    pub received: Counter,
    /// `istio_tcp_sent_bytes_total` of the connection's labels (response bytes).
    pub sent: Counter,
}

impl Live {
    /// `(request, response)` bytes the source shows now.
    pub fn totals(&self) -> (u64, u64) {
        let (to, from) = self.source.load();
        if self.request_to_tunnel {
            (to, from)
        } else {
            (from, to)
        }
    }

    /// Adds what was copied since the last flush to the counters.
    fn flush(&mut self) {
        let (req, resp) = self.totals();
        let (done_req, done_resp) = self.flushed;
        if req > done_req {
            self.received.inc_by(req - done_req);
        }
        if resp > done_resp {
            self.sent.inc_by(resp - done_resp);
        }
        self.flushed = (req.max(done_req), resp.max(done_resp));
    }
}

/// The connections whose bytes are being counted, by id.
#[derive(Default)]
pub struct LiveConnections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Live>>,
}

impl std::fmt::Debug for LiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConnections")
            .field("open", &self.len())
            .finish()
    }
}

impl LiveConnections {
    pub(super) fn enter(&self, live: Live) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, live);
        id
    }

    /// Final flush of connection `id`; returns its `(request, response)` bytes since entered.
    pub(super) fn finish(&self, id: u64) -> Option<(u64, u64)> {
        // Flushed outside the lock: nobody else sees this entry any more.
        let mut live = self.lock().remove(&id)?;
        live.flush();
        Some((live.flushed.0 - live.base.0, live.flushed.1 - live.base.1))
    }

    /// Adds every open connection's new bytes to the counters.
    pub fn flush(&self) {
        for live in self.lock().values_mut() {
            live.flush();
        }
    }

    /// Connections being counted.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Encodes the two byte families after flushing the open connections into them.
#[derive(Debug)]
pub(super) struct ByteFamilies {
    pub live: Arc<LiveConnections>,
    pub received: Family<TrafficLabels, Counter>,
    pub sent: Family<TrafficLabels, Counter>,
}

impl Collector for ByteFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.live.flush();
        let families = [
            (
                "tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection",
                &self.received,
            ),
            (
                "tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection",
                &self.sent,
            ),
        ];
        for (name, help, family) in families {
            if EncodeMetric::is_empty(family) {
                continue;
            }
            let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
            family.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, ProxyMetrics};
    use super::*;
    use prometheus_client::registry::Registry;

    #[derive(Default)]
    struct Copy {
        to: AtomicU64,
        from: AtomicU64,
    }

    impl ByteSource for Copy {
        fn load(&self) -> (u64, u64) {
            (
                self.to.load(Ordering::Relaxed),
                self.from.load(Ordering::Relaxed),
            )
        }
    }

    fn info(direction: Direction) -> ConnectionInfo {
        ConnectionInfo {
            direction,
            src_addr: "10.0.0.1:1234".parse().unwrap(),
            src: PeerInfo::default(),
            dst_addr: "10.0.0.2:8080".parse().unwrap(),
            dst_hbone_addr: None,
            dst_service: None,
            dst: PeerInfo::default(),
            mtls: false,
        }
    }

    fn scrape(reg: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, reg).unwrap();
        text
    }

    fn sample(text: &str, prefix: &str) -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// Bytes show while the connection is open (each scrape adds what was copied since the
    /// previous one, never twice), and a connection dropped without a close (drain
    /// deadline) still counts everything it copied.
    #[test]
    fn bytes_count_while_open_and_when_dropped() {
        let mut reg = Registry::default();
        let m = Arc::new(ProxyMetrics::new(&mut reg));
        let copy = Arc::new(Copy::default());
        copy.to.store(5, Ordering::Relaxed); // before the copy: not this connection's
        let mut t = ConnectionTelemetry::open(&m, info(Direction::Inbound));
        // Inbound HBONE: the copy's to_tunnel is the response.
        t.count_bytes(copy.clone(), false);
        copy.from.fetch_add(1000, Ordering::Relaxed);
        copy.to.fetch_add(300, Ordering::Relaxed);
        let text = scrape(&reg);
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total{"), 1000);
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total{"), 300);
        let text = scrape(&reg);
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total{"), 1000);
        assert_eq!(
            sample(&text, "istio_tcp_sockets_open{reporter=\"destination\"}"),
            1
        );
        copy.from.fetch_add(24, Ordering::Relaxed);
        drop(t);
        assert!(m.live.is_empty());
        let text = scrape(&reg);
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total{"), 1024);
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total{"), 300);
        assert_eq!(sample(&text, "istio_tcp_connections_closed_total{"), 1);
        assert_eq!(sample(&text, "istio_tcp_sockets_open{"), 0);
    }

    /// A close counts the rest once, whatever the caller passes; later copies are ignored.
    #[test]
    fn close_flushes_the_rest_once() {
        let mut reg = Registry::default();
        let m = Arc::new(ProxyMetrics::new(&mut reg));
        let copy = Arc::new(Copy::default());
        let mut t = ConnectionTelemetry::open(&m, info(Direction::Outbound));
        t.count_bytes(copy.clone(), true);
        copy.to.fetch_add(70, Ordering::Relaxed);
        assert_eq!(sample(&scrape(&reg), "istio_tcp_received_bytes_total{"), 70);
        copy.to.fetch_add(30, Ordering::Relaxed);
        copy.from.fetch_add(9, Ordering::Relaxed);
        t.close(100, 9, None);
        copy.to.fetch_add(1, Ordering::Relaxed);
        let text = scrape(&reg);
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total{"), 100);
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total{"), 9);
        assert!(
            text.contains("istio_tcp_sockets_open{reporter=\"source\"} 0"),
            "{text}"
        );
    }
}
