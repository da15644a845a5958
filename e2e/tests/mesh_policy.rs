//! L4 authorization and telemetry end to end (root): pods in real network namespaces on a
//! simulated node, each meshed pod with its own ztunnel process (dedicated mode, the real
//! binary) and the in-pod capture rules, all driven by one `LOCAL_XDS_PATH` file.
//!
//! - An ALLOW-only-from-namespace-x policy lets x in and keeps y (and plaintext from outside
//!   the mesh) out.
//! - A DENY on a port blocks only that port.
//! - A principal wildcard (`!Suffix /sa/trusted`) admits that service account from any
//!   namespace and nothing else.
//! - Metrics: after a known number of connections and bytes, `/metrics` of both ztunnels has
//!   exactly those counts, with the full Istio label set (reporter on both sides,
//!   destination service, `connection_security_policy`, `response_flags` on a denial).

use std::net::SocketAddr;
use std::time::Duration;

use e2e::dedicated_mesh::{DedicatedMesh, EchoServer, echo, wait_until, workload_entry};
use e2e::netsim::can_create_netns;
use e2e::prom_text;

macro_rules! require_root {
    () => {
        if !can_create_netns() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
    };
}

const APP_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

/// A server pod `default/server` (sa `server`) plus client pods `(name, namespace, sa)`,
/// all meshed, with `policies` (YAML list items) in the config. Echo servers on 8080 and
/// 9090 in the server pod.
fn policy_mesh(
    tag: &str,
    clients: &[(&str, &str, &str)],
    policies: &str,
) -> (DedicatedMesh, Vec<EchoServer>) {
    let mut mesh = DedicatedMesh::new(tag).expect("mesh");
    mesh.add_pod("server", "default", "server").unwrap();
    for (name, ns, sa) in clients {
        mesh.add_pod(name, ns, sa).unwrap();
    }
    let mut yaml = String::from("workloads:\n");
    for p in mesh.pods() {
        yaml.push_str(&workload_entry(p, "HBONE", "{}", ""));
    }
    yaml.push_str("policies:\n");
    yaml.push_str(policies);
    mesh.write_config(&yaml);
    let names: Vec<String> = mesh.pods().iter().map(|p| p.name.clone()).collect();
    for n in names {
        mesh.start_ztunnel(&n);
    }
    let servers = vec![
        EchoServer::start(mesh.pod("server").netns(), APP_PORT, None),
        EchoServer::start(mesh.pod("server").netns(), OTHER_PORT, None),
    ];
    (mesh, servers)
}

/// Whether `from` reaches the server's `port` and gets its data echoed back.
fn reaches(mesh: &DedicatedMesh, from: &str, port: u16) -> bool {
    let data = format!("hello from {from} to port {port}").repeat(50);
    let dst = SocketAddr::from((mesh.pod("server").ip(), port));
    match mesh.pod(from).connect(dst) {
        Ok(s) => matches!(echo(s, data.as_bytes()), Ok(back) if back == data.as_bytes()),
        Err(_) => false,
    }
}

fn refused_by_policy(mesh: &DedicatedMesh, pod: &str) -> f64 {
    prom_text::sum(
        &mesh.pod(pod).metrics(),
        "ztunnel_connections_refused_total",
        &[("reason", "policy_denied")],
    )
}

#[test]
fn allow_only_from_namespace_x() {
    require_root!();
    let (mut mesh, _servers) = policy_mesh(
        "polns",
        &[("cx", "x", "client"), ("cy", "y", "client")],
        r#"- name: allow-x
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{namespaces: [!Exact x]}]]]
"#,
    );
    // A pod outside the mesh (no ztunnel, not in the config): plaintext into the server.
    mesh.add_pod("outside", "y", "default").unwrap();

    assert!(reaches(&mesh, "cx", APP_PORT), "namespace x must get in");
    assert!(
        !reaches(&mesh, "cy", APP_PORT),
        "namespace y must be kept out"
    );
    assert!(
        !reaches(&mesh, "outside", APP_PORT),
        "plaintext has no namespace: kept out"
    );
    let server = mesh.pod("server");
    wait_until("two denials counted", Duration::from_secs(5), || {
        refused_by_policy(&mesh, "server") == 2.0
    });
    // Both denials logged with the policy, the HBONE one with y's identity.
    wait_until("denials access-logged", Duration::from_secs(5), || {
        server
            .log_lines(&[
                "denied by policy default/allow-x",
                "no ALLOW policy matched",
            ])
            .len()
            == 2
    });
    assert_eq!(
        server
            .log_lines(&[
                "denied by policy default/allow-x",
                "src.identity=spiffe://cluster.local/ns/y/sa/client"
            ])
            .len(),
        1
    );
    // The client side saw the 401.
    assert!(
        !mesh
            .pod("cy")
            .log_lines(&["connection complete", "401"])
            .is_empty(),
        "{}",
        mesh.pod("cy").log()
    );
    // x's connection is logged as allowed on the server, with its identity.
    assert!(
        !server
            .log_lines(&[
                "connection complete",
                "direction=\"inbound\"",
                "src.identity=spiffe://cluster.local/ns/x/sa/client"
            ])
            .is_empty()
    );
    // config_dump shows the policy.
    let dump = server.admin("/config_dump");
    assert!(dump.contains("\"allow-x\""), "{dump}");
    mesh.shutdown();
}

#[test]
fn deny_on_a_port_blocks_only_that_port() {
    require_root!();
    let (mesh, _servers) = policy_mesh(
        "polport",
        &[("cx", "x", "client")],
        &format!(
            r#"- name: deny-{OTHER_PORT}
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{{destinationPorts: [{OTHER_PORT}]}}]]]
"#
        ),
    );
    assert!(reaches(&mesh, "cx", APP_PORT));
    assert!(!reaches(&mesh, "cx", OTHER_PORT));
    assert!(
        reaches(&mesh, "cx", APP_PORT),
        "still open after the denial"
    );
    wait_until("one denial counted", Duration::from_secs(5), || {
        refused_by_policy(&mesh, "server") == 1.0
    });
    let server = mesh.pod("server");
    wait_until("denial logged", Duration::from_secs(5), || {
        server
            .log_lines(&[
                &format!("denied by policy default/deny-{OTHER_PORT}"),
                "DENY policy matched",
            ])
            .len()
            == 1
    });
    mesh.shutdown();
}

#[test]
fn principal_wildcard() {
    require_root!();
    let (mesh, _servers) = policy_mesh(
        "polprin",
        &[
            ("trusted-x", "x", "trusted"),
            ("trusted-y", "y", "trusted"),
            ("other-x", "x", "other"),
        ],
        r#"- name: only-trusted
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{principals: [!Suffix /sa/trusted]}]]]
"#,
    );
    assert!(reaches(&mesh, "trusted-x", APP_PORT));
    assert!(reaches(&mesh, "trusted-y", APP_PORT));
    assert!(!reaches(&mesh, "other-x", APP_PORT));
    wait_until("one denial counted", Duration::from_secs(5), || {
        refused_by_policy(&mesh, "server") == 1.0
    });
    assert_eq!(
        mesh.pod("server")
            .log_lines(&[
                "denied by policy default/only-trusted",
                "src.identity=spiffe://cluster.local/ns/x/sa/other"
            ])
            .len(),
        1
    );
    mesh.shutdown();
}

/// The full label set of one `istio_tcp_*` series, as a sorted list.
fn labels(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn metrics_count_connections_and_bytes_with_istio_labels() {
    require_root!();
    let mut mesh = DedicatedMesh::new("meshmetrics").expect("mesh");
    mesh.add_pod("client", "x", "client").unwrap();
    mesh.add_pod("server", "default", "server").unwrap();
    mesh.add_pod("plain", "default", "default").unwrap();
    let client = mesh.pod("client");
    let server = mesh.pod("server");
    let plain = mesh.pod("plain");
    let yaml = format!(
        "workloads:\n{}{}{}services:\n{}policies:\n{}",
        workload_entry(
            client,
            "HBONE",
            "{}",
            "  workloadName: client-app\n  canonicalName: client-svc\n  canonicalRevision: v1\n"
        ),
        workload_entry(
            server,
            "HBONE",
            "{\"default/echo.default.svc.cluster.local\": {80: 8080}}",
            "  workloadName: server-app\n  canonicalName: server-svc\n  canonicalRevision: v2\n"
        ),
        workload_entry(plain, "TCP", "{}", ""),
        "- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  \
         vips: [\"/10.96.0.10\"]\n  ports: {80: 8080}\n",
        "- name: deny-9090\n  namespace: default\n  scope: Namespace\n  action: Deny\n  \
         rules: [[[{destinationPorts: [9090]}]]]\n",
    );
    mesh.write_config(&yaml);
    mesh.start_ztunnel("client");
    mesh.start_ztunnel("server");
    let client = mesh.pod("client");
    let server = mesh.pod("server");
    let plain = mesh.pod("plain");
    let _echo = EchoServer::start(server.netns(), APP_PORT, None);
    let _denied = EchoServer::start(server.netns(), 9090, None);
    let _plain = EchoServer::start(plain.netns(), 7070, None);

    // 5 connections through the service VIP, 1000 bytes each way each.
    const N: usize = 5;
    const BYTES: usize = 1000;
    let data = vec![b'm'; BYTES];
    for _ in 0..N {
        let s = client.connect("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(echo(s, &data).unwrap(), data);
    }
    // One plaintext passthrough to a TCP workload (200 bytes), one denied connection.
    let s = client
        .connect(SocketAddr::from((plain.ip(), 7070)))
        .unwrap();
    assert_eq!(echo(s, &data[..200]).unwrap(), &data[..200]);
    let s = client
        .connect(SocketAddr::from((server.ip(), 9090)))
        .unwrap();
    assert_ne!(echo(s, &data).unwrap_or_default(), data);

    let client_id = client.identity();
    let server_id = server.identity();
    let series = |reporter: &str, flags: &str| {
        labels(&[
            ("reporter", reporter.into()),
            ("source_workload", "client-app".into()),
            ("source_canonical_service", "client-svc".into()),
            ("source_canonical_revision", "v1".into()),
            ("source_workload_namespace", "x".into()),
            ("source_principal", client_id.clone()),
            ("source_app", "client-svc".into()),
            ("source_version", "v1".into()),
            ("source_cluster", "Kubernetes".into()),
            (
                "destination_service",
                "echo.default.svc.cluster.local".into(),
            ),
            ("destination_service_namespace", "default".into()),
            ("destination_service_name", "echo".into()),
            ("destination_workload", "server-app".into()),
            ("destination_canonical_service", "server-svc".into()),
            ("destination_canonical_revision", "v2".into()),
            ("destination_workload_namespace", "default".into()),
            ("destination_principal", server_id.clone()),
            ("destination_app", "server-svc".into()),
            ("destination_version", "v2".into()),
            ("destination_cluster", "Kubernetes".into()),
            ("request_protocol", "tcp".into()),
            ("response_flags", flags.into()),
            ("connection_security_policy", "mutual_tls".into()),
            // No locality in the config: as Istio's ztunnel, `unknown`.
            ("source_region", "unknown".into()),
            ("source_zone", "unknown".into()),
            ("destination_region", "unknown".into()),
            ("destination_zone", "unknown".into()),
        ])
    };
    let value = |text: &str, name: &str, want: &[(String, String)]| -> f64 {
        prom_text::parse(text)
            .into_iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                let mut got: Vec<(String, String)> = s.labels.clone().into_iter().collect();
                got.sort();
                got == want
            })
            .map(|s| s.value)
            .sum()
    };
    for (pod, reporter) in [(client, "source"), (server, "destination")] {
        wait_until(
            &format!("{reporter} side closed counter"),
            Duration::from_secs(5),
            || {
                value(
                    &pod.metrics(),
                    "istio_tcp_connections_closed_total",
                    &series(reporter, "-"),
                ) == N as f64
            },
        );
        let text = pod.metrics();
        let ok = series(reporter, "-");
        assert_eq!(
            value(&text, "istio_tcp_connections_opened_total", &ok),
            N as f64,
            "{reporter}\n{text}"
        );
        assert_eq!(
            value(&text, "istio_tcp_received_bytes_total", &ok),
            (N * BYTES) as f64,
            "{reporter}\n{text}"
        );
        assert_eq!(
            value(&text, "istio_tcp_sent_bytes_total", &ok),
            (N * BYTES) as f64,
            "{reporter}\n{text}"
        );
        assert_eq!(
            value(&text, "istio_tcp_connections_failed_total", &ok),
            0.0,
            "{reporter}\n{text}"
        );
        // As upstream: sockets, not streams. The client's app connections are closed; the
        // server still holds the pooled HBONE connection(s) they went over (one per
        // client data-plane thread at most; released after 5 idle minutes).
        let sockets = prom_text::sum(&text, "istio_tcp_sockets_open", &[]);
        if reporter == "source" {
            assert_eq!(sockets, 0.0, "{reporter}\n{text}");
        } else {
            assert!((1.0..=2.0).contains(&sockets), "{reporter}\n{text}");
        }
    }

    // The denied connection: opened with "-", closed and failed with DENY, on both sides;
    // the destination service is unknown (port 9090 is no service port).
    for (pod, reporter) in [(client, "source"), (server, "destination")] {
        let text = pod.metrics();
        let deny = [
            ("reporter", reporter),
            ("destination_workload", "server-app"),
            ("destination_service", "unknown"),
            ("response_flags", "DENY"),
            ("connection_security_policy", "mutual_tls"),
        ];
        assert_eq!(
            prom_text::sum(&text, "istio_tcp_connections_closed_total", &deny),
            1.0,
            "{reporter}\n{text}"
        );
        assert_eq!(
            prom_text::sum(&text, "istio_tcp_connections_failed_total", &deny),
            1.0,
            "{reporter}\n{text}"
        );
    }

    // Plaintext passthrough: reported by the source only, connection_security_policy
    // unknown, the TCP workload's configured identity as principal (as upstream).
    let text = client.metrics();
    let plain_labels = [
        ("reporter", "source"),
        ("destination_workload", "plain"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/default",
        ),
        ("destination_service", "unknown"),
        ("connection_security_policy", "unknown"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        prom_text::sum(&text, "istio_tcp_connections_opened_total", &plain_labels),
        1.0,
        "{text}"
    );
    assert_eq!(
        prom_text::sum(&text, "istio_tcp_received_bytes_total", &plain_labels),
        200.0,
        "{text}"
    );
    assert_eq!(
        prom_text::sum(&text, "istio_tcp_sent_bytes_total", &plain_labels),
        200.0,
        "{text}"
    );
    // Totals: 5 + 1 + 1 opened at the source, 5 + 1 at the destination.
    assert_eq!(
        prom_text::sum(&text, "istio_tcp_connections_opened_total", &[]),
        7.0,
        "{text}"
    );
    assert_eq!(
        prom_text::sum(&server.metrics(), "istio_tcp_connections_opened_total", &[]),
        6.0
    );
    mesh.shutdown();
}
