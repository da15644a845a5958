//! Outbound (15001): a captured connection of the served workload goes to its original
//! destination, tunnelled over HBONE when the destination is in the mesh.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conntrack::ConnGuard;
use super::{ProxyCtx, ProxyScope};
use crate::hbone::headers::{self, ConnectRequest};
use crate::hbone::{self, HboneError, PoolKey};
use crate::identity::Identity;
use crate::state::{Protocol, Service, Snapshot, Workload};
use crate::telemetry::{ConnectionInfo, ConnectionTelemetry, Direction, PeerInfo, RefusalReason};

/// Where a connection goes.
#[derive(Debug)]
pub(super) enum Route {
    /// Through HBONE to `target`'s ztunnel at `hbone_addr`.
    Hbone {
        workload: Arc<Workload>,
        target: SocketAddr,
        hbone_addr: SocketAddr,
        service: Option<Arc<Service>>,
        expected: Vec<Identity>,
    },
    /// Plain TCP to `target` (not in the mesh, or a TCP-protocol workload).
    Plain {
        target: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
    /// A service VIP without a healthy endpoint.
    NoEndpoint { service: Arc<Service> },
}

/// Decides where a connection to `dst` goes.
pub(super) fn resolve(snap: &Snapshot, network: &str, dst: SocketAddr, hbone_port: u16) -> Route {
    let (workload, target, service) = if let Some(svc) = snap.service_by_vip(network, dst.ip()) {
        match snap.pick_endpoint(svc, dst.port()) {
            Some((w, port)) => {
                let ip = pick_ip(&w, dst.ip());
                (w, SocketAddr::new(ip, port), Some(svc.clone()))
            }
            None => {
                return Route::NoEndpoint {
                    service: svc.clone(),
                };
            }
        }
    } else if let Some(w) = snap.workload_by_ip(network, dst.ip()) {
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
    if orig_dst == ctx.addrs.outbound
        || (ctx.inputs.cfg.ports.is_proxy_port(orig_dst.port())
            && orig_dst.ip() == ctx.addrs.outbound.ip())
    {
        tracing::warn!(src = %peer, dst = %orig_dst, "outbound: connection to the proxy's own port refused");
        metrics.refused(Direction::Outbound, RefusalReason::bad_request);
        return;
    }
    let snap = ctx.inputs.state.snapshot();
    let src_workload = match &ctx.scope {
        ProxyScope::Workload(_) => ctx.local_workload(&snap).cloned(),
        ProxyScope::Node => snap.workload_by_ip("", peer.ip()).cloned(),
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
    let route = resolve(&snap, network, orig_dst, ctx.inputs.cfg.ports.hbone);
    drop(snap);
    let src_info = src_workload
        .as_deref()
        .map(PeerInfo::from_workload)
        .unwrap_or_default();
    match route {
        Route::NoEndpoint { service } => {
            let info = ConnectionInfo {
                direction: Direction::Outbound,
                src_addr: peer,
                src: src_info,
                dst_addr: orig_dst,
                dst_hbone_addr: None,
                dst_service: Some(service.hostname.clone()),
                dst: PeerInfo::default(),
                mtls: false,
            };
            ConnectionTelemetry::open(metrics, info).close(
                0,
                0,
                Some(&format!(
                    "service {} has no healthy endpoint",
                    service.key()
                )),
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
                dst_service: service.map(|s| s.hostname.clone()),
                dst: workload
                    .as_deref()
                    .map(PeerInfo::from_workload)
                    .unwrap_or_default(),
                mtls: false,
            };
            let mut tele = ConnectionTelemetry::open(metrics, info);
            let connect = ctx.sockets.connect(target, None);
            let mut upstream =
                match tokio::time::timeout(ctx.inputs.cfg.connect_timeout, connect).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tele.close(0, 0, Some(&format!("connect to {target}: {e}")));
                        return;
                    }
                    Err(_) => {
                        tele.close(0, 0, Some(&format!("connect to {target} timed out")));
                        return;
                    }
                };
            tele.established();
            let out = super::copy::copy_tcp(&mut client, &mut upstream).await;
            tele.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
        Route::Hbone {
            workload,
            target,
            service,
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
            super::node_local::handle(ctx, client, local).await;
        }
        Route::Hbone {
            workload,
            target,
            hbone_addr,
            service,
            expected,
        } => {
            let info = ConnectionInfo {
                direction: Direction::Outbound,
                src_addr: peer,
                src: src_info.with_identity(Some(src_identity.clone())),
                dst_addr: hbone_addr,
                dst_hbone_addr: Some(target),
                dst_service: service.as_ref().map(|s| s.hostname.clone()),
                dst: PeerInfo::from_workload(&workload).with_identity(Some(workload.identity())),
                mtls: true,
            };
            let mut tele = ConnectionTelemetry::open(metrics, info);
            let cert = match ctx.inputs.certs.fetch_certificate(&src_identity).await {
                Ok(c) => c,
                Err(e) => {
                    metrics.refused(Direction::Outbound, RefusalReason::no_identity);
                    tele.close(0, 0, Some(&e.to_string()));
                    return;
                }
            };
            let request = headers::build_request(&ConnectRequest {
                authority: target,
                client: Some(peer),
                host: service.as_ref().map(|s| s.hostname.clone()),
                baggage: src_workload.as_deref().map(headers::baggage_for),
            });
            let key = PoolKey::new(src_identity, expected.clone(), None, hbone_addr);
            let timeout = ctx.inputs.cfg.connect_timeout;
            let connect = || {
                let sockets = ctx.sockets.clone();
                let roots = ctx.inputs.roots.clone();
                async move {
                    let tcp = match tokio::time::timeout(timeout, sockets.connect(hbone_addr, None))
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
                    hbone::tls_connect(tcp, config, hbone_addr).await
                }
            };
            let stream = match ctx.pool.open_stream(&key, request, connect).await {
                Ok(s) => s,
                Err(e) => {
                    tele.close(0, 0, Some(&e.to_string()));
                    return;
                }
            };
            tele.established();
            let out = hbone::copy_tcp_h2(&mut client, stream).await;
            tele.close(out.to_tunnel, out.from_tunnel, out.error.as_deref());
        }
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
"#;
        let cfg = crate::state::file::parse(
            yaml,
            std::path::Path::new("test.yaml"),
            &crate::state::file::FileDefaults {
                trust_domain: "cluster.local".into(),
                cluster_id: "Kubernetes".into(),
            },
        )
        .unwrap();
        let s = Store::new();
        s.source("file")
            .replace_all(cfg.workloads, cfg.services, cfg.policies);
        s
    }

    #[test]
    fn routes() {
        let snap = store().snapshot();
        match resolve(&snap, "", "10.96.0.1:80".parse().unwrap(), 15008) {
            Route::Hbone {
                target,
                hbone_addr,
                expected,
                service,
                ..
            } => {
                assert_eq!(target, "10.0.0.1:8080".parse().unwrap());
                assert_eq!(hbone_addr, "10.0.0.1:15008".parse().unwrap());
                assert_eq!(expected.len(), 2);
                assert!(service.is_some());
            }
            r => panic!("{r:?}"),
        }
        match resolve(&snap, "", "10.0.0.1:9000".parse().unwrap(), 15008) {
            Route::Hbone { target, .. } => assert_eq!(target, "10.0.0.1:9000".parse().unwrap()),
            r => panic!("{r:?}"),
        }
        match resolve(&snap, "", "10.96.0.3:81".parse().unwrap(), 15008) {
            Route::Plain {
                target, workload, ..
            } => {
                assert_eq!(target, "10.0.0.3:9091".parse().unwrap());
                assert!(workload.is_some());
            }
            r => panic!("{r:?}"),
        }
        match resolve(&snap, "", "8.8.8.8:53".parse().unwrap(), 15008) {
            Route::Plain {
                target, workload, ..
            } => {
                assert_eq!(target, "8.8.8.8:53".parse().unwrap());
                assert!(workload.is_none());
            }
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            resolve(&snap, "", "10.96.0.9:80".parse().unwrap(), 15008),
            Route::NoEndpoint { .. }
        ));
    }
}
