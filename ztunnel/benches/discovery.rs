//! Kubernetes discovery processing cost (no API server): the initial sync of a
//! cluster (watch events → facts index → one store batch → snapshot), then single
//! changes against that cluster (one pod update, one EndpointSlice update, one
//! policy update), each including the store's snapshot rebuild.
//!
//! `cargo bench -p ztunnel --bench discovery` (sizes: env `PODS`, default 10000).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use serde_json::json;
use ztunnel::policy::kube::{AuthorizationPolicy, ConvertOptions};
use ztunnel::state::Store;
use ztunnel::state::kube::convert::ConvertSettings;
use ztunnel::state::kube::index::DiscoveryIndex;

const PODS_PER_SERVICE: usize = 10;

fn pod(i: usize, ready: bool) -> Pod {
    let ns = format!("ns-{}", i / 100);
    let app = format!("app-{}", i / PODS_PER_SERVICE);
    serde_json::from_value(json!({
        "metadata": {"name": format!("{app}-7d9f8-{i}"), "namespace": ns,
            "labels": {"app": app, "pod-template-hash": "7d9f8", "version": "v1"},
            "annotations": {"ambient.istio.io/redirection": "enabled"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{app}-7d9f8"), "uid": "x", "controller": true}]},
        "spec": {"serviceAccountName": app, "nodeName": format!("node-{}", i % 100),
            "containers": [{"name": "c", "image": "nginx",
                "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip(i), "podIPs": [{"ip": ip(i)}],
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
    }))
    .unwrap()
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)
}

fn service(s: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("app-{s}"), "namespace": format!("ns-{}", s * PODS_PER_SERVICE / 100)},
        "spec": {"clusterIP": format!("10.96.{}.{}", s / 256, s % 256),
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    }))
    .unwrap()
}

fn slice(s: usize, skip: Option<usize>) -> EndpointSlice {
    let ns = format!("ns-{}", s * PODS_PER_SERVICE / 100);
    let endpoints: Vec<_> = (s * PODS_PER_SERVICE..(s + 1) * PODS_PER_SERVICE)
        .filter(|i| Some(*i) != skip)
        .map(|i| {
            json!({"addresses": [ip(i)], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "namespace": ns,
                    "name": format!("app-{s}-7d9f8-{i}")}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("app-{s}-abcde"), "namespace": ns,
            "labels": {"kubernetes.io/service-name": format!("app-{s}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints
    }))
    .unwrap()
}

fn policy(n: usize, port: u16) -> AuthorizationPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": format!("p-{n}"), "namespace": format!("ns-{n}")},
        "spec": {"selector": {"matchLabels": {"version": "v1"}}, "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": [port.to_string()]}}]}]}
    }))
    .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let pods: usize = std::env::var("PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let services = pods / PODS_PER_SERVICE;
    let namespaces = pods.div_ceil(100);
    let mut idx = DiscoveryIndex::new(
        ConvertSettings {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
        },
        ConvertOptions::default(),
    );
    let store = Store::new();
    let src = store.source("kubernetes");

    // Objects are built first: only their processing is timed.
    let all_pods: Vec<Pod> = (0..pods).map(|i| pod(i, true)).collect();
    let all_services: Vec<(Service, EndpointSlice)> = (0..services)
        .map(|s| (service(s), slice(s, None)))
        .collect();
    let all_policies: Vec<AuthorizationPolicy> = (0..namespaces).map(|n| policy(n, 9999)).collect();
    let t = Instant::now();
    for p in all_pods {
        idx.pod_event(Event::Apply(p));
    }
    for (svc, sl) in all_services {
        idx.service_event(Event::Apply(svc));
        idx.slice_event(Event::Apply(sl));
    }
    for p in all_policies {
        idx.policy_event(Event::Apply(p));
    }
    let events = t.elapsed();
    let t = Instant::now();
    let batch = idx.flush();
    let changes = batch.len();
    let flush = t.elapsed();
    let t = Instant::now();
    src.apply(batch);
    let apply = t.elapsed();
    println!(
        "initial sync: {pods} pods, {services} services+slices, {namespaces} policies: \
         events {events:?}, flush {flush:?} ({changes} changes), store apply {apply:?}"
    );

    let rounds = 20;
    let mut pod_update = Vec::new();
    let mut slice_update = Vec::new();
    let mut policy_update = Vec::new();
    for r in 0..rounds {
        let p = pod(r, r % 2 == 0);
        let t = Instant::now();
        idx.pod_event(Event::Apply(p));
        src.apply(idx.flush());
        pod_update.push(t.elapsed());

        let sl = slice(r, (r % 2 == 0).then_some(r * PODS_PER_SERVICE));
        let t = Instant::now();
        idx.slice_event(Event::Apply(sl));
        src.apply(idx.flush());
        slice_update.push(t.elapsed());

        let p = policy(r % namespaces, 9000 + r as u16);
        let t = Instant::now();
        idx.policy_event(Event::Apply(p));
        src.apply(idx.flush());
        policy_update.push(t.elapsed());
    }
    println!(
        "one change with {pods} pods in the store (median of {rounds}, incl. snapshot rebuild): \
         pod {:?}, endpointslice {:?}, selector policy (rebinds 100 pods) {:?}",
        median(pod_update),
        median(slice_update),
        median(policy_update)
    );
    assert_eq!(store.snapshot().workloads().count(), pods);
}
