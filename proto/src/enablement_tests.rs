use super::*;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Case {
    name: String,
    #[serde(default)]
    selectors: Vec<EnablementSelector>,
    #[serde(default)]
    pod_labels: BTreeMap<String, String>,
    #[serde(default)]
    pod_annotations: BTreeMap<String, String>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    namespace_labels: BTreeMap<String, String>,
    ambient: bool,
    /// Index of the entry that must match, when ambient.
    #[serde(default)]
    entry: Option<usize>,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn cfg() -> EnablementConfig {
    EnablementConfig {
        exclude_namespaces: vec!["kube-system".into()],
        agent_namespace: "istio-system".into(),
        agent_pod: Some("agent-pod-1".into()),
        selectors: EnablementSelectors::default(),
    }
}

fn selectors(v: serde_json::Value) -> EnablementSelectors {
    EnablementSelectors::compile(serde_json::from_value(v).unwrap()).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn facts<'a>(
    namespace: &'a str,
    name: &'a str,
    labels: &'a BTreeMap<String, String>,
) -> PodFacts<'a> {
    PodFacts {
        namespace,
        name,
        labels,
        host_network: false,
        sidecar: false,
    }
}

#[test]
fn table_vectors() {
    let text = include_str!("../testdata/enablement-cases.json");
    let cases: Cases = serde_json::from_str(text).unwrap();
    assert!(cases.cases.len() >= 20);
    assert!(
        cases
            .cases
            .iter()
            .filter(|c| !c.selectors.is_empty())
            .count()
            >= 8
    );
    for c in &cases.cases {
        let mut cfg = cfg();
        cfg.selectors = EnablementSelectors::compile(c.selectors.clone()).unwrap();
        let pod = PodFacts {
            namespace: "demo",
            name: "app-1",
            labels: &c.pod_labels,
            host_network: c.host_network,
            sidecar: c.pod_annotations.contains_key(SIDECAR_STATUS_ANNOTATION),
        };
        let d = decide(pod, &c.namespace_labels, &cfg);
        assert_eq!(
            d.is_ambient(),
            c.ambient,
            "case {:?}: {}",
            c.name,
            d.reason()
        );
        if let Some(entry) = c.entry {
            assert!(
                matches!(d.reason(), Reason::Selector { index, .. } if index == entry),
                "case {:?}: {:?}",
                c.name,
                d.reason()
            );
        }
    }
}

#[test]
fn excluded_namespaces_and_own_pods_never_enrol() {
    let ambient = labels(&[("istio.io/dataplane-mode", "ambient")]);
    let ns = ambient.clone();
    let c = cfg();
    for (pod, why) in [
        (facts("kube-system", "coredns-1", &ambient), "excluded"),
        (facts("istio-system", "agent-pod-1", &ambient), "own pod"),
        (facts("istio-system", "node-agent-x7z", &ambient), "own pod"),
        (
            facts("istio-system", "istio-cni-node-abc", &ambient),
            "own pod",
        ),
    ] {
        let d = decide(pod, &ns, &c);
        assert!(!d.is_ambient(), "{why}: {}", d.reason());
    }
    let none = BTreeMap::new();
    // Same names elsewhere are ordinary pods.
    assert!(decide(facts("demo", "node-agent-x7z", &ambient), &none, &c).is_ambient());
    // ztunnel pods in the agent's namespace are decided by the rules.
    assert!(decide(facts("istio-system", "ztunnel-1", &ambient), &none, &c).is_ambient());
}

#[test]
fn exclusions_come_before_custom_selectors() {
    let mut c = cfg();
    c.selectors = selectors(json!([{}]));
    let none = BTreeMap::new();
    assert!(decide(facts("demo", "a", &none), &none, &c).is_ambient());
    let mut host = facts("demo", "a", &none);
    host.host_network = true;
    assert_eq!(
        decide(host, &none, &c),
        Decision::NotAmbient(Reason::HostNetwork)
    );
    let mut sidecar = facts("demo", "a", &none);
    sidecar.sidecar = true;
    assert_eq!(
        decide(sidecar, &none, &c),
        Decision::NotAmbient(Reason::Sidecar)
    );
    assert_eq!(
        decide(facts("kube-system", "a", &none), &none, &c),
        Decision::NotAmbient(Reason::ExcludedNamespace)
    );
    assert_eq!(
        decide(facts("istio-system", "node-agent-1", &none), &none, &c),
        Decision::NotAmbient(Reason::AgentPod)
    );
}

#[test]
fn reasons_say_which_rule_applied() {
    let none = BTreeMap::new();
    let ns = labels(&[("istio.io/dataplane-mode", "ambient")]);
    let d = decide(facts("demo", "a", &none), &ns, &cfg());
    assert_eq!(
        d,
        Decision::Ambient(Reason::Selector {
            index: 1,
            default: true
        })
    );
    assert!(
        d.reason().to_string().contains("namespace label"),
        "{}",
        d.reason()
    );
    let d = decide(facts("demo", "a", &ns), &none, &cfg());
    assert!(
        d.reason().to_string().contains("pod label"),
        "{}",
        d.reason()
    );
    let d = decide(facts("demo", "a", &none), &none, &cfg());
    assert!(d.reason().to_string().contains("neither"), "{}", d.reason());

    let mut c = cfg();
    c.selectors = selectors(json!([
        {"podSelector": {"matchLabels": {"a": "1"}}},
        {"podSelector": {"matchLabels": {"mesh": "on"}}}
    ]));
    let mesh = labels(&[("mesh", "on")]);
    let d = decide(facts("demo", "a", &mesh), &none, &c);
    assert_eq!(
        d,
        Decision::Ambient(Reason::Selector {
            index: 1,
            default: false
        })
    );
    assert!(d.reason().to_string().contains("enablement selector 1"));
    let d = decide(facts("demo", "a", &none), &none, &c);
    assert!(
        d.reason().to_string().contains("no enablement selector"),
        "{}",
        d.reason()
    );
}

#[test]
fn default_list_is_upstreams_and_empty_means_default() {
    let d = EnablementSelectors::default();
    assert!(d.is_default());
    assert_eq!(
        d.to_json(),
        json!([
            {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}},
             "namespaceSelector": {}},
            {"podSelector": {"matchExpressions": [
                {"key": "istio.io/dataplane-mode", "operator": "NotIn", "values": ["none"]}]},
             "namespaceSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}}
        ])
    );
    assert_eq!(EnablementSelectors::compile(Vec::new()).unwrap(), d);
    // The same list written out is recognised as the default.
    let again = EnablementSelectors::compile(serde_json::from_value(d.to_json()).unwrap()).unwrap();
    assert!(again.is_default());
    assert!(!selectors(json!([{}])).is_default());
}

#[test]
fn multiple_entries_any_one_matching_is_enough() {
    let s = selectors(json!([
        {"podSelector": {"matchLabels": {"mesh": "on"}}},
        {"namespaceSelector": {"matchLabels": {"team": "a"}},
         "podSelector": {"matchExpressions": [{"key": "opt-out", "operator": "DoesNotExist"}]}}
    ]));
    let none = BTreeMap::new();
    let team_a = labels(&[("team", "a")]);
    let mesh = labels(&[("mesh", "on")]);
    let opted_out = labels(&[("opt-out", "")]);
    assert_eq!(s.matching_entry(&mesh, &none), Some(0));
    assert_eq!(s.matching_entry(&none, &team_a), Some(1));
    assert_eq!(
        s.matching_entry(&mesh, &team_a),
        Some(0),
        "first match wins"
    );
    assert_eq!(s.matching_entry(&opted_out, &team_a), None);
    assert_eq!(s.matching_entry(&none, &none), None);
    // both selectors of one entry must match
    assert_eq!(s.matching_entry(&none, &labels(&[("team", "b")])), None);
}

#[test]
fn validation_errors_name_the_entry_and_key() {
    for (list, index, field, key, problem) in [
        (
            json!([{}, {"podSelector": {"matchExpressions": [{"key": "k", "operator": "Equals", "values": ["x"]}]}}]),
            1,
            "podSelector",
            "k",
            "unknown operator \"Equals\"",
        ),
        (
            json!([{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": []}]}}]),
            0,
            "namespaceSelector",
            "team",
            "needs at least one value",
        ),
        (
            json!([{}, {}, {"podSelector": {"matchExpressions": [{"key": "x", "operator": "NotIn"}]}}]),
            2,
            "podSelector",
            "x",
            "needs at least one value",
        ),
        (
            json!([{"podSelector": {"matchExpressions": [{"key": "mesh", "operator": "Exists", "values": ["on"]}]}}]),
            0,
            "podSelector",
            "mesh",
            "takes no values",
        ),
    ] {
        let source: Vec<EnablementSelector> = serde_json::from_value(list).unwrap();
        let e = EnablementSelectors::compile(source).unwrap_err();
        assert_eq!(
            (e.index, e.field, e.error.key.as_str()),
            (index, field, key),
            "{e}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!("enablement selector {index}")),
            "{text}"
        );
        assert!(text.contains(&format!("{key:?}")), "{text}");
        assert!(text.contains(problem), "{text}");
    }
    // A misspelt field is an error, not an empty (match-all) selector.
    assert!(
        serde_json::from_value::<Vec<EnablementSelector>>(json!([{"podselector": {}}])).is_err()
    );
}
