//! Outbound (15001): a captured connection of the served workload goes to its original
//! destination, tunnelled over HBONE when the destination is in the mesh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conntrack::ConnGuard;
use super::{ProxyCtx, ProxyScope};
use crate::hbone::headers::{self, ConnectRequest, HboneTarget};
use crate::hbone::{self, PoolKey};
use crate::identity::Identity;
use crate::state::gateway::GatewayHop;
use crate::state::on_demand::Unanswered;
use crate::state::workload::{GatewayAddress, LoadBalancerMode};
use crate::state::{Destination, Protocol, Service, Snapshot, Workload};
use crate::telemetry::{
    ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, RefusalReason, ResponseFlags,
    ServiceInfo,
};

/// Where a connection goes.
#[derive(Debug)]
pub(super) enum Route {
    /// Through HBONE to `hbone_addr` (the destination's ztunnel, or a waypoint) with
    /// `:authority` = `target`.
    Hbone {
        /// The workload the tunnel reaches: the destination, or the waypoint.
        workload: Arc<Workload>,
        /// The HBONE target (`podIP:targetPort`; the original `VIP:port` or workload
        /// address when going through a waypoint).
        target: SocketAddr,
        hbone_addr: SocketAddr,
        /// The service the client addressed.
        service: Option<Arc<Service>>,
        /// Identities the peer at `hbone_addr` may prove.
        expected: Vec<Identity>,
        /// `workload` is the destination's (or its service's) waypoint.
        waypoint: bool,
    },
    /// To a workload on another network, through that network's east-west gateway
    /// (double HBONE, as upstream): a pooled HBONE stream to the gateway, with a second
    /// HBONE connection to `workload` inside it. Both CONNECTs name
    /// `service-hostname:port`, the port the client dialled.
    DoubleHbone {
        /// The gateway: the outer tunnel's peer and the identities it may prove.
        gateway: GatewayHop,
        /// The workload the inner tunnel reaches: the endpoint, or the service's waypoint.
        workload: Arc<Workload>,
        service: Arc<Service>,
        port: u16,
        /// Identities the inner tunnel's peer may prove.
        expected: Vec<Identity>,
    },
    /// Plain TCP to `target` (not in the mesh, or a TCP-protocol workload).
    Plain {
        target: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
    /// To a service endpoint known only by hostname: resolved when connecting
    /// ([`super::on_demand_dns`]), then to `resolved_ip:port` as its protocol says.
    OnDemandDns {
        workload: Arc<Workload>,
        /// The target port.
        port: u16,
        service: Arc<Service>,
    },
    /// Addressed to the mesh but nowhere to send it: a service VIP without a healthy
    /// endpoint, or a waypoint that does not resolve.
    Unroutable {
        service: Option<Arc<Service>>,
        reason: String,
    },
}

/// Decides where a connection from `src` to `dst` goes.
///
/// `dst` is looked up as [`Snapshot::destination`] says: a service by host VIP, else the
/// workload with that IP, else a service by CIDR VIP holding it (a CIDR VIP routes exactly
/// as a host VIP); services not visible to the client's namespace are skipped.
///
/// - A service VIP with a waypoint: to the waypoint (one of the weighted ones, picked per
///   connection, when it has them; authority = `dst`), unless `src` is one of its
///   waypoints (no loops).
/// - A service VIP whose load balancer mode is `Passthrough` (a ServiceEntry with
///   `resolution: NONE`): plaintext to `dst` itself, with or without endpoints (upstream's
///   `OriginalDestination`); the service is kept for telemetry.
/// - A service VIP: a healthy endpoint picked at random, port mapped to its target port
///   (an endpoint known only by hostname: [`Route::OnDemandDns`]).
/// - A workload IP with a waypoint: to the waypoint (authority = `dst`), unless `src` is
///   that waypoint. Service-addressed traffic ignores the endpoint's own waypoint
///   (upstream's rule).
/// - HBONE workloads through their ztunnel at `ip:hbone_port`, verified against the
///   workload's identity plus the service's `subjectAltNames`; TCP workloads and unknown
///   addresses in plaintext.
/// - A service endpoint, or a service's waypoint, on another network than the client's:
///   through that network's east-west gateway ([`Route::DoubleHbone`]).
pub(super) fn resolve(
    snap: &Snapshot,
    src: Option<&Workload>,
    network: &str,
    dst: SocketAddr,
    hbone_port: u16,
) -> Route {
    let from = |gw: &GatewayAddress| src.is_some_and(|w| snap.is_gateway_workload(gw, w));
    let through = |gw: &GatewayAddress, service: Option<Arc<Service>>, owner: String| match snap
        .resolve_gateway(gw, dst.ip())
    {
        // As upstream: a service's waypoint on another network is reached through that
        // network's gateway.
        Ok(hop) if hop.workload.network != network && service.is_some() => {
            let svc = service.expect("checked");
            across_networks(snap, hop.workload, hop.identities, svc, dst)
        }
        Ok(hop) => Route::Hbone {
            workload: hop.workload,
            target: dst,
            hbone_addr: hop.addr,
            service,
            expected: hop.identities,
            waypoint: true,
        },
        Err(e) => Route::Unroutable {
            service,
            reason: format!("{owner}: {e}"),
        },
    };
    // A VIP several services share: the client's namespace's first, as upstream.
    let client_ns = src.map(|w| w.namespace.as_str());
    let (workload, target, service) = match snap.destination(network, dst.ip(), client_ns) {
        Some(Destination::Service(svc)) => {
            if !svc.waypoints().any(from)
                && let Some(gw) = svc.pick_waypoint(&mut rand::rng())
            {
                return through(gw, Some(svc.clone()), format!("service {}", svc.key()));
            }
            if svc
                .load_balancer
                .as_ref()
                .is_some_and(|lb| lb.mode == LoadBalancerMode::Passthrough)
            {
                // As upstream: a passthrough service (ServiceEntry with `resolution: NONE`) goes
                // to the address the client dialled, in plaintext, whatever its endpoints.
                return Route::Plain {
                    target: dst,
                    workload: None,
                    service: Some(svc.clone()),
                };
            }
            if !svc.ports.contains_key(&dst.port()) {
                // As kube-proxy and upstream's ztunnel: a VIP forwards only its own ports.
                return Route::Unroutable {
                    service: Some(svc.clone()),
                    reason: format!("service {} has no port {}", svc.key(), dst.port()),
                };
            }
            // An endpoint on another network is never dialled directly: through its
            // network's gateway.
            match snap.select_endpoint(src, Some(network), svc, dst.port()) {
                Ok((w, _)) if w.network != network => {
                    // As upstream: the service's SANs. istiod describes another network's
                    // endpoints by per-network stand-ins (no pod, no real service
                    // account), so their own identity is used only when the service names
                    // none (upstream then refuses every handshake).
                    let mut expected = svc.san_identities();
                    if expected.is_empty() {
                        expected.push(w.identity());
                    }
                    return across_networks(snap, w, expected, svc.clone(), dst);
                }
                Ok((w, port)) if w.workload_ips.is_empty() => {
                    // Only on this network, so no IP means a hostname (ServiceEntry DNS).
                    return Route::OnDemandDns {
                        workload: w,
                        port,
                        service: svc.clone(),
                    };
                }
                Ok((w, port)) => {
                    let ip = pick_ip(&w, dst.ip());
                    (w, SocketAddr::new(ip, port), Some(svc.clone()))
                }
                Err(e) => {
                    return Route::Unroutable {
                        service: Some(svc.clone()),
                        reason: e.to_string(),
                    };
                }
            }
        }
        Some(Destination::Workload(w)) => {
            if let Some(gw) = &w.waypoint
                && !from(gw)
            {
                return through(gw, None, format!("workload {}", w.uid));
            }
            (w.clone(), dst, None)
        }
        None => {
            return Route::Plain {
                target: dst,
                workload: None,
                service: None,
            };
        }
    };
    direct(workload, target, service, hbone_port)
}

/// To `workload` (on another network) through the east-west gateway its network names,
/// for a client that dialled `dst` of `service`; the inner tunnel's peer must prove one of
/// `expected`.
fn across_networks(
    snap: &Snapshot,
    workload: Arc<Workload>,
    expected: Vec<Identity>,
    service: Arc<Service>,
    dst: SocketAddr,
) -> Route {
    let gateway = match &workload.network_gateway {
        None => Err(format!(
            "workload {} is on network {:?}, which names no network gateway",
            workload.uid, workload.network
        )),
        Some(gw) => snap.resolve_gateway(gw, dst.ip()).map_err(|e| {
            format!(
                "network gateway of workload {} (network {:?}): {e}",
                workload.uid, workload.network
            )
        }),
    };
    match gateway {
        Ok(gateway) => Route::DoubleHbone {
            gateway,
            workload,
            service,
            port: dst.port(),
            expected,
        },
        Err(reason) => Route::Unroutable {
            service: Some(service),
            reason,
        },
    }
}

/// Straight to `workload` at `target`: HBONE through its ztunnel at `ip:hbone_port`,
/// verified against the workload's identity plus the service's `subjectAltNames`, or
/// plaintext for a TCP workload.
pub(super) fn direct(
    workload: Arc<Workload>,
    target: SocketAddr,
    service: Option<Arc<Service>>,
    hbone_port: u16,
) -> Route {
    if workload.protocol == Protocol::HBONE {
        let mut expected = vec![workload.identity()];
        if let Some(svc) = &service {
            expected.extend(svc.san_identities());
        }
        Route::Hbone {
            hbone_addr: SocketAddr::new(target.ip(), hbone_port),
            workload,
            target,
            service,
            expected,
            waypoint: false,
        }
    } else {
        Route::Plain {
            target,
            workload: Some(workload),
            service,
        }
    }
}

/// The workload IP of the same family as the address the client used, else the first.
fn pick_ip(w: &Workload, like: IpAddr) -> IpAddr {
    w.workload_ips
        .iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or(w.workload_ips.first())
        .copied()
        .unwrap_or(like)
}

/// A connection captured on 15001: to its original destination ([`handle_to`]).
pub(super) async fn handle(
    ctx: Arc<ProxyCtx>,
    client: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
) {
    let orig_dst = match ctx.sockets.original_destination(&client) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(src = %peer, error = %e, "outbound: cannot recover the original destination; closing");
            let metrics = &ctx.inputs.metrics;
            metrics.refused(Direction::Outbound, RefusalReason::bad_request);
            return;
        }
    };
    handle_to(ctx, client, peer, orig_dst, guard).await
}

/// The workload a connection from `peer` comes from: the served one (workload scope), or
/// the workload at `peer`'s address, this node's first (node scope).
pub(super) fn source_workload(
    ctx: &ProxyCtx,
    snap: &Snapshot,
    peer: SocketAddr,
) -> Option<Arc<Workload>> {
    match &ctx.scope {
        ProxyScope::Workload(_) => ctx.local_workload(snap).cloned(),
        // The source is a workload of this node, on its own network.
        ProxyScope::Node => ctx
            .served_at(snap, peer.ip())
            .or_else(|| snap.workload_by_ip(&ctx.inputs.cfg.network, peer.ip()))
            .cloned(),
    }
}

/// Proxies `client` (from `peer`) to `orig_dst` as an outbound connection of the source
/// workload: routing, policy, telemetry as for a captured connection (15001, SOCKS5).
pub(super) async fn handle_to(
    ctx: Arc<ProxyCtx>,
    mut client: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    guard: ConnGuard,
) {
    let metrics = &ctx.inputs.metrics;
    guard.set_dst(orig_dst);
    let snap = ctx.inputs.state.snapshot();
    if is_self_call(&ctx, &snap, orig_dst) {
        tracing::warn!(src = %peer, dst = %orig_dst, "outbound: connection to the proxy's own port refused");
        metrics.refused(Direction::Outbound, RefusalReason::bad_request);
        return;
    }
    // XDS_ON_DEMAND: the source's own workload (telemetry, locality) may not have been
    // asked for yet; it is asked for by the connection's source address.
    // Unanswered, the source is what the scope can tell without it (in node scope: no
    // workload, refused below).
    let snap = ctx
        .inputs
        .state
        .knowing(snap, &ctx.inputs.cfg.network, peer.ip())
        .await
        .unwrap_or_else(Unanswered::into_snapshot);
    let src_workload = source_workload(&ctx, &snap, peer);
    let src_identity = match (&ctx.scope, &src_workload) {
        (_, Some(w)) => w.identity(),
        (ProxyScope::Workload(_), None) => ctx.local_identity(&snap),
        (ProxyScope::Node, None) => {
            tracing::warn!(src = %peer, dst = %orig_dst, "outbound: no workload at the source address; closing");
            metrics.refused(Direction::Outbound, RefusalReason::no_identity);
            return;
        }
    };
    let network = src_workload
        .as_ref()
        .map(|w| w.network.as_str())
        .unwrap_or(&ctx.inputs.cfg.network);
    // XDS_ON_DEMAND: an address the state lacks is asked of istiod before routing. If
    // istiod does not answer, the connection is refused rather than sent as to an
    // address outside the mesh (which would be plaintext to what may be a mesh workload).
    let route = match ctx.inputs.state.knowing(snap, network, orig_dst.ip()).await {
        Ok(snap) => resolve(
            &snap,
            src_workload.as_deref(),
            network,
            orig_dst,
            ctx.inputs.cfg.ports.hbone,
        ),
        Err(e) => Route::Unroutable {
            service: None,
            reason: e.to_string(),
        },
    };
    let src_info = src_workload
        .as_deref()
        .map(PeerInfo::from_workload)
        .unwrap_or_default();
    let route = match route {
        Route::OnDemandDns {
            workload,
            port,
            service,
        } => {
            let client = src_info.clone().with_identity(Some(src_identity.clone()));
            super::on_demand_dns::route(&ctx, &client, workload, port, service, orig_dst).await
        }
        r => r,
    };
    let service_info = |s: &Option<Arc<Service>>| s.as_deref().map(ServiceInfo::from_service);
    match route {
        // As upstream: refused before any upstream connect, only logged (not counted as
        // opened and closed in `istio_tcp_*`).
        Route::Unroutable { service, reason } => {
            metrics.refused(Direction::Outbound, RefusalReason::upstream_unavailable);
            let host = service.as_deref().map(|s| s.hostname.as_str());
            crate::telemetry::log_early_deny(Direction::Outbound, peer, orig_dst, host, &reason);
        }
        Route::OnDemandDns { .. } => unreachable!("resolved above"),
        Route::Plain {
            target,
            workload,
            service,
        } => {
            let info = ConnectionInfo {
                direction: Direction::Outbound,
                src_addr: peer,
                src: src_info,
                dst_addr: target,
                dst_hbone_addr: None,
                dst_service: service_info(&service),
                dst: workload
                    .as_deref()
                    .map(PeerInfo::from_workload)
                    .unwrap_or_default(),
                mtls: false,
            };
            let mut tele = ConnectionTelemetry::open(metrics, info);
            let connect = ctx.sockets.connect(target, None);
            let failed = ResponseFlags::ConnectionFailure;
            let mut upstream =
                match tokio::time::timeout(ctx.inputs.cfg.connect_timeout, connect).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let why = format!("connect to {target}: {e}");
                        tele.close_with_flag(0, 0, Some(&why), failed);
                        return;
                    }
                    Err(_) => {
                        let why = format!("connect to {target} timed out");
                        tele.close_with_flag(0, 0, Some(&why), failed);
                        return;
                    }
                };
            guard.set_tunnel(&mut tele, true);
            let out = super::copy::copy_tcp(&mut client, &mut upstream, guard.counters()).await;
            tele.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
        Route::Hbone {
            workload,
            target,
            service,
            waypoint: false,
            ..
        } if matches!(ctx.scope, ProxyScope::Node)
            && ctx.node_name().is_some_and(|n| workload.node == n) =>
        {
            let local = super::node_local::LocalConnection {
                peer,
                src_workload,
                src_identity,
                dst_workload: workload,
                target,
                service,
            };
            super::node_local::handle(ctx, client, local, guard).await;
        }
        Route::Hbone {
            workload,
            target,
            hbone_addr,
            service,
            expected,
            waypoint,
        } => {
            let info = ConnectionInfo {
                direction: Direction::Outbound,
                src_addr: peer,
                src: src_info.with_identity(Some(src_identity.clone())),
                dst_addr: hbone_addr,
                dst_hbone_addr: Some(target.into()),
                dst_service: service_info(&service),
                dst: PeerInfo::from_workload(&workload).with_identity(Some(workload.identity())),
                mtls: true,
            };
            if waypoint {
                tracing::debug!(src = %peer, dst = %orig_dst, waypoint = %workload.uid, hbone = %hbone_addr, "outbound: through the waypoint");
            }
            let tele = ConnectionTelemetry::open(metrics, info);
            let Some((cert, mut tele)) =
                tunnel::source_certificate(&ctx, &src_identity, tele).await
            else {
                return;
            };
            let request = headers::build_request(&ConnectRequest {
                authority: target.into(),
                client: Some(peer),
                host: service.as_ref().map(|s| s.hostname.clone()),
                baggage: src_workload.as_deref().map(headers::baggage_for),
                forwarded_network: None,
            });
            let key = PoolKey::new(src_identity, expected, orig_src(&ctx, peer), hbone_addr);
            let stream = match tunnel::open_pooled(&ctx, &key, cert, request).await {
                Ok(s) => s,
                Err(e) => return tunnel::failed(metrics, tele, &e),
            };
            guard.set_tunnel(&mut tele, true);
            let out = hbone::copy_tcp_h2(&mut client, stream, guard.counters()).await;
            tele.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
        Route::DoubleHbone {
            gateway,
            workload,
            service,
            port,
            expected,
        } => {
            let authority = HboneTarget::Host {
                hostname: service.hostname.clone(),
                port,
            };
            let info = ConnectionInfo {
                direction: Direction::Outbound,
                src_addr: peer,
                src: src_info.with_identity(Some(src_identity.clone())),
                dst_addr: gateway.addr,
                dst_hbone_addr: Some(authority.clone()),
                dst_service: Some(ServiceInfo::from_service(&service)),
                dst: PeerInfo::from_workload(&workload).with_identity(Some(workload.identity())),
                mtls: true,
            };
            tracing::debug!(src = %peer, dst = %orig_dst, workload = %workload.uid, network = %workload.network, gateway = %gateway.addr, "outbound: through the east-west gateway of another network");
            let tele = ConnectionTelemetry::open(metrics, info);
            let Some((cert, mut tele)) =
                tunnel::source_certificate(&ctx, &src_identity, tele).await
            else {
                return;
            };
            // Both CONNECTs alike, the inner one also naming the client's network.
            let connect = |forwarded_network: Option<String>| {
                headers::build_request(&ConnectRequest {
                    authority: authority.clone(),
                    client: Some(peer),
                    host: Some(service.hostname.clone()),
                    baggage: src_workload.as_deref().map(headers::baggage_for),
                    forwarded_network,
                })
            };
            let tls = crate::tls::client_config(&cert, &ctx.inputs.roots, expected);
            let inner_target = authority.to_string();
            let key = PoolKey::new(
                src_identity,
                gateway.identities,
                orig_src(&ctx, peer),
                gateway.addr,
            );
            let opened = match tunnel::open_pooled(&ctx, &key, cert, connect(None)).await {
                Ok(outer) => {
                    let inner = connect(Some(network.to_string()));
                    let via = gateway.addr;
                    tunnel::open_inner(&ctx, outer, tls, via, inner_target, inner).await
                }
                Err(e) => Err(e),
            };
            let stream = match opened {
                Ok(s) => s,
                Err(e) => return tunnel::failed(metrics, tele, &e),
            };
            guard.set_tunnel(&mut tele, true);
            let out = hbone::copy_tcp_h2(&mut client, stream, guard.counters()).await;
            tele.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
    }
}

/// A connection aimed at one of this proxy's own ports (15001/15006/15008, and SOCKS5's
/// 15080 when on) on an address of the proxy itself: passed through, it would connect to
/// the proxy again, and again, each hop holding two sockets until the node's ztunnel runs
/// out (upstream refuses the loopback case as a self-call). The proxy's addresses:
/// loopback, unspecified, the listener's, `INSTANCE_IP`, the served workload's IPs (in-pod
/// and dedicated: the pod's own), and in node scope (TPROXY, listeners in ztunnel's own
/// netns, where this thread runs) any address of that netns, e.g. its GENEVE tunnel
/// addresses.
fn is_self_call(ctx: &ProxyCtx, snap: &Snapshot, dst: SocketAddr) -> bool {
    if !ctx.inputs.cfg.is_proxy_port(dst.port()) {
        return false;
    }
    let ip = dst.ip().to_canonical();
    if ip.is_loopback()
        || ip.is_unspecified()
        || ip == ctx.addrs.outbound.ip().to_canonical()
        || Some(ip) == ctx.inputs.cfg.instance_ip
    {
        return true;
    }
    match &ctx.scope {
        ProxyScope::Workload(_) => ctx
            .local_workload(snap)
            .is_some_and(|w| w.workload_ips.contains(&ip)),
        // An address is local iff a socket can bind to it (no IP_FREEBIND).
        ProxyScope::Node => std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok(),
    }
}

/// The source address an HBONE connection leaves with: a node proxy (TPROXY) with
/// original source uses the client pod's IP, so the peer's source check sees the workload
/// itself (the node's 0x210/0x040 marks and this netns' 0x4d3 mark route the replies
/// back); its connections are pooled per source IP then.
fn orig_src(ctx: &ProxyCtx, peer: SocketAddr) -> Option<IpAddr> {
    (ctx.orig_src && matches!(ctx.scope, ProxyScope::Node)).then(|| peer.ip())
}

#[cfg(test)]
mod tests;
mod tunnel;
