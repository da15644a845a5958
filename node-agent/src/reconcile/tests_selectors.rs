//! Enrolment follows custom enablement selectors (`AMBIENT_ENABLEMENT_SELECTOR`)
//! through the same paths as the default labels: pod and namespace label
//! changes, and the CNI ADD.

use mesh_proto::cni_event::Enrolment;
use serde_json::json;

use super::tests::{Harness, add_event, ns, running, started};
use crate::cluster::NamespaceInfo;
use crate::cluster::enablement::{DATAPLANE_MODE_LABEL, EnablementSelectors};

fn selectors(v: serde_json::Value) -> EnablementSelectors {
    EnablementSelectors::compile(serde_json::from_value(v).unwrap()).unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// `mesh=on` on the pod, in any namespace: the pod the default rule would
/// enrol (istio.io/dataplane-mode=ambient) is not, the `mesh=on` one is, and
/// pod label changes enrol and unenrol.
#[tokio::test]
async fn pod_label_selector_in_any_namespace() {
    let mut mesh = running("u1", "plain", "a", "10.0.0.1");
    mesh.set_label("mesh", Some("on"));
    let mut istio_label = running("u2", "plain", "b", "10.0.0.2");
    istio_label.set_label(DATAPLANE_MODE_LABEL, Some("ambient"));
    let h = Harness::with_selectors(
        vec![mesh, istio_label.clone()],
        vec![ns("plain", None)],
        selectors(json!([{"podSelector": {"matchLabels": {"mesh": "on"}}}])),
    );
    let _w = started(&h).await;
    h.settle().await;
    assert_eq!(h.r.enrolled_uids(), vec!["u1"]);
    assert_eq!(h.api.annotation_of("plain/a"), Some(Some("enabled".into())));
    assert_eq!(h.api.annotation_of("plain/b"), None);

    // The label goes (the watch event carries the agent's annotation):
    // unenrolled.
    let mut mesh = h.cache.pod("u1").unwrap();
    mesh.set_label("mesh", None);
    h.apply_pod(mesh);
    h.settle().await;
    assert!(h.r.enrolled_uids().is_empty());
    assert_eq!(h.redir.calls("unenrol"), vec!["u1"]);
    assert_eq!(h.api.annotation_of("plain/a"), Some(None));

    // Another pod gets it: enrolled.
    istio_label.set_label("mesh", Some("on"));
    h.apply_pod(istio_label);
    h.settle().await;
    assert_eq!(h.r.enrolled_uids(), vec!["u2"]);
}

/// Namespace label `team=a`, pods not opted out with `mesh=off`: namespace
/// label changes enrol and unenrol its pods, including a change of a label
/// the default rule never looks at.
#[tokio::test]
async fn namespace_label_selector_follows_label_changes() {
    let mut opted_out = running("u3", "apps", "c", "10.0.0.3");
    opted_out.set_label("mesh", Some("off"));
    let h = Harness::with_selectors(
        vec![
            running("u1", "apps", "a", "10.0.0.1"),
            running("u2", "apps", "b", "10.0.0.2"),
            opted_out,
            running("u4", "other", "d", "10.0.0.4"),
        ],
        vec![
            // The default rule would enrol u1 and u2 here.
            ns("apps", Some("ambient")),
            ns("other", None),
        ],
        selectors(json!([{
            "namespaceSelector": {"matchLabels": {"team": "a"}},
            "podSelector": {"matchExpressions": [
                {"key": "mesh", "operator": "NotIn", "values": ["off"]}
            ]}
        }])),
    );
    let _w = started(&h).await;
    h.settle().await;
    assert!(h.redir.calls("enrol").is_empty());

    h.apply_ns(NamespaceInfo::new("apps", &[("team", "a")]));
    h.settle().await;
    assert_eq!(sorted(h.redir.calls("enrol")), vec!["u1", "u2"]);
    assert_eq!(h.r.enrolled_uids(), vec!["u1", "u2"]);
    assert_eq!(h.api.annotation_of("apps/c"), None, "opted out");

    // An unrelated label added: nothing changes.
    h.apply_ns(NamespaceInfo::new("apps", &[("team", "a"), ("x", "y")]));
    h.settle().await;
    assert_eq!(h.redir.calls("enrol").len(), 2);
    assert!(h.redir.calls("unenrol").is_empty());

    // team=a → team=b: unenrolled.
    h.apply_ns(NamespaceInfo::new("apps", &[("team", "b"), ("x", "y")]));
    h.settle().await;
    assert_eq!(sorted(h.redir.calls("unenrol")), vec!["u1", "u2"]);
    assert!(h.r.enrolled_uids().is_empty());
    assert_eq!(h.api.annotation_of("apps/a"), Some(None));

    // Another namespace joins.
    h.apply_ns(NamespaceInfo::new("other", &[("team", "a")]));
    h.settle().await;
    assert_eq!(h.r.enrolled_uids(), vec!["u4"]);
}

/// The CNI ADD decides with the same selectors.
#[tokio::test]
async fn cni_add_follows_custom_selectors() {
    let mut new = running("u9", "plain", "new", "10.0.0.9");
    new.ips.clear();
    new.set_label("mesh", Some("on"));
    let mut default_labelled = running("u8", "plain", "old-style", "10.0.0.8");
    default_labelled.ips.clear();
    default_labelled.set_label(DATAPLANE_MODE_LABEL, Some("ambient"));
    let h = Harness::with_selectors(
        vec![new, default_labelled],
        vec![ns("plain", None)],
        selectors(json!([{"podSelector": {"matchLabels": {"mesh": "on"}}}])),
    );
    let _w = started(&h).await;
    let reply =
        h.r.cni_add(add_event("plain", "new", Some("u9")))
            .await
            .unwrap();
    assert_eq!(reply.enrolment, Enrolment::Enrolled);
    assert_eq!(
        h.api.annotation_of("plain/new"),
        Some(Some("enabled".into()))
    );
    let reply =
        h.r.cni_add(add_event("plain", "old-style", Some("u8")))
            .await
            .unwrap();
    assert_eq!(reply.enrolment, Enrolment::NotAmbient);
    assert!(
        reply.reason.contains("no enablement selector"),
        "{}",
        reply.reason
    );
}
