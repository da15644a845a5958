//! Node-local fast path of the node-scope (TPROXY) proxy.
//!
//! When a captured outbound connection's HBONE destination is a workload this same proxy
//! serves (both pods on this node), the connection is handed straight to the inbound side
//! (authorization with the source's identity, connect with the original source, telemetry
//! for both directions) instead of a network round trip. In GENEVE mode there is no other
//! way: the node routes ztunnel's own traffic directly to the pod, so a connection to the
//! pod's 15008 would never come back to ztunnel. Upstream ztunnel does the same in shared
//! mode ("node local fast path"). It needs `NODE_NAME`: without it no destination counts
//! as local.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::ProxyCtx;
use super::authorize::{AuthorizationRequest, authorize};
use super::conntrack::ConnGuard;
use super::policy_watch::Authorized;
use crate::identity::Identity;
use crate::state::{Service, Workload};
use crate::telemetry::{
    ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, RefusalReason, ResponseFlags,
    ServiceInfo,
};

/// Both ends of a node-local connection.
pub(super) struct LocalConnection {
    pub peer: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    pub src_identity: Identity,
    pub dst_workload: Arc<Workload>,
    pub target: SocketAddr,
    pub service: Option<Arc<Service>>,
}

pub(super) async fn handle(
    ctx: Arc<ProxyCtx>,
    mut client: TcpStream,
    c: LocalConnection,
    guard: ConnGuard,
) {
    let metrics = &ctx.inputs.metrics;
    let snap = ctx.inputs.state.snapshot();
    let decision = authorize(&AuthorizationRequest {
        snapshot: &snap,
        dst_workload: &c.dst_workload,
        src_identity: Some(&c.src_identity),
        src_ip: Some(c.peer.ip()),
        dst_addr: c.target,
    });
    let auth = decision.is_ok().then(|| {
        let auth = Authorized::new(
            c.dst_workload.clone(),
            Some(c.src_identity.clone()),
            Some(c.peer.ip()),
            c.target,
        );
        ctx.track_authorized(&guard, &snap, auth)
    });
    drop(snap);
    let src = c
        .src_workload
        .as_deref()
        .map(PeerInfo::from_workload)
        .unwrap_or_default()
        .with_identity(Some(c.src_identity.clone()));
    let dst =
        PeerInfo::from_workload(&c.dst_workload).with_identity(Some(c.dst_workload.identity()));
    let info = |direction| ConnectionInfo {
        direction,
        src_addr: c.peer,
        src: src.clone(),
        dst_addr: c.target,
        dst_hbone_addr: None,
        dst_service: c.service.as_deref().map(ServiceInfo::from_service),
        dst: dst.clone(),
        mtls: true,
    };
    let mut outbound = ConnectionTelemetry::open(metrics, info(Direction::Outbound));
    let mut inbound = ConnectionTelemetry::open(metrics, info(Direction::Inbound));
    let fail = |outbound: ConnectionTelemetry, inbound: ConnectionTelemetry, why: &str| {
        let flag = ResponseFlags::ConnectionFailure;
        outbound.close_with_flag(0, 0, Some(why), flag);
        inbound.close_with_flag(0, 0, Some(why), flag);
    };
    let (Ok(()), Some(auth)) = (&decision, auth) else {
        let denied = decision.expect_err("allowed connections are tracked");
        metrics.refused(Direction::Inbound, RefusalReason::policy_denied);
        let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
        let why = denied.to_string();
        let flag = ResponseFlags::AuthorizationPolicyDenied;
        outbound.close_with_flag(0, 0, Some(&why), flag);
        inbound.close_with_flag(0, 0, Some(&why), flag);
        return;
    };
    let orig_src = ctx.orig_src.then(|| c.peer.ip());
    let connect = ctx.sockets.connect(c.target, orig_src);
    let mut upstream = match tokio::time::timeout(ctx.inputs.cfg.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(outbound, inbound, &format!("connect to {}: {e}", c.target)),
        Err(_) => {
            return fail(
                outbound,
                inbound,
                &format!("connect to {} timed out", c.target),
            );
        }
    };
    tracing::debug!(src = %c.peer, dst = %c.target, "outbound: node-local fast path");
    guard.set_tunnel(&mut outbound, true);
    guard.count_bytes(&mut inbound, true);
    tokio::select! {
        out = super::copy::copy_tcp(&mut client, &mut upstream, guard.counters()) => {
            outbound.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
            inbound.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
        denied = auth.revoked() => {
            let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
            let (to, from) = guard.counters().load();
            let why = super::policy_watch::revocation_message(&denied);
            outbound.close_with_flag(to, from, Some(&why), ResponseFlags::AuthorizationPolicyDenied);
            ctx.close_revoked(inbound, &denied, to, from);
        }
    }
}
