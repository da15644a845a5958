//! The agent's view of Kubernetes: watchers for Namespaces and this node's
//! Pods ([`watch`]) feeding an informer cache of small extracts ([`cache`],
//! [`pod`]), the enablement rules as one pure function ([`enablement`], from
//! `mesh-proto`, shared with the CNI plugin's fallback), and
//! the direct API calls of the control loop ([`api`]: GETs on cache misses,
//! the `pods/status` annotation patch, the DaemonSet check at shutdown),
//! the client itself ([`client`]) and slim object types ([`resources`]).
//!
//! Nothing here decides what to do about a pod; `reconcile` does.

pub mod api;
pub mod cache;
pub mod client;
pub mod pod;
pub mod resources;
#[cfg(test)]
mod stub_server;
pub mod watch;

pub use api::{ApiError, ClusterApi, KubeApi};
pub use cache::{Change, ClusterCache};
pub use enablement::{Decision, EnablementConfig};
pub use mesh_proto::enablement;
pub use pod::{NamespaceInfo, PodInfo, PodPhase};
