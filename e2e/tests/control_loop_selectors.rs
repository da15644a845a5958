//! Custom enablement selectors (`AMBIENT_ENABLEMENT_SELECTOR`) end to end,
//! in-pod mode (root): the real agent, plugin and API double as in
//! `control_loop.rs`. Pods labelled `mesh=on` in any namespace, and every pod
//! of a namespace labelled `team=a`, are ambient; Istio's default label is
//! not. The agent writes the list into the plugin's CNI config.

mod control_loop_support;

use std::time::Duration;

use control_loop_support::{Env, wait_for};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

const SELECTORS: &str = "\
- podSelector:
    matchLabels:
      mesh: \"on\"
- namespaceSelector:
    matchLabels:
      team: a
";

#[test]
fn custom_selectors_enrol_and_namespace_labels_follow() {
    require_env!();
    let mut env = Env::new("csel");
    env.extra_agent_env = vec![("AMBIENT_ENABLEMENT_SELECTOR".into(), SELECTORS.into())];
    env.create_namespace("demo", json!({"istio.io/dataplane-mode": "ambient"}));
    env.start_agent();
    env.start_ztunnel();
    env.wait_chained();
    env.wait_agent_ready();

    // The plugin's config carries the compiled list.
    let conf = env.conflist();
    let entry = conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "istio-cni")
        .expect("istio-cni entry");
    assert_eq!(
        entry["enablement_selectors"],
        json!([
            {"podSelector": {"matchLabels": {"mesh": "on"}}, "namespaceSelector": {}},
            {"podSelector": {}, "namespaceSelector": {"matchLabels": {"team": "a"}}}
        ])
    );

    // mesh=on: enrolled by its CNI ADD, although its namespace's labels
    // say nothing the selector looks at.
    let selected = env.run_pod("demo", "selected", json!({"mesh": "on"}), SECOND * 10);
    assert!(Env::redirected(&selected.netns), "{}", env.agent_log_tail());
    assert_eq!(
        env.annotation("demo", "selected").as_deref(),
        Some("enabled")
    );
    // Istio's default rule (namespace label ambient) no longer enrols.
    let plain = env.run_pod("demo", "plain", json!({"app": "plain"}), SECOND * 10);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!Env::redirected(&plain.netns));
    assert_eq!(env.annotation("demo", "plain"), None);

    // Namespace label team=a: the plain pod joins.
    env.kubectl(&["label", "namespace", "demo", "team=a"]);
    wait_for(
        "plain pod enrolled",
        SECOND * 5,
        || (env.annotation("demo", "plain").as_deref() == Some("enabled")).then_some(()),
        || env.agent_log_tail(),
    );
    assert!(Env::redirected(&plain.netns));

    // team=b: it leaves; the mesh=on pod stays.
    env.kubectl(&["label", "--overwrite", "namespace", "demo", "team=b"]);
    wait_for(
        "plain pod unenrolled",
        SECOND * 5,
        || env.annotation("demo", "plain").is_none().then_some(()),
        || env.agent_log_tail(),
    );
    assert!(Env::istio_rules(&plain.netns).is_empty());
    assert!(Env::redirected(&selected.netns));

    // The pod label goes: the selected pod leaves too.
    env.kubectl(&["label", "pod", "-n", "demo", "selected", "mesh-"]);
    wait_for(
        "selected pod unenrolled",
        SECOND * 5,
        || env.annotation("demo", "selected").is_none().then_some(()),
        || env.agent_log_tail(),
    );
    assert!(Env::istio_rules(&selected.netns).is_empty());
}
