//! GENEVE mode end to end on two simulated nodes (root, and a kernel with
//! GENEVE: run through `scripts/vm-tests.sh` / `make test-vm` on machines
//! whose kernel lacks it).
//!
//! Per node: a ztunnel pod namespace attached point-to-point (own veth, /32
//! route, as kindnet/ptp CNIs do; GENEVE mode needs it), the real `ztunnel`
//! binary in it (`PROXY_MODE=shared`, `INPOD_ENABLED=false`), two pods on
//! the node bridge, and the node agent's `GeneveRedirector` working in the
//! node namespace. Pods get a /32 address and an on-link gateway so that
//! traffic between pods of one node is routed by the node (not bridged past
//! its rules), as with routed CNIs.
//!
//! - client (node1) → server (node2): through both ztunnels over HBONE; the
//!   underlay capture shows payload only on port 15008, never the plaintext;
//!   both access logs show the SPIFFE identities.
//! - DNS capture: client's UDP/53 is DNATed to node1's ztunnel, whose DNS
//!   proxy answers the mesh Service `server` itself.
//! - client (node1) → local (node1): captured by node1's ztunnel (its
//!   outbound access log names both identities) and answered.
//! - server unenrolled (and TCP in the mesh state, as the control plane
//!   would make it): plaintext on the underlay, still works.
//! - clean-up leaves no link, rule, route, chain or ipset of ours on either
//!   node or ztunnel namespace, and puts back the nodes' `rp_filter`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::netsim::{Cluster, NamedNetns, Node, Pod, Process, can_create_netns};
use node_agent::redirect::geneve::inventory::{inspect_node, inspect_ztunnel};
use node_agent::redirect::geneve::{GeneveConfig, GeneveRedirector, SysctlRoot, ZtunnelPod};
use node_agent::redirect::netlink::Netlink;
use node_agent::redirect::{PodRedirect, Redirector};

const APP_PORT: u16 = 8080;
/// The VIP of Service `server.default.svc.cluster.local`.
const SERVER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);
const ZT_HOST: u8 = 250;

fn ip(ns: &NamedNetns, args: &str) {
    ns.exec("ip", args.split_whitespace(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("ip {args} in {}: {e}", ns.name()));
}

/// /32 address and an on-link gateway: the pod sends everything to the
/// node, which routes it (and so applies its rules).
fn make_routed(pod: &Pod) {
    let ns = pod.netns();
    let (ip_addr, gw) = (pod.ip(), pod.gateway());
    ip(ns, &format!("addr del {ip_addr}/24 dev eth0"));
    ip(ns, &format!("addr add {ip_addr}/32 dev eth0"));
    ip(ns, &format!("route add {gw}/32 dev eth0 scope link"));
    ip(ns, &format!("route add default via {gw} dev eth0"));
}

/// The ztunnel pod of `node`: own netns, veth `ztunnel0` on the node side.
struct ZtunnelNs {
    netns: NamedNetns,
    ip: Ipv4Addr,
    process: Option<Process>,
    log: PathBuf,
}

fn ztunnel_ns(cluster: &Cluster, node: &Node) -> ZtunnelNs {
    let netns = cluster
        .scope()
        .create_netns(&format!("{}-zt", node.name()))
        .unwrap();
    let o = node.pod_cidr().network().octets();
    let zt_ip = Ipv4Addr::new(o[0], o[1], o[2], ZT_HOST);
    let gw = node.gateway();
    node.netns()
        .add_veth("ztunnel0", "eth0", Some(&netns))
        .unwrap();
    let n = node.netns();
    ip(n, &format!("addr add {gw}/32 dev ztunnel0"));
    ip(n, "link set ztunnel0 up");
    ip(n, &format!("route add {zt_ip}/32 dev ztunnel0 scope link"));
    for k in ["all", "default", "cni0"] {
        n.sysctl_set(&format!("net.ipv4.conf.{k}.send_redirects"), "0")
            .unwrap();
    }
    ip(&netns, "link set lo up");
    ip(&netns, &format!("addr add {zt_ip}/32 dev eth0"));
    ip(&netns, "link set eth0 up");
    ip(&netns, &format!("route add {gw}/32 dev eth0 scope link"));
    ip(&netns, &format!("route add default via {gw} dev eth0"));
    let log = cluster
        .scope()
        .dir()
        .join(format!("ztunnel-{}.log", node.name()));
    ZtunnelNs {
        netns,
        ip: zt_ip,
        process: None,
        log,
    }
}

struct Workload<'a> {
    pod: &'a Pod,
    sa: &'static str,
    protocol: &'static str,
}

fn mesh_yaml(workloads: &[Workload<'_>]) -> String {
    let mut s = String::from("workloads:\n");
    for w in workloads {
        s.push_str(&format!(
            "- uid: uid-{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: {proto}\n  node: {node}\n  trustDomain: cluster.local\n  services: {{}}\n",
            name = w.pod.name(),
            sa = w.sa,
            ip = w.pod.ip(),
            proto = w.protocol,
            node = w.pod.node(),
        ));
    }
    // What the DNS proxy answers for `server` (short name, namespace default).
    s.push_str(&format!(
        "services:\n- name: server\n  namespace: default\n  hostname: server.default.svc.cluster.local\n  vips: [\"/{SERVER_VIP}\"]\n  ports: {{80: 8080}}\n"
    ));
    s
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start_ztunnel(zt: &mut ZtunnelNs, node: &Node, mesh: &Path) {
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ztunnel/testdata/ca");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&zt.log)
        .unwrap();
    let mut cmd = zt.netns.command(e2e::bin_path("ztunnel"));
    cmd.envs([
        ("PROXY_MODE", "shared".to_string()),
        ("INPOD_ENABLED", "false".to_string()),
        ("LOCAL_XDS_PATH", mesh.display().to_string()),
        ("CA_ROOT_CERT", ca.join("ec-root.pem").display().to_string()),
        ("CA_ROOT_KEY", ca.join("ec-root.key").display().to_string()),
        ("NODE_NAME", node.name().to_string()),
        ("POD_NAME", format!("ztunnel-{}", node.name())),
        ("POD_NAMESPACE", "istio-system".to_string()),
        ("INSTANCE_IP", zt.ip.to_string()),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "1".to_string()),
        ("ZTUNNEL_WORKER_THREADS", "1".to_string()),
        ("RUST_LOG", "info".to_string()),
    ])
    .stdin(Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    zt.process = Some(Process::spawn(cmd).unwrap());
    // Ready: the readiness endpoint answers 200 inside the pod's netns.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = zt
            .netns
            .run(|| -> std::io::Result<bool> {
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], 15021)),
                    Duration::from_secs(1),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(
                    b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )?;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                Ok(buf.starts_with(b"HTTP/1.1 200"))
            })
            .unwrap();
        if matches!(ok, Ok(true)) {
            return;
        }
        assert!(
            zt.process.as_mut().unwrap().is_running(),
            "ztunnel on {} exited:\n{}",
            node.name(),
            std::fs::read_to_string(&zt.log).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "ztunnel on {} not ready after 60 s:\n{}",
            node.name(),
            std::fs::read_to_string(&zt.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Echo server on 0.0.0.0:8080 inside `pod`, on its own thread.
fn echo_server(pod: &Pod) {
    let l = pod
        .netns()
        .run(|| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, APP_PORT)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn roundtrip(from: &Pod, to: &Pod, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let dst = SocketAddr::from((to.ip(), APP_PORT));
    let payload = payload.to_vec();
    from.netns()
        .run(move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&payload)?;
            let mut back = vec![0u8; payload.len()];
            s.read_exact(&mut back)?;
            Ok(back)
        })
        .map_err(std::io::Error::other)?
}

/// Sends `len` bytes of a pattern to the echo server while reading the echo
/// back on another thread; returns the number of bytes that came back
/// intact. Full-size segments in both directions: a path-MTU black hole
/// anywhere on the tunnelled path stalls this (small round trips pass).
fn bulk_echo(from: &Pod, to: &Pod, len: usize) -> std::io::Result<usize> {
    let dst = SocketAddr::from((to.ip(), APP_PORT));
    from.netns()
        .run(move || {
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut w = s.try_clone()?;
            let writer = std::thread::spawn(move || -> std::io::Result<()> {
                let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    w.write_all(&chunk[..n])?;
                    left -= n;
                }
                w.shutdown(std::net::Shutdown::Write)
            });
            let mut r = s;
            let mut buf = vec![0u8; 65536];
            let mut got = 0usize;
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != ((got + i) % 65536 % 251) as u8 {
                        return Err(std::io::Error::other(format!(
                            "byte {} differs after {got} intact bytes",
                            got + i
                        )));
                    }
                }
                got += n;
            }
            writer.join().expect("writer thread")?;
            Ok(got)
        })
        .map_err(std::io::Error::other)?
}

fn redirect(pod: &Pod, sa: &str) -> PodRedirect {
    PodRedirect {
        uid: format!("uid-{}", pod.name()),
        name: pod.name().into(),
        namespace: "default".into(),
        service_account: sa.into(),
        ips: vec![IpAddr::V4(pod.ip())],
        ..Default::default()
    }
}

fn wait_for_log(zt: &ZtunnelNs, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&zt.log).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| pred(l)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line for {what} in {}:\n{log}",
            zt.log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn geneve_two_nodes_hbone_between_ztunnels() {
    if !can_create_netns() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    let cluster = Cluster::new("geneve", 2).unwrap();
    let scratch = cluster.scope().create_netns("gvchk").unwrap();
    if let Some(why) = e2e::netsim::geneve_unsupported(&scratch) {
        assert!(
            std::env::var_os("GENEVE_TESTS_REQUIRED").is_none_or(|v| v != "1"),
            "GENEVE_TESTS_REQUIRED=1 but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    let client = n1.add_pod("client").unwrap();
    let local = n1.add_pod("local").unwrap();
    let server = n2.add_pod("server").unwrap();
    let spare = n2.add_pod("spare").unwrap();
    for p in [&client, &local, &server, &spare] {
        make_routed(p);
    }
    echo_server(&local);
    echo_server(&server);

    let mesh = cluster.scope().dir().join("mesh.yaml");
    let state = |server_protocol| {
        mesh_yaml(&[
            Workload {
                pod: &client,
                sa: "client",
                protocol: "HBONE",
            },
            Workload {
                pod: &local,
                sa: "local",
                protocol: "HBONE",
            },
            Workload {
                pod: &server,
                sa: "server",
                protocol: server_protocol,
            },
            Workload {
                pod: &spare,
                sa: "spare",
                protocol: "HBONE",
            },
        ])
    };
    write_atomically(&mesh, &state("HBONE"));
    let mut zt1 = ztunnel_ns(&cluster, n1);
    let mut zt2 = ztunnel_ns(&cluster, n2);
    start_ztunnel(&mut zt1, n1, &mesh);
    start_ztunnel(&mut zt2, n2, &mesh);

    let journal = |node: &Node| {
        cluster
            .scope()
            .dir()
            .join(format!("{}-run/geneve-sysctls.json", node.name()))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let agents: Vec<GeneveRedirector> = rt.block_on(async {
        let mut v = Vec::new();
        for (node, zt, pods) in [(n1, &zt1, [&client, &local]), (n2, &zt2, [&server, &spare])] {
            // The node's strict reverse-path filter (as systemd sets it):
            // GENEVE mode turns it off, uninstall must put it back.
            for k in ["all", "default"] {
                node.netns()
                    .sysctl_set(&format!("net.ipv4.conf.{k}.rp_filter"), "2")
                    .unwrap();
            }
            let red = GeneveRedirector::new(GeneveConfig {
                node_netns: node.netns().path().to_path_buf(),
                host_ip: Some(node.gateway()),
                sysctls: SysctlRoot::default().with_journal(journal(node)),
                dns_capture: true,
                ..Default::default()
            })
            .await
            .unwrap();
            red.set_ztunnel(Some(ZtunnelPod {
                uid: format!("uid-ztunnel-{}", node.name()),
                ip: zt.ip,
                netns: zt.netns.path().to_path_buf(),
                iface: "eth0".into(),
            }))
            .await
            .unwrap();
            for p in pods {
                red.enrol(&redirect(p, p.name())).await.unwrap();
            }
            v.push(red);
        }
        v
    });

    for node in [n1, n2] {
        assert_eq!(
            node.netns()
                .sysctl_get("net.ipv4.conf.all.rp_filter")
                .unwrap(),
            "0"
        );
        assert!(journal(node).exists(), "{}: no sysctl journal", node.name());
    }

    // Cross-node: HBONE between the ztunnels, nothing in the clear.
    let cap_file = cluster.scope().dir().join("underlay-mesh.pcap");
    let cap = cluster.capture_underlay(&cap_file, Some("tcp")).unwrap();
    let secret = b"GENEVE-SECRET-PAYLOAD-cross-node";
    let start = Instant::now();
    assert_eq!(
        roundtrip(&client, &server, secret).expect("client -> server"),
        secret
    );
    eprintln!(
        "timing: first cross-node round trip (HBONE setup included): {:?}",
        start.elapsed()
    );
    let report = cap.stop().unwrap();
    assert!(!report.is_empty(), "the capture saw nothing");
    assert!(
        !report.contains(b"GENEVE-SECRET"),
        "plaintext on the underlay"
    );
    assert_eq!(
        report.tcp_payload_server_ports(),
        [15008].into(),
        "payload only to 15008"
    );
    // Full-size segments both ways across nodes and on one node: the GENEVE
    // devices carry 1500-byte inner packets over 1500-byte links.
    const BULK: usize = 4 << 20;
    for (name, to) in [("client -> server", &server), ("client -> local", &local)] {
        let start = Instant::now();
        let got = bulk_echo(&client, to, BULK).unwrap_or_else(|e| panic!("{name} bulk: {e}"));
        assert_eq!(got, BULK, "{name}: echo came back short");
        eprintln!(
            "timing: {name} {BULK} bytes echoed in {:?}",
            start.elapsed()
        );
    }
    let out = wait_for_log(&zt1, "client -> server outbound", |l| {
        l.contains("outbound") && l.contains("spiffe://cluster.local/ns/default/sa/server")
    });
    assert!(
        out.contains("spiffe://cluster.local/ns/default/sa/client"),
        "{out}"
    );
    let inb = wait_for_log(&zt2, "client -> server inbound", |l| {
        l.contains("inbound") && l.contains("spiffe://cluster.local/ns/default/sa/client")
    });
    assert!(
        inb.contains("spiffe://cluster.local/ns/default/sa/server"),
        "{inb}"
    );

    // Same node: captured by node1's ztunnel.
    let local_secret = b"GENEVE-SECRET-PAYLOAD-same-node";
    assert_eq!(
        roundtrip(&client, &local, local_secret).expect("client -> local"),
        local_secret
    );
    // The access line (node-wide mode also logs the prefetched certificate of `local`).
    let out = wait_for_log(&zt1, "client -> local", |l| {
        l.contains("connection complete")
            && l.contains("dst.identity=spiffe://cluster.local/ns/default/sa/local")
    });
    assert!(
        out.contains("spiffe://cluster.local/ns/default/sa/client"),
        "{out}"
    );

    // DNS capture: the node DNATs an enrolled pod's UDP/53 to its ztunnel's DNS proxy,
    // which answers mesh names itself (the pod's namespace's short name).
    let dns_server = SocketAddr::from(([10, 96, 0, 10], 53));
    let answer = e2e::dns_probe::udp_query(
        client.netns(),
        dns_server,
        "server",
        hickory_proto::rr::RecordType::A,
    );
    assert!(answer.metadata.authoritative, "{answer:?}");
    assert_eq!(
        e2e::dns_probe::a_records(&answer),
        [SERVER_VIP],
        "{answer:?}"
    );

    // Unenrol the server: its inbound bypasses ztunnel, and the mesh state
    // says TCP, so the client's ztunnel sends plaintext.
    rt.block_on(agents[1].unenrol(&redirect(&server, "server")))
        .unwrap();
    write_atomically(&mesh, &state("TCP"));
    std::thread::sleep(Duration::from_secs(2)); // file reload in both ztunnels
    let cap_file = cluster.scope().dir().join("underlay-bypass.pcap");
    let cap = cluster.capture_underlay(&cap_file, Some("tcp")).unwrap();
    let plain = b"GENEVE-PLAINTEXT-after-unenrol";
    assert_eq!(
        roundtrip(&client, &server, plain).expect("client -> unenrolled server"),
        plain
    );
    let report = cap.stop().unwrap();
    assert!(report.contains(plain), "expected plaintext after unenrol");
    assert!(report.tcp_payload_server_ports().contains(&APP_PORT));

    // Clean-up: nothing of ours left anywhere.
    rt.block_on(async {
        for (red, node, zt) in [(&agents[0], n1, &zt1), (&agents[1], n2, &zt2)] {
            let topo = red.topology().await.unwrap();
            red.cleanup().await.unwrap();
            let nl = Netlink::connect(node.netns().netns()).await.unwrap();
            let inv = inspect_node(node.netns().netns(), &nl, red.backend())
                .await
                .unwrap();
            assert!(
                inv.node_leftovers().is_empty(),
                "{}: {:?}",
                node.name(),
                inv.node_leftovers()
            );
            let nl = Netlink::connect(zt.netns.netns()).await.unwrap();
            let inv = inspect_ztunnel(zt.netns.netns(), &nl, red.backend())
                .await
                .unwrap();
            let left = inv.ztunnel_leftovers(&topo.ztunnel_rule_params());
            assert!(left.is_empty(), "{} ztunnel: {left:?}", node.name());
            for k in ["all", "default"] {
                assert_eq!(
                    node.netns()
                        .sysctl_get(&format!("net.ipv4.conf.{k}.rp_filter"))
                        .unwrap(),
                    "2",
                    "{}: {k}.rp_filter not restored",
                    node.name()
                );
            }
            assert!(!journal(node).exists(), "{}: journal left", node.name());
        }
    });
    drop(agents);
    for zt in [&mut zt1, &mut zt2] {
        if let Some(mut p) = zt.process.take() {
            p.terminate(Duration::from_secs(3));
        }
    }
}
