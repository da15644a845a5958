//! Nodes: a workload's locality from its node's topology labels, and nodes the
//! discovery may not read.

use super::*;
use crate::state::kube::{ObjectKind, sync_without};

fn node(
    name: &str,
    zone: Option<&str>,
) -> kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Node> {
    let mut labels = json!({"kubernetes.io/hostname": name});
    if let Some(z) = zone {
        labels["topology.kubernetes.io/region"] = json!("r1");
        labels["topology.kubernetes.io/zone"] = json!(z);
    }
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap()
}

fn locality_of(store: &Store, pod_ip: &str) -> (String, String) {
    let snap = store.snapshot();
    let w = snap.workload_by_ip("", ip(pod_ip)).unwrap();
    (w.locality.region.clone(), w.locality.zone.clone())
}

/// A workload's locality is its node's topology labels; a node that appears after its
/// pods, changes its labels or is re-listed without them re-converts exactly the pods on
/// it; `trafficDistribution: PreferClose` then keeps a client in its zone.
#[test]
fn node_topology_gives_locality_and_prefer_close_uses_it() {
    let mut idx = index();
    let store = Store::new();
    for (name, ip, node) in [
        ("web-a", "10.0.1.1", "node-a"),
        ("web-b", "10.0.1.2", "node-b"),
        ("client", "10.0.1.3", "node-a"),
    ] {
        let mut p = pod("app", name, ip, json!({"app": name}), true);
        p.spec.as_mut().unwrap().node_name = Some(node.into());
        idx.pod_event(Event::Apply(p));
    }
    let mut svc = service("app", "web", "10.96.0.40", json!(8080));
    svc.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
    idx.service_event(Event::Apply(svc));
    idx.slice_event(Event::Apply(slice(
        "app",
        "web-x",
        "web",
        Some(8080),
        &["web-a", "web-b"],
    )));
    flush(&mut idx, &store);
    assert_eq!(
        locality_of(&store, "10.0.1.1"),
        (String::new(), String::new())
    );

    // Nodes listed after the pods: the pods on them are converted again.
    idx.node_event(Event::Init);
    idx.node_event(Event::InitApply(node("node-a", Some("z-a"))));
    idx.node_event(Event::InitApply(node("node-b", Some("z-b"))));
    idx.node_event(Event::InitApply(node("node-c", None)));
    idx.node_event(Event::InitDone);
    assert_eq!(idx.node_count(), 3);
    assert_eq!(flush(&mut idx, &store), 3, "the three pods, nothing else");
    assert_eq!(locality_of(&store, "10.0.1.1"), ("r1".into(), "z-a".into()));
    assert_eq!(locality_of(&store, "10.0.1.2"), ("r1".into(), "z-b".into()));
    let pick_names = |store: &Store| {
        let snap = store.snapshot();
        let svc = snap.service_by_vip("", ip("10.96.0.40")).unwrap().clone();
        let client = snap.workload_by_ip("", ip("10.0.1.3")).unwrap().clone();
        (0..40)
            .map(|_| {
                snap.pick_endpoint_for(Some(&client), &svc, 80)
                    .unwrap()
                    .0
                    .name
                    .clone()
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(
        pick_names(&store).into_iter().collect::<Vec<_>>(),
        ["web-a"],
        "PreferClose: the client's zone"
    );

    // Status churn (same labels): nothing to do. A label change: the pods on that node.
    idx.node_event(Event::Apply(node("node-a", Some("z-a"))));
    assert_eq!(flush(&mut idx, &store), 0);
    idx.node_event(Event::Apply(node("node-b", Some("z-a"))));
    assert_eq!(flush(&mut idx, &store), 1);
    assert_eq!(locality_of(&store, "10.0.1.2"), ("r1".into(), "z-a".into()));
    assert_eq!(pick_names(&store).len(), 2, "both endpoints are close now");

    // A re-list without node-b (deleted meanwhile): its pod's locality is unknown.
    idx.node_event(Event::Init);
    idx.node_event(Event::InitApply(node("node-a", Some("z-a"))));
    idx.node_event(Event::InitDone);
    assert_eq!(flush(&mut idx, &store), 1);
    assert_eq!(
        locality_of(&store, "10.0.1.2"),
        (String::new(), String::new())
    );
    // A pod moving onto a known node (a new pod of the same name) takes its locality.
    let mut p = pod("app", "web-b", "10.0.1.2", json!({"app": "web-b"}), true);
    p.spec.as_mut().unwrap().node_name = Some("node-a".into());
    idx.pod_event(Event::Apply(p));
    flush(&mut idx, &store);
    assert_eq!(locality_of(&store, "10.0.1.2"), ("r1".into(), "z-a".into()));
    idx.node_event(Event::Delete(node("node-a", Some("z-a"))));
    assert_eq!(flush(&mut idx, &store), 3, "every pod now on node-a");
}

/// Nodes only give locality: a role without access to them (403) lets discovery sync;
/// any other failure, or a 403 on another kind, does not.
#[test]
fn forbidden_nodes_do_not_block_the_sync() {
    use kube::runtime::watcher::Error;
    let status = |code: u16| -> Box<kube::core::Status> {
        Box::new(serde_json::from_value(json!({"code": code, "reason": "Forbidden"})).unwrap())
    };
    let forbidden = Error::InitialListFailed(kube::Error::Api(status(403)));
    assert!(sync_without(ObjectKind::Nodes, &forbidden));
    assert!(sync_without(
        ObjectKind::Nodes,
        &Error::WatchError(status(403))
    ));
    assert!(!sync_without(ObjectKind::Pods, &forbidden));
    assert!(!sync_without(
        ObjectKind::Nodes,
        &Error::InitialListFailed(kube::Error::Api(status(500)))
    ));
}
