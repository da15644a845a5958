//! HTTP/2 connection pool for outbound HBONE.
//!
//! Key: source identity, expected destination identities, source IP (transparent mode) and
//! destination `ip:15008`; connections are also kept per data-plane thread, so with the
//! thread-per-core runtime a stream and the connection carrying it are driven by the same
//! thread (no cross-thread wake-up per message). Each key holds one or more HTTP/2 connections of at most
//! `POOL_MAX_STREAMS_PER_CONNECTION` streams. Establishing a connection for a key is
//! serialised, so a burst of new streams shares one handshake — and its failure: streams that
//! waited for an attempt that failed fail with it at once ([`HboneError::Waited`]) instead of
//! each trying again in turn (N waiters would otherwise take N × the connect and handshake
//! timeouts). The CONNECT answer has a deadline too. Every connection has a driver
//! task that polls it, sends a PING every `keepalive_interval` (closing it when no PONG
//! arrives within `keepalive_timeout`) and releases it after `POOL_UNUSED_RELEASE_TIMEOUT`
//! without streams.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::crl::{RevocationWatch, until_revoked};

use super::stream::H2Stream;
use super::{FailureKind, HboneError};
use crate::config::H2Config;
use crate::identity::Identity;

/// Which connections may carry a stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: Identity,
    /// Sorted; the peer must prove one of them.
    pub dst_identities: Vec<Identity>,
    /// Set when connections keep the original source IP.
    pub src_ip: Option<IpAddr>,
    /// `ip:15008`.
    pub dst: SocketAddr,
}

impl PoolKey {
    pub fn new(
        src_identity: Identity,
        mut dst_identities: Vec<Identity>,
        src_ip: Option<IpAddr>,
        dst: SocketAddr,
    ) -> Self {
        dst_identities.sort();
        dst_identities.dedup();
        PoolKey {
            src_identity,
            dst_identities,
            src_ip,
            dst,
        }
    }
}

struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
}

impl PooledConn {
    /// Takes a stream slot if the connection is open and below both `max` and the peer's
    /// SETTINGS_MAX_CONCURRENT_STREAMS (a stream over the peer's limit would wait in h2's
    /// queue until the response deadline instead of going to another connection).
    fn try_reserve(&self, max: usize) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let max = max.min(self.send.current_max_send_streams());
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A reserved stream slot; released when dropped.
struct Slot(Arc<PooledConn>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

#[derive(Default)]
struct KeyEntry {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    connecting: tokio::sync::Mutex<()>,
    /// When the last attempt to establish a connection failed, and why.
    last_failure: Mutex<Option<(Instant, String, FailureKind)>>,
}

impl KeyEntry {
    fn record_failure(&self, e: &HboneError) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), e.to_string(), e.kind()));
    }

    /// Why (and how) an attempt failed at or after `since`, if one did.
    fn failed_since(&self, since: Instant) -> Option<(String, FailureKind)> {
        match &*self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((at, why, kind)) if *at >= since => Some((why.clone(), *kind)),
            _ => None,
        }
    }

    fn checkout(&self, max: usize) -> Option<Arc<PooledConn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        conns.iter().find(|c| c.try_reserve(max)).cloned()
    }
}

struct PoolInner {
    cfg: H2Config,
    entries: Mutex<HashMap<(PoolKey, ThreadId), Arc<KeyEntry>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    next_id: AtomicU64,
}

impl PoolInner {
    /// Removes `key`'s entry when it holds no open connection and no attempt to make one
    /// is under way (a waiting stream keeps its own reference to the entry).
    fn release_if_unused(&self, key: &(PoolKey, ThreadId)) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let unused = entries.get(key).is_some_and(|e| {
            let mut c = e.conns.lock().unwrap_or_else(|e| e.into_inner());
            c.retain(|c| !c.closed.load(Ordering::Acquire));
            c.is_empty() && e.connecting.try_lock().is_ok()
        });
        if unused {
            entries.remove(key);
        }
    }
}

/// The pool of one proxy instance. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// What `/debug` shows about a pooled connection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PooledConnectionInfo {
    pub id: u64,
    pub src_identity: String,
    pub dst_identities: Vec<String>,
    pub dst: SocketAddr,
    pub active_streams: usize,
}

impl Pool {
    /// Driver tasks are spawned on `tracker`; `shutdown` closes every connection.
    pub fn new(cfg: H2Config, shutdown: CancellationToken, tracker: TaskTracker) -> Self {
        Pool {
            inner: Arc::new(PoolInner {
                cfg,
                entries: Mutex::new(HashMap::new()),
                shutdown,
                tracker,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Opens a CONNECT stream for `key`, on a pooled connection or on a new one made by
    /// `connect` (TCP + TLS to `key.dst`, verified against `key.dst_identities`, each with
    /// its own deadline; with the watch that closes it if the peer's certificate gets
    /// revoked, when `CRL_PATH` is set). A non-200 answer is an error, so is none within
    /// `response_timeout`.
    pub async fn open_stream<T, F, Fut>(
        &self,
        key: &PoolKey,
        request: Request<()>,
        response_timeout: Duration,
        connect: F,
    ) -> Result<H2Stream, HboneError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(T, Option<RevocationWatch>), HboneError>>,
    {
        let (full_key, entry) = self.entry(key);
        let max = self.inner.cfg.max_streams_per_connection as usize;
        let mut connect = Some(connect);
        // A pooled connection may turn out dead (peer went away, or it sent GOAWAY): it is
        // marked closed and the next one is tried, as upstream, until a usable one is found
        // or a new connection is made; only a new connection's failure is final. Every
        // round marks one connection closed, so the loop ends.
        loop {
            let mut fresh = false;
            let conn = match entry.checkout(max) {
                Some(c) => c,
                None => {
                    let waiting_since = Instant::now();
                    let serial = entry.connecting.lock().await;
                    match entry.checkout(max) {
                        Some(c) => c,
                        None => {
                            if let Some((cause, kind)) = entry.failed_since(waiting_since) {
                                drop(serial);
                                self.inner.release_if_unused(&full_key);
                                return Err(HboneError::Waited {
                                    dst: key.dst,
                                    cause,
                                    kind,
                                });
                            }
                            let Some(connect) = connect.take() else {
                                return Err(HboneError::PoolExhausted { dst: key.dst });
                            };
                            let established = match connect().await {
                                Ok((io, revocation)) => {
                                    self.handshake(io, revocation, &full_key, &entry).await
                                }
                                Err(e) => Err(e),
                            };
                            let conn = match established {
                                Ok(c) => c,
                                Err(e) => {
                                    entry.record_failure(&e);
                                    // A key that never connects (a destination gone or
                                    // blocked) must not stay in the map for ever.
                                    drop(serial);
                                    self.inner.release_if_unused(&full_key);
                                    return Err(e);
                                }
                            };
                            if !conn.try_reserve(max) {
                                return Err(HboneError::PoolExhausted { dst: key.dst });
                            }
                            fresh = true;
                            conn
                        }
                    }
                }
            };
            let slot = Slot(conn.clone());
            let mut send = conn.send.clone();
            let deadline = tokio::time::Instant::now() + response_timeout;
            let timed_out = || HboneError::ResponseTimeout {
                dst: key.dst,
                authority: request.uri().to_string(),
                timeout: response_timeout,
            };
            let ready = std::future::poll_fn(|cx| send.poll_ready(cx));
            let ready = tokio::time::timeout_at(deadline, ready)
                .await
                .map_err(|_| timed_out())?;
            if let Err(e) = ready {
                conn.closed.store(true, Ordering::Release);
                drop(slot);
                if !fresh {
                    tracing::debug!(dst = %key.dst, error = %e, "pooled HBONE connection unusable; trying the next");
                    continue;
                }
                return Err(HboneError::H2 {
                    dst: key.dst,
                    source: e,
                });
            }
            let stream = send_connect(&mut send, request, key.dst, deadline, response_timeout);
            return Ok(stream.await?.with_guard(Box::new(slot)));
        }
    }

    pub(super) fn cfg(&self) -> &H2Config {
        &self.inner.cfg
    }

    pub(super) fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    pub(super) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// Open pooled connections.
    pub fn connections(&self) -> Vec<PooledConnectionInfo> {
        let entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for ((key, _), entry) in entries.iter() {
            for c in entry.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                if c.closed.load(Ordering::Acquire) {
                    continue;
                }
                out.push(PooledConnectionInfo {
                    id: c.id,
                    src_identity: key.src_identity.to_string(),
                    dst_identities: key.dst_identities.iter().map(|i| i.to_string()).collect(),
                    dst: key.dst,
                    active_streams: c.active.load(Ordering::Acquire),
                });
            }
        }
        out.sort_by_key(|c| c.id);
        out
    }

    fn entry(&self, key: &PoolKey) -> ((PoolKey, ThreadId), Arc<KeyEntry>) {
        let full = (key.clone(), std::thread::current().id());
        let entry = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(full.clone())
            .or_default()
            .clone();
        (full, entry)
    }

    async fn handshake<T>(
        &self,
        io: T,
        revocation: Option<RevocationWatch>,
        full_key: &(PoolKey, ThreadId),
        entry: &Arc<KeyEntry>,
    ) -> Result<Arc<PooledConn>, HboneError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let key = &full_key.0;
        let cfg = &self.inner.cfg;
        let (send, mut conn) = client_builder(cfg)
            .handshake::<T, Bytes>(io)
            .await
            .map_err(|e| HboneError::H2 {
                dst: key.dst,
                source: e,
            })?;
        let ping = conn.ping_pong();
        let pooled = Arc::new(PooledConn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        entry
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pooled.clone());
        tracing::debug!(conn = pooled.id, dst = %key.dst, src = %key.src_identity, "HBONE connection established");
        let driver = Driver {
            conn_state: pooled.clone(),
            cfg: cfg.clone(),
            shutdown: self.inner.shutdown.clone(),
            pool: Arc::downgrade(&self.inner),
            key: full_key.clone(),
        };
        self.inner.tracker.spawn(driver.run(conn, ping, revocation));
        Ok(pooled)
    }
}

/// Sends CONNECT `request` on a ready `send` and waits until `deadline` for a 200 answer,
/// which opens the tunnel; `dst` (and `timeout`, the time that was allowed) name the peer
/// in errors.
pub(super) async fn send_connect(
    send: &mut SendRequest<Bytes>,
    request: Request<()>,
    dst: SocketAddr,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<H2Stream, HboneError> {
    let authority = request.uri().to_string();
    let h2_err = |source| HboneError::H2 { dst, source };
    let (response, stream) = send.send_request(request, false).map_err(h2_err)?;
    let response = match tokio::time::timeout_at(deadline, response).await {
        Ok(r) => r.map_err(h2_err)?,
        Err(_) => {
            return Err(HboneError::ResponseTimeout {
                dst,
                authority,
                timeout,
            });
        }
    };
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status {
            dst,
            authority,
            status: response.status(),
        });
    }
    Ok(H2Stream::client(stream, response.into_body()))
}

/// HTTP/2 client settings of every HBONE connection (upstream's windows and limits).
pub(super) fn client_builder(cfg: &H2Config) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.frame_size)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(cfg.stream_window as usize)
        .initial_max_send_streams(cfg.max_streams_per_connection as usize)
        .enable_push(false);
    b
}

struct Driver {
    conn_state: Arc<PooledConn>,
    cfg: H2Config,
    shutdown: CancellationToken,
    pool: Weak<PoolInner>,
    key: (PoolKey, ThreadId),
}

impl Driver {
    async fn run<T>(
        self,
        conn: h2::client::Connection<T, Bytes>,
        ping: Option<h2::PingPong>,
        revocation: Option<RevocationWatch>,
    ) where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.conn_state.id;
        let dst = self.key.0.dst;
        tokio::pin!(conn);
        // Without revocation lists the branch below is disabled: never polled.
        let watching = revocation.is_some();
        let revoked = until_revoked(revocation);
        tokio::pin!(revoked);
        let mut ping = ping;
        let reason = loop {
            let next = tokio::time::sleep(self.cfg.keepalive_interval);
            tokio::select! {
                r = &mut conn => break match r {
                    Ok(()) => "closed".to_string(),
                    Err(e) => format!("error: {e}"),
                },
                _ = self.shutdown.cancelled() => break "pool shut down".to_string(),
                () = &mut revoked, if watching => break "peer certificate revoked".to_string(),
                _ = next => {}
            }
            let idle = self.conn_state.active.load(Ordering::Acquire) == 0
                && self
                    .conn_state
                    .idle_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed()
                    >= self.cfg.pool_unused_release_timeout;
            if idle {
                break "idle".to_string();
            }
            if let Some(pp) = ping.as_mut() {
                let pong =
                    tokio::time::timeout(self.cfg.keepalive_timeout, pp.ping(h2::Ping::opaque()));
                tokio::select! {
                    r = &mut conn => break match r {
                        Ok(()) => "closed".to_string(),
                        Err(e) => format!("error: {e}"),
                    },
                    _ = self.shutdown.cancelled() => break "pool shut down".to_string(),
                    () = &mut revoked, if watching => break "peer certificate revoked".to_string(),
                    r = pong => match r {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => break format!("keepalive failed: {e}"),
                        Err(_) => break format!("no PONG within {:?}", self.cfg.keepalive_timeout),
                    },
                }
            }
        };
        self.conn_state.closed.store(true, Ordering::Release);
        tracing::debug!(conn = id, dst = %dst, reason = %reason, "HBONE connection released");
        if let Some(pool) = self.pool.upgrade() {
            pool.release_if_unused(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::headers::{ConnectRequest, build_request};
    use crate::hbone::raw_frames::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    #[test]
    fn key_ignores_identity_order() {
        let a = Identity::new("td", "ns", "a");
        let b = Identity::new("td", "ns", "b");
        let src = Identity::new("td", "ns", "src");
        let dst: SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let k1 = PoolKey::new(src.clone(), vec![a.clone(), b.clone()], None, dst);
        let k2 = PoolKey::new(
            src.clone(),
            vec![b.clone(), a.clone(), b.clone()],
            None,
            dst,
        );
        assert_eq!(k1, k2);
        let k3 = PoolKey::new(src.clone(), vec![a.clone()], None, dst);
        assert_ne!(k1, k3);
        let k4 = PoolKey::new(src, vec![a, b], Some("10.0.0.9".parse().unwrap()), dst);
        assert_ne!(k1, k4);
    }

    fn test_key() -> PoolKey {
        PoolKey::new(
            Identity::new("td", "ns", "a"),
            vec![Identity::new("td", "ns", "b")],
            None,
            "10.0.0.2:15008".parse().unwrap(),
        )
    }

    fn test_request() -> Request<()> {
        build_request(&ConnectRequest {
            authority: "10.0.0.2:8080"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
            client: None,
            host: None,
            baggage: None,
            forwarded_network: None,
        })
    }

    /// A peer that completes HTTP/2 but never answers the CONNECT: the stream fails after
    /// the response deadline, naming the peer and the authority.
    #[tokio::test]
    async fn an_unanswered_connect_times_out() {
        let pool = Pool::new(
            H2Config::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        let (client_io, mut server) = tokio::io::duplex(1 << 20);
        let _peer = tokio::spawn(async move {
            let mut preface = [0u8; 24];
            server.read_exact(&mut preface).await.unwrap();
            write_frame(&mut server, SETTINGS, 0, 0, &[]).await;
            while read_frame(&mut server).await.is_some() {}
        });
        let start = Instant::now();
        let err = pool
            .open_stream(
                &test_key(),
                test_request(),
                Duration::from_millis(300),
                || async move { Ok::<_, HboneError>((client_io, None)) },
            )
            .await
            .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(matches!(err, HboneError::ResponseTimeout { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("10.0.0.2:15008") && msg.contains("10.0.0.2:8080"),
            "{msg}"
        );
    }

    /// An HTTP/2 peer on an in-memory pipe: answers every CONNECT with 200 and keeps the
    /// stream open; `goaway` makes it send GOAWAY (graceful: open streams go on).
    fn h2_peer(goaway: CancellationToken) -> tokio::io::DuplexStream {
        h2_peer_allowing(goaway, 100)
    }

    /// [`h2_peer`] announcing SETTINGS_MAX_CONCURRENT_STREAMS `max_streams`.
    fn h2_peer_allowing(goaway: CancellationToken, max_streams: u32) -> tokio::io::DuplexStream {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_concurrent_streams(max_streams)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let mut open = Vec::new();
            let mut sent = false;
            loop {
                tokio::select! {
                    next = conn.accept() => match next {
                        Some(Ok((_req, mut respond))) => {
                            let resp = http::Response::builder().status(200).body(()).unwrap();
                            open.push(respond.send_response(resp, false).unwrap());
                        }
                        _ => return,
                    },
                    _ = goaway.cancelled(), if !sent => {
                        sent = true;
                        conn.graceful_shutdown();
                    }
                }
            }
        });
        client_io
    }

    /// Two pooled connections whose peers both sent GOAWAY (a peer ztunnel draining, with
    /// long-lived streams keeping both open): a new stream skips both and gets a new
    /// connection, instead of failing after the second.
    #[tokio::test]
    async fn every_connection_that_went_away_is_skipped() {
        let cfg = H2Config {
            max_streams_per_connection: 2,
            ..H2Config::default()
        };
        let pool = Pool::new(cfg, CancellationToken::new(), TaskTracker::new());
        let goaway = CancellationToken::new();
        let key = test_key();
        let open = |peer: CancellationToken| {
            pool.open_stream(
                &key,
                test_request(),
                Duration::from_secs(2),
                move || async move { Ok::<_, HboneError>((h2_peer(peer), None)) },
            )
        };
        let s1 = open(goaway.clone()).await.unwrap();
        let s2 = open(goaway.clone()).await.unwrap();
        let s3 = open(goaway.clone()).await.unwrap(); // a second connection
        drop(s2); // the first has a free slot again
        goaway.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s4 = open(CancellationToken::new()).await;
        assert!(s4.is_ok(), "{:?}", s4.err());
        drop((s1, s3));
    }

    /// A peer that allows one stream per connection (as a waypoint or gateway may): the
    /// second stream gets a second connection instead of waiting in h2 for the first's
    /// slot until the response deadline.
    #[tokio::test]
    async fn the_peers_stream_limit_opens_another_connection() {
        let pool = Pool::new(
            H2Config::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        let key = test_key();
        let connects = AtomicUsize::new(0);
        let open = || {
            pool.open_stream(&key, test_request(), Duration::from_secs(2), || async {
                connects.fetch_add(1, Ordering::Relaxed);
                Ok::<_, HboneError>((h2_peer_allowing(CancellationToken::new(), 1), None))
            })
        };
        let s1 = open().await.unwrap();
        let s2 = open().await;
        assert!(s2.is_ok(), "{:?}", s2.err());
        assert_eq!(connects.load(Ordering::Relaxed), 2);
        assert_eq!(pool.connections().len(), 2);
        drop((s1, s2));
    }

    /// A failed attempt fails the streams that waited for it, not the ones that come later.
    #[tokio::test]
    async fn waiters_share_a_failed_attempt() {
        let pool = Pool::new(
            H2Config::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        let key = test_key();
        let failing = || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err::<(tokio::io::DuplexStream, Option<RevocationWatch>), _>(HboneError::TlsTimeout {
                dst: "10.0.0.2:15008".parse().unwrap(),
                timeout: Duration::from_millis(200),
            })
        };
        let start = Instant::now();
        let (a, b, c) = tokio::join!(
            pool.open_stream(&key, test_request(), Duration::from_secs(1), failing),
            pool.open_stream(&key, test_request(), Duration::from_secs(1), failing),
            pool.open_stream(&key, test_request(), Duration::from_secs(1), failing),
        );
        assert!(
            start.elapsed() < Duration::from_millis(390),
            "{:?}",
            start.elapsed()
        );
        let errs = [a.unwrap_err(), b.unwrap_err(), c.unwrap_err()];
        let waited = errs
            .iter()
            .filter(|e| matches!(e, HboneError::Waited { .. }))
            .count();
        assert_eq!(waited, 2, "{errs:?}");
        // The waiters report the kind of the failure they shared.
        assert!(
            errs.iter().all(|e| e.kind() == super::FailureKind::Tls),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .all(|e| e.to_string().contains("10.0.0.2:15008"))
        );
        // Later: a fresh attempt.
        let later = pool
            .open_stream(&key, test_request(), Duration::from_secs(1), failing)
            .await
            .unwrap_err();
        assert!(matches!(later, HboneError::TlsTimeout { .. }), "{later}");
        // Nothing is kept for a key that never connected.
        assert!(pool.inner.entries.lock().unwrap().is_empty());
    }

    /// A pooled connection announces upstream's HTTP/2 settings (push off, 4 MiB stream
    /// window, 1 MiB frames, 16 KiB header list, connection window raised to 16 MiB), PINGs
    /// the peer every `keepalive_interval` and is dropped when no PONG comes back within
    /// `keepalive_timeout`, even with a stream open.
    #[tokio::test]
    async fn announces_upstream_settings_and_drops_a_peer_that_never_answers_ping() {
        let cfg = H2Config {
            keepalive_interval: Duration::from_millis(100),
            keepalive_timeout: Duration::from_millis(300),
            ..H2Config::default()
        };
        let pool = Pool::new(cfg, CancellationToken::new(), TaskTracker::new());
        let (client_io, mut server) = tokio::io::duplex(1 << 20);
        let peer = tokio::spawn(async move {
            let mut preface = [0u8; 24];
            server.read_exact(&mut preface).await.unwrap();
            assert_eq!(&preface[..], PREFACE);
            let settings = read_frame(&mut server).await.unwrap().settings();
            write_frame(&mut server, SETTINGS, 0, 0, &[]).await;
            write_frame(&mut server, SETTINGS, FLAG_ACK, 0, &[]).await;
            let (mut conn_window, mut pings) = (None, 0);
            while let Some(f) = read_frame(&mut server).await {
                match (f.kind, f.stream) {
                    (WINDOW_UPDATE, 0) => conn_window = Some(f.window_increment()),
                    // `:status: 200` (HPACK static table entry 8).
                    (HEADERS, 1) => {
                        write_frame(&mut server, HEADERS, FLAG_END_HEADERS, 1, &[0x88]).await
                    }
                    // Never answered.
                    (PING, 0) if f.flags & FLAG_ACK == 0 => pings += 1,
                    _ => {}
                }
            }
            (settings, conn_window, pings)
        });
        let key = PoolKey::new(
            Identity::new("td", "ns", "a"),
            vec![Identity::new("td", "ns", "b")],
            None,
            "10.0.0.2:15008".parse().unwrap(),
        );
        let request = build_request(&ConnectRequest {
            authority: "10.0.0.2:8080"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
            client: None,
            host: None,
            baggage: None,
            forwarded_network: None,
        });
        let stream = pool
            .open_stream(&key, request, Duration::from_secs(5), || async move {
                Ok::<_, HboneError>((client_io, None))
            })
            .await
            .unwrap();
        assert_eq!(pool.connections().len(), 1);
        let (settings, conn_window, pings) = tokio::time::timeout(Duration::from_secs(10), peer)
            .await
            .expect("the connection is closed when PONGs stop")
            .unwrap();
        assert!(pings >= 1, "no keepalive PING sent");
        assert!(pool.connections().is_empty(), "{:?}", pool.connections());
        drop(stream);
        let get = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
        assert_eq!(get(SETTINGS_ENABLE_PUSH), Some(0), "{settings:?}");
        assert_eq!(
            get(SETTINGS_INITIAL_WINDOW_SIZE),
            Some(4 << 20),
            "{settings:?}"
        );
        assert_eq!(get(SETTINGS_MAX_FRAME_SIZE), Some(1 << 20), "{settings:?}");
        assert_eq!(
            get(SETTINGS_MAX_HEADER_LIST_SIZE),
            Some(16 << 10),
            "{settings:?}"
        );
        assert_eq!(conn_window, Some((16 << 20) - 65_535));
    }
}
