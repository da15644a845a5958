//! GENEVE redirection against a real kernel, in simulated namespaces: the
//! tunnels, rules, routes and ipset are built, read back and compared with
//! what they must be; packets are walked through them (captured outbound and
//! inbound TCP reach transparent listeners in the ztunnel namespace with the
//! original addresses, kubelet-style probes and unenrolled pods bypass);
//! pods are enrolled and unenrolled; a ztunnel IP change rebuilds without
//! stale state; without ztunnel the node is held (enrolled pods' traffic
//! refused, probes pass, unenrol releases) and rebuilt when one is back;
//! clean-up leaves the node as it was.
//!
//! Needs root and a kernel with GENEVE. This machine's kernel has none:
//! `scripts/vm-tests.sh` runs this binary in a VM (`make test-vm`). The
//! start-up failure test builds no tunnel and runs wherever there is root.

mod geneve_support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use geneve_support::*;
use node_agent::redirect::geneve::constants::IPSET_NAME;
use node_agent::redirect::geneve::inventory::{inspect_node, inspect_ztunnel};
use node_agent::redirect::geneve::{GeneveConfig, GeneveRedirector, ZtunnelPod};
use node_agent::redirect::iptables::detect_backend;
use node_agent::redirect::netlink::Netlink;
use node_agent::redirect::{PodRedirect, Redirector};

const WAIT: Duration = Duration::from_secs(3);

fn pod(uid: &str, name: &str, ip: Ipv4Addr) -> PodRedirect {
    PodRedirect {
        uid: uid.into(),
        name: name.into(),
        namespace: "default".into(),
        ips: vec![ip.into()],
        ..Default::default()
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn skip() -> bool {
    if let Some(why) = geneve_missing() {
        eprintln!("skipped: {why}");
        return true;
    }
    false
}

/// Links, addresses, rules, routes, iptables rules and ipsets of netns
/// `ns`, as text (counters and comments dropped).
fn snapshot(ns: &str) -> String {
    let mut s = String::new();
    for args in [
        "-o link show",
        "-o -4 addr show",
        "rule show",
        "-4 route show table all",
    ] {
        let out = run_ip(Some(ns), args);
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            // link state flags of existing devices may legitimately change
            // (carrier); keep the name and kind only
            let line = if args.contains("link") {
                line.split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                line.to_string()
            };
            s.push_str(&line);
            s.push('\n');
        }
    }
    let backend = Topo::netns(ns).run(detect_backend).unwrap();
    let ipt = Topo::netns(ns)
        .run(move || {
            ["mangle", "nat", "filter"]
                .iter()
                .map(|t| {
                    node_agent::redirect::iptables::save(
                        backend,
                        node_agent::redirect::iptables::Family::V4,
                        Some(t),
                    )
                    .unwrap()
                })
                .collect::<String>()
        })
        .unwrap();
    for line in ipt.lines().filter(|l| !l.starts_with('#')) {
        // chain counters
        let line = match line.find(" [") {
            Some(i) if line.starts_with(':') => &line[..i],
            _ => line,
        };
        s.push_str(line);
        s.push('\n');
    }
    let ipsets = Topo::netns(ns)
        .run(|| {
            std::process::Command::new("ipset")
                .args(["list", "-n"])
                .output()
                .unwrap()
        })
        .unwrap();
    s.push_str(&String::from_utf8_lossy(&ipsets.stdout));
    s
}

fn ztunnel_pod(t: &Topo, ip: Ipv4Addr) -> ZtunnelPod {
    ZtunnelPod {
        uid: format!("ztunnel-{ip}"),
        ip,
        netns: Topo::path(&t.zt),
        iface: "eth0".into(),
    }
}

async fn redirector(t: &Topo) -> GeneveRedirector {
    GeneveRedirector::new(GeneveConfig {
        node_netns: Topo::path(&t.node),
        ..Default::default()
    })
    .await
    .expect("redirector")
}

fn pods(list: &[(Ipv4Addr, &str)]) -> BTreeMap<Ipv4Addr, String> {
    list.iter()
        .map(|(ip, uid)| (*ip, uid.to_string()))
        .collect()
}

/// Asserts that the node and ztunnel namespaces hold exactly what they must
/// for the current topology and `enrolled` pods.
async fn assert_exact(red: &GeneveRedirector, enrolled: &BTreeMap<Ipv4Addr, String>) {
    let topo = red.topology().await.expect("built");
    let (node, zt) = red.inspect().await.expect("inspect");
    let drift = node.node_drift(&topo, enrolled);
    assert!(drift.is_empty(), "node differs:\n{}", drift.join("\n"));
    let drift = zt.expect("ztunnel inventory").ztunnel_drift(&topo);
    assert!(
        drift.is_empty(),
        "ztunnel netns differs:\n{}",
        drift.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_traffic_and_cleanup() {
    if skip() {
        return;
    }
    let t = Topo::new("a");
    // Other software's rules at our priorities (Cilium moves the kernel's
    // `lookup local` rule to 100): build, refresh and clean-up leave them be.
    for rule in [
        "rule add pref 100 lookup local",
        "rule add pref 102 fwmark 0x800/0x800 lookup 2004",
    ] {
        assert!(run_ip(Some(&t.node), rule).status.success(), "ip {rule}");
    }
    let node_before = snapshot(&t.node);
    let zt_before = snapshot(&t.zt);
    let red = redirector(&t).await;
    let (pa, pb) = (pod("uid-a", "pod-a", POD_A), pod("uid-b", "pod-b", POD_B));

    // No ztunnel yet: recorded, put in the ipset, reported retryable.
    let err = red.enrol(&pa).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("default/pod-a"), "{err}");

    let start = Instant::now();
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("build");
    eprintln!("timing: build against ztunnel: {:?}", start.elapsed());
    let topo = red.topology().await.unwrap();
    assert_eq!(topo.geneve_port, 6081);
    assert_eq!(topo.ztunnel_veth, t.zt_veth);
    assert_eq!(topo.host_ip, HOST_IP);
    assert_eq!(topo.tunnel_remote, HOST_IP);
    assert_exact(&red, &pods(&[(POD_A, "uid-a")])).await;

    let start = Instant::now();
    red.enrol(&pb).await.expect("enrol pod-b");
    eprintln!("timing: enrol one pod: {:?}", start.elapsed());
    red.enrol(&pb).await.expect("enrol pod-b again");
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b")])).await;

    // Refreshing with the same ztunnel keeps the tunnel devices.
    let (before, _) = red.inspect().await.unwrap();
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("refresh");
    let (after, _) = red.inspect().await.unwrap();
    assert_eq!(
        before.links.iter().map(|l| l.index).collect::<Vec<_>>(),
        after.links.iter().map(|l| l.index).collect::<Vec<_>>()
    );
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b")])).await;

    // Transparent listeners in the ztunnel netns, as ztunnel has them.
    let out_l = listen(&t.zt, sa(Ipv4Addr::UNSPECIFIED, 15001), true);
    let in_l = listen(&t.zt, sa(Ipv4Addr::UNSPECIFIED, 15006), true);
    let hbone_l = listen(&t.zt, sa(Ipv4Addr::UNSPECIFIED, 15008), true);
    let app_b = listen(&t.pod_b, sa(Ipv4Addr::UNSPECIFIED, 8080), false);

    // Outbound: pod-a's TCP goes through istioout to :15001, original
    // destination preserved.
    let _c = connect(&t.pod_a, sa(POD_B, 80), b"outbound").expect("pod-a connects");
    let seen = accept_one(&out_l, WAIT).expect("captured on 15001");
    assert_eq!(seen.local, sa(POD_B, 80));
    assert_eq!(seen.peer.ip(), std::net::IpAddr::V4(POD_A));
    assert_eq!(seen.data, b"outbound");

    // Inbound from another node: plaintext to :15006, HBONE port to :15008.
    let _c = connect(&t.remote, sa(POD_B, 8080), b"inbound").expect("remote connects");
    let seen = accept_one(&in_l, WAIT).expect("captured on 15006");
    assert_eq!(
        (seen.local, seen.peer.ip()),
        (sa(POD_B, 8080), t.remote_ip.into())
    );
    assert_eq!(seen.data, b"inbound");
    let _c = connect(&t.remote, sa(POD_B, 15008), b"hbone").expect("remote connects");
    let seen = accept_one(&hbone_l, WAIT).expect("captured on 15008");
    assert_eq!(seen.local, sa(POD_B, 15008));
    assert!(accept_one(&app_b, Duration::from_millis(200)).is_none());

    // Kubelet-style probe from $HOST_IP reaches the pod itself.
    let _c = connect(&t.node, sa(POD_B, 8080), b"probe").expect("probe connects");
    let seen = accept_one(&app_b, WAIT).expect("probe reaches pod-b");
    assert_eq!(seen.peer.ip(), std::net::IpAddr::V4(HOST_IP));
    assert!(accept_one(&in_l, Duration::from_millis(200)).is_none());

    // Unenrolled: pod-b's inbound bypasses ztunnel.
    let start = Instant::now();
    red.unenrol(&pb).await.expect("unenrol");
    eprintln!("timing: unenrol one pod: {:?}", start.elapsed());
    red.unenrol(&pb).await.expect("unenrol again");
    assert_exact(&red, &pods(&[(POD_A, "uid-a")])).await;
    let _c = connect(&t.remote, sa(POD_B, 8080), b"direct").expect("remote connects");
    let seen = accept_one(&app_b, WAIT).expect("reaches pod-b directly");
    assert_eq!(seen.peer.ip(), std::net::IpAddr::V4(t.remote_ip));
    assert!(accept_one(&in_l, Duration::from_millis(200)).is_none());
    // ...while pod-a's outbound is still captured.
    let _c = connect(&t.pod_a, sa(POD_B, 8080), b"still").expect("pod-a connects");
    let seen = accept_one(&out_l, WAIT).expect("pod-a still captured");
    assert_eq!(seen.local, sa(POD_B, 8080));

    // Full clean-up: nothing left on either side.
    let start = Instant::now();
    red.cleanup().await.expect("cleanup");
    eprintln!("timing: full cleanup: {:?}", start.elapsed());
    red.cleanup().await.expect("cleanup twice");
    let backend = red.backend();
    let node_ns = Topo::netns(&t.node);
    let node_nl = Netlink::connect(&node_ns).await.unwrap();
    let inv = inspect_node(&node_ns, &node_nl, backend).await.unwrap();
    assert!(
        inv.node_leftovers().is_empty(),
        "{:?}",
        inv.node_leftovers()
    );
    let zt_ns = Topo::netns(&t.zt);
    let zt_nl = Netlink::connect(&zt_ns).await.unwrap();
    let inv = inspect_ztunnel(&zt_ns, &zt_nl, backend).await.unwrap();
    assert!(
        inv.ztunnel_leftovers(&topo.ztunnel_rule_params())
            .is_empty(),
        "{:?}",
        inv.ztunnel_leftovers(&topo.ztunnel_rule_params())
    );
    drop((out_l, in_l, hbone_l, app_b));
    assert_eq!(snapshot(&t.node), node_before, "node netns changed");
    assert_eq!(snapshot(&t.zt), zt_before, "ztunnel netns changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_ip_change_rebuilds_without_stale_state() {
    if skip() {
        return;
    }
    let t = Topo::new("b");
    let red = redirector(&t).await;
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("build");
    red.enrol(&pod("uid-a", "pod-a", POD_A)).await.unwrap();
    red.enrol(&pod("uid-b", "pod-b", POD_B)).await.unwrap();

    // ztunnel restarts with another IP.
    t.readdress_ztunnel(ZT_IP, ZT_IP2);
    let start = Instant::now();
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP2)))
        .await
        .expect("rebuild");
    eprintln!(
        "timing: rebuild for a new ztunnel IP: {:?}",
        start.elapsed()
    );
    let topo = red.topology().await.unwrap();
    assert_eq!(topo.ztunnel.ip, ZT_IP2);
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b")])).await;
    let (node, zt) = red.inspect().await.unwrap();
    let old = ZT_IP.to_string();
    assert_eq!(node.iptables.rules_mentioning(&old).count(), 0);
    assert_eq!(zt.unwrap().iptables.rules_mentioning(&old).count(), 0);
    for routes in node.routes.values() {
        assert!(
            routes
                .iter()
                .all(|r| r.dst.addr() != ZT_IP && r.via != Some(ZT_IP)),
            "{routes:?}"
        );
    }

    // Traffic follows the new ztunnel.
    let out_l = listen(&t.zt, sa(Ipv4Addr::UNSPECIFIED, 15001), true);
    let _c = connect(&t.pod_a, sa(POD_B, 80), b"after").expect("pod-a connects");
    let seen = accept_one(&out_l, WAIT).expect("captured after rebuild");
    assert_eq!(seen.local, sa(POD_B, 80));

    // ztunnel gone: the node is held (fail closed). Capture stays (ipset,
    // marks, policy rules, tunnels, table 100), the routes of tables 101/102
    // become unreachable, and enrolled pods' traffic is refused or dropped
    // instead of flowing around ztunnel. The node still reaches the ztunnel
    // pod (a restarting ztunnel must pass its readiness probe).
    let start = Instant::now();
    red.set_ztunnel(None).await.expect("hold");
    eprintln!("timing: hold without ztunnel: {:?}", start.elapsed());
    assert!(red.is_held().await);
    assert!(red.topology().await.is_none());
    let both = pods(&[(POD_A, "uid-a"), (POD_B, "uid-b")]);
    let assert_held = |node: &node_agent::redirect::geneve::Inventory,
                       pods: &BTreeMap<Ipv4Addr, String>| {
        let drift = node.held_drift(&topo, pods);
        assert!(drift.is_empty(), "held node differs:\n{}", drift.join("\n"));
    };
    let (node, zt) = red.inspect().await.unwrap();
    assert!(zt.is_none());
    assert_held(&node, &both);
    let app_b = listen(&t.pod_b, sa(Ipv4Addr::UNSPECIFIED, 8080), false);
    let refused = |from: &str, what: &'static [u8]| {
        let r = connect(from, sa(POD_B, 8080), what);
        assert!(r.is_err(), "{from} reached pod-b while held: {r:?}");
        assert!(
            accept_one(&app_b, Duration::from_millis(300)).is_none(),
            "{from}'s connection must not reach pod-b around ztunnel"
        );
        assert!(accept_one(&out_l, Duration::from_millis(100)).is_none());
    };
    refused(&t.pod_a, b"held-out"); // captured outbound
    refused(&t.remote, b"held-in"); // inbound to an enrolled pod
    // Kubelet-style probes still reach the ztunnel pod and enrolled pods.
    let zt_probe = listen(&t.zt, sa(Ipv4Addr::UNSPECIFIED, 15021), false);
    let _c = connect(&t.node, sa(ZT_IP2, 15021), b"zt-probe").expect("ztunnel probe connects");
    assert!(
        accept_one(&zt_probe, WAIT).is_some(),
        "probe reaches the held ztunnel pod"
    );
    drop(zt_probe);
    let _c = connect(&t.node, sa(POD_B, 8080), b"probe").expect("probe connects");
    let seen = accept_one(&app_b, WAIT).expect("probe reaches pod-b");
    assert_eq!(seen.peer.ip(), std::net::IpAddr::V4(HOST_IP));
    // Holding again (the control loop retries) changes nothing.
    red.set_ztunnel(None).await.expect("hold again");
    assert_held(&red.inspect().await.unwrap().0, &both);

    // Unenrolling while held releases the pod; enrolling again holds it.
    red.unenrol(&pod("uid-b", "pod-b", POD_B)).await.unwrap();
    assert_held(&red.inspect().await.unwrap().0, &pods(&[(POD_A, "uid-a")]));
    let _c = connect(&t.remote, sa(POD_B, 8080), b"direct").expect("unenrolled: direct");
    assert!(accept_one(&app_b, WAIT).is_some());
    let err = red.enrol(&pod("uid-b", "pod-b", POD_B)).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_held(&red.inspect().await.unwrap().0, &both);
    refused(&t.remote, b"held-again");

    // A restarted agent finds the held node and keeps it held.
    drop(red);
    let red = redirector(&t).await;
    red.set_ztunnel(None)
        .await
        .expect("hold after agent restart");
    assert_held(&red.inspect().await.unwrap().0, &both);
    let report = red
        .reconcile(&[pod("uid-a", "pod-a", POD_A), pod("uid-b", "pod-b", POD_B)])
        .await;
    assert!(report.failed.iter().all(|e| e.is_retryable()), "{report:?}");
    assert_held(&red.inspect().await.unwrap().0, &both);

    // ztunnel back: rebuilt, the held routes replaced in place.
    let start = Instant::now();
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP2)))
        .await
        .expect("build again");
    eprintln!("timing: build after hold: {:?}", start.elapsed());
    assert!(!red.is_held().await);
    assert_exact(&red, &both).await;
    let _c = connect(&t.pod_a, sa(POD_B, 80), b"back").expect("pod-a connects");
    let seen = accept_one(&out_l, WAIT).expect("captured again");
    assert_eq!(seen.local, sa(POD_B, 80));

    // Held, then back with another IP: the tunnels are replaced, pod routes
    // made unreachable meanwhile, nothing of the old IP left.
    red.set_ztunnel(None).await.expect("hold");
    t.readdress_ztunnel(ZT_IP2, ZT_IP);
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("build for the new IP after hold");
    assert_exact(&red, &both).await;
    let (node, _) = red.inspect().await.unwrap();
    assert_eq!(
        node.iptables.rules_mentioning(&ZT_IP2.to_string()).count(),
        0
    );
    let _c = connect(&t.pod_a, sa(POD_B, 80), b"moved").expect("pod-a connects");
    let seen = accept_one(&out_l, WAIT).expect("captured by the moved ztunnel");
    assert_eq!(seen.local, sa(POD_B, 80));

    // Uninstall from a held node leaves nothing.
    red.set_ztunnel(None).await.expect("hold");
    red.cleanup().await.unwrap();
    let (node, _) = red.inspect().await.unwrap();
    assert!(
        node.node_leftovers().is_empty(),
        "{:?}",
        node.node_leftovers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_and_port_choice() {
    if skip() {
        return;
    }
    let t = Topo::new("c");
    // An external GENEVE device already owns 6081 on the node.
    ip(Some(&t.node), "link add gvext type geneve external");
    let red = redirector(&t).await;
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("build");
    let topo = red.topology().await.unwrap();
    assert_eq!(topo.geneve_port, 6082);
    assert_exact(&red, &pods(&[])).await;
    // a stray entry left by an earlier agent, for a pod that is gone
    red.enrol(&pod("uid-gone", "gone", Ipv4Addr::new(10, 244, 1, 140)))
        .await
        .unwrap();

    // A restarted agent: new redirector, same node; reconcile with the pods
    // that must be enrolled now.
    drop(red);
    let red = redirector(&t).await;
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("refresh");
    let wanted = [pod("uid-a", "pod-a", POD_A), pod("uid-b", "pod-b", POD_B)];
    let report = red.reconcile(&wanted).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.enrolled, ["uid-a", "uid-b"]);
    assert_eq!(report.removed, ["uid-gone"]);
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b")])).await;
    // IP of pod-b reused by a new pod: the entry follows the new UID.
    red.enrol(&pod("uid-b2", "pod-b2", POD_B)).await.unwrap();
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b2")])).await;
    // the late unenrol of the old pod must not remove the new one's entry
    red.unenrol(&pod("uid-b", "pod-b", POD_B)).await.unwrap();
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b2")])).await;

    red.cleanup().await.unwrap();
    // the foreign device is untouched
    let out = run_ip(Some(&t.node), "-d link show gvext");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("external"));
}

/// An agent restarted while an enrolled pod's IPs are not in the cache
/// (upstream istio/istio#60471): the pod keeps its capture (ipset entry,
/// route) through the start-up reconcile; `sync_ips` then follows its IPs
/// (same IP: nothing; a new one: the capture moves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipless_pod_at_startup_keeps_its_capture_and_ip_sync_moves_it() {
    if skip() {
        return;
    }
    let t = Topo::new("d");
    let red = redirector(&t).await;
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("build");
    let (a, b) = (pod("uid-a", "pod-a", POD_A), pod("uid-b", "pod-b", POD_B));
    red.enrol(&a).await.unwrap();
    red.enrol(&b).await.unwrap();
    drop(red);

    let red = redirector(&t).await;
    red.set_ztunnel(Some(ztunnel_pod(&t, ZT_IP)))
        .await
        .expect("refresh");
    let ipless = PodRedirect {
        ips: vec![],
        ..a.clone()
    };
    let report = red.reconcile(&[ipless, b.clone()]).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.enrolled, ["uid-a", "uid-b"]);
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b")])).await;

    red.sync_ips(&a).await.unwrap();
    assert_exact(&red, &pods(&[(POD_A, "uid-a"), (POD_B, "uid-b")])).await;
    let moved_ip = Ipv4Addr::new(10, 244, 1, 140);
    red.sync_ips(&pod("uid-a", "pod-a", moved_ip))
        .await
        .unwrap();
    assert_exact(&red, &pods(&[(moved_ip, "uid-a"), (POD_B, "uid-b")])).await;
    red.unenrol(&PodRedirect { ips: vec![], ..a })
        .await
        .unwrap();
    assert_exact(&red, &pods(&[(POD_B, "uid-b")])).await;
    red.cleanup().await.unwrap();
}

/// Start-up of an agent whose re-application of an enrolled pod's capture
/// fails (here the ipset was replaced by one without comments, so writing
/// it fails): the pod stays held with the entry it had, its failure names it
/// and is retryable, as is a re-enrolment while it lasts; with the set usable
/// again the pod is captured as before. Needs root only: no ztunnel is set,
/// so no GENEVE device is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_failure_keeps_the_pod_held_and_retryable() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let t = Topo::new("f");
    let ipset = |args: &[&str]| {
        let argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = Topo::netns(&t.node)
            .run(move || std::process::Command::new("ipset").args(argv).output())
            .unwrap()
            .unwrap();
        assert!(out.status.success(), "ipset {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let red = redirector(&t).await;
    let a = pod("uid-a", "pod-a", POD_A);
    let err = red.enrol(&a).await.unwrap_err();
    assert!(err.to_string().contains("no ztunnel"), "{err}");
    drop(red);
    let set = IPSET_NAME;
    ipset(&["create", "zt-plain", "hash:ip"]);
    ipset(&["add", "zt-plain", "10.244.1.130"]);
    ipset(&["swap", set, "zt-plain"]);

    let red = redirector(&t).await;
    let report = red.reconcile(std::slice::from_ref(&a)).await;
    assert!(report.enrolled.is_empty(), "{report:?}");
    let [e] = report.failed.as_slice() else {
        panic!("{report:?}")
    };
    assert!(e.is_retryable(), "{e}");
    assert!(
        e.uid == "uid-a" && e.to_string().contains("default/pod-a"),
        "{e}"
    );
    assert!(e.to_string().contains(set), "{e}");
    assert_eq!(
        red.enrolled().await,
        BTreeMap::from([("uid-a".into(), POD_A)])
    );
    assert!(ipset(&["save", set]).contains("10.244.1.130"));

    let err = red.enrol(&a).await.unwrap_err();
    assert!(err.is_retryable() && err.to_string().contains(set), "{err}");
    assert_eq!(red.enrolled().await.len(), 1);

    ipset(&["swap", set, "zt-plain"]);
    ipset(&["destroy", "zt-plain"]);
    let err = red.enrol(&a).await.unwrap_err();
    assert!(err.to_string().contains("no ztunnel"), "{err}");
    assert!(ipset(&["save", set]).contains("10.244.1.130 comment \"uid-a\""));
    red.cleanup().await.unwrap();
}
