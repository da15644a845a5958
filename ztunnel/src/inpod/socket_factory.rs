//! Sockets for one in-pod workload, created inside the pod's netns: the
//! listeners (15001, 15006, 15008 on `[::]`, `SO_REUSEPORT` so a new ztunnel
//! can bind beside the old one during an upgrade) and the outbound sockets
//! (so they leave with the pod's own IP). Every socket gets `SO_MARK`
//! (`PACKET_MARK`, 1337 = 0x539), which the pod's rules use to exempt
//! ztunnel's own traffic from capture. Original destinations come from nat
//! REDIRECT (`SO_ORIGINAL_DST`), as in dedicated mode.
//!
//! Sockets keep the namespace they were created in, so only creation runs on
//! the [`NetnsExecutor`] thread (with the same socket options code as the
//! other factories, [`crate::redirect::sockopt`]); connecting, accepting and
//! I/O happen on the runtime.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::netns::{InpodNetns, NetnsExecutor};
use crate::config::Keepalive;
use crate::redirect::sockopt::{self, SocketOptions};
use crate::redirect::{BoxFuture, ListenerKind, OriginalDestination, SocketFactory};

/// ztunnel's in-pod ports.
pub const PORT_OUTBOUND: u16 = 15001;
pub const PORT_INBOUND_PLAIN: u16 = 15006;
pub const PORT_HBONE: u16 = 15008;
/// Default `SO_MARK` in in-pod mode.
pub const DEFAULT_MARK: u32 = 1337;

/// Creates one workload's sockets inside its netns.
#[derive(Debug, Clone)]
pub struct InpodSocketFactory {
    netns: Arc<InpodNetns>,
    opts: SocketOptions,
}

impl InpodSocketFactory {
    /// `mark`: `SO_MARK` for every socket (`PACKET_MARK`; `None` only in
    /// tests); `reuse_port`: `INPOD_PORT_REUSE`.
    pub fn new(netns: Arc<InpodNetns>, mark: Option<u32>, reuse_port: bool) -> Self {
        Self {
            netns,
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

    pub fn netns(&self) -> &Arc<InpodNetns> {
        &self.netns
    }

    fn in_netns<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = io::Result<T>> + Send + 'static {
        let netns = self.netns.clone();
        async move {
            let inode = netns.inode();
            NetnsExecutor::global()
                .run(&netns, f)
                .await
                .map_err(|e| io::Error::other(format!("netns {inode}: {what}: {e}")))?
                .map_err(|e| io::Error::new(e.kind(), format!("netns {inode}: {what}: {e}")))
        }
    }

    /// The three in-pod listeners on `[::]`: (outbound 15001, inbound plain
    /// 15006, HBONE 15008).
    pub async fn workload_listeners(&self) -> io::Result<(TcpListener, TcpListener, TcpListener)> {
        let any = |p| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, p));
        Ok((
            self.bind_listener(any(PORT_OUTBOUND), ListenerKind::Outbound)
                .await?,
            self.bind_listener(any(PORT_INBOUND_PLAIN), ListenerKind::InboundPlain)
                .await?,
            self.bind_listener(any(PORT_HBONE), ListenerKind::Hbone)
                .await?,
        ))
    }
}

impl SocketFactory for InpodSocketFactory {
    fn bind_listener(
        &self,
        addr: SocketAddr,
        _kind: ListenerKind,
    ) -> BoxFuture<'_, io::Result<TcpListener>> {
        let opts = self.opts;
        let created = self.in_netns(format!("binding {addr}"), move || {
            sockopt::listener(addr, &opts)
        });
        Box::pin(async move { TcpListener::from_std(created.await?) })
    }

    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<UdpSocket>> {
        let opts = self.opts;
        let created = self.in_netns(format!("binding udp {addr}"), move || {
            sockopt::udp_socket(addr, &opts)
        });
        Box::pin(async move { UdpSocket::from_std(created.await?) })
    }

    fn connect(
        &self,
        dst: SocketAddr,
        orig_src: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        let opts = self.opts;
        let created = self.in_netns(format!("socket for {dst}"), move || {
            sockopt::outbound_socket(dst, orig_src, &opts)
        });
        Box::pin(async move { created.await?.connect(dst).await })
    }

    fn original_destination_mode(&self) -> OriginalDestination {
        OriginalDestination::SoOriginalDst
    }

    fn original_destination(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        sockopt::original_dst(stream)
    }

    fn describe(&self) -> String {
        match self.opts.mark {
            Some(m) => format!("pod netns {}, mark {m:#x}", self.netns.inode()),
            None => format!("pod netns {}", self.netns.inode()),
        }
    }
}
