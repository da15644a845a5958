//! ZDS end to end over a real SOCK_SEQPACKET socket with real netns fds:
//! the node agent's `ZdsServer` <-> ztunnel's `InpodClient`, whose proxy
//! manager binds the workload listeners inside each pod netns through the
//! `InpodSocketFactory` (SO_MARK 1337, SO_REUSEPORT): snapshot (Add + Keep),
//! steady Add/Del, Nack + retry + readiness, agent restart.
//!
//! Needs root (network namespaces, SO_MARK).

mod inpod_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use inpod_support::*;
use node_agent::zds::{ZdsError, ZdsServer};
use ztunnel::inpod::{InpodNetns, InpodSocketFactory};
use ztunnel::redirect::SocketFactory;

macro_rules! require_root {
    () => {
        if !inpod_support::is_root() {
            eprintln!("skipped: needs root (network namespaces, SO_MARK)");
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_add_del_nack_and_real_listeners() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let (ns_a, ns_b, ns_c) = (pod_netns(), pod_netns(), pod_netns());

    let server = ZdsServer::new(server_config(&path));
    server.register("a", info("a"), Some(&ns_a));
    server.register("b", info("b"), Some(&ns_b));
    server.register("kept", info("kept"), None);
    server.serve().unwrap();

    let z = Running::start(&path);
    wait_until("ready after the snapshot", || z.ready()).await;
    assert_eq!(z.proxies.running(), vec!["a", "b"]);
    // Each proxy's listeners really are inside its pod netns, marked.
    for (ns, uid) in [(&ns_a, "a"), (&ns_b, "b")] {
        {
            let running = z.proxies.running.lock().unwrap();
            let (inode, listeners) = &running[uid];
            assert_eq!(*inode, ns.inode().unwrap());
            for l in listeners {
                let s = socket2::SockRef::from(l);
                assert_eq!(s.mark().unwrap(), MARK);
                assert!(s.reuse_port().unwrap());
            }
        }
        for port in [15001, 15006, 15008] {
            assert!(can_connect(ns, port).await, "{uid}:{port}");
        }
    }
    assert!(
        !can_connect(&ns_c, 15001).await,
        "nothing in a pod not enrolled"
    );

    // Add in steady state.
    server.add_workload("c", info("c"), &ns_c).await.unwrap();
    assert!(can_connect(&ns_c, 15008).await);
    // Del drains one workload only.
    server.del_workload("a").await.unwrap();
    assert_eq!(z.proxies.running(), vec!["b", "c"]);
    assert!(!can_connect(&ns_a, 15001).await);
    assert!(can_connect(&ns_b, 15001).await);

    // A proxy that fails to start is Nacked with the reason, pending, and
    // readiness drops until the retry succeeds.
    z.proxies.failing.lock().unwrap().insert("d".into());
    let ns_d = pod_netns();
    match server.add_workload("d", info("d"), &ns_d).await {
        Err(ZdsError::Nack { reason, .. }) => {
            assert!(reason.contains("failure to start proxy"), "{reason}")
        }
        other => panic!("expected a nack, got {other:?}"),
    }
    assert!(!z.ready());
    z.proxies.failing.lock().unwrap().clear();
    wait_until("pending proxy retried", || z.ready()).await;
    assert!(can_connect(&ns_d, 15006).await);

    z.shutdown().await;
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_keeps_proxies_and_replays_the_snapshot() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let (ns_a, ns_b) = (pod_netns(), pod_netns());

    let server = ZdsServer::new(server_config(&path));
    server.register("a", info("a"), Some(&ns_a));
    server.register("b", info("b"), Some(&ns_b));
    server.serve().unwrap();
    let z = Running::start(&path);
    wait_until("ready", || z.ready()).await;
    z.proxies.log();

    // An established connection into pod a's proxy survives the restart.
    let ins = Arc::new(InpodNetns::new(ns_a.as_fd().try_clone_to_owned().unwrap()).unwrap());
    let conn = InpodSocketFactory::new(ins, None, false)
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, 15008)), None)
        .await
        .unwrap();

    // Agent goes away: ztunnel keeps its proxies, reports not ready.
    server.shutdown();
    drop(server);
    wait_until("not ready without the agent", || !z.ready()).await;
    assert_eq!(z.proxies.running(), vec!["a", "b"]);
    assert!(can_connect(&ns_a, 15001).await);

    // New agent: only `a` is still enrolled (b was deleted meanwhile).
    let server = ZdsServer::new(server_config(&path));
    server.register("a", info("a"), Some(&ns_a));
    server.serve().unwrap();
    wait_until("ready after the new snapshot", || z.ready()).await;
    assert_eq!(z.proxies.running(), vec!["a"]);
    assert_eq!(z.proxies.log(), vec!["stop b"], "a was not restarted");
    assert!(conn.peer_addr().is_ok());

    z.shutdown().await;
    server.shutdown();
}
