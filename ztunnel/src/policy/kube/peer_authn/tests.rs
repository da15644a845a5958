//! PeerAuthentication conversion, checked by the decisions it leads to: the
//! policies [`policies`] produces, bound to a workload by
//! [`workload_policy_keys`], evaluated by [`PolicySet`].

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::policy::matching::PeerIdentity;
use crate::policy::{Decision, DenyReason, PolicySet, Request};

const STATIC_KEY: &str = "istio-system/istio_converted_static_strict";
const MTLS: Option<&str> = Some("spiffe://cluster.local/ns/other/sa/client");
const PLAIN: Option<&str> = None;

/// A PeerAuthentication created `age` seconds after the epoch.
fn pa(ns: &str, name: &str, age: i64, spec: Value) -> PeerAuthentication {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns,
            "creationTimestamp": format!("2026-01-01T00:00:{age:02}Z")},
        "spec": spec
    }))
    .unwrap()
}

fn mode(m: &str) -> Value {
    json!({"mtls": {"mode": m}})
}

fn opts() -> ConvertOptions {
    ConvertOptions::default()
}

/// The cluster's PeerAuthentications as the store would hold them, and one
/// workload in `app` labelled `app=web`.
struct World {
    all: Vec<PeerAuthentication>,
}

impl World {
    fn new(all: Vec<PeerAuthentication>) -> World {
        World { all }
    }

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_owned(), "web".to_owned())])
    }

    fn keys(&self) -> Vec<String> {
        let applicable: Vec<&PeerAuthentication> = self
            .all
            .iter()
            .filter(|p| p.applies_to(&opts(), "app", &Self::labels()))
            .collect();
        workload_policy_keys(&applicable, &opts())
    }

    fn set(&self) -> PolicySet {
        let refs: Vec<&PeerAuthentication> = self.all.iter().collect();
        PolicySet::new(policies(&refs, &opts()))
    }

    fn decide(&self, port: u16, id: Option<&str>) -> Decision {
        let keys = self.keys();
        self.set().evaluate(&Request {
            dst_workload_namespace: "app",
            dst_workload_policy_refs: &keys,
            src_identity: id.map(|s| PeerIdentity::from_spiffe(s).unwrap()),
            src_ip: Some("10.0.0.9".parse().unwrap()),
            dst_ip: "10.0.1.1".parse().unwrap(),
            dst_port: port,
        })
    }

    /// Asserts: mTLS always allowed; plaintext on each port as `plain`
    /// says (`Some(policy)`: denied by that policy).
    fn check(&self, cases: &[(u16, Option<&str>)]) {
        for (port, denied_by) in cases {
            assert!(
                self.decide(*port, MTLS).is_allow(),
                "mTLS to port {port} must be allowed; keys {:?}",
                self.keys()
            );
            let got = self.decide(*port, PLAIN);
            match denied_by {
                None => assert!(got.is_allow(), "plaintext to {port}: {got}"),
                Some(p) => assert_eq!(
                    got,
                    Decision::Deny {
                        policy: (*p).into(),
                        reason: DenyReason::DenyPolicyMatched
                    },
                    "plaintext to {port}"
                ),
            }
        }
    }
}

#[test]
fn no_peer_authentication_no_policy() {
    let w = World::new(vec![]);
    assert!(w.set().is_empty());
    assert!(w.keys().is_empty());
    w.check(&[(8080, None)]);
}

#[test]
fn mesh_strict_refuses_plaintext_with_the_static_policy() {
    let w = World::new(vec![pa("istio-system", "default", 1, mode("STRICT"))]);
    assert_eq!(w.keys(), vec![STATIC_KEY.to_owned()]);
    let set = w.set();
    assert_eq!(set.len(), 1);
    let p = set.get(STATIC_KEY).unwrap();
    assert_eq!(p.scope, Scope::WorkloadSelector);
    assert_eq!(p.action, Action::Deny);
    w.check(&[(8080, Some(STATIC_KEY)), (9090, Some(STATIC_KEY))]);
    // A workload in another namespace too.
    let other: Vec<&PeerAuthentication> = w
        .all
        .iter()
        .filter(|p| p.applies_to(&opts(), "elsewhere", &BTreeMap::new()))
        .collect();
    assert_eq!(workload_policy_keys(&other, &opts()), vec![STATIC_KEY]);
}

#[test]
fn mesh_permissive_or_unset_accepts_plaintext_but_the_static_policy_exists() {
    for m in ["PERMISSIVE", "UNSET", "DISABLE"] {
        let w = World::new(vec![pa("istio-system", "default", 1, mode(m))]);
        assert!(w.keys().is_empty(), "{m}");
        // Upstream sends the static policy whenever a PeerAuthentication exists.
        assert!(w.set().get(STATIC_KEY).is_some(), "{m}");
        w.check(&[(8080, None)]);
    }
}

#[test]
fn namespace_permissive_overrides_mesh_strict() {
    let w = World::new(vec![
        pa("istio-system", "default", 1, mode("STRICT")),
        pa("app", "default", 2, mode("PERMISSIVE")),
    ]);
    assert!(w.keys().is_empty());
    w.check(&[(8080, None)]);
    // ...only in its namespace.
    let other: Vec<&PeerAuthentication> = w
        .all
        .iter()
        .filter(|p| p.applies_to(&opts(), "elsewhere", &BTreeMap::new()))
        .collect();
    assert_eq!(workload_policy_keys(&other, &opts()), vec![STATIC_KEY]);
    // A namespace policy with mode UNSET inherits the mesh's.
    let w = World::new(vec![
        pa("istio-system", "default", 1, mode("STRICT")),
        pa("app", "default", 2, json!({})),
    ]);
    w.check(&[(8080, Some(STATIC_KEY))]);
    // Namespace STRICT under a permissive mesh.
    let w = World::new(vec![
        pa("istio-system", "default", 1, mode("PERMISSIVE")),
        pa("app", "default", 2, mode("STRICT")),
    ]);
    w.check(&[(8080, Some(STATIC_KEY))]);
}

#[test]
fn workload_selector_strict_applies_to_selected_workloads_only() {
    let strict_web = pa(
        "app",
        "web",
        2,
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
    );
    let w = World::new(vec![strict_web.clone()]);
    assert_eq!(w.keys(), vec![STATIC_KEY]);
    w.check(&[(8080, Some(STATIC_KEY))]);
    // Not selected: another label, or another namespace.
    let db = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    assert!(!strict_web.applies_to(&opts(), "app", &db));
    assert!(!strict_web.applies_to(&opts(), "other", &World::labels()));
    // A workload PERMISSIVE overrides a STRICT namespace.
    let w = World::new(vec![
        pa("app", "default", 1, mode("STRICT")),
        pa(
            "app",
            "web",
            2,
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}}),
        ),
    ]);
    w.check(&[(8080, None)]);
    // A selector in the root namespace is not used.
    let root_sel = pa(
        "istio-system",
        "sel",
        1,
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
    );
    assert_eq!(root_sel.level(&opts()), Level::Unused);
    assert!(!warnings(&root_sel, &opts()).is_empty());
    World::new(vec![root_sel]).check(&[(8080, None)]);
}

#[test]
fn port_level_exception_under_strict() {
    // Workload STRICT, port 8080 PERMISSIVE: one converted policy, the static one
    // is not referenced (a DENY cannot be excepted by another policy).
    let web = pa(
        "app",
        "web",
        2,
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
               "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, "9443": {"mode": "STRICT"}}}),
    );
    let converted = "app/converted_peer_authentication_web";
    let w = World::new(vec![web]);
    assert_eq!(w.keys(), vec![converted.to_owned()]);
    w.check(&[
        (8080, None),
        (9090, Some(converted)),
        (9443, Some(converted)),
    ]);

    // Workload UNSET under a STRICT mesh, 8080 PERMISSIVE: strictness merged in.
    let w = World::new(vec![
        pa("istio-system", "default", 1, mode("STRICT")),
        pa(
            "app",
            "web",
            2,
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
        ),
    ]);
    assert_eq!(w.keys(), vec![converted.to_owned()]);
    w.check(&[(8080, None), (9090, Some(converted))]);

    // The same under a namespace UNSET (inherits the STRICT mesh).
    let w = World::new(vec![
        pa("istio-system", "default", 1, mode("STRICT")),
        pa("app", "default", 1, json!({"mtls": {"mode": "UNSET"}})),
        pa(
            "app",
            "web",
            2,
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
        ),
    ]);
    w.check(&[(8080, None), (9090, Some(converted))]);
}

#[test]
fn port_level_strict_under_permissive() {
    let converted = "app/converted_peer_authentication_web";
    for (workload_mode, parents) in [
        ("PERMISSIVE", vec![]),
        ("DISABLE", vec![]),
        // Workload PERMISSIVE under a STRICT mesh: the port stays strict.
        (
            "PERMISSIVE",
            vec![pa("istio-system", "default", 1, mode("STRICT"))],
        ),
        ("UNSET", vec![pa("app", "default", 1, mode("PERMISSIVE"))]),
    ] {
        let mut all = parents;
        all.push(pa(
            "app",
            "web",
            2,
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "mtls": {"mode": workload_mode},
                   "portLevelMtls": {"9443": {"mode": "STRICT"}}}),
        ));
        let w = World::new(all);
        assert_eq!(w.keys(), vec![converted.to_owned()], "{workload_mode}");
        w.check(&[(8080, None), (9443, Some(converted))]);
    }
}

#[test]
fn disable_accepts_plaintext_like_permissive() {
    let w = World::new(vec![
        pa("istio-system", "default", 1, mode("STRICT")),
        pa("app", "default", 2, mode("DISABLE")),
    ]);
    w.check(&[(8080, None)]);
    assert!(
        warnings(&w.all[1], &opts())
            .iter()
            .any(|m| m.contains("DISABLE"))
    );
    // Workload STRICT with a DISABLE port: that port is excepted.
    let w = World::new(vec![pa(
        "app",
        "web",
        1,
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
               "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
    )]);
    let converted = "app/converted_peer_authentication_web";
    w.check(&[(8080, None), (9090, Some(converted))]);
    // Under an inherited STRICT a DISABLE port alone stays strict (upstream).
    let w = World::new(vec![
        pa("istio-system", "default", 1, mode("STRICT")),
        pa(
            "app",
            "web",
            2,
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
        ),
    ]);
    w.check(&[(8080, Some(STATIC_KEY)), (9090, Some(STATIC_KEY))]);
}

#[test]
fn oldest_policy_wins_a_scope() {
    // Two namespace policies: the older (PERMISSIVE) wins over the newer STRICT.
    let w = World::new(vec![
        pa("app", "newer", 5, mode("STRICT")),
        pa("app", "older", 3, mode("PERMISSIVE")),
    ]);
    w.check(&[(8080, None)]);
    let w = World::new(vec![
        pa("app", "newer", 5, mode("PERMISSIVE")),
        pa("app", "older", 3, mode("STRICT")),
    ]);
    w.check(&[(8080, Some(STATIC_KEY))]);
    // Equal timestamps: by name.
    let a = pa("app", "a", 3, mode("STRICT"));
    let b = pa("app", "b", 3, mode("PERMISSIVE"));
    assert_eq!(oldest([&b, &a]).unwrap().key(), "app/a");
}

#[test]
fn ports_changing_nothing_need_no_converted_policy() {
    let w = World::new(vec![pa(
        "app",
        "web",
        1,
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
               "portLevelMtls": {"8080": {"mode": "STRICT"}, "9090": {"mode": "UNSET"}}}),
    )]);
    assert_eq!(w.keys(), vec![STATIC_KEY]);
    assert_eq!(w.set().len(), 1);
    let w = World::new(vec![pa(
        "app",
        "web",
        1,
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"},
               "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
    )]);
    assert!(w.keys().is_empty());
    assert_eq!(w.set().len(), 1);
}

#[test]
fn odd_objects_are_reported() {
    let p = pa(
        "app",
        "web",
        1,
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "SOMETIMES"},
               "portLevelMtls": {"http": {"mode": "STRICT"}, "70000": {"mode": "STRICT"}},
               "extra": 1}),
    );
    assert_eq!(p.mode(), MtlsMode::Unset);
    assert!(p.port_modes().is_empty());
    let w = warnings(&p, &opts()).join("\n");
    for want in [
        "spec.extra",
        "unknown spec.mtls.mode",
        "\"http\"",
        "\"70000\"",
    ] {
        assert!(w.contains(want), "{want}: {w}");
    }
    let ns_ports = pa(
        "app",
        "default",
        1,
        json!({"portLevelMtls": {"8080": {"mode": "STRICT"}}}),
    );
    assert!(
        warnings(&ns_ports, &opts())
            .iter()
            .any(|m| m.contains("needs a selector"))
    );
    assert_eq!(convert(&ns_ports, None, None, &opts()), None);
    // Nulls read as absent.
    let p: PeerAuthentication = serde_json::from_value(json!({
        "metadata": {"name": "n", "namespace": "app"},
        "spec": {"mtls": null, "portLevelMtls": null, "selector": null}
    }))
    .unwrap();
    assert_eq!(p.mode(), MtlsMode::Unset);
    assert_eq!(p.level(&opts()), Level::Namespace);
}
