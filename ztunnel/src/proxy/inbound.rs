//! Inbound HBONE (15008): mutual TLS, then HTTP/2 CONNECT streams to the served workload.
//!
//! Per TCP connection: TLS 1.3 with a client certificate chained to the roots and in our
//! trust domain (deadline `HANDSHAKE_TIMEOUT`); the certificate's identity must be the
//! identity of the workload at the connection's source IP when that IP is a known workload,
//! or, when that workload is a peer node proxy, of a workload on its node; the network's
//! east-west gateway relays other networks' clients ([`super::source_check`]).
//! Per stream: `CONNECT` only (else 400); `:authority` a service's `hostname:port` (double
//! HBONE: the served workload on its target port for that service, else 503) or an
//! `ip:port` (else 400) whose IP is
//! the address this connection reached — or, when the workload there is the waypoint of the
//! authority's service/workload, any such address (see [`destination`]) — (else 400),
//! whose port is not a proxy port, 15001/15006/15008 (else 503, as upstream); a workload
//! served by this proxy at that IP (else 503); authorization (else 401); upstream connect
//! (else 503); then 200 and bytes.
//! Telemetry: the destination service is guessed from `forwarded: host=` and the port among
//! the workload's services; an unknown source is described by its `baggage`. Refusals
//! before the destination workload is known are access-log lines ("connection failed"),
//! as upstream's early denials.
//! A workload with an application tunnel ([`app_tunnel`]) gets its streams on the
//! tunnel's port, with a PROXY header when it asks for one, and any target.
//! As upstream, a connection to an in-pod (or dedicated) proxy whose workload the state
//! does not know yet waits for it ([`local_snapshot`], 5 s at most), and a target IP this
//! proxy's state does not know is asked for on demand (`XDS_ON_DEMAND`) before the
//! waypoint check.

use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::app_tunnel;
use super::authorize::{AuthorizationRequest, authorize};
use super::conntrack::ConnGuard;
use super::policy_watch::Authorized;
use super::source_check::{Source, check_source};
use super::{ProxyCtx, ProxyScope};
use crate::hbone::headers::{
    BAGGAGE, Baggage, FORWARDED, HboneTarget, baggage_for, forwarded_host, parse_authority,
    parse_baggage,
};
use crate::hbone::server::{AcceptError, respond_status, serve, tls_accept};
use crate::hbone::{H2Stream, copy_tcp_h2};
use crate::identity::Identity;
use crate::proxy::sockets::canonical;
use crate::state::on_demand::Unanswered;
use crate::state::{Snapshot, Workload};
use crate::telemetry::{
    ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, RefusalReason, Reporter,
    ResponseFlags, ServiceInfo, SocketOpen,
};

/// What every stream of one HBONE connection shares.
struct Peer {
    addr: SocketAddr,
    local: SocketAddr,
    /// The network of the served workload at `local`: where targets are looked up.
    network: String,
    identity: Identity,
    workload: Option<Arc<Workload>>,
    /// The client's address as policies see it: `None` when the peer is a node proxy
    /// without original source (the connection comes from the proxy's address, not the
    /// client's).
    policy_src_ip: Option<IpAddr>,
}

pub(super) async fn handle(
    ctx: Arc<ProxyCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    _guard: ConnGuard,
) {
    let metrics = &ctx.inputs.metrics;
    // As upstream: the accepted socket, from accept to close, once however many streams
    // it carries (each stream is a connection in the `istio_tcp_connections_*` families).
    let _socket = SocketOpen::new(metrics, Reporter::destination);
    let local = match tcp.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => {
            tracing::warn!(src = %peer, error = %e, "inbound: no local address; closing");
            return;
        }
    };
    let snap = match &ctx.scope {
        ProxyScope::Node => ctx.snapshot_serving(local.ip()).await,
        ProxyScope::Workload(_) => local_snapshot(&ctx, local.ip()).await,
    };
    let local_identity = match &ctx.scope {
        ProxyScope::Workload(_) => ctx.local_identity(&snap),
        ProxyScope::Node => match ctx.served_at(&snap, local.ip()) {
            Some(w) => w.identity(),
            None => {
                early_deny(
                    peer,
                    local,
                    "no workload of this node at the destination address",
                );
                metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
                return;
            }
        },
    };
    let cert = match ctx.inputs.certs.fetch_certificate(&local_identity).await {
        Ok(c) => c,
        Err(e) => {
            early_deny(
                peer,
                local,
                &format!("no certificate for {local_identity} to serve with: {e}"),
            );
            metrics.refused(Direction::Inbound, RefusalReason::no_identity);
            return;
        }
    };
    let config = crate::tls::server_config(&cert, &ctx.inputs.roots, local_identity.trust_domain());
    drop(cert);
    let tls = match tls_accept(tcp, config, ctx.inputs.cfg.handshake_timeout).await {
        Ok(t) => t,
        Err(e) => {
            let reason = match e {
                AcceptError::Timeout(_) => RefusalReason::handshake_timeout,
                _ => RefusalReason::tls_handshake,
            };
            if let AcceptError::Handshake(io) = &e
                && crate::tls::crl::is_revoked(io)
            {
                metrics.crl_rejections(Reporter::destination).inc();
            }
            early_deny(peer, local, &e.to_string());
            metrics.refused(Direction::Inbound, reason);
            return;
        }
    };
    let Some(peer_identity) = crate::tls::peer_identity(
        tls.get_ref().1.peer_certificates(),
        local_identity.trust_domain(),
    ) else {
        early_deny(peer, local, "client certificate has no SPIFFE identity");
        metrics.refused(Direction::Inbound, RefusalReason::tls_handshake);
        return;
    };
    // A workload may present only its own certificate from its own address; a peer node
    // proxy (TPROXY mode without original source) those of its node's workloads: see
    // `source_check`.
    let network = ctx.local_network(&snap, local.ip());
    // The client's address as policies see it: unknown behind a node proxy.
    let (src_workload, policy_src_ip) = match check_source(
        &snap,
        &network,
        peer.ip(),
        &peer_identity,
        &ctx.inputs.cfg.trusted_node_accounts,
    ) {
        Ok(Source::Workload(w)) => (w, Some(peer.ip())),
        Ok(Source::NetworkGateway(gw)) => {
            tracing::debug!(src = %peer, dst = %local, peer_identity = %peer_identity, gateway = %gw.uid, "inbound: HBONE connection relayed by the network's east-west gateway");
            (None, None)
        }
        Ok(Source::NodeProxy(proxy)) => {
            tracing::debug!(src = %peer, dst = %local, peer_identity = %peer_identity, node_proxy = %proxy.uid, "inbound: HBONE connection from a node proxy without original source");
            (None, None)
        }
        Err(e) => {
            tracing::error!(
                src = %peer,
                dst = %local,
                peer_identity = %peer_identity,
                expected = %e.expected().map(|i| i.to_string()).unwrap_or_default(),
                error = %e,
                "inbound: refused HBONE connection: client certificate identity is not the identity of the workload at the source address"
            );
            early_deny(peer, local, &e.to_string());
            metrics.refused(Direction::Inbound, RefusalReason::identity_mismatch);
            return;
        }
    };
    drop(snap);
    let shared = Arc::new(Peer {
        addr: peer,
        local,
        network,
        identity: peer_identity,
        workload: src_workload,
        policy_src_ip,
    });
    // With CRL_PATH: a reloaded list revoking the client's chain closes the connection.
    let revocation = ctx.inputs.roots.revocation().and_then(|lists| {
        lists.watch_connection(
            tls.get_ref().1.peer_certificates(),
            ctx.inputs.roots.store(),
            webpki::KeyUsage::client_auth(),
            format!("{} ({peer})", shared.identity),
            metrics.crl_rejections(Reporter::destination),
        )
    });
    let handler_ctx = ctx.clone();
    let served = serve(
        tls,
        &ctx.inputs.cfg.h2,
        ctx.stop_accept.clone(),
        &ctx.tracker,
        move |req, respond| {
            let ctx = handler_ctx.clone();
            let peer = shared.clone();
            let guard = ctx
                .conns
                .enter(Direction::Inbound, "hbone_stream", peer.addr);
            let force = ctx.force.clone();
            async move {
                tokio::select! {
                    _ = force.cancelled() => {}
                    _ = handle_stream(&ctx, &peer, req, respond, &guard) => {}
                }
            }
        },
    );
    let result = match revocation {
        // No revocation lists: the connection as before, nothing else polled.
        None => served.await,
        Some(watch) => tokio::select! {
            r = served => r,
            // Dropping the connection resets its streams: their app connections close.
            () = watch.revoked() => Ok(()),
        },
    };
    if let Err(e) = result
        && !e.is_go_away()
        && !e.is_io()
    {
        tracing::debug!(src = %peer, error = %e, "inbound: HBONE connection ended with an error");
    }
}

async fn handle_stream(
    ctx: &Arc<ProxyCtx>,
    peer: &Peer,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    guard: &ConnGuard,
) {
    let metrics = &ctx.inputs.metrics;
    let reject = |respond: SendResponse<Bytes>,
                  status: StatusCode,
                  reason: RefusalReason,
                  why: &str| {
        tracing::debug!(src = %peer.addr, src.identity = %peer.identity, status = status.as_u16(), reason = why, "inbound: CONNECT refused");
        early_deny(peer.addr, peer.local, why);
        metrics.refused(Direction::Inbound, reason);
        respond_status(respond, status);
    };
    let (target, target_host) = match parse_authority(&req) {
        Ok(HboneTarget::Addr(t)) => (t, None),
        // Double HBONE through an east-west gateway: the service's hostname and port.
        Ok(HboneTarget::Host { hostname, port }) => {
            match service_target(ctx, peer.local.ip(), &hostname, port) {
                Ok(t) => (t, Some(hostname)),
                Err(why) => {
                    return reject(
                        respond,
                        StatusCode::SERVICE_UNAVAILABLE,
                        RefusalReason::upstream_unavailable,
                        &why,
                    );
                }
            }
        }
        Err(e) => {
            return reject(
                respond,
                StatusCode::BAD_REQUEST,
                RefusalReason::bad_request,
                &e.to_string(),
            );
        }
    };
    guard.set_dst(target);
    let mut snap = ctx.inputs.state.snapshot();
    if target.ip() != peer.local.ip() {
        // A "waypoint sandwich" target (a service VIP or another workload): with
        // XDS_ON_DEMAND, whether we are its waypoint may only be known after asking istiod
        // for it, as upstream does (unanswered: validated against what we know).
        snap = ctx
            .inputs
            .state
            .knowing(snap, &peer.network, target.ip())
            .await
            .unwrap_or_else(Unanswered::into_snapshot);
    }
    // A workload with an application tunnel gets any target: the PROXY header names it.
    let local_tunnel = snap
        .workload_by_ip(&peer.network, peer.local.ip())
        .is_some_and(|w| w.application_tunnel.is_some());
    let upstream_addr = match destination(&snap, &peer.network, peer.local, target, local_tunnel) {
        Ok(a) => a,
        Err(why) => {
            return reject(
                respond,
                StatusCode::BAD_REQUEST,
                RefusalReason::bad_request,
                &why,
            );
        }
    };
    // As upstream: checked once the destination is validated, answered like a target
    // that cannot be reached.
    if ctx.inputs.cfg.is_proxy_port(upstream_addr.port()) {
        return reject(
            respond,
            StatusCode::SERVICE_UNAVAILABLE,
            RefusalReason::bad_request,
            &format!("target {target} is a proxy port"),
        );
    }
    // XDS_ON_DEMAND: the served workload may not have been asked for yet.
    let snap = ctx
        .inputs
        .state
        .knowing(snap, &peer.network, upstream_addr.ip())
        .await
        .unwrap_or_else(Unanswered::into_snapshot);
    let Some(dst_workload) = snap
        .workload_by_ip(&peer.network, upstream_addr.ip())
        .cloned()
    else {
        return reject(
            respond,
            StatusCode::SERVICE_UNAVAILABLE,
            RefusalReason::upstream_unavailable,
            &format!(
                "no workload at {} on network {:?}",
                upstream_addr.ip(),
                peer.network
            ),
        );
    };
    if !ctx.serves(&dst_workload) {
        return reject(
            respond,
            StatusCode::SERVICE_UNAVAILABLE,
            RefusalReason::upstream_unavailable,
            &format!("workload {} is not served by this proxy", dst_workload.uid),
        );
    }
    let forwarded_host = req
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_host)
        .or(target_host);
    let dst_service = snap
        .guess_inbound_service(
            &dst_workload,
            forwarded_host.as_deref(),
            upstream_addr.port(),
        )
        .map(|s| ServiceInfo::from_service(&s));
    let src = match &peer.workload {
        Some(w) => PeerInfo::from_workload(w),
        // Not a workload we know (another cluster, a gateway): what the client says about
        // itself in `baggage`, as upstream does; the identity is the one TLS proved.
        None if ctx.inputs.cfg.enable_response_baggage => req
            .headers()
            .get(BAGGAGE)
            .and_then(|v| v.to_str().ok())
            .map(|v| peer_from_baggage(&parse_baggage(v)))
            .unwrap_or_default(),
        None => PeerInfo::default(),
    };
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        src_addr: peer.addr,
        src: src.with_identity(Some(peer.identity.clone())),
        dst_addr: peer.local,
        dst_hbone_addr: Some(target.into()),
        dst_service,
        dst: PeerInfo::from_workload(&dst_workload).with_identity(Some(dst_workload.identity())),
        mtls: true,
    };
    let decision = authorize(&AuthorizationRequest {
        snapshot: &snap,
        dst_workload: &dst_workload,
        src_identity: Some(&peer.identity),
        src_ip: peer.policy_src_ip,
        dst_addr: upstream_addr,
    });
    let mut tele = ConnectionTelemetry::open_stream(metrics, info);
    let auth = match decision {
        Ok(()) => {
            let auth = Authorized::new(
                dst_workload.clone(),
                Some(peer.identity.clone()),
                peer.policy_src_ip,
                upstream_addr,
            );
            ctx.track_authorized(guard, &snap, auth)
        }
        Err(denied) => {
            metrics.refused(Direction::Inbound, RefusalReason::policy_denied);
            respond_status(respond, StatusCode::UNAUTHORIZED);
            tele.close_with_flag(
                0,
                0,
                Some(&denied.to_string()),
                ResponseFlags::AuthorizationPolicyDenied,
            );
            return;
        }
    };
    drop(snap);
    let delivery = app_tunnel::delivery(
        dst_workload.application_tunnel.as_ref(),
        upstream_addr,
        target,
        ctx.inputs.cfg.localhost_app_tunnel && matches!(ctx.scope, ProxyScope::Workload(_)),
    );
    let orig_src = (ctx.orig_src && !delivery.from_loopback).then(|| peer.addr.ip());
    let upstream_addr = delivery.connect_to;
    let connect = ctx.sockets.connect(upstream_addr, orig_src);
    let failed = ResponseFlags::ConnectionFailure;
    let mut respond = respond;
    // A client that resets the stream meanwhile (gave up, or never meant it) ends the
    // attempt: no connection to the app is made for a stream nobody waits for.
    let connected = tokio::select! {
        r = tokio::time::timeout(ctx.inputs.cfg.connect_timeout, connect) => r,
        reset = poll_fn(|cx| respond.poll_reset(cx)) => {
            let why = match reset {
                Ok(reason) => format!("client reset the stream ({reason:?}) while connecting to {upstream_addr}"),
                Err(e) => format!("client connection failed while connecting to {upstream_addr}: {e}"),
            };
            tele.close(0, 0, Some(&why));
            return;
        }
    };
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
            respond_status(respond, StatusCode::SERVICE_UNAVAILABLE);
            let why = format!("connect to {upstream_addr}: {e}");
            tele.close_with_flag(0, 0, Some(&why), failed);
            return;
        }
        Err(_) => {
            metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
            respond_status(respond, StatusCode::SERVICE_UNAVAILABLE);
            let why = format!("connect to {upstream_addr} timed out");
            tele.close_with_flag(0, 0, Some(&why), failed);
            return;
        }
    };
    let mut ok = Response::builder().status(StatusCode::OK);
    if ctx.inputs.cfg.enable_response_baggage
        && let Ok(v) = http::HeaderValue::from_str(&baggage_for(&dst_workload))
    {
        // The destination describes itself, as upstream (read by a client that does not
        // know it, e.g. across an east-west gateway).
        ok = ok.header(BAGGAGE, v);
    }
    let send =
        match respond.send_response(ok.body(()).expect("a status-only response is valid"), false) {
            Ok(s) => s,
            Err(e) => {
                tele.close(0, 0, Some(&format!("send 200: {e}")));
                return;
            }
        };
    if let Some(proxy_target) = delivery.proxy_target {
        let header = app_tunnel::proxy_header(peer.addr, proxy_target, &peer.identity);
        let written = match header {
            Ok(h) => upstream.write_all(&h).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
            let why = format!("PROXY header to {upstream_addr}: {e}");
            tele.close_with_flag(0, 0, Some(&why), failed);
            return;
        }
    }
    // Inbound: the copy's "to tunnel" direction is destination → source.
    guard.set_tunnel(&mut tele, false);
    let stream = H2Stream::new(send, req.into_body());
    tokio::select! {
        // Inbound: the tunnel carries source → destination bytes.
        out = copy_tcp_h2(&mut upstream, stream, guard.counters()) => {
            tele.close(out.from_tunnel, out.to_tunnel, out.error.as_deref());
        }
        // Dropping the copy resets the stream and closes the upstream connection.
        denied = auth.revoked() => {
            let (to, from) = guard.counters().load();
            ctx.close_revoked(tele, &denied, from, to);
        }
    }
}

/// How long a connection waits for the served workload of an in-pod or dedicated proxy
/// to become known (upstream's bound).
const LOCAL_WORKLOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The current snapshot; in workload scope (in-pod, dedicated), once it knows the served
/// workload. A connection can arrive before that: the pod's proxy starts when the pod is
/// created, istiod's push of its workload may follow. As upstream, it waits for the
/// workload (at most [`LOCAL_WORKLOAD_WAIT`]) instead of being refused at once.
pub(super) async fn local_snapshot(ctx: &ProxyCtx, local_ip: IpAddr) -> Arc<Snapshot> {
    // With `XDS_ON_DEMAND` the served workload is known only once asked for (by the
    // address the connection reached): ask first, then wait.
    let snap = ctx.snapshot_serving(local_ip).await;
    let ProxyScope::Workload(info) = &ctx.scope else {
        return snap;
    };
    // Whichever node it is on: the workload `serves` accepts.
    let known_in = |s: &Snapshot| s.find_workload(info, None).is_some();
    if known_in(&snap) {
        return snap;
    }
    drop(snap);
    let mut changes = ctx.inputs.state.subscribe();
    let known = async {
        loop {
            if known_in(&ctx.inputs.state.snapshot()) {
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    if tokio::time::timeout(LOCAL_WORKLOAD_WAIT, known)
        .await
        .is_err()
    {
        tracing::warn!(
            workload = %format!("{}/{}", info.namespace, info.name),
            wait = ?LOCAL_WORKLOAD_WAIT,
            "inbound: the served workload is still unknown to the state"
        );
    }
    ctx.inputs.state.snapshot()
}

/// Where an inbound HBONE request for `target`, received on a connection to `local`, goes.
///
/// Normally the target IP is the address the connection reached: the target itself. When
/// it is not, the request is accepted only if the workload at `local` is the waypoint of
/// whatever owns the target IP (a service VIP or a workload; the "waypoint sandwich":
/// a captured waypoint receives `VIP:port` targets): then it goes to the local workload on
/// the target's port. Anything else is refused (400), as upstream's destination validation.
///
/// A workload with an application tunnel (`local_tunnel`) gets any target, on the target's
/// port, unchecked (as upstream: the PROXY header tells it what was asked for).
fn destination(
    snap: &Snapshot,
    network: &str,
    local: SocketAddr,
    target: SocketAddr,
    local_tunnel: bool,
) -> Result<SocketAddr, String> {
    if target.ip() == local.ip() {
        return Ok(target);
    }
    if local_tunnel {
        return Ok(SocketAddr::new(local.ip(), target.port()));
    }
    let local_is_waypoint = snap
        .waypoint_of_address(network, target.ip())
        .is_some_and(|gw| snap.gateway_contains(gw, |w| w.workload_ips.contains(&local.ip())));
    if local_is_waypoint {
        Ok(SocketAddr::new(local.ip(), target.port()))
    } else {
        Err(format!(
            "target {target} is not the address this connection reached ({}) and the workload there is not its waypoint",
            local.ip()
        ))
    }
}

/// The address a `hostname:port` target (double HBONE, as upstream) stands for: the served
/// workload at `local_ip` on the target port of its service with that hostname (the
/// workload's own port mapping, else the service's). Only a service the workload is an
/// endpoint of qualifies (upstream takes any service by that name).
fn service_target(
    ctx: &ProxyCtx,
    local_ip: IpAddr,
    hostname: &str,
    port: u16,
) -> Result<SocketAddr, String> {
    let snap = ctx.inputs.state.snapshot();
    let served = ctx
        .served_workload(&snap, local_ip)
        .ok_or_else(|| format!("no served workload at {local_ip} for {hostname}:{port}"))?;
    let mut keys: Vec<&String> = served
        .services
        .keys()
        .filter(|k| k.split_once('/').is_some_and(|(_, h)| h == hostname))
        .collect();
    // The workload's own namespace first, then by name: one answer for one state.
    keys.sort_by_key(|k| (!k.starts_with(&format!("{}/", served.namespace)), *k));
    let key = keys.first().ok_or_else(|| {
        format!(
            "target {hostname}:{port}: workload {} is not an endpoint of a service named {hostname}",
            served.uid
        )
    })?;
    let own = served.services[*key]
        .get(&port)
        .copied()
        .filter(|p| *p != 0);
    let from_service = || {
        let (namespace, hostname) = key.split_once('/')?;
        let svc = snap.service(&crate::state::workload::NamespacedHostname {
            namespace: namespace.into(),
            hostname: hostname.into(),
        })?;
        svc.ports.get(&port).copied().filter(|p| *p != 0)
    };
    let target_port = own.or_else(from_service).ok_or_else(|| {
        format!(
            "service {key} has no target port for port {port} on workload {}",
            served.uid
        )
    })?;
    Ok(SocketAddr::new(local_ip, target_port))
}

/// A connection or stream refused before it had a destination workload: as upstream, one
/// access-log line (target `access`, warn, "connection failed", `direction="inbound"`, the
/// connection's addresses and the reason), not counted in the `istio_tcp_*` families.
fn early_deny(src: SocketAddr, dst: SocketAddr, why: &str) {
    crate::telemetry::log_early_deny(Direction::Inbound, src, dst, None, why);
}

/// Source details from the client's `baggage` (a source we have no workload for).
fn peer_from_baggage(b: &Baggage) -> PeerInfo {
    PeerInfo {
        name: None,
        workload: b.workload_name.clone(),
        namespace: b.namespace.clone(),
        identity: None,
        workload_identity: None,
        cluster: b.cluster.clone(),
        canonical_service: b.service_name.clone(),
        canonical_revision: b.service_version.clone(),
        region: b.region.clone(),
        zone: b.zone.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::file::test_store;

    #[test]
    fn destination_validation_allows_only_the_targets_waypoint() {
        let yaml = r#"
workloads:
- {uid: app, name: app, namespace: ns, workloadIps: ["10.0.0.1"], protocol: HBONE,
   services: {"ns/app.ns.svc.cluster.local": {80: 8080}}}
- {uid: wp, name: wp, namespace: ns, serviceAccount: waypoint, workloadIps: ["10.0.0.50"],
   protocol: HBONE, services: {}}
- {uid: other, name: other, namespace: ns, workloadIps: ["10.0.0.2"], protocol: HBONE,
   waypoint: {destination: "/10.0.0.50"}, services: {}}
services:
- {name: app, namespace: ns, hostname: app.ns.svc.cluster.local, vips: ["/10.96.0.1"],
   ports: {80: 8080}, waypoint: {destination: "/10.0.0.50", hboneMtlsPort: 15008}}
- {name: nowp, namespace: ns, hostname: nowp.ns.svc.cluster.local, vips: ["/10.96.0.2"],
   ports: {80: 8080}}
"#;
        let snap = test_store(yaml).snapshot();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Normal case: the authority is the address reached.
        assert_eq!(
            destination(&snap, "", a("10.0.0.1:15008"), a("10.0.0.1:8080"), false),
            Ok(a("10.0.0.1:8080"))
        );
        // The service's waypoint (captured) receives VIP:port and a workload's address.
        assert_eq!(
            destination(&snap, "", a("10.0.0.50:15008"), a("10.96.0.1:80"), false),
            Ok(a("10.0.0.50:80"))
        );
        assert_eq!(
            destination(&snap, "", a("10.0.0.50:15008"), a("10.0.0.2:9000"), false),
            Ok(a("10.0.0.50:9000"))
        );
        // Anyone else asking for a VIP or another pod is refused, naming both addresses.
        let err =
            destination(&snap, "", a("10.0.0.1:15008"), a("10.96.0.1:80"), false).unwrap_err();
        assert!(
            err.contains("10.96.0.1:80") && err.contains("10.0.0.1"),
            "{err}"
        );
        assert!(destination(&snap, "", a("10.0.0.50:15008"), a("10.96.0.2:80"), false).is_err());
        assert!(destination(&snap, "", a("10.0.0.50:15008"), a("10.0.0.1:8080"), false).is_err());
        assert!(destination(&snap, "", a("10.0.0.2:15008"), a("10.0.0.1:8080"), false).is_err());
        // A workload with an application tunnel gets any target on its own address.
        assert_eq!(
            destination(&snap, "", a("10.0.0.2:15008"), a("10.96.0.2:80"), true),
            Ok(a("10.0.0.2:80"))
        );
    }

    #[test]
    fn baggage_describes_unknown_sources() {
        let p = peer_from_baggage(&parse_baggage(
            "k8s.cluster.name=east,k8s.namespace.name=ns,k8s.deployment.name=client,service.name=client,service.version=v2",
        ));
        assert_eq!(p.workload.as_deref(), Some("client"));
        assert_eq!(p.namespace.as_deref(), Some("ns"));
        assert_eq!(p.cluster.as_deref(), Some("east"));
        assert_eq!(p.canonical_revision.as_deref(), Some("v2"));
        assert!(p.principal().is_none());
    }
}
