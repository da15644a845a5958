//! Identities named in the configuration: the workload a proxy serves and the node-proxy
//! accounts the CA trusts.

use std::str::FromStr;

/// The workload a proxy serves: `namespace/name/serviceaccount` (`PROXY_WORKLOAD_INFO`, or
/// ZDS `WorkloadInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

impl FromStr for WorkloadInfo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split('/').collect::<Vec<_>>().as_slice() {
            [ns, name, sa] if !ns.is_empty() && !name.is_empty() && !sa.is_empty() => {
                Ok(WorkloadInfo {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err("expected namespace/name/serviceaccount".to_string()),
        }
    }
}

/// A `namespace/serviceaccount` whose pods are node proxies: they hold the certificates of
/// the workloads on their own node (`CA_TRUSTED_NODE_ACCOUNTS`, the CA's setting of the same
/// name and meaning).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct NodeProxyAccount {
    pub namespace: String,
    pub service_account: String,
}

impl FromStr for NodeProxyAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().split('/').collect::<Vec<_>>().as_slice() {
            [ns, sa] if !ns.is_empty() && !sa.is_empty() => Ok(NodeProxyAccount {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => Err(format!("{s:?}: expected namespace/serviceaccount")),
        }
    }
}

impl std::fmt::Display for WorkloadInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.namespace, self.name, self.service_account
        )
    }
}
