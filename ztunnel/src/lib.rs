//! ztunnel library.
pub mod admin;
pub mod app;
pub mod config;
pub mod file_watch;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod policy;
pub mod process_memory;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod test_logs;
pub mod tls;
