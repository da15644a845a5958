//! Wire formats and rules shared by two programs of the project, defined once:
//! - [`zds`]: node agent <-> ztunnel workload hand-off (protobuf over SOCK_SEQPACKET);
//! - [`ca`]: the Istio certificate service (gRPC), spoken by ztunnel and the built-in CA;
//! - [`xds`], [`workload`], [`security`]: the delta xDS stream istiod serves ambient
//!   ztunnels and its two resource types, spoken by ztunnel and the e2e control-plane
//!   double;
//! - [`cni_event`]: the CNI plugin -> node agent pod event (JSON over a Unix socket);
//! - [`plugin_log`]: the CNI plugin's log lines, forwarded to the node agent;
//! - [`enablement`]: which pods are ambient (exclusions, then upstream's enablement
//!   selectors over pod and namespace labels), decided alike by the node agent and by
//!   the CNI plugin's fallback; [`label_selector`]: Kubernetes label selectors.

/// ZDS messages (`istio.workload.zds`).
pub mod zds {
    tonic::include_proto!("istio.workload.zds");
}

/// Istio CA API (`istio.v1.auth`).
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// Envoy's delta aggregated discovery service (`envoy.service.discovery.v3`).
pub mod xds {
    tonic::include_proto!("envoy.service.discovery.v3");

    /// Type URL of workloads and services.
    pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
    /// Type URL of L4 authorization policies.
    pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
}

/// Workloads and services as istiod sends them (`istio.workload`).
pub mod workload {
    tonic::include_proto!("istio.workload");
}

/// L4 authorization policies as istiod sends them (`istio.security`).
pub mod security {
    tonic::include_proto!("istio.security");
}

pub mod cni_event;
pub mod enablement;
pub mod label_selector;
pub mod plugin_log;
