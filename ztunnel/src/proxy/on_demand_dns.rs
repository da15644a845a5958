//! On-demand DNS (upstream's name): a service endpoint known only by hostname (a
//! ServiceEntry with `resolution: DNS`: istiod sends its endpoints as workloads with a
//! `hostname` and no IP) is resolved when a connection picks it, then dialled as any
//! workload of its protocol: plaintext to `ip:targetPort` (`TCP`, what such endpoints
//! usually are) or HBONE to `ip:15008` (`HBONE`), as upstream decides.
//!
//! As upstream: every lookup counts in `istio_on_demand_dns_total{source_*,hostname}`; an
//! address of the original destination's family is preferred (random among those), else
//! any; a failed or empty lookup refuses the connection (an early refusal, see
//! [`crate::telemetry::log_early_deny`]). The lookup is the system resolver's
//! (`tokio::net::lookup_host`: `getaddrinfo` on the blocking pool, never on a runtime
//! thread), bounded by `CONNECTION_TIMEOUT`; upstream queries resolv.conf's servers itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::seq::IndexedRandom;

use super::ProxyCtx;
use super::outbound::{Route, direct};
use crate::state::{NamespacedHostname, Service, Workload};
use crate::telemetry::{OnDemandDnsLabels, PeerInfo, ProxyMetrics};

/// A hostname endpoint could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error(
    "on-demand DNS lookup of {hostname} (endpoint {workload} of service {service}) failed: \
     {failure}"
)]
pub struct OnDemandDnsError {
    pub hostname: String,
    /// The endpoint workload's uid.
    pub workload: String,
    pub service: NamespacedHostname,
    #[source]
    pub failure: LookupFailure,
}

/// Why [`OnDemandDnsError`].
#[derive(Debug, thiserror::Error)]
pub enum LookupFailure {
    #[error("{0}")]
    Resolver(#[source] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer has no address")]
    Empty,
}

/// Where a connection from `src` to `orig_dst` goes when `service` picked `workload`, an
/// endpoint known only by hostname, with target port `port`: straight to the resolved
/// address, or nowhere when the name does not resolve.
pub(super) async fn route(
    ctx: &ProxyCtx,
    src: &PeerInfo,
    workload: Arc<Workload>,
    port: u16,
    service: Arc<Service>,
    orig_dst: SocketAddr,
) -> Route {
    let cfg = &ctx.inputs.cfg;
    let (metrics, timeout) = (&ctx.inputs.metrics, cfg.connect_timeout);
    match resolve(
        metrics,
        src,
        &workload,
        service.key(),
        orig_dst.ip(),
        timeout,
    )
    .await
    {
        Ok(ip) => direct(
            workload,
            SocketAddr::new(ip, port),
            Some(service),
            cfg.ports.hbone,
        ),
        Err(e) => Route::Unroutable {
            service: Some(service),
            reason: e.to_string(),
        },
    }
}

/// Resolves the hostname of `workload`, an endpoint of `service` picked for client `src`;
/// `like` is the original destination (its family is preferred).
pub(super) async fn resolve(
    metrics: &ProxyMetrics,
    src: &PeerInfo,
    workload: &Workload,
    service: NamespacedHostname,
    like: IpAddr,
    timeout: Duration,
) -> Result<IpAddr, OnDemandDnsError> {
    let hostname = workload.hostname.as_str();
    metrics
        .on_demand_dns
        .get_or_create(&OnDemandDnsLabels::new(src, hostname))
        .inc();
    let lookup = tokio::net::lookup_host((hostname, 0));
    let failure = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(addrs)) => {
            let ips: Vec<IpAddr> = addrs.map(|a| a.ip().to_canonical()).collect();
            match pick(&ips, like) {
                Some(ip) => {
                    tracing::debug!(%hostname, service = %service, resolved = ?ips, picked = %ip, "on-demand DNS");
                    return Ok(ip);
                }
                None => LookupFailure::Empty,
            }
        }
        Ok(Err(e)) => LookupFailure::Resolver(e),
        Err(_) => LookupFailure::Timeout(timeout),
    };
    Err(OnDemandDnsError {
        hostname: hostname.to_string(),
        workload: workload.uid.clone(),
        service,
        failure,
    })
}

/// One of `ips` at random, of `like`'s family when there is one.
fn pick(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    let v4 = like.to_canonical().is_ipv4();
    let same: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == v4)
        .collect();
    let mut rng = rand::rng();
    same.choose(&mut rng)
        .or_else(|| ips.choose(&mut rng))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::super::outbound::resolve as route_for;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_original_destinations_family_is_preferred() {
        let both = [ip("192.0.2.1"), ip("2001:db8::1"), ip("192.0.2.2")];
        for _ in 0..32 {
            assert!(pick(&both, ip("10.96.0.1")).unwrap().is_ipv4());
            assert_eq!(pick(&both, ip("fd00::1")), Some(ip("2001:db8::1")));
            // A v4-mapped original destination is v4.
            assert!(pick(&both, ip("::ffff:10.96.0.1")).unwrap().is_ipv4());
        }
        // Only the other family: that one rather than nothing.
        assert_eq!(
            pick(&[ip("2001:db8::1")], ip("10.0.0.1")),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(pick(&[], ip("10.0.0.1")), None);
    }

    #[test]
    fn a_hostname_endpoint_is_routed_for_resolution() {
        let snap = crate::state::file::test_store(
            r#"
workloads:
- {uid: client, name: client, namespace: ns, serviceAccount: c, workloadIps: ["10.0.0.9"],
   protocol: HBONE}
- {uid: ext, name: ext, namespace: ns, hostname: db.example.com, protocol: TCP,
   services: {"ns/db.example.com": {5432: 15432}}}
services:
- {name: db, namespace: ns, hostname: db.example.com, vips: ["/240.240.0.1"],
   ports: {5432: 5432}}
"#,
        )
        .snapshot();
        let src = snap.workload_by_uid("client").cloned();
        let dst: SocketAddr = "240.240.0.1:5432".parse().unwrap();
        match route_for(&snap, src.as_deref(), "", dst, 15008) {
            Route::OnDemandDns {
                workload,
                port,
                service,
            } => {
                assert_eq!(workload.hostname, "db.example.com");
                assert_eq!(port, 15432);
                assert_eq!(service.name, "db");
            }
            r => panic!("{r:?}"),
        }
    }
}
