//! ZDS on the wire, ztunnel side: one protobuf message per `SOCK_SEQPACKET`
//! datagram; `AddWorkload` carries exactly one netns fd (`SCM_RIGHTS`),
//! every other message none.
//!
//! Receiving is strict: a 1024-byte buffer, `MSG_CMSG_CLOEXEC`, `MSG_TRUNC`
//! or `MSG_CTRUNC` is an error, every fd is checked to be a network
//! namespace, and every fd received with a message that is rejected is
//! closed (they are `OwnedFd`s from the moment they are parsed).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use mesh_proto::zds::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use prost::Message;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::netns::InpodNetns;

/// ztunnel's receive buffer (as upstream).
pub const RECV_BUFFER: usize = 1024;
/// Room for this many fds in the control buffer: more than one is already an
/// error, but we want to see (and close) a few extra rather than truncate.
const MAX_FDS: usize = 8;

/// One request from the agent, validated.
#[derive(Debug)]
pub enum Request {
    Add {
        uid: String,
        info: WorkloadInfo,
        netns: InpodNetns,
    },
    Keep {
        uid: String,
    },
    Del {
        uid: String,
    },
    SnapshotSent,
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Add { .. } => "AddWorkload",
            Request::Keep { .. } => "KeepWorkload",
            Request::Del { .. } => "DelWorkload",
            Request::SnapshotSent => "SnapshotSent",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("ZDS socket: {0}")]
    Io(#[from] io::Error),
    #[error("agent closed the connection")]
    Closed,
    #[error("datagram or its ancillary data truncated (buffer {RECV_BUFFER} bytes, {MAX_FDS} fds)")]
    Truncated,
    #[error("undecodable WorkloadRequest: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("WorkloadRequest without payload")]
    NoPayload,
    #[error("{kind} carried {fds} fds (expected {expected})")]
    FdCount {
        kind: &'static str,
        fds: usize,
        expected: usize,
    },
    #[error("AddWorkload {uid}: fd is not a network namespace")]
    NotNetns { uid: String },
    #[error("AddWorkload {uid}: no workload_info")]
    NoWorkloadInfo { uid: String },
    #[error("{kind} with empty uid")]
    EmptyUid { kind: &'static str },
}

/// A connection to the agent's ZDS socket.
pub struct ZdsConnection {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConnection {
    /// Connects to the agent at `path`.
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

    /// Wraps an already connected seqpacket socket (tests: socketpair).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: we own `fd` and never replace or close it behind the
        // AsyncFd's back.
        Ok(Self {
            fd: unsafe { AsyncFd::register(fd)? },
        })
    }

    async fn send(&self, data: &[u8]) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |sock| {
                let n = socket::sendmsg::<()>(
                    sock.as_raw_fd(),
                    &[IoSlice::new(data)],
                    &[],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )?;
                if n != data.len() {
                    return Err(io::Error::other("short seqpacket send"));
                }
                Ok(())
            })
            .await
    }

    pub async fn send_hello(&self) -> io::Result<()> {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        self.send(&hello.encode_to_vec()).await
    }

    /// Acks (`None`) or Nacks (`Some(reason)`) the last request.
    pub async fn send_ack(&self, error: Option<String>) -> io::Result<()> {
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.unwrap_or_default(),
            })),
        };
        self.send(&resp.encode_to_vec()).await
    }

    /// Receives and validates the next request.
    pub async fn recv_request(&self) -> Result<Request, ProtocolError> {
        let (data, fds, flags) = self
            .fd
            .async_io(Interest::READABLE, |sock| recv_raw(sock.as_raw_fd()))
            .await?;
        if flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(ProtocolError::Truncated);
        }
        if data.is_empty() && fds.is_empty() {
            return Err(ProtocolError::Closed);
        }
        parse_request(&data, fds)
    }
}

/// Decodes and validates one datagram with the fds that came with it. The
/// fds are consumed: on any error they are closed.
pub fn parse_request(data: &[u8], mut fds: Vec<OwnedFd>) -> Result<Request, ProtocolError> {
    let req = WorkloadRequest::decode(data)?;
    let payload = req.payload.ok_or(ProtocolError::NoPayload)?;
    let expect_none = |kind: &'static str, fds: &Vec<OwnedFd>| {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::FdCount {
                kind,
                fds: fds.len(),
                expected: 0,
            })
        }
    };
    let nonempty = |kind: &'static str, uid: String| {
        if uid.is_empty() {
            Err(ProtocolError::EmptyUid { kind })
        } else {
            Ok(uid)
        }
    };
    match payload {
        workload_request::Payload::Add(add) => {
            if fds.len() != 1 {
                return Err(ProtocolError::FdCount {
                    kind: "AddWorkload",
                    fds: fds.len(),
                    expected: 1,
                });
            }
            let uid = nonempty("AddWorkload", add.uid)?;
            let info = add
                .workload_info
                .ok_or_else(|| ProtocolError::NoWorkloadInfo { uid: uid.clone() })?;
            let fd = fds.pop().expect("one fd");
            let netns =
                InpodNetns::new(fd).map_err(|_| ProtocolError::NotNetns { uid: uid.clone() })?;
            Ok(Request::Add { uid, info, netns })
        }
        workload_request::Payload::Keep(k) => {
            expect_none("KeepWorkload", &fds)?;
            Ok(Request::Keep {
                uid: nonempty("KeepWorkload", k.uid)?,
            })
        }
        workload_request::Payload::Del(d) => {
            expect_none("DelWorkload", &fds)?;
            Ok(Request::Del {
                uid: nonempty("DelWorkload", d.uid)?,
            })
        }
        workload_request::Payload::SnapshotSent(_) => {
            expect_none("SnapshotSent", &fds)?;
            Ok(Request::SnapshotSent)
        }
    }
}

/// `recvmsg` into a [`RECV_BUFFER`]-byte buffer with room for [`MAX_FDS`]
/// fds and `MSG_CMSG_CLOEXEC`. Every fd the kernel installed is returned as
/// an `OwnedFd`, even when the message was truncated, so nothing leaks.
fn recv_raw(sock: RawFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>, libc::c_int)> {
    let mut buf = vec![0u8; RECV_BUFFER];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header; we fill the pointers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len() * 8;
    // SAFETY: all pointers in msg are valid for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc
    // macros, bounded by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    buf.truncate(n as usize);
    Ok((buf, fds, msg.msg_flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::zds::{AddWorkload, DelWorkload, KeepWorkload, SnapshotSent};

    fn netns_fd() -> OwnedFd {
        std::fs::File::open("/proc/self/ns/net").unwrap().into()
    }

    fn add(uid: &str) -> Vec<u8> {
        WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(WorkloadInfo {
                    name: "n".into(),
                    namespace: "ns".into(),
                    service_account: "sa".into(),
                }),
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn add_needs_exactly_one_netns_fd() {
        assert!(matches!(
            parse_request(&add("u"), vec![netns_fd()]),
            Ok(Request::Add { .. })
        ));
        assert!(matches!(
            parse_request(&add("u"), vec![]),
            Err(ProtocolError::FdCount {
                expected: 1,
                fds: 0,
                ..
            })
        ));
        assert!(matches!(
            parse_request(&add("u"), vec![netns_fd(), netns_fd()]),
            Err(ProtocolError::FdCount { fds: 2, .. })
        ));
        let not_ns: OwnedFd = std::fs::File::open("/proc/self/status").unwrap().into();
        let e = parse_request(&add("u1"), vec![not_ns]).unwrap_err();
        assert!(matches!(e, ProtocolError::NotNetns { .. }));
        assert!(e.to_string().contains("u1"));
        assert!(matches!(
            parse_request(&add(""), vec![netns_fd()]),
            Err(ProtocolError::EmptyUid { .. })
        ));
    }

    #[test]
    fn other_messages_take_no_fd() {
        let msgs = [
            WorkloadRequest {
                payload: Some(workload_request::Payload::Keep(KeepWorkload {
                    uid: "u".into(),
                })),
            },
            WorkloadRequest {
                payload: Some(workload_request::Payload::Del(DelWorkload {
                    uid: "u".into(),
                })),
            },
            WorkloadRequest {
                payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
            },
        ];
        for m in msgs {
            let bytes = m.encode_to_vec();
            assert!(parse_request(&bytes, vec![]).is_ok());
            assert!(matches!(
                parse_request(&bytes, vec![netns_fd()]),
                Err(ProtocolError::FdCount { expected: 0, .. })
            ));
        }
    }

    #[test]
    fn garbage_and_empty_payload_are_errors() {
        assert!(matches!(
            parse_request(&[0xff, 0xff, 0xff], vec![]),
            Err(ProtocolError::Decode(_))
        ));
        assert!(matches!(
            parse_request(&[], vec![]),
            Err(ProtocolError::NoPayload)
        ));
    }
}
