//! The plugin binary run exactly as a container runtime runs it (env +
//! stdin, chained after the real `bridge` + `host-local` plugins, inside a
//! throw-away node netns with a throw-away pod netns), against the node
//! agent's real plugin-event endpoint with a scripted handler (and its real log
//! endpoint, which receives the plugin's log lines), and against a fake API server when
//! the agent is down.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::cni_event::{CmdAddEvent, CmdAddReply, Enrolment};
use mesh_proto::plugin_log::PluginLogLine;
use node_agent::install::kubeconfig::{self, KubeconfigSource};
use node_agent::plugin_events::{CmdAddRefusal, PluginEventListener, PodEventHandler};
use node_agent::plugin_log::PluginLogListener;
use serde_json::{Value, json};
use support::*;

macro_rules! skip_without_netns {
    () => {
        if let Some(why) = netns_skip_reason() {
            println!("SKIPPED: {why}");
            return;
        }
    };
}

type Script = fn(&CmdAddEvent) -> Result<CmdAddReply, CmdAddRefusal>;

struct ScriptedHandler {
    script: Script,
    seen: Arc<Mutex<Vec<CmdAddEvent>>>,
}

impl PodEventHandler for ScriptedHandler {
    fn cmd_add(&self, event: CmdAddEvent) -> BoxFuture<'_, Result<CmdAddReply, CmdAddRefusal>> {
        self.seen.lock().unwrap().push(event.clone());
        let r = (self.script)(&event);
        Box::pin(async move { r })
    }
}

/// The agent's plugin-event and log endpoints, in their own runtime.
struct Agent {
    _rt: tokio::runtime::Runtime,
    run_dir: tempfile::TempDir,
    seen: Arc<Mutex<Vec<CmdAddEvent>>>,
    logs: Arc<Mutex<Vec<PluginLogLine>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Agent {
    fn start(script: Script) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let run_dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(ScriptedHandler {
            script,
            seen: seen.clone(),
        });
        let (listener, log_listener) = {
            let _g = rt.enter();
            (
                PluginEventListener::bind(run_dir.path()).unwrap(),
                PluginLogListener::bind(run_dir.path()).unwrap(),
            )
        };
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = futures::FutureExt::shared(rx);
        let stopped = rx.clone();
        rt.spawn(listener.serve(handler, Duration::from_secs(4), async {
            let _ = stopped.await;
        }));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let logs = logs.clone();
            Arc::new(move |l| logs.lock().unwrap().push(l))
        };
        rt.spawn(log_listener.serve(sink, async {
            let _ = rx.await;
        }));
        Self {
            _rt: rt,
            run_dir,
            seen,
            logs,
            _stop: stop,
        }
    }

    /// The plugin's log lines the agent received (cleared).
    fn take_logs(&self) -> Vec<PluginLogLine> {
        std::mem::take(&mut self.logs.lock().unwrap())
    }

    fn events(&self) -> Vec<CmdAddEvent> {
        self.seen.lock().unwrap().clone()
    }
}

fn by_name(ev: &CmdAddEvent) -> Result<CmdAddReply, CmdAddRefusal> {
    if ev.pod_name.starts_with("refused-") {
        return Err(CmdAddRefusal::EnrolmentFailed(format!(
            "partial add error: no ztunnel connection (pod {})",
            ev.pod_name
        )));
    }
    Ok(CmdAddReply {
        enrolment: if ev.pod_name.starts_with("mesh-") {
            Enrolment::Enrolled
        } else {
            Enrolment::NotAmbient
        },
        reason: "scripted".into(),
    })
}

fn istio(run_dir: &Path, extra: Value) -> Value {
    let mut v = json!({
        "cni_agent_run_dir": run_dir,
        "ambient_enabled": true,
        "pod_namespace": "istio-system",
        "exclude_namespaces": ["kube-system"],
        "kubernetes": {"kubeconfig": run_dir.join("istio-cni-kubeconfig")},
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    v
}

fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn chained_add_check_del_with_agent_up_all_versions() {
    skip_without_netns!();
    let agent = Agent::start(by_name);
    for (i, version) in ["0.3.1", "0.4.0", "1.0.0"].into_iter().enumerate() {
        for pod_name in ["web", "mesh-web"] {
            let node = Node::new();
            let pod = NamedNetns::new("icn-pod");
            let rt = Runtime {
                node: &node,
                conflist: node.conflist(version, istio(agent.run_dir.path(), json!({}))),
            };
            let container = format!("c{i}{pod_name}");
            let args = k8s_args("demo", pod_name, "uid-42");
            let (result, runs) = rt
                .add(&container, &pod, &args)
                .unwrap_or_else(|f| panic!("{version}: {} failed: {:?}", f.plugin, f.run));
            // prevResult passed through verbatim, in the config's version.
            assert_eq!(
                result,
                runs[0].json(),
                "{version}: istio-cni changed the result"
            );
            assert_eq!(result["cniVersion"], version);
            assert_eq!(
                result["ips"][0].get("version").is_some(),
                version != "1.0.0"
            );
            let ip = addresses(&result)[0].clone();
            assert!(
                pod.ip_output(&["-o", "addr", "show", "eth0"]).contains(&ip),
                "{version}: {ip} not on eth0 in the pod netns"
            );
            let ev = agent.events().pop().expect("agent saw the pod");
            assert_eq!(ev.pod_name, pod_name);
            assert_eq!(ev.pod_namespace, "demo");
            assert_eq!(ev.pod_uid.as_deref(), Some("uid-42"));
            assert_eq!(ev.netns, pod.path().display().to_string());
            assert_eq!(
                ev.ips.iter().map(|i| i.address.clone()).collect::<Vec<_>>(),
                addresses(&result)
            );
            assert!(
                runs[1].stderr.contains("agent says"),
                "decision logged: {}",
                runs[1].stderr
            );
            // The same decision reached the agent's log endpoint, with its fields (the
            // plugin does not wait for the agent to read them).
            let decision = |l: &PluginLogLine| {
                l.level == "info"
                    && l.msg.contains("agent says")
                    && l.fields
                        .contains(&("container".to_string(), container.clone()))
            };
            let mut logs = Vec::new();
            for _ in 0..100 {
                logs.extend(agent.take_logs());
                if logs.iter().any(decision) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                logs.iter().any(decision),
                "{version}: forwarded to the agent: {logs:?}"
            );
            if version != "0.3.1" {
                rt.check(&container, &pod, &args, &result)
                    .unwrap_or_else(|f| {
                        panic!("{version}: CHECK {} failed: {:?}", f.plugin, f.run)
                    });
            }
            rt.del(&container, &pod, &args, Some(&result))
                .unwrap_or_else(|f| panic!("{version}: DEL {} failed: {:?}", f.plugin, f.run));
            assert!(
                !pod.ip_output(&["-o", "addr"]).contains(&ip),
                "DEL removed the interface"
            );
        }
    }
    assert_eq!(agent.events().len(), 6);
}

/// The agent's answer while it is listening but not ready (503).
fn still_syncing(ev: &CmdAddEvent) -> Result<CmdAddReply, CmdAddRefusal> {
    Err(CmdAddRefusal::Undecided(format!(
        "node agent is still starting (syncing pods and redirection); pod {}/{} will be retried",
        ev.pod_namespace, ev.pod_name
    )))
}

#[test]
fn agent_refusal_lets_pods_outside_the_mesh_start() {
    skip_without_netns!();
    let agent = Agent::start(still_syncing);
    let node = Node::new();
    let pod = NamedNetns::new("icn-pod");
    let api = api_setup(
        &node,
        agent.run_dir.path(),
        objects(json!({}), json!({"team": "web"})),
    );
    let rt = Runtime {
        node: &node,
        conflist: node.conflist("1.0.0", istio(agent.run_dir.path(), json!({}))),
    };
    let (result, runs) = rt
        .add("c-syncing", &pod, &k8s_args("demo", "app-1", "u"))
        .unwrap_or_else(|f| panic!("pod outside the mesh must start: {:?}", f.run));
    assert_eq!(result, runs[0].json(), "prevResult passed through");
    assert_eq!(agent.events().len(), 1, "the agent was asked first");
    let log = &runs[1].stderr;
    assert!(log.contains("not ambient"), "{log}");
    assert!(
        log.contains("HTTP 503") && log.contains("still starting"),
        "{log}"
    );
    assert!(
        api.requests
            .lock()
            .unwrap()
            .contains(&"/api/v1/namespaces/demo/pods/app-1".to_string())
    );
    rt.del("c-syncing", &pod, "", Some(&result)).unwrap();
}

#[test]
fn agent_refusal_of_an_ambient_pod_fails_add_with_try_again_later() {
    skip_without_netns!();
    let agent = Agent::start(by_name);
    let node = Node::new();
    let pod = NamedNetns::new("icn-pod");
    let _api = api_setup(
        &node,
        agent.run_dir.path(),
        HashMap::from([
            (
                "/api/v1/namespaces/demo/pods/refused-1".to_string(),
                pod_object("demo", "refused-1", json!({}), false),
            ),
            (
                "/api/v1/namespaces/demo".to_string(),
                namespace_object("demo", json!({"istio.io/dataplane-mode": "ambient"})),
            ),
        ]),
    );
    let rt = Runtime {
        node: &node,
        conflist: node.conflist("1.0.0", istio(agent.run_dir.path(), json!({}))),
    };
    let f = rt
        .add("c-refused", &pod, &k8s_args("demo", "refused-1", "u"))
        .expect_err("agent refused: ADD must fail");
    assert_eq!(f.plugin, "istio-cni");
    let e = f.run.expect_error(11);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("no ztunnel connection"),
        "{e}"
    );
    assert!(e["msg"].as_str().unwrap().contains("demo/refused-1"), "{e}");
    // The runtime's clean-up DEL released the address.
    let leases: Vec<_> = std::fs::read_dir(node.ipam_dir.path().join("k8s-pod-network"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(leases.is_empty(), "leases left: {leases:?}");
}

/// A fake API serving `objects`; the plugin kubeconfig in `run_dir` is
/// written by the node agent's own writer from the fake API's kubeconfig.
fn api_setup(node: &Node, run_dir: &Path, objects: HashMap<String, Value>) -> FakeApi {
    let api = FakeApi::start_in(&node.netns, objects);
    let admin = run_dir.join("admin-kubeconfig");
    api.write_kubeconfig(&admin);
    let text = kubeconfig::render(&KubeconfigSource::File(admin)).unwrap();
    kubeconfig::write_if_changed(
        &run_dir.join("istio-cni-kubeconfig"),
        &text,
        kubeconfig::DEFAULT_MODE,
    )
    .unwrap();
    api
}

/// Agent down: run dir with no socket, and a fake API.
fn agent_down_setup(node: &Node, objects: HashMap<String, Value>) -> (tempfile::TempDir, FakeApi) {
    let run_dir = tempfile::tempdir().unwrap();
    let api = api_setup(node, run_dir.path(), objects);
    (run_dir, api)
}

fn objects(pod_labels: Value, ns_labels: Value) -> HashMap<String, Value> {
    HashMap::from([
        (
            "/api/v1/namespaces/demo/pods/app-1".to_string(),
            pod_object("demo", "app-1", pod_labels, false),
        ),
        (
            "/api/v1/namespaces/demo".to_string(),
            namespace_object("demo", ns_labels),
        ),
    ])
}

#[test]
fn agent_down_fails_closed_for_ambient_pods() {
    skip_without_netns!();
    for (pod_labels, ns_labels) in [
        (json!({}), json!({"istio.io/dataplane-mode": "ambient"})),
        (json!({"istio.io/dataplane-mode": "ambient"}), json!({})),
    ] {
        let node = Node::new();
        let pod = NamedNetns::new("icn-pod");
        let (run_dir, api) = agent_down_setup(&node, objects(pod_labels, ns_labels));
        let rt = Runtime {
            node: &node,
            conflist: node.conflist("1.0.0", istio(run_dir.path(), json!({}))),
        };
        let f = rt
            .add("c-amb", &pod, &k8s_args("demo", "app-1", "u"))
            .expect_err("ambient pod with the agent down must fail");
        assert_eq!(f.plugin, "istio-cni");
        let e = f.run.expect_error(11);
        assert!(e["msg"].as_str().unwrap().contains("is ambient"), "{e}");
        assert!(
            e["details"].as_str().unwrap().contains("pluginevent.sock"),
            "{e}"
        );
        let reqs = api.requests.lock().unwrap().clone();
        assert!(
            reqs.contains(&"/api/v1/namespaces/demo/pods/app-1".to_string()),
            "{reqs:?}"
        );
        assert!(
            reqs.contains(&"/api/v1/namespaces/demo".to_string()),
            "{reqs:?}"
        );
    }
}

/// The fallback decides with the `enablement_selectors` the agent wrote into
/// the CNI config: a `mesh=on` pod is ambient (fails closed), one labelled
/// only as the default rule wants is not (starts).
#[test]
fn agent_down_follows_the_configs_enablement_selectors() {
    skip_without_netns!();
    let selectors = json!({"enablement_selectors": [
        {"podSelector": {"matchLabels": {"mesh": "on"}}, "namespaceSelector": {}}
    ]});
    let node = Node::new();
    let pod = NamedNetns::new("icn-pod");
    let (run_dir, _api) = agent_down_setup(&node, objects(json!({"mesh": "on"}), json!({})));
    let rt = Runtime {
        node: &node,
        conflist: node.conflist("1.0.0", istio(run_dir.path(), selectors.clone())),
    };
    let f = rt
        .add("c-sel", &pod, &k8s_args("demo", "app-1", "u"))
        .expect_err("selected pod with the agent down must fail");
    let e = f.run.expect_error(11);
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains("is ambient") && msg.contains("enablement selector 0"),
        "{e}"
    );

    let node = Node::new();
    let pod = NamedNetns::new("icn-pod");
    let (run_dir, _api) = agent_down_setup(
        &node,
        objects(
            json!({"istio.io/dataplane-mode": "ambient"}),
            json!({"istio.io/dataplane-mode": "ambient"}),
        ),
    );
    let rt = Runtime {
        node: &node,
        conflist: node.conflist("1.0.0", istio(run_dir.path(), selectors)),
    };
    let (result, runs) = rt
        .add("c-sel2", &pod, &k8s_args("demo", "app-1", "u"))
        .unwrap_or_else(|f| panic!("{:?}", f.run));
    assert!(
        runs[1].stderr.contains("no enablement selector"),
        "{}",
        runs[1].stderr
    );
    rt.del("c-sel2", &pod, "", Some(&result)).unwrap();
}

#[test]
fn agent_down_lets_non_ambient_pods_through_and_fails_open_on_lookup_errors() {
    skip_without_netns!();
    // Not ambient (opted out in an ambient namespace): succeed.
    let node = Node::new();
    let pod = NamedNetns::new("icn-pod");
    let (run_dir, _api) = agent_down_setup(
        &node,
        objects(
            json!({"istio.io/dataplane-mode": "none"}),
            json!({"istio.io/dataplane-mode": "ambient"}),
        ),
    );
    let rt = Runtime {
        node: &node,
        conflist: node.conflist("1.0.0", istio(run_dir.path(), json!({}))),
    };
    let (result, runs) = rt
        .add("c-none", &pod, &k8s_args("demo", "app-1", "u"))
        .unwrap_or_else(|f| panic!("{:?}", f.run));
    assert_eq!(result, runs[0].json());
    assert!(runs[1].stderr.contains("not ambient"), "{}", runs[1].stderr);
    rt.del("c-none", &pod, "", Some(&result)).unwrap();

    // Lookup fails (pod unknown to the API): fail open...
    let pod2 = NamedNetns::new("icn-pod");
    let (result, runs) = rt
        .add("c-unknown", &pod2, &k8s_args("demo", "unknown-pod", "u"))
        .unwrap_or_else(|f| panic!("{:?}", f.run));
    assert!(
        runs[1].stderr.contains("failing open"),
        "{}",
        runs[1].stderr
    );
    rt.del("c-unknown", &pod2, "", Some(&result)).unwrap();

    // ...unless detection retry is on: then ADD fails, retryable.
    let retry = Runtime {
        node: &node,
        conflist: node.conflist(
            "1.0.0",
            istio(
                run_dir.path(),
                json!({"enable_ambient_detection_retry": true}),
            ),
        ),
    };
    let pod3 = NamedNetns::new("icn-pod");
    let f = retry
        .add("c-retry", &pod3, &k8s_args("demo", "unknown-pod", "u"))
        .expect_err("retry mode: unknown enrolment fails");
    let e = f.run.expect_error(11);
    assert!(
        e["details"].as_str().unwrap().contains("unknown-pod"),
        "{e}"
    );
}

#[test]
fn agent_down_and_no_api_fails_open() {
    skip_without_netns!();
    let node = Node::new();
    let pod = NamedNetns::new("icn-pod");
    let run_dir = tempfile::tempdir().unwrap(); // no socket, no kubeconfig
    let rt = Runtime {
        node: &node,
        conflist: node.conflist("0.4.0", istio(run_dir.path(), json!({}))),
    };
    let (result, runs) = rt
        .add("c-noapi", &pod, &k8s_args("demo", "app-1", "u"))
        .unwrap_or_else(|f| panic!("{:?}", f.run));
    assert!(
        runs[1].stderr.contains("istio-cni-kubeconfig"),
        "{}",
        runs[1].stderr
    );
    rt.del("c-noapi", &pod, "", Some(&result)).unwrap();
}

// ---- single-plugin runs (no netns needed) ----

fn prev_result() -> Value {
    json!({"cniVersion": "1.0.0",
           "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
           "ips": [{"address": "10.9.0.5/24", "gateway": "10.9.0.1", "interface": 0}],
           "routes": [{"dst": "0.0.0.0/0"}], "dns": {}})
}

fn conf(run_dir: &Path, extra: Value) -> Value {
    let mut v = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
                        "prevResult": prev_result()});
    for (k, val) in istio(run_dir, extra).as_object().unwrap() {
        v[k] = val.clone();
    }
    v
}

#[test]
fn bad_inputs_fail_with_spec_codes_and_change_nothing() {
    let agent = Agent::start(by_name);
    let run = agent.run_dir.path();
    let add = cni_env(
        "ADD",
        "c1",
        "/var/run/netns/nope",
        &k8s_args("demo", "mesh-a", "u"),
    );

    // No stdin at all.
    run_plugin(PLUGIN, &add, Stdin::Null, None).expect_error(6);
    // Invalid JSON.
    run_plugin(PLUGIN, &add, Stdin::Raw(b"{\"cniVersion\": "), None).expect_error(6);
    // Unknown cniVersion.
    let mut c = conf(run, json!({}));
    c["cniVersion"] = json!("9.9.9");
    let e = run_plugin(PLUGIN, &add, Stdin::Json(&c), None).expect_error(1);
    assert!(e["details"].as_str().unwrap().contains("9.9.9"));
    // Known key of the wrong type.
    let c = conf(run, json!({"ambient_enabled": "yes"}));
    run_plugin(PLUGIN, &add, Stdin::Json(&c), None).expect_error(7);
    // Missing CNI_COMMAND; unknown command; missing CNI_NETNS on ADD.
    let good = conf(run, json!({}));
    let no_cmd: Vec<_> = add
        .iter()
        .filter(|(k, _)| *k != "CNI_COMMAND")
        .cloned()
        .collect();
    let e = run_plugin(PLUGIN, &no_cmd, Stdin::Json(&good), None).expect_error(4);
    assert!(e["msg"].as_str().unwrap().contains("CNI_COMMAND"));
    let mut bad_cmd = add.clone();
    bad_cmd[0].1 = "FROB".into();
    run_plugin(PLUGIN, &bad_cmd, Stdin::Json(&good), None).expect_error(4);
    let no_netns: Vec<_> = add
        .iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .cloned()
        .collect();
    let e = run_plugin(PLUGIN, &no_netns, Stdin::Json(&good), None).expect_error(4);
    assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"));
    // CHECK on 0.3.1 is not allowed by the spec.
    let mut old = conf(run, json!({}));
    old["cniVersion"] = json!("0.3.1");
    let mut check = add.clone();
    check[0].1 = "CHECK".into();
    run_plugin(PLUGIN, &check, Stdin::Json(&old), None).expect_error(1);

    assert!(agent.events().is_empty(), "no bad input reached the agent");
    // And the good config does reach it.
    let ok = run_plugin(PLUGIN, &add, Stdin::Json(&good), None);
    assert!(ok.success, "{ok:?}");
    assert_eq!(agent.events().len(), 1);
    // No prevResult is not an error (upstream): the agent is asked, without
    // IPs, and the result is empty, in the config's version.
    let mut c = conf(run, json!({}));
    c.as_object_mut().unwrap().remove("prevResult");
    let out = run_plugin(PLUGIN, &add, Stdin::Json(&c), None);
    assert!(out.success, "{out:?}");
    assert_eq!(out.json(), json!({"cniVersion": "1.0.0"}));
    let events = agent.events();
    assert_eq!(events.len(), 2);
    assert!(events[1].ips.is_empty(), "{:?}", events[1]);
}

#[test]
fn skips_without_contacting_anyone() {
    // Run dir with neither socket nor kubeconfig: a skipped pod must not care.
    let run_dir = tempfile::tempdir().unwrap();
    let run = run_dir.path();
    for (args, why) in [
        (
            k8s_args("kube-system", "coredns-1", "u"),
            "namespace is excluded",
        ),
        (
            k8s_args("istio-system", "istio-cni-node-abcde", "u"),
            "node agent itself",
        ),
        ("IgnoreUnknown=1".to_string(), "not a Kubernetes pod"),
    ] {
        let env = cni_env("ADD", "c1", "/var/run/netns/x", &args);
        let out = run_plugin(PLUGIN, &env, Stdin::Json(&conf(run, json!({}))), None);
        assert!(out.success, "{out:?}");
        assert_eq!(out.json(), prev_result());
        assert!(out.stderr.contains(why), "{}", out.stderr);
        // Without prevResult: an empty result in the config's version.
        let mut bare = conf(run, json!({}));
        bare.as_object_mut().unwrap().remove("prevResult");
        bare["cniVersion"] = json!("0.4.0");
        let out = run_plugin(PLUGIN, &env, Stdin::Json(&bare), None);
        assert!(out.success, "{out:?}");
        assert_eq!(out.json(), json!({"cniVersion": "0.4.0"}));
    }
    let env = cni_env("ADD", "c1", "/var/run/netns/x", &k8s_args("demo", "a", "u"));
    let out = run_plugin(
        PLUGIN,
        &env,
        Stdin::Json(&conf(run, json!({"ambient_enabled": false}))),
        None,
    );
    assert!(
        out.success && out.stderr.contains("ambient is not enabled"),
        "{out:?}"
    );
}

#[test]
fn del_check_version_status_gc() {
    let run_dir = tempfile::tempdir().unwrap();
    let run = run_dir.path();
    // DEL without netns and without prevResult: success, no output.
    let del: Vec<_> = cni_env("DEL", "c1", "", &k8s_args("demo", "a", "u"))
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let mut c = conf(run, json!({}));
    c.as_object_mut().unwrap().remove("prevResult");
    let out = run_plugin(PLUGIN, &del, Stdin::Json(&c), None);
    assert!(out.success && out.stdout.is_empty(), "{out:?}");
    // DEL checks only what every command needs: a key of a type this version does not
    // accept, or CNI_ARGS it cannot read, do not block a teardown; no JSON or an
    // unsupported version still fail with their codes.
    let odd_args: Vec<_> = del
        .iter()
        .map(|(k, v)| match *k {
            "CNI_ARGS" => (*k, "IgnoreUnknown".to_string()),
            _ => (*k, v.clone()),
        })
        .collect();
    let odd = conf(run, json!({"ambient_enabled": "yes", "prevResult": 3}));
    let out = run_plugin(PLUGIN, &odd_args, Stdin::Json(&odd), None);
    assert!(out.success && out.stdout.is_empty(), "{out:?}");
    run_plugin(PLUGIN, &del, Stdin::Raw(b"{\"cniVersion\": "), None).expect_error(6);
    let mut future = conf(run, json!({}));
    future["cniVersion"] = json!("9.9.9");
    run_plugin(PLUGIN, &del, Stdin::Json(&future), None).expect_error(1);
    // CHECK with prevResult: success, no output; without: error 7.
    let check = cni_env("CHECK", "c1", "/var/run/netns/x", "");
    let out = run_plugin(PLUGIN, &check, Stdin::Json(&conf(run, json!({}))), None);
    assert!(out.success && out.stdout.is_empty(), "{out:?}");
    run_plugin(PLUGIN, &check, Stdin::Json(&c), None).expect_error(7);
    // VERSION.
    let out = run_plugin(
        PLUGIN,
        &[("CNI_COMMAND", "VERSION".into())],
        Stdin::Json(&json!({"cniVersion": "1.0.0"})),
        None,
    );
    assert!(out.success);
    let v = out.json();
    let versions: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    for want in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&want), "{versions:?}");
    }
    // STATUS and GC (1.1.0).
    let mut c11 = conf(run, json!({}));
    c11["cniVersion"] = json!("1.1.0");
    for cmd in ["STATUS", "GC"] {
        let out = run_plugin(
            PLUGIN,
            &[
                ("CNI_COMMAND", cmd.into()),
                ("CNI_PATH", "/usr/lib/cni".into()),
            ],
            Stdin::Json(&c11),
            None,
        );
        assert!(out.success && out.stdout.is_empty(), "{cmd}: {out:?}");
        let out = run_plugin(
            PLUGIN,
            &[("CNI_COMMAND", cmd.into())],
            Stdin::Json(&conf(run, json!({}))),
            None,
        );
        out.expect_error(1);
    }
}

#[test]
fn agent_not_accepting_on_its_log_socket_does_not_hang_the_plugin() {
    // An agent that is alive but frozen: its log socket's backlog is full and nobody
    // accepts. The plugin's run logs (the agent is unreachable on its event socket), then
    // forwards those lines: the connect must give up, not wait for an accept.
    use socket2::{Domain, SockAddr, Socket, Type};
    let run_dir = tempfile::tempdir().unwrap();
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    listener
        .bind(&SockAddr::unix(run_dir.path().join("log.sock")).unwrap())
        .unwrap();
    listener.listen(0).unwrap();
    let mut queued = Vec::new();
    loop {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        match s.connect(&SockAddr::unix(run_dir.path().join("log.sock")).unwrap()) {
            Ok(()) => queued.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the log socket's backlog: {e}"),
        }
        assert!(queued.len() < 1000, "backlog never filled");
    }
    add_fails_open_promptly(run_dir.path(), "cannot connect to the node agent");
    drop(queued);
}

/// An ADD of a pod with no kubeconfig to fall back on, against the agent sockets in
/// `run_dir`: it succeeds (fails open), logs `logged`, and returns well before the
/// harness's hang limit.
fn add_fails_open_promptly(run_dir: &Path, logged: &str) {
    let env = cni_env("ADD", "c1", "/var/run/netns/x", &k8s_args("demo", "a", "u"));
    let out = run_plugin(PLUGIN, &env, Stdin::Json(&conf(run_dir, json!({}))), None);
    assert!(out.success, "{out:?}");
    assert!(out.stderr.contains(logged), "{}", out.stderr);
    assert!(
        out.elapsed < Duration::from_secs(15),
        "bounded: {:?}",
        out.elapsed
    );
}

#[test]
fn hung_agent_does_not_hang_the_plugin() {
    // A socket that accepts and never answers: the plugin times out,
    // falls back (no kubeconfig: fail open) and returns.
    let run_dir = tempfile::tempdir().unwrap();
    let listener =
        std::os::unix::net::UnixListener::bind(run_dir.path().join("pluginevent.sock")).unwrap();
    let _hold = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(20));
        drop(conns);
    });
    add_fails_open_promptly(run_dir.path(), "did not answer within");
}
