//! Node agent library: installs the CNI plugin, watches Kubernetes, and
//! redirects enrolled pods' traffic into ztunnel (in-pod or GENEVE mode).

pub mod app;
pub mod ca;
pub mod cluster;
pub mod config;
pub mod health;
pub mod http_endpoint;
pub mod install;
pub mod log_scope;
pub mod memory;
pub mod metrics;
pub mod plugin_events;
pub mod plugin_log;
pub mod reconcile;
pub mod redirect;
pub mod run_dir_socket;
#[cfg(test)]
mod test_support;
pub mod zds;

pub use log_scope::log_scope;
