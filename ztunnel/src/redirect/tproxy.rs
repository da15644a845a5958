//! TPROXY mode (shared proxy with GENEVE redirection, `INPOD_ENABLED=false`): the node
//! agent tunnels enrolled pods' traffic into ztunnel's own network namespace, where TPROXY
//! rules hand it to transparent listeners on 15001/15006/15008.
//!
//! - Listeners carry `IP_TRANSPARENT`, so TPROXY can give them connections addressed to
//!   any IP; the original destination is the accepted socket's local address.
//! - Outbound connections are plain sockets in the current namespace; with a client
//!   address (`ENABLE_ORIG_SRC`) they get `IP_TRANSPARENT` and `IP_FREEBIND` and bind to
//!   it, so a local destination sees the real client IP (the node agent's 0x210/0x040
//!   marks and ztunnel netns' 0x4d3 mark bring the replies back).
//! - No `SO_MARK`: in this mode nothing in ztunnel's namespace captures its own traffic.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::sockopt::{self, SocketOptions};
use super::{BoxFuture, ListenerKind, OriginalDestination, SocketFactory, canonical};
use crate::config::Keepalive;

/// Transparent sockets in the current network namespace.
#[derive(Debug, Clone, Default)]
pub struct TproxySocketFactory {
    opts: SocketOptions,
}

impl TproxySocketFactory {
    pub fn new() -> Self {
        TproxySocketFactory {
            opts: SocketOptions {
                mark: None,
                reuse_port: false,
                transparent_listeners: true,
                keepalive: Keepalive::default(),
            },
        }
    }

    /// Outbound sockets with keepalive `k` (`KEEPALIVE_*`).
    pub fn with_keepalive(mut self, k: Keepalive) -> Self {
        self.opts.keepalive = k;
        self
    }
}

/// True when this process may set `IP_TRANSPARENT` (needs `CAP_NET_ADMIN` or
/// `CAP_NET_RAW`): the default of `ENABLE_ORIG_SRC` in TPROXY mode.
pub fn transparent_supported() -> bool {
    Socket::new(Domain::IPV4, Type::STREAM, None)
        .and_then(|s| s.set_ip_transparent_v4(true))
        .is_ok()
}

/// An unconnected socket toward `dst`; with `orig_src`, transparent + freebind and bound
/// to that address (any port).
fn outbound_socket(
    dst: SocketAddr,
    orig_src: Option<IpAddr>,
    keepalive: &Keepalive,
) -> io::Result<tokio::net::TcpSocket> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), None)?;
    sock.set_tcp_nodelay(true)?;
    crate::proxy::sockets::set_keepalive(socket2::SockRef::from(&sock), keepalive)?;
    if let Some(src) = orig_src {
        let src = match (src.to_canonical(), dst) {
            (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (s, _) => s,
        };
        if dst.is_ipv6() {
            sock.set_ip_transparent_v6(true)?;
            sock.set_freebind_v6(true)?;
        } else {
            sock.set_ip_transparent_v4(true)?;
            sock.set_freebind_v4(true)?;
        }
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    sock.set_nonblocking(true)?;
    let std_stream: std::net::TcpStream = sock.into();
    Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
}

impl SocketFactory for TproxySocketFactory {
    fn bind_listener(
        &self,
        addr: SocketAddr,
        kind: ListenerKind,
    ) -> BoxFuture<'_, io::Result<TcpListener>> {
        // SOCKS5 clients dial its loopback address themselves: nothing to intercept.
        let opts = SocketOptions {
            transparent_listeners: self.opts.transparent_listeners && kind != ListenerKind::Socks5,
            ..self.opts
        };
        let result = sockopt::listener(addr, &opts).and_then(TcpListener::from_std);
        Box::pin(async move { result })
    }

    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<UdpSocket>> {
        // Not transparent: DNS queries reach the node proxy DNATed to its own address.
        let plain = SocketOptions {
            transparent_listeners: false,
            ..self.opts
        };
        let result = sockopt::udp_socket(addr, &plain).and_then(UdpSocket::from_std);
        Box::pin(async move { result })
    }

    fn connect(
        &self,
        dst: SocketAddr,
        orig_src: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        let sock = outbound_socket(dst, orig_src, &self.opts.keepalive);
        Box::pin(async move { sock?.connect(dst).await })
    }

    fn original_destination_mode(&self) -> OriginalDestination {
        OriginalDestination::LocalAddress
    }

    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr().map(canonical)
    }

    fn describe(&self) -> String {
        "current netns, transparent (TPROXY)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn transparent_flag<S: AsRawFd>(s: &S, v6: bool) -> bool {
        let (level, name) = if v6 {
            (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
        } else {
            (libc::SOL_IP, libc::IP_TRANSPARENT)
        };
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: plain getsockopt into a c_int.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&mut val as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        val != 0
    }

    #[tokio::test]
    async fn listeners_are_transparent_and_local_address_is_the_destination() {
        if !transparent_supported() {
            eprintln!("skipped: IP_TRANSPARENT needs CAP_NET_ADMIN");
            return;
        }
        let f = TproxySocketFactory::new();
        assert_eq!(
            f.original_destination_mode(),
            OriginalDestination::LocalAddress
        );
        let l = f
            .bind_listener("[::]:0".parse().unwrap(), ListenerKind::Outbound)
            .await
            .unwrap();
        assert!(transparent_flag(&l, true));
        let port = l.local_addr().unwrap().port();
        let (c, a) = tokio::join!(
            f.connect(SocketAddr::from(([127, 0, 0, 1], port)), None),
            l.accept()
        );
        let mut c = c.unwrap();
        let (mut s, peer) = a.unwrap();
        // dual-stack listener: IPv4-mapped addresses come back plain
        assert_eq!(
            f.original_destination(&s).unwrap(),
            SocketAddr::from(([127, 0, 0, 1], port))
        );
        assert_eq!(canonical(peer).ip(), IpAddr::from([127, 0, 0, 1]));
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        // no mark in this mode
        assert_eq!(socket2::SockRef::from(&c).mark().unwrap(), 0);
    }

    #[tokio::test]
    async fn connect_keeps_a_foreign_source_address() {
        if !transparent_supported() {
            eprintln!("skipped: IP_TRANSPARENT needs CAP_NET_ADMIN");
            return;
        }
        // The socket binds to an address this host does not have (transparent + freebind);
        // the SYN then leaves with it. Whether a reply comes back is routing's business
        // (tested in the GENEVE netns tests); here the bind is what must work.
        let sock = outbound_socket(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            Some(IpAddr::from([192, 0, 2, 77])),
            &Keepalive::default(),
        )
        .unwrap();
        assert_eq!(
            sock.local_addr().unwrap().ip(),
            IpAddr::from([192, 0, 2, 77])
        );
        assert!(transparent_flag(&sock, false));
        // and into a v6 socket as an IPv4-mapped address
        let sock6 = outbound_socket(
            "[::1]:9".parse().unwrap(),
            Some(IpAddr::from([192, 0, 2, 77])),
            &Keepalive::default(),
        )
        .unwrap();
        assert_eq!(
            canonical(sock6.local_addr().unwrap()).ip(),
            IpAddr::from([192, 0, 2, 77])
        );
    }
}
