//! The proxy engine: outbound (15001), inbound HBONE (15008), inbound plaintext (15006),
//! and with `UNSTABLE_ENABLE_SOCKS5` a SOCKS5 listener (127.0.0.1:15080, [`socks5`]).
//!
//! One engine, started in three ways:
//!
//! | mode | call | source workload | destination workload (inbound) |
//! |---|---|---|---|
//! | dedicated: one per process | [`ProxyFactory::start_for_workload`] with `redirect::dedicated::DedicatedSocketFactory` | the proxy's own workload | must be the proxy's own workload |
//! | in-pod (ZDS): one per enrolled pod | [`ProxyFactory::start_for_workload`] with the pod's netns socket factory | the pod's workload | the pod's workload |
//! | TPROXY: one per node | [`ProxyFactory::start_node_proxy`] with a transparent socket factory | found by the connection's source IP | found by the accepted socket's local address, must be on this node |
//!
//! The workload is matched in the state store by namespace, name and service account
//! (`NODE_NAME` restricts the match to this node). Until it appears, its identity is
//! `spiffe://<TRUST_DOMAIN>/ns/<ns>/sa/<sa>`.
//!
//! Each [`ProxyHandle`] owns its listeners, its HBONE connection pool and its connection
//! tasks; [`ProxyHandle::drain`] stops accepting, lets open connections finish for the grace
//! period, then closes what is left.

pub mod app_tunnel;
pub mod authorize;
pub mod conntrack;
pub mod copy;
pub mod dns;
mod inbound;
mod inbound_plain;
mod node_local;
mod on_demand_dns;
mod outbound;
mod policy_watch;
pub mod sockets;
mod socks5;
mod source_check;

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, WorkloadInfo};
use crate::hbone::Pool;
use crate::hbone::pool::PooledConnectionInfo;
use crate::identity::{Identity, SecretManager};
use crate::state::on_demand::Unanswered;
use crate::state::{Snapshot, Store, Workload};
use crate::telemetry::{Direction, ProxyMetrics};
use crate::tls::TrustRoots;
pub use authorize::{AuthorizationRequest, Denied, authorize};
use conntrack::ConnTracker;
pub use conntrack::ConnectionSummary;
pub use sockets::{ListenerKind, OriginalDestination, SocketFactory};

/// Shared inputs of every proxy of the process.
#[derive(Clone)]
pub struct ProxyInputs {
    pub cfg: Arc<Config>,
    pub state: Store,
    pub certs: Arc<SecretManager>,
    pub roots: TrustRoots,
    pub metrics: Arc<ProxyMetrics>,
}

/// Whom a proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyScope {
    /// One workload (dedicated and in-pod modes).
    Workload(WorkloadInfo),
    /// Every workload of this node (TPROXY mode).
    Node,
}

/// Everything needed to start one proxy.
pub struct ProxySpec {
    pub scope: ProxyScope,
    pub sockets: Arc<dyn SocketFactory>,
    /// Address the three listeners bind to (`[::]` in production).
    pub bind_ip: IpAddr,
    /// Connect to local applications with the client's IP as source.
    pub orig_src: bool,
    /// Also serve DNS on port 15053 (when `ISTIO_META_DNS_CAPTURE` leaves it on): on
    /// `ISTIO_META_DNS_PROXY_ADDR` in workload scope, on `[::]` in node scope.
    pub dns: bool,
}

/// Starting a proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy for {scope}: binding {kind:?} listener on {addr} ({sockets}): {source}")]
    Bind {
        scope: String,
        kind: ListenerKind,
        addr: SocketAddr,
        sockets: String,
        #[source]
        source: std::io::Error,
    },
}

/// Addresses the listeners actually bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyAddresses {
    pub outbound: SocketAddr,
    pub inbound_plain: SocketAddr,
    pub hbone: SocketAddr,
    /// The SOCKS5 listener (`UNSTABLE_ENABLE_SOCKS5`), when on.
    pub socks5: Option<SocketAddr>,
}

/// The data-plane threads accepted connections are spread over (thread-per-core: each is a
/// single-thread runtime, so a connection, its HBONE stream and the pooled connection
/// carrying it are all driven by one thread). Empty: everything runs on the runtime that
/// started the proxy.
#[derive(Clone, Default)]
pub struct Shards {
    handles: Arc<Vec<tokio::runtime::Handle>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shards {
    pub fn new(handles: Vec<tokio::runtime::Handle>) -> Self {
        Shards {
            handles: Arc::new(handles),
            next: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime for the next connection (round-robin), `None` when not sharded.
    fn pick(&self) -> Option<&tokio::runtime::Handle> {
        if self.handles.len() < 2 {
            return None;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.handles.get(i % self.handles.len())
    }
}

/// Starts proxies.
#[derive(Clone)]
pub struct ProxyFactory {
    inputs: ProxyInputs,
    shards: Shards,
    /// The DNS proxy's upstream resolvers, read from resolv.conf at the first start.
    dns_upstreams: Arc<tokio::sync::OnceCell<Arc<dns::Upstreams>>>,
}

impl ProxyFactory {
    pub fn new(inputs: ProxyInputs) -> Self {
        ProxyFactory {
            inputs,
            shards: Shards::default(),
            dns_upstreams: Default::default(),
        }
    }

    /// Spreads accepted connections over `shards` (see [`Shards`]).
    pub fn with_shards(mut self, shards: Shards) -> Self {
        self.shards = shards;
        self
    }

    pub fn inputs(&self) -> &ProxyInputs {
        &self.inputs
    }

    /// A proxy for one workload whose sockets `sockets` creates (dedicated and in-pod).
    /// Listens on `[::]:15001`, `[::]:15006`, `[::]:15008` (`0.0.0.0` with `IPV6_ENABLED=false`)
    /// through the factory.
    pub async fn start_for_workload(
        &self,
        workload: WorkloadInfo,
        sockets: Arc<dyn SocketFactory>,
    ) -> Result<ProxyHandle, ProxyError> {
        self.start(ProxySpec {
            scope: ProxyScope::Workload(workload),
            sockets,
            bind_ip: self.inputs.cfg.wildcard_ip(),
            orig_src: self.inputs.cfg.enable_orig_src.unwrap_or(false),
            dns: true,
        })
        .await
    }

    /// The node-wide proxy of TPROXY mode (`sockets` gives transparent listeners; source
    /// workloads by source IP, destinations by local address).
    pub async fn start_node_proxy(
        &self,
        sockets: Arc<dyn SocketFactory>,
    ) -> Result<ProxyHandle, ProxyError> {
        self.start(ProxySpec {
            scope: ProxyScope::Node,
            sockets,
            bind_ip: self.inputs.cfg.wildcard_ip(),
            orig_src: self.inputs.cfg.enable_orig_src.unwrap_or(false),
            dns: true,
        })
        .await
    }

    /// The DNS server of a proxy for `scope` (addresses to bind, the handler).
    async fn dns_server(
        &self,
        scope: &ProxyScope,
        sockets: &Arc<dyn SocketFactory>,
    ) -> (Vec<(SocketAddr, bool)>, Arc<dns::DnsHandler>) {
        let cfg = &self.inputs.cfg;
        let path = cfg.dns.resolv_conf.clone();
        let upstreams = self
            .dns_upstreams
            .get_or_init(|| async move {
                let read = tokio::task::spawn_blocking(move || dns::Upstreams::load(&path));
                Arc::new(read.await.expect("reading resolv.conf does not panic"))
            })
            .await
            .clone();
        let port = cfg.dns.addr.port();
        let (addrs, client) = match scope {
            ProxyScope::Workload(info) => (
                match cfg.dns.addr {
                    crate::config::DnsProxyAddr::Localhost(p) => {
                        let mut addrs = vec![(SocketAddr::from(([127, 0, 0, 1], p)), true)];
                        if cfg.ipv6_enabled {
                            addrs.push((SocketAddr::from((Ipv6Addr::LOCALHOST, p)), false));
                        }
                        addrs
                    }
                    crate::config::DnsProxyAddr::Addr(a) => vec![(a, true)],
                },
                dns::DnsClient::Workload(info.clone()),
            ),
            ProxyScope::Node => (
                vec![(SocketAddr::new(cfg.wildcard_ip(), port), true)],
                dns::DnsClient::BySourceIp,
            ),
        };
        let handler = dns::DnsHandler {
            state: self.inputs.state.clone(),
            client,
            node: cfg.node_name.clone(),
            cluster_domain: cfg.cluster_domain.clone(),
            search: match cfg.proxy_mode {
                crate::config::ProxyMode::Dedicated => dns::SearchDomains::ResolvConf,
                crate::config::ProxyMode::Shared => dns::SearchDomains::PerNamespace,
            },
            upstreams,
            sockets: sockets.clone(),
            metrics: self.inputs.metrics.dns.clone(),
            preferred_namespace: cfg.preferred_service_namespace.clone(),
            ipv6: cfg.ipv6_enabled,
            network: cfg.network.clone(),
        };
        (addrs, Arc::new(handler))
    }

    /// Starts a proxy as described by `spec`.
    pub async fn start(&self, spec: ProxySpec) -> Result<ProxyHandle, ProxyError> {
        let ports = self.inputs.cfg.ports;
        let scope_name = match &spec.scope {
            ProxyScope::Workload(w) => format!("workload {w}"),
            ProxyScope::Node => "node".to_string(),
        };
        let bind = |kind: ListenerKind, port: u16| {
            let addr = SocketAddr::new(spec.bind_ip, port);
            let sockets = spec.sockets.clone();
            let scope = scope_name.clone();
            async move {
                sockets
                    .bind_listener(addr, kind)
                    .await
                    .map_err(|source| ProxyError::Bind {
                        scope,
                        kind,
                        addr,
                        sockets: sockets.describe(),
                        source,
                    })
            }
        };
        let outbound = bind(ListenerKind::Outbound, ports.outbound).await?;
        let inbound_plain = bind(ListenerKind::InboundPlain, ports.inbound_plain).await?;
        let hbone = bind(ListenerKind::Hbone, ports.hbone).await?;
        // As upstream: on its own address (loopback) in the proxy's netns, whatever
        // `bind_ip` the capture listeners use.
        let socks5_listener = match self.inputs.cfg.socks5_addr {
            None => None,
            Some(addr) => Some(
                spec.sockets
                    .bind_listener(addr, ListenerKind::Socks5)
                    .await
                    .map_err(|source| ProxyError::Bind {
                        scope: scope_name.clone(),
                        kind: ListenerKind::Socks5,
                        addr,
                        sockets: spec.sockets.describe(),
                        source,
                    })?,
            ),
        };
        let local = |l: &TcpListener| l.local_addr().unwrap_or(SocketAddr::new(spec.bind_ip, 0));
        let addrs = ProxyAddresses {
            outbound: local(&outbound),
            inbound_plain: local(&inbound_plain),
            hbone: local(&hbone),
            socks5: socks5_listener.as_ref().map(local),
        };

        let tracker = TaskTracker::new();
        let stop_accept = CancellationToken::new();
        let dns_addrs = if spec.dns && self.inputs.cfg.dns.enabled {
            let (addrs, handler) = self.dns_server(&spec.scope, &spec.sockets).await;
            dns::server::serve(handler, &addrs, &tracker, &stop_accept)
                .await
                .map_err(|(addr, source)| {
                    // Stop what was already started on other addresses.
                    stop_accept.cancel();
                    ProxyError::Bind {
                        scope: scope_name.clone(),
                        kind: ListenerKind::Dns,
                        addr,
                        sockets: spec.sockets.describe(),
                        source,
                    }
                })?
        } else {
            Vec::new()
        };
        let pool_shutdown = CancellationToken::new();
        let ctx = Arc::new(ProxyCtx {
            pool: Pool::new(
                self.inputs.cfg.h2.clone(),
                pool_shutdown.clone(),
                tracker.clone(),
            ),
            inputs: self.inputs.clone(),
            scope: spec.scope,
            sockets: spec.sockets,
            orig_src: spec.orig_src,
            conns: Arc::new(ConnTracker::default()),
            stop_accept,
            force: CancellationToken::new(),
            pool_shutdown,
            tracker,
            addrs,
            dns_addrs,
            shards: self.shards.clone(),
        });
        if let ProxyScope::Workload(_) = &ctx.scope {
            let snap = ctx.inputs.state.snapshot();
            ctx.inputs.certs.prefetch(&ctx.local_identity(&snap));
        }
        tracing::info!(
            scope = %scope_name,
            outbound = %addrs.outbound,
            inbound_plain = %addrs.inbound_plain,
            hbone = %addrs.hbone,
            socks5 = ?addrs.socks5,
            dns = ?ctx.dns_addrs,
            sockets = %ctx.sockets.describe(),
            "proxy started"
        );
        policy_watch::spawn(&ctx);
        ctx.spawn_accept_loop(outbound, Direction::Outbound, "outbound", outbound::handle);
        ctx.spawn_accept_loop(
            inbound_plain,
            Direction::Inbound,
            "inbound_plain",
            inbound_plain::handle,
        );
        ctx.spawn_accept_loop(hbone, Direction::Inbound, "hbone", inbound::handle);
        if let Some(l) = socks5_listener {
            ctx.spawn_accept_loop(l, Direction::Outbound, "socks5", socks5::handle);
        }
        Ok(ProxyHandle { ctx })
    }
}

/// A running proxy. Clones refer to the same proxy.
#[derive(Clone)]
pub struct ProxyHandle {
    ctx: Arc<ProxyCtx>,
}

impl ProxyHandle {
    pub fn addresses(&self) -> ProxyAddresses {
        self.ctx.addrs
    }

    /// Where the DNS proxy listens (UDP and TCP); empty when it is off.
    pub fn dns_addresses(&self) -> &[SocketAddr] {
        &self.ctx.dns_addrs
    }

    pub fn scope(&self) -> &ProxyScope {
        &self.ctx.scope
    }

    /// Open proxied connections (inbound HBONE TCP connections count too).
    pub fn active_connections(&self) -> usize {
        self.ctx.conns.active()
    }

    pub fn connections(&self) -> Vec<ConnectionSummary> {
        self.ctx.conns.list()
    }

    pub fn pool_connections(&self) -> Vec<PooledConnectionInfo> {
        self.ctx.pool.connections()
    }

    /// Stops accepting (listeners closed, GOAWAY on inbound HBONE connections), waits up to
    /// `grace` for open connections to finish, then closes the rest and the pool.
    pub async fn drain(&self, grace: Duration) {
        let ctx = &self.ctx;
        ctx.stop_accept.cancel();
        let remaining = ctx.conns.active();
        if remaining > 0 {
            tracing::info!(connections = remaining, grace = ?grace, "draining proxy");
        }
        if tokio::time::timeout(grace, ctx.conns.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = ctx.conns.active(),
                "drain grace period over; closing remaining connections"
            );
            ctx.force.cancel();
        }
        ctx.pool_shutdown.cancel();
        ctx.tracker.close();
        if tokio::time::timeout(Duration::from_secs(2), ctx.tracker.wait())
            .await
            .is_err()
        {
            ctx.force.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), ctx.tracker.wait()).await;
        }
    }
}

/// State shared by the tasks of one proxy.
pub(crate) struct ProxyCtx {
    inputs: ProxyInputs,
    scope: ProxyScope,
    sockets: Arc<dyn SocketFactory>,
    orig_src: bool,
    pool: Pool,
    conns: Arc<ConnTracker>,
    /// Stop accepting new connections and streams.
    stop_accept: CancellationToken,
    /// Abort every connection task.
    force: CancellationToken,
    pool_shutdown: CancellationToken,
    tracker: TaskTracker,
    addrs: ProxyAddresses,
    dns_addrs: Vec<SocketAddr>,
    shards: Shards,
}

impl ProxyCtx {
    fn node_name(&self) -> Option<&str> {
        self.inputs.cfg.node_name.as_deref()
    }

    /// The workload this proxy serves (workload scope), if the state knows it.
    fn local_workload<'a>(&self, snap: &'a Snapshot) -> Option<&'a Arc<Workload>> {
        match &self.scope {
            ProxyScope::Workload(info) => snap.find_workload(info, self.node_name()),
            ProxyScope::Node => None,
        }
    }

    /// Identity of the served workload (workload scope).
    fn local_identity(&self, snap: &Snapshot) -> Identity {
        match (&self.scope, self.local_workload(snap)) {
            (_, Some(w)) => w.identity(),
            (ProxyScope::Workload(info), None) => Identity::new(
                &self.inputs.cfg.trust_domain,
                &info.namespace,
                &info.service_account,
            ),
            (ProxyScope::Node, None) => unreachable!("node scope has no single local identity"),
        }
    }

    /// The workload this proxy serves at `ip`, on whichever network it is.
    fn served_at<'a>(&self, snap: &'a Snapshot, ip: IpAddr) -> Option<&'a Arc<Workload>> {
        snap.networks()
            .filter_map(|n| snap.workload_by_ip(n, ip))
            .find(|w| self.serves(w))
    }

    /// The current snapshot; with `XDS_ON_DEMAND`, after asking istiod for `ip` when no
    /// served workload is known there (inbound connections to a workload this ztunnel
    /// has not met yet).
    async fn snapshot_serving(&self, ip: IpAddr) -> Arc<Snapshot> {
        let snap = self.inputs.state.snapshot();
        if !self.inputs.state.supports_on_demand() || self.served_at(&snap, ip).is_some() {
            return snap;
        }
        drop(snap);
        // Unanswered: without the workload the connection is refused (no served
        // workload at the address), as for an unknown one.
        self.inputs
            .state
            .snapshot_knowing(&self.inputs.cfg.network, ip)
            .await
            .unwrap_or_else(Unanswered::into_snapshot)
    }

    /// The network inbound lookups use for a connection that reached `local_ip`: the served
    /// workload's (upstream uses the connection's destination network); this node's
    /// (`NETWORK`) while the state does not know it.
    fn local_network(&self, snap: &Snapshot, local_ip: IpAddr) -> String {
        self.served_workload(snap, local_ip)
            .map(|w| w.network.clone())
            .unwrap_or_else(|| self.inputs.cfg.network.clone())
    }

    /// The workload a connection to `local_ip` reached: the served one (workload scope),
    /// or this node's workload at that address (node scope).
    fn served_workload<'a>(
        &self,
        snap: &'a Snapshot,
        local_ip: IpAddr,
    ) -> Option<&'a Arc<Workload>> {
        match &self.scope {
            ProxyScope::Workload(_) => self.local_workload(snap),
            ProxyScope::Node => self.served_at(snap, local_ip),
        }
    }

    /// Whether `w` is a workload this proxy serves.
    fn serves(&self, w: &Workload) -> bool {
        match &self.scope {
            ProxyScope::Workload(info) => {
                w.namespace == info.namespace
                    && w.name == info.name
                    && w.service_account == info.service_account
            }
            ProxyScope::Node => self.node_name().is_none_or(|n| w.node == n),
        }
    }

    fn spawn_accept_loop<F, Fut>(
        self: &Arc<Self>,
        listener: TcpListener,
        direction: Direction,
        kind: &'static str,
        handler: F,
    ) where
        F: Fn(Arc<ProxyCtx>, TcpStream, SocketAddr, conntrack::ConnGuard) -> Fut
            + Send
            + Sync
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let ctx = self.clone();
        self.tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = ctx.stop_accept.cancelled() => break,
                    r = listener.accept() => r,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        let peer = sockets::canonical(peer);
                        // Small writes (TLS records, request/response traffic) must not wait
                        // for ACKs.
                        let _ = stream.set_nodelay(true);
                        let _ = sockets::set_keepalive(
                            socket2::SockRef::from(&stream),
                            &ctx.inputs.cfg.keepalive,
                        );
                        let shard = ctx.shards.pick();
                        let stream = match shard {
                            None => stream,
                            Some(h) => {
                                // Re-register the socket with the chosen thread's reactor.
                                let _in_shard = h.enter();
                                match stream.into_std().and_then(TcpStream::from_std) {
                                    Ok(s) => s,
                                    Err(e) => {
                                        tracing::warn!(listener = kind, src = %peer, error = %e, "cannot hand the connection to a data-plane thread");
                                        continue;
                                    }
                                }
                            }
                        };
                        let guard = ctx.conns.enter(direction, kind, peer);
                        let conn_ctx = ctx.clone();
                        let work = handler(conn_ctx, stream, peer, guard);
                        let force = ctx.force.clone();
                        let task = async move {
                            tokio::select! {
                                _ = force.cancelled() => {}
                                _ = work => {}
                            }
                        };
                        match shard {
                            Some(h) => {
                                ctx.tracker.spawn_on(task, h);
                            }
                            None => {
                                ctx.tracker.spawn(task);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(listener = kind, error = %e, "accept failed");
                        // Out of file descriptors and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            tracing::debug!(listener = kind, "listener closed");
        });
    }
}
