//! The node agent's control loop in GENEVE mode (`REDIRECT_MODE=geneve`),
//! end to end: the real `node-agent` binary in a simulated node against the
//! API double, pods made through the real CNI chain. Needs a kernel with
//! GENEVE: runs inside the VM batch (`scripts/vm-tests.sh`, `make test-vm`);
//! elsewhere it is skipped with the reason (a failure when
//! `GENEVE_TESTS_REQUIRED=1`).
//!
//! - no ztunnel pod: not Ready, ambient CNI ADDs refused (fail closed);
//! - a Ready `app=ztunnel` pod in the agent's namespace: tunnels built
//!   (node `istioin`/`istioout`, ztunnel `pistioin`/`pistioout`), Ready;
//! - an ambient pod is in the node's ipset before its ADD returns, and
//!   annotated; unlabelling the namespace takes it out again;
//! - a newer ztunnel pod replaces the old one: tunnels rebuilt into it,
//!   nothing left in the old one, enrolled pods kept.

mod control_loop_support;

use std::time::Duration;

use control_loop_support::{AGENT_NS, Env, wait_for};
use e2e::netsim::NamedNetns;
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);
const IPSET: &str = "ztunnel-pods-ips";

/// `None` when this kernel can create GENEVE devices.
fn geneve_missing(env: &Env) -> Option<String> {
    let why = e2e::netsim::geneve_unsupported(env.node().netns())?;
    if std::env::var_os("GENEVE_TESTS_REQUIRED").is_some_and(|v| v == "1") {
        panic!("GENEVE_TESTS_REQUIRED=1 but {why}");
    }
    Some(why)
}

fn links(ns: &NamedNetns) -> String {
    ns.exec("ip", ["-o", "link", "show"], SECOND * 10)
        .unwrap_or_default()
}

fn has_link(ns: &NamedNetns, name: &str) -> bool {
    links(ns).lines().any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|n| n.trim_end_matches(':').split('@').next() == Some(name))
    })
}

fn ipset(env: &Env) -> String {
    env.node()
        .netns()
        .output("ipset", ["list", IPSET], SECOND * 10)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn ready(env: &Env) -> Option<(u16, String)> {
    env.agent_http(8000, "/readyz")
}

#[test]
fn geneve_mode_follows_ztunnel_and_labels() {
    require_env!();
    let mut env = Env::with_primary("cgeneve", true);
    if let Some(why) = geneve_missing(&env) {
        eprintln!("skipped: {why}");
        return;
    }
    env.create_namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"}));
    env.start_agent_mode("geneve");
    env.wait_chained();

    // No ztunnel pod yet: not Ready, and ambient pods cannot start.
    wait_for(
        "readyz names ztunnel",
        SECOND * 20,
        || {
            ready(&env)
                .filter(|(c, b)| *c == 503 && b.contains("ztunnel") && !b.contains("kubernetes"))
        },
        || format!("{:?}\n{}", ready(&env), env.agent_log_tail()),
    );
    let early_uid = env.create_pod_object("mesh", "early", json!({}));
    let early_ns = env.cluster.scope().create_netns("node1-early").unwrap();
    let err = env
        .cni_add("mesh", "early", &early_uid, &early_ns, "c-early")
        .unwrap_err();
    assert!(err.contains("no ztunnel"), "{err}");

    // The ztunnel pod (its netns is remembered from its own CNI ADD).
    let zt_a = env.run_pod(
        AGENT_NS,
        "ztunnel-a",
        json!({"app": "ztunnel"}),
        SECOND * 20,
    );
    env.wait_agent_ready();
    assert!(
        has_link(env.node().netns(), "istioin"),
        "{}",
        links(env.node().netns())
    );
    assert!(has_link(env.node().netns(), "istioout"));
    assert!(has_link(&zt_a.netns, "pistioin"), "{}", links(&zt_a.netns));
    assert!(has_link(&zt_a.netns, "pistioout"));

    // An ambient pod: in the ipset when its ADD returns.
    let web = env.run_pod("mesh", "web", json!({}), SECOND * 20);
    assert!(ipset(&env).contains(&web.ip.to_string()), "{}", ipset(&env));
    assert_eq!(env.annotation("mesh", "web").as_deref(), Some("enabled"));
    // The early pod's ADD is retried by kubelet and now succeeds.
    env.cni_add("mesh", "early", &early_uid, &early_ns, "c-early")
        .unwrap_or_else(|e| panic!("{e}\n{}", env.agent_log_tail()));

    // A newer ztunnel replaces it: rebuilt there, nothing left in the old.
    let zt_b = env.run_pod(
        AGENT_NS,
        "ztunnel-b",
        json!({"app": "ztunnel"}),
        SECOND * 20,
    );
    wait_for(
        "tunnels moved to ztunnel-b",
        SECOND * 30,
        || (has_link(&zt_b.netns, "pistioin") && !has_link(&zt_a.netns, "pistioin")).then_some(()),
        || {
            format!(
                "a: {}\nb: {}\n{}",
                links(&zt_a.netns),
                links(&zt_b.netns),
                env.agent_log_tail()
            )
        },
    );
    assert!(
        ipset(&env).contains(&web.ip.to_string()),
        "enrolled pods kept"
    );
    env.wait_agent_ready();

    // Something else removes our outbound policy rule and the route of the enrolled
    // pod: the agent notices and puts both back (capture must not silently stop).
    let node_ns = env.node().netns().name().to_string();
    let ip = |args: &str| {
        let out = std::process::Command::new("ip")
            .args(["-n", node_ns.as_str()])
            .args(args.split_whitespace())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {node_ns} {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The rebuild for ztunnel-b is complete (its node side follows its netns side).
    wait_for(
        "node routes point at ztunnel-b",
        SECOND * 20,
        || {
            let t = ip("route show table 100");
            (t.contains(&zt_b.ip.to_string()) && !t.contains("unreachable")).then_some(())
        },
        || format!("{}\n{}", ip("route show table 100"), env.agent_log_tail()),
    );
    std::thread::sleep(SECOND);
    eprintln!(
        "before drift:\n{}{}",
        ip("rule show"),
        ip("route show table 100")
    );
    ip("rule del pref 101");
    ip(&format!("route del {} table 100", web.ip));
    wait_for(
        "drifted rule and route re-applied",
        SECOND * 20,
        || {
            (ip("rule show").contains("lookup 101")
                && ip("route show table 100").contains(&web.ip.to_string()))
            .then_some(())
        },
        || {
            format!(
                "{}
{}
{}",
                ip("rule show"),
                ip("route show table 100"),
                env.agent_log_tail()
            )
        },
    );
    assert!(
        std::fs::read_to_string(&env.agent_log)
            .unwrap()
            .contains("changed by something else"),
        "the agent says why it re-applied: {}",
        env.agent_log_tail()
    );

    // Unlabel: out of the ipset, annotation removed.
    env.api
        .merge_patch(
            "v1",
            "Namespace",
            None,
            "mesh",
            &json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}}),
            false,
        )
        .unwrap();
    wait_for(
        "web unenrolled",
        SECOND * 20,
        || {
            (env.annotation("mesh", "web").is_none() && !ipset(&env).contains(&web.ip.to_string()))
                .then_some(())
        },
        || format!("{}\n{}", ipset(&env), env.agent_log_tail()),
    );
    drop(early_ns);
}
