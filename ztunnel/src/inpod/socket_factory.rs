//! Sockets for one in-pod workload, created inside the pod's netns: the
//! listeners (15001, 15006, 15008 on `[::]`, `SO_REUSEPORT` so a new ztunnel
//! can bind beside the old one during an upgrade) and the outbound sockets
//! (so they leave with the pod's own IP). Every socket gets `SO_MARK`
//! (`PACKET_MARK`, 1337 = 0x539), which the pod's rules use to exempt
//! ztunnel's own traffic from capture.
//!
//! Sockets keep the namespace they were created in, so only creation runs on
//! the [`NetnsExecutor`] thread; everything else happens on the runtime.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

use super::netns::{InpodNetns, NetnsError, NetnsExecutor};

/// ztunnel's in-pod ports.
pub const PORT_OUTBOUND: u16 = 15001;
pub const PORT_INBOUND_PLAIN: u16 = 15006;
pub const PORT_HBONE: u16 = 15008;
/// Default `SO_MARK` in in-pod mode.
pub const DEFAULT_MARK: u32 = 1337;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("netns {inode}: {source}")]
    Netns {
        inode: u64,
        #[source]
        source: NetnsError,
    },
    #[error("netns {inode}: {what} {addr}: {source}")]
    Io {
        inode: u64,
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Creates one workload's sockets inside its netns.
#[derive(Debug, Clone)]
pub struct InpodSocketFactory {
    netns: Arc<InpodNetns>,
    mark: Option<u32>,
    reuse_port: bool,
}

impl InpodSocketFactory {
    /// `mark`: `SO_MARK` for every socket (`None` only in tests without
    /// CAP_NET_ADMIN); `reuse_port`: `INPOD_PORT_REUSE`.
    pub fn new(netns: Arc<InpodNetns>, mark: Option<u32>, reuse_port: bool) -> Self {
        Self {
            netns,
            mark,
            reuse_port,
        }
    }

    pub fn netns(&self) -> &Arc<InpodNetns> {
        &self.netns
    }

    fn io_err(
        &self,
        what: &'static str,
        addr: impl ToString,
    ) -> impl FnOnce(std::io::Error) -> SocketError {
        let (inode, addr) = (self.netns.inode(), addr.to_string());
        move |source| SocketError::Io {
            inode,
            what,
            addr,
            source,
        }
    }

    /// A TCP listener on `addr` inside the pod netns. `[::]` listeners accept
    /// IPv4 too (dual-stack).
    pub async fn listener(&self, addr: SocketAddr) -> Result<tokio::net::TcpListener, SocketError> {
        let (mark, reuse) = (self.mark, self.reuse_port);
        let std_listener = NetnsExecutor::global()
            .run(
                &self.netns,
                move || -> std::io::Result<std::net::TcpListener> {
                    let s =
                        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                    if addr.is_ipv6() {
                        s.set_only_v6(false)?;
                    }
                    s.set_reuse_address(true)?;
                    if reuse {
                        s.set_reuse_port(true)?;
                    }
                    if let Some(m) = mark {
                        s.set_mark(m)?;
                    }
                    s.set_nonblocking(true)?;
                    s.bind(&addr.into())?;
                    s.listen(1024)?;
                    Ok(s.into())
                },
            )
            .await
            .map_err(|source| SocketError::Netns {
                inode: self.netns.inode(),
                source,
            })?
            .map_err(self.io_err("binding", addr))?;
        tokio::net::TcpListener::from_std(std_listener).map_err(self.io_err("registering", addr))
    }

    /// The three in-pod listeners on `[::]`: (outbound 15001, inbound plain
    /// 15006, HBONE 15008).
    pub async fn workload_listeners(
        &self,
    ) -> Result<
        (
            tokio::net::TcpListener,
            tokio::net::TcpListener,
            tokio::net::TcpListener,
        ),
        SocketError,
    > {
        let any = |p| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, p));
        Ok((
            self.listener(any(PORT_OUTBOUND)).await?,
            self.listener(any(PORT_INBOUND_PLAIN)).await?,
            self.listener(any(PORT_HBONE)).await?,
        ))
    }

    /// An unconnected TCP socket for `dest`'s family inside the pod netns,
    /// marked; the caller may bind it (e.g. to the original source with
    /// `IP_TRANSPARENT`) and connect it on the runtime.
    pub async fn outbound(&self, dest: SocketAddr) -> Result<tokio::net::TcpSocket, SocketError> {
        let mark = self.mark;
        let stream = NetnsExecutor::global()
            .run(
                &self.netns,
                move || -> std::io::Result<std::net::TcpStream> {
                    let s =
                        Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
                    if let Some(m) = mark {
                        s.set_mark(m)?;
                    }
                    s.set_nonblocking(true)?;
                    Ok(s.into())
                },
            )
            .await
            .map_err(|source| SocketError::Netns {
                inode: self.netns.inode(),
                source,
            })?
            .map_err(self.io_err("creating socket for", dest))?;
        Ok(tokio::net::TcpSocket::from_std_stream(stream))
    }

    /// Connects to `dest` from inside the pod netns.
    pub async fn connect(&self, dest: SocketAddr) -> Result<tokio::net::TcpStream, SocketError> {
        self.outbound(dest)
            .await?
            .connect(dest)
            .await
            .map_err(self.io_err("connecting to", dest))
    }
}
