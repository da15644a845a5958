//! Simulated topology tests (root needed: network namespaces).
//!
//! Run: `cargo test -p e2e --test netsim`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use e2e::netsim::{
    Capture, Cluster, NETNS_RUN_DIR, NamedNetns, OWNER_ENV, REGISTRY_DIR, Scope, capture_during,
    cleanup_stale,
};

fn skip() -> bool {
    if !e2e::netsim::can_create_netns() {
        eprintln!("skipped: creating network namespaces needs root");
        return true;
    }
    false
}

/// Opens a listener inside `ns` on `ip:port`.
fn listen(ns: &NamedNetns, ip: Ipv4Addr, port: u16) -> TcpListener {
    ns.run(move || TcpListener::bind(SocketAddr::from((ip, port))))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {ip}:{port} in {}: {e}", ns.name()))
}

/// Connects from inside `ns`, sends `msg`, and returns what the server
/// echoed back in upper case.
fn tcp_roundtrip(from: &NamedNetns, listener: &TcpListener, dst: Ipv4Addr, msg: &[u8]) -> Vec<u8> {
    let port = listener.local_addr().unwrap().port();
    let l = listener.try_clone().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = l.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&buf.to_ascii_uppercase()).unwrap();
        peer
    });
    let msg = msg.to_vec();
    let reply = from
        .run(move || {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&msg)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("connect {} -> {dst}:{port}: {e}", from.name()));
    server.join().unwrap();
    reply
}

fn netns_inode_of(pid: u32) -> Option<u64> {
    nix::sys::stat::stat(format!("/proc/{pid}/ns/net").as_str())
        .ok()
        .map(|s| s.st_ino)
}

#[test]
fn two_nodes_two_pods_connectivity_capture_and_cleanup() {
    if skip() {
        return;
    }
    let cluster = Cluster::new("nsimconn", 2).unwrap();
    let prefix = cluster.scope().prefix().to_string();
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    assert_eq!(n1.ip(), Ipv4Addr::new(172, 30, 0, 11));
    assert_eq!(n2.pod_cidr().to_string(), "10.244.2.0/24");
    let a1 = n1.add_pod("a1").unwrap();
    let a2 = n1.add_pod("a2").unwrap();
    let b1 = n2.add_pod("b1").unwrap();
    let b2 = n2.add_pod("b2").unwrap();
    assert_eq!(a1.ip(), Ipv4Addr::new(10, 244, 1, 200));
    assert_eq!(a2.ip(), Ipv4Addr::new(10, 244, 1, 201));
    assert_eq!(b1.ip(), Ipv4Addr::new(10, 244, 2, 200));
    assert_eq!(a1.netns().name(), format!("{prefix}-node1-a1"));
    // The host side is on the node's bridge.
    let links = n1.netns().links().unwrap();
    let br = links.iter().find(|l| l.name == "cni0").unwrap();
    let veth = links.iter().find(|l| l.name == a1.host_veth()).unwrap();
    assert_eq!(veth.controller, Some(br.index));
    assert!(veth.up && br.up);
    assert_eq!(n1.netns().sysctl_get("net.ipv4.ip_forward").unwrap(), "1");

    // ICMP: same node, across nodes, pod -> node, pod -> host address.
    let t = Duration::from_secs(3);
    let pods = [&a1, &a2, &b1, &b2];
    for from in pods {
        for to in pods {
            if from.name() != to.name() {
                from.netns()
                    .ping(to.ip(), t)
                    .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.name(), to.name()));
            }
        }
    }
    a1.netns().ping(n2.ip(), t).unwrap();
    b2.netns().ping(cluster.host_ip(), t).unwrap();
    // An address nobody has does not answer (the check can fail).
    assert!(
        a1.netns()
            .ping(Ipv4Addr::new(10, 244, 2, 99), Duration::from_millis(600))
            .is_err()
    );

    // TCP same node and across nodes, captured on the node bridge and on
    // the underlay.
    let la2 = listen(a2.netns(), a2.ip(), 7001);
    let lb1 = listen(b1.netns(), b1.ip(), 7002);
    let dir = tempfile::tempdir().unwrap();
    // On the node's bridge: same-node traffic (forwarded between two
    // ports) is seen too.
    let node_cap = Capture::start(
        n1.netns(),
        n1.bridge(),
        &dir.path().join("node1.pcap"),
        Some("tcp"),
    )
    .unwrap();
    let underlay_cap = cluster
        .capture_underlay(&dir.path().join("underlay.pcap"), Some("tcp"))
        .unwrap();
    assert_eq!(
        tcp_roundtrip(a1.netns(), &la2, a2.ip(), b"same-node-marker"),
        b"SAME-NODE-MARKER"
    );
    let (reply, b2_cap) = capture_during(
        b2.netns(),
        "eth0",
        &dir.path().join("b2.pcap"),
        None,
        || tcp_roundtrip(a1.netns(), &lb1, b1.ip(), b"cross-node-marker"),
    )
    .unwrap();
    assert_eq!(reply, b"CROSS-NODE-MARKER");
    let underlay = underlay_cap.stop().unwrap();
    let bridge = node_cap.stop().unwrap();
    // Pod b2 saw none of it (checks the capture is not everything-everywhere).
    assert!(!b2_cap.contains(b"cross-node-marker"));
    // The underlay carries only the cross-node connection, in plaintext.
    assert!(
        underlay.contains(b"cross-node-marker"),
        "underlay capture: {} packets",
        underlay.len()
    );
    assert!(
        underlay.contains(b"CROSS-NODE-MARKER"),
        "{}: {:?}",
        underlay.log,
        underlay.packets
    );
    assert!(!underlay.contains(b"same-node-marker"));
    assert_eq!(underlay.tcp_syn_dst_ports(), [7002].into());
    assert_eq!(underlay.tcp_payload_server_ports(), [7002].into());
    // The node sees both.
    assert!(bridge.contains(b"same-node-marker"));
    assert_eq!(bridge.tcp_syn_dst_ports(), [7001, 7002].into());
    let syn = underlay.packets.iter().find(|p| p.is_tcp_syn()).unwrap();
    assert_eq!(
        syn.src,
        std::net::IpAddr::V4(a1.ip()),
        "no NAT between nodes"
    );

    // A process spawned in a pod runs in the pod's namespace and carries
    // the scope marker; it is killed when the cluster goes away.
    let sleeper = b2.netns().spawn("sleep", ["300"], None).unwrap();
    assert_eq!(
        netns_inode_of(sleeper.pid()),
        Some(b2.netns().inode().unwrap())
    );
    let env = std::fs::read(format!("/proc/{}/environ", sleeper.pid())).unwrap();
    assert!(String::from_utf8_lossy(&env).contains(&format!("{OWNER_ENV}={prefix}")));
    // A process from `exec` sees the pod's interfaces.
    let out = b2.netns().exec("cat", ["/proc/net/dev"], t).unwrap();
    assert!(out.contains("eth0") && !out.contains("cni0"), "{out}");
    // /sys describes the namespace's links too.
    let out = n1.netns().exec("ls", ["/sys/class/net"], t).unwrap();
    assert!(
        out.contains("cni0") && out.contains(a1.host_veth()),
        "{out}"
    );
    let leaked_pid = sleeper.pid();
    // Released from its guard: the cluster's clean-up must still kill it.
    let mut released = sleeper.into_child();

    drop(la2);
    drop(lb1);
    drop((a1, a2, b1, b2));
    let scope = cluster.scope().clone();
    drop(cluster);
    drop(scope);
    assert!(
        std::fs::read_dir(NETNS_RUN_DIR)
            .unwrap()
            .filter_map(|e| e.ok())
            .all(|e| !e.file_name().to_string_lossy().starts_with(&prefix)),
        "netns files with prefix {prefix} remain"
    );
    assert!(
        netns_inode_of(leaked_pid).is_none(),
        "process {leaked_pid} survived clean-up"
    );
    assert!(
        !released.wait().unwrap().success(),
        "killed by the clean-up"
    );
    assert!(!Path::new(REGISTRY_DIR).join(&prefix).exists());
    assert!(!Path::new(REGISTRY_DIR).join(format!("{prefix}.d")).exists());
}

#[test]
fn namespace_primitives() {
    if skip() {
        return;
    }
    let scope = Scope::new("nsimprim").unwrap();
    let a = scope.create_netns("a").unwrap();
    let b = scope.create_netns("b").unwrap();
    assert_eq!(
        a.path(),
        Path::new(NETNS_RUN_DIR).join(format!("{}-a", scope.prefix()))
    );
    assert!(
        NamedNetns::create(a.name(), None).is_err(),
        "names are exclusive"
    );
    assert_ne!(a.inode().unwrap(), b.inode().unwrap());
    // lo is up in a fresh namespace
    assert!(a.links().unwrap().iter().any(|l| l.name == "lo" && l.up));

    a.add_veth("va", "tmp0", Some(&b)).unwrap();
    assert!(b.has_link("tmp0").unwrap());
    assert!(!a.has_link("tmp0").unwrap());
    b.rename_link("tmp0", "vb").unwrap();
    for (ns, name, ip) in [(&a, "va", "192.168.77.1/30"), (&b, "vb", "192.168.77.2/30")] {
        ns.add_address(name, ip.parse().unwrap()).unwrap();
        ns.link_up(name).unwrap();
    }
    let v4: Vec<_> = a
        .addresses("va")
        .unwrap()
        .into_iter()
        .filter(|n| n.addr().is_ipv4())
        .collect();
    assert_eq!(v4, vec!["192.168.77.1/30".parse().unwrap()]);
    b.add_route(
        "10.99.0.0/16".parse().unwrap(),
        Some("192.168.77.1".parse().unwrap()),
        None,
    )
    .unwrap();
    let routes = b
        .exec("ip", ["-4", "route"], Duration::from_secs(5))
        .unwrap();
    assert!(
        routes.contains("10.99.0.0/16 via 192.168.77.1 dev vb"),
        "{routes}"
    );
    a.ping("192.168.77.2".parse().unwrap(), Duration::from_secs(3))
        .unwrap();
    let err = b
        .add_route(
            "10.98.0.0/16".parse().unwrap(),
            Some("fd00::1".parse().unwrap()),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("families differ"), "{err}");
    let err = a.link_index("nope0").unwrap_err();
    assert!(
        err.to_string().contains("nope0") && err.to_string().contains(a.name()),
        "{err}"
    );

    // A bridge keeps its own MAC when ports join (the kernel would otherwise give it
    // the lowest port MAC, from the first port on, and pods' ARP entries for the
    // gateway would go stale whenever a port with a lower one joins).
    a.add_bridge("br9").unwrap();
    let mac_of = |ns: &NamedNetns, name: &str| {
        ns.links()
            .unwrap()
            .into_iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("link {name} in {}", ns.name()))
            .mac
    };
    let bridge_mac = mac_of(&a, "br9");
    assert_eq!(bridge_mac.len(), 6);
    for i in 0..4 {
        let port = format!("p{i}");
        a.add_veth(&port, &format!("q{i}"), None).unwrap();
        a.set_controller(&port, "br9").unwrap();
    }
    assert_eq!(
        mac_of(&a, "br9"),
        bridge_mac,
        "bridge MAC changed as ports joined"
    );

    // sysctls are per namespace
    a.sysctl_set("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(a.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(b.sysctl_get("net.ipv4.ip_forward").unwrap(), "0");

    // timeouts kill the command and say so
    let err = a
        .output("sleep", ["10"], Duration::from_millis(300))
        .unwrap_err();
    assert!(err.to_string().contains("still running"), "{err}");
    let err = a
        .exec("false", Vec::<&str>::new(), Duration::from_secs(5))
        .unwrap_err();
    assert!(err.to_string().contains("exit code 1"), "{err}");

    // deleting one end's namespace removes the veth pair
    a.delete();
    // (the kernel tears a namespace down asynchronously; nothing of ours may
    // keep it alive, e.g. a socket created inside it)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.has_link("vb").unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "veth vb outlived its peer's namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = scope.remaining_netns();
    assert_eq!(left, vec![b.name().to_string()]);
    drop(b);
    assert!(scope.remaining_netns().is_empty());
}

#[test]
fn leftovers_of_a_killed_run_are_removed() {
    if skip() {
        return;
    }
    // Concurrent runs of this test would sweep each other's fake leftovers
    // (that is what cleanup_stale is for): take turns.
    std::fs::create_dir_all(REGISTRY_DIR).unwrap();
    let lock = std::fs::File::create(Path::new(REGISTRY_DIR).join(".lock-nsimstale-test")).unwrap();
    let _turn = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    // A "killed run": a record naming a dead process, a namespace with a
    // process inside, and a marked process outside any of its namespaces.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    std::fs::create_dir_all(REGISTRY_DIR).unwrap();
    // (names derived from our pid, in case a killed run left some behind)
    let fake = |n: u32| format!("nsimstale-{:04x}", (std::process::id() ^ n) & 0xffff);
    let prefix_s = fake(0);
    let orphan_prefix = fake(0x5a5a);
    let prefix = prefix_s.as_str();
    std::fs::write(
        Path::new(REGISTRY_DIR).join(prefix),
        format!("{dead_pid} 1\n"),
    )
    .unwrap();
    std::fs::create_dir_all(Path::new(REGISTRY_DIR).join(format!("{prefix}.d"))).unwrap();
    let ns = NamedNetns::create(&format!("{prefix}-node1"), Some(prefix)).unwrap();
    let mut inside = ns.command("sleep");
    inside.arg("300");
    let mut inside = inside.spawn().unwrap();
    let mut outside = std::process::Command::new("sleep")
        .arg("300")
        .env(OWNER_ENV, prefix)
        .spawn()
        .unwrap();
    // An orphan namespace file with no record at all.
    let orphan = NamedNetns::create(&format!("{orphan_prefix}-x"), None).unwrap();
    std::mem::forget(ns);
    std::mem::forget(orphan);

    let report = cleanup_stale("nsimstale").unwrap();
    for p in [prefix, orphan_prefix.as_str()] {
        assert!(report.prefixes.iter().any(|x| x == p), "{p} in {report:?}");
    }
    assert!(
        report.processes.contains(&(outside.id() as i32)),
        "{report:?}"
    );
    for p in [&mut inside, &mut outside] {
        let st = p.wait().unwrap();
        assert!(!st.success(), "killed");
    }
    assert!(
        !Path::new(NETNS_RUN_DIR)
            .join(format!("{prefix}-node1"))
            .exists()
    );
    assert!(
        !Path::new(NETNS_RUN_DIR)
            .join(format!("{orphan_prefix}-x"))
            .exists()
    );
    assert!(!Path::new(REGISTRY_DIR).join(prefix).exists());
    assert!(!Path::new(REGISTRY_DIR).join(format!("{prefix}.d")).exists());
    // A live scope with the same tag survives (its owner, us, is alive).
    let live = Scope::new("nsimstale").unwrap();
    let live_ns = live.create_netns("keep").unwrap();
    let again = cleanup_stale("nsimstale").unwrap();
    assert!(
        !again.prefixes.iter().any(|p| p == live.prefix()),
        "{again:?}"
    );
    assert!(live_ns.path().exists(), "a live scope is left alone");
}

/// Runs the reference CNI plugin `plugin` (ADD or DEL) in the node's netns,
/// as a runtime does, with `conf` (one plugin of the conflist) on stdin.
fn run_cni(
    node: &e2e::netsim::Node,
    plugin: &str,
    command: &str,
    conf: &serde_json::Value,
    pod: &NamedNetns,
) -> serde_json::Value {
    use std::io::Write as _;
    let mut cmd = node.netns().command(Path::new("/usr/lib/cni").join(plugin));
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.name())
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{plugin} {command}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn static_pods_and_real_cni_pods_share_a_node() {
    if skip() {
        return;
    }
    if !Path::new("/usr/lib/cni/bridge").exists() || !Path::new("/usr/lib/cni/host-local").exists()
    {
        eprintln!("skipped: CNI reference plugins missing (package containernetworking-plugins)");
        return;
    }
    let cluster = Cluster::new("nsimcni", 2).unwrap();
    let node = cluster.node(1);
    let static_pod = node.add_pod("static").unwrap();
    let remote = cluster.node(2).add_pod("remote").unwrap();
    let list = node.cni_conflist("netsim");
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let pod = node.create_pod_netns("cni").unwrap();
    let result = run_cni(node, "bridge", "ADD", &conf, &pod);
    let addr = result["ips"][0]["address"].as_str().unwrap().to_string();
    // host-local hands out the bottom of the node's range, below static pods
    assert_eq!(addr, "10.244.1.2/24", "{result}");
    assert_eq!(result["ips"][0]["gateway"], "10.244.1.1");
    assert!(pod.has_link("eth0").unwrap());
    assert!(
        node.cni_ipam_dir().join("netsim").exists(),
        "IPAM state in the scope directory"
    );
    let ip: Ipv4Addr = addr.split('/').next().unwrap().parse().unwrap();
    let t = Duration::from_secs(3);
    pod.ping(static_pod.ip(), t).unwrap();
    pod.ping(remote.ip(), t).unwrap();
    remote.netns().ping(ip, t).unwrap();
    // the bridge plugin reused the node's bridge
    let links = node.netns().links().unwrap();
    assert_eq!(
        links
            .iter()
            .filter(|l| l.kind.as_deref() == Some("bridge"))
            .count(),
        1
    );
    run_cni(node, "bridge", "DEL", &conf, &pod);
    assert!(!pod.has_link("eth0").unwrap());
    let dir = cluster.scope().dir().to_path_buf();
    drop(pod);
    drop((static_pod, remote));
    drop(cluster);
    assert!(!dir.exists(), "scope directory (IPAM state) removed");
}
