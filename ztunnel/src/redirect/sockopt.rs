//! Socket options shared by the socket factories.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use socket2::{Domain, SockRef, Socket, Type};

use super::canonical;
use crate::config::Keepalive;

/// The pre-NAT destination of a REDIRECTed connection.
pub fn original_dst<S: AsFd>(stream: &S) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("socket has no IP address"))?;
    let is_v4 = match local.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    let addr = if is_v4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned a non-IP address"))
}

/// Options every socket of a proxy gets.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOptions {
    /// `SO_MARK`.
    pub mark: Option<u32>,
    /// `SO_REUSEPORT` on listeners.
    pub reuse_port: bool,
    /// `IP_TRANSPARENT` on listeners (TPROXY).
    pub transparent_listeners: bool,
    /// TCP keepalive of outbound sockets.
    pub keepalive: Keepalive,
}

/// A listening socket on `addr`; `[::]` becomes dual-stack, falling back to `0.0.0.0` when
/// the namespace has no IPv6.
pub fn listener(addr: SocketAddr, opts: &SocketOptions) -> io::Result<std::net::TcpListener> {
    with_v4_fallback(addr, |a| listener_exact(a, opts))
}

/// `bind(addr)`, and when `addr` is `[::]` in a namespace without IPv6, `bind(0.0.0.0)`.
fn with_v4_fallback<T>(
    addr: SocketAddr,
    bind: impl Fn(SocketAddr) -> io::Result<T>,
) -> io::Result<T> {
    match bind(addr) {
        Err(e)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
        {
            bind(SocketAddr::new([0, 0, 0, 0].into(), addr.port()))
        }
        r => r,
    }
}

fn listener_exact(addr: SocketAddr, opts: &SocketOptions) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    if opts.reuse_port {
        sock.set_reuse_port(true)?;
    }
    if let Some(mark) = opts.mark {
        sock.set_mark(mark)?;
    }
    if opts.transparent_listeners {
        if addr.is_ipv6() {
            sock.set_ip_transparent_v6(true)?;
        } else {
            sock.set_ip_transparent_v4(true)?;
        }
    }
    sock.set_tcp_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// A UDP socket bound to `addr` (the DNS proxy's server socket, or port 0 for a query it
/// forwards), marked; `[::]` becomes dual-stack, falling back to `0.0.0.0` without IPv6.
/// Server sockets get `SO_REUSEPORT` like the listeners, so a new ztunnel can bind beside
/// the old one.
pub fn udp_socket(addr: SocketAddr, opts: &SocketOptions) -> io::Result<std::net::UdpSocket> {
    let exact = |addr: SocketAddr| -> io::Result<std::net::UdpSocket> {
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM.cloexec(), None)?;
        if addr.is_ipv6() {
            sock.set_only_v6(false)?;
        }
        if addr.port() != 0 {
            sock.set_reuse_address(true)?;
            if opts.reuse_port {
                sock.set_reuse_port(true)?;
            }
        }
        if let Some(mark) = opts.mark {
            sock.set_mark(mark)?;
        }
        sock.bind(&addr.into())?;
        sock.set_nonblocking(true)?;
        Ok(sock.into())
    };
    with_v4_fallback(addr, exact)
}

/// An unconnected outbound TCP socket for `dst`, marked, optionally bound to `orig_src`
/// with `IP_TRANSPARENT`.
pub fn outbound_socket(
    dst: SocketAddr,
    orig_src: Option<IpAddr>,
    opts: &SocketOptions,
) -> io::Result<tokio::net::TcpSocket> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), None)?;
    if let Some(mark) = opts.mark {
        sock.set_mark(mark)?;
    }
    sock.set_tcp_nodelay(true)?;
    crate::proxy::sockets::set_keepalive(socket2::SockRef::from(&sock), &opts.keepalive)?;
    if let Some(src) = orig_src {
        if dst.is_ipv6() {
            sock.set_ip_transparent_v6(true)?;
        } else {
            sock.set_ip_transparent_v4(true)?;
        }
        let src = match (src, dst) {
            (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (s, _) => s,
        };
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    sock.set_nonblocking(true)?;
    let std_stream: std::net::TcpStream = sock.into();
    Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbound_sockets_keep_alive_as_upstream() {
        let sock = outbound_socket(
            "10.0.0.1:80".parse().unwrap(),
            None,
            &SocketOptions::default(),
        )
        .unwrap();
        let r = SockRef::from(&sock);
        assert!(r.keepalive().unwrap());
        let idle = std::time::Duration::from_secs(180);
        assert_eq!(r.tcp_keepalive_time().unwrap(), idle);
        assert_eq!(r.tcp_keepalive_interval().unwrap(), idle);
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 9);
        assert_eq!(r.tcp_user_timeout().unwrap(), None);
    }

    /// `KEEPALIVE_*` / `USER_TIMEOUT_ENABLED` reach the sockets.
    #[tokio::test]
    async fn outbound_sockets_follow_the_keepalive_settings() {
        let dst = "10.0.0.1:80".parse().unwrap();
        let custom = SocketOptions {
            keepalive: Keepalive {
                enabled: true,
                time: std::time::Duration::from_secs(30),
                interval: std::time::Duration::from_secs(10),
                retries: 3,
                user_timeout: true,
            },
            ..SocketOptions::default()
        };
        let sock = outbound_socket(dst, None, &custom).unwrap();
        let r = SockRef::from(&sock);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap().as_secs(), 30);
        assert_eq!(r.tcp_keepalive_interval().unwrap().as_secs(), 10);
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            r.tcp_user_timeout().unwrap(),
            Some(std::time::Duration::from_secs(60))
        );
        let off = SocketOptions {
            keepalive: Keepalive {
                enabled: false,
                ..Keepalive::default()
            },
            ..SocketOptions::default()
        };
        let sock = outbound_socket(dst, None, &off).unwrap();
        assert!(!SockRef::from(&sock).keepalive().unwrap());
    }
}
