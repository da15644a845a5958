//! Wiring: configuration → state sources, certificates, metrics, proxies, admin endpoints;
//! runtimes, signals and drain.
//!
//! Threads: the data plane runs on `ZTUNNEL_WORKER_THREADS` threads, each a single-thread
//! tokio runtime (thread-per-core; connections are spread over them and stay on one thread);
//! the admin endpoints (and nothing else) on a single-thread runtime of their own thread, so
//! a slow scrape never delays traffic.
//! SIGTERM/SIGINT: listeners close, open connections get `TERMINATION_GRACE_PERIOD_SECONDS`
//! to finish, then the process exits 0.
//! Certificates follow the workloads served: in-pod workloads hold their account while they
//! run ([`crate::inpod`]); the node-wide (TPROXY) proxy's follow the state's workloads of this
//! node ([`node_certs`]).

pub mod node_certs;

use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminAddresses, AdminState, ProxyLister};
use crate::config::{Config, ProxyMode};
use crate::file_watch::FileWatcher;
use crate::identity::istio_ca;
use crate::identity::{CertificateProvider, SecretManager};
use crate::inpod::{EngineWorkloadProxies, InpodService, InpodStartError};
use crate::proxy::{ProxyFactory, ProxyHandle, ProxyInputs, ProxyScope, ProxySpec, Shards};
use crate::readiness::Readiness;
use crate::redirect::dedicated::DedicatedSocketFactory;
use crate::redirect::tproxy::{self, TproxySocketFactory};
use crate::state::Store;
use crate::state::file::{self, FileDefaults};
use crate::telemetry::ProxyMetrics;
use crate::tls::TrustRoots;
use crate::tls::crl::{CrlError, RevocationLists};

/// Start-up failures; each names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    LocalXds(#[from] file::FileError),
    #[error(transparent)]
    Ca(#[from] istio_ca::IstioCaError),
    #[error(transparent)]
    Roots(#[from] crate::tls::TlsError),
    #[error("CRL_PATH: {0}")]
    Crl(#[from] CrlError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(transparent)]
    Inpod(#[from] InpodStartError),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Xds(#[from] crate::state::xds::XdsError),
    #[error("KUBERNETES_DISCOVERY=true: {0}")]
    Kube(#[source] crate::state::kube::DiscoveryError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where certificates come from and what peers must chain to.
struct Authority {
    provider: Arc<dyn CertificateProvider>,
    roots: TrustRoots,
    /// Keeps `ROOT_CA_PATH` followed (Istio CA only).
    roots_watch: Option<FileWatcher>,
    /// Keeps `CRL_PATH` followed.
    crl_watch: Option<FileWatcher>,
}

/// The certificate provider (Istio CA when `CA_ADDRESS` is set, else the local CA) and the
/// trust roots. With the Istio CA the roots are `ROOT_CA_PATH`, followed while the returned
/// watcher lives (a root rotation needs no restart); the development CA's `CA_ROOT_CERT` is
/// read once (its key is, too).
fn certificate_authority(cfg: &Config) -> Result<Authority, AppError> {
    let provider = istio_ca::provider_from_config(cfg, std::env::vars())?;
    if cfg.ca_address.is_some() {
        let path = &cfg.root_ca_path;
        let name = format!("ROOT_CA_PATH {}", path.display());
        let (roots, watcher) = crate::tls::roots::watch_file(path, &name)?;
        return with_revocation_lists(
            cfg,
            Authority {
                provider,
                roots,
                roots_watch: Some(watcher),
                crl_watch: None,
            },
        );
    }
    let path = cfg
        .ca_root_cert
        .as_ref()
        .expect("provider_from_config requires a CA");
    let name = format!("CA_ROOT_CERT {}", path.display());
    let (roots, _) = crate::tls::roots::load_file(path, &name)?;
    with_revocation_lists(
        cfg,
        Authority {
            provider,
            roots,
            roots_watch: None,
            crl_watch: None,
        },
    )
}

/// With `CRL_PATH`, the roots check peers against its revocation lists, followed while the
/// authority lives. A file that does not parse at start-up is an error naming it.
fn with_revocation_lists(cfg: &Config, mut authority: Authority) -> Result<Authority, AppError> {
    let Some(path) = &cfg.crl_path else {
        return Ok(authority);
    };
    let (lists, watcher) = RevocationLists::watch_file(path)?;
    authority.roots = authority.roots.with_revocation(lists);
    authority.crl_watch = Some(watcher);
    Ok(authority)
}

/// Runs ztunnel until SIGTERM/SIGINT; returns after the drain.
pub fn run(mut cfg: Config) -> Result<(), AppError> {
    crate::process_memory::tune_allocator();
    raise_open_files_limit();
    // ENABLE_ORIG_SRC unset means "where IP_TRANSPARENT works", in every mode: connections
    // to a local workload then come from the client's address (the in-pod rules route the
    // replies back to ztunnel: connmark 0x111, table 100), as with upstream's ztunnel.
    let orig_src = *cfg
        .enable_orig_src
        .get_or_insert_with(tproxy::transparent_supported);
    tracing::info!(
        orig_src,
        "connections to local workloads use the client's address as source: {orig_src}"
    );
    let cfg = Arc::new(cfg);
    let store = Store::new();
    let _file_watch = match &cfg.local_xds_path {
        Some(path) => Some(file::watch(
            path,
            store.source(file::SOURCE_NAME),
            FileDefaults {
                trust_domain: cfg.trust_domain.clone(),
                cluster_id: cfg.cluster_id.clone(),
            },
        )?),
        None => None,
    };
    if let Some(text) = &cfg.local_xds {
        // Inline config: read once (nothing to watch); errors name the variable.
        let lc = file::parse(
            text,
            std::path::Path::new("LOCAL_XDS"),
            &FileDefaults {
                trust_domain: cfg.trust_domain.clone(),
                cluster_id: cfg.cluster_id.clone(),
            },
        )?;
        store
            .source(file::SOURCE_NAME)
            .replace_all(lc.workloads, lc.services, lc.policies);
    }
    let Authority {
        provider,
        roots,
        roots_watch: _roots_watch,
        crl_watch: _crl_watch,
    } = certificate_authority(&cfg)?;
    let certs = SecretManager::new(provider, cfg.secret_ttl);
    let mut registry = Registry::default();
    let metrics = Arc::new(ProxyMetrics::new(&mut registry));
    let readiness = Readiness::default();
    let proxies: Arc<Mutex<Vec<(String, ProxyHandle)>>> = Arc::default();
    let inpod_proxies: Arc<Mutex<Option<Arc<EngineWorkloadProxies>>>> = Arc::default();
    let lister: ProxyLister = {
        let proxies = proxies.clone();
        let inpod = inpod_proxies.clone();
        Arc::new(move || {
            let mut all = proxies.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(p) = inpod.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                all.extend(p.handles());
            }
            all
        })
    };

    let workers = DataPlaneThreads::start(cfg.worker_threads)?;
    let rt = workers.coordinator();
    registry.register_collector(Box::new(crate::telemetry::runtime::ProcessCollector));
    crate::telemetry::runtime::RuntimeCollector::register(&mut registry, workers.handles.clone());

    // KUBERNETES_DISCOVERY=true: watch the cluster (state::kube) from a thread of its
    // own; not ready until listed.
    let _discovery = if cfg.kubernetes_discovery {
        let discovery = crate::state::kube::KubeDiscovery::start_on_thread(
            None,
            store.source(crate::state::kube::SOURCE_NAME),
            crate::state::kube::KubeOptions::from_config(&cfg),
        )
        .map_err(AppError::Kube)?;
        readiness.add_watch("Kubernetes discovery synced", discovery.synced());
        Some(discovery)
    } else {
        None
    };

    // XDS_ADDRESS: istiod's delta xDS (state::xds) from a thread of its own; not ready
    // until both resource types have been received.
    let _xds = match &cfg.xds_address {
        Some(address) => {
            let opts = crate::state::xds::XdsOptions::from_config(&cfg, address, std::env::vars());
            tracing::info!(address = %address, node = %opts.node.id, "xDS client starting");
            let client = crate::state::xds::XdsClient::start_on_thread(
                opts,
                store.source(crate::state::xds::SOURCE_NAME),
                crate::state::xds::XdsMetrics::new(registry.sub_registry_with_prefix("istio")),
            )?;
            readiness.add_watch("xDS synced", client.synced());
            if let Some(demander) = client.on_demand() {
                tracing::info!("xDS on-demand lookups on (XDS_ON_DEMAND)");
                store.set_on_demand(demander);
            }
            Some(client)
        }
        None => None,
    };

    let admin_stop = CancellationToken::new();
    // POST /quitquitquit: the same drain as SIGTERM.
    let quit = CancellationToken::new();
    let admin_state = Arc::new(AdminState {
        cfg: cfg.clone(),
        store: store.clone(),
        certs: certs.clone(),
        roots: roots.clone(),
        registry: Arc::new(registry),
        readiness: readiness.clone(),
        proxies: lister,
        quit: quit.clone(),
    });
    let (admin_thread, admin_addrs) = spawn_admin(admin_state, admin_stop.clone())?;
    tracing::info!(
        admin = %admin_addrs.admin,
        metrics = %admin_addrs.stats,
        readiness = %admin_addrs.readiness,
        "admin endpoints listening"
    );

    let inputs = ProxyInputs {
        cfg: cfg.clone(),
        state: store,
        certs,
        roots,
        metrics,
    };
    let result = rt.block_on(data_plane(
        inputs,
        readiness,
        proxies,
        inpod_proxies,
        workers.shards(),
        quit,
    ));
    admin_stop.cancel();
    let _ = admin_thread.join();
    workers.stop();
    result
}

/// Once ready, drops the page mappings of code only start-up needed
/// ([`mesh_memory::release_file_pages`], on a blocking thread: it reads
/// `/proc/self/smaps`).
fn release_startup_memory_when_ready(readiness: Readiness) {
    tokio::spawn(async move {
        for _ in 0..600 {
            if readiness.is_ready() {
                match tokio::task::spawn_blocking(mesh_memory::release_file_pages).await {
                    Ok(Ok(kb)) => tracing::debug!(kb, "released start-up code pages"),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "could not release start-up code pages")
                    }
                    Err(_) => {}
                }
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
}

/// Raises the soft open-files limit to the hard one, as upstream: every enrolled pod costs
/// a netns handle and three listeners, every connection one or two sockets, and container
/// runtimes often start processes with a soft limit of 1024. At the limit, accepts fail
/// and a ZDS message carrying a netns arrives truncated (its descriptor dropped), so a
/// busy node's ztunnel could never replay its snapshot after a restart.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

/// The data-plane threads: `ZTUNNEL_WORKER_THREADS` single-thread runtimes, one per thread
/// (thread-per-core). Proxies spread accepted connections over them ([`Shards`]); the
/// first one also runs the coordination tasks (signals, ZDS client, certificate rotation).
struct DataPlaneThreads {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl DataPlaneThreads {
    fn start(n: usize) -> Result<Self, AppError> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ztunnel-worker-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(stop.cancelled());
                    rt.shutdown_timeout(std::time::Duration::from_secs(1));
                })
                .map_err(|source| AppError::Io {
                    what: "starting a data-plane thread",
                    source,
                })?;
            let handle = rx
                .recv()
                .map_err(|_| AppError::Io {
                    what: "starting a data-plane thread",
                    source: std::io::Error::other("thread exited"),
                })?
                .map_err(|source| AppError::Io {
                    what: "building a data-plane runtime",
                    source,
                })?;
            handles.push(handle);
            threads.push(thread);
        }
        Ok(DataPlaneThreads {
            handles,
            threads,
            stop,
        })
    }

    /// The runtime running coordination tasks (the first data-plane thread).
    fn coordinator(&self) -> tokio::runtime::Handle {
        self.handles[0].clone()
    }

    fn shards(&self) -> Shards {
        Shards::new(self.handles.clone())
    }

    fn stop(self) {
        self.stop.cancel();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn spawn_admin(
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> Result<(std::thread::JoinHandle<()>, AdminAddresses), AppError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("ztunnel-admin".to_string())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(source) => {
                    let _ = tx.send(Err(AppError::Io {
                        what: "building the admin runtime",
                        source,
                    }));
                    return;
                }
            };
            rt.block_on(async move {
                match admin::start(state, stop.clone()).await {
                    Ok(addrs) => {
                        let _ = tx.send(Ok(addrs));
                        stop.cancelled().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                    }
                }
            });
        })
        .map_err(|source| AppError::Io {
            what: "starting the admin thread",
            source,
        })?;
    let addrs = rx.recv().map_err(|_| AppError::Io {
        what: "starting the admin endpoints",
        source: std::io::Error::other("admin thread exited"),
    })??;
    Ok((thread, addrs))
}

async fn data_plane(
    inputs: ProxyInputs,
    readiness: Readiness,
    proxies: Arc<Mutex<Vec<(String, ProxyHandle)>>>,
    inpod_proxies: Arc<Mutex<Option<Arc<EngineWorkloadProxies>>>>,
    shards: Shards,
    quit: CancellationToken,
) -> Result<(), AppError> {
    let cfg = inputs.cfg.clone();
    // Open connections get the grace period less a margin: kubelet's SIGKILL comes at its end.
    let grace = cfg.drain_budget();
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| AppError::Io {
        what: "installing the SIGTERM handler",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| AppError::Io {
        what: "installing the SIGINT handler",
        source,
    })?;
    let factory = ProxyFactory::new(inputs.clone()).with_shards(shards);
    let shutdown = CancellationToken::new();
    let mut inpod_task = None;
    let mut _node_certs = None;
    match cfg.proxy_mode {
        ProxyMode::Dedicated => {
            let info = cfg
                .proxy_workload_info
                .clone()
                .expect("config validation requires PROXY_WORKLOAD_INFO in dedicated mode");
            let sockets = Arc::new(
                DedicatedSocketFactory::new(cfg.packet_mark, cfg.inpod_port_reuse)
                    .with_keepalive(cfg.keepalive),
            );
            let handle = factory.start_for_workload(info.clone(), sockets).await?;
            proxies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((info.to_string(), handle));
            // Ready once the workload's certificate is issued.
            let certs = inputs.certs.clone();
            let store = inputs.state.clone();
            let td = cfg.trust_domain.clone();
            let node = cfg.node_name.clone();
            readiness.add(format!("certificate for {info}"), move || {
                let snap = store.snapshot();
                let id = snap
                    .find_workload(&info, node.as_deref())
                    .map(|w| w.identity())
                    .unwrap_or_else(|| {
                        crate::identity::Identity::new(&td, &info.namespace, &info.service_account)
                    });
                certs.current(&id).is_some()
            });
        }
        ProxyMode::Shared if cfg.inpod_enabled => {
            // Fails at start when SO_MARK cannot be set (no CAP_NET_ADMIN): every pod's
            // proxy would fail otherwise, and the pod rules would capture our own traffic.
            let service = InpodService::new(&cfg, factory.clone())?;
            *inpod_proxies.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(service.proxies().clone());
            readiness.add_watch(
                "in-pod workload snapshot from the node agent",
                service.readiness(),
            );
            let client = service.client().clone();
            let stop = shutdown.clone();
            inpod_task = Some(tokio::spawn(async move {
                client.run(stop.cancelled_owned()).await;
            }));
        }
        ProxyMode::Shared => {
            // TPROXY (GENEVE redirection): one node-wide proxy with transparent listeners
            // in ztunnel's own netns; ENABLE_ORIG_SRC defaults to "IP_TRANSPARENT works".
            let handle = factory
                .start(ProxySpec {
                    scope: ProxyScope::Node,
                    sockets: Arc::new(TproxySocketFactory::new().with_keepalive(cfg.keepalive)),
                    bind_ip: cfg.wildcard_ip(),
                    orig_src: cfg
                        .enable_orig_src
                        .unwrap_or_else(tproxy::transparent_supported),
                    dns: true,
                })
                .await?;
            proxies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(("node (TPROXY)".to_string(), handle));
            // The listeners are bound; nothing else to wait for in this mode.
            readiness.add("node proxy (TPROXY) listening", || true);
            // Certificates fetched on demand for this node's workloads are forgotten once
            // no workload of the node has their identity.
            _node_certs = Some(node_certs::watch(
                inputs.state.clone(),
                inputs.certs.clone(),
                cfg.node_name.clone(),
                node_certs::SETTLE,
            ));
        }
    }
    tracing::info!(mode = ?cfg.proxy_mode, "ztunnel running");
    release_startup_memory_when_ready(readiness.clone());
    crate::process_memory::trim_periodically(std::time::Duration::from_secs(5));

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = sigint.recv() => tracing::info!("SIGINT: draining"),
        _ = quit.cancelled() => {}
    }
    shutdown.cancel();
    if let Some(t) = inpod_task {
        let _ = t.await;
    }
    let handles: Vec<ProxyHandle> = proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(_, h)| h.clone())
        .collect();
    let engine = inpod_proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let drain_dedicated = futures::future::join_all(handles.iter().map(|h| h.drain(grace)));
    let drain_inpod = async {
        if let Some(e) = engine {
            e.drain_all().await;
        }
    };
    tokio::join!(drain_dedicated, drain_inpod);
    tracing::info!("drained; exiting");
    Ok(())
}
