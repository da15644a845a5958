//! A bad setting stops the agent before it touches anything, with an error
//! naming the variable.

use std::process::Command;
use std::time::{Duration, Instant};

fn run_agent(vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_node-agent"));
    cmd.env_clear()
        .env("NODE_NAME", "node-1")
        .env("RUST_LOG", "info");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().expect("run node-agent");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused at once, not after waiting for anything"
    );
    out
}

#[test]
fn bad_enablement_selector_stops_start_up() {
    for (value, expect) in [
        (
            "- podSelector:\n    matchExpressions:\n      - {key: mesh, operator: Equals, values: [on]}\n",
            "unknown operator \"Equals\"",
        ),
        (
            "- namespaceSelector:\n    matchExpressions:\n      - {key: team, operator: In}\n",
            "needs at least one value",
        ),
        ("podSelector: {}", "not a YAML list"),
    ] {
        let out = run_agent(&[("AMBIENT_ENABLEMENT_SELECTOR", value)]);
        assert!(!out.status.success(), "{value}: must not start");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("AMBIENT_ENABLEMENT_SELECTOR"),
            "{value}: {stderr}"
        );
        assert!(stderr.contains(expect), "{value}: {stderr}");
    }
}
