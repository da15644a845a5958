//! In-pod redirection in real network namespaces (root): apply the rules,
//! read them back with `iptables-save` and compare with the goldens, re-apply
//! (nothing changes), switch variants, remove (nothing of ours left, foreign
//! rules untouched), for both iptables backends; the host probe SNAT and
//! ipsets; the legacy backend and the xtables lock; and the
//! `InpodRedirector`'s enrol / unenrol / reconcile / cleanup with a fake
//! hand-off and with the ZDS server. Its probe-ipset entries through IP
//! reuse, failures and restarts are in `inpod_probe_entries.rs`.
//!
//! Every namespace is anonymous (unshare on a thread, held by fd), so it
//! vanishes with its handle even when a test fails.

mod inpod_netns_support;
mod inpod_support;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inpod_netns_support::require_root;
use inpod_support::*;
use node_agent::redirect::inpod::probe_snat;
use node_agent::redirect::inpod::rules::{self, RuleConfig};
use node_agent::redirect::inpod::{
    InpodConfig, InpodRedirector, PodNetConfig, apply_pod, remove_pod,
};
use node_agent::redirect::iptables::{Backend, Family};
use node_agent::redirect::netns::Netns;
use node_agent::redirect::{PodRedirect, Redirector};

fn net(backend: Backend) -> PodNetConfig {
    PodNetConfig {
        engine: backend.into(),
        ipv6: true,
        rules: RuleConfig::default(),
    }
}

/// `iptables-save` of both families without comments and counters.
fn full_save(ns: &Netns, backend: Backend) -> String {
    let mut s = String::new();
    for fam in [Family::V4, Family::V6] {
        let cmd = backend.save_command(fam);
        s += &run_in(ns, &cmd, &[])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect::<String>();
    }
    s
}

async fn apply_readback_reapply_remove(backend: Backend) {
    for (name, global_dns, ann) in GOLDEN_CASES {
        let t = TestNetns::new();
        let ns = t.netns();
        // A foreign rule in a hooked chain and a foreign chain must survive.
        ns.run(move || {
            node_agent::redirect::iptables::restore(
                backend,
                Family::V4,
                "*nat\n:FOREIGN - [0:0]\n-A FOREIGN -j RETURN\n-A OUTPUT -j FOREIGN\nCOMMIT\n",
            )
        })
        .unwrap()
        .unwrap();

        let opts = options(*global_dns, ann);
        apply_pod(&ns, &net(backend), &opts).await.unwrap();
        let (views, routing) =
            node_agent::redirect::inpod::apply::inspect_pod(&ns, backend).unwrap();
        for (fam, view) in &views {
            let golden = golden_view(
                &format!("{name}_{}", family_suffix(*fam)),
                rules::POD_OWNERSHIP,
            );
            assert_eq!(
                view, &golden,
                "{backend} {name} {fam:?}: read-back != golden"
            );
        }
        assert_eq!(routing.rule_v4, 1, "{backend} {name}: {routing:?}");
        assert_eq!(routing.route_v4, 1, "{backend} {name}: {routing:?}");
        assert_eq!(routing.rule_v6, 1, "{backend} {name}: {routing:?}");
        assert_eq!(routing.route_v6, 1, "{backend} {name}: {routing:?}");

        // Re-applying changes nothing at all.
        let before = full_save(&ns, backend);
        apply_pod(&ns, &net(backend), &opts).await.unwrap();
        assert_eq!(
            full_save(&ns, backend),
            before,
            "{backend} {name}: re-apply changed rules"
        );
        let (_, routing2) = node_agent::redirect::inpod::apply::inspect_pod(&ns, backend).unwrap();
        assert_eq!(routing2, routing);

        remove_pod(&ns, backend).await.unwrap();
        let (views, routing) =
            node_agent::redirect::inpod::apply::inspect_pod(&ns, backend).unwrap();
        for (fam, view) in views {
            assert!(view.is_empty(), "{backend} {name} {fam:?}: left {view:?}");
        }
        assert!(routing.is_empty(), "{backend} {name}: left {routing:?}");
        let after = full_save(&ns, backend);
        assert!(after.contains("-A OUTPUT -j FOREIGN"), "{after}");
        assert!(after.contains("-A FOREIGN -j RETURN"), "{after}");
        assert!(!after.contains("ISTIO"), "{after}");
        // Removing again is a no-op.
        remove_pod(&ns, backend).await.unwrap();
    }
}

#[tokio::test]
async fn pod_rules_nft() {
    require_root!();
    apply_readback_reapply_remove(Backend::Nft).await;
}

#[tokio::test]
async fn pod_rules_legacy() {
    require_root!();
    apply_readback_reapply_remove(Backend::Legacy).await;
}

/// Changing a pod's variant in place converges to the new golden (e.g. DNS
/// capture turned off removes the raw-table chains and hooks).
#[tokio::test]
async fn variant_change_converges() {
    require_root!();
    for backend in [Backend::Nft, Backend::Legacy] {
        let t = TestNetns::new();
        let ns = t.netns();
        apply_pod(&ns, &net(backend), &options(true, &[]))
            .await
            .unwrap();
        let vif = &[(
            rules::ANNOTATION_REROUTE_VIRTUAL_INTERFACES,
            "fake1s0f0,fake1s0f1",
        )];
        apply_pod(&ns, &net(backend), &options(false, vif))
            .await
            .unwrap();
        let (views, _) = node_agent::redirect::inpod::apply::inspect_pod(&ns, backend).unwrap();
        for (fam, view) in &views {
            let golden = golden_view(
                &format!("pod_virtual_interfaces_{}", family_suffix(*fam)),
                rules::POD_OWNERSHIP,
            );
            assert_eq!(view, &golden, "{backend} {fam:?}");
        }
        let raw = run_in(&ns, &backend.save_command(Family::V4), &["-t", "raw"]);
        assert!(!raw.contains("ISTIO"), "{raw}");
    }
}

/// IPv6 off: no ip6tables rules and no IPv6 rule/route.
#[tokio::test]
async fn ipv6_disabled_programs_ipv4_only() {
    require_root!();
    let t = TestNetns::new();
    let ns = t.netns();
    let mut cfg = net(Backend::Nft);
    cfg.ipv6 = false;
    apply_pod(&ns, &cfg, &options(false, &[])).await.unwrap();
    let (views, routing) =
        node_agent::redirect::inpod::apply::inspect_pod(&ns, Backend::Nft).unwrap();
    assert!(!views[0].1.is_empty());
    assert!(views[1].1.is_empty(), "{:?}", views[1]);
    assert_eq!(
        (routing.rule_v4, routing.rule_v6, routing.route_v6),
        (1, 0, 0)
    );
    remove_pod(&ns, Backend::Nft).await.unwrap();
}

#[tokio::test]
async fn host_probe_snat_and_ipsets() {
    require_root!();
    for backend in [Backend::Nft, Backend::Legacy] {
        let node = TestNetns::new();
        let ns = node.netns();
        let cfg = RuleConfig::default();
        let label = node.path();
        let (c, l) = (cfg.clone(), label.clone());
        ns.run(move || probe_snat::ensure_host_here(backend, &c, true, &l))
            .unwrap()
            .unwrap();
        // twice: idempotent
        let before = full_save(&ns, backend);
        let (c, l) = (cfg.clone(), label.clone());
        ns.run(move || probe_snat::ensure_host_here(backend, &c, true, &l))
            .unwrap()
            .unwrap();
        assert_eq!(full_save(&ns, backend), before);
        for fam in [Family::V4, Family::V6] {
            let saved = run_in(&ns, &backend.save_command(fam), &["-t", "nat"]);
            let view = rules::owned_view(
                &node_agent::redirect::iptables::Ruleset::parse(&saved),
                rules::HOST_OWNERSHIP,
            );
            let golden = golden_view(
                &format!("host_{}", family_suffix(fam)),
                rules::HOST_OWNERSHIP,
            );
            assert_eq!(view, golden, "{backend} {fam:?}");
            // hooked first in POSTROUTING
            let first_post = saved
                .lines()
                .find(|l| l.starts_with("-A POSTROUTING"))
                .unwrap();
            assert_eq!(first_post, "-A POSTROUTING -j ISTIO_POSTRT");
        }

        let ips: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap(), "fd00::3".parse().unwrap()];
        let (c, i) = (cfg.clone(), ips.clone());
        ns.run(move || probe_snat::add_ips_here(&c, "uid-1", &i))
            .unwrap()
            .unwrap();
        let c = cfg.clone();
        let members = ns
            .run(move || probe_snat::members_here(&c))
            .unwrap()
            .unwrap();
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(members.iter().all(|(_, c)| c.as_deref() == Some("uid-1")));
        let (c, i) = (cfg.clone(), ips.clone());
        ns.run(move || probe_snat::del_ips_here(&c, &i))
            .unwrap()
            .unwrap();
        let c = cfg.clone();
        assert!(
            ns.run(move || probe_snat::members_here(&c))
                .unwrap()
                .unwrap()
                .is_empty()
        );

        let (c, l) = (cfg.clone(), label.clone());
        ns.run(move || probe_snat::remove_host_here(backend, &c, &l))
            .unwrap()
            .unwrap();
        let after = full_save(&ns, backend);
        assert!(!after.contains("ISTIO"), "{after}");
        let sets = run_in(&ns, "ipset", &["list", "-n"]);
        assert!(sets.trim().is_empty(), "{sets}");
    }
}

/// An `InpodRedirector` on `node` (its host netns) with a fake hand-off to ztunnel,
/// scanning `proc_root` for pods without a netns path.
async fn redirector(node: &TestNetns, proc_root: PathBuf) -> (InpodRedirector, Arc<FakeHandoff>) {
    let handoff = Arc::new(FakeHandoff::default());
    let cfg = InpodConfig {
        host_netns: Some(node.path()),
        proc_root,
        ..Default::default()
    };
    let r = InpodRedirector::new(cfg, handoff.clone()).await.unwrap();
    (r, handoff)
}

#[tokio::test]
async fn redirector_enrol_unenrol_reconcile_cleanup() {
    require_root!();
    let node = TestNetns::new();
    let pod_a = TestNetns::new();
    let pod_b = TestNetns::new();
    let (r, handoff) = redirector(&node, tempfile::tempdir().unwrap().keep()).await;
    let backend = r.backend().unwrap();
    let host = node.netns();
    assert!(full_save(&host, backend).contains("ISTIO_POSTRT"));

    let mut a = PodRedirect {
        uid: "uid-a".into(),
        name: "a".into(),
        namespace: "ns1".into(),
        service_account: "sa".into(),
        ips: vec!["10.9.0.1".parse().unwrap()],
        netns: Some(pod_a.path()),
        annotations: Default::default(),
    };
    r.enrol(&a).await.unwrap();
    r.enrol(&a).await.unwrap(); // idempotent
    let (views, _) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_a.netns(), backend).unwrap();
    assert_eq!(
        views[0].1,
        golden_view("pod_default_v4", rules::POD_OWNERSHIP)
    );
    let members = run_in(&host, "ipset", &["save", rules::DEFAULT_PROBE_IPSET_V4]);
    assert!(
        members.contains("add istio-inpod-probes-v4 10.9.0.1 comment \"uid-a\""),
        "{members}"
    );

    // Annotation values as Go's strconv.ParseBool reads them ("1" = on);
    // unusable ones are ignored (the default), never fail the pod (upstream).
    a.annotations = annotations(&[(rules::ANNOTATION_DNS_CAPTURE, "1")]);
    r.enrol(&a).await.unwrap();
    let (views, _) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_a.netns(), backend).unwrap();
    assert_eq!(
        views[0].1,
        golden_view("pod_dns_annotation_on_global_off_v4", rules::POD_OWNERSHIP)
    );
    a.annotations = annotations(&[(rules::ANNOTATION_DNS_CAPTURE, "maybe")]);
    r.enrol(&a).await.unwrap();
    let (views, _) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_a.netns(), backend).unwrap();
    assert_eq!(
        views[0].1,
        golden_view("pod_default_v4", rules::POD_OWNERSHIP)
    );
    a.annotations = Default::default();

    // ztunnel not there: retryable, rules in place, and the probe-ipset entry
    // (written before the rules) too, so its probes are not captured.
    *handoff.fail_add.lock().unwrap() = true;
    let b = PodRedirect {
        uid: "uid-b".into(),
        name: "b".into(),
        namespace: "ns1".into(),
        ips: vec!["10.9.0.2".parse().unwrap()],
        netns: Some(pod_b.path()),
        ..Default::default()
    };
    let e = r.enrol(&b).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("ns1/b"), "{e}");
    let (views, _) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_b.netns(), backend).unwrap();
    assert!(!views[0].1.is_empty());
    let members = run_in(&host, "ipset", &["save", rules::DEFAULT_PROBE_IPSET_V4]);
    assert!(members.contains("10.9.0.2 comment \"uid-b\""), "{members}");
    *handoff.fail_add.lock().unwrap() = false;

    // Reconcile with only `a`: `b` is cleaned up; a stale ipset entry goes.
    let c = rules::DEFAULT_PROBE_IPSET_V4;
    run_in(&host, "ipset", &["add", c, "10.9.9.9"]);
    let report = r.reconcile(std::slice::from_ref(&a)).await;
    assert_eq!(report.enrolled, vec!["uid-a".to_string()]);
    assert_eq!(report.removed, vec!["uid-b".to_string()]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let (views, routing) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_b.netns(), backend).unwrap();
    assert!(views.iter().all(|(_, v)| v.is_empty()) && routing.is_empty());
    let members = run_in(&host, "ipset", &["save", c]);
    assert!(
        !members.contains("10.9.9.9")
            && !members.contains("10.9.0.2")
            && members.contains("10.9.0.1"),
        "{members}"
    );

    // Unenrol a.
    r.unenrol(&a).await.unwrap();
    r.unenrol(&a).await.unwrap();
    let (views, routing) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_a.netns(), backend).unwrap();
    assert!(views.iter().all(|(_, v)| v.is_empty()) && routing.is_empty());
    let members = run_in(&host, "ipset", &["save", c]);
    assert!(!members.contains("10.9.0.1"), "{members}");

    // Enrol again, then cleanup_all removes pods and host state.
    r.enrol(&a).await.unwrap();
    r.cleanup_all().await.unwrap();
    let (views, _) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_a.netns(), backend).unwrap();
    assert!(views.iter().all(|(_, v)| v.is_empty()));
    assert!(!full_save(&host, backend).contains("ISTIO"));
    assert!(run_in(&host, "ipset", &["list", "-n"]).trim().is_empty());

    let calls = handoff.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![
            "add uid-a ns1/a",
            "add uid-a ns1/a",
            "add uid-a ns1/a",
            "add uid-a ns1/a",
            "add uid-b ns1/b",
            "register uid-a netns",
            "del uid-b",
            "del uid-a",
            "del uid-a",
            "add uid-a ns1/a",
            "del uid-a",
        ]
    );
}

/// With the real ZDS server and no ztunnel connected: enrol is retryable
/// ("no ztunnel connected"), the rules are in place, and the pod is in the
/// snapshot set for when ztunnel connects.
#[tokio::test]
async fn redirector_with_zds_and_no_ztunnel_is_retryable() {
    require_root!();
    let node = TestNetns::new();
    let pod = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let zds = node_agent::zds::ZdsServer::new(node_agent::zds::ZdsConfig {
        socket_path: dir.path().join("ztunnel.sock"),
        ..Default::default()
    });
    let r = InpodRedirector::new(
        InpodConfig {
            host_netns: Some(node.path()),
            ..Default::default()
        },
        Arc::new(zds.clone()),
    )
    .await
    .unwrap();
    let p = PodRedirect {
        uid: "uid-z".into(),
        name: "z".into(),
        namespace: "ns1".into(),
        netns: Some(pod.path()),
        ..Default::default()
    };
    let e = r.enrol(&p).await.unwrap_err();
    assert!(e.is_retryable());
    assert!(e.to_string().contains("no ztunnel connected"), "{e}");
    assert_eq!(zds.known_uids(), vec!["uid-z"]);
    let (views, _) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod.netns(), r.backend().unwrap())
            .unwrap();
    assert!(!views[0].1.is_empty());
    r.unenrol(&p).await.unwrap();
    assert!(zds.known_uids().is_empty());
    r.cleanup_all().await.unwrap();
}

/// Rules that cannot be removed (here: another tool's native nftables rule jumps to
/// our chain, in a form `iptables-nft-save` cannot print, so the removal batch
/// fails): the pod stays in ztunnel and in the probe ipset with its
/// capture rules, instead of being black-holed; once the rules can go, a retry
/// unenrols it completely.
#[tokio::test]
async fn unenrol_keeps_the_pod_in_ztunnel_while_its_rules_cannot_be_removed() {
    require_root!();
    let node = TestNetns::new();
    let pod = TestNetns::new();
    let (r, handoff) = redirector(&node, tempfile::tempdir().unwrap().keep()).await;
    let backend = r.backend().unwrap();
    if backend != node_agent::redirect::iptables::Backend::Nft {
        eprintln!("skipped: needs the iptables-nft backend (detected {backend:?})");
        return;
    }
    let p = PodRedirect {
        uid: "uid-r".into(),
        name: "r".into(),
        namespace: "ns1".into(),
        ips: vec!["10.9.0.7".parse().unwrap()],
        netns: Some(pod.path()),
        ..Default::default()
    };
    r.enrol(&p).await.unwrap();
    let ns = pod.netns();
    run_in(&ns, "nft", &["add", "chain", "ip", "nat", "FOREIGN"]);
    let rule = "add rule ip nat FOREIGN ip saddr . tcp dport { 10.0.0.1 . 80 } jump ISTIO_OUTPUT";
    run_in(&ns, "nft", &rule.split(' ').collect::<Vec<_>>());

    let e = r.unenrol(&p).await.unwrap_err();
    assert!(e.to_string().contains("ns1/r"), "{e}");
    assert!(e.is_retryable(), "{e}");
    let (views, _) = node_agent::redirect::inpod::apply::inspect_pod(&ns, backend).unwrap();
    assert!(!views[0].1.is_empty(), "capture rules still there");
    let host = node.netns();
    let members = run_in(&host, "ipset", &["save", rules::DEFAULT_PROBE_IPSET_V4]);
    assert!(members.contains("10.9.0.7"), "probe entry kept: {members}");
    assert_eq!(
        handoff.calls.lock().unwrap().clone(),
        vec!["add uid-r ns1/r"],
        "still in ztunnel"
    );

    run_in(&ns, "nft", &["flush", "chain", "ip", "nat", "FOREIGN"]);
    r.unenrol(&p).await.unwrap();
    let (views, routing) = node_agent::redirect::inpod::apply::inspect_pod(&ns, backend).unwrap();
    assert!(views.iter().all(|(_, v)| v.is_empty()) && routing.is_empty());
    let members = run_in(&host, "ipset", &["save", rules::DEFAULT_PROBE_IPSET_V4]);
    assert!(!members.contains("10.9.0.7"), "{members}");
    assert_eq!(
        handoff.calls.lock().unwrap().clone(),
        vec!["add uid-r ns1/r", "del uid-r"]
    );
    r.cleanup_all().await.unwrap();
}

/// A netns path of the `/proc/<pid>/ns/net` form (cri-dockerd's CNI events, an earlier
/// scan) that now leads to a netns without the pod's IPs, as when the process exited and
/// its PID was reused: refused, nothing programmed there, nothing handed to ztunnel; once
/// that netns holds the pod's IP, the pod is enrolled.
#[tokio::test]
async fn a_process_netns_path_must_hold_one_of_the_pods_ips() {
    require_root!();
    let node = TestNetns::new();
    let other = TestNetns::new();
    let proc_root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(proc_root.path().join("4242/ns")).unwrap();
    std::os::unix::fs::symlink(other.path(), proc_root.path().join("4242/ns/net")).unwrap();
    let (r, handoff) = redirector(&node, proc_root.path().to_path_buf()).await;
    let backend = r.backend().unwrap();
    let p = PodRedirect {
        uid: "uid-p".into(),
        name: "p".into(),
        namespace: "ns1".into(),
        ips: vec!["10.9.0.8".parse().unwrap()],
        netns: Some(proc_root.path().join("4242/ns/net")),
        ..Default::default()
    };
    let e = r.enrol(&p).await.unwrap_err();
    assert!(
        e.to_string().contains("holds none of the pod's IPs") && e.to_string().contains("ns1/p"),
        "{e}"
    );
    let (views, routing) =
        node_agent::redirect::inpod::apply::inspect_pod(&other.netns(), backend).unwrap();
    assert!(views.iter().all(|(_, v)| v.is_empty()) && routing.is_empty());
    assert!(handoff.calls.lock().unwrap().is_empty());

    run_in(
        &other.netns(),
        "ip",
        &["addr", "add", "10.9.0.8/32", "dev", "lo"],
    );
    r.enrol(&p).await.unwrap();
    assert_eq!(
        handoff.calls.lock().unwrap().clone(),
        vec!["add uid-p ns1/p"]
    );
    r.cleanup_all().await.unwrap();
}

/// A pod a previous agent enrolled whose netns the start-up reconcile cannot find: it is
/// registered with ztunnel to keep its proxy, and its enrolment retries stay retryable
/// (the reconciler keeps it `pending` instead of dropping its annotation while the old
/// rules may still capture its traffic); once unenrolled, it is an ordinary pod again.
#[tokio::test]
async fn an_enrolled_pod_whose_netns_is_lost_at_startup_stays_enrolled_for_retries() {
    require_root!();
    let node = TestNetns::new();
    let (r, handoff) = redirector(&node, tempfile::tempdir().unwrap().keep()).await;
    let p = PodRedirect {
        uid: "uid-l".into(),
        name: "l".into(),
        namespace: "ns1".into(),
        ips: vec!["10.9.0.9".parse().unwrap()],
        ..Default::default()
    };
    let report = r.reconcile(std::slice::from_ref(&p)).await;
    assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
    assert!(report.failed[0].is_retryable(), "{}", report.failed[0]);
    let e = r.enrol(&p).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(
        handoff.calls.lock().unwrap().clone(),
        vec!["register uid-l keep"]
    );
    r.unenrol(&p).await.unwrap();
    let e = r.enrol(&p).await.unwrap_err();
    assert!(!e.is_retryable(), "a fresh pod without a netns: {e}");
    r.cleanup_all().await.unwrap();
}

/// Holds `/run/xtables.lock` (shared by every netns: it is a file) for
/// `secs` in a `flock` child, as kube-proxy or a concurrent legacy restore
/// would; returns once the lock is held. `None` when flock is missing.
fn hold_xtables_lock(secs: u32) -> Option<std::process::Child> {
    use std::io::BufRead;
    let mut child = std::process::Command::new("flock")
        .args([
            "/run/xtables.lock",
            "-c",
            &format!("echo held; sleep {secs}"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held");
    Some(child)
}

/// Legacy backend with the xtables lock held: pod rules are applied once it
/// is released; a lock held beyond the bound is an error naming the table
/// and the lock, after the bound rather than never.
#[tokio::test]
async fn legacy_restore_waits_boundedly_for_the_xtables_lock() {
    require_root!();
    if std::process::Command::new("iptables-legacy-restore")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: iptables-legacy-restore is not installed");
        return;
    }
    let Some(mut holder) = hold_xtables_lock(3) else {
        eprintln!("skipped: flock(1) is not installed");
        return;
    };
    let t = TestNetns::new();
    apply_pod(&t.netns(), &net(Backend::Legacy), &options(false, &[]))
        .await
        .expect("rules applied once the lock is free");
    holder.wait().unwrap();
    remove_pod(&t.netns(), Backend::Legacy).await.unwrap();

    let mut holder = hold_xtables_lock(3).unwrap();
    let t0 = Instant::now();
    let res = t.netns().run(|| {
        node_agent::redirect::iptables::restore_waiting(
            Backend::Legacy,
            Family::V4,
            "*nat\n:ISTIO_LOCK_TEST - [0:0]\nCOMMIT\n",
            Duration::from_secs(1),
        )
    });
    let waited = t0.elapsed();
    holder.wait().unwrap();
    let err = res.unwrap().expect_err("lock held beyond the bound");
    assert!(
        matches!(
            err,
            node_agent::redirect::iptables::IptablesError::LockTimeout { .. }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("xtables lock") && msg.contains("table nat"),
        "{msg}"
    );
    assert!(waited < Duration::from_millis(2500), "waited {waited:?}");
}
