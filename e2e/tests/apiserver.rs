//! The Kubernetes API double driven by real clients: kubectl (the binary
//! installed on the machine) and kube-rs.
//!
//! Run: `cargo test -p e2e --test apiserver`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::apiserver::{ApiServer, ApiServerHandle, DEFAULT_AUDIENCE, TokenSigner, TokenSpec};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use serde_json::{Value, json};

/// Runs kubectl against `kubeconfig`; returns (success, stdout, stderr).
fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .args(args);
    let out = e2e::netsim::output_with_timeout(cmd, Duration::from_secs(60)).expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let (ok, out, err) = kubectl(kubeconfig, args);
    assert!(ok, "kubectl {args:?} failed: {err}");
    out
}

fn have_kubectl() -> bool {
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok()
    {
        return true;
    }
    eprintln!("skipped: kubectl is not installed (scripts/install-deps.sh installs it)");
    false
}

fn server_with_kubeconfig() -> (ApiServerHandle, tempfile::TempDir) {
    let api = ApiServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    api.write_kubeconfig(&dir.path().join("kubeconfig"))
        .unwrap();
    (api, dir)
}

#[test]
fn kubectl_namespaces_labels_annotations_and_errors() {
    if !have_kubectl() {
        return;
    }
    let (api, dir) = server_with_kubeconfig();
    let kc = dir.path().join("kubeconfig");
    // `create namespace` sends protobuf; the double reads that subset.
    kubectl_ok(&kc, &["create", "namespace", "demo"]);
    kubectl_ok(
        &kc,
        &[
            "label",
            "namespace",
            "demo",
            "istio.io/dataplane-mode=ambient",
        ],
    );
    let ns = api.get("v1", "Namespace", None, "demo").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/dataplane-mode"],
        "ambient"
    );
    let out = kubectl_ok(
        &kc,
        &[
            "get",
            "ns",
            "-l",
            "istio.io/dataplane-mode=ambient",
            "-o",
            "name",
        ],
    );
    assert_eq!(out.trim(), "namespace/demo");
    let out = kubectl_ok(
        &kc,
        &["get", "ns", "-l", "!istio.io/dataplane-mode", "-o", "name"],
    );
    assert!(
        out.contains("namespace/default") && !out.contains("demo"),
        "{out}"
    );
    kubectl_ok(&kc, &["annotate", "namespace", "demo", "team=mesh"]);
    kubectl_ok(
        &kc,
        &["label", "namespace", "demo", "istio.io/dataplane-mode-"],
    );
    let json: Value =
        serde_json::from_str(&kubectl_ok(&kc, &["get", "ns", "demo", "-o", "json"])).unwrap();
    assert!(
        json["metadata"]["labels"]
            .get("istio.io/dataplane-mode")
            .is_none(),
        "{json}"
    );
    assert_eq!(json["metadata"]["annotations"]["team"], "mesh");
    assert_eq!(json["status"]["phase"], "Active");
    // --show-labels renders from the plain object
    let out = kubectl_ok(&kc, &["get", "ns", "demo", "--show-labels"]);
    assert!(out.contains("kubernetes.io/metadata.name=demo"), "{out}");
    // errors come back as Status objects kubectl prints
    let (ok, _, err) = kubectl(&kc, &["get", "ns", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("NotFound") && err.contains("namespaces \"nope\" not found"),
        "{err}"
    );
    let (ok, _, err) = kubectl(&kc, &["create", "namespace", "demo"]);
    assert!(!ok);
    assert!(err.contains("AlreadyExists"), "{err}");
    kubectl_ok(&kc, &["create", "serviceaccount", "sleep", "-n", "demo"]);
    kubectl_ok(
        &kc,
        &[
            "create",
            "configmap",
            "cfg",
            "-n",
            "demo",
            "--from-literal=a=b",
        ],
    );
    assert_eq!(
        api.get("v1", "ConfigMap", Some("demo"), "cfg").unwrap()["data"]["a"],
        "b"
    );
    // a typed create whose spec the double cannot read is refused, not half-read
    let (ok, _, err) = kubectl(
        &kc,
        &["create", "deployment", "web", "--image=x", "-n", "demo"],
    );
    assert!(!ok && err.contains("not supported"), "{err}");
    kubectl_ok(&kc, &["delete", "namespace", "demo"]);
    assert_eq!(
        api.get("v1", "Namespace", None, "demo").unwrap_err().code,
        404
    );
    assert_eq!(
        api.get("v1", "ServiceAccount", Some("demo"), "sleep")
            .unwrap_err()
            .code,
        404
    );
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  nodeName: node1
  serviceAccountName: web
  containers:
  - name: app
    image: echo
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["10.244.1.200"]
  conditions: {ready: true}
  nodeName: node1
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: demo
spec:
  selector:
    matchLabels: {app: web}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/sleep"]
"#;

#[test]
fn kubectl_apply_get_with_selectors_and_delete() {
    if !have_kubectl() {
        return;
    }
    let (api, dir) = server_with_kubeconfig();
    let kc = dir.path().join("kubeconfig");
    let file = dir.path().join("demo.yaml");
    std::fs::write(&file, MANIFESTS).unwrap();
    let f = file.to_str().unwrap();
    let out = kubectl_ok(&kc, &["apply", "-f", f]);
    for want in [
        "namespace/demo created",
        "pod/web created",
        "service/web created",
        "endpointslice.discovery.k8s.io/web-abc created",
        "authorizationpolicy.security.istio.io/allow-sleep created",
    ] {
        assert!(out.contains(want), "{want} in {out}");
    }
    let svc = api.get("v1", "Service", Some("demo"), "web").unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    let ap = api
        .get(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            Some("demo"),
            "allow-sleep",
        )
        .unwrap();
    assert_eq!(
        ap["spec"]["rules"][0]["from"][0]["source"]["principals"][0],
        "cluster.local/ns/demo/sa/sleep"
    );
    // applying again changes nothing
    let out = kubectl_ok(&kc, &["apply", "-f", f]);
    assert!(
        out.contains("pod/web unchanged")
            && out.contains("authorizationpolicy.security.istio.io/allow-sleep unchanged"),
        "{out}"
    );
    // a changed custom resource is patched (kubectl uses a merge patch for CRs)
    std::fs::write(&file, MANIFESTS.replace("action: ALLOW", "action: DENY")).unwrap();
    let out = kubectl_ok(&kc, &["apply", "-f", f]);
    assert!(
        out.contains("authorizationpolicy.security.istio.io/allow-sleep configured"),
        "{out}"
    );
    let ap = api
        .get(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            Some("demo"),
            "allow-sleep",
        )
        .unwrap();
    assert_eq!(ap["spec"]["action"], "DENY");
    // human-readable tables, as from a real server
    let wide = kubectl_ok(&kc, &["get", "pods", "-n", "demo", "-o", "wide"]);
    assert!(
        wide.contains("STATUS") && wide.contains("Pending") && wide.contains("node1"),
        "{wide}"
    );
    let svc = kubectl_ok(&kc, &["get", "svc", "web", "-n", "demo"]);
    assert!(
        svc.contains("10.96.0.10") && svc.contains("80/TCP"),
        "{svc}"
    );
    // short names, selectors
    assert_eq!(
        kubectl_ok(&kc, &["get", "ap", "-n", "demo", "-o", "name"]).trim(),
        "authorizationpolicy.security.istio.io/allow-sleep"
    );
    assert_eq!(
        kubectl_ok(
            &kc,
            &["get", "po", "-n", "demo", "-l", "app=web", "-o", "name"]
        )
        .trim(),
        "pod/web"
    );
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "get",
                "po",
                "-n",
                "demo",
                "-l",
                "app in (db,cache)",
                "-o",
                "name"
            ]
        )
        .trim(),
        ""
    );
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "get",
                "po",
                "-A",
                "--field-selector",
                "spec.nodeName=node1",
                "-o",
                "name"
            ]
        )
        .trim(),
        "pod/web"
    );
    assert_eq!(
        kubectl_ok(
            &kc,
            &[
                "get",
                "po",
                "-A",
                "--field-selector",
                "spec.nodeName=node2",
                "-o",
                "name"
            ]
        )
        .trim(),
        ""
    );
    let jp = kubectl_ok(
        &kc,
        &[
            "get",
            "endpointslices",
            "-n",
            "demo",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[0].endpoints[0].addresses[0]}",
        ],
    );
    assert_eq!(jp, "10.244.1.200");
    // delete everything again (kubectl waits for each deletion)
    kubectl_ok(&kc, &["delete", "-f", f]);
    for (av, kind, name) in [
        ("v1", "Pod", "web"),
        ("v1", "Service", "web"),
        ("discovery.k8s.io/v1", "EndpointSlice", "web-abc"),
        ("security.istio.io/v1", "AuthorizationPolicy", "allow-sleep"),
    ] {
        assert_eq!(
            api.get(av, kind, Some("demo"), name).unwrap_err().code,
            404,
            "{kind}"
        );
    }
    let (ok, _, err) = kubectl(&kc, &["delete", "pod", "web", "-n", "default"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_crud_patch_and_status() {
    let api = ApiServer::start().unwrap();
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "demo"}})).unwrap(),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": "node1", "containers": [{"name": "app", "image": "echo"}]}
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let err = pods.create(&PostParams::default(), &pod).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    let other: Pod = serde_json::from_value(json!({"metadata": {"name": "db", "labels": {"app": "db"}}, "spec": {"nodeName": "node2", "containers": []}})).unwrap();
    pods.create(&PostParams::default(), &other).await.unwrap();

    let names = |l: kube::core::ObjectList<Pod>| {
        l.items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
        ),
        vec!["web"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app notin (web)"))
                .await
                .unwrap()
        ),
        vec!["db"]
    );
    let all: Api<Pod> = Api::all(client.clone());
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("spec.nodeName=node2"))
                .await
                .unwrap()
        ),
        vec!["db"]
    );
    let meta = pods.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(meta.items.len(), 2);

    // merge and strategic merge patches of labels/annotations
    let p = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.labels.as_ref().unwrap()["tier"], "front");
    let p = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"metadata": {"annotations": {"a": "1"}, "labels": {"tier": null}}}),
            ),
        )
        .await
        .unwrap();
    assert!(!p.metadata.labels.as_ref().unwrap().contains_key("tier"));
    assert_eq!(p.metadata.annotations.as_ref().unwrap()["a"], "1");
    // pods/status: the node agent's annotation and the kubelet's status
    let st = pods
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}},
                "status": {"phase": "Running", "podIP": "10.244.1.200", "podIPs": [{"ip": "10.244.1.200"}]}
            })),
        )
        .await
        .unwrap();
    assert_eq!(
        st.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.244.1.200")
    );
    assert_eq!(
        st.metadata.annotations.as_ref().unwrap()["ambient.istio.io/redirection"],
        "enabled"
    );
    assert_eq!(
        st.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node1")
    );
    // a main-resource write cannot change status
    let p = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
    // replace with a stale resourceVersion conflicts
    let mut stale = created.clone();
    stale.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    let err = pods
        .replace("web", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
    let mut fresh = pods.get("web").await.unwrap();
    fresh.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    let replaced = pods
        .replace("web", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.labels.unwrap()["x"], "y");

    // the node agent looks up its own DaemonSet
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    let err = dss.get("istio-cni-node").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
    dss.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": "istio-cni-node"},
        "spec": {"selector": {"matchLabels": {"k": "v"}}, "template": {"metadata": {"labels": {"k": "v"}}}}
    })).unwrap()).await.unwrap();
    assert!(dss.get_opt("istio-cni-node").await.unwrap().is_some());

    // AuthorizationPolicy as a dynamic object
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
    let aps: Api<DynamicObject> = Api::namespaced_with(client.clone(), "demo", &ar);
    let mut ap = DynamicObject::new("deny-all", &ar);
    ap.data = json!({"spec": {"action": "DENY", "rules": [{}]}});
    aps.create(&PostParams::default(), &ap).await.unwrap();
    assert_eq!(
        aps.get("deny-all").await.unwrap().data["spec"]["action"],
        "DENY"
    );

    // server-side apply (approximated as create-or-merge)
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), "demo");
    let ssa = PatchParams::apply("e2e-test").force();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1"}});
    cms.patch("cfg", &ssa, &Patch::Apply(&cm)).await.unwrap();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"b": "2"}});
    let got = cms.patch("cfg", &ssa, &Patch::Apply(&cm)).await.unwrap();
    assert_eq!(got.data.unwrap().get("b").map(String::as_str), Some("2"));

    // delete
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    let err = pods.get("web").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    assert!(pods.delete("web", &DeleteParams::default()).await.is_err());
    // creating into a namespace that does not exist
    let nope: Api<Pod> = Api::namespaced(client.clone(), "nope");
    let err = nope.create(&PostParams::default(), &pod).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_raw_watch_streams_events_and_bookmarks() {
    let api = ApiServer::default()
        .bookmark_interval(Duration::from_millis(100))
        .run()
        .unwrap();
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().labels("app=web").timeout(30), &rv)
        .await
        .unwrap()
        .boxed();
    let mk = |name: &str, app: &str| -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"app": app}}, "spec": {"containers": []}}),
        )
        .unwrap()
    };
    pods.create(&PostParams::default(), &mk("a", "web"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &mk("b", "db"))
        .await
        .unwrap();
    pods.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    pods.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"x": "1"}}})),
    )
    .await
    .unwrap();
    pods.delete("b", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    let mut bookmarks = 0;
    while seen.len() < 5 || bookmarks == 0 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Added(p) => seen.push(format!("ADDED {}", p.metadata.name.unwrap())),
            WatchEvent::Modified(p) => seen.push(format!("MODIFIED {}", p.metadata.name.unwrap())),
            WatchEvent::Deleted(p) => seen.push(format!("DELETED {}", p.metadata.name.unwrap())),
            WatchEvent::Bookmark(b) => {
                assert!(
                    b.metadata.resource_version.parse::<u64>().unwrap()
                        >= rv.parse::<u64>().unwrap()
                );
                bookmarks += 1;
            }
            WatchEvent::Error(e) => panic!("unexpected {e:?}"),
        }
    }
    // b enters the selector (ADDED), a leaves it (DELETED)
    assert_eq!(
        seen,
        vec!["ADDED a", "ADDED b", "DELETED a", "MODIFIED b", "DELETED b"]
    );

    // a client that goes away ends its watch on the server, even when idle
    let idle = pods
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    eventually("the idle watch is open", || api.open_watches() >= 2).await;
    drop(idle);
    drop(stream);
    eventually("closed watches end on the server", || {
        api.open_watches() == 0
    })
    .await;

    // an expired resourceVersion is answered with a 410 ERROR event
    api.compact();
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(Duration::from_secs(10), stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // sendInitialEvents: current objects, then the end-of-initial-events bookmark
    let mut stream = pods
        .watch(&WatchParams::default().initial_events(), "")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(p)) => assert_eq!(p.metadata.name.as_deref(), Some("a")),
        other => panic!("{other:?}"),
    }
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Bookmark(b)) => assert!(
            b.metadata
                .annotations
                .contains_key("k8s.io/initial-events-end")
        ),
        other => panic!("{other:?}"),
    }
}

/// Waits until `f` holds (polling), failing with `what`.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_watcher_recovers_from_gone_with_one_relist() {
    let api = ApiServer::default()
        .bookmark_interval(Duration::from_millis(100))
        .event_window(20)
        .run()
        .unwrap();
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "default");
    let state = std::sync::Arc::new(std::sync::Mutex::new(
        std::collections::BTreeSet::<String>::new(),
    ));
    let s2 = state.clone();
    // name -> value of label `v`, from Apply events
    let labels = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        String,
    >::new()));
    let l2 = labels.clone();
    let task = tokio::spawn(async move {
        let mut w = watcher(pods, watcher::Config::default()).boxed();
        while let Some(ev) = w.next().await {
            if let Ok(ev) = ev {
                let mut s = s2.lock().unwrap();
                match ev {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        let name = p.metadata.name.clone().unwrap();
                        if let Some(v) = p.metadata.labels.as_ref().and_then(|l| l.get("v")) {
                            l2.lock().unwrap().insert(name.clone(), v.clone());
                        }
                        s.insert(name);
                    }
                    watcher::Event::Delete(p) => {
                        s.remove(&p.metadata.name.unwrap());
                    }
                    watcher::Event::Init => s.clear(),
                    watcher::Event::InitDone => {}
                }
            }
        }
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mk = |name: &str| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": []}}))
            .unwrap()
    };
    let has = |n: &'static str| {
        let s = state.clone();
        move || s.lock().unwrap().contains(n)
    };
    pods.create(&PostParams::default(), &mk("p1"))
        .await
        .unwrap();
    eventually("p1 seen", has("p1")).await;
    assert_eq!(api.request_count("list", "pods"), 1);

    // Many writes elsewhere push the watcher's last event out of the
    // retained window; bookmarks keep its resourceVersion current, so a
    // reconnect resumes without a re-list.
    for i in 0..50 {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap(),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let watches = api.request_count("watch", "pods");
    api.close_watches();
    eventually("the watcher reconnects", || {
        api.request_count("watch", "pods") > watches
    })
    .await;
    pods.create(&PostParams::default(), &mk("p2"))
        .await
        .unwrap();
    eventually("p2 seen", has("p2")).await;
    pods.patch(
        "p2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    eventually("p2's modification seen", {
        let l = labels.clone();
        move || l.lock().unwrap().get("p2").is_some_and(|v| v == "2")
    })
    .await;
    assert_eq!(
        api.request_count("list", "pods"),
        1,
        "no re-list after a bookmark-fresh reconnect"
    );
    assert_eq!(api.request_count("gone", "pods"), 0);

    // Forget every retained event and cut the watch before a bookmark can
    // refresh it: the reconnect gets 410 and the watcher re-lists once.
    pods.create(&PostParams::default(), &mk("p3"))
        .await
        .unwrap();
    eventually("p3 seen", has("p3")).await;
    api.compact();
    api.close_watches();
    eventually("410 answered", || api.request_count("gone", "pods") >= 1).await;
    // (a bookmark may have raced the close; then there is no 410 and this
    // loop ends by timeout — the compaction makes that impossible because
    // bookmarks carry the current version, which is not expired)
    eventually("re-list", || api.request_count("list", "pods") == 2).await;
    pods.delete("p1", &DeleteParams::default()).await.unwrap();
    eventually("p1 deletion seen", || !has("p1")()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        api.request_count("list", "pods"),
        2,
        "exactly one re-list, no storm"
    );
    assert!(has("p2")() && has("p3")());
    task.abort();
}

fn review(status: &Value) -> (bool, String) {
    (
        status["authenticated"].as_bool().unwrap_or(false),
        status["error"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_request_and_review() {
    let api = ApiServer::start().unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}))
        .unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ztunnel", "namespace": "demo"}})).unwrap();
    let pod = api
        .create(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "zt-1", "namespace": "demo"},
            "spec": {"serviceAccountName": "ztunnel", "nodeName": "node1", "containers": []}}))
        .unwrap();
    let pod_uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let client = kube::Client::try_from(api.kube_config()).unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "demo");
    let request = |aud: &str, secs: i64, bound: bool| -> TokenRequest {
        let mut spec = json!({"audiences": [aud], "expirationSeconds": secs});
        if bound {
            spec["boundObjectRef"] =
                json!({"kind": "Pod", "apiVersion": "v1", "name": "zt-1", "uid": pod_uid});
        }
        serde_json::from_value(json!({"spec": spec})).unwrap()
    };
    let tr: TokenRequest = sas
        .create_subresource(
            "token",
            "ztunnel",
            &PostParams::default(),
            &request("istio-ca", 3600, true),
        )
        .await
        .unwrap();
    let token = serde_json::to_value(&tr).unwrap()["status"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let err = sas
        .create_subresource::<_, TokenRequest>(
            "token",
            "ztunnel",
            &PostParams::default(),
            &request("istio-ca", 60, false),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err:?}"
    );
    let err = sas
        .create_subresource::<_, TokenRequest>(
            "token",
            "nobody",
            &PostParams::default(),
            &request("istio-ca", 3600, false),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );

    let reviews: Api<TokenReview> = Api::all(client.clone());
    let check = |token: String, audiences: Vec<&str>| {
        let reviews = reviews.clone();
        let auds: Vec<String> = audiences.into_iter().map(str::to_string).collect();
        async move {
            let mut spec = json!({"token": token});
            if !auds.is_empty() {
                spec["audiences"] = json!(auds);
            }
            let r: TokenReview = serde_json::from_value(json!({"spec": spec})).unwrap();
            let out = reviews.create(&PostParams::default(), &r).await.unwrap();
            serde_json::to_value(&out).unwrap()["status"].clone()
        }
    };
    // good
    let st = check(token.clone(), vec!["istio-ca", "other"]).await;
    assert_eq!(review(&st), (true, String::new()), "{st}");
    assert_eq!(st["user"]["username"], "system:serviceaccount:demo:ztunnel");
    assert_eq!(st["audiences"], json!(["istio-ca"]));
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["zt-1"])
    );
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([pod_uid])
    );
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/node-name"],
        json!(["node1"])
    );
    assert!(
        st["user"]["groups"]
            .as_array()
            .unwrap()
            .contains(&json!("system:serviceaccounts:demo"))
    );
    // wrong audience
    let (ok, err) = review(&check(token.clone(), vec!["something-else"]).await);
    assert!(!ok && err.contains("audiences"), "{err}");
    // no audience asked: the API server's own, which this token lacks
    let (ok, _) = review(&check(token.clone(), vec![]).await);
    assert!(!ok);
    let plain = api.mint_token(&TokenSpec::new(
        "demo",
        "ztunnel",
        &[],
        Duration::from_secs(60),
    ));
    assert!(
        review(&check(plain, vec![]).await).0,
        "default audience {DEFAULT_AUDIENCE}"
    );
    // expired
    let expired = api.mint_token(&TokenSpec::expired(
        "demo",
        "ztunnel",
        &["istio-ca"],
        Duration::from_secs(30),
    ));
    let (ok, err) = review(&check(expired, vec!["istio-ca"]).await);
    assert!(!ok && err.contains("expired"), "{err}");
    // signed by someone else
    let forged = TokenSigner::random().mint(&TokenSpec::new(
        "demo",
        "ztunnel",
        &["istio-ca"],
        Duration::from_secs(60),
    ));
    let (ok, err) = review(&check(forged, vec!["istio-ca"]).await);
    assert!(!ok && err.contains("signature"), "{err}");
    // garbage
    let (ok, err) = review(&check("not-a-token".into(), vec!["istio-ca"]).await);
    assert!(!ok && err.contains("JWT"), "{err}");
    // the bound pod goes away: its token stops working
    api.delete("v1", "Pod", Some("demo"), "zt-1").unwrap();
    let (ok, err) = review(&check(token.clone(), vec!["istio-ca"]).await);
    assert!(!ok && err.contains("zt-1"), "{err}");
    // the account is recreated (new UID): old tokens stop working
    let t2 = api.mint_token(&TokenSpec::new(
        "demo",
        "ztunnel",
        &["istio-ca"],
        Duration::from_secs(60),
    ));
    api.delete("v1", "ServiceAccount", Some("demo"), "ztunnel")
        .unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ztunnel", "namespace": "demo"}})).unwrap();
    let (ok, err) = review(&check(t2, vec!["istio-ca"]).await);
    assert!(!ok && err.contains("UID"), "{err}");
}

#[test]
fn binary_serves_writes_kubeconfig_and_mints_tokens() {
    let bin = env!("CARGO_BIN_EXE_kube-api-double");
    let out = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("TEST DOUBLE") && help.contains("not a product"),
        "{help}"
    );

    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    let key = dir.path().join("key");
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kc)
        .arg("--signing-key-file")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _server = e2e::netsim::Process::spawn(cmd).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(kc.exists() && key.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server wrote no kubeconfig"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // mint an expired token with the CLI; the server rejects it as expired
    // (so it verified the signature with the same key)
    let minted = Command::new(bin)
        .args([
            "mint-token",
            "--namespace",
            "default",
            "--service-account",
            "default",
            "--audience",
            "istio-ca",
            "--expires-in",
            "-60",
            "--signing-key-file",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_string();
    assert!(
        TokenSigner::from_hex(&std::fs::read_to_string(&key).unwrap())
            .unwrap()
            .verify(&token)
            .is_err()
    );
    if !have_kubectl() {
        return;
    }
    let out = kubectl_ok(&kc, &["get", "ns", "-o", "name"]);
    assert!(out.contains("namespace/default"), "{out}");
    let review = dir.path().join("review.json");
    std::fs::write(
        &review,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": ["istio-ca"]}}).to_string(),
    )
    .unwrap();
    let out = kubectl_ok(
        &kc,
        &["create", "-f", review.to_str().unwrap(), "-o", "json"],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"]["authenticated"], false);
    assert_eq!(v["status"]["error"], "token has expired");
}

#[test]
fn reachable_from_simulated_nodes_and_pods() {
    if !have_kubectl() {
        return;
    }
    if !e2e::netsim::can_create_netns() {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let cluster = e2e::netsim::Cluster::new("apinode", 1).unwrap();
    let pod = cluster.node(1).add_pod("client").unwrap();
    let mut api = ApiServer::start().unwrap();
    // A second listener inside the underlay namespace, on the address every
    // node and pod can reach.
    let addr = api.add_listener(cluster.bind_host_tcp(0).unwrap()).unwrap();
    assert_eq!(addr.ip(), std::net::IpAddr::V4(cluster.host_ip()));
    let kc = cluster.scope().dir().join("kubeconfig-cluster");
    e2e::apiserver::write_kubeconfig_for(&kc, &format!("http://{addr}")).unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "from-test"}}))
        .unwrap();
    for ns in [cluster.node(1).netns(), pod.netns()] {
        let out = ns
            .exec(
                "kubectl",
                [
                    "--kubeconfig",
                    kc.to_str().unwrap(),
                    "get",
                    "ns",
                    "from-test",
                    "-o",
                    "name",
                ],
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(out.trim(), "namespace/from-test", "from {}", ns.name());
    }
    // the loopback listener is not reachable from inside the cluster
    let out = pod
        .netns()
        .output(
            "kubectl",
            [
                "--kubeconfig",
                "/nonexistent",
                "--server",
                &api.url(),
                "--request-timeout=2s",
                "get",
                "ns",
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(!out.status.success());
}
