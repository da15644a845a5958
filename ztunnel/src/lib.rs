//! ztunnel library.
pub mod identity;
pub mod tls;
pub mod policy;
