//! The agent's ZDS server against a scripted fake ztunnel on a real
//! SOCK_SEQPACKET socket: hello, snapshot (Add with one netns fd, Keep),
//! SnapshotSent, Add/Del, Nack, ack timeout, dead-connection detection,
//! newest-connection routing, stale socket replacement, bad hello.

use std::os::fd::AsFd;
use std::time::Duration;

use mesh_proto::zds::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};
use node_agent::redirect::netns::{Netns, is_netns};
use node_agent::zds::socket::SeqpacketConn;
use node_agent::zds::{ZdsConfig, ZdsError, ZdsServer};
use prost::Message;

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
    }
}

fn config(dir: &tempfile::TempDir) -> ZdsConfig {
    ZdsConfig {
        socket_path: dir.path().join("run/ztunnel/ztunnel.sock"),
        ack_timeout: Duration::from_millis(500),
        liveness_interval: Duration::from_millis(100),
        liveness_probe: Duration::from_millis(10),
    }
}

struct FakeZtunnel {
    conn: SeqpacketConn,
}

impl FakeZtunnel {
    async fn connect(server: &ZdsServer) -> Self {
        let conn = SeqpacketConn::connect(&server.config().socket_path).expect("connect");
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        conn.send(&hello.encode_to_vec(), None).await.unwrap();
        Self { conn }
    }

    /// Next request with its fds.
    async fn recv(&self) -> (WorkloadRequest, Vec<std::os::fd::OwnedFd>) {
        let d = tokio::time::timeout(Duration::from_secs(5), self.conn.recv(1024))
            .await
            .expect("request in time")
            .unwrap()
            .expect("not EOF");
        assert!(!d.truncated);
        (WorkloadRequest::decode(d.data.as_slice()).unwrap(), d.fds)
    }

    async fn ack(&self, error: &str) {
        let r = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.into(),
            })),
        };
        self.conn.send(&r.encode_to_vec(), None).await.unwrap();
    }

    /// Receives the whole snapshot, acking everything; returns
    /// ("add <uid>" with fd inode | "keep <uid>") in order.
    async fn take_snapshot(&self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let (req, fds) = self.recv().await;
            match req.payload.unwrap() {
                workload_request::Payload::Add(a) => {
                    assert_eq!(fds.len(), 1, "Add carries exactly one fd");
                    assert!(is_netns(fds[0].as_fd()));
                    seen.push(format!("add {}", a.uid));
                }
                workload_request::Payload::Keep(k) => {
                    assert!(fds.is_empty());
                    seen.push(format!("keep {}", k.uid));
                }
                workload_request::Payload::SnapshotSent(_) => {
                    assert!(fds.is_empty());
                    self.ack("").await;
                    return seen;
                }
                other => panic!("unexpected in snapshot: {other:?}"),
            }
            self.ack("").await;
        }
    }
}

async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn add_without_ztunnel_is_no_ztunnel_but_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::new(config(&dir));
    let ns = Netns::current().unwrap();
    let e = server.add_workload("u1", info("a"), &ns).await.unwrap_err();
    assert!(matches!(e, ZdsError::NoZtunnel), "{e}");
    assert_eq!(server.known_uids(), vec!["u1"]);
    assert!(!server.connected());
    // Del without connections is fine.
    server.del_workload("u1").await.unwrap();
    assert!(server.known_uids().is_empty());
}

#[tokio::test]
async fn snapshot_then_add_del_and_nack() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::new(config(&dir));
    let ns = Netns::current().unwrap();
    server.register("a", info("a"), Some(&ns));
    server.register("b", info("b"), None);
    // A stale socket file is replaced.
    std::fs::create_dir_all(server.config().socket_path.parent().unwrap()).unwrap();
    std::fs::write(&server.config().socket_path, b"stale").unwrap();
    server.serve().unwrap();

    let z = FakeZtunnel::connect(&server).await;
    assert_eq!(z.take_snapshot().await, vec!["add a", "keep b"]);
    assert!(server.connected());

    let srv = server.clone();
    let ns2 = ns.try_clone().unwrap();
    let add = tokio::spawn(async move { srv.add_workload("c", info("c"), &ns2).await });
    let (req, fds) = z.recv().await;
    let Some(workload_request::Payload::Add(a)) = req.payload else {
        panic!("{req:?}")
    };
    assert_eq!(a.uid, "c");
    assert_eq!(a.workload_info, Some(info("c")));
    assert_eq!(fds.len(), 1);
    z.ack("").await;
    add.await.unwrap().unwrap();

    let srv = server.clone();
    let ns2 = ns.try_clone().unwrap();
    let add = tokio::spawn(async move { srv.add_workload("d", info("d"), &ns2).await });
    let _ = z.recv().await;
    z.ack("failure to start proxy: boom").await;
    match add.await.unwrap() {
        Err(ZdsError::Nack { reason, .. }) => assert!(reason.contains("boom")),
        other => panic!("{other:?}"),
    }
    assert!(server.connected(), "a nack does not drop the connection");

    let srv = server.clone();
    let del = tokio::spawn(async move { srv.del_workload("a").await });
    let (req, fds) = z.recv().await;
    assert!(fds.is_empty());
    assert_eq!(
        req.payload,
        Some(workload_request::Payload::Del(
            mesh_proto::zds::DelWorkload { uid: "a".into() }
        ))
    );
    z.ack("").await;
    del.await.unwrap().unwrap();
    let mut uids = server.known_uids();
    uids.sort();
    assert_eq!(uids, vec!["b", "c", "d"]);
    server.shutdown();
}

#[tokio::test]
async fn unanswered_request_times_out_and_drops_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::new(config(&dir));
    server.serve().unwrap();
    let z = FakeZtunnel::connect(&server).await;
    assert!(z.take_snapshot().await.is_empty());
    let ns = Netns::current().unwrap();
    let e = server.add_workload("x", info("x"), &ns).await.unwrap_err();
    assert!(matches!(e, ZdsError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("add x"), "{e}");
    assert!(!server.connected());
    server.shutdown();
}

#[tokio::test]
async fn dead_connection_is_detected_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::new(config(&dir));
    server.serve().unwrap();
    let z = FakeZtunnel::connect(&server).await;
    z.take_snapshot().await;
    assert_eq!(server.connections(), 1);
    // An idle, healthy connection survives several liveness rounds.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(server.connections(), 1);
    drop(z);
    let s = server.clone();
    wait_for(move || s.connections() == 0, "dead connection dropped").await;
    let ns = Netns::current().unwrap();
    assert!(matches!(
        server.add_workload("y", info("y"), &ns).await,
        Err(ZdsError::NoZtunnel)
    ));
    server.shutdown();
}

#[tokio::test]
async fn add_goes_to_the_newest_connection_del_to_all() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::new(config(&dir));
    server.serve().unwrap();
    let old = FakeZtunnel::connect(&server).await;
    old.take_snapshot().await;
    let new = FakeZtunnel::connect(&server).await;
    new.take_snapshot().await;
    assert_eq!(server.connections(), 2);

    let ns = Netns::current().unwrap();
    let srv = server.clone();
    let add = tokio::spawn(async move { srv.add_workload("p", info("p"), &ns).await });
    let (req, _) = new.recv().await;
    assert!(matches!(
        req.payload,
        Some(workload_request::Payload::Add(_))
    ));
    new.ack("").await;
    add.await.unwrap().unwrap();
    // the old one got nothing
    assert!(!old.conn.activity_within(Duration::from_millis(50)).await);

    let srv = server.clone();
    let del = tokio::spawn(async move { srv.del_workload("p").await });
    for z in [&old, &new] {
        let (req, _) = z.recv().await;
        assert!(matches!(
            req.payload,
            Some(workload_request::Payload::Del(_))
        ));
        z.ack("").await;
    }
    del.await.unwrap().unwrap();
    server.shutdown();
}

#[tokio::test]
async fn bad_hello_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::new(config(&dir));
    server.serve().unwrap();
    for hello in [vec![0x08, 0x02], vec![0xff, 0xff]] {
        let conn = SeqpacketConn::connect(&server.config().socket_path).unwrap();
        conn.send(&hello, None).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), conn.recv(1024))
            .await
            .expect("closed in time")
            .unwrap();
        assert!(got.is_none(), "expected EOF, got {got:?}");
    }
    assert!(!server.connected());
    server.shutdown();
}

/// A NACK of `SnapshotSent` is ztunnel's answer, not a broken connection:
/// upstream logs it and keeps serving the connection, so later Adds reach
/// that ztunnel (dropping it made ztunnel reconnect and start over).
#[tokio::test]
async fn nacked_snapshot_sent_keeps_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::new(config(&dir));
    server.serve().unwrap();
    let z = FakeZtunnel::connect(&server).await;
    let (req, _) = z.recv().await;
    assert!(matches!(
        req.payload,
        Some(workload_request::Payload::SnapshotSent(_))
    ));
    z.ack("snapshot: reconcile failed").await;
    // Past several liveness rounds, still connected.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(server.connections(), 1);

    let ns = Netns::current().unwrap();
    let srv = server.clone();
    let add = tokio::spawn(async move { srv.add_workload("q", info("q"), &ns).await });
    let (req, fds) = z.recv().await;
    assert!(matches!(
        req.payload,
        Some(workload_request::Payload::Add(_))
    ));
    assert_eq!(fds.len(), 1);
    z.ack("").await;
    add.await.unwrap().unwrap();
    server.shutdown();
}
