//! AuthorizationPolicy and PeerAuthentication objects through the discovery index.

use super::*;

#[test]
fn policies_change_decisions_and_bind_by_selector() {
    let mut idx = index();
    let store = Store::new();
    idx.pod_event(Event::Apply(pod(
        "app",
        "web",
        "10.0.0.1",
        json!({"app": "web"}),
        true,
    )));
    idx.pod_event(Event::Apply(pod(
        "app",
        "db",
        "10.0.0.2",
        json!({"app": "db"}),
        true,
    )));
    flush(&mut idx, &store);
    let sleep = Some("spiffe://cluster.local/ns/other/sa/sleep");
    assert_eq!(decide(&store, "10.0.0.1", sleep, 80), Decision::Allow);

    // A DENY for port 80 on pods labelled app=web only.
    idx.policy_event(Event::Apply(policy(
        "app",
        "deny-web-80",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}),
    )));
    flush(&mut idx, &store);
    let snap = store.snapshot();
    assert_eq!(
        snap.workload_by_ip("", ip("10.0.0.1"))
            .unwrap()
            .authorization_policies,
        vec!["app/deny-web-80".to_string()]
    );
    assert!(
        snap.workload_by_ip("", ip("10.0.0.2"))
            .unwrap()
            .authorization_policies
            .is_empty()
    );
    assert!(!decide(&store, "10.0.0.1", sleep, 80).is_allow());
    assert!(decide(&store, "10.0.0.1", sleep, 81).is_allow());
    assert!(decide(&store, "10.0.0.2", sleep, 80).is_allow());

    // The pod's label changes: the policy no longer selects it.
    idx.pod_event(Event::Apply(pod(
        "app",
        "web",
        "10.0.0.1",
        json!({"app": "web2"}),
        true,
    )));
    flush(&mut idx, &store);
    assert!(decide(&store, "10.0.0.1", sleep, 80).is_allow());

    // A namespace-wide ALLOW for namespace "trusted" only; a mesh-wide one from the root
    // namespace does not change that (ALLOW policies are ORed).
    idx.policy_event(Event::Apply(policy(
        "app",
        "allow-trusted",
        json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["trusted"]}}]}]}),
    )));
    flush(&mut idx, &store);
    assert!(!decide(&store, "10.0.0.2", sleep, 80).is_allow());
    assert!(
        decide(
            &store,
            "10.0.0.2",
            Some("spiffe://cluster.local/ns/trusted/sa/x"),
            80
        )
        .is_allow()
    );

    // Policy deleted: allowed again.
    idx.policy_event(Event::Delete(policy("app", "allow-trusted", json!({}))));
    flush(&mut idx, &store);
    assert!(decide(&store, "10.0.0.2", sleep, 80).is_allow());

    // A root-namespace selector policy binds across namespaces.
    idx.policy_event(Event::Apply(policy(
        "istio-system",
        "deny-db",
        json!({"selector": {"matchLabels": {"app": "db"}}, "action": "DENY",
            "rules": [{}]}),
    )));
    flush(&mut idx, &store);
    assert!(!decide(&store, "10.0.0.2", sleep, 80).is_allow());
    assert_eq!(
        store
            .snapshot()
            .workload_by_ip("", ip("10.0.0.2"))
            .unwrap()
            .authorization_policies,
        vec!["istio-system/deny-db".to_string()]
    );

    // A policy that is not enforced (CUSTOM) becomes a DENY: it is bound then.
    idx.policy_event(Event::Apply(policy(
        "app",
        "later",
        json!({"selector": {"matchLabels": {"app": "web2"}}, "action": "CUSTOM",
            "provider": {"name": "ext"}, "rules": [{}]}),
    )));
    flush(&mut idx, &store);
    assert!(decide(&store, "10.0.0.1", sleep, 80).is_allow());
    idx.policy_event(Event::Apply(policy(
        "app",
        "later",
        json!({"selector": {"matchLabels": {"app": "web2"}}, "action": "DENY", "rules": [{}]}),
    )));
    flush(&mut idx, &store);
    assert!(!decide(&store, "10.0.0.1", sleep, 80).is_allow());
    idx.policy_event(Event::Delete(policy("app", "later", json!({}))));

    // The CRD disappears: no policies at all.
    idx.policies_absent();
    flush(&mut idx, &store);
    assert!(store.snapshot().policies().is_empty());
    assert!(decide(&store, "10.0.0.2", sleep, 80).is_allow());
}

fn peer_authn(ns: &str, name: &str, spec: serde_json::Value) -> PeerAuthentication {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns,
            "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec
    }))
    .unwrap()
}

#[test]
fn peer_authentications_bind_by_scope_and_leave_with_a_relist() {
    const STRICT: &str = "istio-system/istio_converted_static_strict";
    let mut idx = index();
    let store = Store::new();
    idx.pod_event(Event::Apply(pod(
        "app",
        "web",
        "10.0.0.1",
        json!({"app": "web"}),
        true,
    )));
    idx.pod_event(Event::Apply(pod(
        "other",
        "db",
        "10.0.0.2",
        json!({"app": "db"}),
        true,
    )));
    flush(&mut idx, &store);
    let mtls = Some("spiffe://cluster.local/ns/other/sa/sleep");
    let plain_ok = |store: &Store, dst: &str, port: u16| decide(store, dst, None, port).is_allow();

    // Mesh-wide STRICT: every pod references the static policy.
    idx.peer_authn_event(Event::Apply(peer_authn(
        "istio-system",
        "default",
        json!({"mtls": {"mode": "STRICT"}}),
    )));
    flush(&mut idx, &store);
    assert_eq!(store.snapshot().policies().len(), 1);
    for dst in ["10.0.0.1", "10.0.0.2"] {
        assert_eq!(
            decide(&store, dst, None, 80).policy(),
            Some(STRICT),
            "{dst}"
        );
        assert!(decide(&store, dst, mtls, 80).is_allow(), "{dst}");
    }

    // A workload exception for app=web on port 8080 (converted, merged strictness).
    idx.peer_authn_event(Event::Apply(peer_authn(
        "app",
        "web",
        json!({"selector": {"matchLabels": {"app": "web"}},
               "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
    )));
    flush(&mut idx, &store);
    let converted = "app/converted_peer_authentication_web";
    assert!(store.snapshot().policies().get(converted).is_some());
    assert!(plain_ok(&store, "10.0.0.1", 8080));
    assert_eq!(
        decide(&store, "10.0.0.1", None, 80).policy(),
        Some(converted)
    );
    assert_eq!(
        decide(&store, "10.0.0.2", None, 8080).policy(),
        Some(STRICT)
    );

    // The pod is relabelled: back to the mesh-wide STRICT.
    idx.pod_event(Event::Apply(pod(
        "app",
        "web",
        "10.0.0.1",
        json!({"app": "x"}),
        true,
    )));
    flush(&mut idx, &store);
    assert_eq!(
        decide(&store, "10.0.0.1", None, 8080).policy(),
        Some(STRICT)
    );

    // A re-list that no longer has the mesh-wide object: only the workload one is
    // left, which changes nothing for these pods.
    idx.peer_authn_event(Event::Init);
    idx.peer_authn_event(Event::InitApply(peer_authn(
        "app",
        "web",
        json!({"selector": {"matchLabels": {"app": "web"}},
               "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
    )));
    idx.peer_authn_event(Event::InitDone);
    flush(&mut idx, &store);
    assert!(plain_ok(&store, "10.0.0.1", 80));
    assert!(plain_ok(&store, "10.0.0.2", 80));
    assert!(store.snapshot().policies().get(converted).is_none());

    // The CRD disappears: nothing left.
    idx.peer_authns_absent();
    flush(&mut idx, &store);
    assert!(store.snapshot().policies().is_empty());
    assert_eq!(idx.peer_authentication_count(), 0);
}
