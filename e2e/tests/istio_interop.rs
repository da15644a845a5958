//! Interoperability with Istio's own ztunnel (root; needs Istio's binary, so it runs where
//! `make istio-ztunnel` has built one: `make test-interop`).
//!
//! Two pods on one node, each with a dedicated ztunnel behind the in-pod capture rules: pod
//! `ours` runs this project's ztunnel, pod `istio` runs Istio's, both reading the same
//! local-config file. Both ztunnels' certificates chain to Istio's test root (Istio's
//! ztunnel issues its own with `FAKE_CA`; ours gets that root's certificate and key as its
//! local CA), as two ztunnels of one mesh share istiod's root.
//!
//! - Plain TCP clients in either pod reach an echo server in the other: bytes arrive intact
//!   through HBONE in both directions (our client side against Istio's server side, and
//!   Istio's client side against ours), and each side's access log names the other's
//!   SPIFFE identity; the same through each other's Service VIP (the client side picks the
//!   endpoint and its target port). Both label their `istio_tcp_*` metrics alike.
//! - An AuthorizationPolicy in the shared config that denies `ours` in the `istio` pod is
//!   enforced by Istio's ztunnel (its 401 to our CONNECT): our client's connection is closed
//!   without data and our access log records the refusal; the same policy in our pod denies
//!   Istio's client.
//! - ZDS: this project's node agent (in-pod redirector and ZDS server, in the test process)
//!   enrols two pods with Istio's ztunnel (its own netns, `PROXY_MODE=shared`, connected to
//!   the agent's socket): Istio's ztunnel takes the pods' netns over ZDS, serves them from
//!   inside them behind the agent's capture rules, and carries pod A's plain TCP to pod B
//!   over HBONE with each pod's identity.
//!
//! - Multi-network (double HBONE) both ways through an east-west gateway stand-in: a client
//!   on network `east` reaches a Service whose endpoint is on `west` behind the gateway;
//!   our client with Istio's server, and Istio's client with our server. The outer tunnel
//!   ends at the gateway, the inner TLS (the client's identity against the server's)
//!   runs end to end, and the inner CONNECT names the Service's hostname.
//!
//! Istio's build is found as `e2e::istio_ztunnel` says (`ISTIO_ZTUNNEL`,
//! `ISTIO_ZTUNNEL_SRC`); without one the tests are skipped with the reason.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

mod mesh_support;

use std::sync::Arc;

use e2e::dedicated_mesh::{
    DedicatedMesh, EchoServer, Flavor, MeshPod, connect_in, echo_checked, http_get, wait_until,
    workload_entry,
};
use e2e::inpod_agent::{InpodAgent, pod_redirect};
use e2e::istio_ztunnel::{FAKE_CA_ENV, IstioZtunnel, local_workload};
use e2e::netsim::{Cluster, NamedNetns, Pod, Process, can_create_netns};
use e2e::prom_text;
use mesh_support::waypoint::Waypoint;
use node_agent::redirect::Redirector;
use ztunnel::identity::Identity;
use ztunnel::identity::local_ca::LocalCa;

const ECHO_PORT: u16 = 8080;
/// Service VIPs (port 80) in front of pod `ours` and pod `istio`.
const VIP_OURS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
const VIP_ISTIO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);

macro_rules! require {
    () => {{
        if !can_create_netns() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
        let Some(found) = e2e::istio_ztunnel::find_or_skip() else {
            return;
        };
        found
    }};
}

/// Pod `ours` (`default/ours`, sa `sa-ours`) with this ztunnel and pod `istio`
/// (`default/istio`, sa `sa-istio`) with Istio's; `policies`: local-config policies.
fn mesh(tag: &str, istio: &IstioZtunnel, policies: &str) -> DedicatedMesh {
    let mut m = DedicatedMesh::new(tag).expect("mesh");
    m.add_pod("ours", "default", "sa-ours").expect("pod ours");
    m.add_pod("istio", "default", "sa-istio")
        .expect("pod istio");
    // Each pod behind a Service (VIP port 80 → 8080), in the same file for both ztunnels.
    let service = |name: &str, vip: Ipv4Addr| {
        format!(
            "- name: {name}\n  namespace: default\n  hostname: {name}.default.svc.cluster.local\n  \
             vips: [\"/{vip}\"]\n  ports: {{80: {ECHO_PORT}}}\n"
        )
    };
    let member = |name: &str| {
        format!("{{\"default/{name}.default.svc.cluster.local\": {{80: {ECHO_PORT}}}}}")
    };
    m.write_config(&format!(
        "workloads:\n{}{}services:\n{}{}{policies}",
        workload_entry(m.pod("ours"), "HBONE", &member("svc-ours"), ""),
        workload_entry(m.pod("istio"), "HBONE", &member("svc-istio"), ""),
        service("svc-ours", VIP_OURS),
        service("svc-istio", VIP_ISTIO),
    ));
    m.start_ztunnel_as(
        "ours",
        Flavor::OursWithCa {
            cert: &istio.root_cert,
            key: &istio.root_key,
        },
    );
    m.start_ztunnel_as(
        "istio",
        Flavor::Istio {
            binary: &istio.binary,
        },
    );
    m
}

/// `len` bytes through an echo server in `to`, from a plain client in `from`.
fn echo_through(from: &MeshPod, to: &MeshPod, len: usize) -> std::io::Result<()> {
    echo_to(from, SocketAddr::from((to.ip(), ECHO_PORT)), len)
}

/// `len` bytes through the echo server at `dst` (a pod or a Service VIP), from `from`.
fn echo_to(from: &MeshPod, dst: SocketAddr, len: usize) -> std::io::Result<()> {
    echo_checked(from.connect(dst)?, len)
}

/// Waits for an access-log line of `p`'s ztunnel with every needle.
fn access_line(p: &MeshPod, needles: &[&str]) -> String {
    let mut all = vec!["connection complete"];
    all.extend_from_slice(needles);
    wait_until(
        &format!("{}'s ztunnel to log {all:?}", p.name),
        Duration::from_secs(10),
        || !p.log_lines(&all).is_empty(),
    );
    p.log_lines(&all).remove(0)
}

#[test]
fn hbone_both_ways_between_this_and_istios_ztunnel() {
    let istio = require!();
    let m = mesh("interop", &istio, "");
    let (ours, theirs) = (m.pod("ours"), m.pod("istio"));
    let _servers = [
        EchoServer::start(ours.netns(), ECHO_PORT, None),
        EchoServer::start(theirs.netns(), ECHO_PORT, None),
    ];
    let hbone = format!("{}:15008", theirs.ip());

    // Our client side, Istio's server side.
    echo_through(ours, theirs, 4 << 20).expect("ours -> istio");
    let line = access_line(ours, &["direction=\"outbound\"", &hbone]);
    assert!(line.contains(&theirs.identity()), "{line}");
    assert!(!line.contains("error="), "{line}");
    let line = access_line(theirs, &["direction=\"inbound\"", &ours.identity()]);
    assert!(line.contains(&theirs.identity()), "{line}");

    // Istio's client side, our server side.
    echo_through(theirs, ours, 4 << 20).expect("istio -> ours");
    let line = access_line(theirs, &["direction=\"outbound\"", &ours.identity()]);
    assert!(line.contains(&format!("{}:15008", ours.ip())), "{line}");
    let line = access_line(ours, &["direction=\"inbound\"", &theirs.identity()]);
    assert!(!line.contains("error="), "{line}");

    // Through each other's Service VIP: the client side picks the endpoint and asks for
    // its target port; the server side serves it.
    echo_to(ours, SocketAddr::from((VIP_ISTIO, 80)), 64 << 10).expect("ours -> istio's VIP");
    let line = access_line(ours, &["direction=\"outbound\"", "svc-istio.default.svc"]);
    assert!(
        line.contains(&format!("dst.hbone_addr={}:{ECHO_PORT}", theirs.ip())),
        "{line}"
    );
    echo_to(theirs, SocketAddr::from((VIP_OURS, 80)), 64 << 10).expect("istio -> our VIP");
    let line = access_line(theirs, &["direction=\"outbound\"", "svc-ours.default.svc"]);
    assert!(
        line.contains(&format!("dst.hbone_addr={}:{ECHO_PORT}", ours.ip())),
        "{line}"
    );

    // Both ztunnels label their TCP metrics alike (dashboards built for Istio's work).
    let (our_metrics, their_metrics) = (
        prom_text::parse(&ours.metrics()),
        prom_text::parse(&theirs.metrics()),
    );
    for family in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        for reporter in ["source", "destination"] {
            let keys = |samples: &[prom_text::Sample]| {
                prom_text::matching(samples, family, &[("reporter", reporter)])
                    .first()
                    .map(|s| s.labels.keys().cloned().collect::<Vec<_>>())
            };
            let (o, t) = (keys(&our_metrics), keys(&their_metrics));
            assert!(o.is_some(), "no {family}{{reporter={reporter}}} from ours");
            assert_eq!(
                o, t,
                "labels of {family}{{reporter={reporter}}}: ours vs Istio's"
            );
        }
    }

    // Both /config_dump documents have Istio's shape (istioctl ztunnel-config reads them):
    // every key Istio's ztunnel gives a workload, service (endpoints included) or
    // certificate, ours gives too.
    let dump = |p: &MeshPod| -> serde_json::Value {
        let text = p.admin("/config_dump");
        serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).expect("config dump JSON")
    };
    let (our_dump, their_dump) = (dump(ours), dump(theirs));
    for kind in ["workloads", "services", "certificates"] {
        let keys = |d: &serde_json::Value| -> std::collections::BTreeSet<String> {
            d[kind]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|item| item.as_object().into_iter().flat_map(|o| o.keys().cloned()))
                .collect()
        };
        let missing: Vec<String> = keys(&their_dump)
            .difference(&keys(&our_dump))
            .cloned()
            .collect();
        assert!(
            missing.is_empty(),
            "{kind}: keys Istio's dump has and ours lacks: {missing:?}"
        );
    }

    // Many streams at once over the pooled connections, both ways.
    std::thread::scope(|s| {
        for i in 0..20 {
            let (from, to) = if i % 2 == 0 {
                (ours, theirs)
            } else {
                (theirs, ours)
            };
            s.spawn(move || echo_through(from, to, 64 << 10).expect("concurrent echo"));
        }
    });
    m.shutdown();
}

#[test]
fn each_side_enforces_policy_against_the_other() {
    let istio = require!();
    // Namespace-wide DENY of each ztunnel's identity: enforced by the other side's ztunnel
    // (the only one that sees it as a source).
    let deny = |sa: &str| {
        format!(
            "- name: deny-{sa}\n  namespace: default\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  \
             rules: [[[{{principals: [!Suffix /sa/{sa}]}}]]]\n"
        )
    };
    let policies = format!("policies:\n{}{}", deny("sa-ours"), deny("sa-istio"));
    let m = mesh("interopdeny", &istio, &policies);
    let (ours, theirs) = (m.pod("ours"), m.pod("istio"));
    let _servers = [
        EchoServer::start(ours.netns(), ECHO_PORT, None),
        EchoServer::start(theirs.netns(), ECHO_PORT, None),
    ];

    // Istio's ztunnel answers our CONNECT with 401: our client gets no byte back.
    assert!(refused(ours, theirs), "ours -> istio was not refused");
    let line = access_line(ours, &["direction=\"outbound\"", "error="]);
    assert!(line.contains("401"), "{line}");
    assert!(line.contains(&theirs.identity()), "{line}");

    // Ours refuses Istio's client and says which policy.
    assert!(refused(theirs, ours), "istio -> ours was not refused");
    wait_until("our denial logged", Duration::from_secs(10), || {
        !ours
            .log_lines(&["denied by policy default/deny-sa-istio", &theirs.identity()])
            .is_empty()
    });
    m.shutdown();
}

/// A connection from `from` to the echo server in `to` that the mesh refused: closed (or
/// reset) before a byte of the echo came back.
fn refused(from: &MeshPod, to: &MeshPod) -> bool {
    let Ok(mut s) = from.connect(SocketAddr::from((to.ip(), ECHO_PORT))) else {
        return true;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = std::io::Write::write_all(&mut s, b"ping");
    let mut buf = [0u8; 16];
    !matches!(s.read(&mut buf), Ok(n) if n > 0)
}

/// Plain TCP from `from` to `to`'s echo server: `len` bytes there and back.
fn echo_between_pods(from: &Pod, to: &Pod, len: usize) -> std::io::Result<()> {
    echo_checked(
        connect_in(from.netns(), SocketAddr::from((to.ip(), ECHO_PORT)))?,
        len,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_ztunnel_serves_pods_this_node_agent_enrols() {
    let istio = require!();
    let cluster = Cluster::new("zdsinterop", 1).expect("cluster");
    let node = cluster.node(1);
    let a = node.add_pod("a").expect("pod a");
    let b = node.add_pod("b").expect("pod b");
    let ztunnel_pod = node.add_pod("ztunnel").expect("ztunnel pod");
    let dir = cluster.scope().dir().to_path_buf();
    let uds = dir.join("ztunnel/ztunnel.sock");
    std::fs::create_dir_all(uds.parent().unwrap()).unwrap();
    let config = dir.join("local-config.yaml");
    let workload = |name: &str, ip: Ipv4Addr| {
        local_workload(
            &format!("uid-{name}"),
            name,
            "default",
            &format!("sa-{name}"),
            ip,
            node.name(),
        )
    };
    std::fs::write(
        &config,
        format!(
            "workloads:\n{}{}",
            workload("a", a.ip()),
            workload("b", b.ip())
        ),
    )
    .unwrap();

    let agent = InpodAgent::start(&uds, node.netns().path(), &[]).await;
    let log = dir.join("istio-ztunnel.log");
    let mut cmd = ztunnel_pod.netns().command(&istio.binary);
    cmd.arg("proxy")
        .env("PROXY_MODE", "shared")
        .env("INPOD_UDS", &uds)
        .env("LOCAL_XDS_PATH", &config)
        .envs(FAKE_CA_ENV)
        .env("NODE_NAME", node.name())
        .env("POD_NAME", "ztunnel-test")
        .env("POD_NAMESPACE", "istio-system")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap());
    let mut istio = Process::spawn(cmd).expect("start Istio's ztunnel");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !matches!(
        http_get(ztunnel_pod.netns(), 15021, "/healthz/ready"),
        Some((200, _))
    ) {
        assert!(
            std::time::Instant::now() < deadline,
            "Istio's ztunnel not ready within 20 s (ZDS snapshot from the agent?):\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (pa, pb) = (
        pod_redirect(&a, "uid-a", "sa-a"),
        pod_redirect(&b, "uid-b", "sa-b"),
    );
    agent.redirector.enrol(&pa).await.expect("enrol a");
    agent.redirector.enrol(&pb).await.expect("enrol b");
    let _server = EchoServer::start(b.netns(), ECHO_PORT, None);

    tokio::task::block_in_place(|| {
        wait_until(
            "pod a to reach pod b through Istio's ztunnel",
            Duration::from_secs(20),
            || echo_between_pods(&a, &b, 64 << 10).is_ok(),
        );
        echo_between_pods(&a, &b, 4 << 20).expect("4 MiB from a to b");
    });
    let (ida, idb) = (
        "spiffe://cluster.local/ns/default/sa/sa-a",
        "spiffe://cluster.local/ns/default/sa/sa-b",
    );
    let hbone = format!("{}:15008", b.ip());
    tokio::task::block_in_place(|| {
        e2e::istio_ztunnel::assert_hbone_both_directions(read_log, ida, idb, &hbone)
    });

    agent.zds.shutdown();
    agent.redirector.cleanup_all().await.expect("clean up");
    istio.terminate(Duration::from_secs(5));
}

/// East-side VIPs of the two multi-network Services (port 80 → 8080).
const VIP_MN_ISTIO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const VIP_MN_OURS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 32);

/// Multi-network both ways through an east-west gateway: clients on network `east`,
/// servers on `west` behind gateway `ew` (a stand-in that terminates the outer HBONE with
/// the gateway's identity and relays the inner tunnel's bytes to the endpoint's
/// `:15008`). Our client reaches Istio's server, Istio's client reaches ours: data intact,
/// the gateway sees the client's identity and the Service's hostname and relays more bytes
/// than the payload (the inner TLS and HTTP/2 around it), and each server's access log
/// names the client's identity, arriving from the gateway's address.
#[test]
fn double_hbone_through_an_east_west_gateway_both_ways() {
    let istio = require!();
    let mut m = DedicatedMesh::new("interopmn").expect("mesh");
    for (name, sa) in [
        ("ourcli", "sa-ourcli"),
        ("istsrv", "sa-istsrv"),
        ("istcli", "sa-istcli"),
        ("oursrv", "sa-oursrv"),
    ] {
        m.add_pod(name, "default", sa).expect("pod");
    }
    m.add_pod("ew", "istio-system", "istio-eastwestgateway")
        .expect("gateway pod");
    let ew_ip = m.pod("ew").ip();
    let east = "  network: east\n";
    let west = format!(
        "  network: west\n  networkGateway: {{destination: \"west/{ew_ip}\", hboneMtlsPort: 15008}}\n"
    );
    let member =
        |svc: &str| format!("{{\"default/{svc}.default.svc.cluster.local\": {{80: {ECHO_PORT}}}}}");
    // Istio's client checks the inner TLS against the Service's `subjectAltNames` alone
    // (ours falls back to the endpoint's identity), so the Services list their server's.
    let service = |name: &str, vip: Ipv4Addr, server: &str| {
        format!(
            "- name: {name}\n  namespace: default\n  hostname: {name}.default.svc.cluster.local\n  \
             vips: [\"east/{vip}\"]\n  ports: {{80: {ECHO_PORT}}}\n  subjectAltNames: [\"{}\"]\n",
            m.pod(server).identity()
        )
    };
    m.write_config(&format!(
        "workloads:\n{}{}{}{}{}services:\n{}{}",
        workload_entry(m.pod("ourcli"), "HBONE", "{}", east),
        workload_entry(m.pod("istsrv"), "HBONE", &member("svc-istio"), &west),
        workload_entry(m.pod("istcli"), "HBONE", "{}", east),
        workload_entry(m.pod("oursrv"), "HBONE", &member("svc-ours"), &west),
        workload_entry(m.pod("ew"), "TCP", "{}", "  network: west\n"),
        service("svc-istio", VIP_MN_ISTIO, "istsrv"),
        service("svc-ours", VIP_MN_OURS, "oursrv"),
    ));
    // Ours takes its network from its own workload; Istio's from `NETWORK`.
    let ours = Flavor::OursWithCa {
        cert: &istio.root_cert,
        key: &istio.root_key,
    };
    m.start_ztunnel_as("ourcli", ours);
    m.start_ztunnel_as("oursrv", ours);
    let theirs = Flavor::Istio {
        binary: &istio.binary,
    };
    m.set_ztunnel_env("NETWORK", "west");
    m.start_ztunnel_as("istsrv", theirs);
    m.set_ztunnel_env("NETWORK", "east");
    m.start_ztunnel_as("istcli", theirs);
    let gw = Waypoint::start_gateway(
        NamedNetns::open(m.pod("ew").netns().name()).unwrap(),
        Identity::new("cluster.local", "istio-system", "istio-eastwestgateway"),
        Arc::new(LocalCa::from_files(&istio.root_cert, &istio.root_key).expect("Istio's test CA")),
        m.config_path().to_path_buf(),
    );
    let _servers = [
        EchoServer::start(m.pod("istsrv").netns(), ECHO_PORT, None),
        EchoServer::start(m.pod("oursrv").netns(), ECHO_PORT, None),
    ];

    for (client, server, svc, vip) in [
        ("ourcli", "istsrv", "svc-istio", VIP_MN_ISTIO),
        ("istcli", "oursrv", "svc-ours", VIP_MN_OURS),
    ] {
        let (c, s) = (m.pod(client), m.pod(server));
        let hostname = format!("{svc}.default.svc.cluster.local");
        let len = 256 << 10;
        echo_to(c, SocketAddr::from((vip, 80)), len)
            .unwrap_or_else(|e| {
                panic!(
                    "{client} -> {svc} through the gateway: {e}\ngateway: {:?}\n{client}'s log:\n{}\n{server}'s log:\n{}",
                    gw.records(),
                    c.log(),
                    s.log()
                )
            });
        wait_until(
            &format!("the gateway's relay for {client} ended"),
            Duration::from_secs(10),
            || {
                gw.records()
                    .iter()
                    .any(|r| r.peer_identity == c.identity() && r.bytes_down > 0)
            },
        );
        let r = gw
            .records()
            .into_iter()
            .find(|r| r.peer_identity == c.identity())
            .unwrap();
        assert_eq!(r.authority, format!("{hostname}:80"), "{client}: {r:?}");
        assert_eq!(r.status, 200, "{client}: {r:?}");
        assert_eq!(
            r.upstream,
            Some(SocketAddr::from((s.ip(), 15008))),
            "{client}: {r:?}"
        );
        // The inner tunnel's TLS and HTTP/2 around the payload: more bytes than it.
        assert!(
            r.bytes_up > len as u64 && r.bytes_down > len as u64,
            "{client}: {r:?}"
        );
        let line = access_line(s, &["direction=\"inbound\"", &c.identity()]);
        assert!(line.contains(&s.identity()), "{server}: {line}");
        assert!(!line.contains("error="), "{server}: {line}");
        assert!(line.contains(&format!("{ew_ip}:")), "{server}: {line}");
        let line = access_line(c, &["direction=\"outbound\"", &s.identity()]);
        assert!(line.contains(&format!("{ew_ip}:15008")), "{client}: {line}");
    }
    drop(gw);
    m.shutdown();
}
