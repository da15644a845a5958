//! The `InpodRedirector`'s host probe-ipset entries (kubelet probe SNAT) in
//! real network namespaces (root), with a fake hand-off: they precede the
//! pod's capture rules, belong to the pod now using an IP, survive a
//! failing probe set, a pod whose rules cannot be (re-)applied and an agent
//! restart before the pod's IPs are known; and the start-up reconcile of
//! pods a previous agent enrolled. The rules themselves and the enrol /
//! unenrol core are in `inpod_netns.rs`.
//!
//! Every namespace is anonymous (unshare on a thread, held by fd), so it
//! vanishes with its handle even when a test fails.

mod inpod_netns_support;
mod inpod_support;

use std::sync::Arc;

use inpod_netns_support::require_root;
use inpod_support::*;
use node_agent::redirect::inpod::rules;
use node_agent::redirect::inpod::{InpodConfig, InpodRedirector, apply_pod};
use node_agent::redirect::iptables::Backend;
use node_agent::redirect::netns::Netns;
use node_agent::redirect::{PodRedirect, Redirector};

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
