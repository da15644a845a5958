//! Conversion tests: every field, defaults, and the errors.
use super::*;
use mesh_proto::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use prost_types::Any;
use xsec::string_match::MatchType;
use xwl::gateway_address::Destination;

fn any(type_url: &str, msg: &impl Message) -> Any {
    let value = msg.encode_to_vec();
    let type_url = type_url.into();
    Any { type_url, value }
}

fn address_any(t: xwl::address::Type) -> Any {
    any(ADDRESS_TYPE, &xwl::Address { r#type: Some(t) })
}

fn v6(s: &str) -> Vec<u8> {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()
}

fn wl() -> xwl::Workload {
    let (uid, name, namespace) = ("Kubernetes//v1/Pod/app/web-1", "web-1", "app");
    let (uid, name, namespace) = (uid.into(), name.into(), namespace.into());
    xwl::Workload {
        uid,
        name,
        namespace,
        ..Default::default()
    }
}

fn gw(destination: Destination, hbone_mtls_port: u32) -> xwl::GatewayAddress {
    let destination = Some(destination);
    xwl::GatewayAddress {
        destination,
        hbone_mtls_port,
    }
}

fn gw_host(hostname: &str, port: u32) -> Option<xwl::GatewayAddress> {
    let (namespace, hostname) = ("app".into(), hostname.into());
    let h = xwl::NamespacedHostname {
        namespace,
        hostname,
    };
    Some(gw(Destination::Hostname(h), port))
}

fn gw_addr(address: Vec<u8>) -> xwl::GatewayAddress {
    let network = "net2".into();
    gw(
        Destination::Address(xwl::NetworkAddress {
            network,
            address,
            length: None,
        }),
        15009,
    )
}

fn ports(pairs: &[(u32, u32)]) -> Vec<xwl::Port> {
    let app_protocol = xwl::AppProtocol::Http11 as i32;
    let p = |&(service_port, target_port): &(u32, u32)| xwl::Port {
        service_port,
        target_port,
        app_protocol,
    };
    pairs.iter().map(p).collect()
}

fn decode_wl(w: xwl::Workload) -> Result<AddressResource, ConvertError> {
    let a = address_any(xwl::address::Type::Workload(w));
    decode_address(&a, &ConvertDefaults::default())
}

#[test]
fn workload_round_trip_every_field() {
    use xwl::application_tunnel::Protocol as AppTunnel;
    let services = HashMap::from([(
        "app/web.app.svc".to_string(),
        xwl::PortList {
            ports: ports(&[(80, 8080), (443, 0)]),
        },
    )]);
    let (region, zone, subzone) = ("r".into(), "z".into(), "s".into());
    let w = xwl::Workload {
        addresses: vec![vec![10, 0, 0, 7], v6("fd00::7")],
        network: "net1".into(),
        tunnel_protocol: xwl::TunnelProtocol::Hbone as i32,
        trust_domain: "example.org".into(),
        service_account: "web".into(),
        waypoint: gw_host("wp.app.svc", 15008),
        node: "node-a".into(),
        canonical_name: "web".into(),
        canonical_revision: "v2".into(),
        workload_type: xwl::WorkloadType::Cronjob as i32,
        workload_name: "web-job".into(),
        native_tunnel: true,
        authorization_policies: vec!["app/allow-web".into()],
        status: xwl::WorkloadStatus::Unhealthy as i32,
        cluster_id: "c1".into(),
        network_gateway: Some(gw_addr(vec![192, 168, 0, 1])),
        hostname: "web-1.example".into(),
        services,
        application_tunnel: Some(xwl::ApplicationTunnel {
            protocol: AppTunnel::Proxy as i32,
            port: 15088,
        }),
        locality: Some(xwl::Locality {
            region,
            zone,
            subzone,
        }),
        network_mode: xwl::NetworkMode::HostNetwork as i32,
        capacity: Some(3),
        ..wl()
    };
    // The same workload in the local-config schema.
    let want: Workload = serde_yaml_ng::from_str(
        r#"
        uid: Kubernetes//v1/Pod/app/web-1
        name: web-1
        namespace: app
        serviceAccount: web
        trustDomain: example.org
        workloadIps: [10.0.0.7, "fd00::7"]
        protocol: HBONE
        networkMode: HostNetwork
        node: node-a
        network: net1
        services: {"app/web.app.svc": {80: 8080, 443: 0}}
        waypoint: {destination: {namespace: app, hostname: wp.app.svc}}
        networkGateway: {destination: net2/192.168.0.1, hboneMtlsPort: 15009}
        workloadName: web-job
        workloadType: cronjob
        canonicalName: web
        canonicalRevision: v2
        hostname: web-1.example
        nativeTunnel: true
        applicationTunnel: {protocol: PROXY, port: 15088}
        authorizationPolicies: [app/allow-web]
        status: Unhealthy
        clusterId: c1
        locality: {region: r, zone: z, subzone: s}
        capacity: 3
        "#,
    )
    .unwrap();
    assert_eq!(decode_wl(w).unwrap(), AddressResource::Workload(want));
}

#[test]
fn workload_defaults() {
    let defaults = ConvertDefaults {
        trust_domain: "td.example".into(),
        cluster_id: "east".into(),
    };
    let w = xwl::Workload {
        tunnel_protocol: xwl::TunnelProtocol::LegacyIstioMtls as i32,
        waypoint: gw_host("wp", 0),
        application_tunnel: Some(xwl::ApplicationTunnel::default()),
        // A workload kind from a newer istiod: read as the default, as upstream.
        workload_type: 42,
        ..wl()
    };
    let want = r#"{uid: Kubernetes//v1/Pod/app/web-1, name: web-1, namespace: app,
        trustDomain: td.example, clusterId: east, workloadType: deployment,
        waypoint: {destination: {namespace: app, hostname: wp}},
        applicationTunnel: {protocol: NONE}}"#;
    let want: Workload = serde_yaml_ng::from_str(want).unwrap();
    assert_eq!(workload(w, &defaults).unwrap(), want);
    assert_eq!(
        want.identity().to_string(),
        "spiffe://td.example/ns/app/sa/default"
    );
}

#[test]
fn service_with_vips_ports_waypoint_and_load_balancing() {
    use xwl::load_balancing::{HealthPolicy, Mode, Scope};
    let addr = |network: &str, address| xwl::NetworkAddress {
        network: network.into(),
        address,
        length: None,
    };
    let range = |address, length| xwl::NetworkAddress {
        length: Some(length),
        ..addr("", address)
    };
    let weighted = |address, weight| xwl::WeightedWaypoint {
        destination: Some(gw_addr(address)),
        weight,
    };
    let scopes = [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone];
    let s = xwl::Service {
        name: "web".into(),
        namespace: "app".into(),
        hostname: "web.app.svc".into(),
        addresses: vec![
            addr("", vec![10, 96, 0, 10]),
            addr("net1", v6("fd00::10")),
            // A full-length prefix is a host VIP; a shorter one a CIDR VIP.
            range(vec![10, 96, 0, 11], 32),
            range(vec![10, 96, 8, 0], 24),
            range(v6("fd00:8::"), 64),
        ],
        ports: ports(&[(80, 8080), (9090, 0)]),
        subject_alt_names: vec!["spiffe://cluster.local/ns/app/sa/web".into()],
        waypoint: gw_host("wp.app.svc", 15008),
        load_balancing: Some(xwl::LoadBalancing {
            routing_preference: [&scopes[..], &[Scope::Node, Scope::Cluster]]
                .concat()
                .into_iter()
                .map(|s| s as i32)
                .collect(),
            mode: Mode::Failover as i32,
            health_policy: HealthPolicy::AllowAll as i32,
        }),
        ip_families: xwl::IpFamilies::Dual as i32,
        canonical: true,
        weighted_waypoints: vec![
            weighted(vec![10, 0, 0, 8], 90),
            weighted(vec![10, 0, 0, 9], 10),
        ],
        visibility: xwl::service::Visibility::Namespace as i32,
    };
    let got = decode_address(
        &address_any(xwl::address::Type::Service(s)),
        &ConvertDefaults::default(),
    )
    .unwrap();
    let want: Service = serde_yaml_ng::from_str(
        r#"
        name: web
        namespace: app
        hostname: web.app.svc
        vips: [/10.96.0.10, "net1/fd00::10", /10.96.0.11]
        cidrVips: [{network: "", cidr: 10.96.8.0/24}, {network: "", cidr: "fd00:8::/64"}]
        ports: {80: 8080, 9090: 0}
        subjectAltNames: [spiffe://cluster.local/ns/app/sa/web]
        waypoint: {destination: {namespace: app, hostname: wp.app.svc}}
        weightedWaypoints:
        - {destination: {destination: net2/10.0.0.8, hboneMtlsPort: 15009}, weight: 90}
        - {destination: {destination: net2/10.0.0.9, hboneMtlsPort: 15009}, weight: 10}
        visibility: Namespace
        canonical: true
        loadBalancer:
          routingPreferences: [Network, Region, Zone, Subzone, Node, Cluster]
          mode: Failover
          healthPolicy: AllowAll
        ipFamilies: Dual
        "#,
    )
    .unwrap();
    if let AddressResource::Service(s) = &got {
        assert!(s.load_balancer.as_ref().unwrap().allows_unhealthy());
    }
    assert_eq!(got, AddressResource::Service(want));

    // Defaults: AUTOMATIC families, UNSPECIFIED mode, ONLY_HEALTHY.
    let plain = service(xwl::Service {
        namespace: "app".into(),
        hostname: "h".into(),
        load_balancing: Some(xwl::LoadBalancing::default()),
        ..Default::default()
    });
    let want = "{name: '', namespace: app, hostname: h,
        loadBalancer: {mode: Standard, healthPolicy: OnlyHealthy}}";
    let plain = plain.unwrap();
    assert_eq!(plain.visibility, crate::state::Visibility::Public);
    // A visibility this proto does not know is public, as upstream (fail open).
    let newer = service(xwl::Service {
        namespace: "app".into(),
        hostname: "h".into(),
        visibility: 7,
        ..Default::default()
    });
    assert_eq!(newer.unwrap().visibility, crate::state::Visibility::Public);
    assert!(!plain.load_balancer.as_ref().unwrap().allows_unhealthy());
    assert_eq!(plain, serde_yaml_ng::from_str(want).unwrap());
}

fn sm(t: MatchType) -> xsec::StringMatch {
    xsec::StringMatch {
        match_type: Some(t),
    }
}

fn cidr(address: &[u8], length: u32) -> xsec::Address {
    let address = address.to_vec();
    xsec::Address { address, length }
}

fn sa(service_account: &str) -> xsec::ServiceAccountMatch {
    let (namespace, service_account) = ("app".into(), service_account.into());
    xsec::ServiceAccountMatch {
        namespace,
        service_account,
    }
}

/// `app/allow-web`: DENY, WorkloadSelector, dry run; rules `[[[m], []]]`.
fn policy(m: xsec::Match) -> xsec::Authorization {
    let clauses = vec![xsec::Clause { matches: vec![m] }, xsec::Clause::default()];
    xsec::Authorization {
        name: "allow-web".into(),
        namespace: "app".into(),
        scope: xsec::Scope::WorkloadSelector as i32,
        action: xsec::Action::Deny as i32,
        rules: vec![xsec::Rule { clauses }],
        dry_run: true,
    }
}

#[test]
fn authorization_every_match_kind() {
    let m = xsec::Match {
        namespaces: vec![
            sm(MatchType::Exact("app".into())),
            sm(MatchType::Prefix("t-".into())),
        ],
        not_namespaces: vec![sm(MatchType::Suffix("-bad".into()))],
        principals: vec![sm(MatchType::Presence(()))],
        not_principals: vec![sm(MatchType::Prefix("cluster.local/ns/evil/".into()))],
        source_ips: vec![cidr(&[10, 0, 0, 0], 8), cidr(&[192, 168, 1, 1], 32)],
        not_source_ips: vec![cidr(&v6("2001:db8::"), 32)],
        destination_ips: vec![cidr(&[0; 16], 0)],
        not_destination_ips: vec![cidr(&[172, 16, 0, 0], 12)],
        destination_ports: vec![80, 8080],
        not_destination_ports: vec![9999],
        service_accounts: vec![sa("client")],
        not_service_accounts: vec![sa("evil")],
    };
    let got = decode_authorization(&any(AUTHORIZATION_TYPE, &policy(m))).unwrap();
    // The same policy in the local-config schema.
    let want: Authorization = serde_yaml_ng::from_str(
        r#"
        name: allow-web
        namespace: app
        scope: WorkloadSelector
        action: Deny
        dryRun: true
        rules:
        - - - namespaces: [!Exact app, !Prefix t-]
              notNamespaces: [!Suffix -bad]
              principals: [Presence]
              notPrincipals: [!Prefix cluster.local/ns/evil/]
              sourceIps: [10.0.0.0/8, 192.168.1.1/32]
              notSourceIps: ["2001:db8::/32"]
              destinationIps: ["::/0"]
              notDestinationIps: [172.16.0.0/12]
              destinationPorts: [80, 8080]
              notDestinationPorts: [9999]
              serviceAccounts: [{namespace: app, serviceAccount: client}]
              notServiceAccounts: [{namespace: app, serviceAccount: evil}]
          - []
        "#,
    )
    .unwrap();
    assert_eq!(got, want);

    let global = authorization(xsec::Authorization::default()).unwrap();
    assert_eq!(
        (global.scope, global.action),
        (model::Scope::Global, model::Action::Allow)
    );
    assert!(global.rules.is_empty() && !global.dry_run);
}

/// An edit of a valid message and the error it must cause.
type Case<T> = (fn(&mut T), &'static str);

fn err<T: std::fmt::Debug>(r: Result<T, ConvertError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn workload_and_service_errors_name_object_and_field() {
    let e = err(decode_wl(xwl::Workload {
        addresses: vec![vec![10, 0, 0, 1], vec![1, 2, 3]],
        ..wl()
    }));
    let want = "addresses[1]: address 3 bytes long (want 4 or 16)";
    assert_eq!(e, format!("workload Kubernetes//v1/Pod/app/web-1: {want}"));
    let e = err(workload(
        xwl::Workload {
            uid: "".into(),
            ..wl()
        },
        &Default::default(),
    ));
    assert_eq!(e, "workload app/web-1: uid: must not be empty");

    fn svc(key: &str, ports: Vec<xwl::Port>) -> HashMap<String, xwl::PortList> {
        HashMap::from([(key.into(), xwl::PortList { ports })])
    }
    let cases: [Case<xwl::Workload>; 5] = [
        (
            |w| w.tunnel_protocol = 7,
            "tunnel_protocol: unknown enum value 7",
        ),
        (
            |w| w.waypoint = Some(Default::default()),
            "waypoint: neither hostname nor",
        ),
        (
            |w| w.network_gateway = Some(gw_addr(vec![])),
            "network_gateway.address: address 0 bytes long",
        ),
        (
            |w| w.services = svc("nohost", vec![]),
            "services[\"nohost\"]: key is not <namespace>/<hostname>",
        ),
        (
            |w| w.services = svc("app/h", ports(&[(80, 70000)])),
            "services[\"app/h\"].ports[0].target_port: port 70000 out of range",
        ),
    ];
    for (edit, want) in cases {
        let mut w = wl();
        edit(&mut w);
        let e = err(workload(w, &ConvertDefaults::default()));
        let want = format!("workload Kubernetes//v1/Pod/app/web-1: {want}");
        assert!(e.starts_with(&want), "{e} is not {want}");
    }

    let cases: [Case<xwl::Service>; 7] = [
        (
            |s| {
                s.addresses = vec![xwl::NetworkAddress {
                    address: vec![10, 96, 0, 0],
                    length: Some(40),
                    ..Default::default()
                }]
            },
            "app/web.app: addresses[0].length: prefix length 40 longer than 32",
        ),
        (
            |s| {
                s.addresses = vec![xwl::NetworkAddress {
                    address: v6("fd00::"),
                    length: Some(129),
                    ..Default::default()
                }]
            },
            "app/web.app: addresses[0].length: prefix length 129 longer than 128",
        ),
        (
            |s| s.weighted_waypoints = vec![xwl::WeightedWaypoint::default()],
            "app/web.app: weighted_waypoints[0].destination: missing",
        ),
        (
            |s| s.addresses = vec![xwl::NetworkAddress::default()],
            "app/web.app: addresses[0]: address 0 bytes long (want 4 or 16)",
        ),
        (
            |s| {
                s.load_balancing = Some(xwl::LoadBalancing {
                    routing_preference: vec![0],
                    ..Default::default()
                })
            },
            "app/web.app: load_balancing.routing_preference[0]: UNSPECIFIED_SCOPE",
        ),
        (
            |s| s.ip_families = 9,
            "app/web.app: ip_families: unknown enum value 9",
        ),
        (|s| s.hostname.clear(), "app/: hostname: must not be empty"),
    ];
    for (edit, want) in cases {
        let mut s = xwl::Service {
            namespace: "app".into(),
            hostname: "web.app".into(),
            ..Default::default()
        };
        edit(&mut s);
        let e = err(service(s));
        assert!(
            e.starts_with(&format!("service {want}")),
            "{e} is not {want}"
        );
    }
}

#[test]
fn decode_errors() {
    let defaults = ConvertDefaults::default();
    let e = decode_address(&any(AUTHORIZATION_TYPE, &wl()), &defaults).unwrap_err();
    assert!(matches!(e, ConvertError::WrongType { .. }), "{e}");
    assert!(
        e.to_string().contains("istio.security.Authorization"),
        "{e}"
    );
    let e = decode_authorization(&any(ADDRESS_TYPE, &wl())).unwrap_err();
    assert!(matches!(e, ConvertError::WrongType { .. }), "{e}");
    let mut garbage = any(ADDRESS_TYPE, &wl());
    garbage.value = vec![0xff, 0xff, 0xff];
    let e = decode_address(&garbage, &defaults).unwrap_err();
    assert!(matches!(e, ConvertError::Decode { .. }), "{e}");
    let empty = any(ADDRESS_TYPE, &xwl::Address { r#type: None });
    let e = decode_address(&empty, &defaults).unwrap_err();
    assert!(matches!(e, ConvertError::EmptyAddress), "{e}");
}

#[test]
fn authorization_errors() {
    let cases: [Case<xsec::Match>; 5] = [
        (
            |m| m.source_ips = vec![cidr(&[10, 0, 0, 0], 33)],
            "source_ips[0]: prefix length 33 longer than 32",
        ),
        (
            |m| m.not_destination_ips = vec![cidr(&[0; 16], 300)],
            "not_destination_ips[0]: prefix length 300 longer than 128",
        ),
        (
            |m| m.destination_ips = vec![cidr(&[10, 0, 0], 8)],
            "destination_ips[0]: address 3 bytes long (want 4 or 16)",
        ),
        (
            |m| m.principals = vec![Default::default()],
            "principals[0]: no exact",
        ),
        (
            |m| m.not_destination_ports = vec![65536],
            "not_destination_ports[0]: port 65536 out of range",
        ),
    ];
    for (edit, want) in cases {
        let mut m = xsec::Match::default();
        edit(&mut m);
        let e = err(authorization(policy(m)));
        let at = "rules[0].clauses[0].matches[0]";
        let want = format!("authorization policy app/allow-web: {at}.{want}");
        assert!(e.starts_with(&want), "{e} is not {want}");
    }
    let e = err(authorization(xsec::Authorization {
        action: 5,
        ..policy(Default::default())
    }));
    assert_eq!(
        e,
        "authorization policy app/allow-web: action: unknown enum value 5"
    );
}
