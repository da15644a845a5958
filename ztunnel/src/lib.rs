//! ztunnel library.
pub mod config;
pub mod identity;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod policy;
pub mod inpod;
