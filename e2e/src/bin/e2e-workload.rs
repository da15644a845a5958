//! `e2e-workload`: the application "containers" of the node-in-a-box
//! harness (echo/bulk server, clients). See `e2e::workloads`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use e2e::workloads::{self, ClientOptions};

#[derive(Parser)]
#[command(
    name = "e2e-workload",
    about = "Test workloads for the e2e harness (echo server, clients)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo (`<POD_NAME> <line>`) and bulk (`BULK <n>`) server.
    Echo {
        #[arg(long, default_value_t = workloads::DEFAULT_PORT)]
        port: u16,
        /// Name in replies (default: $POD_NAME, else the host name).
        #[arg(long, env = "POD_NAME", default_value = "server")]
        name: String,
    },
    /// A request every interval, one log line per attempt.
    Client {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Attempts (0 = forever).
        #[arg(long, default_value_t = 0)]
        count: u64,
        #[arg(long, env = "POD_NAME", default_value = "hello")]
        message: String,
        /// One long-lived connection instead of one per attempt.
        #[arg(long)]
        keep: bool,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Fetch BYTES once and print the throughput.
    Bulk {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 100 << 20)]
        bytes: u64,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Echo { port, name } => {
            workloads::serve(port, &name).with_context(|| format!("echo server on port {port}"))
        }
        Command::Client {
            target,
            interval,
            count,
            message,
            keep,
            timeout,
        } => {
            let failures = workloads::run_client(&ClientOptions {
                target,
                interval,
                count,
                message,
                keep,
                timeout,
            });
            if failures > 0 && count > 0 {
                anyhow::bail!("{failures} of {count} attempts to {target} failed");
            }
            Ok(())
        }
        Command::Bulk {
            target,
            bytes,
            timeout,
        } => workloads::run_bulk_client(target, bytes, timeout)
            .map(|_| ())
            .with_context(|| format!("bulk transfer from {target}")),
    }
}
