//! `istio-cni`: a chained CNI plugin. It passes the previous plugin's result
//! through and, on ADD of a Kubernetes pod, tells the node agent about it so
//! ambient pods are redirected before they start (see `add.rs`).

mod add;
mod agent_client;
mod cni;
mod commands;
mod config;
mod logging;
mod pod_lookup;

use std::io::Write;

fn main() {
    let out = commands::run(|k| std::env::var(k).ok(), std::io::stdin());
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(if out.success { 0 } else { 1 });
}
