//! Simulated network topologies on one Linux host, for tests (root needed).
//!
//! Everything lives in named network namespaces created by this module; the
//! root namespace is never changed beyond creating and removing files under
//! `/run/netns` (and records under `/run/netsim`). Every name carries a
//! per-test prefix, so tests can run concurrently, and everything is removed
//! on drop — and, after a killed run, by [`cleanup_stale`] (called by
//! [`Scope::new`]).
//!
//! # Quick start
//! ```no_run
//! use e2e::netsim::{Cluster, capture_during};
//! use std::time::Duration;
//!
//! let cluster = Cluster::new("mytest", 2)?;           // node1, node2
//! let a = cluster.node(1).add_pod("client")?;         // 10.244.1.200
//! let b = cluster.node(2).add_pod("server")?;         // 10.244.2.200
//! let _srv = b.netns().spawn("iperf3", ["-s"], None)?; // killed on drop
//! a.netns().exec("ping", ["-c1", "-W2", &b.ip().to_string()], Duration::from_secs(5))?;
//! let file = cluster.scope().dir().join("underlay.pcap");
//! let (_, cap) = capture_during(cluster.underlay(), "br0", &file, Some("tcp"), || {
//!     // traffic ...
//! })?;
//! assert!(!cap.contains(b"SECRET"));
//! # Ok::<(), e2e::netsim::NetsimError>(())
//! ```
//!
//! # Pieces
//! - [`Scope`]: unique prefix + clean-up ([`cleanup_stale`]).
//! - [`NamedNetns`]: create/open/remove a named netns; `run` a closure in it
//!   (on a dedicated thread, via the agent's `Netns`); links, addresses,
//!   routes via rtnetlink (`add_veth`, `add_bridge`, `set_controller`,
//!   `link_up`, `add_address`, `add_route`, `links`, ...); sysctls;
//!   processes (`command`, `spawn`, `exec`, `output`).
//! - [`Process`]: kill-on-drop child (whole process group).
//! - [`Cluster`], [`Node`], [`Pod`]: nodes on an underlay, static pods on a
//!   node's `cni0` bridge; [`Node::cni_conflist`] for the real CNI chain.
//! - [`Capture`], [`capture_during`], [`CaptureReport`]: tcpdump + pcap
//!   reading.
//!
//! Calls block; from async code use `tokio::task::spawn_blocking` (or
//! [`NamedNetns::run_async`]).

mod capture;
mod cluster;
mod error;
mod namespace;
mod netlink;
mod pcap;
mod ping;
mod process;
mod scope;

pub use capture::{Capture, capture_during};
pub use cluster::{Cluster, ClusterConfig, NODE_IFACE, Node, POD_IFACE, Pod};
pub use error::{NetsimEnterError, NetsimError, Result};
pub use namespace::{NETNS_RUN_DIR, NamedNetns};
pub use netlink::LinkInfo;
pub use pcap::{CaptureReport, Packet, PcapError, Transport};
pub use process::{OWNER_ENV, Process, describe_failure, output_with_timeout};
pub use scope::{KEEP_ENV, REGISTRY_DIR, Scope, StaleReport, cleanup_stale};

/// True when this process can create network namespaces (root). Tests that
/// need it print a reason and return early otherwise.
pub fn can_create_netns() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `None` when the kernel can create GENEVE devices, probed by creating
/// (and deleting) one in `ns`; otherwise why not, for a test's skip
/// message. `None` too when the probe itself cannot run.
pub fn geneve_unsupported(ns: &NamedNetns) -> Option<String> {
    let timeout = std::time::Duration::from_secs(10);
    let out = ns
        .output(
            "ip",
            [
                "link",
                "add",
                "gvchk",
                "type",
                "geneve",
                "id",
                "1",
                "remote",
                "192.0.2.1",
            ],
            timeout,
        )
        .ok()?;
    if out.status.success() {
        let _ = ns.output("ip", ["link", "del", "gvchk"], timeout);
        return None;
    }
    Some(format!(
        "this kernel cannot create GENEVE devices ({}); run scripts/vm-tests.sh",
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}
