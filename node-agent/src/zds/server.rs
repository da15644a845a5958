//! The ZDS server: accepts ztunnel connections, sends each the snapshot of
//! enrolled pods, then Add/Del as pods come and go.
//!
//! Per connection: wait for `ZdsHello{V1}`; register the connection as the
//! newest; send `AddWorkload`+netns fd for every known pod whose netns we
//! hold and `KeepWorkload` for the others, one at a time, each Acked; send
//! `SnapshotSent`; then every 5 s check that the idle connection is alive (a
//! 10 ms wait for readability must time out: data, EOF or error = gone).
//!
//! Requests on one connection are serialised by a lock (one outstanding
//! request, as the protocol requires); each waits at most
//! [`ZdsConfig::ack_timeout`] for its Ack. A connection that fails a send, an
//! Ack read, or speaks out of turn is dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use mesh_proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use prost::Message;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::socket::{SeqpacketConn, SeqpacketListener};
use crate::redirect::netns::Netns;

/// Default socket path (ztunnel's `INPOD_UDS`, agent's `ZTUNNEL_UDS`).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";
/// Acks are read into a buffer this big.
const ACK_BUFFER: usize = 1024;

#[derive(Debug, Clone)]
pub struct ZdsConfig {
    pub socket_path: PathBuf,
    /// Deadline for each request's Ack (and for the Hello).
    pub ack_timeout: Duration,
    /// How often idle connections are checked.
    pub liveness_interval: Duration,
    /// How long the liveness read waits (it must time out).
    pub liveness_probe: Duration,
}

impl Default for ZdsConfig {
    fn default() -> Self {
        Self {
            socket_path: PathBuf::from(DEFAULT_SOCKET),
            ack_timeout: Duration::from_secs(5),
            liveness_interval: Duration::from_secs(5),
            liveness_probe: Duration::from_millis(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("no ztunnel connected")]
    NoZtunnel,
    #[error("ztunnel refused {what}: {reason}")]
    Nack { what: String, reason: String },
    #[error("ztunnel did not answer {what} within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("ztunnel connection {conn} failed during {what}: {reason}")]
    Connection {
        conn: u64,
        what: String,
        reason: String,
    },
    #[error("ZDS socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("duplicating the netns fd of {uid}: {source}")]
    Fd {
        uid: String,
        #[source]
        source: std::io::Error,
    },
}

/// A pod as the snapshot knows it.
struct Entry {
    info: WorkloadInfo,
    netns: Option<Netns>,
}

/// One ztunnel connection.
struct Conn {
    id: u64,
    sock: Mutex<SeqpacketConn>,
}

struct Shared {
    cfg: ZdsConfig,
    pods: StdMutex<BTreeMap<String, Entry>>,
    /// Oldest first; the last one gets Adds.
    conns: StdMutex<Vec<Arc<Conn>>>,
    /// Connection tasks, aborted on shutdown (which closes their sockets).
    tasks: StdMutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
}

/// Handle on the ZDS server; cheap to clone.
#[derive(Clone)]
pub struct ZdsServer {
    shared: Arc<Shared>,
    accept: Arc<StdMutex<Option<JoinHandle<()>>>>,
}

impl ZdsServer {
    /// A server that does not listen yet: register the pods enrolled at
    /// start-up first ([`ZdsServer::register`]), then [`ZdsServer::serve`],
    /// so that no ztunnel ever gets an incomplete snapshot (it would drain
    /// the missing pods).
    pub fn new(cfg: ZdsConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                cfg,
                pods: StdMutex::new(BTreeMap::new()),
                conns: StdMutex::new(Vec::new()),
                tasks: StdMutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
            }),
            accept: Arc::new(StdMutex::new(None)),
        }
    }

    pub fn config(&self) -> &ZdsConfig {
        &self.shared.cfg
    }

    /// Creates the socket's directory, replaces a stale socket file, listens
    /// and accepts connections in a background task (until
    /// [`ZdsServer::shutdown`]).
    pub fn serve(&self) -> Result<(), ZdsError> {
        let path = self.shared.cfg.socket_path.clone();
        let err = |source| ZdsError::Socket {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed stale ZDS socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = SeqpacketListener::bind(&path).map_err(err)?;
        tracing::info!(path = %path.display(), "ZDS server listening");
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok(sock) => {
                        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                        let task = tokio::spawn(handle_conn(shared.clone(), id, sock));
                        let mut tasks = shared.tasks.lock().unwrap();
                        tasks.retain(|t| !t.is_finished());
                        tasks.push(task);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ZDS accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        if let Some(old) = self.accept.lock().unwrap().replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        for task in self.shared.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        self.shared.conns.lock().unwrap().clear();
    }

    /// True when at least one ztunnel is connected (its snapshot may still
    /// be in progress).
    pub fn connected(&self) -> bool {
        !self.shared.conns.lock().unwrap().is_empty()
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }

    /// Records an enrolled pod for snapshots without sending anything
    /// (start-up). `netns: None` → `KeepWorkload` in snapshots.
    pub fn register(&self, uid: &str, info: WorkloadInfo, netns: Option<&Netns>) {
        let netns = netns.and_then(|n| n.try_clone().ok());
        self.shared
            .pods
            .lock()
            .unwrap()
            .insert(uid.to_string(), Entry { info, netns });
    }

    /// UIDs in the snapshot set.
    pub fn known_uids(&self) -> Vec<String> {
        self.shared.pods.lock().unwrap().keys().cloned().collect()
    }

    /// Records the pod (for later snapshots, even if this fails) and sends
    /// `AddWorkload` with the netns fd to the newest ztunnel; waits for its
    /// Ack.
    pub async fn add_workload(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: &Netns,
    ) -> Result<(), ZdsError> {
        let kept = netns.try_clone().map_err(|source| ZdsError::Fd {
            uid: uid.to_string(),
            source,
        })?;
        self.shared.pods.lock().unwrap().insert(
            uid.to_string(),
            Entry {
                info: info.clone(),
                netns: Some(kept),
            },
        );
        let conn = self
            .shared
            .conns
            .lock()
            .unwrap()
            .last()
            .cloned()
            .ok_or(ZdsError::NoZtunnel)?;
        let req = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.to_string(),
                workload_info: Some(info),
            })),
        };
        let sock = conn.sock.lock().await;
        request(
            &self.shared,
            &conn,
            &sock,
            &req,
            Some(netns),
            &format!("add {uid}"),
        )
        .await
    }

    /// Forgets the pod and sends `DelWorkload` to every connection. No
    /// connection is not an error; the first failure is returned after all
    /// connections were tried.
    pub async fn del_workload(&self, uid: &str) -> Result<(), ZdsError> {
        self.shared.pods.lock().unwrap().remove(uid);
        let conns: Vec<Arc<Conn>> = self.shared.conns.lock().unwrap().clone();
        let req = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: uid.to_string(),
            })),
        };
        let mut first_err = None;
        for conn in conns {
            let sock = conn.sock.lock().await;
            if let Err(e) = request(
                &self.shared,
                &conn,
                &sock,
                &req,
                None,
                &format!("del {uid}"),
            )
            .await
            {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

fn drop_conn(shared: &Shared, id: u64, reason: &str) {
    let mut conns = shared.conns.lock().unwrap();
    let before = conns.len();
    conns.retain(|c| c.id != id);
    if conns.len() != before {
        tracing::warn!(conn = id, reason, "ztunnel connection dropped");
    }
}

fn is_registered(shared: &Shared, id: u64) -> bool {
    shared.conns.lock().unwrap().iter().any(|c| c.id == id)
}

/// Sends one request and waits for its Ack. Failures other than a Nack drop
/// the connection.
async fn request(
    shared: &Shared,
    conn: &Conn,
    sock: &SeqpacketConn,
    req: &WorkloadRequest,
    fd: Option<&Netns>,
    what: &str,
) -> Result<(), ZdsError> {
    let timeout = shared.cfg.ack_timeout;
    if !is_registered(shared, conn.id) {
        return Err(ZdsError::Connection {
            conn: conn.id,
            what: what.into(),
            reason: "connection already closed".into(),
        });
    }
    let fail = |reason: String| {
        drop_conn(shared, conn.id, &reason);
        ZdsError::Connection {
            conn: conn.id,
            what: what.into(),
            reason,
        }
    };
    let bytes = req.encode_to_vec();
    let fd = fd.map(std::os::fd::AsFd::as_fd);
    match tokio::time::timeout(timeout, sock.send(&bytes, fd)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(fail(format!("send: {e}"))),
        Err(_) => {
            drop_conn(shared, conn.id, "send timed out");
            return Err(ZdsError::Timeout {
                what: what.into(),
                timeout,
            });
        }
    }
    let dgram = match tokio::time::timeout(timeout, sock.recv(ACK_BUFFER)).await {
        Ok(Ok(Some(d))) => d,
        Ok(Ok(None)) => return Err(fail("closed by ztunnel".into())),
        Ok(Err(e)) => return Err(fail(format!("receive: {e}"))),
        Err(_) => {
            drop_conn(shared, conn.id, "ack timed out");
            return Err(ZdsError::Timeout {
                what: what.into(),
                timeout,
            });
        }
    };
    if dgram.truncated || !dgram.fds.is_empty() {
        return Err(fail("malformed answer (truncated or carrying fds)".into()));
    }
    match WorkloadResponse::decode(dgram.data.as_slice()) {
        Ok(WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(ack)),
        }) => {
            if ack.error.is_empty() {
                Ok(())
            } else {
                Err(ZdsError::Nack {
                    what: what.into(),
                    reason: ack.error,
                })
            }
        }
        Ok(_) => Err(fail("answer is not an Ack".into())),
        Err(e) => Err(fail(format!("undecodable answer: {e}"))),
    }
}

async fn handle_conn(shared: Arc<Shared>, id: u64, sock: SeqpacketConn) {
    // Hello.
    let hello = match tokio::time::timeout(shared.cfg.ack_timeout, sock.recv(ACK_BUFFER)).await {
        Ok(Ok(Some(d))) if !d.truncated && d.fds.is_empty() => ZdsHello::decode(d.data.as_slice()),
        Ok(Ok(Some(_))) => {
            tracing::warn!(conn = id, "ZDS hello truncated or carrying fds: closing");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(conn = id, error = %e, "ZDS hello: receive failed");
            return;
        }
        Err(_) => {
            tracing::warn!(conn = id, "no ZDS hello in time: closing");
            return;
        }
    };
    match hello {
        Ok(h) if h.version == Version::V1 as i32 => {}
        Ok(h) => {
            tracing::warn!(
                conn = id,
                version = h.version,
                "unsupported ZDS version: closing"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(conn = id, error = %e, "undecodable ZDS hello: closing");
            return;
        }
    }
    tracing::info!(conn = id, "ztunnel connected");

    let conn = Arc::new(Conn {
        id,
        sock: Mutex::new(sock),
    });
    // Register and lock before reading the snapshot, so an Add racing with
    // the snapshot is either in it or sent after it.
    let guard = conn.sock.lock().await;
    shared.conns.lock().unwrap().push(conn.clone());
    let snapshot: Vec<(String, WorkloadInfo, Option<Netns>)> = shared
        .pods
        .lock()
        .unwrap()
        .iter()
        .map(|(uid, e)| {
            (
                uid.clone(),
                e.info.clone(),
                e.netns.as_ref().and_then(|n| n.try_clone().ok()),
            )
        })
        .collect();
    let mut n_add = 0;
    let mut n_keep = 0;
    for (uid, info, netns) in snapshot {
        let (req, what) = match &netns {
            Some(_) => {
                n_add += 1;
                (
                    WorkloadRequest {
                        payload: Some(workload_request::Payload::Add(AddWorkload {
                            uid: uid.clone(),
                            workload_info: Some(info),
                        })),
                    },
                    format!("snapshot add {uid}"),
                )
            }
            None => {
                n_keep += 1;
                (
                    WorkloadRequest {
                        payload: Some(workload_request::Payload::Keep(KeepWorkload {
                            uid: uid.clone(),
                        })),
                    },
                    format!("snapshot keep {uid}"),
                )
            }
        };
        match request(&shared, &conn, &guard, &req, netns.as_ref(), &what).await {
            Ok(()) => {}
            Err(ZdsError::Nack { what, reason }) => {
                tracing::warn!(conn = id, %what, %reason, "ztunnel refused a snapshot entry");
            }
            Err(e) => {
                tracing::warn!(conn = id, error = %e, "snapshot aborted");
                return;
            }
        }
    }
    let done = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    };
    match request(&shared, &conn, &guard, &done, None, "snapshot sent").await {
        Ok(()) => {}
        // A refusal is ztunnel's answer, not a broken connection: keep
        // serving it, as upstream does (it logs the Ack error and goes on).
        Err(ZdsError::Nack { reason, .. }) => {
            tracing::error!(conn = id, %reason, "ztunnel refused SnapshotSent; keeping the connection");
        }
        Err(e) => {
            tracing::warn!(conn = id, error = %e, "snapshot not acknowledged");
            drop_conn(&shared, id, "snapshot not acknowledged");
            return;
        }
    }
    drop(guard);
    tracing::info!(conn = id, adds = n_add, keeps = n_keep, "ZDS snapshot sent");

    // Liveness of the idle connection.
    loop {
        tokio::time::sleep(shared.cfg.liveness_interval).await;
        if !is_registered(&shared, id) {
            return;
        }
        let Ok(sock) = conn.sock.try_lock() else {
            continue; // busy with a request: alive enough
        };
        if sock.activity_within(shared.cfg.liveness_probe).await {
            drop_conn(
                &shared,
                id,
                "idle connection readable (closed or out of turn)",
            );
            return;
        }
    }
}
