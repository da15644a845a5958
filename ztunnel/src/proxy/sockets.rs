//! The socket interface of the proxy engine: how listeners and outbound connections are
//! obtained, and how a captured connection's original destination is recovered.
//!
//! The engine depends only on this trait; implementations live above it in
//! [`crate::redirect`] (dedicated, in-pod, transparent). Methods return boxed futures so an
//! implementation can hop to a netns thread without blocking a runtime thread.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::config::Keepalive;

/// TCP keepalive on every proxied socket, as upstream (`KEEPALIVE_*`; by default the first
/// probe after 180 s idle, then every 180 s, 9 probes): keeps idle connections alive
/// through NAT gateways and load balancers with idle timeouts (the app's own keepalive
/// only reaches ztunnel) and detects peers that vanished. With `USER_TIMEOUT_ENABLED`,
/// also `TCP_USER_TIMEOUT` over the same span.
pub fn set_keepalive(sock: socket2::SockRef<'_>, k: &Keepalive) -> io::Result<()> {
    if !k.enabled {
        return Ok(());
    }
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(k.time)
            .with_interval(k.interval)
            .with_retries(k.retries),
    )?;
    if let Some(t) = k.user_timeout() {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a listener is for (a transparent factory treats them differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// 15001: captured outbound connections of the workload.
    Outbound,
    /// 15006: captured plaintext inbound connections.
    InboundPlain,
    /// 15008: HBONE (mTLS) inbound.
    Hbone,
    /// 15053: the DNS proxy's TCP side.
    Dns,
    /// 15080 on loopback (`UNSTABLE_ENABLE_SOCKS5`): SOCKS5 clients dial it themselves,
    /// nothing is redirected to it.
    Socks5,
}

/// How the original destination of an accepted connection is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalDestination {
    /// nat REDIRECT: ask conntrack (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`).
    SoOriginalDst,
    /// TPROXY: the accepted socket's local address is the original destination.
    LocalAddress,
}

/// Creates the sockets of one proxy instance.
pub trait SocketFactory: Send + Sync + 'static {
    /// Binds and listens on `addr` (`[::]:port` normally; dual-stack where possible).
    fn bind_listener(
        &self,
        addr: SocketAddr,
        kind: ListenerKind,
    ) -> BoxFuture<'_, io::Result<TcpListener>>;

    /// A UDP socket bound to `addr`, marked like the TCP sockets: the DNS proxy's server
    /// socket (`127.0.0.1:15053`), or port 0 for a query it forwards upstream.
    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<UdpSocket>>;

    /// Connects to `dst` (a local application, a peer's HBONE port or a passthrough
    /// destination). With `orig_src`, the connection keeps the client's IP as its source
    /// (transparent / freebind), where the implementation supports it.
    fn connect(
        &self,
        dst: SocketAddr,
        orig_src: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>>;

    /// How to recover original destinations of accepted connections.
    fn original_destination_mode(&self) -> OriginalDestination;

    /// The original destination of a connection accepted on a capture listener, IPv4
    /// addresses in plain (not IPv4-mapped) form.
    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr>;

    /// Short description for logs (`dedicated`, `netns /var/run/netns/x`, ...).
    fn describe(&self) -> String;
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
