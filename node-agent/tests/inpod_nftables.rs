//! Native nftables in-pod redirection (`NATIVE_NFTABLES=true`) in real
//! network namespaces (root, `nft`): every golden script is accepted by the
//! kernel; applying, re-applying, switching variants and removing converge
//! on exactly our tables (a foreign table stays); captured outbound TCP
//! reaches 15001 with its original destination while ztunnel's marked
//! sockets pass; the host probe sets keep pod UIDs as comments; and the
//! `InpodRedirector` runs a pod's whole life cycle on nftables.

mod inpod_support;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use inpod_support::*;
use node_agent::redirect::inpod::probe_snat::HostProbe;
use node_agent::redirect::inpod::rules::{self, RuleConfig};
use node_agent::redirect::inpod::{
    InpodConfig, InpodRedirector, PodNetConfig, RuleEngine, apply_pod, remove_pod, rules_nft,
};
use node_agent::redirect::netns::Netns;
use node_agent::redirect::{PodRedirect, Redirector};

/// `N` fresh network namespaces, or `None` with the reason to skip printed
/// when the test cannot run here: it needs root and the `nft` binary.
fn netns_or_skip<const N: usize>() -> Option<[TestNetns; N]> {
    if !is_root() {
        eprintln!("skipped: needs root to create network namespaces");
        return None;
    }
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: the nft binary is not installed (apt-get install nftables)");
        return None;
    }
    Some(std::array::from_fn(|_| TestNetns::new()))
}

fn nft_config(ipv6: bool) -> PodNetConfig {
    PodNetConfig {
        engine: RuleEngine::Nftables,
        ipv6,
        rules: RuleConfig::default(),
    }
}

/// One step on the host probe, run in the node's netns.
type HostStep = Box<dyn FnOnce(&HostProbe) -> Result<(), String> + Send>;

fn nft_probe() -> HostProbe {
    HostProbe {
        engine: RuleEngine::Nftables,
        rules: RuleConfig::default(),
    }
}

/// Our pod tables as listed (no counters).
fn our_tables(ns: &Netns) -> Vec<String> {
    node_agent::redirect::inpod::apply::inspect_pod_nft(ns)
        .unwrap()
        .0
}

fn table_names(ns: &Netns) -> Vec<String> {
    run_in(ns, "nft", &["list", "tables"])
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn golden_scripts_are_accepted_by_the_kernel() {
    let Some([first]) = netns_or_skip() else {
        return;
    };
    // Each script is checked in a netns of its own.
    let mut fresh = std::iter::once(first).chain(std::iter::repeat_with(TestNetns::new));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/inpod-nft");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let t = fresh.next().unwrap();
        // Check mode: parsed and validated by the kernel, nothing committed.
        run_in(&t.netns(), "nft", &["-c", "-f", path.to_str().unwrap()]);
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} golden scripts in {dir:?}");
}

#[tokio::test]
async fn apply_reapply_switch_remove_leaves_foreign_tables() {
    let Some([t]) = netns_or_skip() else {
        return;
    };
    let ns = t.netns();
    run_in(&ns, "nft", &["add", "table", "inet", "foreign"]);
    run_in(
        &ns,
        "nft",
        &["add chain inet foreign out { type filter hook output priority 0 ; }"],
    );
    let cfg = nft_config(true);

    apply_pod(&ns, &cfg, &options(false, &[])).await.unwrap();
    let first = our_tables(&ns);
    assert_eq!(first.len(), 2, "nat and mangle only: {first:?}");
    assert!(first.iter().any(|t| t.contains("redirect to :15001")));
    assert!(first.iter().any(|t| t.contains("redirect to :15006")));
    let (_, routing) = node_agent::redirect::inpod::apply::inspect_pod_nft(&ns).unwrap();
    assert!(!routing.is_empty(), "policy routing installed");

    // Re-applying gives the same tables, once each.
    apply_pod(&ns, &cfg, &options(false, &[])).await.unwrap();
    assert_eq!(our_tables(&ns), first);

    // DNS capture on: the raw table appears; off again: it goes.
    apply_pod(&ns, &cfg, &options(true, &[])).await.unwrap();
    let dns = our_tables(&ns);
    assert_eq!(dns.len(), 3, "{dns:?}");
    assert!(dns.iter().any(|t| t.contains("redirect to :15053")));
    apply_pod(&ns, &cfg, &options(false, &[])).await.unwrap();
    assert_eq!(our_tables(&ns), first);

    // Bypassing inbound capture drops the 15006 redirect.
    let bypass = options(false, &[(rules::ANNOTATION_BYPASS_INBOUND, "true")]);
    apply_pod(&ns, &cfg, &bypass).await.unwrap();
    assert!(!our_tables(&ns).iter().any(|t| t.contains(":15006")));

    remove_pod(&ns, RuleEngine::Nftables).await.unwrap();
    assert!(our_tables(&ns).is_empty());
    assert_eq!(table_names(&ns), vec!["table inet foreign".to_string()]);
    let (_, routing) = node_agent::redirect::inpod::apply::inspect_pod_nft(&ns).unwrap();
    assert!(routing.is_empty(), "{routing:?}");
    // Removing again is fine.
    remove_pod(&ns, RuleEngine::Nftables).await.unwrap();
}

#[tokio::test]
async fn ipv4_only_config_has_no_ipv6_rules() {
    let Some([t]) = netns_or_skip() else {
        return;
    };
    let ns = t.netns();
    apply_pod(&ns, &nft_config(false), &options(true, &[]))
        .await
        .unwrap();
    let tables = our_tables(&ns).join("\n");
    assert!(!tables.contains("ip6"), "{tables}");
    assert!(tables.contains("ip daddr != 127.0.0.1"), "{tables}");
}

/// Accepts on `listener` within `wait`; the accepted connection's original
/// destination (SO_ORIGINAL_DST), or None.
fn accept_original_dst(listener: &TcpListener, wait: Duration) -> Option<SocketAddr> {
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let dst = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::OriginalDst)
                    .unwrap();
                let ip = std::net::Ipv4Addr::from(u32::from_be(dst.sin_addr.s_addr));
                return Some(SocketAddr::new(ip.into(), u16::from_be(dst.sin_port)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Outbound TCP from the pod is redirected to 15001 (original destination
/// kept); a socket with ztunnel's mark (0x539) is not.
#[tokio::test]
async fn outbound_tcp_is_captured_and_marked_sockets_pass() {
    let Some([t]) = netns_or_skip() else {
        return;
    };
    let ns = t.netns();
    // A link whose far end answers nothing (no address): the pod's network.
    run_in(
        &ns,
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "dead0",
        ],
    );
    run_in(&ns, "ip", &["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    run_in(&ns, "ip", &["link", "set", "eth0", "up"]);
    run_in(&ns, "ip", &["link", "set", "dead0", "up"]);
    apply_pod(&ns, &nft_config(true), &options(false, &[]))
        .await
        .unwrap();

    let result = ns
        .run(|| {
            let outbound = TcpListener::bind("0.0.0.0:15001").unwrap();
            let target: SocketAddr = "10.77.0.9:80".parse().unwrap();
            let timeout = Duration::from_secs(1);

            let plain = std::net::TcpStream::connect_timeout(&target, timeout);
            let captured = accept_original_dst(&outbound, Duration::from_secs(5));

            let marked = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .unwrap();
            marked.set_mark(rules::ZTUNNEL_MARK).unwrap();
            // Nothing answers on the link: the connect times out.
            let marked_result = marked.connect_timeout(&target.into(), Duration::from_millis(300));
            let leaked = accept_original_dst(&outbound, Duration::from_millis(300));
            (plain.is_ok(), captured, marked_result.is_ok(), leaked)
        })
        .unwrap();
    let (plain_ok, captured, marked_ok, leaked) = result;
    assert!(plain_ok, "the captured connect completes (at 15001)");
    assert_eq!(captured, Some("10.77.0.9:80".parse().unwrap()));
    assert!(!marked_ok, "a marked socket is not redirected");
    assert_eq!(leaked, None);

    remove_pod(&ns, RuleEngine::Nftables).await.unwrap();
}

#[tokio::test]
async fn host_probe_sets_keep_uid_comments() {
    let Some([node]) = netns_or_skip() else {
        return;
    };
    let ns = node.netns();
    let label = node.path();
    // Runs `f` on the nft host probe inside the node's netns.
    let on_host = |f: HostStep| {
        let p = nft_probe();
        ns.run(move || f(&p)).unwrap().unwrap()
    };
    let members = || {
        let p = nft_probe();
        ns.run(move || p.members_here()).unwrap().unwrap()
    };
    let ensure = || {
        let l = label.clone();
        on_host(Box::new(move |p| {
            p.ensure_here(true, &l).map_err(|e| e.to_string())
        }))
    };
    ensure();
    ensure();
    let listed = run_in(
        &ns,
        "nft",
        &["-s", "list", "table", "inet", rules_nft::HOST_TABLE],
    );
    assert_eq!(
        listed.matches("snat ip to 169.254.7.127").count(),
        1,
        "{listed}"
    );
    assert_eq!(listed.matches("snat ip6 to").count(), 1, "{listed}");

    let ips: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap(), "fd00::3".parse().unwrap()];
    let with_ips = |f: fn(&HostProbe, &[IpAddr]) -> Result<(), String>| {
        let i = ips.clone();
        on_host(Box::new(move |p| f(p, &i)))
    };
    with_ips(|p, i| p.add_ips_here("uid-1", i).map_err(|e| e.to_string()));
    let m = members();
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().all(|(_, c)| c.as_deref() == Some("uid-1")));

    // Elements survive a re-ensure (the chain is refilled, the sets kept).
    ensure();
    assert_eq!(members().len(), 2);

    // Another pod's UID does not remove the entries; the owner's does, and
    // deleting what is gone is fine.
    with_ips(|p, i| p.del_pod_ips_here("uid-2", i).map_err(|e| e.to_string()));
    assert_eq!(members().len(), 2);
    with_ips(|p, i| p.del_pod_ips_here("uid-1", i).map_err(|e| e.to_string()));
    with_ips(|p, i| p.del_ips_here(i).map_err(|e| e.to_string()));
    assert!(members().is_empty());

    let l = label.clone();
    on_host(Box::new(move |p| {
        p.remove_here(&l).map_err(|e| e.to_string())
    }));
    assert!(table_names(&ns).is_empty());
    assert!(members().is_empty());
}

#[tokio::test]
async fn redirector_runs_a_pod_life_cycle_on_nftables() {
    let Some([node, pod_ns]) = netns_or_skip() else {
        return;
    };
    let handoff = Arc::new(FakeHandoff::default());
    let r = InpodRedirector::new(
        InpodConfig {
            host_netns: Some(node.path()),
            proc_root: tempfile::tempdir().unwrap().keep(),
            nftables: true,
            ..Default::default()
        },
        handoff.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.engine(), RuleEngine::Nftables);
    assert_eq!(r.backend(), None);
    let host = node.netns();
    let host_table = || {
        run_in(
            &host,
            "nft",
            &["list", "table", "inet", rules_nft::HOST_TABLE],
        )
    };
    assert!(host_table().contains("postrouting"));
    // No iptables rules anywhere.
    let saved = run_in(&host, "iptables-nft-save", &[]);
    assert!(!saved.contains("ISTIO"), "{saved}");

    let pod = PodRedirect {
        uid: "uid-a".into(),
        name: "a".into(),
        namespace: "ns1".into(),
        service_account: "sa".into(),
        ips: vec!["10.9.0.1".parse().unwrap()],
        netns: Some(pod_ns.path()),
        annotations: Default::default(),
    };
    r.enrol(&pod).await.unwrap();
    assert_eq!(our_tables(&pod_ns.netns()).len(), 2);
    assert!(
        host_table().contains("10.9.0.1 comment \"uid-a\""),
        "{}",
        host_table()
    );
    assert_eq!(
        handoff.calls.lock().unwrap().clone(),
        vec!["add uid-a ns1/a".to_string()]
    );

    r.unenrol(&pod).await.unwrap();
    assert!(our_tables(&pod_ns.netns()).is_empty());
    assert!(!host_table().contains("10.9.0.1"));

    r.enrol(&pod).await.unwrap();
    r.cleanup_all().await.unwrap();
    assert!(our_tables(&pod_ns.netns()).is_empty());
    assert!(table_names(&host).is_empty(), "{:?}", table_names(&host));
}

/// The node's probe SNAT in action: a connection from a local socket on the
/// node (as kubelet's probes) to an enrolled pod arrives from the probe
/// address; to a pod not in the set, from the node's own address.
#[tokio::test]
async fn node_connections_to_enrolled_pods_arrive_from_the_probe_address() {
    let Some([node, pod]) = netns_or_skip() else {
        return;
    };
    let (node_ns, pod_ns) = (node.netns(), pod.netns());
    // veth pod eth0 (10.79.0.2) <-> node host0 (10.79.0.1): created in the pod,
    // one end moved to the node through a process living in the node's netns.
    run_in(
        &pod_ns,
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "host0",
        ],
    );
    let mut holder = node_ns
        .run(|| {
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap()
        })
        .unwrap();
    let pid = holder.id().to_string();
    run_in(&pod_ns, "ip", &["link", "set", "host0", "netns", &pid]);
    holder.kill().unwrap();
    let _ = holder.wait();
    run_in(
        &pod_ns,
        "ip",
        &["addr", "add", "10.79.0.2/24", "dev", "eth0"],
    );
    run_in(&pod_ns, "ip", &["link", "set", "eth0", "up"]);
    run_in(
        &node_ns,
        "ip",
        &["addr", "add", "10.79.0.1/24", "dev", "host0"],
    );
    run_in(&node_ns, "ip", &["link", "set", "host0", "up"]);
    // As a pod's: everything else (the probe address too) via the node.
    run_in(
        &pod_ns,
        "ip",
        &["route", "add", "default", "via", "10.79.0.1"],
    );

    let probe = nft_probe();
    let label = node.path();
    let p = probe.clone();
    node_ns
        .run(move || p.ensure_here(false, &label))
        .unwrap()
        .unwrap();
    // The pod's listening socket stays in the pod's netns.
    let listener = pod_ns
        .run(|| TcpListener::bind("10.79.0.2:8080").unwrap())
        .unwrap();
    let source_seen = |listener: &TcpListener| -> IpAddr {
        let _client = node_ns
            .run(|| {
                let pod: SocketAddr = "10.79.0.2:8080".parse().unwrap();
                std::net::TcpStream::connect_timeout(&pod, Duration::from_secs(5)).unwrap()
            })
            .unwrap();
        listener.accept().unwrap().1.ip()
    };
    assert_eq!(
        source_seen(&listener),
        "10.79.0.1".parse::<IpAddr>().unwrap()
    );

    let p = probe.clone();
    node_ns
        .run(move || p.add_ips_here("uid-p", &["10.79.0.2".parse().unwrap()]))
        .unwrap()
        .unwrap();
    assert_eq!(
        source_seen(&listener),
        IpAddr::from(rules::DEFAULT_PROBE_SNAT_V4)
    );
}

/// `NATIVE_NFTABLES` switched with a pod enrolled: the agent restarted on
/// the other engine re-applies the pod's rules with it at start-up and
/// removes what the previous engine left, in the pod and on the node; and
/// back again.
#[tokio::test]
async fn switching_engines_with_an_enrolled_pod_leaves_one_engine() {
    let Some([node, pod_ns]) = netns_or_skip() else {
        return;
    };
    let handoff = Arc::new(FakeHandoff::default());
    let start = |nftables: bool| {
        let (node, handoff) = (node.path(), handoff.clone());
        async move {
            InpodRedirector::new(
                InpodConfig {
                    host_netns: Some(node),
                    proc_root: tempfile::tempdir().unwrap().keep(),
                    nftables,
                    backend: Some(node_agent::redirect::iptables::Backend::Nft),
                    ..Default::default()
                },
                handoff,
            )
            .await
            .unwrap()
        }
    };
    let pod = PodRedirect {
        uid: "uid-s".into(),
        name: "s".into(),
        namespace: "ns1".into(),
        service_account: "sa".into(),
        ips: vec!["10.9.0.7".parse().unwrap()],
        netns: Some(pod_ns.path()),
        annotations: Default::default(),
    };
    let host = node.netns();
    let iptables_in = |ns: &Netns| {
        let mut s = run_in(ns, "iptables-nft-save", &[]);
        s += &run_in(ns, "ip6tables-nft-save", &[]);
        s.lines().filter(|l| l.contains("ISTIO")).count()
    };
    let ipsets = || run_in(&host, "ipset", &["list", "-n"]);

    // Enrolled by an iptables agent, on a node that never ran nftables: no
    // other engine to clean up (no pod pays for looking).
    let iptables_agent = start(false).await;
    assert_eq!(iptables_agent.leftover_engine(), None);
    iptables_agent.enrol(&pod).await.unwrap();
    assert!(iptables_in(&pod_ns.netns()) > 0);
    assert!(ipsets().contains("istio-inpod-probes-v4"));
    drop(iptables_agent);

    // The agent comes back with nftables: start-up reconcile of the pod.
    let nft_agent = start(true).await;
    assert!(matches!(
        nft_agent.leftover_engine(),
        Some(RuleEngine::Iptables(_))
    ));
    // Until the pods are reconciled the iptables host state stays (an agent
    // dying now finds the switch again).
    assert!(iptables_in(&host) > 0);
    let report = nft_agent.reconcile(std::slice::from_ref(&pod)).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(nft_agent.leftover_engine(), None);
    assert_eq!(our_tables(&pod_ns.netns()).len(), 2);
    assert_eq!(
        iptables_in(&pod_ns.netns()),
        0,
        "iptables rules left in the pod"
    );
    assert_eq!(
        iptables_in(&host),
        0,
        "iptables probe SNAT left on the node"
    );
    assert!(ipsets().trim().is_empty(), "ipsets left: {}", ipsets());
    let (_, routing) =
        node_agent::redirect::inpod::apply::inspect_pod_nft(&pod_ns.netns()).unwrap();
    assert!(!routing.is_empty(), "the shared policy routing stays");
    drop(nft_agent);

    // And back to iptables; the first agent dies before its start-up
    // reconcile, the next one still finds the nft state and finishes the job.
    let died = start(false).await;
    assert_eq!(died.leftover_engine(), Some(RuleEngine::Nftables));
    drop(died);
    let iptables_agent = start(false).await;
    assert_eq!(iptables_agent.leftover_engine(), Some(RuleEngine::Nftables));
    let report = iptables_agent.reconcile(std::slice::from_ref(&pod)).await;
    assert_eq!(iptables_agent.leftover_engine(), None);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(iptables_in(&pod_ns.netns()) > 0);
    assert!(
        our_tables(&pod_ns.netns()).is_empty(),
        "nft tables left in the pod"
    );
    let host_tables = table_names(&host);
    assert!(
        !host_tables.iter().any(|t| t.contains("istio-ambient")),
        "nft host table left: {host_tables:?}"
    );

    // Unenrol leaves nothing of either.
    iptables_agent.unenrol(&pod).await.unwrap();
    assert_eq!(iptables_in(&pod_ns.netns()), 0);
    assert!(our_tables(&pod_ns.netns()).is_empty());
}
