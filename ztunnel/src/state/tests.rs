//! Tests of the store, snapshots and endpoint selection.

use super::*;
use std::collections::HashMap;

pub(crate) fn workload(uid: &str, ns: &str, name: &str, ip: &str) -> Workload {
    serde_yaml_ng::from_str(&format!(
        "uid: {uid}\nname: {name}\nnamespace: {ns}\nserviceAccount: sa-{name}\n\
         trustDomain: cluster.local\nworkloadIps: [\"{ip}\"]\nprotocol: HBONE\nnode: n1\n"
    ))
    .unwrap()
}

fn service(ns: &str, host: &str, vip: &str) -> Service {
    serde_yaml_ng::from_str(&format!(
        "name: {host}\nnamespace: {ns}\nhostname: {host}\nvips: [\"/{vip}\"]\nports: {{80: 8080}}\n"
    ))
    .unwrap()
}

#[test]
fn indexes_by_ip_vip_name_and_endpoints() {
    let store = Store::new();
    let src = store.source("file");
    let mut a = workload("a", "ns", "a", "10.0.0.1");
    a.services
        .insert("ns/svc".into(), HashMap::from([(80, 9090)]));
    let b = workload("b", "ns", "b", "10.0.0.2");
    src.replace_all(vec![a, b], vec![service("ns", "svc", "10.96.0.1")], vec![]);
    let s = store.snapshot();
    assert_eq!(
        s.workload_by_ip("", "10.0.0.1".parse().unwrap())
            .unwrap()
            .uid,
        "a"
    );
    assert!(
        s.workload_by_ip("other", "10.0.0.1".parse().unwrap())
            .is_none()
    );
    let svc = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
    assert_eq!(svc.hostname, "svc");
    let (ep, port) = s.pick_endpoint(svc, 80).unwrap();
    assert_eq!((ep.uid.as_str(), port), ("a", 9090));
    let info: WorkloadInfo = "ns/b/sa-b".parse().unwrap();
    assert_eq!(s.find_workload(&info, Some("n1")).unwrap().uid, "b");
    assert!(s.find_workload(&info, Some("n2")).is_none());
    let wrong_sa: WorkloadInfo = "ns/b/other".parse().unwrap();
    assert!(s.find_workload(&wrong_sa, None).is_none());
    assert_eq!(s.networks().collect::<Vec<_>>(), [""]);
}

#[test]
fn a_shared_ip_goes_to_the_healthy_workload() {
    let store = Store::new();
    let mut stale = workload("z-old", "ns", "old", "10.0.0.1");
    stale.status = workload::HealthStatus::Unhealthy;
    let new = workload("a-new", "ns", "new", "10.0.0.1");
    store
        .source("file")
        .replace_all(vec![stale, new], vec![], vec![]);
    let s = store.snapshot();
    assert_eq!(
        s.workload_by_ip("", "10.0.0.1".parse().unwrap())
            .unwrap()
            .uid,
        "a-new",
        "the unhealthy one loses although its uid sorts later"
    );
}

#[test]
fn workloads_are_indexed_by_their_network() {
    let store = Store::new();
    let mut a = workload("a", "ns", "a", "10.0.0.1");
    a.network = "net1".into();
    let b = workload("b", "ns", "b", "10.0.0.1");
    store.source("file").replace_all(vec![a, b], vec![], vec![]);
    let s = store.snapshot();
    let ip = "10.0.0.1".parse().unwrap();
    assert_eq!(s.workload_by_ip("net1", ip).unwrap().uid, "a");
    assert_eq!(s.workload_by_ip("", ip).unwrap().uid, "b");
    assert_eq!(s.networks().collect::<Vec<_>>(), ["", "net1"]);
}

#[test]
fn unhealthy_endpoints_are_skipped() {
    let store = Store::new();
    let mut a = workload("a", "ns", "a", "10.0.0.1");
    a.services.insert("ns/svc".into(), HashMap::new());
    a.status = workload::HealthStatus::Unhealthy;
    store
        .source("file")
        .replace_all(vec![a], vec![service("ns", "svc", "10.96.0.1")], vec![]);
    let s = store.snapshot();
    let svc = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
    assert!(s.pick_endpoint(svc, 80).is_none());
}

#[test]
fn endpoints_known_only_by_hostname_are_selected_for_resolution() {
    // ServiceEntry `resolution: DNS`: istiod sends workloads with a hostname and no IP.
    // One without either has nothing to connect to; one on another network is reached
    // through the gateway it names (double HBONE), as upstream, and without one it is
    // refused naming the network.
    let no_ip = |uid: &str, edit: &dyn Fn(&mut Workload)| {
        let mut w = workload(uid, "ns", uid, "10.0.0.1");
        w.workload_ips.clear();
        w.services.insert("ns/svc".into(), HashMap::new());
        edit(&mut w);
        w
    };
    let dns = no_ip("dns", &|w| w.hostname = "db.example.com".into());
    let nothing = no_ip("nothing", &|_| {});
    let remote = no_ip("remote", &|w| {
        w.network = "west".into();
        w.network_gateway = serde_yaml_ng::from_str("destination: west/192.0.2.1").ok();
    });
    let store = Store::new();
    let svc = vec![service("ns", "svc", "10.96.0.1")];
    store
        .source("file")
        .replace_all(vec![dns, nothing], svc.clone(), vec![]);
    let s = store.snapshot();
    let svc1 = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
    for _ in 0..32 {
        let (w, port) = s.select_endpoint(None, Some(""), svc1, 80).unwrap();
        assert_eq!(
            (w.uid.as_str(), w.hostname.as_str(), port),
            ("dns", "db.example.com", 8080)
        );
    }
    // Callers that dial the workload's IP never get it.
    assert!(s.pick_endpoint(svc1, 80).is_none());
    let mut stranded = remote.clone();
    stranded.uid = "stranded".into();
    stranded.network_gateway = None;
    stranded.workload_ips = vec!["10.1.0.9".parse().unwrap()];
    store
        .source("file")
        .replace_all(vec![remote, stranded.clone()], svc.clone(), vec![]);
    let s = store.snapshot();
    let svc1 = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
    for _ in 0..32 {
        let (w, _) = s.select_endpoint(None, Some(""), svc1, 80).unwrap();
        assert_eq!(w.uid, "remote", "only the endpoint behind a gateway");
    }
    store
        .source("file")
        .replace_all(vec![stranded], svc, vec![]);
    let s = store.snapshot();
    let svc1 = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
    match s.select_endpoint(None, Some(""), svc1, 80) {
        Err(NoEndpoint::OtherNetwork { networks, .. }) => assert_eq!(networks, "west"),
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_named_target_port_picks_only_endpoints_that_have_it() {
    let store = Store::new();
    let mut svc = service("ns", "svc", "10.96.0.1");
    svc.ports = HashMap::from([(80, 0)]);
    let mut with = workload("a", "ns", "a", "10.0.0.1");
    with.services
        .insert("ns/svc".into(), HashMap::from([(80, 8080)]));
    let mut without = workload("b", "ns", "b", "10.0.0.2");
    without.services.insert("ns/svc".into(), HashMap::new());
    store
        .source("file")
        .replace_all(vec![with, without], vec![svc], vec![]);
    let s = store.snapshot();
    let svc = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
    for _ in 0..50 {
        let (ep, port) = s.pick_endpoint(svc, 80).unwrap();
        assert_eq!((ep.uid.as_str(), port), ("a", 8080));
    }
}

#[test]
fn load_balancer_preferences_in_upstreams_local_config_form() {
    let svc: Service = serde_yaml_ng::from_str(
        "name: svc\nnamespace: ns\nhostname: svc\nvips: [\"/10.96.0.1\"]\nports: {80: 8080}\n\
         loadBalancer: {routingPreferences: [Zone, Node], mode: Failover}\n",
    )
    .unwrap();
    let at = |uid: &str, ip: &str, zone: &str, node: &str| {
        let mut w = workload(uid, "ns", uid, ip);
        w.services.insert("ns/svc".into(), HashMap::new());
        w.locality.zone = zone.into();
        w.node = node.into();
        w
    };
    let store = Store::new();
    store.source("file").replace_all(
        vec![
            at("same-zone", "10.0.0.1", "z1", "n2"),
            at("other-zone", "10.0.0.2", "z2", "n1"),
        ],
        vec![svc],
        vec![],
    );
    let s = store.snapshot();
    let svc = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
    let mut client = workload("c", "ns", "c", "10.0.0.9");
    client.locality.zone = "z1".into();
    client.node = "n1".into();
    for _ in 0..30 {
        let (ep, _) = s.pick_endpoint_for(Some(&client), svc, 80).unwrap();
        assert_eq!(ep.uid, "same-zone", "zone first, even on another node");
    }
    // Failover: with no endpoint in the zone, the others still serve.
    client.locality.zone = "z9".into();
    assert!(s.pick_endpoint_for(Some(&client), svc, 80).is_some());
}

#[test]
fn sources_merge_and_updates_bump_version() {
    let store = Store::new();
    let mut rx = store.subscribe();
    let file = store.source("file");
    let kube = store.source("kubernetes");
    file.upsert_workload(workload("a", "ns", "a", "10.0.0.1"));
    kube.upsert_workload(workload("b", "ns", "b", "10.0.0.2"));
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 2);
    let s = store.snapshot();
    assert_eq!(s.workloads().count(), 2);
    file.remove_workload("a");
    let s2 = store.snapshot();
    assert_eq!(s2.workloads().count(), 1);
    // The old snapshot is unaffected (readers keep a consistent view).
    assert_eq!(s.workloads().count(), 2);
    assert!(s2.version > s.version);
}

#[test]
fn policy_set_is_shared_until_the_policies_change() {
    let store = Store::new();
    let file = store.source("file");
    let pol = |action: &str| -> crate::policy::Authorization {
        serde_yaml_ng::from_str(&format!(
            "{{name: p, namespace: ns, scope: Namespace, action: {action}}}"
        ))
        .unwrap()
    };
    file.replace_all(vec![], vec![], vec![pol("Allow")]);
    let s1 = store.snapshot();
    file.upsert_workload(workload("a", "ns", "a", "10.0.0.1"));
    let s2 = store.snapshot();
    assert!(Arc::ptr_eq(s1.policies(), s2.policies()));
    // The same policy again: still unchanged.
    file.upsert_policy(pol("Allow"));
    assert!(Arc::ptr_eq(s1.policies(), store.snapshot().policies()));
    file.upsert_policy(pol("Deny"));
    let s3 = store.snapshot();
    assert!(!Arc::ptr_eq(s2.policies(), s3.policies()));
    assert_eq!(s3.policies().len(), 1);
}
