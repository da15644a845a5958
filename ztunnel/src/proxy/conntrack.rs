//! Open connections of one proxy: a count that drain waits on, and a list for `/debug`.
//!
//! Every accepted connection (and every inbound HBONE stream) is entered with its source;
//! once the proxy knows where it goes and the bytes start flowing, [`ConnGuard::set_tunnel`]
//! adds the destination, identities and service and hands the counters to the
//! connection's telemetry; the copy counts bytes into [`ConnGuard::counters`], so
//! `/debug/connections` and the byte metrics show live counts.
//! Authorized inbound connections also carry what they were authorized with
//! ([`ConnGuard::set_authorized`]), for the policy watcher ([`super::policy_watch`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;

use super::policy_watch::Authorized;
use crate::hbone::ByteCounters;
use crate::hbone::headers::HboneTarget;
use crate::telemetry::{ByteSource, ConnectionTelemetry, Direction};

/// One open connection as `/debug/connections` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionSummary {
    pub id: u64,
    pub direction: &'static str,
    /// `hbone` for an accepted HBONE TCP connection (it carries streams), `hbone_stream` for
    /// one tunnel on it, else the listener that accepted it.
    pub kind: &'static str,
    pub src: SocketAddr,
    /// The address connected to (`peer:15008` for an outbound tunnel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
    /// The HBONE target (`:authority`), when tunnelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hbone_target: Option<HboneTarget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<String>,
    /// Source → destination bytes so far.
    pub bytes_sent: u64,
    /// Destination → source bytes so far.
    pub bytes_recv: u64,
    pub started: String,
    pub age_ms: u64,
}

struct Entry {
    summary: ConnectionSummary,
    since: Instant,
    counters: Arc<ByteCounters>,
    /// The copy's `to_tunnel` direction is source → destination.
    request_to_tunnel: bool,
    /// Set once the inbound connection passed authorization.
    authorized: Option<Arc<Authorized>>,
}

impl Entry {
    fn snapshot(&self) -> ConnectionSummary {
        let (to, from) = self.counters.load();
        let (sent, recv) = if self.request_to_tunnel {
            (to, from)
        } else {
            (from, to)
        };
        ConnectionSummary {
            bytes_sent: sent,
            bytes_recv: recv,
            age_ms: self.since.elapsed().as_millis() as u64,
            ..self.summary.clone()
        }
    }
}

#[derive(Default)]
pub struct ConnTracker {
    count: AtomicUsize,
    next: AtomicU64,
    idle: Notify,
    open: Mutex<HashMap<u64, Entry>>,
}

/// Unregisters the connection when dropped.
pub struct ConnGuard {
    tracker: Arc<ConnTracker>,
    id: u64,
    counters: Arc<ByteCounters>,
}

impl ConnTracker {
    pub fn enter(
        self: &Arc<Self>,
        direction: Direction,
        kind: &'static str,
        src: SocketAddr,
    ) -> ConnGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.count.fetch_add(1, Ordering::AcqRel);
        let counters = Arc::new(ByteCounters::default());
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Entry {
                summary: ConnectionSummary {
                    id,
                    direction: direction.as_str(),
                    kind,
                    src,
                    dst: None,
                    hbone_target: None,
                    src_identity: None,
                    dst_identity: None,
                    src_workload: None,
                    dst_workload: None,
                    dst_service: None,
                    bytes_sent: 0,
                    bytes_recv: 0,
                    started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                    age_ms: 0,
                },
                since: Instant::now(),
                counters: counters.clone(),
                request_to_tunnel: true,
                authorized: None,
            },
        );
        ConnGuard {
            tracker: self.clone(),
            id,
            counters,
        }
    }

    pub fn active(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The open connections that passed inbound authorization.
    pub(crate) fn authorized(&self) -> Vec<Arc<Authorized>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|e| e.authorized.clone())
            .collect()
    }

    pub fn list(&self) -> Vec<ConnectionSummary> {
        let mut v: Vec<ConnectionSummary> = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Entry::snapshot)
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }
}

impl ConnGuard {
    fn update(&self, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self
            .tracker
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.id)
        {
            f(e);
        }
    }

    pub fn set_dst(&self, dst: SocketAddr) {
        self.update(|e| e.summary.dst = Some(dst));
    }

    /// Records where the connection goes and who the ends are, and lets `tele`'s byte
    /// metrics follow this connection's counters. `request_to_tunnel`: the copy's
    /// `to_tunnel` direction is source → destination (outbound), not the reverse (inbound
    /// HBONE streams).
    pub fn set_tunnel(&self, tele: &mut ConnectionTelemetry, request_to_tunnel: bool) {
        self.count_bytes(tele, request_to_tunnel);
        let info = tele.info();
        self.update(|e| {
            let s = &mut e.summary;
            s.dst = Some(info.dst_addr);
            s.hbone_target = info.dst_hbone_addr.clone();
            s.src_identity = info.src.identity.as_ref().map(|i| i.to_string());
            s.dst_identity = info.dst.identity.as_ref().map(|i| i.to_string());
            s.src_workload.clone_from(&info.src.workload);
            s.dst_workload.clone_from(&info.dst.workload);
            s.dst_service = info.dst_service.as_ref().map(|d| d.hostname.clone());
            e.request_to_tunnel = request_to_tunnel;
        });
    }

    /// Records what the connection was authorized with (see [`super::policy_watch`]).
    pub(crate) fn set_authorized(&self, auth: Arc<Authorized>) {
        self.update(|e| e.authorized = Some(auth));
    }

    /// Lets one more telemetry (node-local: both reporters) count this connection's bytes.
    pub fn count_bytes(&self, tele: &mut ConnectionTelemetry, request_to_tunnel: bool) {
        tele.count_bytes(self.counters.clone(), request_to_tunnel);
    }

    /// Where the copy of this connection counts its bytes.
    pub fn counters(&self) -> &ByteCounters {
        &self.counters
    }
}

impl ByteSource for ByteCounters {
    fn load(&self) -> (u64, u64) {
        ByteCounters::load(self)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.tracker
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if self.tracker.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_idle_resolves_when_last_connection_ends() {
        let t = Arc::new(ConnTracker::default());
        let g1 = t.enter(Direction::Inbound, "hbone", "1.1.1.1:1".parse().unwrap());
        let g2 = t.enter(
            Direction::Outbound,
            "outbound",
            "1.1.1.1:2".parse().unwrap(),
        );
        g2.set_dst("2.2.2.2:80".parse().unwrap());
        assert_eq!(t.list().len(), 2);
        assert_eq!(t.list()[1].dst, Some("2.2.2.2:80".parse().unwrap()));
        assert_eq!((t.list()[1].bytes_sent, t.list()[1].bytes_recv), (0, 0));
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait_idle().await }
        });
        drop(g1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g2);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.active(), 0);
    }

    #[test]
    fn tunnel_details_and_live_bytes() {
        use crate::identity::Identity;
        use crate::telemetry::{ConnectionInfo, PeerInfo, ProxyMetrics, ServiceInfo};
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(ProxyMetrics::new(&mut registry));
        let t = Arc::new(ConnTracker::default());
        let info = ConnectionInfo {
            direction: Direction::Inbound,
            src_addr: "10.0.0.1:5000".parse().unwrap(),
            src: PeerInfo::default().with_identity(Some(Identity::new("td", "a", "sa-a"))),
            dst_addr: "10.0.0.2:15008".parse().unwrap(),
            dst_hbone_addr: Some(HboneTarget::Addr("10.0.0.2:8080".parse().unwrap())),
            dst_service: Some(ServiceInfo {
                hostname: "b.ns.svc".into(),
                name: "b".into(),
                namespace: "ns".into(),
            }),
            dst: PeerInfo {
                workload: Some("b".into()),
                ..Default::default()
            }
            .with_identity(Some(Identity::new("td", "b", "sa-b"))),
            mtls: true,
        };
        let g = t.enter(Direction::Inbound, "hbone_stream", info.src_addr);
        // Inbound: the copy's "to tunnel" side is the response.
        let mut tele = ConnectionTelemetry::open(&metrics, info);
        g.set_tunnel(&mut tele, false);
        g.counters().to_tunnel.fetch_add(7, Ordering::Relaxed);
        g.counters().from_tunnel.fetch_add(100, Ordering::Relaxed);
        let c = &t.list()[0];
        assert_eq!((c.bytes_sent, c.bytes_recv), (100, 7));
        assert_eq!(
            c.hbone_target,
            Some(HboneTarget::Addr("10.0.0.2:8080".parse().unwrap()))
        );
        assert_eq!(c.src_identity.as_deref(), Some("spiffe://td/ns/a/sa/sa-a"));
        assert_eq!(c.dst_identity.as_deref(), Some("spiffe://td/ns/b/sa/sa-b"));
        assert_eq!(c.dst_service.as_deref(), Some("b.ns.svc"));
        assert_eq!(c.dst_workload.as_deref(), Some("b"));
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["bytes_sent"], 100);
        assert!(json["age_ms"].is_u64());
        // The byte metrics see the same live counts, request = received, before the close.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(value("istio_tcp_received_bytes_total{"), "100");
        assert_eq!(value("istio_tcp_sent_bytes_total{"), "7");
        tele.close(100, 7, None);
    }
}
