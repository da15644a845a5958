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
//! - [`proxies`]: [`EngineWorkloadProxies`], the [`WorkloadProxyManager`]
//!   over the proxy engine.
//!
//! Wiring (in `app`, `PROXY_MODE=shared`, `INPOD_ENABLED=true`): see
//! [`service::InpodService`]: `InpodService::new(&cfg, proxy_factory)?`,
//! its `readiness()` into `/healthz/ready`, and `run(shutdown)` on the
//! data-plane runtime (drains the workload proxies when it returns).

pub mod client;
pub mod netns;
pub mod protocol;
pub mod proxies;
pub mod service;
pub mod socket_factory;
pub mod state;

pub use client::{Backoff, InpodClient, InpodClientConfig};
pub use netns::{InpodNetns, NetnsExecutor};
pub use proxies::EngineWorkloadProxies;
pub use service::{InpodService, InpodStartError};
pub use socket_factory::InpodSocketFactory;
pub use state::{StartError, WorkloadProxyManager, WorkloadState};
