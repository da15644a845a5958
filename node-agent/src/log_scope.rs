//! The `scope` of a JSON log line (`LOG_FORMAT=json`, istio-cni's keys): the agent's
//! module an event comes from (`install`, `redirect`, `reconcile`, `zds`, `ca`, ...),
//! `cni-agent` for the agent itself, the crate name for libraries (`kube_client`, ...).

/// Scope of an event with tracing target `target`.
pub fn log_scope(target: &str) -> String {
    let mut parts = target.split("::");
    match (parts.next(), parts.next()) {
        (Some("node_agent"), Some(module)) => module.to_string(),
        (Some("node_agent"), None) => "cni-agent".to_string(),
        // The CNI plugin's lines, relayed (`plugin_log`): upstream's scope name.
        (Some("cni_plugin"), None) => "cni-plugin".to_string(),
        (Some(krate), _) => krate.to_string(),
        (None, _) => "cni-agent".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_name_the_module() {
        assert_eq!(log_scope("node_agent::install::chain"), "install");
        assert_eq!(log_scope("node_agent::redirect::inpod::rules"), "redirect");
        assert_eq!(log_scope("node_agent"), "cni-agent");
        assert_eq!(log_scope("kube_client::client"), "kube_client");
        // `plugin_log::TARGET`, the relayed CNI plugin lines.
        assert_eq!(log_scope("cni_plugin"), "cni-plugin");
    }
}
