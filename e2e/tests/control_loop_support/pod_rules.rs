//! What is in a pod's netns: the in-pod rules the agent installed.

use e2e::netsim::NamedNetns;

use super::Env;

impl Env {
    /// `ISTIO` lines of iptables-save in `netns` (both backends, both families), each
    /// prefixed with the tool.
    pub fn istio_rules(netns: &NamedNetns) -> Vec<String> {
        netns.istio_rules()
    }

    /// The in-pod redirection is installed: `ISTIO_OUTPUT` sends to ztunnel's 15001.
    pub fn redirected(netns: &NamedNetns) -> bool {
        Self::istio_rules(netns)
            .iter()
            .any(|l| l.contains("-A ISTIO_OUTPUT") && l.contains("15001"))
    }
}
