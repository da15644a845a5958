//! Inbound HBONE (15008): mutual TLS, then HTTP/2 CONNECT streams to the served workload.
//!
//! Per TCP connection: TLS 1.3 with a client certificate chained to the roots and in our
//! trust domain (deadline `HANDSHAKE_TIMEOUT`); the certificate's identity must be the
//! identity of the workload at the connection's source IP when that IP is a known workload.
//! Per stream: `CONNECT` only (else 400), `:authority` an `ip:port` (else 400) whose IP is
//! the address this connection reached (else 400) and whose port is not a proxy port (else
//! 400); a workload served by this proxy at that IP (else 503); authorization (else 401);
//! upstream connect (else 503); then 200 and bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;

use super::authorize::{AuthorizationRequest, authorize};
use super::conntrack::ConnGuard;
use super::{ProxyCtx, ProxyScope};
use crate::hbone::headers::parse_target;
use crate::hbone::server::{AcceptError, respond_status, serve, tls_accept};
use crate::hbone::{H2Stream, copy_tcp_h2};
use crate::identity::Identity;
use crate::proxy::sockets::canonical;
use crate::state::Workload;
use crate::telemetry::{ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, RefusalReason};

/// What every stream of one HBONE connection shares.
struct Peer {
    addr: SocketAddr,
    local: SocketAddr,
    identity: Identity,
    workload: Option<Arc<Workload>>,
}

pub(super) async fn handle(
    ctx: Arc<ProxyCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    _guard: ConnGuard,
) {
    let metrics = &ctx.inputs.metrics;
    let local = match tcp.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => {
            tracing::warn!(src = %peer, error = %e, "inbound: no local address; closing");
            return;
        }
    };
    let snap = ctx.inputs.state.snapshot();
    let local_identity = match &ctx.scope {
        ProxyScope::Workload(_) => ctx.local_identity(&snap),
        ProxyScope::Node => match snap.workload_by_ip("", local.ip()) {
            Some(w) if ctx.serves(w) => w.identity(),
            _ => {
                tracing::warn!(src = %peer, dst = %local, "inbound: no workload of this node at the destination address; closing");
                metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
                return;
            }
        },
    };
    let cert = match ctx.inputs.certs.fetch_certificate(&local_identity).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(src = %peer, dst = %local, error = %e, "inbound: no certificate to serve with; closing");
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
            tracing::warn!(src = %peer, dst = %local, error = %e, "inbound: refused HBONE connection");
            metrics.refused(Direction::Inbound, reason);
            return;
        }
    };
    let Some(peer_identity) = crate::tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        tracing::warn!(src = %peer, dst = %local, "inbound: client certificate has no SPIFFE identity; closing");
        metrics.refused(Direction::Inbound, RefusalReason::tls_handshake);
        return;
    };
    let src_workload = snap.workload_by_ip("", peer.ip()).cloned();
    if let Some(w) = &src_workload {
        let expected = w.identity();
        if expected != peer_identity {
            tracing::error!(
                src = %peer,
                dst = %local,
                peer_identity = %peer_identity,
                expected = %expected,
                workload = %w.uid,
                "inbound: refused HBONE connection: client certificate identity is not the identity of the workload at the source address"
            );
            metrics.refused(Direction::Inbound, RefusalReason::identity_mismatch);
            return;
        }
    }
    drop(snap);
    let shared = Arc::new(Peer {
        addr: peer,
        local,
        identity: peer_identity,
        workload: src_workload,
    });
    let handler_ctx = ctx.clone();
    let result = serve(
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
    )
    .await;
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
        tracing::warn!(src = %peer.addr, src.identity = %peer.identity, status = status.as_u16(), reason = why, "inbound: CONNECT refused");
        metrics.refused(Direction::Inbound, reason);
        respond_status(respond, status);
    };
    let target = match parse_target(&req) {
        Ok(t) => t,
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
    if ctx.inputs.cfg.ports.is_proxy_port(target.port()) {
        return reject(
            respond,
            StatusCode::BAD_REQUEST,
            RefusalReason::bad_request,
            &format!("target {target} is a proxy port"),
        );
    }
    if target.ip() != peer.local.ip() {
        return reject(
            respond,
            StatusCode::BAD_REQUEST,
            RefusalReason::bad_request,
            &format!(
                "target {target} is not the address this connection reached ({})",
                peer.local.ip()
            ),
        );
    }
    let snap = ctx.inputs.state.snapshot();
    let Some(dst_workload) = snap.workload_by_ip("", target.ip()).cloned() else {
        return reject(
            respond,
            StatusCode::SERVICE_UNAVAILABLE,
            RefusalReason::upstream_unavailable,
            &format!("no workload at {}", target.ip()),
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
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        src_addr: peer.addr,
        src: peer
            .workload
            .as_deref()
            .map(PeerInfo::from_workload)
            .unwrap_or_default()
            .with_identity(Some(peer.identity.clone())),
        dst_addr: target,
        dst_hbone_addr: Some(target),
        dst_service: None,
        dst: PeerInfo::from_workload(&dst_workload).with_identity(Some(dst_workload.identity())),
        mtls: true,
    };
    let decision = authorize(&AuthorizationRequest {
        snapshot: &snap,
        dst_workload: &dst_workload,
        src_identity: Some(&peer.identity),
        src_addr: peer.addr,
        dst_addr: target,
    });
    drop(snap);
    let mut tele = ConnectionTelemetry::open(metrics, info);
    if let Err(denied) = decision {
        metrics.refused(Direction::Inbound, RefusalReason::policy_denied);
        respond_status(respond, StatusCode::UNAUTHORIZED);
        tele.close(0, 0, Some(&denied.to_string()));
        return;
    }
    let orig_src = ctx.orig_src.then(|| peer.addr.ip());
    let connect = ctx.sockets.connect(target, orig_src);
    let mut upstream = match tokio::time::timeout(ctx.inputs.cfg.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
            respond_status(respond, StatusCode::SERVICE_UNAVAILABLE);
            tele.close(0, 0, Some(&format!("connect to {target}: {e}")));
            return;
        }
        Err(_) => {
            metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
            respond_status(respond, StatusCode::SERVICE_UNAVAILABLE);
            tele.close(0, 0, Some(&format!("connect to {target} timed out")));
            return;
        }
    };
    let mut respond = respond;
    let send = match respond.send_response(
        Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("a status-only response is valid"),
        false,
    ) {
        Ok(s) => s,
        Err(e) => {
            tele.close(0, 0, Some(&format!("send 200: {e}")));
            return;
        }
    };
    tele.established();
    let out = copy_tcp_h2(&mut upstream, H2Stream::new(send, req.into_body())).await;
    // Inbound: the tunnel carries source → destination bytes.
    tele.close(out.from_tunnel, out.to_tunnel, out.error.as_deref());
}
