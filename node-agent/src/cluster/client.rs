//! The agent's Kubernetes client: the in-cluster service account (the
//! chart), or `KUBECONFIG` (tests, development).
//!
//! A single-file `KUBECONFIG` is parsed here with `serde_yaml_ng` (the YAML
//! library the installer already uses for the plugin kubeconfig), with
//! relative file references resolved against the file's directory as
//! kubectl does. kube's own loader would pull in a second YAML parser whose
//! code pages alone cost the agent over 1 MB of RSS. Several files
//! (`a:b`), multi-document files, or a file that does not parse this way go
//! to kube's loader unchanged.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Kubernetes client configuration (KUBECONFIG={path}): {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("Kubernetes client (KUBECONFIG or in-cluster service account): {0}")]
    Kube(#[source] kube::Error),
}

/// Resolves `file` against `dir` when relative.
fn absolute(dir: &Path, file: &mut Option<String>) {
    if let Some(f) = file
        && Path::new(f.as_str()).is_relative()
        && let Some(abs) = dir.join(f.as_str()).to_str()
    {
        *f = abs.to_string();
    }
}

/// Parses a one-document kubeconfig; `None` when it needs kube's loader.
pub fn parse_single_kubeconfig(text: &str, dir: &Path) -> Option<Kubeconfig> {
    if text.lines().any(|l| l.trim_end() == "---") {
        return None;
    }
    let mut kc: Kubeconfig = serde_yaml_ng::from_str(text).ok()?;
    for c in kc.clusters.iter_mut().filter_map(|c| c.cluster.as_mut()) {
        absolute(dir, &mut c.certificate_authority);
    }
    for a in kc
        .auth_infos
        .iter_mut()
        .filter_map(|a| a.auth_info.as_mut())
    {
        absolute(dir, &mut a.client_certificate);
        absolute(dir, &mut a.client_key);
        absolute(dir, &mut a.token_file);
    }
    Some(kc)
}

/// The client for this process' environment.
pub async fn client_from_env() -> Result<kube::Client, ClientError> {
    if let Some(path) = std::env::var("KUBECONFIG").ok().filter(|p| !p.is_empty())
        && !path.contains(':')
    {
        let text = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| ClientError::Kubeconfig {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let dir = Path::new(&path).parent().unwrap_or(Path::new("."));
        if let Some(kc) = parse_single_kubeconfig(&text, dir) {
            let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| ClientError::Kubeconfig {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            return kube::Client::try_from(cfg).map_err(ClientError::Kube);
        }
    }
    kube::Client::try_default().await.map_err(ClientError::Kube)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_file_with_relative_references() {
        let text = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443\n    certificate-authority: ca.crt\nusers:\n- name: u\n  user:\n    tokenFile: /abs/token\n    client-key: keys/k.pem\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n";
        let kc = parse_single_kubeconfig(text, Path::new("/etc/kube")).unwrap();
        let c = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(c.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(c.certificate_authority.as_deref(), Some("/etc/kube/ca.crt"));
        let a = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(a.token_file.as_deref(), Some("/abs/token"));
        assert_eq!(a.client_key.as_deref(), Some("/etc/kube/keys/k.pem"));
        assert_eq!(kc.current_context.as_deref(), Some("x"));
    }

    #[test]
    fn multi_document_files_go_to_kube() {
        assert!(parse_single_kubeconfig("a: 1\n---\nb: 2\n", Path::new("/")).is_none());
        assert!(parse_single_kubeconfig(": not yaml [", Path::new("/")).is_none());
    }

    #[tokio::test]
    async fn a_parsed_kubeconfig_makes_a_client() {
        let text = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n    namespace: ns1\nusers:\n- name: u\n  user: {}\ncurrent-context: x\n";
        let kc = parse_single_kubeconfig(text, Path::new("/")).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        assert_eq!(cfg.cluster_url.to_string(), "http://127.0.0.1:1/");
        assert_eq!(cfg.default_namespace, "ns1");
        assert!(kube::Client::try_from(cfg).is_ok());
    }
}
