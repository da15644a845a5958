//! How many certificate requests may be in flight at once, and which goes next.
//!
//! As upstream's secret manager: at most [`MAX_IN_FLIGHT`] CSRs are outstanding at a time
//! (a ztunnel restarting on a full node, or every identity retrying after a CA outage, does
//! not send hundreds of CSRs at once), and a waiting request is started in priority order:
//! one a connection is waiting for ([`Priority::RealTime`]) before a prefetch
//! ([`Priority::Warmup`]) before a renewal or retry ([`Priority::Background`]); within one
//! priority, the oldest first. A request's priority can be raised while it waits (a
//! connection needs an identity that was only being prefetched).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Upstream's limit on concurrent certificate requests.
pub const MAX_IN_FLIGHT: usize = 8;

/// Why a certificate is requested; higher goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Priority {
    /// Renewal, or a retry after a failure.
    Background = 0,
    /// Prefetch (a workload appeared; nobody waits yet).
    Warmup = 1,
    /// A connection waits for it.
    RealTime = 2,
}

impl Priority {
    fn from_u8(v: u8) -> Priority {
        match v {
            0 => Priority::Background,
            1 => Priority::Warmup,
            _ => Priority::RealTime,
        }
    }
}

/// A priority that can be raised while its request waits.
#[derive(Debug, Clone)]
pub struct SharedPriority(Arc<AtomicU8>);

impl SharedPriority {
    pub fn new(p: Priority) -> Self {
        SharedPriority(Arc::new(AtomicU8::new(p as u8)))
    }

    pub fn get(&self) -> Priority {
        Priority::from_u8(self.0.load(Ordering::Relaxed))
    }

    /// Raises the priority to at least `p` (never lowers it).
    pub fn raise(&self, p: Priority) {
        self.0.fetch_max(p as u8, Ordering::Relaxed);
    }
}

struct Waiter {
    priority: SharedPriority,
    seq: u64,
    tx: oneshot::Sender<()>,
}

struct State {
    available: usize,
    next_seq: u64,
    waiters: Vec<Waiter>,
}

/// The limiter; share it with an `Arc`.
pub struct Limiter {
    state: Mutex<State>,
}

/// The right to have one request in flight; released when dropped.
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

/// A waiting [`Limiter::acquire`]: if it is abandoned after being handed a permit, the
/// permit goes to the next waiter.
struct Waiting {
    limiter: Arc<Limiter>,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.limiter.release();
            }
        }
    }
}

impl Limiter {
    pub fn new(max_in_flight: usize) -> Arc<Limiter> {
        assert!(max_in_flight > 0, "a limit of 0 would never issue anything");
        Arc::new(Limiter {
            state: Mutex::new(State {
                available: max_in_flight,
                next_seq: 0,
                waiters: Vec::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a free slot; waiters are served by (current) priority, then age.
    pub async fn acquire(self: &Arc<Self>, priority: SharedPriority) -> Permit {
        let rx = {
            let mut st = self.state();
            if st.available > 0 && st.waiters.is_empty() {
                st.available -= 1;
                return Permit {
                    limiter: self.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.waiters.push(Waiter { priority, seq, tx });
            rx
        };
        let mut waiting = Waiting {
            limiter: self.clone(),
            rx: Some(rx),
        };
        let rx = waiting.rx.as_mut().expect("set above");
        // The sender is only dropped by handing over a slot or by a closed receiver.
        let _ = rx.await;
        waiting.rx = None;
        Permit {
            limiter: self.clone(),
        }
    }

    /// A slot came free: hand it to the most urgent live waiter, else keep it.
    fn release(&self) {
        let mut st = self.state();
        loop {
            let best = st
                .waiters
                .iter()
                .enumerate()
                .max_by(|(_, a), (_, b)| {
                    a.priority
                        .get()
                        .cmp(&b.priority.get())
                        .then(b.seq.cmp(&a.seq))
                })
                .map(|(i, _)| i);
            let Some(i) = best else {
                st.available += 1;
                return;
            };
            let waiter = st.waiters.swap_remove(i);
            if waiter.tx.send(()).is_ok() {
                return;
            }
        }
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.state().waiters.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits until `n` requests are queued.
    async fn queued(l: &Limiter, n: usize) {
        for _ in 0..200 {
            if l.waiting() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} waiting, expected {n}", l.waiting());
    }

    /// Slots go to the most urgent waiter (then the oldest); a raised priority counts; an
    /// abandoned waiter does not swallow a slot.
    #[tokio::test]
    async fn served_by_priority_then_age() {
        let l = Limiter::new(1);
        let held = l.acquire(SharedPriority::new(Priority::Background)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |name: &'static str, p: SharedPriority| {
            let (l, order) = (l.clone(), order.clone());
            tokio::spawn(async move {
                let _permit = l.acquire(p).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
            })
        };
        let mut tasks = vec![spawn("bg1", SharedPriority::new(Priority::Background))];
        queued(&l, 1).await;
        let warm = SharedPriority::new(Priority::Warmup);
        tasks.push(spawn("warm-raised", warm.clone()));
        queued(&l, 2).await;
        tasks.push(spawn("warm", SharedPriority::new(Priority::Warmup)));
        queued(&l, 3).await;
        let abandoned = spawn("abandoned", SharedPriority::new(Priority::RealTime));
        queued(&l, 4).await;
        abandoned.abort();
        let _ = abandoned.await;
        tasks.push(spawn("rt", SharedPriority::new(Priority::RealTime)));
        queued(&l, 5).await;
        warm.raise(Priority::RealTime);
        warm.raise(Priority::Background);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["warm-raised", "rt", "warm", "bg1"],
            "raised before the later real-time one (older), the abandoned one skipped"
        );
        // Every slot came back.
        let _a = l.acquire(SharedPriority::new(Priority::Background)).await;
        assert_eq!(l.waiting(), 0);
    }
}

/// The limiter as the [`super::SecretManager`] uses it.
#[cfg(test)]
mod manager_tests {
    use super::*;
    use crate::identity::local_ca::LocalCa;
    use crate::identity::provider::{CertificateProvider, CertificateRequest, SignFuture};
    use crate::identity::{Identity, SecretManager};
    use std::time::Duration;

    /// Signs with the local CA once the test lets a request through; records the order in
    /// which requests reached it and the most in flight at once.
    struct Gated {
        ca: LocalCa,
        gate: tokio::sync::Semaphore,
        started: Mutex<Vec<String>>,
        in_flight: Mutex<(usize, usize)>,
    }

    impl CertificateProvider for Gated {
        fn name(&self) -> &str {
            "gated"
        }
        fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
            Box::pin(async move {
                let sa = request.identity.service_account().to_string();
                self.started.lock().unwrap().push(sa);
                {
                    let mut f = self.in_flight.lock().unwrap();
                    f.0 += 1;
                    f.1 = f.1.max(f.0);
                }
                self.gate.acquire().await.unwrap().forget();
                self.in_flight.lock().unwrap().0 -= 1;
                self.ca.sign(request).await
            })
        }
    }

    fn gated() -> Arc<Gated> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ca");
        Arc::new(Gated {
            ca: LocalCa::from_files(&dir.join("ec-root.pem"), &dir.join("ec-root.key")).unwrap(),
            gate: tokio::sync::Semaphore::new(0),
            started: Mutex::default(),
            in_flight: Mutex::default(),
        })
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..400 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Twenty identities prefetched at once (a restart on a busy node): only
    /// [`MAX_IN_FLIGHT`] CSRs reach the CA at a time. A connection's identity is requested
    /// before the queued prefetches, and so is a queued prefetch a connection starts
    /// waiting for; the rest follow in order and all are issued.
    #[tokio::test]
    async fn csrs_are_bounded_and_connections_go_first() {
        let ca = gated();
        let certs = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let id = |sa: &str| Identity::new("cluster.local", "ns1", sa);
        let warm: Vec<Identity> = (0..20).map(|i| id(&format!("warm{i:02}"))).collect();
        for w in &warm {
            certs.prefetch(w);
        }
        until("the first CSRs", || {
            ca.started.lock().unwrap().len() == MAX_IN_FLIGHT
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(ca.started.lock().unwrap().len(), MAX_IN_FLIGHT, "bounded");

        let conn = {
            let certs = certs.clone();
            tokio::spawn(async move { certs.fetch_certificate(&id("conn")).await })
        };
        let raised = {
            let (certs, w) = (certs.clone(), warm[19].clone());
            tokio::spawn(async move { certs.fetch_certificate(&w).await })
        };
        until("both queued", || certs.limiter.waiting() == 13).await;
        ca.gate.add_permits(2);
        until("two more CSRs", || ca.started.lock().unwrap().len() == 10).await;
        let started = ca.started.lock().unwrap().clone();
        assert_eq!(
            started[MAX_IN_FLIGHT..],
            ["warm19", "conn"],
            "the raised prefetch (queued first) and the connection before the other prefetches"
        );
        ca.gate.add_permits(100);
        conn.await.unwrap().unwrap();
        raised.await.unwrap().unwrap();
        for w in &warm {
            certs.fetch_certificate(w).await.unwrap();
        }
        assert_eq!(ca.in_flight.lock().unwrap().1, MAX_IN_FLIGHT);
        assert_eq!(ca.started.lock().unwrap()[10..].len(), 11);
        assert_eq!(
            ca.started.lock().unwrap()[10],
            "warm08",
            "then oldest first"
        );
    }
}

/// Retries after a CA failure are spread out (upstream's ±20 % jitter on a backoff starting
/// at 1 s): identities that failed together (a CA blip) do not come back together.
#[cfg(test)]
mod retry_tests {
    use crate::identity::provider::{
        CertificateProvider, CertificateRequest, ProviderError, SignFuture,
    };
    use crate::identity::{Identity, SecretManager};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Down(Mutex<HashMap<Identity, Vec<Instant>>>);

    impl CertificateProvider for Down {
        fn name(&self) -> &str {
            "down"
        }
        fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
            self.0
                .lock()
                .unwrap()
                .entry(request.identity.clone())
                .or_default()
                .push(Instant::now());
            Box::pin(async move {
                Err(ProviderError::Unavailable {
                    provider: "down".into(),
                    identity: request.identity,
                    reason: "connection refused".into(),
                })
            })
        }
    }

    #[tokio::test]
    async fn retries_after_a_ca_failure_are_jittered() {
        let ca = std::sync::Arc::new(Down::default());
        let certs = SecretManager::new(ca.clone(), Duration::from_secs(3600));
        let ids: Vec<Identity> = (0..10)
            .map(|i| Identity::new("cluster.local", "ns1", format!("sa{i}")))
            .collect();
        for id in &ids {
            certs.prefetch(id);
        }
        let retried = || {
            let calls = ca.0.lock().unwrap();
            ids.iter()
                .all(|id| calls.get(id).is_some_and(|c| c.len() >= 2))
        };
        for _ in 0..300 {
            if retried() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(retried(), "every identity retried");
        let delays: Vec<Duration> = {
            let calls = ca.0.lock().unwrap();
            ids.iter().map(|id| calls[id][1] - calls[id][0]).collect()
        };
        for d in &delays {
            assert!(
                *d >= Duration::from_millis(790) && *d <= Duration::from_millis(1500),
                "first retry after about 1 s: {delays:?}"
            );
        }
        let spread =
            delays.iter().max().unwrap().as_millis() - delays.iter().min().unwrap().as_millis();
        assert!(spread >= 40, "retries spread out: {delays:?}");
    }
}
