//! The DNS proxy's sockets: UDP and TCP on 15053 in each workload's netns (in-pod and
//! dedicated: `localhost:15053`, where the pod's capture rules REDIRECT its port-53
//! traffic), or on the node proxy's address (TPROXY/GENEVE: pods' UDP/53 DNATed to it).
//! Each query is answered by [`DnsHandler`]: from the mesh state when it names a mesh
//! Service, else forwarded upstream.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::forward::{Upstreams, read_framed, write_framed};
use super::lookup::{self, Client};
use super::message::{Question, Rejected, Request};
use crate::config::WorkloadInfo;
use crate::proxy::sockets::canonical;
use crate::proxy::{ListenerKind, SocketFactory};
use crate::state::{Snapshot, Store};
use crate::telemetry::dns_metrics::{DnsLabels, DnsMetrics};

/// Queries of one UDP socket being answered at once; more are dropped (the client
/// retries), so a flood cannot grow tasks without bound.
const MAX_INFLIGHT_UDP: usize = 512;
/// An idle DNS-over-TCP connection is closed after this long (upstream's 5 s).
const TCP_IDLE: Duration = Duration::from_secs(5);
/// Receive buffer of a server socket: queries are small (a question and an OPT record);
/// a larger datagram is cut and answered FORMERR. Kept small because every enrolled pod
/// has its own server sockets.
const MAX_QUERY: usize = 4096;

/// Who is asking.
#[derive(Debug, Clone)]
pub enum DnsClient {
    /// The one workload of a workload proxy (in-pod, dedicated).
    Workload(WorkloadInfo),
    /// Whichever workload owns the query's source address (node proxy).
    BySourceIp,
}

/// Which search domains are stripped from queried names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchDomains {
    /// Those of the client's namespace (`<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`):
    /// a shared ztunnel serves pods of every namespace (upstream's shared mode).
    PerNamespace,
    /// ztunnel's own resolv.conf (dedicated mode: it is the pod's).
    ResolvConf,
}

/// Everything a proxy's DNS server needs.
pub struct DnsHandler {
    pub state: Store,
    pub client: DnsClient,
    pub node: Option<String>,
    pub cluster_domain: String,
    pub search: SearchDomains,
    pub upstreams: Arc<Upstreams>,
    pub sockets: Arc<dyn SocketFactory>,
    pub metrics: DnsMetrics,
    /// `PREFERED_SERVICE_NAMESPACE`.
    pub preferred_namespace: Option<String>,
    /// `IPV6_ENABLED`: when false, mesh names answer no IPv6 addresses.
    pub ipv6: bool,
    /// `NETWORK`: the network of a client the state does not know yet.
    pub network: String,
}

/// The asking workload, as far as the state knows it.
struct Asker {
    namespace: String,
    network: String,
    name: String,
    canonical_service: String,
    canonical_revision: String,
}

impl DnsHandler {
    fn asker(&self, snap: &Snapshot, src: IpAddr) -> Option<Asker> {
        let from = |w: &crate::state::Workload| Asker {
            namespace: w.namespace.clone(),
            network: w.network.clone(),
            name: w.name.clone(),
            canonical_service: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
        };
        match &self.client {
            DnsClient::Workload(info) => Some(
                snap.find_workload(info, self.node.as_deref())
                    .map(|w| from(w))
                    // Not in the state yet: its namespace is still known.
                    .unwrap_or_else(|| Asker {
                        namespace: info.namespace.clone(),
                        network: self.network.clone(),
                        name: info.name.clone(),
                        canonical_service: String::new(),
                        canonical_revision: String::new(),
                    }),
            ),
            DnsClient::BySourceIp => snap
                .networks()
                .filter_map(|n| snap.workload_by_ip(n, src))
                .find(|w| {
                    self.node
                        .as_deref()
                        .is_none_or(|n| w.node.is_empty() || w.node == n)
                })
                .map(|w| from(w)),
        }
    }

    fn search_domains(&self, namespace: &str) -> Vec<String> {
        let d = &self.cluster_domain;
        match self.search {
            SearchDomains::PerNamespace => {
                vec![
                    format!("{namespace}.svc.{d}"),
                    format!("svc.{d}"),
                    d.clone(),
                ]
            }
            SearchDomains::ResolvConf => self.upstreams.search.clone(),
        }
    }

    /// The answer to `query` from `src` (`None`: send nothing).
    pub async fn handle(&self, query: &[u8], src: SocketAddr, udp: bool) -> Option<Vec<u8>> {
        let req = match Request::parse(query) {
            Ok(r) => r,
            Err(Rejected::Drop) => return None,
            Err(Rejected::Reply(b)) => return Some(b),
        };
        let (asker, found) = {
            let snap = self.state.snapshot();
            let asker = self.asker(&snap, canonical(src).ip());
            let found = match (&asker, req.question()) {
                (Some(a), Question::Address { name, family }) => lookup::lookup(
                    &snap,
                    Client {
                        namespace: &a.namespace,
                        network: &a.network,
                        preferred_namespace: self.preferred_namespace.as_deref(),
                    },
                    &self.cluster_domain,
                    &self.search_domains(&a.namespace),
                    &name,
                    family,
                )
                .map(|mut found| {
                    if family == lookup::Family::V6 && !self.ipv6 {
                        // The name is the mesh's, but it has no IPv6 records here.
                        found.addrs.clear();
                        found.cname = None;
                    }
                    found
                }),
                _ => None,
            };
            (asker, found)
        };
        let labels = DnsLabels::new(
            req.query_type(),
            if udp { "udp" } else { "tcp" },
            asker
                .as_ref()
                .map(|a| (a.canonical_service.as_str(), a.canonical_revision.as_str())),
        );
        self.metrics.requests.get_or_create(&labels).inc();
        let log = |result: &str, endpoints: usize| {
            tracing::debug!(
                target: "dns",
                {
                    src.addr = %canonical(src),
                    src.workload = asker.as_ref().map_or("unknown", |a| a.name.as_str()),
                    src.namespace = asker.as_ref().map_or("unknown", |a| a.namespace.as_str()),
                    query = %req.query_type(),
                    domain = %req.name(),
                    result,
                    endpoints,
                },
                "dns request"
            );
        };
        if let Some(found) = found {
            log(&format!("success ({})", found.service), found.addrs.len());
            return req.answer(&found, udp);
        }
        self.metrics.upstream_requests.get_or_create(&labels).inc();
        let start = Instant::now();
        let sockets = self.sockets.as_ref();
        let forwarded = self.upstreams.forward(sockets, query, !udp).await;
        self.metrics
            .upstream_duration
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        match forwarded {
            Ok(answer) => {
                log("forwarded", 0);
                Some(answer)
            }
            Err(e) => {
                self.metrics.upstream_failures.get_or_create(&labels).inc();
                log(&format!("forwarding failed ({e})"), 0);
                tracing::warn!(src = %canonical(src), domain = %req.name(), error = %e, "DNS forwarding failed");
                req.servfail()
            }
        }
    }
}

/// Binds UDP and TCP on each address (`required: false` ones are skipped when the
/// namespace lacks them, e.g. `::1`) and serves them until `stop`. Returns the bound
/// addresses.
pub async fn serve(
    handler: Arc<DnsHandler>,
    addrs: &[(SocketAddr, bool)],
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Vec<SocketAddr>, (SocketAddr, io::Error)> {
    let mut bound = Vec::new();
    let mut sockets = Vec::new();
    for &(addr, required) in addrs {
        let pair = async {
            let udp = handler.sockets.bind_udp(addr).await?;
            let tcp = handler
                .sockets
                .bind_listener(addr, ListenerKind::Dns)
                .await?;
            io::Result::Ok((udp, tcp))
        };
        match pair.await {
            Ok((udp, tcp)) => {
                bound.push(udp.local_addr().unwrap_or(addr));
                sockets.push((udp, tcp));
            }
            Err(e) if !required => {
                tracing::debug!(addr = %addr, error = %e, "DNS proxy not listening on this address");
            }
            Err(e) => return Err((addr, e)),
        }
    }
    for (udp, tcp) in sockets {
        tracker.spawn(udp_loop(
            handler.clone(),
            udp,
            tracker.clone(),
            stop.clone(),
        ));
        tracker.spawn(tcp_loop(
            handler.clone(),
            tcp,
            tracker.clone(),
            stop.clone(),
        ));
    }
    Ok(bound)
}

async fn udp_loop(
    handler: Arc<DnsHandler>,
    sock: UdpSocket,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let sock = Arc::new(sock);
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_UDP));
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => break,
            r = sock.recv_from(&mut buf) => r,
        };
        let (n, src) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            tracing::debug!(src = %src, "too many DNS queries in flight; dropped");
            continue;
        };
        let query = buf[..n].to_vec();
        let (handler, sock) = (handler.clone(), sock.clone());
        tracker.spawn(async move {
            let _permit = permit;
            if let Some(answer) = handler.handle(&query, src, true).await
                && let Err(e) = sock.send_to(&answer, src).await
            {
                tracing::debug!(dst = %src, error = %e, "DNS answer not sent");
            }
        });
    }
}

async fn tcp_loop(
    handler: Arc<DnsHandler>,
    listener: TcpListener,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, src)) => {
                tracker.spawn(tcp_conn(handler.clone(), stream, src, stop.clone()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn tcp_conn(
    handler: Arc<DnsHandler>,
    mut stream: TcpStream,
    src: SocketAddr,
    stop: CancellationToken,
) {
    loop {
        let query = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)) => r,
        };
        let query = match query {
            Ok(Ok(Some(q))) => q,
            // Idle, closed or broken: done.
            _ => return,
        };
        let Some(answer) = handler.handle(&query, src, false).await else {
            return;
        };
        if write_framed(&mut stream, &answer).await.is_err() {
            return;
        }
    }
}
