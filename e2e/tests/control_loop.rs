//! The node agent's Kubernetes control loop end to end, in-pod mode (root):
//! the real `node-agent` binary in a simulated node's netns, configured as
//! the chart configures it, against the Kubernetes API double; pods made by
//! a small kubelet through the real CNI chain (`bridge` + `host-local` +
//! our `istio-cni` from the conflist the agent chained); ztunnel's real ZDS
//! client on the other end of the socket. Scenarios of issues 6 and 8:
//!
//! - labelling a namespace with real kubectl enrols its running pods within
//!   1 s (annotation `enabled`, rules in their netns, handed to ztunnel); a
//!   pod labelled `none` stays out; unlabelling undoes all of it;
//! - a new ambient pod is enrolled before its CNI ADD returns;
//! - agent restart: state rebuilt, no duplicate rules, snapshot re-sent,
//!   nothing restarted in ztunnel; a pod created while the agent is down
//!   fails its ADD until the agent is back, then is enrolled; a namespace
//!   labelled while it was down is enrolled on return;
//! - no ztunnel: ambient ADDs fail closed, `/readyz` says why;
//! - SIGTERM without the DaemonSet (404, or 403 once its RBAC is gone)
//!   uninstalls (config entry, rules, annotations; the plugin binary stays
//!   on purpose); an unavailable API keeps everything and the agent still
//!   exits in time; metrics reflect the enrolled pods.

mod control_loop_support;

use std::time::{Duration, Instant};

use control_loop_support::{AGENT_NS, Env, wait_for};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn label_enrols_running_pods_and_unlabel_removes_them() {
    require_env!();
    let mut env = Env::new("clabel");
    env.create_namespace("demo", json!({}));
    env.start_agent();
    env.start_ztunnel();
    env.wait_chained();
    env.wait_agent_ready();

    let a = env.run_pod("demo", "a", json!({"app": "a"}), SECOND * 10);
    let b = env.run_pod("demo", "b", json!({"app": "b"}), SECOND * 10);
    let out = env.run_pod(
        "demo",
        "out",
        json!({"istio.io/dataplane-mode": "none"}),
        SECOND * 10,
    );
    // Not ambient yet: untouched.
    std::thread::sleep(Duration::from_millis(300));
    for p in [&a, &b, &out] {
        assert!(
            !Env::redirected(&p.netns),
            "{} redirected before the label",
            p.name
        );
        assert_eq!(env.annotation("demo", &p.name), None);
    }
    assert!(env.zt().running().is_empty());

    let t0 = Instant::now();
    env.kubectl(&[
        "label",
        "namespace",
        "demo",
        "istio.io/dataplane-mode=ambient",
    ]);
    let labelled = Instant::now();
    wait_for(
        "pods a and b annotated enabled",
        SECOND,
        || {
            (env.annotation("demo", "a").as_deref() == Some("enabled")
                && env.annotation("demo", "b").as_deref() == Some("enabled"))
            .then_some(())
        },
        || env.agent_log_tail(),
    );
    eprintln!(
        "label -> both pods annotated: {:?} after kubectl returned ({:?} incl. kubectl)",
        labelled.elapsed(),
        t0.elapsed()
    );
    for p in [&a, &b] {
        assert!(
            Env::redirected(&p.netns),
            "rules missing in {}: {:?}",
            p.name,
            Env::istio_rules(&p.netns)
        );
    }
    let mut want = vec![a.uid.clone(), b.uid.clone()];
    want.sort();
    wait_for(
        "ztunnel runs a and b",
        SECOND * 5,
        || (env.zt().running() == want).then_some(()),
        || {
            format!(
                "ztunnel runs {:?}\n{}",
                env.zt().running(),
                env.agent_log_tail()
            )
        },
    );
    // The opted-out pod stays out.
    assert!(!Env::redirected(&out.netns));
    assert_eq!(env.annotation("demo", "out"), None);

    // Metrics count them.
    let (code, metrics) = env.agent_http(15014, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("node_agent_pods_enrolled 2"), "{metrics}");
    assert!(
        metrics.contains("node_agent_ztunnel_connected 1"),
        "{metrics}"
    );

    env.kubectl(&["label", "namespace", "demo", "istio.io/dataplane-mode-"]);
    wait_for(
        "annotations removed",
        SECOND * 5,
        || {
            (env.annotation("demo", "a").is_none() && env.annotation("demo", "b").is_none())
                .then_some(())
        },
        || env.agent_log_tail(),
    );
    for p in [&a, &b] {
        assert!(
            Env::istio_rules(&p.netns).is_empty(),
            "rules left in {}: {:?}",
            p.name,
            Env::istio_rules(&p.netns)
        );
    }
    wait_for(
        "ztunnel dropped both",
        SECOND * 5,
        || env.zt().running().is_empty().then_some(()),
        || format!("{:?}", env.zt().running()),
    );
    // Pods were never restarted: same netns objects throughout.
    assert!(a.netns.inode().is_ok() && b.netns.inode().is_ok());
}

#[test]
fn new_ambient_pod_is_enrolled_before_its_cni_add_returns() {
    require_env!();
    let mut env = Env::new("cadd");
    env.create_namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"}));
    env.create_namespace("plain", json!({}));
    env.start_agent();
    env.start_ztunnel();
    env.wait_chained();
    env.wait_agent_ready();

    let uid = env.create_pod_object("mesh", "web", json!({}));
    let netns = env.cluster.scope().create_netns("node1-web").unwrap();
    let result = env
        .cni_add("mesh", "web", &uid, &netns, "c-web")
        .unwrap_or_else(|e| panic!("{e}\n{}", env.agent_log_tail()));
    // Checked right after the ADD returned, without waiting.
    assert!(
        Env::redirected(&netns),
        "rules: {:?}",
        Env::istio_rules(&netns)
    );
    assert_eq!(env.zt().running(), vec![uid.clone()]);
    assert_eq!(env.annotation("mesh", "web").as_deref(), Some("enabled"));
    assert!(
        result["ips"][0]["address"].is_string(),
        "prevResult passed on: {result}"
    );
    // The probe ipset on the node holds its IP.
    let ip = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let set = env
        .node()
        .netns()
        .exec("ipset", ["list", "istio-inpod-probes-v4"], SECOND * 5)
        .unwrap();
    assert!(set.contains(&ip), "{set}");

    // A pod in a plain namespace: ADD succeeds, nothing done.
    let p = env.run_pod("plain", "other", json!({}), SECOND * 10);
    assert!(!Env::redirected(&p.netns));
    assert_eq!(env.annotation("plain", "other"), None);
    assert_eq!(env.zt().running(), vec![uid.clone()]);

    // Deleting the pod cleans up: ztunnel drops it, ipset entry removed.
    env.set_running("mesh", "web", ip.parse().unwrap());
    env.api.delete("v1", "Pod", Some("mesh"), "web").unwrap();
    wait_for(
        "deleted pod dropped",
        SECOND * 5,
        || env.zt().running().is_empty().then_some(()),
        || env.agent_log_tail(),
    );
    wait_for(
        "probe ipset entry removed",
        SECOND * 5,
        || {
            let set = env
                .node()
                .netns()
                .exec("ipset", ["list", "istio-inpod-probes-v4"], SECOND * 5)
                .unwrap();
            (!set.contains(&ip)).then_some(())
        },
        || env.agent_log_tail(),
    );
    drop(netns);
}

#[test]
fn no_ztunnel_fails_closed_and_is_not_ready() {
    require_env!();
    let mut env = Env::new("cnozt");
    env.create_namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"}));
    env.start_agent();
    env.wait_chained();
    let (code, body) = wait_for(
        "readyz answers",
        SECOND * 10,
        || env.agent_http(8000, "/readyz"),
        || env.agent_log_tail(),
    );
    // Ready would be a lie: ambient ADDs are refused for lack of ztunnel.
    let (code, body) = if body.contains("starting") {
        std::thread::sleep(SECOND);
        env.agent_http(8000, "/readyz").unwrap()
    } else {
        (code, body)
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("ztunnel"), "{body}");

    let uid = env.create_pod_object("mesh", "web", json!({}));
    let netns = env.cluster.scope().create_netns("node1-web").unwrap();
    let err = env
        .cni_add("mesh", "web", &uid, &netns, "c-web")
        .unwrap_err();
    assert!(err.contains("no ztunnel"), "{err}");
    assert!(Env::istio_rules(&netns).is_empty(), "nothing left behind");
    assert_eq!(env.annotation("mesh", "web"), None);

    // ztunnel arrives: ready, and the retried ADD enrols.
    env.start_ztunnel();
    env.wait_agent_ready();
    env.cni_add("mesh", "web", &uid, &netns, "c-web")
        .unwrap_or_else(|e| panic!("{e}\n{}", env.agent_log_tail()));
    assert!(Env::redirected(&netns));
    assert_eq!(env.zt().running(), vec![uid]);
}

#[test]
fn agent_restart_rebuilds_state_and_catches_up() {
    require_env!();
    let mut env = Env::new("crestart");
    env.create_namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"}));
    env.create_namespace("later", json!({}));
    env.start_agent();
    env.start_ztunnel();
    env.wait_chained();
    env.wait_agent_ready();

    let a = env.run_pod("mesh", "a", json!({}), SECOND * 10);
    let waiting = env.run_pod("later", "w", json!({}), SECOND * 10);
    assert!(Env::redirected(&a.netns));
    let rules_before = Env::istio_rules(&a.netns);
    wait_for(
        "ztunnel ready",
        SECOND * 5,
        || env.zt().ready().then_some(()),
        || env.agent_log_tail(),
    );
    let starts_before = env.zt().starts();

    // Upgrade-style restart (the DaemonSet exists): everything stays.
    assert!(
        env.stop_agent(),
        "agent exits 0 on SIGTERM\n{}",
        env.agent_log_tail()
    );
    assert!(Env::redirected(&a.netns), "rules kept for the next agent");
    assert!(
        env.conflist()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["type"] == "istio-cni")
    );
    assert_eq!(
        env.zt().running(),
        vec![a.uid.clone()],
        "ztunnel keeps its proxies"
    );

    // While it is down: a new ambient pod cannot start (fail closed), and
    // a namespace is labelled.
    let b_uid = env.create_pod_object("mesh", "b", json!({}));
    let b_netns = env.cluster.scope().create_netns("node1-b").unwrap();
    let err = env
        .cni_add("mesh", "b", &b_uid, &b_netns, "c-b")
        .unwrap_err();
    assert!(!Env::redirected(&b_netns), "nothing half-done: {err}");
    env.kubectl(&[
        "label",
        "namespace",
        "later",
        "istio.io/dataplane-mode=ambient",
    ]);

    env.start_agent();
    env.wait_agent_ready();
    // kubelet retries b's ADD: now enrolled.
    let b = loop {
        match env.cni_add("mesh", "b", &b_uid, &b_netns, "c-b") {
            Ok(_) => break b_netns,
            Err(e) => {
                eprintln!("retrying ADD of mesh/b: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(Env::redirected(&b));
    assert_eq!(env.annotation("mesh", "b").as_deref(), Some("enabled"));
    // The pod of the namespace labelled meanwhile (netns remembered from
    // its ADD) is enrolled on return.
    wait_for(
        "later/w enrolled",
        SECOND * 5,
        || (env.annotation("later", "w").as_deref() == Some("enabled")).then_some(()),
        || env.agent_log_tail(),
    );
    assert!(Env::redirected(&waiting.netns));
    // No duplicate rules in the pod enrolled before the restart.
    assert_eq!(Env::istio_rules(&a.netns), rules_before);
    // Snapshot re-sent on the new connection; a's proxy was not restarted
    // (same netns: ztunnel keeps it), b and w were started.
    let mut want = vec![a.uid.clone(), b_uid.clone(), waiting.uid.clone()];
    want.sort();
    wait_for(
        "ztunnel runs a, b, w",
        SECOND * 5,
        || (env.zt().running() == want).then_some(()),
        || format!("{:?}\n{}", env.zt().running(), env.agent_log_tail()),
    );
    assert_eq!(
        env.zt().starts(),
        starts_before + 2,
        "only the new pods started"
    );
    let log = std::fs::read_to_string(&env.agent_log).unwrap();
    assert_eq!(
        log.matches("ZDS snapshot sent").count(),
        2,
        "one snapshot per agent"
    );
}

/// A node with the agent, ztunnel and one enrolled ambient pod `mesh/a`.
fn node_with_enrolled_pod(name: &str) -> (Env, control_loop_support::PodRef) {
    node_with_enrolled_pod_and(name, &[])
}

/// [`node_with_enrolled_pod`] with extra agent environment.
fn node_with_enrolled_pod_and(
    name: &str,
    agent_env: &[(&str, &str)],
) -> (Env, control_loop_support::PodRef) {
    let mut env = Env::new(name);
    env.extra_agent_env = agent_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.create_namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"}));
    env.start_agent();
    env.start_ztunnel();
    env.wait_chained();
    env.wait_agent_ready();
    let a = env.run_pod("mesh", "a", json!({}), SECOND * 10);
    assert!(Env::redirected(&a.netns));
    assert_eq!(env.annotation("mesh", "a").as_deref(), Some("enabled"));
    (env, a)
}

fn chained(env: &Env) -> bool {
    env.conflist()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["type"] == "istio-cni")
}

/// What a SIGTERM that means uninstall leaves: nothing of ours but the
/// plugin binary.
fn assert_uninstalled(env: &Env, a: &control_loop_support::PodRef) {
    assert!(!chained(env), "config entry removed: {}", env.conflist());
    assert!(
        env.bin_dir().join("istio-cni").exists(),
        "plugin binary kept: runtimes still run its (no-op) DEL for existing pods"
    );
    assert!(
        Env::istio_rules(&a.netns).is_empty(),
        "{:?}",
        Env::istio_rules(&a.netns)
    );
    let host = Env::istio_rules(env.node().netns());
    assert!(host.is_empty(), "host probe SNAT removed: {host:?}");
    assert!(
        env.zt().running().is_empty(),
        "ztunnel told to drop the pod"
    );
}

#[test]
fn sigterm_without_daemonset_uninstalls() {
    require_env!();
    let (mut env, a) = node_with_enrolled_pod("cuninst");
    env.api
        .delete("apps/v1", "DaemonSet", Some(AGENT_NS), "node-agent")
        .unwrap();
    assert!(env.stop_agent(), "{}", env.agent_log_tail());
    assert_uninstalled(&env, &a);
    assert_eq!(env.annotation("mesh", "a"), None);
}

/// `AMBIENT_DISABLE_SAFE_UPGRADE=true` (upstream's setting): the DaemonSet is
/// still there, yet SIGTERM uninstalls, without asking the API.
#[test]
fn sigterm_with_safe_upgrade_disabled_uninstalls() {
    require_env!();
    let (mut env, a) =
        node_with_enrolled_pod_and("csafeup", &[("AMBIENT_DISABLE_SAFE_UPGRADE", "true")]);
    assert!(env.stop_agent(), "{}", env.agent_log_tail());
    assert!(
        std::fs::read_to_string(&env.agent_log)
            .unwrap()
            .contains("AMBIENT_DISABLE_SAFE_UPGRADE=true"),
        "the log says why: {}",
        env.agent_log_tail()
    );
    assert_uninstalled(&env, &a);
}

/// `helm uninstall` deletes the DaemonSet and then its RBAC: the terminating
/// agent's GET is answered 403, which means uninstall too.
#[test]
fn sigterm_after_rbac_removal_uninstalls() {
    require_env!();
    let (mut env, a) = node_with_enrolled_pod("crbac");
    env.api.set_failing(
        ("apps", "daemonsets"),
        Some(e2e::apiserver::ApiError::forbidden(
            "daemonsets.apps",
            "node-agent",
            "User \"system:serviceaccount:istio-system:node-agent\" cannot get resource \"daemonsets\"",
        )),
    );
    assert!(env.stop_agent(), "{}", env.agent_log_tail());
    assert!(
        std::fs::read_to_string(&env.agent_log)
            .unwrap()
            .contains("403 Forbidden"),
        "the log says why: {}",
        env.agent_log_tail()
    );
    assert_uninstalled(&env, &a);
}

/// An API server answering 503 (the client retries that for minutes): the
/// agent cannot tell upgrade from uninstall, keeps everything, and still
/// exits well inside the grace period.
#[test]
fn sigterm_with_api_unavailable_keeps_everything_and_exits_in_time() {
    require_env!();
    let (mut env, a) = node_with_enrolled_pod("cunavail");
    let rules = Env::istio_rules(&a.netns);
    env.api.set_failing(
        ("apps", "daemonsets"),
        Some(e2e::apiserver::ApiError::unavailable(
            "the server is restarting",
        )),
    );
    assert!(
        env.stop_agent(),
        "exits 0 before the test's 15 s SIGKILL: {}",
        env.agent_log_tail()
    );
    assert!(
        std::fs::read_to_string(&env.agent_log)
            .unwrap()
            .contains("cannot tell upgrade from uninstall"),
        "{}",
        env.agent_log_tail()
    );
    assert!(chained(&env), "config entry kept: {}", env.conflist());
    assert_eq!(Env::istio_rules(&a.netns), rules, "pod rules kept");
    assert_eq!(env.annotation("mesh", "a").as_deref(), Some("enabled"));
}
