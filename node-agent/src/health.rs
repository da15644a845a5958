//! Readiness: components register a flag; `GET /readyz` (port `READY_PORT`,
//! 8000) answers 200 when every flag is ready and 503 listing the reasons
//! otherwise.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::http_endpoint::{self, Answer};

pub const READY_PATH: &str = "/readyz";

/// The agent's readiness, shared by every component. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    /// component → `None` when ready, `Some(reason)` when not.
    state: Arc<Mutex<BTreeMap<&'static str, Option<String>>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a component, not ready ("starting") until it says otherwise.
    pub fn register(&self, component: &'static str) -> ReadyFlag {
        self.lock().insert(component, Some("starting".into()));
        ReadyFlag {
            readiness: self.clone(),
            component,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.lock().values().all(Option::is_none)
    }

    /// `(component, reason)` for every component that is not ready.
    pub fn not_ready(&self) -> Vec<(&'static str, String)> {
        self.lock()
            .iter()
            .filter_map(|(c, r)| r.clone().map(|r| (*c, r)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Option<String>>> {
        // The map stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One component's say in [`Readiness`].
#[derive(Debug, Clone)]
pub struct ReadyFlag {
    readiness: Readiness,
    component: &'static str,
}

impl ReadyFlag {
    pub fn set_ready(&self) {
        self.readiness.lock().insert(self.component, None);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.readiness
            .lock()
            .insert(self.component, Some(reason.into()));
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.readiness.lock().get(self.component), Some(None))
    }
}

/// Serves `GET /readyz` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) {
    let answer = move |req: &Request<Incoming>| answer(req, &readiness);
    http_endpoint::serve("readiness", listener, answer, shutdown).await
}

fn answer(req: &Request<Incoming>, readiness: &Readiness) -> Answer {
    if req.uri().path() != READY_PATH {
        return http_endpoint::not_found(req);
    }
    let not_ready = readiness.not_ready();
    if not_ready.is_empty() {
        return http_endpoint::text(StatusCode::OK, "ok\n");
    }
    let lines: String = not_ready
        .iter()
        .map(|(c, r)| format!("{c}: {r}\n"))
        .collect();
    http_endpoint::text(StatusCode::SERVICE_UNAVAILABLE, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_component_is() {
        let r = Readiness::new();
        assert!(r.is_ready(), "nothing registered yet");
        let a = r.register("cni-install");
        let b = r.register("zds");
        assert!(!r.is_ready());
        a.set_ready();
        assert!(!r.is_ready());
        assert_eq!(r.not_ready(), vec![("zds", "starting".to_string())]);
        b.set_ready();
        assert!(r.is_ready() && a.is_ready());
        a.set_not_ready("istio-cni missing from /etc/cni/net.d/10-bridge.conflist");
        assert!(!r.is_ready() && !a.is_ready());
        assert!(r.not_ready()[0].1.contains("10-bridge"));
    }

    #[tokio::test]
    async fn readyz_reflects_flags() {
        let r = Readiness::new();
        let flag = r.register("cni-install");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, r.clone(), async {
            let _ = stop_rx.await;
        }));
        let get = |path| http_endpoint::get(addr, path);
        let resp = get(READY_PATH).await;
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert!(resp.contains("cni-install: starting"));
        flag.set_ready();
        assert!(get(READY_PATH).await.starts_with("HTTP/1.1 200"));
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        stop_tx.send(()).unwrap();
        server.await.unwrap();
    }
}
