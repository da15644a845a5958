//! `node-agent`: the node agent (default, or `node-agent run`) and the built-in CA
//! (`node-agent ca`). Configuration comes from the environment (ARCHITECTURE.md).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "node-agent",
    version,
    about = "Ambient mesh node agent and built-in CA"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (the default): CNI install, Kubernetes control loop, redirection.
    Run,
    /// Run the built-in CA (Istio CreateCertificate API over TLS).
    Ca,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes when the output is a file or a pipe (container logs).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.trim() == "json") {
        // istio-cni's JSON keys (Istio's Go logger), so its log pipelines read ours.
        builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(mesh_logging::IstioJson::istio_go(node_agent::log_scope))
            .init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let cfg = node_agent::config::AgentConfig::from_env()?;
            node_agent::app::run(cfg).await?;
            Ok(())
        }
        Command::Ca => {
            let cfg = node_agent::ca::CaConfig::from_env()?;
            node_agent::ca::run(cfg).await?;
            Ok(())
        }
    }
}
