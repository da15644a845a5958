//! Node-wide (TPROXY) mode: certificates follow the workloads the state lists on this node.
//! The real node proxy in a "ztunnel pod" namespace with the TPROXY rules the node agent
//! installs (as in `tproxy_netns.rs`), the real store, the node-certificates watcher
//! (`app::node_certs`) and a counting CA:
//!
//! ```text
//!   pod a 10.66.1.1 ──za── ztunnel netns (TPROXY za→15001)   remote r 10.66.2.1 (node n2, unreachable)
//! ```
//!
//! a's certificate is prefetched (a is an HBONE workload of this node) or fetched on demand
//! by a's connection to r, whichever comes first (the HBONE connect then fails: no route to
//! node n2). While a replica of a's identity stays on the
//! node the certificate is renewed; once the last one is removed from the store, no more
//! CSRs and it is gone from the dump.
//!
//! Needs root (network namespaces, TPROXY).

mod common;
mod tproxy_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tproxy_support::{
    Namespaces, NodeProxy, Prerouting, install_prerouting, is_root, pod_link, tproxy_routing,
};
use ztunnel::app::node_certs;
use ztunnel::config::Config;
use ztunnel::identity::{Identity, SecretManager};
use ztunnel::proxy::ProxyInputs;
use ztunnel::state::Store;
use ztunnel::telemetry::ProxyMetrics;

const A: Ipv4Addr = Ipv4Addr::new(10, 66, 1, 1);
const GW: Ipv4Addr = Ipv4Addr::new(10, 66, 1, 254);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 66, 2, 1);

const WORKLOADS: &str = r#"
workloads:
- {uid: a, name: a, namespace: ns-a, serviceAccount: sa-a, workloadIps: ["10.66.1.1"],
   protocol: HBONE, node: n1, services: {}}
- {uid: a-2, name: a-2, namespace: ns-a, serviceAccount: sa-a, workloadIps: ["10.66.1.3"],
   protocol: HBONE, node: n1, services: {}}
- {uid: r, name: r, namespace: ns-r, serviceAccount: sa-r, workloadIps: ["10.66.2.1"],
   protocol: HBONE, node: n2, services: {}}
"#;

/// Namespaces: 0 zt, 1 pod a.
fn topology() -> Namespaces {
    let t = Namespaces::new("ztnc", &["zt", "a"]);
    pod_link(t.name(0), "za", t.name(1), A, GW);
    tproxy_routing(t.name(0), false);
    install_prerouting(&t.ns(0), &[Prerouting::Capture("za", 15001)]);
    t
}

#[test]
fn node_proxy_forgets_the_certificate_of_the_last_workload_that_left() {
    if !is_root() {
        return;
    }
    common::init_logs();
    let topo = topology();
    let ca = common::ca("ec");
    let provider = Arc::new(common::CountingCa::new(ca.clone()));
    // Shorter than the CA's one-minute back-dating: renewed every second.
    let cfg = Config {
        secret_ttl: Duration::from_secs(2),
        node_name: Some("n1".into()),
        handshake_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let certs = SecretManager::new(provider.clone(), cfg.secret_ttl);
    let store = Store::new();
    let lc = common::local_config(WORKLOADS, "node-certs.yaml");
    let src = store.source("file");
    src.replace_all(lc.workloads, lc.services, lc.policies);
    let inputs = ProxyInputs {
        cfg: Arc::new(cfg),
        state: store.clone(),
        certs: certs.clone(),
        roots: common::roots(&ca),
        metrics: Arc::new(ProxyMetrics::new(&mut Registry::default())),
    };

    // The node proxy and the watcher, on a thread inside the ztunnel netns.
    let proxy = NodeProxy::start_with(topo.ns(0), inputs, true, |inputs| {
        node_certs::watch(
            inputs.state.clone(),
            inputs.certs.clone(),
            inputs.cfg.node_name.clone(),
            Duration::from_millis(100),
        )
    });

    let a_id = Identity::new("cluster.local", "ns-a", "sa-a");
    let listed = || {
        certs
            .dump(&[])
            .iter()
            .any(|d| d.identity == a_id.to_string())
    };
    // a → r (node n2): captured; a's certificate is there for the HBONE connection
    // (prefetched by the watcher for a workload of this node, or fetched on demand if
    // the connection comes first: the two race, both are right).
    topo.ns(1)
        .run(|| {
            let dst = SocketAddr::from((REMOTE, 8080));
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                .expect("captured by the node proxy");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"hello");
            let _ = s.read(&mut [0u8; 16]);
        })
        .unwrap();
    common::wait_until("a's certificate fetched", Duration::from_secs(5), || {
        certs.current(&a_id).is_some()
    });

    // The workload that made the connection leaves; its replica on the node keeps the
    // identity in use.
    src.remove_workload("a");
    std::thread::sleep(Duration::from_millis(400));
    assert!(listed(), "replica a-2 still on n1");
    let before = provider.count(&a_id);
    common::wait_until("renewal while a-2 runs", Duration::from_secs(5), || {
        provider.count(&a_id) > before
    });

    // The last one is rescheduled to another node.
    let mut moved = store
        .snapshot()
        .workload_by_uid("a-2")
        .unwrap()
        .as_ref()
        .clone();
    moved.node = "n2".into();
    src.upsert_workload(moved);
    common::wait_until("a's certificate dropped", Duration::from_secs(5), || {
        !listed()
    });
    assert!(certs.current(&a_id).is_none());
    let after = provider.count(&a_id);
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(
        provider.count(&a_id),
        after,
        "no CSR once no workload of n1 has it"
    );
    assert!(!listed());
    assert!(
        !common::log_lines(&["certificate dropped", "ns-a/sa/sa-a"]).is_empty(),
        "the drop is logged with the identity:\n{}",
        common::logs()
    );

    proxy.stop();
}
