//! Workload certificates follow the in-pod workloads: over a real ZDS socket, with the
//! production proxy manager (`EngineWorkloadProxies`, listeners in real pod netns), an
//! identity keeps being renewed while any workload of its namespace/service account runs
//! on this ztunnel and is forgotten (no more CSRs, gone from the dump) after the last one's
//! `DelWorkload`.
//!
//! Needs root (network namespaces, SO_MARK).

mod common;
mod inpod_support;

use std::sync::Arc;
use std::time::Duration;

use inpod_support::{client_config, info, pod_netns, server_config, wait_until};
use node_agent::zds::ZdsServer;
use prometheus_client::registry::Registry;
use ztunnel::config::Config;
use ztunnel::identity::{Identity, SecretManager};
use ztunnel::inpod::{EngineWorkloadProxies, InpodClient};
use ztunnel::proxy::{ProxyFactory, ProxyInputs};
use ztunnel::state::Store;
use ztunnel::telemetry::ProxyMetrics;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_workload_forgets_the_identity_of_the_last_replica() {
    if !inpod_support::is_root() {
        eprintln!("skipped: needs root (network namespaces, SO_MARK)");
        return;
    }
    let ca = common::ca("ec");
    let provider = Arc::new(common::CountingCa::new(ca.clone()));
    // Shorter than the CA's one-minute back-dating: renewed every second.
    let cfg = Config {
        secret_ttl: Duration::from_secs(2),
        ..Config::default()
    };
    let certs = SecretManager::new(provider.clone(), cfg.secret_ttl);
    let inputs = ProxyInputs {
        cfg: Arc::new(cfg),
        state: Store::new(),
        certs: certs.clone(),
        roots: common::roots(&ca),
        metrics: Arc::new(ProxyMetrics::new(&mut Registry::default())),
    };
    let engine = Arc::new(EngineWorkloadProxies::new(
        ProxyFactory::new(inputs),
        Some(inpod_support::MARK),
        true,
        Duration::from_millis(200),
    ));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let server = ZdsServer::new(server_config(&path));
    server.serve().unwrap();
    let client = Arc::new(InpodClient::new(client_config(&path), engine.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    wait_until("ready after the snapshot", || *client.readiness().borrow()).await;

    // Two replicas of ns/sa (info() gives every pod that account), one other account.
    let id = Identity::new("cluster.local", "ns", "sa");
    let (ns_1, ns_2, ns_other) = (pod_netns(), pod_netns(), pod_netns());
    server
        .add_workload("uid-1", info("p1"), &ns_1)
        .await
        .unwrap();
    server
        .add_workload("uid-2", info("p2"), &ns_2)
        .await
        .unwrap();
    let mut other_info = info("q");
    other_info.service_account = "other".into();
    let other = Identity::new("cluster.local", "ns", "other");
    server
        .add_workload("uid-q", other_info, &ns_other)
        .await
        .unwrap();
    let listed = |id: &Identity| certs.dump(&[]).iter().any(|d| d.identity == id.to_string());
    wait_until("both identities issued", || {
        certs.current(&id).is_some() && certs.current(&other).is_some()
    })
    .await;
    let renewal = Duration::from_millis(1700);

    // One replica goes: the other still uses the identity, it keeps being renewed.
    server.del_workload("uid-1").await.unwrap();
    let before = provider.count(&id);
    tokio::time::sleep(renewal).await;
    assert!(
        provider.count(&id) > before,
        "renewed for the remaining replica"
    );
    assert!(listed(&id));
    assert_eq!(certs.holders("ns", "sa"), 1);

    // The last one goes: once drained, the identity is forgotten.
    server.del_workload("uid-2").await.unwrap();
    wait_until("last replica drained", || certs.holders("ns", "sa") == 0).await;
    assert!(!listed(&id), "{:?}", certs.dump(&[]));
    let after = provider.count(&id);
    let other_before = provider.count(&other);
    tokio::time::sleep(renewal).await;
    assert_eq!(provider.count(&id), after, "no CSR for a departed identity");
    assert!(!listed(&id));
    assert!(
        provider.count(&other) > other_before,
        "others still renewed"
    );
    assert!(listed(&other));

    let _ = stop.send(());
    task.await.unwrap();
    engine.drain_all().await;
    server.shutdown();
}
