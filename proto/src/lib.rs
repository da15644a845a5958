//! Wire formats and rules shared by two programs of the project, defined once:
//! - [`zds`]: node agent <-> ztunnel workload hand-off (protobuf over SOCK_SEQPACKET);
//! - [`ca`]: the Istio certificate service (gRPC), spoken by ztunnel and the built-in CA;
//! - [`cni_event`]: the CNI plugin -> node agent pod event (JSON over a Unix socket);
//! - [`enablement`]: which pods are ambient (Istio's labels and annotations), decided
//!   alike by the node agent and by the CNI plugin's fallback.

/// ZDS messages (`istio.workload.zds`).
pub mod zds {
    tonic::include_proto!("istio.workload.zds");
}

/// Istio CA API (`istio.v1.auth`).
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

pub mod cni_event;
pub mod enablement;
