//! Route selection tests for [`super::resolve`].

use super::*;
use crate::state::Store;

fn store() -> Store {
    let yaml = r#"
workloads:
- uid: a
  name: a
  namespace: ns
  serviceAccount: sa-a
  trustDomain: cluster.local
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  services: {"ns/svc.ns.svc.cluster.local": {80: 8080}}
- uid: plain
  name: plain
  namespace: ns
  trustDomain: cluster.local
  workloadIps: ["10.0.0.3"]
  protocol: TCP
  services: {"ns/plain.ns.svc.cluster.local": {}}
- uid: waypoint
  name: waypoint
  namespace: ns
  serviceAccount: waypoint
  workloadIps: ["10.0.0.50"]
  protocol: HBONE
  services: {"ns/waypoint.ns.svc.cluster.local": {}}
- uid: behind
  name: behind
  namespace: ns
  serviceAccount: behind
  workloadIps: ["10.0.0.4"]
  protocol: HBONE
  waypoint: {destination: "/10.0.0.50", hboneMtlsPort: 15008}
  services: {"ns/wsvc.ns.svc.cluster.local": {80: 8080}}
services:
- name: svc
  namespace: ns
  hostname: svc.ns.svc.cluster.local
  vips: ["/10.96.0.1"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/other"]
- name: plain
  namespace: ns
  hostname: plain.ns.svc.cluster.local
  vips: ["/10.96.0.3"]
  ports: {81: 9091}
- name: empty
  namespace: ns
  hostname: empty.ns.svc.cluster.local
  vips: ["/10.96.0.9"]
  ports: {80: 80}
- name: waypoint
  namespace: ns
  hostname: waypoint.ns.svc.cluster.local
  vips: ["/10.96.0.50"]
  ports: {15008: 15008}
- name: wsvc
  namespace: ns
  hostname: wsvc.ns.svc.cluster.local
  vips: ["/10.96.0.4"]
  ports: {80: 8080}
  waypoint: {destination: {namespace: ns, hostname: waypoint.ns.svc.cluster.local}, hboneMtlsPort: 15008}
- name: lost
  namespace: ns
  hostname: lost.ns.svc.cluster.local
  vips: ["/10.96.0.5"]
  ports: {80: 8080}
  waypoint: {destination: "/10.0.0.99", hboneMtlsPort: 15008}
"#;
    crate::state::file::test_store(yaml)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn routes() {
    let snap = store().snapshot();
    let src = snap.workload_by_uid("a").cloned();
    let r = |dst: &str| resolve(&snap, src.as_deref(), "", addr(dst), 15008);
    match r("10.96.0.1:80") {
        Route::Hbone {
            target,
            hbone_addr,
            expected,
            service,
            waypoint,
            ..
        } => {
            assert_eq!(target, addr("10.0.0.1:8080"));
            assert_eq!(hbone_addr, addr("10.0.0.1:15008"));
            let ids: Vec<String> = expected.iter().map(|i| i.to_string()).collect();
            assert_eq!(
                ids,
                [
                    "spiffe://cluster.local/ns/ns/sa/sa-a",
                    "spiffe://cluster.local/ns/ns/sa/other"
                ]
            );
            assert!(service.is_some());
            assert!(!waypoint);
        }
        r => panic!("{r:?}"),
    }
    match r("10.0.0.1:9000") {
        Route::Hbone { target, .. } => assert_eq!(target, addr("10.0.0.1:9000")),
        r => panic!("{r:?}"),
    }
    match r("10.96.0.3:81") {
        Route::Plain {
            target, workload, ..
        } => {
            assert_eq!(target, addr("10.0.0.3:9091"));
            assert!(workload.is_some());
        }
        r => panic!("{r:?}"),
    }
    match r("8.8.8.8:53") {
        Route::Plain {
            target, workload, ..
        } => {
            assert_eq!(target, addr("8.8.8.8:53"));
            assert!(workload.is_none());
        }
        r => panic!("{r:?}"),
    }
    match r("10.96.0.9:80") {
        Route::Unroutable { service, reason } => {
            assert!(service.is_some());
            assert!(reason.contains("ns/empty.ns.svc.cluster.local"), "{reason}");
        }
        r => panic!("{r:?}"),
    }
    // A port the service does not define goes nowhere (kube-proxy drops it too).
    match r("10.96.0.3:9999") {
        Route::Unroutable { service, reason } => {
            assert!(service.is_some());
            assert!(reason.contains("has no port 9999"), "{reason}");
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn waypoints() {
    let snap = store().snapshot();
    let a = snap.workload_by_uid("a").cloned();
    let wp = snap.workload_by_uid("waypoint").cloned();
    // Service with a waypoint: to the waypoint, authority = VIP:port, the waypoint's
    // identity expected, the intended service kept for telemetry.
    match resolve(&snap, a.as_deref(), "", addr("10.96.0.4:80"), 15008) {
        Route::Hbone {
            workload,
            target,
            hbone_addr,
            expected,
            service,
            waypoint,
        } => {
            assert!(waypoint);
            assert_eq!(workload.uid, "waypoint");
            assert_eq!(target, addr("10.96.0.4:80"));
            assert_eq!(hbone_addr, addr("10.0.0.50:15008"));
            let ids: Vec<String> = expected.iter().map(|i| i.to_string()).collect();
            assert_eq!(ids, ["spiffe://cluster.local/ns/ns/sa/waypoint"]);
            assert_eq!(service.unwrap().name, "wsvc");
        }
        r => panic!("{r:?}"),
    }
    // Workload with a waypoint, addressed directly: to the waypoint, authority = pod.
    match resolve(&snap, a.as_deref(), "", addr("10.0.0.4:8080"), 15008) {
        Route::Hbone {
            workload,
            target,
            hbone_addr,
            service,
            waypoint,
            ..
        } => {
            assert!(waypoint);
            assert_eq!(workload.uid, "waypoint");
            assert_eq!(target, addr("10.0.0.4:8080"));
            assert_eq!(hbone_addr, addr("10.0.0.50:15008"));
            assert!(service.is_none());
        }
        r => panic!("{r:?}"),
    }
    // From the waypoint itself: never back to the waypoint.
    for dst in ["10.96.0.4:80", "10.0.0.4:8080"] {
        match resolve(&snap, wp.as_deref(), "", addr(dst), 15008) {
            Route::Hbone {
                workload,
                target,
                hbone_addr,
                waypoint,
                ..
            } => {
                assert!(!waypoint, "{dst}");
                assert_eq!(workload.uid, "behind");
                assert_eq!(target, addr("10.0.0.4:8080"));
                assert_eq!(hbone_addr, addr("10.0.0.4:15008"));
            }
            r => panic!("{dst}: {r:?}"),
        }
    }
    // A waypoint that does not resolve: unroutable, naming the service and address.
    match resolve(&snap, a.as_deref(), "", addr("10.96.0.5:80"), 15008) {
        Route::Unroutable { reason, .. } => {
            assert!(reason.contains("lost.ns.svc.cluster.local"), "{reason}");
            assert!(reason.contains("/10.0.0.99:15008"), "{reason}");
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_passthrough_service_goes_to_the_original_destination_in_plaintext() {
    // ServiceEntry `resolution: NONE`: istiod sends `mode: PASSTHROUGH`. `ext` has no
    // endpoints; `pass` has two, one of them owning the VIP address.
    let snap = crate::state::file::test_store(
        r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}
- {uid: e1, name: e1, namespace: ns, workloadIps: ["10.0.0.1"], protocol: HBONE,
   services: {"ns/pass.example.com": {80: 8080}}}
- {uid: e2, name: e2, namespace: ns, workloadIps: ["10.0.0.2"], protocol: HBONE,
   services: {"ns/pass.example.com": {80: 8080}}}
services:
- {name: ext, namespace: ns, hostname: db.example.com, vips: ["/203.0.113.10"],
   ports: {5432: 5432}, loadBalancer: {mode: Passthrough, healthPolicy: AllowAll}}
- {name: pass, namespace: ns, hostname: pass.example.com, vips: ["/10.0.0.1"],
   ports: {80: 8080}, loadBalancer: {mode: Passthrough}}
"#,
    )
    .snapshot();
    let src = snap.workload_by_uid("client").cloned();
    for (dst, svc) in [
        ("203.0.113.10:5432", "db.example.com"),
        ("10.0.0.1:80", "pass.example.com"),
    ] {
        for _ in 0..32 {
            match resolve(&snap, src.as_deref(), "", addr(dst), 15008) {
                Route::Plain {
                    target,
                    workload,
                    service,
                } => {
                    assert_eq!(target, addr(dst));
                    assert!(workload.is_none(), "{dst}");
                    assert_eq!(service.unwrap().hostname, svc);
                }
                r => panic!("{dst}: {r:?}"),
            }
        }
    }
}

#[test]
fn an_endpoint_with_capacity_zero_is_never_picked() {
    let snap = crate::state::file::test_store(
        r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}
- {uid: e1, name: e1, namespace: ns, workloadIps: ["10.0.0.1"], protocol: HBONE, capacity: 1,
   services: {"ns/svc.ns.svc.cluster.local": {80: 8080}}}
- {uid: e2, name: e2, namespace: ns, workloadIps: ["10.0.0.2"], protocol: HBONE, capacity: 0,
   services: {"ns/svc.ns.svc.cluster.local": {80: 8080}}}
services:
- {name: svc, namespace: ns, hostname: svc.ns.svc.cluster.local, vips: ["/10.96.0.1"],
   ports: {80: 8080}}
"#,
    )
    .snapshot();
    let src = snap.workload_by_uid("client").cloned();
    for _ in 0..64 {
        match resolve(&snap, src.as_deref(), "", addr("10.96.0.1:80"), 15008) {
            Route::Hbone { target, .. } => assert_eq!(target, addr("10.0.0.1:8080")),
            r => panic!("{r:?}"),
        }
    }
}

#[test]
fn endpoints_on_another_network_are_never_dialled_directly() {
    let yaml = |gateway_known: bool| {
        let ew = if gateway_known {
            "- {uid: ew, name: ew, namespace: istio-system, workloadIps: [\"192.0.2.1\"], protocol: TCP}\n"
        } else {
            ""
        };
        format!(
            r#"
workloads:
{ew}- {{uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}}
- {{uid: remote, name: remote, namespace: ns, network: west, workloadIps: ["10.1.0.1"],
   protocol: HBONE, networkGateway: {{destination: "/192.0.2.1", hboneMtlsPort: 15008}},
   services: {{"ns/svc.ns.svc.cluster.local": {{80: 8080}}, "ns/mixed.ns.svc.cluster.local": {{80: 8080}}}}}}
- {{uid: local, name: local, namespace: ns, workloadIps: ["10.0.0.1"], protocol: HBONE,
   services: {{"ns/mixed.ns.svc.cluster.local": {{80: 8080}}}}}}
services:
- {{name: svc, namespace: ns, hostname: svc.ns.svc.cluster.local, vips: ["/10.96.0.1"],
   ports: {{80: 8080}}}}
- {{name: mixed, namespace: ns, hostname: mixed.ns.svc.cluster.local, vips: ["/10.96.0.2"],
   ports: {{80: 8080}}}}
"#
        )
    };
    // A remote-network endpoint whose gateway the state does not know: refused, naming
    // the workload, its network and the gateway.
    let snap = crate::state::file::test_store(&yaml(false)).snapshot();
    let src = snap.workload_by_uid("client").cloned();
    match resolve(&snap, src.as_deref(), "", addr("10.96.0.1:80"), 15008) {
        Route::Unroutable { reason, .. } => {
            for part in ["remote", "west", "192.0.2.1"] {
                assert!(reason.contains(part), "{reason}");
            }
        }
        r => panic!("{r:?}"),
    }
    // Local and remote endpoints, the gateway known: as upstream, both are picked (no
    // routing preference), the remote one never at its own IP.
    let snap = crate::state::file::test_store(&yaml(true)).snapshot();
    let src = snap.workload_by_uid("client").cloned();
    let (mut local, mut remote) = (0, 0);
    for _ in 0..64 {
        match resolve(&snap, src.as_deref(), "", addr("10.96.0.2:80"), 15008) {
            Route::Hbone { hbone_addr, .. } => {
                assert_eq!(hbone_addr, addr("10.0.0.1:15008"));
                local += 1;
            }
            Route::DoubleHbone { gateway, .. } => {
                assert_eq!(gateway.addr, addr("192.0.2.1:15008"));
                remote += 1;
            }
            r => panic!("{r:?}"),
        }
    }
    assert!(local > 0 && remote > 0, "{local} local, {remote} remote");
}

#[test]
fn a_shared_vip_is_the_clients_namespaces_service() {
    // Two ServiceEntries with one address (none canonical): as upstream, a client gets the
    // one of its own namespace, whatever the order.
    let snap = crate::state::file::test_store(
        r#"
workloads:
- {uid: ca, name: ca, namespace: a, workloadIps: ["10.0.0.1"], protocol: HBONE}
- {uid: cb, name: cb, namespace: b, workloadIps: ["10.0.0.2"], protocol: HBONE}
services:
- {name: ext, namespace: a, hostname: a.example.com, vips: ["/240.240.0.1"], ports: {443: 443},
   loadBalancer: {mode: Passthrough}}
- {name: ext, namespace: b, hostname: b.example.com, vips: ["/240.240.0.1"], ports: {443: 443},
   loadBalancer: {mode: Passthrough}}
"#,
    )
    .snapshot();
    for (client, want) in [("ca", "a.example.com"), ("cb", "b.example.com")] {
        let src = snap.workload_by_uid(client).cloned();
        match resolve(&snap, src.as_deref(), "", addr("240.240.0.1:443"), 15008) {
            Route::Plain { service, .. } => assert_eq!(service.unwrap().hostname, want),
            r => panic!("{client}: {r:?}"),
        }
    }
}

/// `svc` (endpoint `ep`, 10.0.0.1) owns 10.96.8.0/24; `wsvc` (endpoint `behind`) owns
/// 10.96.9.0/24 and has the waypoint `wp`; 10.96.8.7 is also `pod`'s own address.
const RANGES: &str = r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}
- {uid: other, name: other, namespace: elsewhere, serviceAccount: o,
   workloadIps: ["10.0.0.8"], protocol: HBONE}
- {uid: ep, name: ep, namespace: ns, serviceAccount: ep, workloadIps: ["10.0.0.1"],
   protocol: HBONE, services: {"ns/svc.example.com": {80: 8080}}}
- {uid: pod, name: pod, namespace: ns, serviceAccount: pod, workloadIps: ["10.96.8.7"],
   protocol: HBONE}
- {uid: behind, name: behind, namespace: ns, serviceAccount: behind,
   workloadIps: ["10.0.0.4"], protocol: HBONE, services: {"ns/wsvc.example.com": {80: 8080}}}
- {uid: wp, name: wp, namespace: ns, serviceAccount: waypoint, workloadIps: ["10.0.0.50"],
   protocol: HBONE}
- {uid: wp2, name: wp2, namespace: ns, serviceAccount: waypoint2, workloadIps: ["10.0.0.51"],
   protocol: HBONE}
services:
- {name: svc, namespace: ns, hostname: svc.example.com, ports: {80: 8080},
   cidrVips: [{network: "", cidr: 10.96.8.0/24}]}
- {name: wsvc, namespace: ns, hostname: wsvc.example.com, ports: {80: 8080},
   cidrVips: [{network: "", cidr: 10.96.9.0/24}],
   waypoint: {destination: /10.0.0.50}}
- {name: scoped, namespace: ns, hostname: scoped.example.com, vips: ["/10.96.7.1"],
   ports: {80: 8080}, visibility: Namespace}
"#;

#[test]
fn an_address_in_a_cidr_vip_routes_as_a_host_vip_would() {
    let snap = crate::state::file::test_store(RANGES).snapshot();
    let client = snap.workload_by_uid("client").cloned();
    let r = |dst: &str| resolve(&snap, client.as_deref(), "", addr(dst), 15008);
    // To the service's endpoint, port mapped.
    match r("10.96.8.200:80") {
        Route::Hbone {
            workload,
            target,
            service,
            waypoint,
            ..
        } => {
            assert_eq!(workload.uid, "ep");
            assert_eq!(target, addr("10.0.0.1:8080"));
            assert_eq!(service.unwrap().hostname, "svc.example.com");
            assert!(!waypoint);
        }
        r => panic!("{r:?}"),
    }
    // A VIP forwards only its ports, a range too.
    assert!(matches!(r("10.96.8.200:81"), Route::Unroutable { .. }));
    // A workload's own address inside the range is the workload's.
    match r("10.96.8.7:9000") {
        Route::Hbone {
            workload, target, ..
        } => {
            assert_eq!(workload.uid, "pod");
            assert_eq!(target, addr("10.96.8.7:9000"));
        }
        r => panic!("{r:?}"),
    }
    // Through the range's service's waypoint, authority the address dialled.
    match r("10.96.9.3:80") {
        Route::Hbone {
            workload,
            target,
            service,
            waypoint,
            ..
        } => {
            assert!(waypoint);
            assert_eq!(workload.uid, "wp");
            assert_eq!(target, addr("10.96.9.3:80"));
            assert_eq!(service.unwrap().hostname, "wsvc.example.com");
        }
        r => panic!("{r:?}"),
    }
    // Outside every range: not the mesh's.
    assert!(matches!(
        r("10.96.10.1:80"),
        Route::Plain {
            service: None,
            workload: None,
            ..
        }
    ));
}

#[test]
fn a_namespace_scoped_vip_is_unknown_to_other_namespaces() {
    let snap = crate::state::file::test_store(RANGES).snapshot();
    let from = |uid: &str| {
        let src = snap.workload_by_uid(uid).cloned();
        resolve(&snap, src.as_deref(), "", addr("10.96.7.1:80"), 15008)
    };
    assert!(
        matches!(from("client"), Route::Unroutable { service: Some(s), .. } if s.name == "scoped"),
        "its own namespace sees it (no endpoint)"
    );
    assert!(
        matches!(
            from("other"),
            Route::Plain {
                service: None,
                workload: None,
                ..
            }
        ),
        "another namespace does not"
    );
}

#[test]
fn weighted_waypoints_share_connections_and_never_loop() {
    let mut yaml = RANGES.to_string();
    yaml = yaml.replace(
        "waypoint: {destination: /10.0.0.50}}",
        "waypoint: {destination: /10.0.0.50},\n   weightedWaypoints: [\
         {destination: {destination: /10.0.0.50}, weight: 1},\
         {destination: {destination: /10.0.0.51}, weight: 3}]}",
    );
    let snap = crate::state::file::test_store(&yaml).snapshot();
    let via = |src: &str| {
        let src = snap.workload_by_uid(src).cloned();
        match resolve(&snap, src.as_deref(), "", addr("10.96.9.3:80"), 15008) {
            Route::Hbone {
                workload, waypoint, ..
            } => (workload.uid.clone(), waypoint),
            r => panic!("{r:?}"),
        }
    };
    let mut canary = 0;
    for _ in 0..400 {
        match via("client") {
            (uid, true) if uid == "wp2" => canary += 1,
            (uid, true) => assert_eq!(uid, "wp"),
            r => panic!("{r:?}"),
        }
    }
    // Expected 300 (sd ~9).
    assert!((240..360).contains(&canary), "{canary}");
    // From either waypoint: straight to the endpoint.
    for wp in ["wp", "wp2"] {
        assert_eq!(via(wp), ("behind".to_string(), false), "{wp}");
    }
}

/// A service with endpoints on network `west` only, behind west's east-west gateway (a
/// known workload there), and one whose waypoint is on `west`: both go through the gateway
/// with `hostname:port`, verified against the gateway (outer) and the far workload (inner).
#[test]
fn other_networks_are_reached_through_their_gateway() {
    let yaml = r#"
workloads:
- {uid: a, name: a, namespace: ns, serviceAccount: sa-a, network: east,
   workloadIps: ["10.0.0.1"], protocol: HBONE, services: {}}
- {uid: ew, name: ew, namespace: istio-system, serviceAccount: istio-eastwestgateway,
   network: west, workloadIps: ["192.0.2.9"], protocol: TCP, services: {}}
- uid: far
  name: far
  namespace: ns
  serviceAccount: sa-far
  network: west
  protocol: HBONE
  networkGateway: {destination: "west/192.0.2.9", hboneMtlsPort: 15443}
  services: {"ns/svc.ns.svc.cluster.local": {80: 8080}}
- uid: wp
  name: wp
  namespace: ns
  serviceAccount: waypoint
  network: west
  workloadIps: ["10.1.0.50"]
  protocol: HBONE
  networkGateway: {destination: "west/192.0.2.9", hboneMtlsPort: 15443}
  services: {}
- uid: lonely
  name: lonely
  namespace: ns
  serviceAccount: sa-lonely
  network: north
  workloadIps: ["10.2.0.1"]
  protocol: HBONE
  services: {"ns/nogw.ns.svc.cluster.local": {80: 8080}}
services:
- name: svc
  namespace: ns
  hostname: svc.ns.svc.cluster.local
  vips: ["east/10.96.0.1"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/svc-san"]
- name: wsvc
  namespace: ns
  hostname: wsvc.ns.svc.cluster.local
  vips: ["east/10.96.0.2"]
  ports: {80: 8080}
  waypoint: {destination: "west/10.1.0.50", hboneMtlsPort: 15008}
- name: nogw
  namespace: ns
  hostname: nogw.ns.svc.cluster.local
  vips: ["east/10.96.0.3"]
  ports: {80: 8080}
"#;
    let snap = crate::state::file::test_store(yaml).snapshot();
    let src = snap.workload_by_uid("a").cloned();
    let r = |dst: &str| resolve(&snap, src.as_deref(), "east", addr(dst), 15008);
    let ids = |v: &[Identity]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
    let gateway_id = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";
    match r("10.96.0.1:80") {
        Route::DoubleHbone {
            gateway,
            workload,
            service,
            port,
            expected,
        } => {
            assert_eq!(gateway.addr, addr("192.0.2.9:15443"));
            assert_eq!(ids(&gateway.identities), [gateway_id]);
            assert_eq!((workload.uid.as_str(), port), ("far", 80));
            assert_eq!(service.hostname, "svc.ns.svc.cluster.local");
            // The service's SANs only (upstream's final SANs).
            assert_eq!(ids(&expected), ["spiffe://cluster.local/ns/ns/sa/svc-san"]);
        }
        other => panic!("{other:?}"),
    }
    match r("10.96.0.2:80") {
        Route::DoubleHbone {
            gateway,
            workload,
            expected,
            port,
            ..
        } => {
            assert_eq!(gateway.addr, addr("192.0.2.9:15443"));
            assert_eq!((workload.uid.as_str(), port), ("wp", 80));
            assert_eq!(ids(&expected), ["spiffe://cluster.local/ns/ns/sa/waypoint"]);
        }
        other => panic!("{other:?}"),
    }
    match r("10.96.0.3:80") {
        Route::Unroutable { reason, .. } => {
            assert!(
                reason.contains("north") && reason.contains("no network gateway"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
}
