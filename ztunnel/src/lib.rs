//! ztunnel library.
pub mod policy;
