//! Watch responses: newline-delimited JSON events on a chunked response,
//! replayed from the store's event log and then followed live.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::http::Shared;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Event, EventKind};

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this resourceVersion (events replayed from the log; 410 when
    /// it is older than what is retained).
    After(u64),
    /// Now, with a synthetic ADDED event per existing object
    /// (`resourceVersion` unset or `0`); with `initial_end_bookmark` the
    /// initial events end with a BOOKMARK annotated
    /// `k8s.io/initial-events-end` (`sendInitialEvents=true`).
    Now { initial_end_bookmark: bool },
}

/// What one watch request asked for.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub res: usize,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub start: Start,
    pub bookmarks: bool,
    pub timeout: Duration,
    /// Objects as `PartialObjectMetadata` (metadata-only watches).
    pub partial: bool,
}

impl WatchRequest {
    fn selects(&self, obj: &Value) -> bool {
        let ns_ok = match &self.namespace {
            Some(ns) => {
                obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns.as_str())
            }
            None => true,
        };
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event to send for `e`, if any. An object that stops matching the
    /// selectors is reported DELETED, one that starts matching ADDED.
    fn translate(&self, e: &Event) -> Option<(&'static str, Value)> {
        let now = self.selects(&e.object);
        let kind = match e.kind {
            EventKind::Added | EventKind::Deleted if now => e.kind,
            EventKind::Modified => {
                let before = e.prev.as_ref().is_some_and(|p| self.selects(p));
                match (before, now) {
                    (true, true) => EventKind::Modified,
                    (false, true) => EventKind::Added,
                    (true, false) => EventKind::Deleted,
                    (false, false) => return None,
                }
            }
            _ => return None,
        };
        Some((kind.as_str(), self.shape(&e.object)))
    }

    /// Bookmarks of metadata-only watches are PartialObjectMetadata too.
    fn shape_bookmark(&self, bm: Value) -> Value {
        if self.partial {
            super::http::partial_metadata(&bm)
        } else {
            bm
        }
    }

    fn shape(&self, obj: &Value) -> Value {
        if self.partial {
            super::http::partial_metadata(obj)
        } else {
            obj.clone()
        }
    }
}

fn line(ty: &str, object: Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": ty, "object": object})).expect("JSON");
    v.push(b'\n');
    Bytes::from(v)
}

/// Streams events for `req` into `tx` until the timeout, a closed client,
/// or [`super::ApiServerHandle::close_watches`].
pub async fn run(shared: Arc<Shared>, req: WatchRequest, tx: mpsc::Sender<Bytes>) {
    struct Open(Arc<Shared>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0
                .open_watches
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    shared
        .open_watches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _open = Open(shared.clone());
    let r = shared.resource(req.res);
    let mut changed = shared.changed.subscribe();
    let mut closing = shared.closing.subscribe();
    closing.mark_unchanged();
    let deadline = tokio::time::Instant::now() + req.timeout;

    // Initial state.
    let (first, mut cursor) = {
        let store = shared.lock();
        match req.start {
            Start::After(rv) => match store.events_since(req.res, rv) {
                Ok(evs) => {
                    let lines: Vec<Bytes> = evs
                        .iter()
                        .filter_map(|e| req.translate(e).map(|(t, o)| line(t, o)))
                        .collect();
                    (Ok(lines), store.resource_version())
                }
                Err(e) => (Err(e), 0),
            },
            Start::Now {
                initial_end_bookmark,
            } => {
                let (items, rv) =
                    store.list(req.res, req.namespace.as_deref(), &req.labels, &req.fields);
                let mut lines: Vec<Bytes> =
                    items.iter().map(|o| line("ADDED", req.shape(o))).collect();
                if initial_end_bookmark {
                    lines.push(line(
                        "BOOKMARK",
                        req.shape_bookmark(json!({
                            "kind": r.kind,
                            "apiVersion": r.api_version(),
                            "metadata": {
                                "resourceVersion": rv.to_string(),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        })),
                    ));
                }
                (Ok(lines), rv)
            }
        }
    };
    match first {
        Ok(lines) => {
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
        }
        Err(e) => {
            shared.count("gone", r.plural);
            let _ = tx.send(line("ERROR", e.to_status())).await;
            return;
        }
    }

    let mut bookmark = tokio::time::interval_at(
        tokio::time::Instant::now() + shared.bookmark_interval,
        shared.bookmark_interval,
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return,
            _ = closing.changed() => return,
            // The client went away (idle watches notice here, not only
            // when the next event fails to send).
            _ = tx.closed() => return,
            _ = bookmark.tick() => {
                if !req.bookmarks {
                    continue;
                }
                // A bookmark must not skip events: send what is pending
                // first (or 410 when it is gone), then the bookmark.
                let batch = {
                    let store = shared.lock();
                    let out = store.events_since(req.res, cursor).map(|evs| {
                        evs.iter().filter_map(|e| req.translate(e).map(|(t, o)| line(t, o))).collect::<Vec<_>>()
                    });
                    cursor = store.resource_version();
                    out
                };
                let mut lines = match batch {
                    Ok(lines) => lines,
                    Err(e) => {
                        shared.count("gone", r.plural);
                        let _ = tx.send(line("ERROR", e.to_status())).await;
                        return;
                    }
                };
                let bm = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": cursor.to_string()}});
                lines.push(line("BOOKMARK", req.shape_bookmark(bm)));
                for l in lines {
                    if tx.send(l).await.is_err() {
                        return;
                    }
                }
            }
            res = changed.changed() => {
                if res.is_err() {
                    return;
                }
                let batch = {
                    let store = shared.lock();
                    let out = store.events_since(req.res, cursor).map(|evs| {
                        evs.iter().filter_map(|e| req.translate(e).map(|(t, o)| line(t, o))).collect::<Vec<_>>()
                    });
                    cursor = store.resource_version();
                    out
                };
                match batch {
                    Ok(lines) => {
                        for l in lines {
                            if tx.send(l).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        shared.count("gone", r.plural);
                        let _ = tx.send(line("ERROR", e.to_status())).await;
                        return;
                    }
                }
            }
        }
    }
}
