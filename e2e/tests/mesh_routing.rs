//! Services and waypoints end to end (root): pods in real network namespaces on a simulated
//! node, meshed pods each with their own ztunnel process (dedicated mode, the real binary)
//! and the in-pod capture rules, all driven by one `LOCAL_XDS_PATH` file that the tests
//! rewrite (ztunnel reloads it).
//!
//! - Service VIP: three endpoints, each reached (port 80 → targetPort 8080, endpoint
//!   identity verified); one removed from the config while connections to all three are
//!   open: new connections avoid it, the open ones finish; `/debug/connections` lists the
//!   open tunnels; the whole service removed: open connections still finish. A service whose
//!   endpoint speaks plain TCP is passed through in plaintext.
//! - Waypoint (a stand-in HBONE server, `mesh_support::waypoint`): traffic to a service
//!   with a waypoint goes through it with `:authority` = `VIP:port` and the waypoint's
//!   identity verified; the destination ztunnel accepts it from the waypoint; a direct
//!   bypass (pod IP) is denied by the destination's policy that admits only the waypoint, a
//!   forged HBONE request for the VIP straight to the pod is refused (400); a workload
//!   waypoint catches pod-addressed traffic.
//! - Multi-network (the same stand-in as an east-west gateway): a service whose endpoint is
//!   on another network is reached through that network's gateway with double HBONE; the
//!   gateway sees `hostname:port` and the client's identity, relays only ciphertext, and
//!   the destination ztunnel terminates the client's own inner tunnel.

mod mesh_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use e2e::dedicated_mesh::{DedicatedMesh, EchoServer, echo, read_line, wait_until, workload_entry};
use e2e::netsim::{NamedNetns, can_create_netns};
use http::StatusCode;
use mesh_support::waypoint::Waypoint;
use mesh_support::{hbone_client, test_ca};
use ztunnel::identity::Identity;

macro_rules! require_root {
    () => {
        if !can_create_netns() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
    };
}

const ECHO_VIP: &str = "10.96.0.10";
const PLAIN_VIP: &str = "10.96.0.11";
const ECHO_SVC: &str = "echo.default.svc.cluster.local";

/// The services config: endpoints `members` of the echo service (all of ep1..ep3 are
/// workloads), the echo service only when `echo_service`.
fn services_config(mesh: &DedicatedMesh, members: &[&str], echo_service: bool) -> String {
    let mut y = String::from("workloads:\n");
    y.push_str(&workload_entry(mesh.pod("client"), "HBONE", "{}", ""));
    for ep in ["ep1", "ep2", "ep3"] {
        let services = if members.contains(&ep) {
            format!("{{\"default/{ECHO_SVC}\": {{80: 8080}}}}")
        } else {
            "{}".to_string()
        };
        y.push_str(&workload_entry(mesh.pod(ep), "HBONE", &services, ""));
    }
    y.push_str(&workload_entry(
        mesh.pod("plain"),
        "TCP",
        "{\"default/plain.default.svc.cluster.local\": {}}",
        "",
    ));
    y.push_str("services:\n");
    if echo_service {
        y.push_str(&format!(
            "- name: echo\n  namespace: default\n  hostname: {ECHO_SVC}\n  \
             vips: [\"/{ECHO_VIP}\"]\n  ports: {{80: 8080}}\n"
        ));
    }
    y.push_str(&format!(
        "- name: plain\n  namespace: default\n  hostname: plain.default.svc.cluster.local\n  \
         vips: [\"/{PLAIN_VIP}\"]\n  ports: {{81: 7070}}\n"
    ));
    y
}

/// Connects from the client pod to `dst` and reads the server's greeting (its pod name).
fn greeted(mesh: &DedicatedMesh, dst: &str) -> std::io::Result<(String, TcpStream)> {
    let mut s = mesh.pod("client").connect(dst.parse().unwrap())?;
    let name = read_line(&mut s)?;
    Ok((name, s))
}

/// Sends `data` on an open greeted connection, half-closes, expects it echoed back.
fn finish(mut s: TcpStream, data: &[u8]) {
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn service_vip_spreads_over_endpoints_and_survives_removals() {
    require_root!();
    let mut mesh = DedicatedMesh::new("svcvip").expect("mesh");
    mesh.add_pod("client", "default", "client").unwrap();
    for ep in ["ep1", "ep2", "ep3"] {
        mesh.add_pod(ep, "default", "echo").unwrap();
    }
    mesh.add_pod("plain", "default", "default").unwrap();
    mesh.write_config(&services_config(&mesh, &["ep1", "ep2", "ep3"], true));
    for p in ["client", "ep1", "ep2", "ep3"] {
        mesh.start_ztunnel(p);
    }
    let _servers: Vec<EchoServer> = ["ep1", "ep2", "ep3"]
        .iter()
        .map(|ep| EchoServer::start(mesh.pod(ep).netns(), 8080, Some(ep)))
        .collect();
    let _plain = EchoServer::start(mesh.pod("plain").netns(), 7070, Some("plain"));
    let vip = format!("{ECHO_VIP}:80");

    // Each endpoint is reached through the VIP (random pick; 3 of them).
    let mut seen = BTreeSet::new();
    for _ in 0..100 {
        let (name, s) = greeted(&mesh, &vip).unwrap();
        finish(s, b"ping");
        seen.insert(name);
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen, ["ep1", "ep2", "ep3"].map(String::from).into());
    // The client's access log: VIP traffic tunnelled to each endpoint's 8080 (targetPort),
    // the service and the verified endpoint identity named.
    let client = mesh.pod("client");
    for ep in ["ep1", "ep2", "ep3"] {
        let ip = mesh.pod(ep).ip();
        wait_until(
            &format!("client access log for {ep}"),
            Duration::from_secs(5),
            || {
                !client
                    .log_lines(&[
                        "connection complete",
                        &format!("dst.addr={ip}:15008"),
                        &format!("dst.hbone_addr={ip}:8080"),
                        &format!("dst.service=\"{ECHO_SVC}\""),
                        "dst.identity=spiffe://cluster.local/ns/default/sa/echo",
                    ])
                    .is_empty()
            },
        );
    }

    // One open connection to each endpoint.
    let mut open: BTreeMap<String, TcpStream> = BTreeMap::new();
    for _ in 0..200 {
        let (name, s) = greeted(&mesh, &vip).unwrap();
        open.entry(name).or_insert(s);
        if open.len() == 3 {
            break;
        }
    }
    assert_eq!(open.len(), 3);
    // /debug/connections lists them with target, identities, service and live bytes.
    let ep3 = mesh.pod("ep3").ip();
    let dump: serde_json::Value =
        serde_json::from_str(&client.admin("/debug/connections")).unwrap();
    let conns: Vec<&serde_json::Value> = dump
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["connections"].as_array().unwrap().iter())
        .collect();
    let to_ep3 = conns
        .iter()
        .find(|c| c["hbone_target"] == format!("{ep3}:8080"))
        .unwrap_or_else(|| panic!("no open tunnel to ep3 in {dump:#}"));
    assert_eq!(to_ep3["dst"], format!("{ep3}:15008"));
    assert_eq!(to_ep3["src_identity"], client.identity());
    assert_eq!(to_ep3["dst_identity"], mesh.pod("ep3").identity());
    assert_eq!(to_ep3["dst_service"], ECHO_SVC);
    assert_eq!(to_ep3["bytes_recv"], "ep3\n".len());
    assert!(to_ep3["age_ms"].is_u64());

    // ep3 leaves the service; every ztunnel reloads.
    mesh.update_config(&services_config(&mesh, &["ep1", "ep2"], true));
    let mut after = BTreeSet::new();
    for _ in 0..30 {
        let (name, s) = greeted(&mesh, &vip).unwrap();
        finish(s, b"after");
        after.insert(name);
    }
    assert_eq!(
        after,
        ["ep1", "ep2"].map(String::from).into(),
        "new connections avoid ep3"
    );
    // The open connections, ep3's included, carry on and finish.
    for (name, s) in open {
        finish(s, format!("still there, {name}").as_bytes());
    }

    // The whole service goes away: an open connection finishes, new ones reach nobody.
    let (_, open_one) = greeted(&mesh, &vip).unwrap();
    mesh.update_config(&services_config(&mesh, &["ep1", "ep2"], false));
    let gone = mesh
        .pod("client")
        .connect(vip.parse().unwrap())
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            read_line(&mut s)
        });
    assert!(gone.is_err(), "reached {gone:?} through a removed service");
    finish(open_one, b"finishing after the service was removed");

    // A service whose endpoint is a plain TCP workload: plaintext passthrough.
    let (name, s) = greeted(&mesh, &format!("{PLAIN_VIP}:81")).unwrap();
    assert_eq!(name, "plain");
    finish(s, b"plain");
    let plain_ip = mesh.pod("plain").ip();
    let plain_line = || {
        mesh.pod("client")
            .log_lines(&["connection complete", &format!("dst.addr={plain_ip}:7070")])
    };
    wait_until("plaintext access log", Duration::from_secs(5), || {
        plain_line().len() == 1
    });
    let line = plain_line();
    assert!(!line[0].contains("dst.identity"), "{}", line[0]);
    assert!(!line[0].contains("dst.hbone_addr"), "{}", line[0]);
    mesh.shutdown();
}

const WP_VIP: &str = "10.96.0.20";

fn waypoint_config(mesh: &DedicatedMesh, server_has_waypoint: bool) -> String {
    let wp_ip = mesh.pod("waypoint").ip();
    let server_extra = format!(
        "  authorizationPolicies: [\"default/only-waypoint\"]\n{}",
        if server_has_waypoint {
            format!("  waypoint: {{destination: \"/{wp_ip}\", hboneMtlsPort: 15008}}\n")
        } else {
            String::new()
        }
    );
    let mut y = String::from("workloads:\n");
    y.push_str(&workload_entry(mesh.pod("client"), "HBONE", "{}", ""));
    y.push_str(&workload_entry(
        mesh.pod("server"),
        "HBONE",
        &format!("{{\"default/{ECHO_SVC}\": {{80: 8080}}}}"),
        &server_extra,
    ));
    y.push_str(&workload_entry(mesh.pod("waypoint"), "HBONE", "{}", ""));
    y.push_str(&format!(
        "services:\n- name: echo\n  namespace: default\n  hostname: {ECHO_SVC}\n  \
         vips: [\"/{WP_VIP}\"]\n  ports: {{80: 8080}}\n  \
         waypoint: {{destination: \"/{wp_ip}\", hboneMtlsPort: 15008}}\n"
    ));
    y.push_str(
        "policies:\n- name: only-waypoint\n  namespace: default\n  scope: WorkloadSelector\n  \
         action: Allow\n  \
         rules: [[[{principals: [!Exact cluster.local/ns/default/sa/waypoint]}]]]\n",
    );
    y
}

#[test]
fn waypoint_carries_service_traffic_and_bypass_is_refused() {
    require_root!();
    let mut mesh = DedicatedMesh::new("waypoint").expect("mesh");
    mesh.add_pod("client", "default", "client").unwrap();
    mesh.add_pod("server", "default", "server").unwrap();
    mesh.add_pod("waypoint", "default", "waypoint").unwrap();
    mesh.write_config(&waypoint_config(&mesh, false));
    mesh.start_ztunnel("client");
    mesh.start_ztunnel("server");
    let ca = test_ca();
    let wp = Waypoint::start(
        NamedNetns::open(mesh.pod("waypoint").netns().name()).unwrap(),
        Identity::new("cluster.local", "default", "waypoint"),
        ca.clone(),
        mesh.config_path().to_path_buf(),
    );
    let _server = EchoServer::start(mesh.pod("server").netns(), 8080, None);
    let client = mesh.pod("client");
    let server = mesh.pod("server");
    let wp_ip = mesh.pod("waypoint").ip();
    let data = b"through the waypoint".repeat(100);

    // Service traffic goes through the waypoint, :authority = VIP:port.
    let s = client
        .connect(format!("{WP_VIP}:80").parse().unwrap())
        .unwrap();
    assert_eq!(echo(s, &data).unwrap(), data);
    wait_until(
        "waypoint relayed the stream",
        Duration::from_secs(5),
        || wp.records().first().is_some_and(|r| r.bytes_up > 0),
    );
    let recs = wp.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r.authority, format!("{WP_VIP}:80"));
    assert_eq!(r.peer_identity, client.identity());
    assert_eq!(r.upstream, Some(SocketAddr::from((server.ip(), 8080))));
    assert_eq!(
        (r.status, r.bytes_up, r.bytes_down),
        (200, data.len() as u64, data.len() as u64)
    );
    assert!(
        r.forwarded
            .as_deref()
            .is_some_and(|f| f.contains(&format!("host={ECHO_SVC}"))),
        "{r:?}"
    );
    // Client side: HBONE to the waypoint, its identity verified, the service named.
    wait_until("client access log", Duration::from_secs(5), || {
        !client
            .log_lines(&[
                "connection complete",
                &format!("dst.addr={wp_ip}:15008"),
                &format!("dst.hbone_addr={WP_VIP}:80"),
                "dst.identity=spiffe://cluster.local/ns/default/sa/waypoint",
                &format!("dst.service=\"{ECHO_SVC}\""),
            ])
            .is_empty()
    });
    // Destination side: accepted from the waypoint (the policy admits only it).
    wait_until("server access log", Duration::from_secs(5), || {
        server
            .log_lines(&[
                "connection complete",
                "direction=\"inbound\"",
                "src.identity=spiffe://cluster.local/ns/default/sa/waypoint",
            ])
            .iter()
            .any(|l| !l.contains("error="))
    });

    // Bypass: the client addresses the pod directly. The service's waypoint does not apply
    // to pod-addressed traffic (upstream semantics), so it goes straight to the server's
    // ztunnel, whose policy admits only the waypoint: denied.
    let s = client
        .connect(SocketAddr::from((server.ip(), 8080)))
        .unwrap();
    assert_ne!(echo(s, &data).unwrap_or_default(), data);
    wait_until("bypass denied", Duration::from_secs(5), || {
        !server
            .log_lines(&[
                "denied by policy default/only-waypoint",
                &format!("src.identity={}", client.identity()),
            ])
            .is_empty()
    });
    assert_eq!(
        wp.records().len(),
        1,
        "the bypass did not touch the waypoint"
    );

    // A forged CONNECT for the VIP sent straight to the server's 15008: refused by
    // destination validation (the server is not the VIP's waypoint), before policy.
    let status = |authority: &str| {
        hbone_client::connect_status(
            client.netns(),
            ca.clone(),
            Identity::new("cluster.local", "default", "client"),
            SocketAddr::from((server.ip(), 15008)),
            Identity::new("cluster.local", "default", "server"),
            authority,
        )
    };
    assert_eq!(status(&format!("{WP_VIP}:80")), StatusCode::BAD_REQUEST);
    assert_eq!(
        status(&format!("{}:8080", server.ip())),
        StatusCode::UNAUTHORIZED
    );

    // A workload waypoint catches pod-addressed traffic: authority = pod address.
    mesh.update_config(&waypoint_config(&mesh, true));
    let client = mesh.pod("client");
    let server = mesh.pod("server");
    let s = client
        .connect(SocketAddr::from((server.ip(), 8080)))
        .unwrap();
    assert_eq!(echo(s, &data).unwrap(), data);
    let recs = wp.records();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[1].authority, format!("{}:8080", server.ip()));
    assert_eq!(recs[1].status, 200);
    drop(wp);
    mesh.shutdown();
}

const MN_VIP: &str = "10.96.0.30";

/// `client` on network `east`; `server` on `west`, behind west's gateway `ew` (a west
/// workload); the echo service's VIP is on `east`.
fn multi_network_config(mesh: &DedicatedMesh) -> String {
    let ew_ip = mesh.pod("ew").ip();
    let mut y = String::from("workloads:\n");
    y.push_str(&workload_entry(
        mesh.pod("client"),
        "HBONE",
        "{}",
        "  network: east\n",
    ));
    y.push_str(&workload_entry(
        mesh.pod("server"),
        "HBONE",
        &format!("{{\"default/{ECHO_SVC}\": {{80: 8080}}}}"),
        &format!("  network: west\n  networkGateway: {{destination: \"west/{ew_ip}\", hboneMtlsPort: 15008}}\n"),
    ));
    y.push_str(&workload_entry(
        mesh.pod("ew"),
        "TCP",
        "{}",
        "  network: west\n",
    ));
    y.push_str(&format!(
        "services:\n- name: echo\n  namespace: default\n  hostname: {ECHO_SVC}\n  \
         vips: [\"east/{MN_VIP}\"]\n  ports: {{80: 8080}}\n"
    ));
    y
}

#[test]
fn a_service_on_another_network_goes_through_its_east_west_gateway() {
    require_root!();
    let mut mesh = DedicatedMesh::new("multinet").expect("mesh");
    mesh.add_pod("client", "default", "client").unwrap();
    mesh.add_pod("server", "default", "server").unwrap();
    mesh.add_pod("ew", "istio-system", "istio-eastwestgateway")
        .unwrap();
    mesh.write_config(&multi_network_config(&mesh));
    mesh.start_ztunnel("client");
    mesh.start_ztunnel("server");
    let gw = Waypoint::start_gateway(
        NamedNetns::open(mesh.pod("ew").netns().name()).unwrap(),
        Identity::new("cluster.local", "istio-system", "istio-eastwestgateway"),
        test_ca(),
        mesh.config_path().to_path_buf(),
    );
    let _server = EchoServer::start(mesh.pod("server").netns(), 8080, None);
    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    let ew_ip = mesh.pod("ew").ip();
    let data = b"across networks".repeat(1000);

    let s = client
        .connect(format!("{MN_VIP}:80").parse().unwrap())
        .unwrap();
    assert_eq!(echo(s, &data).unwrap(), data);
    wait_until("the gateway's relay ended", Duration::from_secs(5), || {
        gw.records().first().is_some_and(|r| r.bytes_down > 0)
    });
    let recs = gw.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r.authority, format!("{ECHO_SVC}:80"));
    assert_eq!(r.peer_identity, client.identity());
    assert_eq!(r.upstream, Some(SocketAddr::from((server.ip(), 15008))));
    // The inner tunnel (TLS, HTTP/2) around the payload: more bytes than it, both ways.
    assert_eq!(r.status, 200);
    assert!(
        r.bytes_down > data.len() as u64 && r.bytes_up > data.len() as u64,
        "{r:?}"
    );

    // Client: to the gateway, the service's hostname as the HBONE target, the server's
    // identity (proved by the inner TLS).
    wait_until("client access log", Duration::from_secs(5), || {
        !client
            .log_lines(&[
                "connection complete",
                &format!("dst.addr={ew_ip}:15008"),
                &format!("dst.hbone_addr={ECHO_SVC}:80"),
                &format!("dst.identity={}", server.identity()),
                &format!("bytes_sent={}", data.len()),
            ])
            .is_empty()
    });
    // Server: the stream came from the gateway's address with the client's identity.
    wait_until("server access log", Duration::from_secs(5), || {
        server
            .log_lines(&[
                "connection complete",
                "direction=\"inbound\"",
                &format!("src.addr={ew_ip}:"),
                &format!("src.identity={}", client.identity()),
            ])
            .iter()
            .any(|l| !l.contains("error="))
    });
    drop(gw);
    mesh.shutdown();
}
