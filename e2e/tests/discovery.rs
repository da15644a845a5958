//! ztunnel's Kubernetes discovery (`state::kube`) against the Kubernetes API double:
//! objects created, changed and deleted through the API show up in the store and in
//! `/config_dump`, change `pick_endpoint` and policy decisions; an expired watch
//! (410 Gone) costs one re-list per kind, a dropped watch none; a cluster without
//! the AuthorizationPolicy and PeerAuthentication CRDs still syncs; a mesh-wide
//! STRICT PeerAuthentication refuses plaintext (and only plaintext) until deleted;
//! Istio CRDs older than 1.22 (`security.istio.io/v1beta1` only) are enforced too;
//! a pod's locality follows its node's topology labels (metadata-only node watch).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::apiserver::resources::AUTHORIZATION_POLICY;
use e2e::apiserver::{ApiServer, ApiServerHandle};
use serde_json::{Value, json};
use ztunnel::policy::Request;
use ztunnel::policy::matching::PeerIdentity;
use ztunnel::state::Store;
use ztunnel::state::kube::{ConvertSettings, KubeDiscovery, KubeOptions, SOURCE_NAME};

fn opts() -> KubeOptions {
    KubeOptions {
        settings: ConvertSettings {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
        },
        root_namespace: "istio-system".into(),
        min_update_interval: Duration::from_millis(20),
    }
}

struct Cluster {
    api: ApiServerHandle,
    store: Store,
    discovery: KubeDiscovery,
}

async fn start(api: ApiServerHandle) -> Cluster {
    for ns in ["app", "istio-system"] {
        if api.get("v1", "Namespace", None, ns).is_err() {
            api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
                .unwrap();
        }
    }
    let store = Store::new();
    // As ztunnel runs it: a thread of its own.
    let discovery =
        KubeDiscovery::start_on_thread(Some(api.kube_config()), store.source(SOURCE_NAME), opts())
            .unwrap();
    tokio::time::timeout(Duration::from_secs(20), discovery.wait_synced())
        .await
        .expect("discovery syncs");
    Cluster {
        api,
        store,
        discovery,
    }
}

/// A running pod with an IP (status written as the kubelet would).
fn make_pod(api: &ApiServerHandle, name: &str, ip: &str, labels: Value, ready: bool) {
    let _ = api.delete("v1", "Pod", Some("app"), name);
    api.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "app", "labels": labels,
            "annotations": {"ambient.istio.io/redirection": "enabled"}},
        "spec": {"serviceAccountName": format!("sa-{name}"), "nodeName": "node-1",
            "containers": [{"name": "c", "image": "x",
                "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))
    .unwrap();
    set_pod_ready(api, name, ip, ready);
}

fn set_pod_ready(api: &ApiServerHandle, name: &str, ip: &str, ready: bool) {
    api.merge_patch(
        "v1",
        "Pod",
        Some("app"),
        name,
        &json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}),
        true,
    )
    .unwrap();
}

impl Cluster {
    fn pod(&self, name: &str, ip: &str, labels: Value, ready: bool) {
        make_pod(&self.api, name, ip, labels, ready);
    }

    fn set_ready(&self, name: &str, ip: &str, ready: bool) {
        set_pod_ready(&self.api, name, ip, ready);
    }

    fn slice(&self, pods: &[&str]) {
        let obj = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "app",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": pods.iter().map(|p| json!({"addresses": ["10.244.0.1"],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": p, "namespace": "app"}})).collect::<Vec<_>>()
        });
        let _ = self.api.delete(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some("app"),
            "web-abc",
        );
        self.api.create(obj).unwrap();
    }

    async fn until(&self, what: &str, f: impl Fn(&Store) -> bool) {
        let start = Instant::now();
        while !f(&self.store) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn picked(store: &Store, vip: IpAddr) -> Option<(String, u16)> {
    let snap = store.snapshot();
    let svc = snap.service_by_vip("", vip)?.clone();
    snap.pick_endpoint(&svc, 80)
        .map(|(w, p)| (w.name.clone(), p))
}

const SLEEP: &str = "spiffe://cluster.local/ns/other/sa/sleep";

fn allowed(store: &Store, dst: &str, port: u16) -> Option<bool> {
    decision(store, dst, port, Some(SLEEP)).map(|d| d.is_allow())
}

/// The decision for a connection to `dst:port` from `identity` (an HBONE source;
/// `None`: plaintext from outside the mesh, as on 15006).
fn decision(
    store: &Store,
    dst: &str,
    port: u16,
    identity: Option<&str>,
) -> Option<ztunnel::policy::Decision> {
    let snap = store.snapshot();
    let w = snap.workload_by_ip("", ip(dst))?.clone();
    Some(snap.policies().evaluate(&Request {
        dst_workload_namespace: &w.namespace,
        dst_workload_policy_refs: &w.authorization_policies,
        src_identity: identity.and_then(PeerIdentity::from_spiffe),
        src_ip: Some(ip("10.244.9.9")),
        dst_ip: ip(dst),
        dst_port: port,
    }))
}

fn plaintext_allowed(store: &Store, dst: &str, port: u16) -> Option<bool> {
    decision(store, dst, port, None).map(|d| d.is_allow())
}

/// GET `path` from ztunnel's admin endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_reach_the_store_routing_policies_and_config_dump() {
    let c = start(ApiServer::start().unwrap()).await;
    c.pod("web-1", "10.244.0.11", json!({"app": "web"}), true);
    c.pod("web-2", "10.244.0.12", json!({"app": "web"}), true);
    let svc = c
        .api
        .create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "app"},
            "spec": {"selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
        .unwrap();
    let vip = ip(svc["spec"]["clusterIP"].as_str().expect("a cluster IP"));
    c.slice(&["web-1"]);

    c.until("web-1 behind the service VIP", |s| {
        picked(s, vip) == Some(("web-1".into(), 8080))
    })
    .await;
    {
        let snap = c.store.snapshot();
        let w = snap.workload_by_ip("", ip("10.244.0.11")).unwrap();
        assert_eq!(w.uid, "Kubernetes//v1/Pod/app/web-1");
        assert_eq!(w.protocol, ztunnel::state::Protocol::HBONE);
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/app/sa/sa-web-1"
        );
        assert_eq!(w.node, "node-1");
    }

    // The same state in /config_dump, served by ztunnel's admin endpoint.
    let cfg = ztunnel::config::Config {
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        stats_addr: "127.0.0.1:0".parse().unwrap(),
        readiness_addr: "127.0.0.1:0".parse().unwrap(),
        ..ztunnel::config::Config::default()
    };
    let root = node_agent::ca::authority::testing::generate_root("dump root");
    let local_ca = ztunnel::identity::local_ca::LocalCa::from_pem(&root.0, &root.1).unwrap();
    let readiness = ztunnel::readiness::Readiness::default();
    readiness.add_watch("Kubernetes discovery synced", c.discovery.synced());
    let state = Arc::new(ztunnel::admin::AdminState {
        cfg: Arc::new(cfg),
        store: c.store.clone(),
        certs: ztunnel::identity::SecretManager::new(Arc::new(local_ca), Duration::from_secs(3600)),
        roots: ztunnel::tls::roots::TrustRoots::from_pem(&root.0, "dump root").unwrap(),
        registry: Arc::new(prometheus_client::registry::Registry::default()),
        readiness,
        proxies: Arc::new(Vec::new),
        quit: tokio_util::sync::CancellationToken::new(),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let addrs = ztunnel::admin::start(state, stop.clone()).await.unwrap();
    let dump = e2e::http::get(addrs.admin, "/config_dump")
        .await
        .expect("admin endpoint answers");
    assert!(dump.starts_with("HTTP/1.1 200"), "{dump}");
    assert!(dump.contains("Kubernetes//v1/Pod/app/web-1"), "{dump}");
    assert!(dump.contains("web.app.svc.cluster.local"), "{dump}");
    assert!(
        e2e::http::get(addrs.readiness, "/healthz/ready")
            .await
            .expect("readiness endpoint answers")
            .starts_with("HTTP/1.1 200")
    );

    // Routing follows the EndpointSlice.
    c.slice(&["web-2"]);
    c.until("web-2 replaces web-1", |s| {
        picked(s, vip) == Some(("web-2".into(), 8080))
    })
    .await;
    // ...and pod readiness.
    c.set_ready("web-2", "10.244.0.12", false);
    c.until("no healthy endpoint", |s| picked(s, vip).is_none())
        .await;
    c.set_ready("web-2", "10.244.0.12", true);
    c.until("web-2 healthy again", |s| picked(s, vip).is_some())
        .await;

    // An AuthorizationPolicy changes decisions for the pods it selects.
    assert_eq!(allowed(&c.store, "10.244.0.12", 8080), Some(true));
    c.api
        .create(
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-8080", "namespace": "app"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}}),
        )
        .unwrap();
    c.until("the DENY policy applies", |s| {
        allowed(s, "10.244.0.12", 8080) == Some(false)
    })
    .await;
    assert_eq!(allowed(&c.store, "10.244.0.12", 8081), Some(true));
    let dump = e2e::http::get(addrs.admin, "/config_dump")
        .await
        .expect("admin endpoint answers");
    assert!(dump.contains("deny-8080"), "{dump}");
    // Relabelled pod: no longer selected.
    c.api
        .merge_patch(
            "v1",
            "Pod",
            Some("app"),
            "web-2",
            &json!({"metadata": {"labels": {"app": "other"}}}),
            false,
        )
        .unwrap();
    c.until("the policy no longer selects web-2", |s| {
        allowed(s, "10.244.0.12", 8080) == Some(true)
    })
    .await;
    c.api
        .delete(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            Some("app"),
            "deny-8080",
        )
        .unwrap();
    c.until("policy gone", |s| s.snapshot().policies().is_empty())
        .await;

    // Deletions.
    c.api.delete("v1", "Pod", Some("app"), "web-1").unwrap();
    c.until("web-1 gone", |s| {
        s.snapshot().workload_by_ip("", ip("10.244.0.11")).is_none()
    })
    .await;
    c.api.delete("v1", "Service", Some("app"), "web").unwrap();
    c.until("service gone", |s| {
        s.snapshot().service_by_vip("", vip).is_none()
    })
    .await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watch_relists_once_per_kind_and_a_dropped_watch_not_at_all() {
    let api = ApiServer::default()
        .bookmark_interval(Duration::from_millis(100))
        .run()
        .unwrap();
    let c = start(api).await;
    c.pod("a", "10.244.1.1", json!({}), true);
    c.until("a", |s| {
        s.snapshot().workload_by_ip("", ip("10.244.1.1")).is_some()
    })
    .await;
    let kinds = [
        "pods",
        "services",
        "endpointslices",
        "nodes",
        "authorizationpolicies",
        "peerauthentications",
    ];
    let lists = |api: &ApiServerHandle| kinds.map(|k| api.request_count("list", k));
    let before = lists(&c.api);

    // A dropped watch resumes from its resourceVersion: no list.
    c.api.close_watches();
    c.pod("b", "10.244.1.2", json!({}), true);
    c.until("b after reconnect", |s| {
        s.snapshot().workload_by_ip("", ip("10.244.1.2")).is_some()
    })
    .await;
    assert_eq!(lists(&c.api), before, "resumed without listing");

    // Every held version expires: one re-list per kind, and changes made meanwhile
    // (a pod deleted, one created) are reflected.
    c.api.compact();
    c.api.delete("v1", "Pod", Some("app"), "a").unwrap();
    c.pod("c", "10.244.1.3", json!({}), true);
    c.until("state after the re-list", |s| {
        let snap = s.snapshot();
        snap.workload_by_ip("", ip("10.244.1.1")).is_none()
            && snap.workload_by_ip("", ip("10.244.1.3")).is_some()
    })
    .await;
    // Give every kind time to notice (bookmark interval 100 ms), then count.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = lists(&c.api);
    for (i, k) in kinds.iter().enumerate() {
        assert_eq!(
            after[i] - before[i],
            1,
            "{k}: exactly one re-list ({before:?} -> {after:?})"
        );
    }
    assert!(c.api.request_count("gone", "pods") >= 1);
    assert_eq!(c.store.snapshot().workloads().count(), 2);
}

/// Node topology labels (`topology.kubernetes.io/region|zone`, `topology.istio.io/subzone`)
/// become the locality of the pods on the node, and follow label changes, as istiod
/// gives ambient workloads their locality.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_topology_labels_become_workload_locality() {
    let c = start(ApiServer::start().unwrap()).await;
    c.pod("web-1", "10.244.4.1", json!({"app": "web"}), true);
    let locality = |s: &Store| {
        s.snapshot()
            .workload_by_ip("", ip("10.244.4.1"))
            .map(|w| w.locality.clone())
    };
    c.until("web-1 without a locality (node-1 unknown)", |s| {
        locality(s) == Some(Default::default())
    })
    .await;
    c.api
        .create(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1", "labels": {
                "topology.kubernetes.io/region": "eu-west1",
                "topology.kubernetes.io/zone": "eu-west1-b",
                "topology.istio.io/subzone": "rack-7"}},
            "status": {"nodeInfo": {"kubeletVersion": "v1.32.0"}}}))
        .unwrap();
    c.until("web-1 in node-1's locality", |s| {
        locality(s).is_some_and(|l| {
            (l.region.as_str(), l.zone.as_str(), l.subzone.as_str())
                == ("eu-west1", "eu-west1-b", "rack-7")
        })
    })
    .await;
    c.api
        .merge_patch(
            "v1",
            "Node",
            None,
            "node-1",
            &json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "eu-west1-c",
                "topology.istio.io/subzone": null}}}),
            false,
        )
        .unwrap();
    c.until("the relabelled zone", |s| {
        locality(s).is_some_and(|l| l.zone == "eu-west1-c" && l.subzone.is_empty())
    })
    .await;
    c.api.delete("v1", "Node", None, "node-1").unwrap();
    c.until("no locality once the node is gone", |s| {
        locality(s) == Some(Default::default())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_policy_crd_is_a_warning_not_a_failure() {
    let api = ApiServer::default()
        .without_authorization_policy_crd()
        .without_peer_authentication_crd()
        .run()
        .unwrap();
    // start() waits for the sync: a missing CRD counts as "none of that kind".
    let c = start(api).await;
    c.pod("a", "10.244.2.1", json!({"app": "a"}), true);
    c.until("pods still flow", |s| {
        s.snapshot().workload_by_ip("", ip("10.244.2.1")).is_some()
    })
    .await;
    assert!(c.store.snapshot().policies().is_empty());
    assert_eq!(allowed(&c.store, "10.244.2.1", 80), Some(true));
    assert_eq!(plaintext_allowed(&c.store, "10.244.2.1", 80), Some(true));
    // (The slow retry schedule is unit-tested in state::kube; the double does not
    // count requests for resources it does not serve.)
}

/// Istio CRDs from before 1.22 serve AuthorizationPolicy and PeerAuthentication at
/// `security.istio.io/v1beta1` only (v1 answers 404). A DENY policy and a mesh-wide
/// STRICT PeerAuthentication that exist before ztunnel starts are enforced from the
/// first synced state on (taking the 404 on v1 for "no CRD" would sync with neither:
/// fail open), and later changes at v1beta1 are followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_served_only_at_v1beta1_are_enforced() {
    const STRICT_KEY: &str = "istio-system/istio_converted_static_strict";
    let api = ApiServer::default()
        .istio_security_v1beta1_only()
        .run()
        .unwrap();
    for ns in ["app", "istio-system"] {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .unwrap();
    }
    make_pod(&api, "web-1", "10.244.5.1", json!({"app": "web"}), true);
    api.create(
        json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-8080", "namespace": "app"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}}),
    )
    .unwrap();
    api.create(
        json!({"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}}}),
    )
    .unwrap();

    // Synced means both were listed (at v1beta1) and applied.
    let c = start(api).await;
    assert_eq!(allowed(&c.store, "10.244.5.1", 8080), Some(false), "DENY");
    assert_eq!(allowed(&c.store, "10.244.5.1", 8081), Some(true));
    let denied = decision(&c.store, "10.244.5.1", 8081, None).unwrap();
    assert!(!denied.is_allow(), "STRICT refuses plaintext: {denied}");
    assert_eq!(denied.policy(), Some(STRICT_KEY), "{denied}");
    assert!(c.api.request_count("list", "authorizationpolicies") >= 1);
    assert!(c.api.request_count("list", "peerauthentications") >= 1);

    // Watched at v1beta1: changes there are followed.
    c.api
        .delete(
            "security.istio.io/v1beta1",
            "AuthorizationPolicy",
            Some("app"),
            "deny-8080",
        )
        .unwrap();
    c.until("the DENY policy is gone", |s| {
        allowed(s, "10.244.5.1", 8080) == Some(true)
    })
    .await;
    assert_eq!(plaintext_allowed(&c.store, "10.244.5.1", 8080), Some(false));
    c.api
        .delete(
            "security.istio.io/v1beta1",
            "PeerAuthentication",
            Some("istio-system"),
            "default",
        )
        .unwrap();
    c.until("plaintext allowed again", |s| {
        plaintext_allowed(s, "10.244.5.1", 8080) == Some(true)
    })
    .await;
    c.api
        .create(
            json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-all", "namespace": "app"},
            "spec": {"action": "DENY", "rules": [{}]}}),
        )
        .unwrap();
    c.until("a new v1beta1 DENY policy applies", |s| {
        allowed(s, "10.244.5.1", 8081) == Some(false)
    })
    .await;
}

/// The version found (v1beta1) is kept while served. When it stops being served (the
/// CRD removed), both versions are probed again; with neither served the kind is
/// absent (none enforced, discovery stays synced), and when the CRD is back its
/// objects apply again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1beta1_crd_removed_and_reinstalled_is_found_again() {
    let api = ApiServer::default()
        .istio_security_v1beta1_only()
        .run()
        .unwrap();
    let c = start(api).await;
    c.pod("web-1", "10.244.6.1", json!({"app": "web"}), true);
    c.api
        .create(
            json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-all", "namespace": "app"},
            "spec": {"action": "DENY", "rules": [{}]}}),
        )
        .unwrap();
    c.until("the v1beta1 DENY policy applies", |s| {
        allowed(s, "10.244.6.1", 8080) == Some(false)
    })
    .await;

    c.api.set_served(AUTHORIZATION_POLICY, false);
    c.until("no AuthorizationPolicy CRD at any version: none", |s| {
        allowed(s, "10.244.6.1", 8080) == Some(true)
    })
    .await;
    assert!(*c.discovery.synced().borrow());

    c.api.set_served(AUTHORIZATION_POLICY, true);
    c.until("found at v1beta1 again", |s| {
        allowed(s, "10.244.6.1", 8080) == Some(false)
    })
    .await;
}

/// A mesh-wide `mtls.mode: STRICT` PeerAuthentication (root namespace): plaintext
/// to a meshed pod is refused by upstream's static STRICT policy, HBONE (mTLS)
/// sources are still allowed; a namespace-wide PERMISSIVE overrides it for its
/// namespace; deleting the PeerAuthentications accepts plaintext again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_wide_strict_peer_authentication_refuses_plaintext_until_deleted() {
    const STRICT_KEY: &str = "istio-system/istio_converted_static_strict";
    let c = start(ApiServer::start().unwrap()).await;
    c.pod("web-1", "10.244.4.1", json!({"app": "web"}), true);
    c.until("web-1", |s| {
        s.snapshot().workload_by_ip("", ip("10.244.4.1")).is_some()
    })
    .await;
    assert_eq!(plaintext_allowed(&c.store, "10.244.4.1", 8080), Some(true));

    c.api
        .create(
            json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "istio-system"},
            "spec": {"mtls": {"mode": "STRICT"}}}),
        )
        .unwrap();
    c.until("plaintext refused", |s| {
        plaintext_allowed(s, "10.244.4.1", 8080) == Some(false)
    })
    .await;
    let denied = decision(&c.store, "10.244.4.1", 8080, None).unwrap();
    assert_eq!(denied.policy(), Some(STRICT_KEY), "{denied}");
    assert_eq!(allowed(&c.store, "10.244.4.1", 8080), Some(true), "mTLS");
    {
        let snap = c.store.snapshot();
        let w = snap.workload_by_ip("", ip("10.244.4.1")).unwrap();
        assert_eq!(w.authorization_policies, vec![STRICT_KEY.to_string()]);
    }

    // A namespace-wide PERMISSIVE overrides the mesh's STRICT for `app`.
    c.api
        .create(
            json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "app"},
            "spec": {"mtls": {"mode": "PERMISSIVE"}}}),
        )
        .unwrap();
    c.until("namespace PERMISSIVE", |s| {
        plaintext_allowed(s, "10.244.4.1", 8080) == Some(true)
    })
    .await;
    c.api
        .delete(
            "security.istio.io/v1",
            "PeerAuthentication",
            Some("app"),
            "default",
        )
        .unwrap();
    c.until("mesh STRICT again", |s| {
        plaintext_allowed(s, "10.244.4.1", 8080) == Some(false)
    })
    .await;
    // A pod created while the policy is in force gets it too.
    c.pod("web-2", "10.244.4.2", json!({"app": "web"}), true);
    c.until("new pod strict", |s| {
        plaintext_allowed(s, "10.244.4.2", 8080) == Some(false)
    })
    .await;

    c.api
        .delete(
            "security.istio.io/v1",
            "PeerAuthentication",
            Some("istio-system"),
            "default",
        )
        .unwrap();
    c.until("plaintext allowed again", |s| {
        plaintext_allowed(s, "10.244.4.1", 8080) == Some(true)
            && plaintext_allowed(s, "10.244.4.2", 8080) == Some(true)
    })
    .await;
    assert_eq!(allowed(&c.store, "10.244.4.1", 8080), Some(true));
    // No PeerAuthentication left: the static policy is gone too (as upstream).
    c.until("no policies", |s| s.snapshot().policies().is_empty())
        .await;
}

/// The ztunnel binary with `KUBERNETES_DISCOVERY=true` (in-pod mode, no node agent:
/// it serves no workload, but learns the cluster): `/config_dump` shows pods created
/// through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_binary_with_kubernetes_discovery_dumps_cluster_state() {
    let api = ApiServer::start().unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app"}}))
        .unwrap();
    let dir = e2e::local_ztunnel::LocalZtunnel::scratch();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let mut zt = e2e::local_ztunnel::LocalZtunnel::spawn(
        dir,
        &[
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("KUBERNETES_DISCOVERY", "true".into()),
        ],
    );
    api.create(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-q"}}}))
        .unwrap();
    make_pod(&api, "web-1", "10.244.3.1", json!({"app": "web"}), true);
    zt.dump_until("web-1 with its node's zone", |d| {
        d.contains("Kubernetes//v1/Pod/app/web-1")
            && d.contains("10.244.3.1")
            && d.contains("zone-q")
    })
    .await;
    // Not ready: discovery syncs, but there is no node agent (in-pod snapshot).
    let start = Instant::now();
    loop {
        let readiness = zt.readiness().await;
        assert!(!readiness.starts_with("HTTP/1.1 200"), "{readiness}");
        if !readiness.contains("Kubernetes discovery synced") {
            assert!(readiness.contains("in-pod"), "{readiness}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{readiness}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
