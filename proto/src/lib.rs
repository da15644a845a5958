//! Wire formats shared by two programs of the project, defined once:
//! - [`zds`]: node agent <-> ztunnel workload hand-off (protobuf over SOCK_SEQPACKET);
//! - [`ca`]: the Istio certificate service (gRPC), spoken by ztunnel and the built-in CA;
//! - [`cni_event`]: the CNI plugin -> node agent pod event (JSON over a Unix socket).

/// ZDS messages (`istio.workload.zds`).
pub mod zds {
    tonic::include_proto!("istio.workload.zds");
}

/// Istio CA API (`istio.v1.auth`).
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

pub mod cni_event;
