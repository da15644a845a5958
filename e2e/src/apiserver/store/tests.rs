//! Unit tests of the object store: metadata, versions and conflicts, the event window,
//! namespace cascade, per-kind defaults.

use super::*;
use crate::apiserver::resources::ALL;

fn store() -> Store {
    Store::new(ALL.to_vec(), 100)
}

fn idx(s: &Store, plural: &str) -> usize {
    s.resources()
        .iter()
        .position(|r| r.plural == plural)
        .unwrap()
}

#[test]
fn create_fills_metadata_and_rejects_duplicates() {
    let mut s = store();
    let (pods, ns) = (idx(&s, "pods"), idx(&s, "namespaces"));
    s.create(ns, None, json!({"metadata": {"name": "demo"}}), false)
        .unwrap();
    let p = s
        .create(pods, Some("demo"), json!({"metadata": {"name": "web"}, "spec": {"containers": []}, "status": {"podIP": "1.2.3.4"}}), false)
        .unwrap();
    assert_eq!(p["kind"], "Pod");
    assert_eq!(p["metadata"]["namespace"], "demo");
    assert_eq!(p["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert_eq!(p["spec"]["serviceAccountName"], "default");
    assert_eq!(
        p["status"],
        json!({"phase": "Pending"}),
        "create resets status"
    );
    let err = s
        .create(
            pods,
            Some("demo"),
            json!({"metadata": {"name": "web"}, "spec": {}}),
            false,
        )
        .unwrap_err();
    assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
    let err = s
        .create(
            pods,
            Some("nope"),
            json!({"metadata": {"name": "x"}, "spec": {}}),
            false,
        )
        .unwrap_err();
    assert_eq!(err.code, 404);
    assert!(err.message.contains("namespaces \"nope\""), "{err}");
    let g = s
        .create(
            pods,
            Some("demo"),
            json!({"metadata": {"generateName": "web-"}, "spec": {}}),
            false,
        )
        .unwrap();
    assert!(g["metadata"]["name"].as_str().unwrap().starts_with("web-"));
    let err = s
        .create(
            pods,
            Some("demo"),
            json!({"metadata": {"name": "Bad_Name"}, "spec": {}}),
            false,
        )
        .unwrap_err();
    assert_eq!(err.code, 422);
    // the namespace got its default service account and name label
    let sa = idx(&s, "serviceaccounts");
    s.get(sa, Some("demo"), "default").unwrap();
    let n = s.get(ns, None, "demo").unwrap();
    assert_eq!(
        n["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "demo"
    );
}

#[test]
fn updates_conflict_on_stale_versions_and_status_is_separate() {
    let mut s = store();
    let pods = idx(&s, "pods");
    let p = s
        .create(
            pods,
            Some("default"),
            json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}}),
            false,
        )
        .unwrap();
    let rv0 = p["metadata"]["resourceVersion"].clone();
    let mut upd = p.clone();
    upd["metadata"]["labels"] = json!({"x": "1"});
    upd["status"] = json!({"phase": "Running"});
    let u = s
        .update(pods, Some("default"), "a", upd.clone(), Part::Main, false)
        .unwrap();
    assert_eq!(u["metadata"]["labels"]["x"], "1");
    assert_eq!(u["status"]["phase"], "Pending", "main update keeps status");
    assert_ne!(u["metadata"]["resourceVersion"], rv0);
    let err = s
        .update(pods, Some("default"), "a", upd, Part::Main, false)
        .unwrap_err();
    assert_eq!((err.code, err.reason), (409, "Conflict"));
    // status patch: status + annotations change, spec does not
    let st = s
        .patch(pods, Some("default"), "a", PatchType::Merge,
            &json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}, "spec": {"nodeName": "n2"}, "status": {"podIP": "10.0.0.1"}}),
            Part::Status, false)
        .unwrap();
    assert_eq!(st["spec"]["nodeName"], "n1");
    assert_eq!(st["status"]["podIP"], "10.0.0.1");
    assert_eq!(st["status"]["phase"], "Pending");
    assert_eq!(
        st["metadata"]["annotations"]["ambient.istio.io/redirection"],
        "enabled"
    );
    // a no-op patch does not bump the version
    let rv = s.resource_version();
    s.patch(
        pods,
        Some("default"),
        "a",
        PatchType::Merge,
        &json!({"metadata": {"labels": {"x": "1"}}}),
        Part::Main,
        false,
    )
    .unwrap();
    assert_eq!(s.resource_version(), rv);
}

#[test]
fn events_window_and_namespace_cascade() {
    let mut s = Store::new(ALL.to_vec(), 5);
    let (cms, ns) = (idx(&s, "configmaps"), idx(&s, "namespaces"));
    s.create(ns, None, json!({"metadata": {"name": "x"}}), false)
        .unwrap();
    let start = s.resource_version();
    for i in 0..3 {
        s.create(
            cms,
            Some("x"),
            json!({"metadata": {"name": format!("c{i}")}}),
            false,
        )
        .unwrap();
    }
    let ev = s.events_since(cms, start).unwrap();
    assert_eq!(ev.len(), 3);
    assert!(ev.iter().all(|e| e.kind == EventKind::Added));
    let t = s
        .delete(ns, None, "x", &Preconditions::default(), false)
        .unwrap();
    assert_eq!(t["status"]["phase"], "Terminating");
    let err = s
        .create(cms, Some("x"), json!({"metadata": {"name": "late"}}), false)
        .unwrap_err();
    assert_eq!(err.code, 403);
    assert!(s.has_terminating());
    // Not yet due: the content stays (kubectl deletes it one by one).
    s.finalize_namespaces_deleted_before(
        std::time::Instant::now() - std::time::Duration::from_secs(1),
    );
    assert!(s.get(cms, Some("x"), "c0").is_ok());
    assert!(s.has_terminating());
    s.finalize_namespaces();
    let (left, _) = s.list(
        cms,
        Some("x"),
        &LabelSelector::default(),
        &FieldSelector::default(),
    );
    assert!(left.is_empty());
    assert_eq!(s.get(ns, None, "x").unwrap_err().code, 404);
    // more events than the window: the start is gone
    let err = s.events_since(cms, start).unwrap_err();
    assert_eq!(err.code, 410);
    let before = s.resource_version();
    s.compact();
    assert!(
        s.events_since(cms, before).is_err(),
        "what a client held is too old"
    );
    assert!(
        s.events_since(cms, s.resource_version())
            .unwrap()
            .is_empty()
    );
    let err = s
        .delete(cms, Some("x"), "c0", &Preconditions::default(), false)
        .unwrap_err();
    assert_eq!(err.code, 404);
}

#[test]
fn services_get_cluster_ips_and_secrets_encode_string_data() {
    let mut s = store();
    let svc = idx(&s, "services");
    let a = s
        .create(
            svc,
            Some("default"),
            json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}),
            false,
        )
        .unwrap();
    let b = s
        .create(
            svc,
            Some("default"),
            json!({"metadata": {"name": "b"}, "spec": {}}),
            false,
        )
        .unwrap();
    assert_eq!(a["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(b["spec"]["clusterIP"], "10.96.0.11");
    assert_eq!(
        a["spec"]["ports"][0],
        json!({"port": 80, "protocol": "TCP", "targetPort": 80})
    );
    let sec = idx(&s, "secrets");
    let x = s
        .create(
            sec,
            Some("default"),
            json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}),
            false,
        )
        .unwrap();
    assert_eq!(x["data"]["k"], "dg==");
    assert!(x.get("stringData").is_none());
}
