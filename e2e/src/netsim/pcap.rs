//! A small reader for classic pcap files (what `tcpdump -w` writes):
//! Ethernet, Linux cooked (v1/v2) and raw-IP link types; IPv4/IPv6; TCP and
//! UDP ports and payloads. Enough to answer "which ports were used" and
//! "did this plaintext appear on the wire".

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Transport protocol of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP with its flags byte (`0x02` SYN, `0x10` ACK, ...).
    Tcp {
        flags: u8,
    },
    Udp,
    Other(u8),
}

/// One decoded IP packet.
#[derive(Debug, Clone)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    /// 0 when not TCP/UDP.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP/UDP payload (empty otherwise).
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn is_tcp(&self) -> bool {
        matches!(self.transport, Transport::Tcp { .. })
    }

    /// A SYN without ACK: a connection attempt.
    pub fn is_tcp_syn(&self) -> bool {
        matches!(self.transport, Transport::Tcp { flags } if flags & 0x12 == 0x02)
    }
}

/// The packets of a capture file plus the raw frames (for searches that
/// must also look inside undecoded or encapsulated data).
#[derive(Debug, Clone, Default)]
pub struct CaptureReport {
    pub packets: Vec<Packet>,
    pub frames: Vec<Vec<u8>>,
    /// What the capture tool printed (its packet counts), for messages.
    pub log: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("cannot read capture file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("capture file {path}: {reason}")]
    Format { path: String, reason: String },
}

impl CaptureReport {
    /// Reads a pcap file.
    pub fn read(path: &Path) -> Result<Self, PcapError> {
        let data = std::fs::read(path).map_err(|source| PcapError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data).map_err(|reason| PcapError::Format {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses the bytes of a pcap file.
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        if data.len() < 24 {
            return Err(format!(
                "{} bytes is too short for a pcap header",
                data.len()
            ));
        }
        let magic = [data[0], data[1], data[2], data[3]];
        let le = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
            [0x0a, 0x0d, 0x0d, 0x0a] => {
                return Err("pcapng is not supported; use tcpdump -w (pcap)".into());
            }
            _ => return Err(format!("unknown magic {magic:02x?}")),
        };
        let u32_at = |b: &[u8], o: usize| {
            let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        };
        let linktype = u32_at(data, 20) & 0x0fff_ffff;
        let mut report = CaptureReport::default();
        let mut off = 24;
        while off + 16 <= data.len() {
            let incl = u32_at(data, off + 8) as usize;
            let start = off + 16;
            // A record cut short by a killed writer ends the file.
            let Some(frame) = data.get(start..start + incl) else {
                break;
            };
            if let Some(p) = decode_frame(linktype, frame) {
                report.packets.push(p);
            }
            report.frames.push(frame.to_vec());
            off = start + incl;
        }
        Ok(report)
    }

    /// Destination ports of TCP connection attempts (SYN without ACK): the
    /// ports connections were opened to.
    pub fn tcp_syn_dst_ports(&self) -> BTreeSet<u16> {
        self.packets
            .iter()
            .filter(|p| p.is_tcp_syn())
            .map(|p| p.dst_port)
            .collect()
    }

    /// Destination ports of all TCP packets (including replies' ephemeral
    /// ports).
    pub fn tcp_dst_ports(&self) -> BTreeSet<u16> {
        self.packets
            .iter()
            .filter(|p| p.is_tcp())
            .map(|p| p.dst_port)
            .collect()
    }

    /// Server ports of TCP packets that carry payload: whichever of the two
    /// ports was the destination of a SYN in this capture, or both ports
    /// when the capture did not see the connection open.
    pub fn tcp_payload_server_ports(&self) -> BTreeSet<u16> {
        let servers = self.tcp_syn_dst_ports();
        let mut out = BTreeSet::new();
        for p in self
            .packets
            .iter()
            .filter(|p| p.is_tcp() && !p.payload.is_empty())
        {
            match (servers.contains(&p.dst_port), servers.contains(&p.src_port)) {
                (true, _) => {
                    out.insert(p.dst_port);
                }
                (false, true) => {
                    out.insert(p.src_port);
                }
                (false, false) => {
                    out.insert(p.dst_port);
                    out.insert(p.src_port);
                }
            }
        }
        out
    }

    /// True when `marker` appears in any frame, or in the concatenated
    /// payload of any TCP direction (so a marker split across segments is
    /// found too).
    pub fn contains(&self, marker: &[u8]) -> bool {
        if marker.is_empty() {
            return true;
        }
        if self.frames.iter().any(|f| find(f, marker)) {
            return true;
        }
        let mut streams: HashMap<(IpAddr, u16, IpAddr, u16), Vec<u8>> = HashMap::new();
        for p in self
            .packets
            .iter()
            .filter(|p| p.is_tcp() && !p.payload.is_empty())
        {
            streams
                .entry((p.src, p.src_port, p.dst, p.dst_port))
                .or_default()
                .extend_from_slice(&p.payload);
        }
        streams.values().any(|s| find(s, marker))
    }

    /// Number of decoded packets.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn be16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(o)?, *b.get(o + 1)?]))
}

/// Decodes link layer → IP → TCP/UDP.
fn decode_frame(linktype: u32, f: &[u8]) -> Option<Packet> {
    let (ethertype, ip) = match linktype {
        // EN10MB
        1 => {
            let mut et = be16(f, 12)?;
            let mut off = 14;
            while et == 0x8100 || et == 0x88a8 {
                et = be16(f, off + 2)?;
                off += 4;
            }
            (et, f.get(off..)?)
        }
        // LINUX_SLL
        113 => (be16(f, 14)?, f.get(16..)?),
        // LINUX_SLL2
        276 => (be16(f, 0)?, f.get(20..)?),
        // RAW / IPV4 / IPV6
        101 | 12 | 14 | 228 | 229 => {
            let v = f.first()? >> 4;
            (if v == 6 { 0x86dd } else { 0x0800 }, f)
        }
        _ => return None,
    };
    match ethertype {
        0x0800 => decode_ipv4(ip),
        0x86dd => decode_ipv6(ip),
        _ => None,
    }
}

fn decode_ipv4(b: &[u8]) -> Option<Packet> {
    if b.first()? >> 4 != 4 {
        return None;
    }
    let ihl = ((b[0] & 0x0f) as usize) * 4;
    let total = (be16(b, 2)? as usize).min(b.len());
    let frag = be16(b, 6)? & 0x1fff;
    let proto = *b.get(9)?;
    let src = IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(*b.get(16)?, b[17], b[18], *b.get(19)?));
    let l4 = b.get(ihl..total)?;
    if frag != 0 {
        return Some(Packet {
            src,
            dst,
            transport: Transport::Other(proto),
            src_port: 0,
            dst_port: 0,
            payload: Vec::new(),
        });
    }
    Some(decode_l4(src, dst, proto, l4))
}

fn decode_ipv6(b: &[u8]) -> Option<Packet> {
    if b.first()? >> 4 != 6 || b.len() < 40 {
        return None;
    }
    let plen = be16(b, 4)? as usize;
    let next = b[6];
    let mut s = [0u8; 16];
    let mut d = [0u8; 16];
    s.copy_from_slice(&b[8..24]);
    d.copy_from_slice(&b[24..40]);
    let l4 = b.get(40..(40 + plen).min(b.len()))?;
    Some(decode_l4(
        IpAddr::V6(Ipv6Addr::from(s)),
        IpAddr::V6(Ipv6Addr::from(d)),
        next,
        l4,
    ))
}

fn decode_l4(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Packet {
    let mut p = Packet {
        src,
        dst,
        transport: Transport::Other(proto),
        src_port: 0,
        dst_port: 0,
        payload: Vec::new(),
    };
    match proto {
        6 if l4.len() >= 20 => {
            let doff = ((l4[12] >> 4) as usize) * 4;
            p.transport = Transport::Tcp { flags: l4[13] };
            p.src_port = u16::from_be_bytes([l4[0], l4[1]]);
            p.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            p.payload = l4.get(doff..).unwrap_or_default().to_vec();
        }
        17 if l4.len() >= 8 => {
            p.transport = Transport::Udp;
            p.src_port = u16::from_be_bytes([l4[0], l4[1]]);
            p.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            p.payload = l4[8..].to_vec();
        }
        _ => {}
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds an Ethernet/IPv4/TCP frame.
    fn tcp_frame(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn decodes_ports_syns_and_markers() {
        let a = [10, 244, 1, 200];
        let b = [10, 244, 2, 200];
        let data = pcap(&[
            tcp_frame(a, b, 40000, 15008, 0x02, b""),
            tcp_frame(b, a, 15008, 40000, 0x12, b""),
            tcp_frame(a, b, 40000, 15008, 0x18, b"hello MAR"),
            tcp_frame(a, b, 40000, 15008, 0x18, b"KER world"),
        ]);
        let r = CaptureReport::parse(&data).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r.tcp_syn_dst_ports(), BTreeSet::from([15008]));
        assert_eq!(r.tcp_dst_ports(), BTreeSet::from([15008, 40000]));
        assert_eq!(r.tcp_payload_server_ports(), BTreeSet::from([15008]));
        assert_eq!(r.packets[2].payload, b"hello MAR");
        assert!(r.contains(b"MARKER"), "split across segments");
        assert!(r.contains(b"hello"));
        assert!(!r.contains(b"SECRET"));
    }

    #[test]
    fn truncated_records_and_bad_headers() {
        let mut data = pcap(&[tcp_frame([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, 2, b"x")]);
        data.truncate(data.len() - 3);
        assert_eq!(CaptureReport::parse(&data).unwrap().len(), 0);
        assert!(
            CaptureReport::parse(b"short")
                .unwrap_err()
                .contains("too short")
        );
        let err = CaptureReport::parse(&[
            0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ])
        .unwrap_err();
        assert!(err.contains("pcapng"), "{err}");
    }
}
