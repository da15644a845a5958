//! The API double through the kubectl binary installed on the machine.

use super::*;

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
