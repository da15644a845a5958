//! The ztunnel binary: upstream's command line (`ztunnel`, `ztunnel proxy`, `ztunnel version`,
//! `ztunnel help`); everything else is configured through the environment.

use std::process::ExitCode;

const USAGE: &str = "usage: ztunnel [COMMAND]

commands:
  proxy     run the proxy (the default; configured by environment variables)
  version   print version information
  help      print this list
";

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    match command.as_deref() {
        None | Some("proxy") => proxy(),
        Some("version") => {
            println!(
                "ztunnel {} (HBONE, Istio ambient compatible)",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        Some("help") | Some("--help") | Some("-h") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("ztunnel: unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(1)
        }
    }
}

fn proxy() -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        let cfg = ztunnel::config::Config::from_env()?;
        ztunnel::telemetry::logging::init(cfg.log_format)?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), mode = ?cfg.proxy_mode, "starting ztunnel");
        ztunnel::app::run(cfg)?;
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "ztunnel failed");
            ExitCode::from(1)
        }
    }
}
