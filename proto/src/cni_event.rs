//! The pod event the CNI plugin sends to the node agent on ADD.
//!
//! Transport: HTTP/1.1 `POST /cmdadd` over the Unix socket
//! `<cni_agent_run_dir>/pluginevent.sock` (default `/var/run/istio-cni`).
//! The JSON keys of [`CmdAddEvent`] match upstream istio-cni (`Netns`,
//! `PodName`, `PodNamespace`, `IPs`), plus `PodUID`, which upstream omits and
//! we send so the agent never has to guess which incarnation of a pod it is.
//! The agent answers `200` with a [`CmdAddReply`] body, or a non-2xx status
//! whose body is a human-readable reason (the plugin puts it in its CNI error).
//! Which non-2xx status says what the plugin does next:
//! [`STATUS_ENROLMENT_FAILED`] (the pod is ambient and could not be enrolled:
//! ADD fails) or [`STATUS_UNDECIDED`] (the agent cannot decide now: the plugin
//! looks the pod up itself, so pods outside the mesh still start).

use serde::{Deserialize, Serialize};

/// Path of the plugin-event endpoint on the agent's Unix socket.
pub const CMD_ADD_PATH: &str = "/cmdadd";
/// File name of the agent's plugin-event socket inside the run dir.
pub const PLUGIN_EVENT_SOCKET: &str = "pluginevent.sock";
/// Default run dir shared by the plugin and the agent.
pub const DEFAULT_AGENT_RUN_DIR: &str = "/var/run/istio-cni";

/// Answer status: the agent decided the pod is ambient and could not enrol it
/// (no ztunnel on the node, redirection failed). The plugin fails ADD; the
/// runtime retries the sandbox.
pub const STATUS_ENROLMENT_FAILED: u16 = 500;
/// Answer status: the agent cannot decide now (still starting, its own API
/// lookup failed, the decision took too long). The plugin decides from the API
/// itself. Any other non-2xx status is read the same way.
pub const STATUS_UNDECIDED: u16 = 503;

/// One address from the previous plugin's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    /// Index into the result's `interfaces`, if the previous plugin said.
    #[serde(rename = "Interface", default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<u32>,
    /// CIDR form, e.g. `10.244.1.5/24`.
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Gateway", default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// ADD of a Kubernetes pod, as seen by the CNI plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmdAddEvent {
    /// `CNI_NETNS`, the path of the pod's network namespace.
    #[serde(rename = "Netns")]
    pub netns: String,
    #[serde(rename = "PodName")]
    pub pod_name: String,
    #[serde(rename = "PodNamespace")]
    pub pod_namespace: String,
    /// `K8S_POD_UID` from `CNI_ARGS`, when the runtime passed it.
    #[serde(rename = "PodUID", default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(rename = "IPs", default)]
    pub ips: Vec<PodIp>,
}

/// What the agent decided about the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Enrolment {
    /// The pod is in the mesh and its traffic is redirected.
    Enrolled,
    /// The pod is not selected for the mesh; nothing was changed.
    NotAmbient,
}

/// Body of a `200` answer to [`CmdAddEvent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmdAddReply {
    pub enrolment: Enrolment,
    /// Why, in words an operator understands (logged by the plugin).
    #[serde(default)]
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_uses_upstream_json_keys() {
        let ev = CmdAddEvent {
            netns: "/var/run/netns/cni-1".into(),
            pod_name: "a".into(),
            pod_namespace: "demo".into(),
            pod_uid: Some("u1".into()),
            ips: vec![PodIp {
                interface: Some(0),
                address: "10.0.0.5/24".into(),
                gateway: None,
            }],
        };
        let v: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["Netns"], "/var/run/netns/cni-1");
        assert_eq!(v["PodName"], "a");
        assert_eq!(v["PodNamespace"], "demo");
        assert_eq!(v["PodUID"], "u1");
        assert_eq!(v["IPs"][0]["Address"], "10.0.0.5/24");
        assert_eq!(v["IPs"][0]["Interface"], 0);
        // upstream's plugin omits PodUID: still accepted
        let up: CmdAddEvent = serde_json::from_str(
            r#"{"Netns":"/n","PodName":"p","PodNamespace":"ns","IPs":[{"Address":"10.1.1.1/32"}]}"#,
        )
        .unwrap();
        assert_eq!(up.pod_uid, None);
    }
}
