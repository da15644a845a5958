//! Wiring of the node agent (`node-agent` with no subcommand).
//!
//! Start-up, in order:
//! 1. `/readyz` (`READY_PORT`) and `/metrics` (`METRICS_PORT`) listen, so
//!    the liveness probe passes from the start. Readiness components:
//!    `cni-install` (plugin binary + config entry valid), `kubernetes`
//!    (informers synced and start-up reconcile done), `ztunnel` (a ztunnel
//!    can take pods: connected over ZDS in in-pod mode, the active ztunnel
//!    pod's tunnels built in GENEVE mode). The agent is therefore not Ready
//!    while it would refuse ambient pods' CNI ADDs for lack of a ztunnel.
//! 2. The plugin-event socket is bound (handlers wait for step 6), then the
//!    installer starts (binary, config chaining, repair loop).
//! 3. The redirector of `REDIRECT_MODE` is built (in-pod: host probe SNAT;
//!    GENEVE: netlink in the node netns).
//! 4. Watchers on Namespaces and this node's Pods fill the cache; the agent
//!    waits for their first full list.
//! 5. Start-up reconcile ([`Reconciler::startup`]); in-pod mode then starts
//!    serving ZDS, so the first ztunnel gets a complete snapshot.
//! 6. Queue workers and the ztunnel follower run until SIGTERM/SIGINT;
//!    the start-up code's pages are released ([`crate::memory`]).
//!
//! Shutdown: stop taking CNI ADDs and watcher work; GET DaemonSet
//! `node-agent` in `POD_NAMESPACE`: still there (or unknown) = upgrade,
//! leave plugin, config and every pod's redirection in place (ztunnel keeps
//! its proxies; new ambient pods fail closed until the next agent answers);
//! gone = uninstall: remove the plugin and config entry, all redirection
//! and the pods' annotations.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};

use crate::cluster::api::{ClusterApi, DaemonSetState, KubeApi};
use crate::cluster::cache::{Change, ClusterCache};
use crate::cluster::watch::Watchers;
use crate::config::{AgentConfig, RedirectMode};
use crate::health::{self, Readiness};
use crate::http_endpoint;
use crate::install::{self, Installer};
use crate::metrics::{self, AgentMetrics};
use crate::plugin_events::{DEFAULT_HANDLER_TIMEOUT, PluginEventListener};
use crate::plugin_log::{self, PluginLogListener};
use crate::reconcile::cni_add::CniAddHandler;
use crate::reconcile::pod_netns::{NetnsPaths, NetnsResolver, POD_NETNS_DIR};
use crate::reconcile::{ReconcileConfig, Reconciler, ztunnel};
use crate::redirect::Redirector;
use crate::redirect::geneve::{GeneveConfig, GeneveRedirector, SysctlRoot, sysctl_journal};
use crate::redirect::inpod::{InpodConfig, InpodRedirector};
use crate::zds::{ZdsConfig, ZdsServer};

/// Readiness component: informers synced and start-up reconcile done.
pub const READY_KUBERNETES: &str = "kubernetes";

/// How long the shutdown's DaemonSet GET may take (upgrade or uninstall):
/// well inside the chart's 30 s grace period, after the workers' 10 s.
const DAEMONSET_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Start-up failures; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Kube(#[from] crate::cluster::client::ClientError),
    #[error("cannot listen on {var} {addr}: {source}")]
    Bind {
        var: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    RunDirSocket(#[from] crate::run_dir_socket::RunDirSocketError),
    #[error(transparent)]
    PodNetns(#[from] crate::reconcile::pod_netns::PodNetnsError),
    #[error("in-pod redirection: {0}")]
    Inpod(#[source] crate::redirect::RedirectError),
    #[error("GENEVE redirection: {0}")]
    Geneve(#[source] crate::redirect::geneve::GeneveError),
    #[error(transparent)]
    Zds(#[from] crate::zds::ZdsError),
    #[error("{what}: {reason}")]
    Task { what: &'static str, reason: String },
}

/// Runs the agent until SIGTERM/SIGINT (Kubernetes client from `KUBECONFIG`
/// or the in-cluster service account).
pub async fn run(cfg: AgentConfig) -> Result<(), AppError> {
    crate::memory::limit_malloc_arenas();
    let client = crate::cluster::client::client_from_env().await?;
    run_with(cfg, client, shutdown_signal()).await
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; running until killed");
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Listens on `addr` (the IPv6 wildcard falls back to IPv4 on a node without
/// IPv6: [`http_endpoint::bind`]); errors name the setting.
async fn bind(var: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    http_endpoint::bind(addr).await.map_err(|e| AppError::Bind {
        var,
        addr: e.addr,
        source: e.source,
    })
}

/// A shutdown broadcast: `fire` once, `wait()` futures resolve.
#[derive(Clone)]
struct Stop(watch::Sender<bool>);

impl Stop {
    fn new() -> Self {
        Self(watch::channel(false).0)
    }
    fn fire(&self) {
        self.0.send_replace(true);
    }
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}

/// The mode's redirector, plus what the app needs of it besides the trait.
enum Mode {
    Inpod { zds: ZdsServer },
    Geneve { geneve: Arc<GeneveRedirector> },
}

async fn build_redirector(cfg: &AgentConfig) -> Result<(Arc<dyn Redirector>, Mode), AppError> {
    match cfg.redirect_mode {
        RedirectMode::Inpod => {
            let zds = ZdsServer::new(ZdsConfig {
                socket_path: cfg.ztunnel_uds.clone(),
                ..ZdsConfig::default()
            });
            let inpod = InpodRedirector::new(
                InpodConfig {
                    rules: cfg.rule_config(),
                    dns_capture: cfg.dns_capture,
                    ipv6: cfg.ipv6,
                    reconcile_rules_on_startup: cfg.reconcile_rules_on_startup,
                    host_netns: None,
                    backend: None,
                    nftables: cfg.native_nftables,
                    proc_root: cfg.host_proc_dir.clone(),
                },
                Arc::new(zds.clone()),
            )
            .await
            .map_err(AppError::Inpod)?;
            Ok((Arc::new(inpod), Mode::Inpod { zds }))
        }
        RedirectMode::Geneve => {
            let geneve = Arc::new(
                GeneveRedirector::new(GeneveConfig {
                    dns_capture: cfg.dns_capture,
                    sysctls: SysctlRoot::under_proc(&cfg.host_proc_dir)
                        .with_journal(cfg.run_dir.join(sysctl_journal::JOURNAL_FILE)),
                    ..GeneveConfig::default()
                })
                .await
                .map_err(AppError::Geneve)?,
            );
            Ok((geneve.clone(), Mode::Geneve { geneve }))
        }
    }
}

/// Runs the agent with `client` until `shutdown` completes (see the module
/// docs).
pub async fn run_with(
    cfg: AgentConfig,
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    tracing::info!(
        node = %cfg.node_name,
        mode = cfg.redirect_mode.as_str(),
        run_dir = %cfg.run_dir.display(),
        "node agent starting"
    );
    tracing::info!(
        default = cfg.enablement_selectors.is_default(),
        selectors = %cfg.enablement_selectors.to_json(),
        "ambient enablement selectors"
    );
    let metrics = AgentMetrics::new();
    let readiness = Readiness::new();
    let install_flag = readiness.register(install::READY_COMPONENT);
    let kube_flag = readiness.register(READY_KUBERNETES);
    let ztunnel_flag = readiness.register(ztunnel::READY_COMPONENT);
    kube_flag.set_not_ready("waiting for the API server (namespaces and this node's pods)");

    // 1. health and metrics
    let servers_stop = Stop::new();
    let ready_listener = bind("READY_PORT", cfg.ready_addr).await?;
    let metrics_listener = bind("METRICS_PORT", cfg.metrics_addr).await?;
    let health_task = tokio::spawn(health::serve(
        ready_listener,
        readiness.clone(),
        servers_stop.wait(),
    ));
    let metrics_task = tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        servers_stop.wait(),
    ));

    // 2. plugin events, installer
    let stop = Stop::new();
    let run_dir = cfg.run_dir.clone();
    let paths = tokio::task::spawn_blocking(move || NetnsPaths::load(&run_dir))
        .await
        .map_err(|e| AppError::Task {
            what: "loading pod netns records",
            reason: e.to_string(),
        })??;
    let plugin_listener = PluginEventListener::bind(&cfg.run_dir)?;
    let plugin_log = PluginLogListener::bind(&cfg.run_dir)?;
    let installer = Arc::new(Installer::new(cfg.install.clone(), install_flag.clone()));
    let installer_task = tokio::spawn(installer.clone().run(stop.wait()));
    let install_gauge = {
        let (flag, m, stop) = (install_flag.clone(), metrics.clone(), stop.wait());
        tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                m.install_ready.set(i64::from(flag.is_ready()));
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    };

    // 3. redirector
    let (redirector, mode) = build_redirector(&cfg).await?;

    // 4. cache, reconciler, watchers
    let cache = Arc::new(ClusterCache::new(cfg.pod_namespace.clone()));
    let api: Arc<dyn ClusterApi> = Arc::new(KubeApi::new(client.clone()));
    let resolver = NetnsResolver::new(Arc::new(paths), cfg.host_proc_dir.clone());
    let reconciler = Reconciler::new(
        ReconcileConfig {
            enablement: cfg.enablement(),
            needs_netns: cfg.redirect_mode == RedirectMode::Inpod,
            cni_add_ztunnel_wait: cfg.cni_add_ztunnel_wait,
            ..ReconcileConfig::default()
        },
        cache.clone(),
        api.clone(),
        redirector.clone(),
        resolver,
        metrics.clone(),
    );
    let plugin_task = tokio::spawn(plugin_listener.serve(
        Arc::new(CniAddHandler::new(reconciler.clone())),
        DEFAULT_HANDLER_TIMEOUT,
        stop.wait(),
    ));
    let plugin_log_task = tokio::spawn(plugin_log.serve(Arc::new(plugin_log::relog), stop.wait()));
    let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
    let ztunnel_changed = Arc::new(Notify::new());
    let dispatcher = {
        let (r, zc) = (reconciler.clone(), ztunnel_changed.clone());
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                if change == Change::Ztunnel {
                    zc.notify_one();
                }
                r.handle_change(&change);
            }
        })
    };
    let watchers = Watchers::start(client, &cfg.node_name, cache.clone(), tx);

    // Waiting for the API may take long; SIGTERM must still work.
    tokio::pin!(shutdown);
    let synced = tokio::select! {
        _ = cache.wait_synced() => true,
        _ = &mut shutdown => false,
    };

    let mut workers = Vec::new();
    let mut follower = None;
    if synced {
        // 5. start-up reconcile, then ZDS
        reconciler.startup().await;
        follower = Some(match &mode {
            Mode::Inpod { zds } => {
                zds.serve()?;
                tokio::spawn(ztunnel::follow_zds(
                    zds.clone(),
                    reconciler.clone(),
                    ztunnel_flag.clone(),
                    Duration::from_millis(100),
                    stop.wait(),
                ))
            }
            Mode::Geneve { geneve } => tokio::spawn(ztunnel::follow_geneve(
                geneve.clone(),
                reconciler.clone(),
                ztunnel_flag.clone(),
                ztunnel_changed.clone(),
                cfg.geneve_recheck,
                stop.wait(),
            )),
        });
        // 6. workers
        workers = reconciler.spawn_workers();
        kube_flag.set_ready();
        tracing::info!(pods = cache.pod_count(), "node agent running");
        // Start-up code will not run again: let its pages go.
        match tokio::task::spawn_blocking(crate::memory::release_file_pages).await {
            Ok(Ok(kb)) => tracing::debug!(kb, "released start-up file pages"),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot release start-up file pages"),
            Err(_) => {}
        }
        shutdown.await;
    }

    // Shutdown.
    kube_flag.set_not_ready("shutting down");
    stop.fire();
    reconciler.stop();
    drop(watchers);
    dispatcher.abort();
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let _ = plugin_task.await;
    let _ = plugin_log_task.await;
    let _ = installer_task.await;
    install_gauge.abort();
    if let Some(f) = follower {
        let _ = f.await;
    }

    // Upgrade or uninstall (see `daemonset_gone`);
    // `AMBIENT_DISABLE_SAFE_UPGRADE=true` makes every shutdown an uninstall.
    let uninstall = if cfg.disable_safe_upgrade {
        Some("AMBIENT_DISABLE_SAFE_UPGRADE=true")
    } else {
        daemonset_gone(&api, &cfg).await
    };
    if let Some(why) = uninstall {
        tracing::info!(daemonset = %cfg.daemonset_name, namespace = %cfg.pod_namespace, reason = why, "uninstalling");
        let inst = installer.clone();
        match tokio::task::spawn_blocking(move || inst.uninstall()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "CNI uninstall failed"),
            Err(e) => tracing::error!(error = %e, "CNI uninstall panicked"),
        }
        if let Err(e) = redirector.cleanup_all().await {
            tracing::error!(error = %e, "removing redirection failed");
        }
        reconciler.remove_all_annotations().await;
        let dir = cfg.run_dir.join(POD_NETNS_DIR);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    } else {
        installer.keep_for_upgrade();
        tracing::info!("upgrade or restart: pods stay redirected for the next agent");
    }
    if let Mode::Inpod { zds } = &mode {
        zds.shutdown();
    }
    servers_stop.fire();
    let _ = health_task.await;
    let _ = metrics_task.await;
    tracing::info!("node agent stopped");
    Ok(())
}

/// Whether the agent's DaemonSet is gone (uninstall, with the reason) as upstream's
/// install-cni decides it (`DaemonSetState`); `None` = present, or the API cannot tell
/// (keep everything). The GET is bounded: the client retries 429/503 for minutes, past
/// the grace period, and a SIGKILL would skip the uninstall clean-up as well.
async fn daemonset_gone(api: &Arc<dyn ClusterApi>, cfg: &AgentConfig) -> Option<&'static str> {
    match tokio::time::timeout(
        DAEMONSET_CHECK_TIMEOUT,
        api.daemonset_state(&cfg.pod_namespace, &cfg.daemonset_name),
    )
    .await
    {
        Ok(Ok(DaemonSetState::Present)) => None,
        Ok(Ok(DaemonSetState::Gone(why))) => Some(why),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot tell upgrade from uninstall: keeping everything installed");
            None
        }
        Err(_) => {
            tracing::warn!(
                daemonset = %cfg.daemonset_name,
                namespace = %cfg.pod_namespace,
                timeout_secs = DAEMONSET_CHECK_TIMEOUT.as_secs(),
                "cannot tell upgrade from uninstall: the DaemonSet GET did not answer in time; keeping everything installed"
            );
            None
        }
    }
}
