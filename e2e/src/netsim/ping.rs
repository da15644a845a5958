//! ICMP echo from inside a namespace (raw socket on a namespace thread), so
//! tests need no `ping` binary.

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::error::{NetsimError, Result};
use super::namespace::NamedNetns;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"netsim-ping-payload");
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Sends one echo request and waits for the matching reply.
fn ping_once(dst: Ipv4Addr, timeout: Duration) -> std::io::Result<Duration> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    let id = (std::process::id() as u16) ^ (rand_u16());
    let start = Instant::now();
    sock.send_to(&echo_request(id, 1), &SocketAddr::from((dst, 0)).into())?;
    let deadline = start + timeout;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no echo reply from {dst} within {timeout:?}"),
            ));
        }
        sock.set_read_timeout(Some(deadline - now))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let pkt: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, n) };
        let ihl = ((pkt.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
        let Some(icmp) = pkt.get(ihl..) else { continue };
        let from_ip = from.as_socket().map(|s| s.ip());
        if icmp.len() >= 8
            && icmp[0] == 0
            && u16::from_be_bytes([icmp[4], icmp[5]]) == id
            && from_ip == Some(IpAddr::V4(dst))
        {
            return Ok(start.elapsed());
        }
    }
}

fn rand_u16() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.subsec_nanos() >> 7) as u16)
        .unwrap_or(0)
}

impl NamedNetns {
    /// ICMP echo to `dst` from inside this namespace; `Ok(rtt)` on a reply
    /// within `timeout`, an error naming both ends otherwise. Tries up to
    /// three times (the first packet may be spent on ARP).
    pub fn ping(&self, dst: Ipv4Addr, timeout: Duration) -> Result<Duration> {
        let per_try = timeout / 3;
        let res = self.run(move || {
            let mut last = None;
            for _ in 0..3 {
                match ping_once(dst, per_try) {
                    Ok(rtt) => return Ok(rtt),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("at least one try"))
        })?;
        res.map_err(|source| NetsimError::Io {
            netns: self.name().to_string(),
            action: format!("ping {dst}"),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(0x1234, 1);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        assert_eq!(p[0], 8);
    }
}
