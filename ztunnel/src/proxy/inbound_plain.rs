//! Inbound plaintext (15006): captured non-HBONE connections to the served workload are
//! passed through (after authorization, with no peer identity). Refusals before the
//! destination workload is known are access-log lines ("connection failed"), as upstream.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::ProxyCtx;
use super::authorize::{AuthorizationRequest, authorize};
use super::conntrack::ConnGuard;
use super::policy_watch::Authorized;
use crate::telemetry::{
    ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, RefusalReason, ResponseFlags,
    ServiceInfo, log_early_deny,
};

pub(super) async fn handle(
    ctx: Arc<ProxyCtx>,
    mut client: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
) {
    let metrics = &ctx.inputs.metrics;
    let target = match ctx.sockets.original_destination(&client) {
        Ok(d) => d,
        Err(e) => {
            let local = client.local_addr().unwrap_or(peer);
            let why = format!("cannot recover the original destination: {e}");
            log_early_deny(Direction::Inbound, peer, local, None, &why);
            metrics.refused(Direction::Inbound, RefusalReason::bad_request);
            return;
        }
    };
    guard.set_dst(target);
    if ctx.inputs.cfg.is_proxy_port(target.port()) {
        let why = format!("target {target} is a proxy port");
        log_early_deny(Direction::Inbound, peer, target, None, &why);
        metrics.refused(Direction::Inbound, RefusalReason::bad_request);
        return;
    }
    // In workload scope, wait for the served workload to be known (as upstream).
    let snap = super::inbound::local_snapshot(&ctx, target.ip()).await;
    // The served workload on whichever network it is (a plaintext peer shares it).
    let dst_workload = match ctx.served_at(&snap, target.ip()) {
        Some(w) => w.clone(),
        None => {
            let why = "no workload served by this proxy at the destination";
            log_early_deny(Direction::Inbound, peer, target, None, why);
            metrics.refused(Direction::Inbound, RefusalReason::upstream_unavailable);
            return;
        }
    };
    let src_workload = snap
        .workload_by_ip(&dst_workload.network, peer.ip())
        .cloned();
    let dst_service = snap
        .guess_inbound_service(&dst_workload, None, target.port())
        .map(|s| ServiceInfo::from_service(&s));
    let decision = authorize(&AuthorizationRequest {
        snapshot: &snap,
        dst_workload: &dst_workload,
        src_identity: None,
        src_ip: Some(peer.ip()),
        dst_addr: target,
    });
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        src_addr: peer,
        src: src_workload
            .as_deref()
            .map(PeerInfo::from_workload)
            .unwrap_or_default(),
        dst_addr: target,
        dst_hbone_addr: None,
        dst_service,
        dst: PeerInfo::from_workload(&dst_workload),
        mtls: false,
    };
    let mut tele = ConnectionTelemetry::open(metrics, info);
    let auth = match decision {
        Ok(()) => {
            let auth = Authorized::new(dst_workload.clone(), None, Some(peer.ip()), target);
            ctx.track_authorized(&guard, &snap, auth)
        }
        Err(denied) => {
            metrics.refused(Direction::Inbound, RefusalReason::policy_denied);
            reset(&client);
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
    let orig_src = ctx.orig_src.then(|| peer.ip());
    let connect = ctx.sockets.connect(target, orig_src);
    let mut upstream = match tokio::time::timeout(ctx.inputs.cfg.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = format!("connect to {target}: {e}");
            tele.close_with_flag(0, 0, Some(&why), ResponseFlags::ConnectionFailure);
            return;
        }
        Err(_) => {
            let why = format!("connect to {target} timed out");
            tele.close_with_flag(0, 0, Some(&why), ResponseFlags::ConnectionFailure);
            return;
        }
    };
    guard.set_tunnel(&mut tele, true);
    tokio::select! {
        out = super::copy::copy_tcp(&mut client, &mut upstream, guard.counters()) => {
            tele.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
        denied = auth.revoked() => {
            reset(&client);
            let (to, from) = guard.counters().load();
            ctx.close_revoked(tele, &denied, to, from);
        }
    }
}

/// Makes closing `client` send a reset: a client must not mistake a denial for an empty
/// reply or a normal end.
fn reset(client: &TcpStream) {
    let _ = socket2::SockRef::from(client).set_linger(Some(std::time::Duration::ZERO));
}
