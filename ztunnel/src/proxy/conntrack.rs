//! Open connections of one proxy: a count that drain waits on, and a list for `/debug`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::telemetry::Direction;

/// One open connection as `/debug/connections` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionSummary {
    pub id: u64,
    pub direction: &'static str,
    /// `hbone` for an accepted HBONE TCP connection (it carries streams), else the
    /// listener that accepted it.
    pub kind: &'static str,
    pub src: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
    pub started: String,
}

#[derive(Default)]
pub struct ConnTracker {
    count: AtomicUsize,
    next: AtomicU64,
    idle: Notify,
    open: Mutex<HashMap<u64, ConnectionSummary>>,
}

/// Unregisters the connection when dropped.
pub struct ConnGuard {
    tracker: Arc<ConnTracker>,
    id: u64,
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
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            ConnectionSummary {
                id,
                direction: direction.as_str(),
                kind,
                src,
                dst: None,
                started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            },
        );
        ConnGuard {
            tracker: self.clone(),
            id,
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

    pub fn list(&self) -> Vec<ConnectionSummary> {
        let mut v: Vec<ConnectionSummary> = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }
}

impl ConnGuard {
    pub fn set_dst(&self, dst: SocketAddr) {
        if let Some(c) = self
            .tracker
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.id)
        {
            c.dst = Some(dst);
        }
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
}
