//! Conversion tests: every field, scope, action and L7 fallback.
use super::*;
use crate::policy::evaluate::{Decision, Request};
use crate::policy::matching::PeerIdentity;
use crate::policy::set::PolicySet;

fn object(yaml: &str) -> AuthorizationPolicy {
    serde_yaml_ng::from_str(yaml).expect(yaml)
}

fn conv(yaml: &str) -> Converted {
    convert(&object(yaml), &ConvertOptions::default()).expect(yaml)
}

/// Expected model, written as a local-config policy.
fn model(yaml: &str) -> Authorization {
    serde_yaml_ng::from_str(yaml).expect(yaml)
}

fn assert_converts(name: &str, input: &str, want: &str, warnings: &[&str]) {
    let got = conv(input);
    assert_eq!(got.authorization, Some(model(want)), "{name}");
    assert_eq!(
        got.warnings.len(),
        warnings.len(),
        "{name}: warnings {:#?}",
        got.warnings
    );
    for (w, want) in got.warnings.iter().zip(warnings) {
        assert!(w.contains(want), "{name}: warning {w:?} lacks {want:?}");
    }
}

#[test]
fn scopes_and_actions() {
    let cases = [
        (
            "namespace ALLOW",
            "{metadata: {name: p, namespace: app}, spec: {action: ALLOW}}",
            "{name: p, namespace: app, scope: Namespace, action: Allow}",
        ),
        (
            "default action is ALLOW",
            "{metadata: {name: p, namespace: app}, spec: {}}",
            "{name: p, namespace: app, scope: Namespace, action: Allow}",
        ),
        (
            "no spec at all",
            "{metadata: {name: p, namespace: app}}",
            "{name: p, namespace: app, scope: Namespace, action: Allow}",
        ),
        (
            "root namespace → Global DENY",
            "{metadata: {name: p, namespace: istio-system}, spec: {action: DENY}}",
            "{name: p, namespace: istio-system, scope: Global, action: Deny}",
        ),
        (
            "selector → WorkloadSelector AUDIT",
            "{metadata: {name: p, namespace: app}, spec: {action: AUDIT, selector: {matchLabels: {app: a}}}}",
            "{name: p, namespace: app, scope: WorkloadSelector, action: Audit}",
        ),
        (
            "selector in the root namespace stays WorkloadSelector",
            "{metadata: {name: p, namespace: istio-system}, spec: {selector: {matchLabels: {app: a}}}}",
            "{name: p, namespace: istio-system, scope: WorkloadSelector, action: Allow}",
        ),
        (
            "dry-run annotation",
            "{metadata: {name: p, namespace: app, annotations: {istio.io/dry-run: 'true'}}, spec: {}}",
            "{name: p, namespace: app, scope: Namespace, action: Allow, dryRun: true}",
        ),
        (
            "dry-run annotation false",
            "{metadata: {name: p, namespace: app, annotations: {istio.io/dry-run: 'false'}}, spec: {}}",
            "{name: p, namespace: app, scope: Namespace, action: Allow}",
        ),
        (
            "null lists",
            "{metadata: {name: p, namespace: app}, spec: {rules: null, targetRefs: null}}",
            "{name: p, namespace: app, scope: Namespace, action: Allow}",
        ),
    ];
    for (name, input, want) in cases {
        assert_converts(name, input, want, &[]);
    }
    let root = ConvertOptions {
        root_namespace: "mesh-root".into(),
    };
    let c = convert(
        &object("{metadata: {name: p, namespace: mesh-root}}"),
        &root,
    )
    .unwrap();
    assert_eq!(c.authorization.unwrap().scope, Scope::Global);
    let c = convert(
        &object("{metadata: {name: p, namespace: istio-system}}"),
        &root,
    )
    .unwrap();
    assert_eq!(c.authorization.unwrap().scope, Scope::Namespace);
}

#[test]
fn not_converted() {
    let c = conv(
        "{metadata: {name: p, namespace: app}, spec: {action: CUSTOM, provider: {name: ext}}}",
    );
    assert_eq!(c.authorization, None);
    assert!(c.warnings[0].contains("CUSTOM"), "{:?}", c.warnings);
    let c = conv("{metadata: {name: p, namespace: app}, spec: {action: BOGUS}}");
    assert_eq!(c.authorization, None);
    assert!(c.warnings[0].contains("unknown action"), "{:?}", c.warnings);
    for waypoint in [
        "{metadata: {name: p, namespace: app}, spec: {targetRefs: [{kind: Service, group: '', name: s}]}}",
        "{metadata: {name: p, namespace: app}, spec: {targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: w}}}",
    ] {
        let c = conv(waypoint);
        assert_eq!(c.authorization, None, "{waypoint}");
        assert!(
            c.warnings.len() == 1 && c.warnings[0].contains("waypoint"),
            "not silently dropped: {waypoint} {:?}",
            c.warnings
        );
    }
    let err = convert(
        &object("{metadata: {namespace: app}}"),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("metadata.name"), "{err}");
    let err = convert(&object("{metadata: {name: p}}"), &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("\"p\""), "{err}");
}

#[test]
fn every_l4_field() {
    assert_converts(
        "all L4 fields",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: app}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/x/sa/a", "*/sa/admin", "cluster.local/ns/y/*", "*"]
        notPrincipals: ["cluster.local/ns/x/sa/evil"]
        namespaces: ["x", "team-*"]
        notNamespaces: ["*-test"]
        serviceAccounts: ["client", "other/admin"]
        notServiceAccounts: ["bad"]
        ipBlocks: ["10.0.0.0/8", "192.168.1.1"]
        notIpBlocks: ["10.9.0.0/16"]
    - source:
        namespaces: ["z"]
    to:
    - operation:
        ports: ["80", "8080"]
        notPorts: ["9999"]
    when:
    - key: source.ip
      values: ["172.16.0.0/12"]
      notValues: ["172.16.0.1"]
    - key: source.namespace
      values: ["x"]
    - key: source.principal
      notValues: ["*/sa/evil"]
    - key: destination.ip
      values: ["10.0.1.1"]
    - key: destination.port
      values: ["80"]
      notValues: ["81"]
  - {}
status: {}
"#,
        r#"
name: p
namespace: app
scope: Namespace
action: Allow
rules:
- - - destinationPorts: [80, 8080]
      notDestinationPorts: [9999]
  - - principals:
      - !Exact cluster.local/ns/x/sa/a
      - !Suffix /sa/admin
      - !Prefix cluster.local/ns/y/
      - !Presence
      notPrincipals: [!Exact cluster.local/ns/x/sa/evil]
      namespaces: [!Exact x, !Prefix team-]
      notNamespaces: [!Suffix -test]
      serviceAccounts: [{namespace: app, serviceAccount: client}, {namespace: other, serviceAccount: admin}]
      notServiceAccounts: [{namespace: app, serviceAccount: bad}]
      sourceIps: [10.0.0.0/8, 192.168.1.1/32]
      notSourceIps: [10.9.0.0/16]
    - namespaces: [!Exact z]
  - - sourceIps: [172.16.0.0/12]
      notSourceIps: [172.16.0.1/32]
  - - namespaces: [!Exact x]
  - - notPrincipals: [!Suffix /sa/evil]
  - - destinationIps: [10.0.1.1/32]
  - - destinationPorts: [80]
      notDestinationPorts: [81]
- []
"#,
        &[],
    );
}

#[test]
fn l7_fields_in_allow_omit_the_rule() {
    let l7_rules = [
        (
            "to: [{operation: {methods: [GET]}}]",
            "to[0].operation.methods",
        ),
        (
            "to: [{operation: {ports: ['80'], paths: [/x]}}]",
            "to[0].operation.paths",
        ),
        ("to: [{operation: {hosts: [a.com]}}]", "hosts"),
        ("to: [{operation: {notHosts: [a.com]}}]", "notHosts"),
        ("to: [{operation: {notMethods: [GET]}}]", "notMethods"),
        ("to: [{operation: {notPaths: [/x]}}]", "notPaths"),
        (
            "from: [{source: {requestPrincipals: ['*']}}]",
            "from[0].source.requestPrincipals",
        ),
        (
            "from: [{source: {notRequestPrincipals: ['*']}}]",
            "notRequestPrincipals",
        ),
        (
            "from: [{source: {namespaces: [x], remoteIpBlocks: [1.2.3.4]}}]",
            "remoteIpBlocks",
        ),
        (
            "from: [{source: {notRemoteIpBlocks: [1.2.3.4]}}]",
            "notRemoteIpBlocks",
        ),
        (
            "when: [{key: 'request.headers[x]', values: [y]}]",
            "request.headers[x]",
        ),
        ("when: [{key: remote.ip, values: [1.2.3.4]}]", "remote.ip"),
        (
            "from: [{source: {namespaces: [x], futureField: [y]}}]",
            "futureField",
        ),
        (
            "to: [{operation: {ports: [http]}}]",
            "invalid port \"http\"",
        ),
        ("to: [{operation: {ports: ['0']}}]", "invalid port"),
        (
            "from: [{source: {ipBlocks: [10.0.0.0/33]}}]",
            "invalid IP block",
        ),
        (
            "when: [{key: destination.port, values: ['99999']}]",
            "invalid port",
        ),
        ("when: [{key: source.ip}]", "(empty)"),
        ("from: [{source: {}}]", "from[0].source (empty)"),
        ("from: [{}]", "from[0].source (missing)"),
        ("to: [{operation: {}}]", "to[0].operation (empty)"),
    ];
    for (rule, warning) in l7_rules {
        let input = format!(
            "{{metadata: {{name: p, namespace: app}}, spec: {{action: ALLOW, rules: [{{{rule}}}, {{from: [{{source: {{namespaces: [ok]}}}}]}}]}}}}"
        );
        assert_converts(
            rule,
            &input,
            "{name: p, namespace: app, scope: Namespace, action: Allow, rules: [[[{namespaces: [!Exact ok]}]]]}",
            &[warning],
        );
        let w = &conv(&input).warnings[0];
        assert!(w.starts_with("rules[0]: ") && w.contains("omitted"), "{w}");
    }
}

#[test]
fn l7_fields_in_deny_are_dropped() {
    let cases = [
        (
            "L4 and L7 in one rule: keep the L4 part",
            "{from: [{source: {namespaces: [x]}}], to: [{operation: {methods: [GET]}}]}",
            "[[[{namespaces: [!Exact x]}]]]",
            "to[0].operation.methods",
        ),
        (
            "L7-only rule denies everything",
            "{to: [{operation: {methods: [GET]}}]}",
            "[[]]",
            "methods",
        ),
        (
            "field with L7 and L4 attributes keeps the L4 ones",
            "{to: [{operation: {ports: ['80'], paths: [/admin]}}]}",
            "[[[{destinationPorts: [80]}]]]",
            "paths",
        ),
        (
            "one unconstrained source makes the from clause match all",
            "{from: [{source: {requestPrincipals: ['*']}}, {source: {namespaces: [a]}}], to: [{operation: {ports: ['22']}}]}",
            "[[[{destinationPorts: [22]}]]]",
            "requestPrincipals",
        ),
        (
            "non-L4 when key is dropped",
            "{from: [{source: {namespaces: [x]}}], when: [{key: 'request.auth.claims[iss]', values: [a]}]}",
            "[[[{namespaces: [!Exact x]}]]]",
            "request.auth.claims[iss]",
        ),
        (
            "invalid port drops only that field",
            "{to: [{operation: {ports: [http]}}], from: [{source: {namespaces: [x]}}]}",
            "[[[{namespaces: [!Exact x]}]]]",
            "invalid port",
        ),
        (
            "invalid notIpBlocks value drops the field (matches more)",
            "{from: [{source: {namespaces: [x], notIpBlocks: [nope]}}]}",
            "[[[{namespaces: [!Exact x]}]]]",
            "invalid IP block",
        ),
    ];
    for (name, rule, want_rules, warning) in cases {
        let input = format!(
            "{{metadata: {{name: p, namespace: app}}, spec: {{action: DENY, rules: [{rule}]}}}}"
        );
        let want = format!(
            "{{name: p, namespace: app, scope: Namespace, action: Deny, rules: {want_rules}}}"
        );
        assert_converts(name, &input, &want, &[warning]);
        assert!(
            conv(&input).warnings[0].contains("enforced without"),
            "{name}"
        );
    }
}

#[test]
fn notes_for_odd_patterns() {
    let c = conv(
        "{metadata: {name: p, namespace: app}, spec: {rules: [{from: [{source: {principals: ['*/ns/foo/sa/*', 'spiffe://td/ns/a/sa/b']}}]}]}}",
    );
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    for want in ["single leading or trailing", "without `spiffe://`"] {
        assert!(
            c.warnings.iter().any(|w| w.contains(want)),
            "{:?} lacks {want}",
            c.warnings
        );
    }
    // Still converted (literal, as Istio does).
    let rules = &c.authorization.unwrap().rules;
    assert_eq!(
        rules[0][0][0].principals[0],
        StringMatch::Suffix("/ns/foo/sa/*".into())
    );
}

#[test]
fn selector_binding() {
    let opts = ConvertOptions::default();
    let labels: BTreeMap<String, String> = [("app", "web"), ("version", "v1")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let cases = [
        (
            "{metadata: {name: p, namespace: app}, spec: {selector: {matchLabels: {app: web}}}}",
            "app",
            true,
        ),
        (
            "{metadata: {name: p, namespace: app}, spec: {selector: {matchLabels: {app: web, version: v1}}}}",
            "app",
            true,
        ),
        (
            "{metadata: {name: p, namespace: app}, spec: {selector: {matchLabels: {app: web, version: v2}}}}",
            "app",
            false,
        ),
        (
            "{metadata: {name: p, namespace: app}, spec: {selector: {matchLabels: {tier: x}}}}",
            "app",
            false,
        ),
        (
            "{metadata: {name: p, namespace: app}, spec: {selector: {matchLabels: {}}}}",
            "app",
            true,
        ),
        (
            "{metadata: {name: p, namespace: other}, spec: {selector: {matchLabels: {app: web}}}}",
            "app",
            false,
        ),
        (
            "{metadata: {name: p, namespace: istio-system}, spec: {selector: {matchLabels: {app: web}}}}",
            "app",
            true,
        ),
        (
            "{metadata: {name: p, namespace: app}, spec: {}}",
            "app",
            false,
        ),
        (
            "{metadata: {name: p, namespace: app}, spec: {selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: s}]}}",
            "app",
            false,
        ),
    ];
    for (input, ns, want) in cases {
        assert_eq!(
            selector_matches(&object(input), &opts, ns, &labels),
            want,
            "{input}"
        );
    }
}

#[test]
fn resource_metadata() {
    use ::kube::Resource;
    assert_eq!(
        AuthorizationPolicy::api_version(&()),
        "security.istio.io/v1"
    );
    assert_eq!(
        AuthorizationPolicy::url_path(&(), Some("app")),
        "/apis/security.istio.io/v1/namespaces/app/authorizationpolicies"
    );
}

/// Converted policies evaluated end to end: the L7 fallbacks fail closed.
#[test]
fn converted_policies_fail_closed() {
    let policies: Vec<Authorization> = [
            // ALLOW only GET from x: the rule is omitted, so nothing is allowed.
            "{metadata: {name: allow-get, namespace: app}, spec: {rules: [{from: [{source: {namespaces: [x]}}], to: [{operation: {methods: [GET]}}]}]}}",
            // DENY POST from y: enforced as DENY everything from y.
            "{metadata: {name: deny-post, namespace: other}, spec: {action: DENY, rules: [{from: [{source: {namespaces: [y]}}], to: [{operation: {methods: [POST]}}]}]}}",
        ]
        .iter()
        .map(|y| conv(y).authorization.unwrap())
        .collect();
    let set = PolicySet::new(policies);
    let eval = |ns: &str, id: &str| {
        set.evaluate(&Request::<String> {
            dst_workload_namespace: ns,
            dst_workload_policy_refs: &[],
            src_identity: PeerIdentity::from_spiffe(id),
            src_ip: Some("10.0.0.1".parse().unwrap()),
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: 80,
        })
    };
    assert_eq!(
        eval("app", "spiffe://td/ns/x/sa/a").policy(),
        Some("app/allow-get")
    );
    assert_eq!(
        eval("other", "spiffe://td/ns/y/sa/a").policy(),
        Some("other/deny-post")
    );
    assert_eq!(eval("other", "spiffe://td/ns/x/sa/a"), Decision::Allow);
}
