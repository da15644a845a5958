//! Memory benchmark of the node agent (not part of `make test`: ignored;
//! `make bench-agent-memory` runs it with release binaries): the real
//! `node-agent` on a simulated node with 100 ambient pods, each created
//! through the real CNI chain and enrolled in-pod (rules in its netns,
//! handed to ztunnel's ZDS client), plus 20 pods outside the mesh. Reports
//! the agent's VmRSS / VmHWM (`/proc/<pid>/status`) after the pods are
//! enrolled and the agent has been idle for a few seconds, and after a
//! three namespace relabel round trips. Target: ≤ 15 MB RSS with 100 pods.
//!
//! `AGENT_MEMORY_PODS` changes the pod count; `AGENT_MEMORY_OUT` names a
//! file for the result lines.

mod control_loop_support;

use std::time::{Duration, Instant};

use control_loop_support::{Env, wait_for};
use serde_json::json;

fn status_kb(pid: u32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kb = v.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            ["VmRSS", "VmHWM", "RssAnon", "RssFile"]
                .contains(&k)
                .then(|| (k.to_string(), kb))
        })
        .collect()
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn line(label: &str, pid: u32) -> String {
    let s = status_kb(pid);
    let get = |k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap_or(0);
    format!(
        "{label}: VmRSS {:.1} MiB (anon {:.1}, file {:.1}), VmHWM {:.1} MiB, threads {}",
        get("VmRSS") as f64 / 1024.0,
        get("RssAnon") as f64 / 1024.0,
        get("RssFile") as f64 / 1024.0,
        get("VmHWM") as f64 / 1024.0,
        threads(pid)
    )
}

#[test]
#[ignore = "benchmark: make bench-agent-memory"]
fn agent_memory_with_100_pods() {
    require_env!();
    let n: usize = std::env::var("AGENT_MEMORY_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut env = Env::new("cmem");
    env.create_namespace("mesh", json!({"istio.io/dataplane-mode": "ambient"}));
    env.create_namespace("plain", json!({}));
    env.start_agent();
    env.start_ztunnel();
    env.wait_chained();
    env.wait_agent_ready();
    let pid = env.agent.as_mut().unwrap().pid();
    let mut report = vec![
        format!(
            "node-agent memory, binary {}",
            e2e::bin_path("node-agent").display()
        ),
        line("idle, 0 pods", pid),
    ];

    let t0 = Instant::now();
    let mut pods = Vec::new();
    for i in 0..n {
        pods.push(env.run_pod("mesh", &format!("m{i}"), json!({}), Duration::from_secs(30)));
    }
    for i in 0..20 {
        pods.push(env.run_pod(
            "plain",
            &format!("p{i}"),
            json!({}),
            Duration::from_secs(30),
        ));
    }
    let created = t0.elapsed();
    wait_for(
        "all ambient pods handed to ztunnel",
        Duration::from_secs(60),
        || (env.zt().running().len() == n).then_some(()),
        || format!("ztunnel runs {}", env.zt().running().len()),
    );
    let (_, metrics) = env.agent_http(15014, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("node_agent_pods_enrolled {n}")),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_secs(12));
    report.push(format!(
        "{n} ambient + 20 plain pods created through the CNI chain in {created:.1?}"
    ));
    report.push(line(&format!("{n} pods enrolled, idle"), pid));

    // Relabel round trips: every pod unenrolled, then enrolled again
    // (growth from one round to the next would be a leak).
    for round in 1..=3 {
        env.kubectl(&["label", "namespace", "mesh", "istio.io/dataplane-mode-"]);
        wait_for(
            "all unenrolled",
            Duration::from_secs(60),
            || env.zt().running().is_empty().then_some(()),
            || env.agent_log_tail(),
        );
        env.kubectl(&[
            "label",
            "namespace",
            "mesh",
            "istio.io/dataplane-mode=ambient",
        ]);
        wait_for(
            "all enrolled again",
            Duration::from_secs(60),
            || (env.zt().running().len() == n).then_some(()),
            || env.agent_log_tail(),
        );
        std::thread::sleep(Duration::from_secs(12));
        report.push(line(
            &format!("{n} pods after unlabel + relabel round {round}, idle"),
            pid,
        ));
    }

    let text = report.join("\n");
    println!("{text}");
    if let Ok(out) = std::env::var("AGENT_MEMORY_OUT") {
        std::fs::write(out, format!("{text}\n")).unwrap();
    }
    for p in pods {
        drop(p);
    }
}
