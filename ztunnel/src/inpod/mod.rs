//! In-pod mode (`PROXY_MODE=shared`, `INPOD_ENABLED=true`): the node agent
//! hands each enrolled pod's network namespace to ztunnel over ZDS, and
//! ztunnel runs one proxy per pod whose sockets live in that namespace.
//!
//! - [`protocol`]: the ZDS wire (seqpacket datagrams, fd passing, strict
//!   validation);
//! - [`state`]: the workload state machine (snapshot, add/del, pending
//!   retries, readiness) over a [`WorkloadProxyManager`];
//! - [`client`]: the connection loop with backoff;
//! - [`netns`] and [`socket_factory`]: entering a pod netns on a dedicated
//!   thread and creating marked listeners / outbound sockets there.
//!
//! Wiring (in `app`): implement [`WorkloadProxyManager`] with the proxy
//! engine (start = build an [`InpodSocketFactory`] for the netns, bind the
//! three listeners, run the proxy for the workload matched by
//! namespace/name/service account; stop = drain it), then
//! `InpodClient::new(cfg, manager).run(shutdown)` and feed
//! `client.readiness()` into `/healthz/ready`.

pub mod client;
pub mod netns;
pub mod protocol;
pub mod socket_factory;
pub mod state;

pub use client::{Backoff, InpodClient, InpodClientConfig};
pub use netns::{InpodNetns, NetnsExecutor};
pub use socket_factory::InpodSocketFactory;
pub use state::{StartError, WorkloadProxyManager, WorkloadState};
