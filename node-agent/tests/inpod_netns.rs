//! In-pod redirection in real network namespaces (root): apply the rules,
//! read them back with `iptables-save` and compare with the goldens, re-apply
//! (nothing changes), switch variants, remove (nothing of ours left, foreign
//! rules untouched), for both iptables backends; the host probe SNAT and
//! ipsets; and the `InpodRedirector` with a fake hand-off.
//!
//! Every namespace is anonymous (unshare on a thread, held by fd), so it
//! vanishes with its handle even when a test fails.

mod inpod_support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inpod_support::*;
use node_agent::redirect::inpod::probe_snat;
use node_agent::redirect::inpod::rules::{self, RuleConfig};
use node_agent::redirect::inpod::{
    InpodConfig, InpodRedirector, PodNetConfig, apply_pod, remove_pod,
};
use node_agent::redirect::iptables::{Backend, Family};
use node_agent::redirect::netns::Netns;
use node_agent::redirect::{PodRedirect, Redirector};

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
    };
}

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

#[tokio::test]
async fn redirector_enrol_unenrol_reconcile_cleanup() {
    require_root!();
    let node = TestNetns::new();
    let pod_a = TestNetns::new();
    let pod_b = TestNetns::new();
    let handoff = Arc::new(FakeHandoff::default());
    let cfg = InpodConfig {
        host_netns: Some(node.path()),
        proc_root: tempfile::tempdir().unwrap().keep(),
        ..Default::default()
    };
    let r = InpodRedirector::new(cfg, handoff.clone()).await.unwrap();
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

fn pod(uid: &str, name: &str, ip: &str, netns: &TestNetns) -> PodRedirect {
    PodRedirect {
        uid: uid.into(),
        name: name.into(),
        namespace: "ns1".into(),
        service_account: "sa".into(),
        ips: vec![ip.parse().unwrap()],
        netns: Some(netns.path()),
        annotations: Default::default(),
    }
}

async fn redirector(node: &TestNetns, handoff: &Arc<FakeHandoff>) -> InpodRedirector {
    let cfg = InpodConfig {
        host_netns: Some(node.path()),
        proc_root: tempfile::tempdir().unwrap().keep(),
        ..Default::default()
    };
    InpodRedirector::new(cfg, handoff.clone()).await.unwrap()
}

fn probe_members(host: &Netns) -> String {
    run_in(host, "ipset", &["save", rules::DEFAULT_PROBE_IPSET_V4])
}

fn calls(h: &FakeHandoff) -> Vec<String> {
    h.calls.lock().unwrap().clone()
}

fn pod_is_clean(ns: &TestNetns, backend: Backend) -> bool {
    let (views, routing) =
        node_agent::redirect::inpod::apply::inspect_pod(&ns.netns(), backend).unwrap();
    views.iter().all(|(_, v)| v.is_empty()) && routing.is_empty()
}

/// After IP reuse the probe-ipset entry belongs to the new pod: a late
/// unenrol of the old pod (same IP, other UID) leaves it alone.
#[tokio::test]
async fn unenrol_of_an_old_pod_keeps_the_ip_reusing_pods_probe_entry() {
    require_root!();
    let (node, pod_a, pod_b) = (TestNetns::new(), TestNetns::new(), TestNetns::new());
    let handoff = Arc::new(FakeHandoff::default());
    let r = redirector(&node, &handoff).await;
    let host = node.netns();
    let a = pod("uid-a", "a", "10.9.0.1", &pod_a);
    let b = pod("uid-b", "b", "10.9.0.1", &pod_b);
    r.enrol(&a).await.unwrap();
    r.unenrol(&a).await.unwrap();
    r.enrol(&b).await.unwrap();
    r.unenrol(&a).await.unwrap();
    let members = probe_members(&host);
    assert!(
        members.contains("add istio-inpod-probes-v4 10.9.0.1 comment \"uid-b\""),
        "{members}"
    );
    // The new pod's own unenrol removes it.
    r.unenrol(&b).await.unwrap();
    assert!(!probe_members(&host).contains("10.9.0.1"));
    r.cleanup_all().await.unwrap();
}

/// Start-up: a pod with an unusable annotation value (a previous agent may
/// have refused it) gets its rules re-applied with the default for it, is
/// registered for the snapshot, held and given its probe entry.
#[tokio::test]
async fn startup_with_unusable_annotation_values_reapplies_the_defaults() {
    require_root!();
    let (node, pod_d) = (TestNetns::new(), TestNetns::new());
    let handoff = Arc::new(FakeHandoff::default());
    let r = redirector(&node, &handoff).await;
    let backend = r.backend().unwrap();
    // The rules a previous agent applied (DNS capture on).
    apply_pod(&pod_d.netns(), r.pod_net_config(), &options(true, &[]))
        .await
        .unwrap();
    let mut d = pod("uid-d", "d", "10.9.0.4", &pod_d);
    d.annotations = annotations(&[
        (rules::ANNOTATION_DNS_CAPTURE, "maybe"),
        (rules::ANNOTATION_REROUTE_VIRTUAL_INTERFACES, "bad name"),
    ]);

    let report = r.reconcile(std::slice::from_ref(&d)).await;
    assert_eq!(calls(&handoff), vec!["register uid-d netns"]);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.enrolled, vec!["uid-d".to_string()]);
    assert_eq!(r.enrolled_uids().await, vec!["uid-d".to_string()]);
    assert!(probe_members(&node.netns()).contains("10.9.0.4 comment \"uid-d\""));
    let (views, _) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_d.netns(), backend).unwrap();
    assert_eq!(
        views[0].1,
        golden_view("pod_default_v4", rules::POD_OWNERSHIP)
    );
    r.cleanup_all().await.unwrap();
}

/// Start-up: a pod whose rules cannot be re-applied (its netns lost `lo`,
/// which the policy routing needs) is still registered for the snapshot,
/// held, given its probe entry and keeps the rules it had; the failure is
/// retryable and names the pod and its netns, and so is the control loop's
/// retry, which leaves the redirection alone; once `lo` is back it converges.
#[tokio::test]
async fn startup_rule_failure_keeps_the_pod_held_and_retryable() {
    require_root!();
    let (node, pod_d) = (TestNetns::new(), TestNetns::new());
    let handoff = Arc::new(FakeHandoff::default());
    let r = redirector(&node, &handoff).await;
    let backend = r.backend().unwrap();
    // The rules a previous agent applied.
    apply_pod(&pod_d.netns(), r.pod_net_config(), &options(false, &[]))
        .await
        .unwrap();
    let ip_link = |args: &str| {
        let args: Vec<&str> = args.split(' ').collect();
        run_in(&pod_d.netns(), "ip", &args);
    };
    ip_link("link set lo down");
    ip_link("link set lo name lo-gone");
    let d = pod("uid-d", "d", "10.9.0.4", &pod_d);

    let report = r.reconcile(std::slice::from_ref(&d)).await;
    assert!(report.enrolled.is_empty(), "{report:?}");
    let [e] = report.failed.as_slice() else {
        panic!("{report:?}")
    };
    assert_eq!(e.uid, "uid-d");
    assert!(e.is_retryable(), "{e}");
    let msg = e.to_string();
    let netns = pod_d.path().display().to_string();
    for part in ["ns1/d", "re-applying pod rules", &netns, "loopback"] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert_eq!(calls(&handoff), vec!["register uid-d netns"]);
    assert_eq!(r.enrolled_uids().await, vec!["uid-d".to_string()]);
    assert!(probe_members(&node.netns()).contains("10.9.0.4 comment \"uid-d\""));
    let rules_in_place = || {
        let (views, _) =
            node_agent::redirect::inpod::apply::inspect_pod(&pod_d.netns(), backend).unwrap();
        views[0].1 == golden_view("pod_default_v4", rules::POD_OWNERSHIP)
    };
    assert!(rules_in_place());

    // The control loop's retry: refused again, retryable, nothing undone.
    let e = r.enrol(&d).await.unwrap_err();
    assert!(e.is_retryable() && e.to_string().contains("ns1/d"), "{e}");
    assert!(rules_in_place());
    assert_eq!(r.enrolled_uids().await, vec!["uid-d".to_string()]);
    assert_eq!(calls(&handoff), vec!["register uid-d netns"]);

    ip_link("link set lo-gone name lo");
    ip_link("link set lo up");
    r.enrol(&d).await.unwrap();
    assert_eq!(calls(&handoff).last().unwrap(), "add uid-d ns1/d");
    let (_, routing) =
        node_agent::redirect::inpod::apply::inspect_pod(&pod_d.netns(), backend).unwrap();
    assert_eq!((routing.rule_v4, routing.route_v4), (1, 1), "{routing:?}");
    r.cleanup_all().await.unwrap();
}

/// Swaps the host's v4 probe set for one without comment support, so
/// adding a pod's IPs fails; returns a guard-like closure's inverse.
fn break_probe_ipset(host: &Netns, broken: bool) {
    let set = rules::DEFAULT_PROBE_IPSET_V4;
    if broken {
        run_in(
            host,
            "ipset",
            &["create", "probe-broken", "hash:ip", "family", "inet"],
        );
    }
    run_in(host, "ipset", &["swap", set, "probe-broken"]);
    if !broken {
        run_in(host, "ipset", &["destroy", "probe-broken"]);
    }
}

/// The probe ipset fails (it is written first): a new pod is left untouched
/// (no rules, ztunnel never asked, not held) and the error is not
/// retryable; an already enrolled pod keeps everything and the error is
/// retryable.
#[tokio::test]
async fn probe_ipset_failure_leaves_nothing_half_configured() {
    require_root!();
    let (node, pod_c, pod_e) = (TestNetns::new(), TestNetns::new(), TestNetns::new());
    let handoff = Arc::new(FakeHandoff::default());
    let r = redirector(&node, &handoff).await;
    let (backend, host) = (r.backend().unwrap(), node.netns());
    let e_pod = pod("uid-e", "e", "10.9.0.6", &pod_e);
    r.enrol(&e_pod).await.unwrap();

    break_probe_ipset(&host, true);
    let c = pod("uid-c", "c", "10.9.0.5", &pod_c);
    let err = r.enrol(&c).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("ns1/c") && err.to_string().contains("probe ipset"),
        "{err}"
    );
    assert!(pod_is_clean(&pod_c, backend), "rules left in pod c");
    assert!(!r.enrolled_uids().await.contains(&"uid-c".to_string()));
    assert_eq!(calls(&handoff), vec!["add uid-e ns1/e"]);

    // An enrolled pod re-enrolled meanwhile: kept, retryable.
    let err = r.enrol(&e_pod).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(!pod_is_clean(&pod_e, backend));
    assert!(r.enrolled_uids().await.contains(&"uid-e".to_string()));

    break_probe_ipset(&host, false);
    r.enrol(&c).await.unwrap();
    assert!(probe_members(&host).contains("10.9.0.5 comment \"uid-c\""));
    r.cleanup_all().await.unwrap();
}

/// Kubelet probes are SNATed before the pod's capture rules exist: the
/// pod's probe-ipset entry is already there when ztunnel is handed the pod
/// (upstream adds it last, leaving a window in which probes are captured).
/// A later rule failure on a new pod takes the entry back.
#[tokio::test]
async fn probe_entries_precede_capture() {
    require_root!();
    let (node, pod_f, pod_g) = (TestNetns::new(), TestNetns::new(), TestNetns::new());
    let handoff = Arc::new(FakeHandoff::default());
    *handoff.watch_host.lock().unwrap() = Some(node.path());
    let r = redirector(&node, &handoff).await;
    let (backend, host) = (r.backend().unwrap(), node.netns());
    r.enrol(&pod("uid-f", "f", "10.9.0.7", &pod_f))
        .await
        .unwrap();
    let seen = handoff.host_sets_at_add.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].contains("10.9.0.7 comment \"uid-f\""),
        "probe entry missing when ztunnel got the pod:\n{}",
        seen[0]
    );

    // A new pod whose rules cannot be applied (its loopback renamed away):
    // refused, and neither rules nor its probe entry are left behind.
    for args in ["link set lo down", "link set lo name lo-gone"] {
        run_in(&pod_g.netns(), "ip", &args.split(' ').collect::<Vec<_>>());
    }
    let err = r
        .enrol(&pod("uid-g", "g", "10.9.0.8", &pod_g))
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("applying pod rules"), "{err}");
    assert!(pod_is_clean(&pod_g, backend), "rules left in pod g");
    assert!(
        !probe_members(&host).contains("10.9.0.8"),
        "{}",
        probe_members(&host)
    );
    assert!(probe_members(&host).contains("10.9.0.7 comment \"uid-f\""));
    assert_eq!(calls(&handoff), vec!["add uid-f ns1/f"]);
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

/// Agent restart while an enrolled pod's IPs are not in the cache yet
/// (upstream istio/istio#60471): the start-up reconcile keeps its
/// probe-ipset entry (the prune is skipped), and `sync_ips` later puts the
/// pod's IP in, idempotently, with its UID.
#[tokio::test]
async fn startup_with_ipless_enrolled_pod_keeps_its_probe_entry_until_ips_sync() {
    require_root!();
    let (node, pod_a) = (TestNetns::new(), TestNetns::new());
    let handoff = Arc::new(FakeHandoff::default());
    let host = node.netns();
    let a = pod("uid-a", "a", "10.9.0.7", &pod_a);
    let r = redirector(&node, &handoff).await;
    r.enrol(&a).await.unwrap();
    drop(r);
    // A stale entry of no pod: pruning it waits for a start-up with all IPs known.
    run_in(
        &host,
        "ipset",
        &["add", rules::DEFAULT_PROBE_IPSET_V4, "10.9.0.99"],
    );

    let r2 = redirector(&node, &handoff).await;
    let ipless = PodRedirect {
        ips: vec![],
        ..a.clone()
    };
    let report = r2.reconcile(std::slice::from_ref(&ipless)).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let members = probe_members(&host);
    assert!(members.contains("10.9.0.7"), "{members}");
    assert!(members.contains("10.9.0.99"), "{members}");

    // The IP shows up (here also after its entry was lost some other way).
    run_in(
        &host,
        "ipset",
        &["del", rules::DEFAULT_PROBE_IPSET_V4, "10.9.0.7"],
    );
    r2.sync_ips(&a).await.unwrap();
    r2.sync_ips(&a).await.unwrap();
    let members = probe_members(&host);
    assert!(
        members.contains("add istio-inpod-probes-v4 10.9.0.7 comment \"uid-a\""),
        "{members}"
    );

    // An IP change moves the pod's entry; unenrol removes the new one.
    let moved = pod("uid-a", "a", "10.9.0.8", &pod_a);
    r2.sync_ips(&moved).await.unwrap();
    let members = probe_members(&host);
    assert!(
        members.contains("10.9.0.8") && !members.contains("10.9.0.7"),
        "{members}"
    );
    r2.unenrol(&PodRedirect {
        ips: vec![],
        ..moved
    })
    .await
    .unwrap();
    assert!(!probe_members(&host).contains("10.9.0.8"));

    // Every IP known: the stale entry is pruned.
    let b = pod("uid-b", "b", "10.9.0.9", &pod_a);
    let report = r2.reconcile(&[b]).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let members = probe_members(&host);
    assert!(
        members.contains("10.9.0.9") && !members.contains("10.9.0.99"),
        "{members}"
    );
    r2.cleanup_all().await.unwrap();
}
