//! `SOCK_SEQPACKET` Unix sockets on tokio (which has no seqpacket type):
//! nix for the syscalls, [`AsyncFd`] for readiness. One datagram = one
//! message; `SCM_RIGHTS` carries fds.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A listening seqpacket socket.
pub struct SeqpacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqpacketListener {
    /// Binds `path` (the caller removes a stale file first).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        socket::bind(fd.as_raw_fd(), &addr)?;
        socket::listen(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
        Ok(Self { fd: register(fd)? })
    }

    pub async fn accept(&self) -> io::Result<SeqpacketConn> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                socket::accept4(fd, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)
                    .map_err(io::Error::from)
            }) {
                Ok(res) => return SeqpacketConn::from_fd(res?),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A connected seqpacket socket.
pub struct SeqpacketConn {
    fd: AsyncFd<OwnedFd>,
}

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    pub data: Vec<u8>,
    /// Fds that came with it (closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// The datagram or its ancillary data did not fit.
    pub truncated: bool,
}

impl SeqpacketConn {
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self { fd: register(fd)? })
    }

    /// Connects to `path` (non-blocking; for tests and tools).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Self::from_fd(fd)
    }

    /// Sends one datagram, with `fd` as `SCM_RIGHTS` when given.
    pub async fn send(&self, data: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<RawFd> = fd.map(|f| f.as_raw_fd()).into_iter().collect();
        self.fd
            .async_io(Interest::WRITABLE, |sock| {
                let iov = [IoSlice::new(data)];
                let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
                    Vec::new()
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                let n = socket::sendmsg::<()>(
                    sock.as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)?;
                if n != data.len() {
                    return Err(io::Error::other(format!(
                        "short seqpacket send: {n} of {} bytes",
                        data.len()
                    )));
                }
                Ok(())
            })
            .await
    }

    /// Receives one datagram into a `cap`-byte buffer. `Ok(None)` = EOF.
    pub async fn recv(&self, cap: usize) -> io::Result<Option<Datagram>> {
        self.fd
            .async_io(Interest::READABLE, |sock| recv_now(sock.as_raw_fd(), cap))
            .await
    }

    /// True when something arrives within `wait` (a datagram, EOF or an
    /// error), without consuming it. Used for the idle-connection check,
    /// where anything readable means the peer is gone or broke protocol.
    pub async fn activity_within(&self, wait: std::time::Duration) -> bool {
        let check = async {
            loop {
                let Ok(mut guard) = self.fd.readable().await else {
                    return;
                };
                let peeked = guard.try_io(|fd| {
                    let mut b = [0u8; 1];
                    socket::recv(
                        fd.as_raw_fd(),
                        &mut b,
                        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                    )
                    .map_err(io::Error::from)
                });
                match peeked {
                    Err(_would_block) => continue,
                    Ok(_) => return,
                }
            }
        };
        tokio::time::timeout(wait, check).await.is_ok()
    }
}

impl AsFd for SeqpacketConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is a valid socket owned by the AsyncFd from now on;
    // it is never replaced or closed behind the AsyncFd's back.
    Ok(unsafe { AsyncFd::register(fd)? })
}

fn recv_now(fd: RawFd, cap: usize) -> io::Result<Option<Datagram>> {
    let mut buf = vec![0u8; cap];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let (n, flags, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these fds for us.
                    fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                }
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if n == 0 && fds.is_empty() && !flags.contains(MsgFlags::MSG_TRUNC) {
        return Ok(None);
    }
    buf.truncate(n.min(cap));
    Ok(Some(Datagram {
        data: buf,
        fds,
        truncated: flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
    }))
}
