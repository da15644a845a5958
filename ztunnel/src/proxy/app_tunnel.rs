//! Application tunnels (a workload's `applicationTunnel`, as upstream): an inbound HBONE
//! stream for a workload that asks for one is delivered on the tunnel's port (default: the
//! target port), and with `protocol: PROXY` it starts with a PROXY protocol v2 header
//! carrying the client's address, the HBONE target (e.g. `VIP:port` for a sandwiched
//! waypoint) and, in TLV 0xD0, the client's SPIFFE identity. Such a workload receives
//! targets other than its own address without the waypoint check: it decides from the
//! header.
//!
//! With `LOCALHOST_APP_TUNNEL` (default true, as upstream) and a proxy inside the
//! workload's netns (in-pod, dedicated), a PROXY tunnel is reached on loopback, so the app
//! can listen on localhost only and never be reached around ztunnel.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Version};

use crate::identity::Identity;
use crate::state::workload::{ApplicationTunnel, ApplicationTunnelProtocol};

/// Upstream's TLV type for the client's identity in the PROXY header.
pub const IDENTITY_TLV: u8 = 0xD0;

/// Where an inbound stream goes and what it starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The address ztunnel connects to.
    pub connect_to: SocketAddr,
    /// Connect from loopback, never from the client's address (original source is
    /// meaningless there; the header carries it).
    pub from_loopback: bool,
    /// With PROXY: the destination the header names (the HBONE target).
    pub proxy_target: Option<SocketAddr>,
}

/// The delivery of a stream for HBONE `target` whose upstream (the served workload's
/// address with the target's port) is `upstream`, for a workload with `tunnel`;
/// `loopback_allowed`: `LOCALHOST_APP_TUNNEL` and the proxy runs in the workload's netns.
pub fn delivery(
    tunnel: Option<&ApplicationTunnel>,
    upstream: SocketAddr,
    target: SocketAddr,
    loopback_allowed: bool,
) -> Delivery {
    let Some(tunnel) = tunnel else {
        return Delivery {
            connect_to: upstream,
            from_loopback: false,
            proxy_target: None,
        };
    };
    let port = tunnel.port.unwrap_or(upstream.port());
    let proxy = tunnel.protocol == ApplicationTunnelProtocol::PROXY;
    // As upstream: only PROXY carries what loopback would hide (the client's address).
    let from_loopback = proxy && loopback_allowed;
    let ip = if from_loopback {
        match upstream.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    } else {
        upstream.ip()
    };
    Delivery {
        connect_to: SocketAddr::new(ip, port),
        from_loopback,
        proxy_target: proxy.then_some(target),
    }
}

/// A PROXY protocol v2 header (`PROXY`, TCP) from `src` to `dst` with `identity` in TLV
/// 0xD0. Addresses of different families are both given as IPv6 (IPv4-mapped).
pub fn proxy_header(src: SocketAddr, dst: SocketAddr, identity: &Identity) -> io::Result<Vec<u8>> {
    let (src, dst) = match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (src, dst)
        }
        _ => (as_v6(src), as_v6(dst)),
    };
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
        .write_tlv(IDENTITY_TLV, identity.to_string().as_bytes())?
        .build()
}

fn as_v6(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Addresses, Header};

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn tunnel(protocol: ApplicationTunnelProtocol, port: Option<u16>) -> ApplicationTunnel {
        ApplicationTunnel { protocol, port }
    }

    #[test]
    fn delivery_follows_the_tunnel() {
        let (up, target) = (a("10.0.0.5:8080"), a("10.96.0.1:80"));
        let none = delivery(None, up, target, true);
        assert_eq!(none.connect_to, up);
        assert!(!none.from_loopback && none.proxy_target.is_none());

        let proxy = tunnel(ApplicationTunnelProtocol::PROXY, Some(15088));
        let d = delivery(Some(&proxy), up, target, true);
        assert_eq!(d.connect_to, a("127.0.0.1:15088"));
        assert!(d.from_loopback);
        assert_eq!(d.proxy_target, Some(target));
        let d = delivery(Some(&proxy), up, target, false);
        assert_eq!(d.connect_to, a("10.0.0.5:15088"));
        assert!(!d.from_loopback);
        let d = delivery(Some(&proxy), a("[fd00::5]:8080"), target, true);
        assert_eq!(d.connect_to, a("[::1]:15088"));

        // NONE: only the port changes (or nothing without one); never loopback.
        let plain = tunnel(ApplicationTunnelProtocol::NONE, None);
        let d = delivery(Some(&plain), up, target, true);
        assert_eq!(d.connect_to, up);
        assert!(!d.from_loopback && d.proxy_target.is_none());
        let d = delivery(
            Some(&tunnel(ApplicationTunnelProtocol::PROXY, None)),
            up,
            target,
            false,
        );
        assert_eq!(d.connect_to, up);
    }

    #[test]
    fn header_carries_addresses_and_identity() {
        let id: Identity = "spiffe://cluster.local/ns/app/sa/client".parse().unwrap();
        let bytes = proxy_header(a("10.0.0.9:40000"), a("10.96.0.1:80"), &id).unwrap();
        let h = Header::try_from(&bytes[..]).unwrap();
        assert_eq!(h.len(), bytes.len());
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(h.protocol, Protocol::Stream);
        let Addresses::IPv4(ip) = h.addresses else {
            panic!("{:?}", h.addresses)
        };
        assert_eq!(
            (ip.source_address, ip.source_port),
            ("10.0.0.9".parse().unwrap(), 40000)
        );
        assert_eq!(
            (ip.destination_address, ip.destination_port),
            ("10.96.0.1".parse().unwrap(), 80)
        );
        let tlvs: Vec<_> = h.tlvs().map(Result::unwrap).collect();
        assert_eq!(tlvs.len(), 1);
        assert_eq!(tlvs[0].kind, IDENTITY_TLV);
        assert_eq!(&tlvs[0].value[..], id.to_string().as_bytes());

        // Mixed families: both as IPv6.
        let bytes = proxy_header(a("10.0.0.9:40000"), a("[fd00::1]:80"), &id).unwrap();
        let Addresses::IPv6(ip) = Header::try_from(&bytes[..]).unwrap().addresses else {
            panic!("IPv6 expected")
        };
        assert_eq!(
            ip.source_address,
            "::ffff:10.0.0.9".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(ip.destination_port, 80);
    }
}
