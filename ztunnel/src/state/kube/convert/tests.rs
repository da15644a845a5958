//! Conversion tests: pods, services, slices and nodes into workloads and services.
use super::*;

fn pod_json(extra: serde_json::Value) -> Pod {
    let mut base = serde_json::json!({
        "metadata": {
            "name": "web-7d9f8-abcde", "namespace": "app",
            "labels": {"app": "web", "pod-template-hash": "7d9f8"},
            "annotations": {"ambient.istio.io/redirection": "enabled"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "web-7d9f8", "uid": "rs", "controller": true}]
        },
        "spec": {
            "serviceAccountName": "web-sa", "nodeName": "node-1",
            "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]
        },
        "status": {
            "phase": "Running", "podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    });
    merge(&mut base, extra);
    serde_json::from_value(base).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn settings() -> ConvertSettings {
    ConvertSettings {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
        cluster_domain: "cluster.local".into(),
    }
}

#[test]
fn pod_to_workload() {
    let facts = PodFacts::from_pod(&pod_json(serde_json::json!({})));
    assert!(facts.is_workload());
    assert_eq!(facts.named_ports.get("http"), Some(&8080));
    assert!(
        !facts.named_ports.contains_key("dns"),
        "UDP ports are not kept"
    );
    let w = to_workload(
        &facts,
        &settings(),
        HashMap::new(),
        vec!["app/p".into()],
        Locality::default(),
    );
    assert_eq!(w.uid, "Kubernetes//v1/Pod/app/web-7d9f8-abcde");
    assert_eq!(w.service_account, "web-sa");
    assert_eq!(w.protocol, Protocol::HBONE);
    assert_eq!(w.workload_ips.len(), 2);
    assert_eq!(
        (w.workload_type.as_str(), w.workload_name.as_str()),
        ("deployment", "web")
    );
    assert_eq!(
        (w.canonical_name.as_str(), w.canonical_revision.as_str()),
        ("web", "latest")
    );
    assert_eq!(w.status, HealthStatus::Healthy);
    assert_eq!(w.node, "node-1");
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/app/sa/web-sa"
    );
    assert_eq!(w.authorization_policies, vec!["app/p".to_string()]);
}

#[test]
fn pod_variants() {
    let not_ambient = PodFacts::from_pod(&pod_json(serde_json::json!({
        "metadata": {"annotations": {"ambient.istio.io/redirection": "disabled"}}})));
    assert!(!not_ambient.hbone);
    let unready = PodFacts::from_pod(&pod_json(serde_json::json!({
        "status": {"conditions": [{"type": "Ready", "status": "False"}]}})));
    let w = to_workload(
        &unready,
        &settings(),
        HashMap::new(),
        vec![],
        Locality::default(),
    );
    assert_eq!(w.status, HealthStatus::Unhealthy);
    let deleting = PodFacts::from_pod(&pod_json(serde_json::json!({
        "metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}})));
    assert_eq!(
        to_workload(
            &deleting,
            &settings(),
            HashMap::new(),
            vec![],
            Locality::default()
        )
        .status,
        HealthStatus::Healthy,
        "terminating but still Ready: still an endpoint"
    );
    let done = PodFacts::from_pod(&pod_json(
        serde_json::json!({"status": {"phase": "Succeeded"}}),
    ));
    assert!(!done.is_workload());
    let pending = PodFacts::from_pod(&pod_json(serde_json::json!({
        "status": {"podIP": null, "podIPs": null, "phase": "Pending"}})));
    assert!(!pending.is_workload());
    let host = PodFacts::from_pod(&pod_json(
        serde_json::json!({"spec": {"hostNetwork": true}}),
    ));
    let w = to_workload(
        &host,
        &settings(),
        HashMap::new(),
        vec![],
        Locality::default(),
    );
    assert_eq!(
        (w.protocol, w.network_mode),
        (Protocol::TCP, NetworkMode::HostNetwork)
    );
    let default_sa = PodFacts::from_pod(&pod_json(serde_json::json!({
        "spec": {"serviceAccountName": null}})));
    assert_eq!(default_sa.service_account, "default");
}

#[test]
fn workload_names_from_owners_and_canonical_labels() {
    let mut f = PodFacts::from_pod(&pod_json(serde_json::json!({})));
    for (controller, hash, want) in [
        (None, None, ("pod", "web-7d9f8-abcde")),
        (
            Some(("ReplicaSet", "web-7d9f8")),
            Some("7d9f8"),
            ("deployment", "web"),
        ),
        (
            Some(("ReplicaSet", "web-x")),
            Some("7d9f8"),
            ("replicaset", "web-x"),
        ),
        (
            Some(("Job", "backup-28910220")),
            None,
            ("cronjob", "backup"),
        ),
        (Some(("Job", "migrate-1")), None, ("job", "migrate-1")),
        (Some(("StatefulSet", "db")), None, ("statefulset", "db")),
        (Some(("DaemonSet", "agent")), None, ("daemonset", "agent")),
    ] {
        f.controller = controller.map(|(k, n)| (k.to_string(), n.to_string()));
        match hash {
            Some(h) => f.labels.insert(POD_TEMPLATE_HASH.into(), h.into()),
            None => f.labels.remove(POD_TEMPLATE_HASH),
        };
        let (t, n) = f.workload_name_and_type();
        assert_eq!((t.as_str(), n.as_str()), want);
    }
    f.labels = BTreeMap::from([
        ("app".to_string(), "a".to_string()),
        ("app.kubernetes.io/name".to_string(), "b".to_string()),
        ("version".to_string(), "v1".to_string()),
    ]);
    assert_eq!(f.canonical("wl"), ("b".to_string(), "v1".to_string()));
    f.labels
        .insert("service.istio.io/canonical-name".into(), "c".into());
    f.labels
        .insert("service.istio.io/canonical-revision".into(), "r".into());
    assert_eq!(f.canonical("wl"), ("c".to_string(), "r".to_string()));
    f.labels.clear();
    assert_eq!(f.canonical("wl"), ("wl".to_string(), "latest".to_string()));
}

#[test]
fn service_and_slice_ports() {
    let svc: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "app"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "admin", "port": 9000, "targetPort": 9090},
                {"name": "metrics", "port": 9100, "targetPort": "metrics"},
                {"name": "plain", "port": 7000},
                {"name": "dns", "port": 53, "protocol": "UDP"}]}
    }))
    .unwrap();
    let facts = ServiceFacts::from_service(&svc);
    let s = facts.to_service(&settings());
    assert_eq!(s.hostname, "web.app.svc.cluster.local");
    assert_eq!(s.vips.len(), 2);
    assert_eq!(s.ports.get(&80), Some(&0), "named: resolved per endpoint");
    assert_eq!(s.ports.get(&9000), Some(&9090));
    assert_eq!(s.ports.get(&7000), Some(&7000));
    assert!(!s.ports.contains_key(&53));
    assert_eq!(s.ip_families, None, "no ipFamilies: automatic");
    for (families, expected) in [
        (serde_json::json!(["IPv4", "IPv6"]), "Dual"),
        (serde_json::json!(["IPv6"]), "IPv6"),
        (serde_json::json!(["IPv4"]), "IPv4"),
    ] {
        let mut single = svc.clone();
        single.spec.as_mut().unwrap().ip_families =
            serde_json::from_value(families.clone()).unwrap();
        let s = ServiceFacts::from_service(&single).to_service(&settings());
        assert_eq!(
            s.ip_families.as_ref().and_then(|v| v.as_str()),
            Some(expected),
            "{families}"
        );
    }

    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-abc", "namespace": "app",
            "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}],
        "endpoints": [
            {"addresses": ["10.0.0.5"], "targetRef": {"kind": "Pod", "name": "web-7d9f8-abcde"}},
            {"addresses": ["10.0.0.9"]}]
    }))
    .unwrap();
    let sf = SliceFacts::from_slice(&slice);
    assert_eq!(sf.service_key(), Some(("app".into(), "web".into())));
    assert_eq!(
        sf.pods,
        vec![("app".to_string(), "web-7d9f8-abcde".to_string())]
    );
    let pod = PodFacts::from_pod(&pod_json(serde_json::json!({})));
    let ports = endpoint_ports(&facts, &sf, &pod);
    assert_eq!(ports.get(&80), Some(&8080), "from the slice");
    assert_eq!(ports.get(&9000), Some(&9090));
    assert_eq!(
        ports.get(&7000),
        Some(&7000),
        "not in the slice: numeric target"
    );
    assert!(
        !ports.contains_key(&9100),
        "named port the pod does not have"
    );

    // A slice without ports yet: named targets resolved from the pod's containers.
    let mut bare = sf.clone();
    bare.ports.clear();
    let ports = endpoint_ports(&facts, &bare, &pod);
    assert_eq!(
        ports.get(&80),
        Some(&8080),
        "from the container port named http"
    );
}

#[test]
fn external_name_and_headless() {
    let ext: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ext", "namespace": "a"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}}))
    .unwrap();
    assert!(ServiceFacts::from_service(&ext).external_name);
    let headless: KubeService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "h", "namespace": "a"},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}))
    .unwrap();
    let f = ServiceFacts::from_service(&headless);
    assert!(f.cluster_ips.is_empty() && !f.external_name);
}

#[test]
fn node_labels_give_the_locality() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let full = labels(&[
        (REGION_LABEL, "eu-west1"),
        (ZONE_LABEL, "eu-west1-b"),
        (SUBZONE_LABEL, "rack7"),
        ("kubernetes.io/hostname", "n1"),
    ]);
    assert_eq!(
        node_locality(Some(&full)),
        Some(Locality {
            region: "eu-west1".into(),
            zone: "eu-west1-b".into(),
            subzone: "rack7".into(),
        })
    );
    let zone_only = labels(&[(ZONE_LABEL, "z1")]);
    let l = node_locality(Some(&zone_only)).unwrap();
    assert_eq!((l.region.as_str(), l.zone.as_str()), ("", "z1"));
    // The legacy failure-domain labels are not read (neither does istiod for ambient).
    let legacy = labels(&[("failure-domain.beta.kubernetes.io/zone", "z1")]);
    assert_eq!(node_locality(Some(&legacy)), None);
    assert_eq!(node_locality(None), None);
}
