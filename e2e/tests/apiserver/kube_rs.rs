//! The API double through kube-rs: typed CRUD, patches, status, raw watches and the
//! runtime watcher.

use super::*;

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
