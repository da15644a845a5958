//! Dedicated mode: ztunnel runs inside the workload's network namespace, so sockets are
//! created in the current namespace, each with `SO_MARK` (`PACKET_MARK`, 0x539) so the
//! namespace's capture rules let ztunnel's own traffic through. Original destinations come
//! from nat REDIRECT (`SO_ORIGINAL_DST`).

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::sockopt::{self, SocketOptions};
use super::{BoxFuture, ListenerKind, OriginalDestination, SocketFactory};
use crate::config::Keepalive;

/// Sockets in the current network namespace.
#[derive(Debug, Clone, Default)]
pub struct DedicatedSocketFactory {
    opts: SocketOptions,
}

impl DedicatedSocketFactory {
    /// `mark`: `SO_MARK` for every socket; `reuse_port`: `SO_REUSEPORT` on listeners.
    pub fn new(mark: Option<u32>, reuse_port: bool) -> Self {
        DedicatedSocketFactory {
            opts: SocketOptions {
                mark,
                reuse_port,
                transparent_listeners: false,
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

impl SocketFactory for DedicatedSocketFactory {
    fn bind_listener(
        &self,
        addr: SocketAddr,
        _kind: ListenerKind,
    ) -> BoxFuture<'_, io::Result<TcpListener>> {
        let result = sockopt::listener(addr, &self.opts).and_then(TcpListener::from_std);
        Box::pin(async move { result })
    }

    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<UdpSocket>> {
        let result = sockopt::udp_socket(addr, &self.opts).and_then(UdpSocket::from_std);
        Box::pin(async move { result })
    }

    fn connect(
        &self,
        dst: SocketAddr,
        orig_src: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        let sock = sockopt::outbound_socket(dst, orig_src, &self.opts);
        Box::pin(async move { sock?.connect(dst).await })
    }

    fn original_destination_mode(&self) -> OriginalDestination {
        OriginalDestination::SoOriginalDst
    }

    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        sockopt::original_dst(stream)
    }

    fn describe(&self) -> String {
        match self.opts.mark {
            Some(m) => format!("current netns, mark {m:#x}"),
            None => "current netns".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn listens_and_connects_with_mark() {
        // Marking needs CAP_NET_ADMIN; the tests run as root.
        let f = DedicatedSocketFactory::new(Some(0x539), true);
        let l = f
            .bind_listener("127.0.0.1:0".parse().unwrap(), ListenerKind::Outbound)
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let (mut c, (mut s, _)) =
            tokio::join!(async { f.connect(addr, None).await.unwrap() }, async {
                l.accept().await.unwrap()
            });
        let mark = socket2::SockRef::from(&c).mark().unwrap();
        assert_eq!(mark, 0x539);
        assert!(c.nodelay().unwrap());
        c.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        // Not a REDIRECTed connection: no original destination.
        assert!(f.original_destination(&s).is_err());
    }

    #[tokio::test]
    async fn dual_stack_listener() {
        let f = DedicatedSocketFactory::new(None, false);
        let l = f
            .bind_listener("[::]:0".parse().unwrap(), ListenerKind::Hbone)
            .await
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let (c, a) = tokio::join!(TcpStream::connect(("127.0.0.1", port)), l.accept());
        c.unwrap();
        let (_, peer) = a.unwrap();
        assert_eq!(super::super::canonical(peer).ip().to_string(), "127.0.0.1");
    }
}
