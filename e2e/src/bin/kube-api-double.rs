//! `kube-api-double`: a TEST DOUBLE of the Kubernetes API server for local
//! end-to-end tests — not a product. See `e2e::apiserver`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use e2e::apiserver::{ApiServer, ApiServerHandle, TokenSigner, TokenSpec, write_kubeconfig_for};

const ABOUT: &str = "A TEST DOUBLE of the Kubernetes API server (not a product).

In-memory, plain HTTP, no authentication or authorization. Serves enough of the
Kubernetes REST API (discovery, namespaces, pods, services, endpointslices,
serviceaccounts + tokens, nodes, configmaps, secrets, events, daemonsets,
AuthorizationPolicy, TokenReview; list/watch/get/create/update/patch/delete)
for kubectl and kube-rs clients in the project's end-to-end tests.";

#[derive(Parser)]
#[command(name = "kube-api-double", version, about = ABOUT, long_about = ABOUT, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve(ServeArgs),
    /// Print a service-account token signed with the key in
    /// --signing-key-file (as a server started with that file signs them),
    /// with any expiry, e.g. an expired one for tests.
    MintToken(MintArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on (repeatable); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: Vec<SocketAddr>,
    /// Write a kubeconfig for the first address here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Hex HMAC key for tokens; created with a random key if missing.
    #[arg(long)]
    signing_key_file: Option<PathBuf>,
    /// Change events retained for watches (older resourceVersions get 410).
    #[arg(long, default_value_t = 10_000)]
    event_window: usize,
    /// Interval of watch bookmarks (e.g. 5s).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    bookmark_interval: Duration,
    /// Do not serve security.istio.io AuthorizationPolicy (CRD "not installed").
    #[arg(long)]
    no_authorization_policy_crd: bool,
}

#[derive(Args)]
struct MintArgs {
    #[arg(long)]
    signing_key_file: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    service_account: String,
    /// UID of the service account (checked by TokenReview when given).
    #[arg(long)]
    service_account_uid: Option<String>,
    /// Audience (repeatable; none = the API server audience).
    #[arg(long)]
    audience: Vec<String>,
    /// Lifetime in seconds from now; negative for an expired token.
    #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
    expires_in: i64,
    /// Bind to a pod: name and uid.
    #[arg(long, requires = "pod_uid")]
    pod_name: Option<String>,
    #[arg(long, requires = "pod_name")]
    pod_uid: Option<String>,
}

fn load_or_create_key(path: &PathBuf) -> Result<TokenSigner> {
    match std::fs::read_to_string(path) {
        Ok(s) => TokenSigner::from_hex(&s)
            .map_err(|e| anyhow::anyhow!("signing key file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = TokenSigner::random();
            std::fs::write(path, s.key_hex())
                .with_context(|| format!("writing signing key file {}", path.display()))?;
            Ok(s)
        }
        Err(e) => Err(e).with_context(|| format!("reading signing key file {}", path.display())),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut server = ApiServer::default()
        .event_window(args.event_window)
        .bookmark_interval(args.bookmark_interval);
    for a in &args.listen {
        server = server.listen(*a);
    }
    if let Some(k) = &args.signing_key_file {
        server = server.signer(load_or_create_key(k)?);
    }
    if args.no_authorization_policy_crd {
        server = server.without_authorization_policy_crd();
    }
    let handle: ApiServerHandle = server.run()?;
    if let Some(path) = &args.kubeconfig_out {
        write_kubeconfig_for(path, &handle.url())?;
    }
    for a in handle.addrs() {
        println!("kube-api-double (a test double, not a product) listening on http://{a}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    drop(handle);
    Ok(())
}

fn mint(args: MintArgs) -> Result<()> {
    let key = std::fs::read_to_string(&args.signing_key_file).with_context(|| {
        format!(
            "reading signing key file {}",
            args.signing_key_file.display()
        )
    })?;
    let signer = TokenSigner::from_hex(&key).map_err(|e| {
        anyhow::anyhow!("signing key file {}: {e}", args.signing_key_file.display())
    })?;
    let now = std::time::SystemTime::now();
    let expires = if args.expires_in >= 0 {
        now + Duration::from_secs(args.expires_in as u64)
    } else {
        now - Duration::from_secs(args.expires_in.unsigned_abs())
    };
    let spec = TokenSpec {
        namespace: args.namespace,
        service_account: args.service_account,
        service_account_uid: args.service_account_uid,
        audiences: args.audience,
        expires,
        pod: args.pod_name.zip(args.pod_uid),
        node: None,
    };
    println!("{}", signer.mint(&spec));
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Serve(a)) => serve(a),
        Some(Command::MintToken(a)) => mint(a),
        None => serve(cli.serve),
    }
}
