//! ztunnel library.
pub mod identity;
pub mod policy;
