//! A de-duplicating work queue of pod UIDs: a UID queued twice before a
//! worker takes it is processed once; delayed adds (retries) keep only the
//! earliest deadline per UID. Serialising work on one pod is not the queue's
//! job (the reconciler holds a per-pod lock), it only bounds concurrency and
//! avoids redundant passes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Default)]
struct State {
    queue: VecDeque<String>,
    queued: HashSet<String>,
    /// Earliest pending delayed add per UID.
    delayed: HashMap<String, Instant>,
    closed: bool,
}

#[derive(Default)]
pub struct WorkQueue {
    state: Mutex<State>,
    notify: Notify,
}

impl WorkQueue {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `uid` unless it is already waiting.
    pub fn add(&self, uid: &str) {
        let mut st = self.lock();
        if st.closed || st.queued.contains(uid) {
            return;
        }
        st.queued.insert(uid.to_string());
        st.queue.push_back(uid.to_string());
        drop(st);
        self.notify.notify_one();
    }

    /// Queues `uid` after `delay` (a timer task); an earlier pending delayed
    /// add of the same UID wins.
    pub fn add_after(self: &Arc<Self>, uid: &str, delay: Duration) {
        let at = Instant::now() + delay;
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            match st.delayed.get(uid) {
                Some(t) if *t <= at => return,
                _ => {
                    st.delayed.insert(uid.to_string(), at);
                }
            }
        }
        let this = self.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            {
                let mut st = this.lock();
                // Superseded by an earlier timer that already fired?
                if st.delayed.get(&uid) != Some(&at) {
                    return;
                }
                st.delayed.remove(&uid);
            }
            this.add(&uid);
        });
    }

    /// The next UID; `None` once closed.
    pub async fn next(&self) -> Option<String> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = self.lock();
                if st.closed {
                    return None;
                }
                if let Some(uid) = st.queue.pop_front() {
                    st.queued.remove(&uid);
                    if !st.queue.is_empty() {
                        // Wake another worker for the rest.
                        self.notify.notify_one();
                    }
                    return Some(uid);
                }
            }
            notified.await;
        }
    }

    /// Stops the workers; later adds are ignored.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// UIDs waiting now (not counting delayed ones).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dedups_and_preserves_order() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.next().await.as_deref(), Some("a"));
        q.add("a"); // taken already: queued again
        assert_eq!(q.next().await.as_deref(), Some("b"));
        assert_eq!(q.next().await.as_deref(), Some("a"));
        assert!(q.is_empty());
        q.close();
        assert_eq!(q.next().await, None);
        q.add("c");
        assert!(q.is_empty(), "closed queue ignores adds");
    }

    #[tokio::test]
    async fn delayed_adds_keep_the_earliest_deadline() {
        let q = WorkQueue::new();
        q.add_after("a", Duration::from_millis(300));
        q.add_after("a", Duration::from_millis(30));
        q.add_after("a", Duration::from_millis(200));
        let got = tokio::time::timeout(Duration::from_secs(10), q.next()).await;
        assert_eq!(got.unwrap().as_deref(), Some("a"));
        // The superseded timers fire into nothing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(q.is_empty(), "superseded timers do not add again");
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_up() {
        let q = WorkQueue::new();
        let q2 = q.clone();
        let w = tokio::spawn(async move { q2.next().await });
        tokio::task::yield_now().await;
        q.add("x");
        assert_eq!(w.await.unwrap().as_deref(), Some("x"));
    }
}
