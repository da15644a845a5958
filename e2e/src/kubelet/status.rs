//! Pod status as the kubelet reports it (`pods/status` merge patches).

use std::net::IpAddr;

use serde_json::{Value, json};

/// The state of one container, for the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub name: String,
    pub image: String,
    pub running: bool,
    pub ready: bool,
    pub restarts: u32,
    /// RFC 3339 start time of the current run.
    pub started_at: Option<String>,
    /// Why it is waiting (e.g. `ContainerCreating`), when not running.
    pub waiting_reason: Option<String>,
    /// Exit code of the last run, when it ended and is not restarted.
    pub exit_code: Option<i32>,
}

/// Everything the kubelet reports about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatusReport {
    /// `Pending`, `Running`.
    pub phase: &'static str,
    pub pod_ip: Option<IpAddr>,
    pub host_ip: IpAddr,
    pub start_time: String,
    /// Sandbox ready (network set up).
    pub sandbox_ready: bool,
    /// Why the sandbox is not ready (last CNI error), if it is not.
    pub sandbox_message: Option<String>,
    pub containers: Vec<ContainerState>,
}

impl PodStatusReport {
    /// All containers ready (and there is at least one).
    pub fn ready(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(|c| c.ready)
    }

    /// The `status` object (for a merge patch of `pods/status`; lists are
    /// replaced whole).
    pub fn to_status(&self, now: &str) -> Value {
        let cond = |t: &str, ok: bool, reason: Option<&str>, msg: Option<&str>| {
            let mut c = json!({
                "type": t,
                "status": if ok { "True" } else { "False" },
                "lastProbeTime": null,
                "lastTransitionTime": now,
            });
            if let Some(r) = reason {
                c["reason"] = json!(r);
            }
            if let Some(m) = msg {
                c["message"] = json!(m);
            }
            c
        };
        let ready = self.ready();
        let not_ready: Vec<&str> = self
            .containers
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.as_str())
            .collect();
        let nr_msg =
            (!ready).then(|| format!("containers with unready status: [{}]", not_ready.join(" ")));
        let conditions = vec![
            cond(
                "PodReadyToStartContainers",
                self.sandbox_ready,
                (!self.sandbox_ready).then_some("FailedCreatePodSandBox"),
                self.sandbox_message.as_deref(),
            ),
            cond("Initialized", true, None, None),
            cond(
                "Ready",
                ready,
                (!ready).then_some("ContainersNotReady"),
                nr_msg.as_deref(),
            ),
            cond(
                "ContainersReady",
                ready,
                (!ready).then_some("ContainersNotReady"),
                nr_msg.as_deref(),
            ),
            cond("PodScheduled", true, None, None),
        ];
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let state = if c.running {
                    json!({"running": {"startedAt": c.started_at.clone().unwrap_or_else(|| now.to_string())}})
                } else if let Some(code) = c.exit_code {
                    json!({"terminated": {"exitCode": code,
                                          "reason": if code == 0 { "Completed" } else { "Error" }}})
                } else {
                    json!({"waiting": {"reason": c.waiting_reason.clone().unwrap_or_else(|| "ContainerCreating".into())}})
                };
                json!({
                    "name": c.name,
                    "image": c.image,
                    "imageID": "",
                    "ready": c.ready,
                    "started": c.running,
                    "restartCount": c.restarts,
                    "state": state,
                })
            })
            .collect();
        let mut s = json!({
            "phase": self.phase,
            "hostIP": self.host_ip.to_string(),
            "hostIPs": [{"ip": self.host_ip.to_string()}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        });
        if let Some(ip) = self.pod_ip {
            s["podIP"] = json!(ip.to_string());
            s["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        s
    }
}

/// Now as RFC 3339 (seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ready: bool) -> PodStatusReport {
        PodStatusReport {
            phase: "Running",
            pod_ip: Some("10.244.1.5".parse().unwrap()),
            host_ip: "172.30.0.11".parse().unwrap(),
            start_time: "2026-01-01T00:00:00Z".into(),
            sandbox_ready: true,
            sandbox_message: None,
            containers: vec![ContainerState {
                name: "app".into(),
                image: "e2e/workload".into(),
                running: true,
                ready,
                restarts: 2,
                started_at: Some("2026-01-01T00:00:01Z".into()),
                waiting_reason: None,
                exit_code: None,
            }],
        }
    }

    #[test]
    fn ready_pod_status() {
        let s = report(true).to_status("t");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "10.244.1.5");
        assert_eq!(s["podIPs"][0]["ip"], "10.244.1.5");
        assert_eq!(s["hostIP"], "172.30.0.11");
        let ready = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        assert_eq!(s["containerStatuses"][0]["restartCount"], 2);
        assert!(s["containerStatuses"][0]["state"]["running"].is_object());
    }

    #[test]
    fn unready_and_pending_pods() {
        let s = report(false).to_status("t");
        let ready = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "False");
        assert!(ready["message"].as_str().unwrap().contains("app"));
        let mut p = report(false);
        p.phase = "Pending";
        p.pod_ip = None;
        p.sandbox_ready = false;
        p.sandbox_message = Some("CNI ADD failed: no ztunnel".into());
        p.containers[0].running = false;
        let s = p.to_status("t");
        assert!(s.get("podIP").is_none());
        let sb = &s["conditions"][0];
        assert_eq!(sb["type"], "PodReadyToStartContainers");
        assert_eq!(sb["status"], "False");
        assert_eq!(sb["message"], "CNI ADD failed: no ztunnel");
        assert_eq!(
            s["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
    }
}
