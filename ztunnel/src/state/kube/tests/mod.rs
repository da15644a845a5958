//! Discovery index → store, driven by watcher events (no API server). The same
//! behaviour against an API server is tested in `e2e/tests/discovery.rs`.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use serde_json::json;

use super::convert::ConvertSettings;
use super::index::DiscoveryIndex;
use crate::policy::kube::peer_authn::PeerAuthentication;
use crate::policy::kube::{AuthorizationPolicy, ConvertOptions};
use crate::policy::matching::PeerIdentity;
use crate::policy::{Decision, Request};
use crate::state::{NamespacedHostname, Store};

mod locality;
mod policies;

fn index() -> DiscoveryIndex {
    DiscoveryIndex::new(
        ConvertSettings {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
        },
        ConvertOptions::default(),
    )
}

fn pod(ns: &str, name: &str, ip: &str, labels: serde_json::Value, ready: bool) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels,
            "annotations": {"ambient.istio.io/redirection": "enabled"}},
        "spec": {"serviceAccountName": format!("sa-{name}"), "nodeName": "node-1",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .unwrap()
}

fn service(ns: &str, name: &str, vip: &str, target: serde_json::Value) -> KubeService {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip],
            "ports": [{"name": "http", "port": 80, "targetPort": target}]}
    }))
    .unwrap()
}

fn slice(ns: &str, name: &str, svc: &str, port: Option<u16>, pods: &[&str]) -> EndpointSlice {
    let ports = match port {
        Some(p) => json!([{"name": "http", "port": p}]),
        None => json!([]),
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": pods.iter().map(|p| json!({"addresses": ["10.0.0.1"],
            "targetRef": {"kind": "Pod", "name": p, "namespace": ns}})).collect::<Vec<_>>()
    }))
    .unwrap()
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> AuthorizationPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec
    }))
    .unwrap()
}

fn flush(idx: &mut DiscoveryIndex, store: &Store) -> usize {
    let batch = idx.flush();
    let n = batch.len();
    store.source(super::SOURCE_NAME).apply(batch);
    n
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn decide(store: &Store, dst_ip: &str, src: Option<&str>, port: u16) -> Decision {
    let snap = store.snapshot();
    let w = snap.workload_by_ip("", ip(dst_ip)).unwrap().clone();
    snap.policies().evaluate(&Request {
        dst_workload_namespace: &w.namespace,
        dst_workload_policy_refs: &w.authorization_policies,
        src_identity: src.map(|s| PeerIdentity::from_spiffe(s).unwrap()),
        src_ip: Some(ip("10.9.9.9")),
        dst_ip: ip(dst_ip),
        dst_port: port,
    })
}

#[test]
fn pods_services_and_slices_become_workloads_with_membership() {
    let mut idx = index();
    let store = Store::new();
    idx.pod_event(Event::Apply(pod(
        "app",
        "web-1",
        "10.0.0.11",
        json!({"app": "web"}),
        true,
    )));
    idx.service_event(Event::Apply(service(
        "app",
        "web",
        "10.96.0.20",
        json!("http"),
    )));
    idx.slice_event(Event::Apply(slice(
        "app",
        "web-abc",
        "web",
        Some(8080),
        &["web-1"],
    )));
    flush(&mut idx, &store);

    let snap = store.snapshot();
    let w = snap.workload_by_ip("", ip("10.0.0.11")).unwrap();
    assert_eq!(w.uid, "Kubernetes//v1/Pod/app/web-1");
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/app/sa/sa-web-1"
    );
    assert_eq!(
        w.services["app/web.app.svc.cluster.local"].get(&80),
        Some(&8080)
    );
    let svc = snap.service_by_vip("", ip("10.96.0.20")).unwrap();
    assert_eq!(svc.hostname, "web.app.svc.cluster.local");
    let (ep, port) = snap.pick_endpoint(svc, 80).unwrap();
    assert_eq!((ep.name.as_str(), port), ("web-1", 8080));
    // Nothing changed: nothing to apply.
    assert_eq!(idx.flush().len(), 0);
}

#[test]
fn endpoint_changes_move_routing_and_readiness_counts() {
    let mut idx = index();
    let store = Store::new();
    idx.pod_event(Event::Apply(pod("app", "a", "10.0.0.1", json!({}), true)));
    idx.pod_event(Event::Apply(pod("app", "b", "10.0.0.2", json!({}), true)));
    idx.service_event(Event::Apply(service(
        "app",
        "web",
        "10.96.0.1",
        json!(8080),
    )));
    idx.slice_event(Event::Apply(slice("app", "s1", "web", Some(8080), &["a"])));
    flush(&mut idx, &store);
    let pick = |store: &Store| {
        let snap = store.snapshot();
        let svc = snap.service_by_vip("", ip("10.96.0.1")).unwrap().clone();
        snap.pick_endpoint(&svc, 80).map(|(w, _)| w.name.clone())
    };
    assert_eq!(pick(&store).as_deref(), Some("a"));

    // The slice now lists b only: a loses its membership, b gains it.
    idx.slice_event(Event::Apply(slice("app", "s1", "web", Some(8080), &["b"])));
    flush(&mut idx, &store);
    assert_eq!(pick(&store).as_deref(), Some("b"));
    assert!(
        store
            .snapshot()
            .workload_by_ip("", ip("10.0.0.1"))
            .unwrap()
            .services
            .is_empty()
    );

    // b not ready: no healthy endpoint.
    idx.pod_event(Event::Apply(pod("app", "b", "10.0.0.2", json!({}), false)));
    flush(&mut idx, &store);
    assert_eq!(pick(&store), None);

    // Slice deleted, then service deleted.
    idx.slice_event(Event::Delete(slice("app", "s1", "web", Some(8080), &["b"])));
    flush(&mut idx, &store);
    assert!(
        store
            .snapshot()
            .workload_by_ip("", ip("10.0.0.2"))
            .unwrap()
            .services
            .is_empty()
    );
    idx.service_event(Event::Delete(service(
        "app",
        "web",
        "10.96.0.1",
        json!(8080),
    )));
    flush(&mut idx, &store);
    assert!(
        store
            .snapshot()
            .service_by_vip("", ip("10.96.0.1"))
            .is_none()
    );

    // Pod deleted: workload gone.
    idx.pod_event(Event::Delete(pod("app", "a", "10.0.0.1", json!({}), true)));
    flush(&mut idx, &store);
    assert!(
        store
            .snapshot()
            .workload_by_ip("", ip("10.0.0.1"))
            .is_none()
    );
    assert_eq!(store.snapshot().workloads().count(), 1);
}

#[test]
fn named_target_port_follows_the_service_definition() {
    let mut idx = index();
    let store = Store::new();
    idx.pod_event(Event::Apply(pod("app", "a", "10.0.0.1", json!({}), true)));
    // A slice without ports (the controller has not filled them in): the pod's
    // container port named "http" is used.
    idx.service_event(Event::Apply(service(
        "app",
        "web",
        "10.96.0.1",
        json!("http"),
    )));
    idx.slice_event(Event::Apply(slice("app", "s1", "web", None, &["a"])));
    flush(&mut idx, &store);
    let w = store
        .snapshot()
        .workload_by_ip("", ip("10.0.0.1"))
        .unwrap()
        .clone();
    assert_eq!(w.services["app/web.app.svc.cluster.local"][&80], 8080);
    // The service changes its target to a number: memberships are recomputed.
    idx.service_event(Event::Apply(service(
        "app",
        "web",
        "10.96.0.1",
        json!(9090),
    )));
    flush(&mut idx, &store);
    let w = store
        .snapshot()
        .workload_by_ip("", ip("10.0.0.1"))
        .unwrap()
        .clone();
    assert_eq!(w.services["app/web.app.svc.cluster.local"][&80], 9090);
}

#[test]
fn relist_deletes_what_is_gone_and_changes_nothing_else() {
    let mut idx = index();
    let store = Store::new();
    idx.pod_event(Event::Init);
    for (name, ip_) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
        idx.pod_event(Event::InitApply(pod("app", name, ip_, json!({}), true)));
    }
    idx.pod_event(Event::InitDone);
    assert_eq!(flush(&mut idx, &store), 3);
    assert_eq!(store.snapshot().workloads().count(), 3);

    // After a 410 Gone the watcher lists again; b was deleted meanwhile, a unchanged,
    // c changed its IP.
    idx.pod_event(Event::Init);
    idx.pod_event(Event::InitApply(pod(
        "app",
        "a",
        "10.0.0.1",
        json!({}),
        true,
    )));
    idx.pod_event(Event::InitApply(pod(
        "app",
        "c",
        "10.0.0.33",
        json!({}),
        true,
    )));
    // Until InitDone the old state stays.
    assert_eq!(idx.flush().len(), 0);
    idx.pod_event(Event::InitDone);
    let batch = idx.flush();
    assert_eq!(
        batch.remove_workloads,
        vec!["Kubernetes//v1/Pod/app/b".to_string()]
    );
    assert_eq!(batch.upsert_workloads.len(), 1, "only c changed");
    store.source(super::SOURCE_NAME).apply(batch);
    let snap = store.snapshot();
    assert!(snap.workload_by_ip("", ip("10.0.0.2")).is_none());
    assert!(snap.workload_by_ip("", ip("10.0.0.33")).is_some());
}

#[test]
fn host_network_and_terminated_pods() {
    let mut idx = index();
    let store = Store::new();
    let mut host: Pod = pod("kube-system", "proxy", "192.168.1.10", json!({}), true);
    host.spec.as_mut().unwrap().host_network = Some(true);
    idx.pod_event(Event::Apply(host));
    idx.service_event(Event::Apply(service(
        "kube-system",
        "proxy",
        "10.96.0.9",
        json!(10249),
    )));
    idx.slice_event(Event::Apply(slice(
        "kube-system",
        "p",
        "proxy",
        Some(10249),
        &["proxy"],
    )));
    let mut done = pod("app", "job", "10.0.0.7", json!({}), false);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    idx.pod_event(Event::Apply(done));
    flush(&mut idx, &store);
    let snap = store.snapshot();
    // The node's IP does not resolve to the host-network pod...
    assert!(snap.workload_by_ip("", ip("192.168.1.10")).is_none());
    // ...but it is an endpoint of its service (plain TCP).
    let svc = snap.service_by_vip("", ip("10.96.0.9")).unwrap();
    let (w, port) = snap.pick_endpoint(svc, 80).unwrap();
    assert_eq!((w.name.as_str(), port), ("proxy", 10249));
    assert_eq!(w.protocol, crate::state::Protocol::TCP);
    assert!(
        snap.workload_by_ip("", ip("10.0.0.7")).is_none(),
        "terminated"
    );
    let key = NamespacedHostname {
        namespace: "kube-system".into(),
        hostname: "proxy.kube-system.svc.cluster.local".into(),
    };
    assert_eq!(snap.endpoints(&key).len(), 1);
}

/// `default/kubernetes` and Services without a selector: endpoints without a Pod
/// `targetRef` become host-network TCP workloads of their own, as istiod makes them.
#[test]
fn endpoints_that_are_not_pods_become_workloads() {
    let mut idx = index();
    let store = Store::new();
    let api: KubeService = serde_json::from_value(json!({
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
            "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}
    }))
    .unwrap();
    let api_slice = |endpoints: serde_json::Value| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "kubernetes", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    };
    idx.slice_event(Event::Apply(api_slice(json!([
        {"addresses": ["172.18.0.2"]},
        {"addresses": ["172.18.0.3"], "conditions": {"ready": false}}
    ]))));
    flush(&mut idx, &store);
    assert_eq!(store.snapshot().workloads().count(), 0, "no Service yet");

    idx.service_event(Event::Apply(api.clone()));
    flush(&mut idx, &store);
    let snap = store.snapshot();
    let svc = snap.service_by_vip("", ip("10.96.0.1")).unwrap().clone();
    for _ in 0..20 {
        let (ep, port) = snap.pick_endpoint(&svc, 443).unwrap();
        assert_eq!(
            (ep.workload_ips.as_slice(), port),
            (&[ip("172.18.0.2")][..], 6443)
        );
    }
    let w = snap
        .workload_by_uid("Kubernetes/discovery.k8s.io/EndpointSlice/default/kubernetes/172.18.0.2")
        .unwrap();
    assert_eq!(w.protocol, crate::state::workload::Protocol::TCP);
    assert!(
        snap.workload_by_ip("", ip("172.18.0.2")).is_none(),
        "host network: its address may be shared, never looked up by IP"
    );
    assert_eq!(snap.workloads().count(), 2);

    // An endpoint leaves the slice; then the Service goes away.
    idx.slice_event(Event::Apply(api_slice(
        json!([{"addresses": ["172.18.0.2"]}]),
    )));
    flush(&mut idx, &store);
    assert_eq!(store.snapshot().workloads().count(), 1);
    idx.service_event(Event::Delete(api));
    flush(&mut idx, &store);
    assert_eq!(store.snapshot().workloads().count(), 0);
    assert_eq!(idx.flush().len(), 0);
}

/// A Service or pod bound to a waypoint with `istio.io/use-waypoint` is named in a
/// warning (once per change): its traffic goes direct, its waypoint policies unenforced.
#[test]
fn use_waypoint_labels_are_warned_about() {
    let mut svc = service("app", "web", "10.96.0.20", json!(8080));
    svc.metadata.labels = Some([("istio.io/use-waypoint".to_string(), "wp".to_string())].into());
    let out = crate::test_logs::capture(|| {
        let mut idx = index();
        idx.service_event(Event::Apply(svc.clone()));
        idx.service_event(Event::Apply(svc));
        idx.pod_event(Event::Apply(pod(
            "app",
            "web-1",
            "10.0.0.11",
            json!({"istio.io/use-waypoint": "wp"}),
            true,
        )));
    });
    assert_eq!(
        out.matches("is not resolved by Kubernetes discovery")
            .count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("object=app/web ") && out.contains("object=app/web-1"),
        "{out}"
    );
}

/// `internalTrafficPolicy: Local`: a client reaches only the endpoints on its own node,
/// and none when its node has none (as kube-proxy and istiod's ztunnel config).
#[test]
fn internal_traffic_policy_local_keeps_traffic_on_the_node() {
    let mut idx = index();
    let store = Store::new();
    for (name, ip, node) in [
        ("col-1", "10.0.0.11", "node-1"),
        ("col-2", "10.0.0.12", "node-2"),
        ("client", "10.0.0.13", "node-1"),
        ("far", "10.0.0.14", "node-3"),
    ] {
        let mut p = pod("app", name, ip, json!({"app": name}), true);
        p.spec.as_mut().unwrap().node_name = Some(node.into());
        idx.pod_event(Event::Apply(p));
    }
    let mut svc = service("app", "collector", "10.96.0.30", json!(8080));
    svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
    idx.service_event(Event::Apply(svc));
    idx.slice_event(Event::Apply(slice(
        "app",
        "collector-x",
        "collector",
        Some(8080),
        &["col-1", "col-2"],
    )));
    flush(&mut idx, &store);
    let snap = store.snapshot();
    let svc = snap.service_by_vip("", ip("10.96.0.30")).unwrap().clone();
    let client = snap.workload_by_ip("", ip("10.0.0.13")).unwrap().clone();
    for _ in 0..30 {
        let (ep, _) = snap.pick_endpoint_for(Some(&client), &svc, 80).unwrap();
        assert_eq!(ep.name, "col-1");
    }
    let far = snap.workload_by_ip("", ip("10.0.0.14")).unwrap().clone();
    assert!(
        snap.pick_endpoint_for(Some(&far), &svc, 80).is_none(),
        "no endpoint on node-3: nothing, not another node's"
    );
}

/// `publishNotReadyAddresses: true`: istiod's `healthPolicy: AllowAll`, an unready
/// endpoint is still picked (e.g. StatefulSet peer discovery); without it, none is.
#[test]
fn publish_not_ready_addresses_picks_unready_endpoints() {
    let mut idx = index();
    let store = Store::new();
    idx.pod_event(Event::Apply(pod(
        "app",
        "db-0",
        "10.0.2.1",
        json!({"app": "db"}),
        false,
    )));
    let mut svc = service("app", "db", "10.96.0.50", json!(8080));
    idx.service_event(Event::Apply(svc.clone()));
    idx.slice_event(Event::Apply(slice(
        "app",
        "db-x",
        "db",
        Some(8080),
        &["db-0"],
    )));
    flush(&mut idx, &store);
    let pick = |store: &Store| {
        let snap = store.snapshot();
        let svc = snap.service_by_vip("", ip("10.96.0.50")).unwrap().clone();
        snap.pick_endpoint(&svc, 80)
            .map(|(w, port)| (w.name.clone(), port))
    };
    assert_eq!(pick(&store), None, "unready: not picked by default");
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    idx.service_event(Event::Apply(svc));
    flush(&mut idx, &store);
    assert_eq!(pick(&store), Some(("db-0".into(), 8080)));
}
