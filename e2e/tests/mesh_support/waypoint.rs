//! A waypoint stand-in for tests (Envoy is not available here): an HBONE server in its own
//! pod netns that terminates the CONNECT (mutual TLS with its own waypoint identity),
//! resolves the `:authority` (`VIP:port` → a healthy endpoint and its target port, or a
//! workload address as is) from the same local config file the ztunnels read, and opens
//! HBONE to the endpoint pod's ztunnel (`podIP:15008`, authority `podIP:targetPort`,
//! verifying the endpoint's identity), then relays bytes both ways.
//!
//! As an east-west gateway ([`Waypoint::start_gateway`], Istio's multi-network contract)
//! it answers a CONNECT naming `service-hostname:port` instead, and relays the stream's
//! bytes, unread, over plain TCP to one endpoint's HBONE port (`podIP:15008`): the client
//! inside runs its own HBONE with the endpoint (double HBONE).
//!
//! Every CONNECT it answers is recorded ([`Waypoint::records`]): that is the "access log"
//! tests use to prove traffic went through it.

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use e2e::netsim::NamedNetns;
use h2::{RecvStream, SendStream};
use http::{Response, StatusCode};
use tokio::net::{TcpListener, TcpSocket};
use ztunnel::hbone::headers::{
    ConnectRequest, HboneTarget, build_request, parse_authority, parse_target,
};
use ztunnel::hbone::server::tls_accept;
use ztunnel::hbone::tls_connect;
use ztunnel::identity::local_ca::LocalCa;
use ztunnel::identity::{Identity, SecretManager};
use ztunnel::state::Store;
use ztunnel::state::file::{FileDefaults, load};
use ztunnel::tls::TrustRoots;

/// One CONNECT the waypoint answered.
#[derive(Debug, Clone)]
pub struct Record {
    /// The TCP peer (the client's ztunnel, or a direct client).
    pub peer: SocketAddr,
    /// Identity proven by the peer's certificate.
    pub peer_identity: String,
    /// The `:authority` received.
    pub authority: String,
    /// The `forwarded` header received, if any.
    pub forwarded: Option<String>,
    /// Where it was sent (`podIP:targetPort`), when resolved.
    pub upstream: Option<SocketAddr>,
    /// What the waypoint answered.
    pub status: u16,
    /// Source → destination bytes relayed (set when the stream finished).
    pub bytes_up: u64,
    /// Destination → source bytes relayed.
    pub bytes_down: u64,
}

struct Shared {
    /// East-west gateway (relay to `podIP:15008`) rather than waypoint.
    gateway: bool,
    netns: NamedNetns,
    identity: Identity,
    certs: Arc<SecretManager>,
    roots: TrustRoots,
    config: PathBuf,
    records: Mutex<Vec<Record>>,
}

/// A running waypoint; stops when dropped.
pub struct Waypoint {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Waypoint {
    /// Listens on `0.0.0.0:15008` inside `netns` (a pod without capture rules) as
    /// `identity`, with certificates from `ca`, resolving targets from `config`.
    pub fn start(netns: NamedNetns, identity: Identity, ca: Arc<LocalCa>, config: PathBuf) -> Self {
        Self::start_as(false, netns, identity, ca, config)
    }

    /// As [`Self::start`], as an east-west gateway: a CONNECT for `hostname:port` is
    /// relayed as bytes to an endpoint of that service at `podIP:15008`.
    pub fn start_gateway(
        netns: NamedNetns,
        identity: Identity,
        ca: Arc<LocalCa>,
        config: PathBuf,
    ) -> Self {
        Self::start_as(true, netns, identity, ca, config)
    }

    fn start_as(
        gateway: bool,
        netns: NamedNetns,
        identity: Identity,
        ca: Arc<LocalCa>,
        config: PathBuf,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("waypoint")
            .enable_all()
            .build()
            .expect("waypoint runtime");
        let listener = netns
            .run(|| std::net::TcpListener::bind(("0.0.0.0", 15008)))
            .expect("enter waypoint netns")
            .expect("bind waypoint 15008");
        listener.set_nonblocking(true).unwrap();
        let roots = TrustRoots::from_der([ca.root_certificate().clone()], "test root").unwrap();
        let shared = Arc::new(Shared {
            gateway,
            netns,
            identity,
            certs: SecretManager::new(ca, Duration::from_secs(3600)),
            roots,
            config,
            records: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_connection(s.clone(), tcp, peer));
            }
        });
        Waypoint {
            shared,
            runtime: Some(runtime),
        }
    }

    /// Every CONNECT answered so far.
    pub fn records(&self) -> Vec<Record> {
        self.shared.records.lock().unwrap().clone()
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn serve_connection(s: Arc<Shared>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let Ok(cert) = s.certs.fetch_certificate(&s.identity).await else {
        return;
    };
    let cfg = ztunnel::tls::server_config(&cert, &s.roots, s.identity.trust_domain());
    let Ok(tls) = tls_accept(tcp, cfg, Duration::from_secs(5)).await else {
        return;
    };
    let peer_identity = ztunnel::tls::peer_identity(
        tls.get_ref().1.peer_certificates(),
        s.identity.trust_domain(),
    )
    .map(|i| i.to_string())
    .unwrap_or_default();
    let Ok(mut conn) = h2::server::handshake(tls).await else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        let s = s.clone();
        let peer_identity = peer_identity.clone();
        tokio::spawn(async move {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let forwarded = req
                .headers()
                .get("forwarded")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let idx = {
                let mut r = s.records.lock().unwrap();
                r.push(Record {
                    peer,
                    peer_identity,
                    authority,
                    forwarded,
                    upstream: None,
                    status: 0,
                    bytes_up: 0,
                    bytes_down: 0,
                });
                r.len() - 1
            };
            let set = |f: &dyn Fn(&mut Record)| f(&mut s.records.lock().unwrap()[idx]);
            let mut respond = respond;
            if s.gateway {
                let relayed = match relay_target(&s, &req).await {
                    Ok((upstream, tcp)) => {
                        set(&|r| {
                            r.status = 200;
                            r.upstream = Some(upstream);
                        });
                        let ok = Response::builder().status(200).body(()).unwrap();
                        respond
                            .send_response(ok, false)
                            .ok()
                            .map(|send| (send, tcp))
                    }
                    Err(status) => {
                        set(&|r| r.status = status.as_u16());
                        let no = Response::builder().status(status).body(()).unwrap();
                        let _ = respond.send_response(no, true);
                        None
                    }
                };
                if let Some((send, mut tcp)) = relayed {
                    let stream = ztunnel::hbone::H2Stream::new(send, req.into_body());
                    let counters = Default::default();
                    let out = ztunnel::hbone::copy_tcp_h2(&mut tcp, stream, &counters).await;
                    set(&|r| {
                        r.bytes_up = out.to_tunnel;
                        r.bytes_down = out.from_tunnel;
                    });
                }
                return;
            }
            let (upstream, send_up, recv_down) = match forward(&s, &req, peer).await {
                Ok(x) => x,
                Err(status) => {
                    set(&|r| r.status = status.as_u16());
                    let _ = respond
                        .send_response(Response::builder().status(status).body(()).unwrap(), true);
                    return;
                }
            };
            set(&|r| {
                r.status = 200;
                r.upstream = Some(upstream);
            });
            let Ok(send_down) =
                respond.send_response(Response::builder().status(200).body(()).unwrap(), false)
            else {
                return;
            };
            let recv_up = req.into_body();
            let (up, down) = tokio::join!(pump(recv_up, send_up), pump(recv_down, send_down));
            set(&|r| {
                r.bytes_up = up;
                r.bytes_down = down;
            });
        });
    }
}

/// An east-west gateway's onward hop: the service named `hostname:port` in the request,
/// one of its endpoints (any network), and a plain TCP connection to its HBONE port from
/// the gateway's netns.
async fn relay_target(
    s: &Shared,
    req: &http::Request<RecvStream>,
) -> Result<(SocketAddr, tokio::net::TcpStream), StatusCode> {
    let HboneTarget::Host { hostname, port } =
        parse_authority(req).map_err(|_| StatusCode::BAD_REQUEST)?
    else {
        return Err(StatusCode::BAD_REQUEST);
    };
    let snap = load_state(s)?.snapshot();
    let svc = snap
        .services()
        .find(|svc| svc.hostname == hostname)
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    let (workload, _) = snap
        .pick_endpoint(svc, port)
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    let ip: IpAddr = *workload
        .workload_ips
        .first()
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    let hbone = SocketAddr::new(ip, 15008);
    Ok((hbone, connect_from(s, hbone).await?))
}

/// A TCP connection to `dst` from the stand-in's netns (the socket is created there).
async fn connect_from(s: &Shared, dst: SocketAddr) -> Result<tokio::net::TcpStream, StatusCode> {
    fn unavailable<E>(_: E) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
    let sock = s.netns.run(TcpSocket::new_v4).map_err(unavailable)?;
    sock.map_err(unavailable)?
        .connect(dst)
        .await
        .map_err(unavailable)
}

/// The state in the local config file the ztunnels read.
fn load_state(s: &Shared) -> Result<Store, StatusCode> {
    let defaults = FileDefaults {
        trust_domain: s.identity.trust_domain().to_string(),
        cluster_id: "Kubernetes".into(),
    };
    let cfg = load(&s.config, &defaults).map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let store = Store::new();
    store
        .source("file")
        .replace_all(cfg.workloads, cfg.services, cfg.policies);
    Ok(store)
}

/// Resolves the request's target and opens the onward HBONE stream: the endpoint address and
/// the two halves of the new stream, or the status to answer.
async fn forward(
    s: &Shared,
    req: &http::Request<RecvStream>,
    client: SocketAddr,
) -> Result<(SocketAddr, SendStream<Bytes>, RecvStream), StatusCode> {
    let target = parse_target(req).map_err(|_| StatusCode::BAD_REQUEST)?;
    let snap = load_state(s)?.snapshot();
    let (workload, port, host) = if let Some(svc) = snap.service_by_vip("", target.ip()) {
        let (w, port) = snap
            .pick_endpoint(svc, target.port())
            .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
        (w, port, Some(svc.hostname.clone()))
    } else if let Some(w) = snap.workload_by_ip("", target.ip()) {
        (w.clone(), target.port(), None)
    } else {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    };
    let ip: IpAddr = *workload
        .workload_ips
        .first()
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    let upstream = SocketAddr::new(ip, port);
    let hbone = SocketAddr::new(ip, 15008);
    let cert = s
        .certs
        .fetch_certificate(&s.identity)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let tcp = connect_from(s, hbone).await?;
    let tls_cfg = ztunnel::tls::client_config(&cert, &s.roots, vec![workload.identity()]);
    let tls = tls_connect(tcp, tls_cfg, hbone)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    tokio::spawn(conn);
    let mut send = send
        .ready()
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let request = build_request(&ConnectRequest {
        authority: upstream.into(),
        client: Some(client),
        host,
        baggage: None,
        forwarded_network: None,
    });
    let (resp, send_up) = send
        .send_request(request, false)
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let resp = resp.await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    if resp.status() != StatusCode::OK {
        // Pass the destination's answer on (e.g. 401 from its policy).
        return Err(resp.status());
    }
    Ok((upstream, send_up, resp.into_body()))
}

/// Relays DATA frames from `recv` to `send` (respecting flow control) until END_STREAM;
/// returns the bytes relayed.
async fn pump(mut recv: RecvStream, mut send: SendStream<Bytes>) -> u64 {
    let mut total = 0u64;
    while let Some(Ok(mut chunk)) = recv.data().await {
        let n = chunk.len();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let mut cap = send.capacity();
            while cap == 0 {
                match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(c)) => cap = c,
                    _ => return total,
                }
            }
            let part = chunk.split_to(cap.min(chunk.len()));
            if send.send_data(part, false).is_err() {
                return total;
            }
        }
        let _ = recv.flow_control().release_capacity(n);
        total += n as u64;
    }
    let _ = send.send_data(Bytes::new(), true);
    total
}
