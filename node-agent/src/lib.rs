//! Node agent library: installs the CNI plugin, watches Kubernetes, and
//! redirects enrolled pods' traffic into ztunnel (in-pod or GENEVE mode).

pub mod redirect;
pub mod zds;
pub mod health;
pub mod install;
pub mod plugin_events;
pub mod ca;
pub mod config;
pub mod cluster;
pub mod metrics;
pub mod reconcile;
pub mod app;
pub mod memory;
