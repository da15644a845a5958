//! The client's bookkeeping without a server: responses → store changes, versions kept
//! for the reconnect, removals mapped back to what they named, NACK reasons; node and
//! headers from the configuration.

use mesh_proto::workload as wl;
use mesh_proto::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, DeltaDiscoveryResponse, Resource};
use prost::Message;

use super::XdsOptions;
use super::client::Tracked;
use super::convert::ConvertDefaults;
use crate::state::Store;

fn any(type_url: &str, bytes: Vec<u8>) -> Option<prost_types::Any> {
    Some(prost_types::Any {
        type_url: type_url.into(),
        value: bytes,
    })
}

fn workload(uid: &str, ip: [u8; 4]) -> Resource {
    let a = wl::Address {
        r#type: Some(wl::address::Type::Workload(wl::Workload {
            uid: uid.into(),
            name: "web-1".into(),
            namespace: "app".into(),
            addresses: vec![ip.to_vec()],
            service_account: "web".into(),
            tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
            ..Default::default()
        })),
    };
    Resource {
        name: uid.into(),
        version: "1".into(),
        resource: any(ADDRESS_TYPE, a.encode_to_vec()),
        ..Default::default()
    }
}

fn service(ns: &str, host: &str, vip: [u8; 4]) -> Resource {
    let a = wl::Address {
        r#type: Some(wl::address::Type::Service(wl::Service {
            name: "web".into(),
            namespace: ns.into(),
            hostname: host.into(),
            addresses: vec![wl::NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
                length: None,
            }],
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        })),
    };
    Resource {
        name: format!("{ns}/{host}"),
        version: "7".into(),
        resource: any(ADDRESS_TYPE, a.encode_to_vec()),
        ..Default::default()
    }
}

fn response(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: "n".into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn responses_become_store_changes_and_removals_find_their_kind() {
    let store = Store::new();
    let src = store.source(super::SOURCE_NAME);
    let mut t = Tracked::default();
    let d = ConvertDefaults::default();
    let uid = "Kubernetes//v1/Pod/app/web-1";
    let applied = t.response(
        &response(
            ADDRESS_TYPE,
            vec![
                workload(uid, [10, 0, 0, 1]),
                service("app", "web.app.svc.cluster.local", [10, 96, 0, 1]),
            ],
            &[],
        ),
        &d,
    );
    assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
    src.apply(applied.batch);
    let snap = store.snapshot();
    let w = snap
        .workload_by_ip("", "10.0.0.1".parse().unwrap())
        .unwrap();
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/app/sa/web"
    );
    let svc = snap
        .service_by_vip("", "10.96.0.1".parse().unwrap())
        .unwrap()
        .clone();
    assert_eq!(svc.hostname, "web.app.svc.cluster.local");

    let policy = mesh_proto::security::Authorization {
        name: "deny-all".into(),
        namespace: "app".into(),
        scope: mesh_proto::security::Scope::Namespace as i32,
        action: mesh_proto::security::Action::Deny as i32,
        rules: vec![mesh_proto::security::Rule::default()],
        dry_run: false,
    };
    let applied = t.response(
        &response(
            AUTHORIZATION_TYPE,
            vec![Resource {
                name: "app/deny-all".into(),
                version: "3".into(),
                resource: any(AUTHORIZATION_TYPE, policy.encode_to_vec()),
                ..Default::default()
            }],
            &[],
        ),
        &d,
    );
    assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
    src.apply(applied.batch);
    assert_eq!(store.snapshot().policies().len(), 1);

    // Removals: a service name removes the service, a uid the workload, a policy name
    // the policy.
    let applied = t.response(
        &response(
            ADDRESS_TYPE,
            vec![],
            &["app/web.app.svc.cluster.local", uid],
        ),
        &d,
    );
    assert_eq!(applied.batch.remove_services.len(), 1);
    assert_eq!(applied.batch.remove_workloads, [uid]);
    src.apply(applied.batch);
    let applied = t.response(&response(AUTHORIZATION_TYPE, vec![], &["app/deny-all"]), &d);
    src.apply(applied.batch);
    let snap = store.snapshot();
    assert!(snap.workloads().next().is_none());
    assert!(snap.services().next().is_none());
    assert!(snap.policies().is_empty());
}

#[test]
fn bad_resources_are_named_and_do_not_hold_back_good_ones() {
    let mut t = Tracked::default();
    let d = ConvertDefaults::default();
    let mut bad = workload("bad", [10, 0, 0, 2]);
    bad.resource = any(ADDRESS_TYPE, vec![0xff, 0xff, 0xff]);
    let mut short = workload("Kubernetes//v1/Pod/app/short", [10, 0, 0, 3]);
    short.resource = any(
        ADDRESS_TYPE,
        wl::Address {
            r#type: Some(wl::address::Type::Workload(wl::Workload {
                uid: "Kubernetes//v1/Pod/app/short".into(),
                addresses: vec![vec![10, 0, 0]],
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    );
    let applied = t.response(
        &response(
            ADDRESS_TYPE,
            vec![
                bad,
                workload("Kubernetes//v1/Pod/app/ok", [10, 0, 0, 4]),
                short,
            ],
            &[],
        ),
        &d,
    );
    assert_eq!(applied.batch.upsert_workloads.len(), 1);
    assert_eq!(applied.rejected.len(), 2, "{:?}", applied.rejected);
    assert!(
        applied.rejected[0].starts_with("bad: "),
        "{:?}",
        applied.rejected
    );
    assert!(
        applied.rejected[1].contains("Kubernetes//v1/Pod/app/short")
            && applied.rejected[1].contains("3 bytes"),
        "{:?}",
        applied.rejected
    );
    let unknown = t.response(&response("type.googleapis.com/other", vec![], &[]), &d);
    assert!(unknown.rejected[0].contains("unknown type URL"));
}

#[test]
fn only_accepted_versions_are_offered_on_reconnect() {
    let mut t = Tracked::default();
    let d = ConvertDefaults::default();
    let mut bad = workload("Kubernetes//v1/Pod/app/bad", [10, 0, 0, 2]);
    bad.resource = any(ADDRESS_TYPE, vec![0xff]);
    t.response(
        &response(
            ADDRESS_TYPE,
            vec![workload("Kubernetes//v1/Pod/app/a", [10, 0, 0, 1]), bad],
            &[],
        ),
        &d,
    );
    let v = t.initial_versions(ADDRESS_TYPE);
    assert_eq!(v.len(), 1);
    assert_eq!(
        v.get("Kubernetes//v1/Pod/app/a").map(String::as_str),
        Some("1")
    );
    t.response(
        &response(ADDRESS_TYPE, vec![], &["Kubernetes//v1/Pod/app/a"]),
        &d,
    );
    assert!(t.initial_versions(ADDRESS_TYPE).is_empty());
}

#[test]
fn node_and_headers_from_the_configuration() {
    let cfg = crate::config::Config::from_lookup(|k| {
        match k {
            "POD_NAME" => Some("ztunnel-abc"),
            "POD_NAMESPACE" => Some("istio-system"),
            "INSTANCE_IP" => Some("10.0.0.9"),
            "NODE_NAME" => Some("node-1"),
            "XDS_ADDRESS" => Some("istiod.istio-system.svc:15012"),
            _ => None,
        }
        .map(String::from)
    })
    .unwrap();
    let env = [
        ("XDS_HEADER_X_TENANT", "blue"),
        ("ISTIO_META_CLUSTER_ID", "east"),
        ("ISTIO_METAJSON_LABELS", r#"{"app": "ztunnel", "n": 2}"#),
        ("ISTIO_METAJSON_BROKEN", "{not json"),
        ("PATH", "/bin"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let o = XdsOptions::from_config(&cfg, "istiod.istio-system.svc:15012", env);
    assert_eq!(
        o.node.id,
        "ztunnel~10.0.0.9~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    );
    let md = o.node.metadata.unwrap().fields;
    let get = |k: &str| match md.get(k).and_then(|v| v.kind.clone()) {
        Some(prost_types::value::Kind::StringValue(s)) => s,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(get("NAME"), "ztunnel-abc");
    assert_eq!(get("NAMESPACE"), "istio-system");
    assert_eq!(get("INSTANCE_IPS"), "10.0.0.9");
    assert_eq!(get("NODE_NAME"), "node-1");
    assert_eq!(get("CLUSTER_ID"), "east");
    assert!(!md.contains_key("PATH"));
    assert!(!md.contains_key("BROKEN"), "invalid JSON is left out");
    match md.get("LABELS").and_then(|v| v.kind.clone()) {
        Some(prost_types::value::Kind::StructValue(st)) => {
            assert_eq!(
                st.fields["app"].kind,
                Some(prost_types::value::Kind::StringValue("ztunnel".into()))
            );
            assert_eq!(
                st.fields["n"].kind,
                Some(prost_types::value::Kind::NumberValue(2.0))
            );
        }
        other => panic!("LABELS: {other:?}"),
    }
    assert_eq!(o.headers, [("x-tenant".to_string(), "blue".to_string())]);
    assert!(super::client::parse_address("http://istiod:15012").is_err());
    assert!(super::client::parse_address("istiod:15012").is_ok());
}

#[test]
fn stream_ends_are_classified_as_upstream() {
    use super::XdsError;
    use super::client::termination;
    use super::metrics::Termination;
    let stream = |code, message: &str| {
        Err(XdsError::Stream {
            address: "a".into(),
            code,
            message: message.into(),
        })
    };
    assert_eq!(termination(&Ok(())), Termination::Complete);
    assert_eq!(
        termination(&stream(tonic::Code::Unavailable, "transport is closing")),
        Termination::Reconnect
    );
    assert_eq!(
        termination(&stream(tonic::Code::Cancelled, "")),
        Termination::Reconnect
    );
    assert_eq!(
        termination(&stream(tonic::Code::Unauthenticated, "bad token")),
        Termination::Error
    );
    assert_eq!(
        termination(&Err(XdsError::Connect {
            address: "a".into(),
            reason: "refused".into()
        })),
        Termination::ConnectionError
    );
}

#[test]
fn on_demand_initial_requests_subscribe_to_nothing_then_to_what_was_asked() {
    use super::client::initial_requests;
    use super::demand::Demanded;
    use crate::state::on_demand::Demand;
    let node = mesh_proto::xds::Node {
        id: "ztunnel~10.0.0.9~zt.istio-system~istio-system.svc.cluster.local".into(),
        ..Default::default()
    };
    let mut tracked = Tracked::default();
    let defaults = ConvertDefaults {
        trust_domain: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
    };
    tracked.response(
        &DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            resources: vec![workload("uid-1", [10, 0, 0, 1])],
            ..Default::default()
        },
        &defaults,
    );

    // Wildcard mode: one request per type, no names.
    let reqs = initial_requests(&node, &tracked, None);
    assert_eq!(reqs.len(), 2);
    assert!(reqs.iter().all(|r| r.resource_names_subscribe.is_empty()));
    assert_eq!(reqs[0].initial_resource_versions["uid-1"], "1");

    // On-demand, nothing asked yet: addresses "*" subscribed and unsubscribed at once
    // (upstream's "nothing"), authorizations still wildcard.
    let mut demanded = Demanded::default();
    let reqs = initial_requests(&node, &tracked, Some(&demanded));
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].type_url, ADDRESS_TYPE);
    assert_eq!(reqs[0].resource_names_subscribe, ["*"]);
    assert_eq!(reqs[0].resource_names_unsubscribe, ["*"]);
    assert_eq!(reqs[0].initial_resource_versions["uid-1"], "1");
    assert_eq!(reqs[1].type_url, AUTHORIZATION_TYPE);
    assert!(reqs[1].resource_names_subscribe.is_empty());

    // After a reconnect, what was asked for (and resolved) is asked for again.
    let (answered, _rx) = tokio::sync::oneshot::channel();
    demanded.add(Demand {
        key: "/10.0.0.1".into(),
        answered,
    });
    let reqs = initial_requests(&node, &tracked, Some(&demanded));
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[1].type_url, ADDRESS_TYPE);
    assert_eq!(reqs[1].resource_names_subscribe, ["/10.0.0.1"]);
    assert_eq!(reqs[2].type_url, AUTHORIZATION_TYPE);
}
