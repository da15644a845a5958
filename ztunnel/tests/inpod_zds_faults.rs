//! ztunnel's ZDS client against a scripted fake agent sending malformed
//! datagrams, wrong fd counts, non-netns fds and out-of-phase requests: each
//! closes only that connection, the running proxy is unaffected, and no fd
//! leaks (counted in /proc/self/fd; alone in this test binary so nothing
//! else opens fds meanwhile).
//!
//! Needs root (network namespaces, SO_MARK).

mod inpod_support;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use inpod_support::*;
use mesh_proto::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadRequest, WorkloadResponse,
    workload_request, workload_response,
};
use node_agent::redirect::netns::Netns;
use node_agent::zds::socket::{SeqpacketConn, SeqpacketListener};
use prost::Message;

macro_rules! require_root {
    () => {
        if !inpod_support::is_root() {
            eprintln!("skipped: needs root (network namespaces, SO_MARK)");
            return;
        }
    };
}

// ---- scripted fake agent: protocol violations ----

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// What the open fds point at, for a failure message.
fn fd_targets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

fn req(payload: workload_request::Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add(uid: &str) -> Vec<u8> {
    req(workload_request::Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: Some(info(uid)),
    }))
}

fn snapshot_sent() -> Vec<u8> {
    req(workload_request::Payload::SnapshotSent(SnapshotSent {}))
}

/// Sends a datagram with raw fds (the fake agent may send several).
async fn send_with_fds(conn: &SeqpacketConn, data: &[u8], fds: &[&OwnedFd]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    // Small datagrams on an idle socket: the send does not block.
    sendmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &[std::io::IoSlice::new(data)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap();
}

async fn expect_ack(conn: &SeqpacketConn) -> String {
    let d = tokio::time::timeout(Duration::from_secs(5), conn.recv(1024))
        .await
        .expect("ack in time")
        .unwrap()
        .expect("ack, not EOF");
    match WorkloadResponse::decode(d.data.as_slice()).unwrap().payload {
        Some(workload_response::Payload::Ack(a)) => a.error,
        None => panic!("empty response"),
    }
}

async fn expect_closed(conn: &SeqpacketConn, case: &str) {
    let got = tokio::time::timeout(Duration::from_secs(5), conn.recv(1024))
        .await
        .unwrap_or_else(|_| panic!("{case}: connection not closed in time"));
    match got {
        Ok(None) | Err(_) => {}
        Ok(Some(d)) => panic!("{case}: expected the connection closed, got {d:?}"),
    }
}

/// Accepts ztunnel's next connection, reads its hello, sends a snapshot
/// naming `a` (with its netns fd), and returns the connection.
async fn accept_and_snapshot(listener: &SeqpacketListener, ns_a: &Netns) -> SeqpacketConn {
    let conn = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("ztunnel reconnects")
        .unwrap();
    let hello = conn.recv(1024).await.unwrap().expect("hello");
    assert_eq!(hello.data, vec![0x08, 0x01]);
    let fd: OwnedFd = ns_a.as_fd().try_clone_to_owned().unwrap();
    send_with_fds(&conn, &add("a"), &[&fd]).await;
    drop(fd);
    assert_eq!(expect_ack(&conn).await, "");
    send_with_fds(&conn, &snapshot_sent(), &[]).await;
    assert_eq!(expect_ack(&conn).await, "");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_close_only_that_connection_without_fd_leaks() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let listener = SeqpacketListener::bind(&path).unwrap();
    let ns_a = pod_netns();
    let z = Running::start(&path);

    let conn = accept_and_snapshot(&listener, &ns_a).await;
    wait_until("ready", || z.ready()).await;
    // Warm up the executor thread and anything lazily opened.
    assert!(can_connect(&ns_a, 15001).await);
    let baseline = open_fds();
    drop(conn);
    let mut conn = accept_and_snapshot(&listener, &ns_a).await;

    let netns_fd = || -> OwnedFd { ns_a.as_fd().try_clone_to_owned().unwrap() };
    let not_netns = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
    let del_a = req(workload_request::Payload::Del(DelWorkload {
        uid: "zzz".into(),
    }));
    let keep = req(workload_request::Payload::Keep(KeepWorkload {
        uid: "a".into(),
    }));
    // (case, datagram, netns fds to attach, non-netns fds to attach); fds
    // are opened just before sending so the count is exact.
    type Case = (&'static str, Vec<u8>, usize, usize);
    let cases: Vec<Case> = vec![
        ("undecodable datagram", vec![0xff, 0xff, 0xff], 0, 0),
        ("empty payload", vec![0x22, 0x00], 0, 0),
        ("Add without fd", add("x"), 0, 0),
        ("Add with two fds", add("x"), 2, 0),
        ("Add with a non-netns fd", add("x"), 0, 1),
        ("Del with an fd", del_a.clone(), 1, 0),
        ("Keep after the snapshot", keep, 0, 0),
        ("second SnapshotSent", snapshot_sent(), 0, 0),
        (
            "datagram over 1024 bytes",
            {
                let mut v = add("x");
                v.extend(std::iter::repeat_n(0u8, 2000));
                v
            },
            0,
            0,
        ),
        ("Add with 20 fds (control data truncated)", add("x"), 20, 0),
    ];
    for (case, data, n_netns, n_other) in cases {
        let fds: Vec<OwnedFd> = (0..n_netns)
            .map(|_| netns_fd())
            .chain((0..n_other).map(|_| not_netns()))
            .collect();
        let refs: Vec<&OwnedFd> = fds.iter().collect();
        send_with_fds(&conn, &data, &refs).await;
        drop(fds);
        expect_closed(&conn, case).await;
        drop(conn);
        // ztunnel reconnects; the running proxy was never touched.
        conn = accept_and_snapshot(&listener, &ns_a).await;
        wait_until("ready again", || z.ready()).await;
        assert_eq!(z.proxies.running(), vec!["a"], "{case}");
        assert!(can_connect(&ns_a, 15001).await, "{case}");
        // A leak shows as more descriptors than before; fewer is fine (something the
        // process had open at the baseline, e.g. a transient socket, may have closed since).
        let now = open_fds();
        assert!(
            now <= baseline,
            "{case}: fd count {now} > {baseline}: {:?}",
            fd_targets()
        );
    }
    // A valid Del still works on the last connection.
    send_with_fds(&conn, &del_a, &[]).await;
    assert_eq!(expect_ack(&conn).await, "");
    // `a` was never restarted by any of this (same netns on every snapshot).
    assert_eq!(
        z.proxies
            .log()
            .iter()
            .filter(|l| l.starts_with("stop"))
            .count(),
        0
    );

    z.shutdown().await;
}
