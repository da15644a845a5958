//! Outbound (15001): a captured connection of the served workload goes to its original
//! destination, tunnelled over HBONE when the destination is in the mesh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conntrack::ConnGuard;
use super::{ProxyCtx, ProxyScope};
use crate::hbone::headers::{self, ConnectRequest};
use crate::hbone::{self, FailureKind, HboneError, PoolKey};
use crate::identity::Identity;
use crate::state::on_demand::Unanswered;
use crate::state::workload::{GatewayAddress, LoadBalancerMode};
use crate::state::{Protocol, Service, Snapshot, Workload};
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
    /// Plain TCP to `target` (not in the mesh, or a TCP-protocol workload).
    Plain {
        target: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
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
/// - A service VIP with a waypoint: to the waypoint (authority = `dst`), unless `src` is
///   that waypoint (no loops).
/// - A service VIP whose load balancer mode is `Passthrough` (a ServiceEntry with
///   `resolution: NONE`): plaintext to `dst` itself, with or without endpoints (upstream's
///   `OriginalDestination`); the service is kept for telemetry.
/// - A service VIP: a healthy endpoint picked at random, port mapped to its target port.
/// - A workload IP with a waypoint: to the waypoint (authority = `dst`), unless `src` is
///   that waypoint. Service-addressed traffic ignores the endpoint's own waypoint
///   (upstream's rule).
/// - HBONE workloads through their ztunnel at `ip:hbone_port`, verified against the
///   workload's identity plus the service's `subjectAltNames`; TCP workloads and unknown
///   addresses in plaintext.
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
    let (workload, target, service) = if let Some(svc) = snap.service_by_vip(network, dst.ip()) {
        if let Some(gw) = &svc.waypoint
            && !from(gw)
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
        // Only endpoints on the client's network: others would need double HBONE through
        // their network's gateway (not implemented), never a direct dial.
        match snap.select_endpoint(src, Some(network), svc, dst.port()) {
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
    } else if let Some(w) = snap.workload_by_ip(network, dst.ip()) {
        if let Some(gw) = &w.waypoint
            && !from(gw)
        {
            return through(gw, None, format!("workload {}", w.uid));
        }
        (w.clone(), dst, None)
    } else {
        return Route::Plain {
            target: dst,
            workload: None,
            service: None,
        };
    };
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

pub(super) async fn handle(
    ctx: Arc<ProxyCtx>,
    mut client: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
) {
    let metrics = &ctx.inputs.metrics;
    let orig_dst = match ctx.sockets.original_destination(&client) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(src = %peer, error = %e, "outbound: cannot recover the original destination; closing");
            metrics.refused(Direction::Outbound, RefusalReason::bad_request);
            return;
        }
    };
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
        .knowing(snap, "", peer.ip())
        .await
        .unwrap_or_else(Unanswered::into_snapshot);
    let src_workload = match &ctx.scope {
        ProxyScope::Workload(_) => ctx.local_workload(&snap).cloned(),
        // The source is a workload of this node, on its own network.
        ProxyScope::Node => ctx
            .served_at(&snap, peer.ip())
            .or_else(|| snap.workload_by_ip("", peer.ip()))
            .cloned(),
    };
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
        .unwrap_or("");
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
    let service_info = |s: &Option<Arc<Service>>| s.as_deref().map(ServiceInfo::from_service);
    match route {
        Route::Unroutable { service, reason } => {
            let info = ConnectionInfo {
                direction: Direction::Outbound,
                src_addr: peer,
                src: src_info,
                dst_addr: orig_dst,
                dst_hbone_addr: None,
                dst_service: service_info(&service),
                dst: PeerInfo::default(),
                mtls: false,
            };
            ConnectionTelemetry::open(metrics, info).close_with_flag(
                0,
                0,
                Some(&reason),
                ResponseFlags::ConnectionFailure,
            );
        }
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
                dst_hbone_addr: Some(target),
                dst_service: service_info(&service),
                dst: PeerInfo::from_workload(&workload).with_identity(Some(workload.identity())),
                mtls: true,
            };
            if waypoint {
                tracing::debug!(src = %peer, dst = %orig_dst, waypoint = %workload.uid, hbone = %hbone_addr, "outbound: through the waypoint");
            }
            let mut tele = ConnectionTelemetry::open(metrics, info);
            let cert = match ctx.inputs.certs.fetch_certificate(&src_identity).await {
                Ok(c) => c,
                Err(e) => {
                    metrics.refused(Direction::Outbound, RefusalReason::no_identity);
                    tele.close_with_flag(0, 0, Some(&e.to_string()), ResponseFlags::IdentityError);
                    return;
                }
            };
            let request = headers::build_request(&ConnectRequest {
                authority: target,
                client: Some(peer),
                host: service.as_ref().map(|s| s.hostname.clone()),
                baggage: src_workload.as_deref().map(headers::baggage_for),
            });
            // Node proxy (TPROXY) with original source: the HBONE connection leaves with the
            // client pod's IP, so the peer's source check sees the workload itself (the
            // node's 0x210/0x040 marks and this netns' 0x4d3 mark route the replies back).
            // Pooled per source IP then.
            let orig_src =
                (ctx.orig_src && matches!(ctx.scope, ProxyScope::Node)).then(|| peer.ip());
            let key = PoolKey::new(src_identity, expected.clone(), orig_src, hbone_addr);
            let timeout = ctx.inputs.cfg.connect_timeout;
            let handshake_timeout = ctx.inputs.cfg.handshake_timeout;
            let connect = || {
                let sockets = ctx.sockets.clone();
                let roots = ctx.inputs.roots.clone();
                async move {
                    let tcp =
                        match tokio::time::timeout(timeout, sockets.connect(hbone_addr, orig_src))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(source)) => {
                                return Err(HboneError::Connect {
                                    dst: hbone_addr,
                                    source,
                                });
                            }
                            Err(_) => {
                                return Err(HboneError::ConnectTimeout {
                                    dst: hbone_addr,
                                    timeout,
                                });
                            }
                        };
                    let config = crate::tls::client_config(&cert, &roots, expected);
                    hbone::tls_connect_within(tcp, config, hbone_addr, handshake_timeout).await
                }
            };
            // The peer answers once it has connected to its app (its own connect timeout).
            let response_timeout = timeout + handshake_timeout;
            let opened = ctx
                .pool
                .open_stream(&key, request, response_timeout, connect)
                .await;
            let stream = match opened {
                Ok(s) => s,
                Err(e) => {
                    // Counted once per failed handshake (streams that waited for it fail
                    // with `Waited`); the access log names the peer either way.
                    match &e {
                        HboneError::TlsTimeout { .. } => {
                            metrics.refused(Direction::Outbound, RefusalReason::handshake_timeout)
                        }
                        HboneError::Tls { .. } | HboneError::Alpn { .. } => {
                            metrics.refused(Direction::Outbound, RefusalReason::tls_handshake)
                        }
                        _ => {}
                    }
                    tele.close_with_flag(0, 0, Some(&e.to_string()), response_flag(e.kind()));
                    return;
                }
            };
            guard.set_tunnel(&mut tele, true);
            let out = hbone::copy_tcp_h2(&mut client, stream, guard.counters()).await;
            tele.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
    }
}

/// A connection aimed at one of this proxy's own ports (15001/15006/15008) on an address
/// of the proxy itself: passed through, it would connect to the proxy again, and again,
/// each hop holding two sockets until the node's ztunnel runs out (upstream refuses the
/// loopback case as a self-call). The proxy's addresses: loopback, unspecified, the
/// listener's, `INSTANCE_IP`, the served workload's IPs (in-pod and dedicated: the pod's
/// own), and in node scope (TPROXY, listeners in ztunnel's own netns, where this thread
/// runs) any address of that netns, e.g. its GENEVE tunnel addresses.
fn is_self_call(ctx: &ProxyCtx, snap: &Snapshot, dst: SocketAddr) -> bool {
    if !ctx.inputs.cfg.ports.is_proxy_port(dst.port()) {
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

/// Upstream's `response_flags` for a failed HBONE stream.
fn response_flag(kind: FailureKind) -> ResponseFlags {
    match kind {
        FailureKind::Connect => ResponseFlags::ConnectionFailure,
        FailureKind::ConnectTimeout => ResponseFlags::NetworkPolicyError,
        FailureKind::Tls => ResponseFlags::TlsFailure,
        FailureKind::H2 => ResponseFlags::Http2HandshakeFailure,
        FailureKind::Denied => ResponseFlags::AuthorizationPolicyDenied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;

    fn store() -> Store {
        let yaml = r#"
workloads:
- uid: a
  name: a
  namespace: ns
  serviceAccount: sa-a
  trustDomain: cluster.local
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  services: {"ns/svc.ns.svc.cluster.local": {80: 8080}}
- uid: plain
  name: plain
  namespace: ns
  trustDomain: cluster.local
  workloadIps: ["10.0.0.3"]
  protocol: TCP
  services: {"ns/plain.ns.svc.cluster.local": {}}
- uid: waypoint
  name: waypoint
  namespace: ns
  serviceAccount: waypoint
  workloadIps: ["10.0.0.50"]
  protocol: HBONE
  services: {"ns/waypoint.ns.svc.cluster.local": {}}
- uid: behind
  name: behind
  namespace: ns
  serviceAccount: behind
  workloadIps: ["10.0.0.4"]
  protocol: HBONE
  waypoint: {destination: "/10.0.0.50", hboneMtlsPort: 15008}
  services: {"ns/wsvc.ns.svc.cluster.local": {80: 8080}}
services:
- name: svc
  namespace: ns
  hostname: svc.ns.svc.cluster.local
  vips: ["/10.96.0.1"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/other"]
- name: plain
  namespace: ns
  hostname: plain.ns.svc.cluster.local
  vips: ["/10.96.0.3"]
  ports: {81: 9091}
- name: empty
  namespace: ns
  hostname: empty.ns.svc.cluster.local
  vips: ["/10.96.0.9"]
  ports: {80: 80}
- name: waypoint
  namespace: ns
  hostname: waypoint.ns.svc.cluster.local
  vips: ["/10.96.0.50"]
  ports: {15008: 15008}
- name: wsvc
  namespace: ns
  hostname: wsvc.ns.svc.cluster.local
  vips: ["/10.96.0.4"]
  ports: {80: 8080}
  waypoint: {destination: {namespace: ns, hostname: waypoint.ns.svc.cluster.local}, hboneMtlsPort: 15008}
- name: lost
  namespace: ns
  hostname: lost.ns.svc.cluster.local
  vips: ["/10.96.0.5"]
  ports: {80: 8080}
  waypoint: {destination: "/10.0.0.99", hboneMtlsPort: 15008}
"#;
        crate::state::file::test_store(yaml)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn routes() {
        let snap = store().snapshot();
        let src = snap.workload_by_uid("a").cloned();
        let r = |dst: &str| resolve(&snap, src.as_deref(), "", addr(dst), 15008);
        match r("10.96.0.1:80") {
            Route::Hbone {
                target,
                hbone_addr,
                expected,
                service,
                waypoint,
                ..
            } => {
                assert_eq!(target, addr("10.0.0.1:8080"));
                assert_eq!(hbone_addr, addr("10.0.0.1:15008"));
                let ids: Vec<String> = expected.iter().map(|i| i.to_string()).collect();
                assert_eq!(
                    ids,
                    [
                        "spiffe://cluster.local/ns/ns/sa/sa-a",
                        "spiffe://cluster.local/ns/ns/sa/other"
                    ]
                );
                assert!(service.is_some());
                assert!(!waypoint);
            }
            r => panic!("{r:?}"),
        }
        match r("10.0.0.1:9000") {
            Route::Hbone { target, .. } => assert_eq!(target, addr("10.0.0.1:9000")),
            r => panic!("{r:?}"),
        }
        match r("10.96.0.3:81") {
            Route::Plain {
                target, workload, ..
            } => {
                assert_eq!(target, addr("10.0.0.3:9091"));
                assert!(workload.is_some());
            }
            r => panic!("{r:?}"),
        }
        match r("8.8.8.8:53") {
            Route::Plain {
                target, workload, ..
            } => {
                assert_eq!(target, addr("8.8.8.8:53"));
                assert!(workload.is_none());
            }
            r => panic!("{r:?}"),
        }
        match r("10.96.0.9:80") {
            Route::Unroutable { service, reason } => {
                assert!(service.is_some());
                assert!(reason.contains("ns/empty.ns.svc.cluster.local"), "{reason}");
            }
            r => panic!("{r:?}"),
        }
        // A port the service does not define goes nowhere (kube-proxy drops it too).
        match r("10.96.0.3:9999") {
            Route::Unroutable { service, reason } => {
                assert!(service.is_some());
                assert!(reason.contains("has no port 9999"), "{reason}");
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn waypoints() {
        let snap = store().snapshot();
        let a = snap.workload_by_uid("a").cloned();
        let wp = snap.workload_by_uid("waypoint").cloned();
        // Service with a waypoint: to the waypoint, authority = VIP:port, the waypoint's
        // identity expected, the intended service kept for telemetry.
        match resolve(&snap, a.as_deref(), "", addr("10.96.0.4:80"), 15008) {
            Route::Hbone {
                workload,
                target,
                hbone_addr,
                expected,
                service,
                waypoint,
            } => {
                assert!(waypoint);
                assert_eq!(workload.uid, "waypoint");
                assert_eq!(target, addr("10.96.0.4:80"));
                assert_eq!(hbone_addr, addr("10.0.0.50:15008"));
                let ids: Vec<String> = expected.iter().map(|i| i.to_string()).collect();
                assert_eq!(ids, ["spiffe://cluster.local/ns/ns/sa/waypoint"]);
                assert_eq!(service.unwrap().name, "wsvc");
            }
            r => panic!("{r:?}"),
        }
        // Workload with a waypoint, addressed directly: to the waypoint, authority = pod.
        match resolve(&snap, a.as_deref(), "", addr("10.0.0.4:8080"), 15008) {
            Route::Hbone {
                workload,
                target,
                hbone_addr,
                service,
                waypoint,
                ..
            } => {
                assert!(waypoint);
                assert_eq!(workload.uid, "waypoint");
                assert_eq!(target, addr("10.0.0.4:8080"));
                assert_eq!(hbone_addr, addr("10.0.0.50:15008"));
                assert!(service.is_none());
            }
            r => panic!("{r:?}"),
        }
        // From the waypoint itself: never back to the waypoint.
        for dst in ["10.96.0.4:80", "10.0.0.4:8080"] {
            match resolve(&snap, wp.as_deref(), "", addr(dst), 15008) {
                Route::Hbone {
                    workload,
                    target,
                    hbone_addr,
                    waypoint,
                    ..
                } => {
                    assert!(!waypoint, "{dst}");
                    assert_eq!(workload.uid, "behind");
                    assert_eq!(target, addr("10.0.0.4:8080"));
                    assert_eq!(hbone_addr, addr("10.0.0.4:15008"));
                }
                r => panic!("{dst}: {r:?}"),
            }
        }
        // A waypoint that does not resolve: unroutable, naming the service and address.
        match resolve(&snap, a.as_deref(), "", addr("10.96.0.5:80"), 15008) {
            Route::Unroutable { reason, .. } => {
                assert!(reason.contains("lost.ns.svc.cluster.local"), "{reason}");
                assert!(reason.contains("/10.0.0.99:15008"), "{reason}");
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_passthrough_service_goes_to_the_original_destination_in_plaintext() {
        // ServiceEntry `resolution: NONE`: istiod sends `mode: PASSTHROUGH`. `ext` has no
        // endpoints; `pass` has two, one of them owning the VIP address.
        let snap = crate::state::file::test_store(
            r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}
- {uid: e1, name: e1, namespace: ns, workloadIps: ["10.0.0.1"], protocol: HBONE,
   services: {"ns/pass.example.com": {80: 8080}}}
- {uid: e2, name: e2, namespace: ns, workloadIps: ["10.0.0.2"], protocol: HBONE,
   services: {"ns/pass.example.com": {80: 8080}}}
services:
- {name: ext, namespace: ns, hostname: db.example.com, vips: ["/203.0.113.10"],
   ports: {5432: 5432}, loadBalancer: {mode: Passthrough, healthPolicy: AllowAll}}
- {name: pass, namespace: ns, hostname: pass.example.com, vips: ["/10.0.0.1"],
   ports: {80: 8080}, loadBalancer: {mode: Passthrough}}
"#,
        )
        .snapshot();
        let src = snap.workload_by_uid("client").cloned();
        for (dst, svc) in [
            ("203.0.113.10:5432", "db.example.com"),
            ("10.0.0.1:80", "pass.example.com"),
        ] {
            for _ in 0..32 {
                match resolve(&snap, src.as_deref(), "", addr(dst), 15008) {
                    Route::Plain {
                        target,
                        workload,
                        service,
                    } => {
                        assert_eq!(target, addr(dst));
                        assert!(workload.is_none(), "{dst}");
                        assert_eq!(service.unwrap().hostname, svc);
                    }
                    r => panic!("{dst}: {r:?}"),
                }
            }
        }
    }

    #[test]
    fn an_endpoint_with_capacity_zero_is_never_picked() {
        let snap = crate::state::file::test_store(
            r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}
- {uid: e1, name: e1, namespace: ns, workloadIps: ["10.0.0.1"], protocol: HBONE, capacity: 1,
   services: {"ns/svc.ns.svc.cluster.local": {80: 8080}}}
- {uid: e2, name: e2, namespace: ns, workloadIps: ["10.0.0.2"], protocol: HBONE, capacity: 0,
   services: {"ns/svc.ns.svc.cluster.local": {80: 8080}}}
services:
- {name: svc, namespace: ns, hostname: svc.ns.svc.cluster.local, vips: ["/10.96.0.1"],
   ports: {80: 8080}}
"#,
        )
        .snapshot();
        let src = snap.workload_by_uid("client").cloned();
        for _ in 0..64 {
            match resolve(&snap, src.as_deref(), "", addr("10.96.0.1:80"), 15008) {
                Route::Hbone { target, .. } => assert_eq!(target, addr("10.0.0.1:8080")),
                r => panic!("{r:?}"),
            }
        }
    }

    #[test]
    fn endpoints_on_another_network_are_never_dialled_directly() {
        let snap = crate::state::file::test_store(
            r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}
- {uid: remote, name: remote, namespace: ns, network: west, workloadIps: ["10.1.0.1"],
   protocol: HBONE, networkGateway: {destination: "/192.0.2.1", hboneMtlsPort: 15008},
   services: {"ns/svc.ns.svc.cluster.local": {80: 8080}, "ns/mixed.ns.svc.cluster.local": {80: 8080}}}
- {uid: local, name: local, namespace: ns, workloadIps: ["10.0.0.1"], protocol: HBONE,
   services: {"ns/mixed.ns.svc.cluster.local": {80: 8080}}}
services:
- {name: svc, namespace: ns, hostname: svc.ns.svc.cluster.local, vips: ["/10.96.0.1"],
   ports: {80: 8080}}
- {name: mixed, namespace: ns, hostname: mixed.ns.svc.cluster.local, vips: ["/10.96.0.2"],
   ports: {80: 8080}}
"#,
        )
        .snapshot();
        let src = snap.workload_by_uid("client").cloned();
        // Only a remote-network endpoint: refused, naming the service and the network.
        match resolve(&snap, src.as_deref(), "", addr("10.96.0.1:80"), 15008) {
            Route::Unroutable { reason, .. } => {
                assert!(reason.contains("ns/svc.ns.svc.cluster.local"), "{reason}");
                assert!(reason.contains("west"), "{reason}");
            }
            r => panic!("{r:?}"),
        }
        // Local and remote endpoints: always the local one.
        for _ in 0..64 {
            match resolve(&snap, src.as_deref(), "", addr("10.96.0.2:80"), 15008) {
                Route::Hbone { hbone_addr, .. } => {
                    assert_eq!(hbone_addr, addr("10.0.0.1:15008"))
                }
                r => panic!("{r:?}"),
            }
        }
    }
}
