//! ZDS server (node agent side): hands enrolled pods' network namespaces to
//! ztunnel over a `SOCK_SEQPACKET` Unix socket. Protocol facts:
//! `shared/reference/zds.md`; messages: `mesh_proto::zds`.
//!
//! API for the control loop: [`ZdsServer`] (`new` → `register` the pods
//! enrolled at start-up → `serve`; then `add_workload` / `del_workload`,
//! `connected`). It implements
//! [`crate::redirect::inpod::WorkloadHandoff`], so it plugs straight into the
//! in-pod redirector.

mod handoff;
pub mod server;
pub mod socket;

pub use server::{DEFAULT_SOCKET, ZdsConfig, ZdsError, ZdsServer};
