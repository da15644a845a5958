//! End-to-end harness: simulated network topologies ([`netsim`]) and
//! helpers to find the project's binaries ([`binaries`]).

pub mod binaries;
pub mod netsim;

pub use binaries::bin_path;
