//! Configuration tests: defaults, parsing, and errors naming the variable.
use super::*;

fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_lookup(|k| m.get(k).cloned())
}

#[test]
fn defaults_match_upstream() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.proxy_mode, ProxyMode::Shared);
    assert_eq!(c.trust_domain, "cluster.local");
    assert_eq!(c.cluster_id, "Kubernetes");
    assert_eq!(c.secret_ttl, Duration::from_secs(86400));
    assert_eq!(c.worker_threads, 2);
    assert_eq!(c.packet_mark, Some(1337));
    assert_eq!(c.termination_grace_period, Duration::from_secs(5));
    assert_eq!(c.h2.stream_window, 4 << 20);
    assert_eq!(c.h2.connection_window, 16 << 20);
    assert_eq!(c.h2.frame_size, 1 << 20);
    assert_eq!(c.h2.max_streams_per_connection, 100);
    assert_eq!(c.ports, ProxyPorts::default());
    assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
    assert_eq!(c.stats_addr.port(), 15020);
    assert_eq!(c.readiness_addr.port(), 15021);
    assert_eq!(c.log_format, LogFormat::Plain);
    assert!(c.localhost_app_tunnel);
    assert_eq!(c.network, "");
    assert_eq!(cfg(&[("NETWORK", " net1 ")]).unwrap().network, "net1");
    assert_eq!(cfg(&[("NETWORK", "a/b")]).unwrap_err().field, "NETWORK");
    assert!(
        !cfg(&[("LOCALHOST_APP_TUNNEL", "false")])
            .unwrap()
            .localhost_app_tunnel
    );
}

#[test]
fn xds_address_is_optional_and_exclusive_with_kubernetes_discovery() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.xds_address, None);
    assert_eq!(
        c.xds_root_ca,
        ControlPlaneRoots::File(c.root_ca_path.clone())
    );
    let c = cfg(&[("XDS_ADDRESS", "")]).unwrap();
    assert_eq!(c.xds_address, None, "empty turns xDS off, as upstream");
    let c = cfg(&[
        ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
        ("ROOT_CA_PATH", "/r.pem"),
    ])
    .unwrap();
    assert_eq!(
        c.xds_address.as_deref(),
        Some("istiod.istio-system.svc:15012")
    );
    assert_eq!(c.xds_root_ca, ControlPlaneRoots::File("/r.pem".into()));
    assert_eq!(c.ca_root_ca, ControlPlaneRoots::File("/r.pem".into()));
    let e = cfg(&[
        ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
        ("KUBERNETES_DISCOVERY", "true"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("XDS_ADDRESS") && e.contains("KUBERNETES_DISCOVERY"),
        "{e}"
    );
}

#[test]
fn xds_on_demand_needs_xds_and_no_dns_proxy() {
    assert!(!cfg(&[]).unwrap().xds_on_demand);
    let istiod = ("XDS_ADDRESS", "istiod.istio-system.svc:15012");
    let c = cfg(&[
        istiod,
        ("XDS_ON_DEMAND", "true"),
        ("ISTIO_META_DNS_CAPTURE", "false"),
    ])
    .unwrap();
    assert!(c.xds_on_demand);
    let e = cfg(&[
        ("XDS_ON_DEMAND", "true"),
        ("ISTIO_META_DNS_CAPTURE", "false"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("XDS_ON_DEMAND") && e.contains("XDS_ADDRESS"),
        "{e}"
    );
    let e = cfg(&[istiod, ("XDS_ON_DEMAND", "true")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("XDS_ON_DEMAND") && e.contains("ISTIO_META_DNS_CAPTURE"),
        "{e}"
    );
}

#[test]
fn drain_ends_before_the_grace_period() {
    let secs = Duration::from_secs;
    let budget = |grace: &str| {
        cfg(&[("TERMINATION_GRACE_PERIOD_SECONDS", grace)])
            .unwrap()
            .drain_budget()
    };
    // Over 10 s: 5 s to close the rest before SIGKILL; up to 10 s: 1 s.
    assert_eq!(budget("30"), secs(25));
    assert_eq!(budget("11"), secs(6));
    assert_eq!(budget("10"), secs(9));
    assert_eq!(budget("2"), secs(1));
    // Floor: 1 s, but never past the grace period itself.
    assert_eq!(budget("1"), secs(1));
    assert_eq!(budget("0"), secs(0));
    assert_eq!(
        drain_budget(Duration::from_millis(500)),
        Duration::from_millis(500)
    );
    assert_eq!(drain_budget(Duration::from_millis(1500)), secs(1));
    // The default grace period (5 s) drains for 4 s.
    assert_eq!(Config::default().drain_budget(), secs(4));
}

#[test]
fn dedicated_mode() {
    let c = cfg(&[
        ("PROXY_MODE", "dedicated"),
        ("PROXY_WORKLOAD_INFO", "default/sleep-1/sleep"),
        ("SECRET_TTL", "1h30m"),
        ("ZTUNNEL_WORKER_THREADS", "1"),
        ("LOG_FORMAT", "json"),
        ("PACKET_MARK", "0x539"),
        ("TRUST_DOMAIN", "example.org"),
    ])
    .unwrap();
    assert_eq!(c.proxy_mode, ProxyMode::Dedicated);
    let w = c.proxy_workload_info.unwrap();
    assert_eq!(
        (
            w.namespace.as_str(),
            w.name.as_str(),
            w.service_account.as_str()
        ),
        ("default", "sleep-1", "sleep")
    );
    assert_eq!(c.secret_ttl, Duration::from_secs(5400));
    assert_eq!(c.worker_threads, 1);
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.packet_mark, Some(0x539));
    assert_eq!(c.trust_domain, "example.org");
}

#[test]
fn worker_threads_as_upstream() {
    // The rules are tested in `threads`; here, that the config uses them.
    let threads = |vars: &[(&str, &str)]| cfg(vars).unwrap().worker_threads;
    assert_eq!(threads(&[("ZTUNNEL_CPU_LIMIT", "4")]), 2);
    assert_eq!(threads(&[("ZTUNNEL_WORKER_THREADS", "3")]), 3);
    assert_eq!(threads(&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "1")]), 1);
    let e = cfg(&[("ZTUNNEL_RESOURCE_CPU_REQUEST", "lots")]).unwrap_err();
    assert_eq!(e.field, "ZTUNNEL_RESOURCE_CPU_REQUEST");
}

#[test]
fn cluster_identity_and_discovery_scope() {
    let c = cfg(&[]).unwrap();
    assert_eq!(
        (
            c.cluster_id.as_str(),
            c.cluster_domain.as_str(),
            c.root_namespace.as_str()
        ),
        ("Kubernetes", "cluster.local", "istio-system")
    );
    let c = cfg(&[
        ("CLUSTER_ID", "west"),
        ("ISTIO_META_CLUSTER_ID", "east"),
        ("CLUSTER_DOMAIN", "corp.local."),
        ("POD_NAMESPACE", "mesh"),
    ])
    .unwrap();
    assert_eq!(
        (
            c.cluster_id.as_str(),
            c.cluster_domain.as_str(),
            c.root_namespace.as_str()
        ),
        ("east", "corp.local", "mesh"),
        "ISTIO_META_CLUSTER_ID wins as upstream; the root namespace follows the pod's"
    );
    let c = cfg(&[
        ("POD_NAMESPACE", "mesh"),
        ("ROOT_NAMESPACE", "istio-config"),
    ])
    .unwrap();
    assert_eq!(c.root_namespace, "istio-config");
}

#[test]
fn trusted_node_accounts() {
    let acct = |ns: &str, sa: &str| NodeProxyAccount {
        namespace: ns.into(),
        service_account: sa.into(),
    };
    assert_eq!(
        cfg(&[]).unwrap().trusted_node_accounts,
        [acct("istio-system", "ztunnel")]
    );
    assert_eq!(
        cfg(&[("POD_NAMESPACE", "mesh")])
            .unwrap()
            .trusted_node_accounts,
        [acct("mesh", "ztunnel")]
    );
    assert_eq!(
        cfg(&[("CA_TRUSTED_NODE_ACCOUNTS", "a/zt, b/node-proxy")])
            .unwrap()
            .trusted_node_accounts,
        [acct("a", "zt"), acct("b", "node-proxy")]
    );
    let e = cfg(&[("CA_TRUSTED_NODE_ACCOUNTS", "a/zt,ztunnel")]).unwrap_err();
    assert_eq!(e.field, "CA_TRUSTED_NODE_ACCOUNTS");
    assert!(e.reason.contains("\"ztunnel\""), "{}", e.reason);
}

#[test]
fn tproxy_mode_has_no_default_mark() {
    let c = cfg(&[("INPOD_ENABLED", "false")]).unwrap();
    assert_eq!(c.packet_mark, None);
}

#[test]
fn rejections_name_the_field_and_value() {
    for (vars, field, value) in [
        (vec![("PROXY_MODE", "sidecar")], "PROXY_MODE", "sidecar"),
        (vec![("PROXY_MODE", "dedicated")], "PROXY_WORKLOAD_INFO", ""),
        (
            vec![("PROXY_MODE", "dedicated"), ("PROXY_WORKLOAD_INFO", "a/b")],
            "PROXY_WORKLOAD_INFO",
            "a/b",
        ),
        (vec![("SECRET_TTL", "forever")], "SECRET_TTL", "forever"),
        (vec![("SECRET_TTL", "0s")], "SECRET_TTL", "0s"),
        (
            vec![("ZTUNNEL_WORKER_THREADS", "0%")],
            "ZTUNNEL_WORKER_THREADS",
            "0%",
        ),
        (
            vec![("ZTUNNEL_WORKER_THREADS", "150%")],
            "ZTUNNEL_WORKER_THREADS",
            "150%",
        ),
        (vec![("ZTUNNEL_CPU_LIMIT", "0")], "ZTUNNEL_CPU_LIMIT", "0"),
        (vec![("CLUSTER_DOMAIN", "a/b")], "CLUSTER_DOMAIN", "a/b"),
        (
            vec![("ZTUNNEL_WORKER_THREADS", "two")],
            "ZTUNNEL_WORKER_THREADS",
            "two",
        ),
        (vec![("INPOD_ENABLED", "maybe")], "INPOD_ENABLED", "maybe"),
        (vec![("LOG_FORMAT", "xml")], "LOG_FORMAT", "xml"),
        (vec![("PACKET_MARK", "0xzz")], "PACKET_MARK", "0xzz"),
        (vec![("INSTANCE_IP", "1.2.3")], "INSTANCE_IP", "1.2.3"),
        (vec![("TRUST_DOMAIN", "a/b")], "TRUST_DOMAIN", "a/b"),
        (vec![("HTTP2_FRAME_SIZE", "100")], "HTTP2_FRAME_SIZE", "100"),
        (vec![("ADMIN_ADDR", "localhost")], "ADMIN_ADDR", "localhost"),
        (
            vec![("ISTIO_META_DNS_PROXY_ADDR", "localhost")],
            "ISTIO_META_DNS_PROXY_ADDR",
            "localhost",
        ),
        (
            vec![("ISTIO_META_DNS_CAPTURE", "maybe")],
            "ISTIO_META_DNS_CAPTURE",
            "maybe",
        ),
    ] {
        let e = cfg(&vars).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert_eq!(e.value, value, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(field), "{msg}");
    }
}

#[test]
fn dns_proxy_settings_as_upstream() {
    let d = cfg(&[]).unwrap().dns;
    assert!(d.enabled);
    assert_eq!(d.addr, DnsProxyAddr::Localhost(15053));
    assert_eq!(d.resolv_conf, PathBuf::from("/etc/resolv.conf"));
    let d = cfg(&[
        ("ISTIO_META_DNS_CAPTURE", "false"),
        ("ISTIO_META_DNS_PROXY_ADDR", "127.0.0.1:5353"),
        ("DNS_RESOLV_CONF", "/tmp/r.conf"),
    ])
    .unwrap()
    .dns;
    assert!(!d.enabled);
    assert_eq!(
        d.addr,
        DnsProxyAddr::Addr("127.0.0.1:5353".parse().unwrap())
    );
    assert_eq!(d.addr.port(), 5353);
    assert_eq!(d.resolv_conf, PathBuf::from("/tmp/r.conf"));
    let d = cfg(&[("ISTIO_META_DNS_PROXY_ADDR", "localhost:15054")])
        .unwrap()
        .dns;
    assert_eq!(d.addr, DnsProxyAddr::Localhost(15054));
}

#[test]
fn workload_info_round_trip() {
    let w: WorkloadInfo = "ns/name/sa".parse().unwrap();
    assert_eq!(w.to_string(), "ns/name/sa");
    assert!("ns//sa".parse::<WorkloadInfo>().is_err());
}

/// Upstream's names for the control-plane connections: `XDS_ROOT_CA`/`CA_ROOT_CA` (a file,
/// or `SYSTEM` for the system's trust store), `ALT_XDS_HOSTNAME`/`ALT_CA_HOSTNAME`, the
/// token file `AUTH_TOKEN` (our `CA_TOKEN_PATH` wins), and `CONNECTION_TERMINATION_DEADLINE`.
#[test]
fn control_plane_roots_names_token_and_drain_deadline() {
    let c = cfg(&[
        ("XDS_ROOT_CA", "SYSTEM"),
        ("CA_ROOT_CA", "/ca-root.pem"),
        ("ALT_XDS_HOSTNAME", "istiod.istio-system.svc"),
        ("ALT_CA_HOSTNAME", "ca.example.com"),
        ("AUTH_TOKEN", "/tok"),
        ("CONNECTION_TERMINATION_DEADLINE", "20s"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "60"),
    ])
    .unwrap();
    assert_eq!(c.xds_root_ca, ControlPlaneRoots::System);
    assert_eq!(c.ca_root_ca, ControlPlaneRoots::File("/ca-root.pem".into()));
    assert_eq!(
        c.alt_xds_hostname.as_deref(),
        Some("istiod.istio-system.svc")
    );
    assert_eq!(c.alt_ca_hostname.as_deref(), Some("ca.example.com"));
    assert_eq!(c.ca_token_path, PathBuf::from("/tok"));
    assert_eq!(c.drain_budget(), Duration::from_secs(20));
    let c = cfg(&[("AUTH_TOKEN", "/tok"), ("CA_TOKEN_PATH", "/ours")]).unwrap();
    assert_eq!(c.ca_token_path, PathBuf::from("/ours"));
    // Without the deadline: derived from the grace period (60 s - 5 s).
    let c = cfg(&[("TERMINATION_GRACE_PERIOD_SECONDS", "60")]).unwrap();
    assert_eq!(c.drain_budget(), Duration::from_secs(55));
    let e = cfg(&[("CONNECTION_TERMINATION_DEADLINE", "soon")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("CONNECTION_TERMINATION_DEADLINE"), "{e}");
}

#[test]
fn keepalive_as_upstream() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.keepalive, Keepalive::default());
    assert_eq!(c.keepalive.time, Duration::from_secs(180));
    assert_eq!(c.keepalive.user_timeout(), None);
    let c = cfg(&[
        ("KEEPALIVE_TIME", "30s"),
        ("KEEPALIVE_INTERVAL", "5s"),
        ("KEEPALIVE_RETRIES", "4"),
        ("USER_TIMEOUT_ENABLED", "true"),
    ])
    .unwrap();
    assert_eq!(c.keepalive.user_timeout(), Some(Duration::from_secs(50)));
    let c = cfg(&[
        ("KEEPALIVE_ENABLED", "false"),
        ("USER_TIMEOUT_ENABLED", "true"),
    ])
    .unwrap();
    assert!(!c.keepalive.enabled);
    assert_eq!(c.keepalive.user_timeout(), None);
    for (k, v) in [
        ("KEEPALIVE_RETRIES", "0"),
        ("KEEPALIVE_RETRIES", "500"),
        ("KEEPALIVE_TIME", "x"),
    ] {
        let e = cfg(&[(k, v)]).unwrap_err().to_string();
        assert!(e.contains(k), "{e}");
    }
}

#[test]
fn ipv6_switch_inline_config_and_preferred_namespace() {
    let c = cfg(&[]).unwrap();
    assert!(c.ipv6_enabled);
    assert_eq!(c.wildcard_ip().to_string(), "::");
    assert_eq!(c.stats_addr.to_string(), "[::]:15020");
    let c = cfg(&[("IPV6_ENABLED", "false")]).unwrap();
    assert_eq!(c.wildcard_ip().to_string(), "0.0.0.0");
    assert_eq!(
        (c.stats_addr.to_string(), c.readiness_addr.to_string()),
        ("0.0.0.0:15020".into(), "0.0.0.0:15021".into())
    );
    assert_eq!(
        cfg(&[("IPV6_ENABLED", "perhaps")]).unwrap_err().field,
        "IPV6_ENABLED"
    );
    let c = cfg(&[("PREFERED_SERVICE_NAMESPACE", " shared ")]).unwrap();
    assert_eq!(c.preferred_service_namespace.as_deref(), Some("shared"));
    let c = cfg(&[("LOCAL_XDS", "workloads: []")]).unwrap();
    assert_eq!(c.local_xds.as_deref(), Some("workloads: []"));
    let e = cfg(&[
        ("LOCAL_XDS", "workloads: []"),
        ("LOCAL_XDS_PATH", "/x.yaml"),
    ])
    .unwrap_err();
    assert_eq!(e.field, "LOCAL_XDS");
    assert!(e.reason.contains("LOCAL_XDS_PATH"), "{e}");
}

#[test]
fn proxy_config_fills_in_unset_variables() {
    let mesh = "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  \
                proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: \"false\"\n";
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let c = Config::from_sources(
        env(&[("PROXY_CONFIG", "concurrency: 3\nproxyAdminPort: 15999")]),
        Some(mesh),
    )
    .unwrap();
    assert_eq!(
        c.xds_address.as_deref(),
        Some("https://istiod.istio-system.svc:15012")
    );
    assert_eq!(c.worker_threads, 3);
    assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15999");
    assert!(!c.dns.enabled, "proxyMetadata DNS_CAPTURE=false");
    // Environment variables win; a local config source keeps discoveryAddress out.
    let c = Config::from_sources(
        env(&[
            ("PROXY_CONFIG", "concurrency: 3"),
            ("ZTUNNEL_WORKER_THREADS", "1"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("LOCAL_XDS_PATH", "/etc/local.yaml"),
        ]),
        Some(mesh),
    )
    .unwrap();
    assert_eq!((c.worker_threads, c.dns.enabled), (1, true));
    assert_eq!(c.xds_address, None);
    let e = Config::from_sources(env(&[("PROXY_CONFIG", "concurrency: [")]), None).unwrap_err();
    assert_eq!(e.field, "PROXY_CONFIG");
}

#[test]
fn socks5_is_off_by_default_and_its_port_is_a_proxy_port_when_on() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.socks5_addr, None);
    assert!(!c.is_proxy_port(15080));
    assert!(c.is_proxy_port(15001) && c.is_proxy_port(15006) && c.is_proxy_port(15008));
    let c = cfg(&[("UNSTABLE_ENABLE_SOCKS5", "true")]).unwrap();
    assert_eq!(c.socks5_addr, Some("127.0.0.1:15080".parse().unwrap()));
    assert!(c.is_proxy_port(15080));
    let dump = serde_json::to_value(&c).unwrap();
    assert_eq!(dump["socks5_addr"], "127.0.0.1:15080");
    let e = cfg(&[("UNSTABLE_ENABLE_SOCKS5", "maybe")]).unwrap_err();
    assert_eq!(e.field, "UNSTABLE_ENABLE_SOCKS5");
}
