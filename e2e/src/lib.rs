//! End-to-end harness: a Kubernetes API test double ([`apiserver`]),
//! simulated network topologies ([`netsim`]) and helpers to find the
//! project's binaries ([`binaries`]).

pub mod apiserver;
pub mod binaries;
pub mod dedicated_mesh;
pub mod dns_probe;
pub mod http;
pub mod inpod_agent;
pub mod istio_ztunnel;
pub mod kubelet;
pub mod local_ztunnel;
pub mod netsim;
pub mod ports;
pub mod prom_text;
pub mod simcluster;
pub mod workloads;
pub mod xds_server;

pub use binaries::bin_path;
pub use ports::free_port;
