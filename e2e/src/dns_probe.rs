//! DNS queries from inside a pod's netns, as its resolver would send them (UDP or
//! TCP to port 53), for the DNS-capture tests.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::netsim::NamedNetns;

/// A recursive query for `name` (random ID).
pub fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).expect("a valid DNS name"),
        rtype,
    ));
    m.to_vec().expect("query encodes")
}

/// Reads one length-prefixed DNS-over-TCP message.
pub fn read_framed(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg)?;
    Ok(msg)
}

/// Writes one length-prefixed DNS-over-TCP message.
pub fn write_framed(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    s.write_all(&framed)
}

fn checked(q: &[u8], answer: &[u8], name: &str) -> Message {
    let m = Message::from_vec(answer).unwrap_or_else(|e| panic!("answer for {name}: {e}"));
    let id = Message::from_vec(q).expect("query parses").metadata.id;
    assert_eq!(m.metadata.id, id, "answer ID for {name}");
    assert_eq!(m.metadata.message_type, MessageType::Response, "{name}");
    m
}

/// Sends a query for `name` from inside `ns` to `server` over UDP; the answer (whose
/// source must be `server`, as the resolver checks).
pub fn udp_query(ns: &NamedNetns, server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let q = query(name, rtype);
    let sock = ns
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("enter pod netns")
        .expect("UDP socket in the pod");
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    sock.send_to(&q, server).expect("send DNS query");
    let mut buf = [0u8; 4096];
    let (n, from) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no UDP answer for {name} {rtype}: {e}"));
    assert_eq!(from, server, "source of the answer for {name}");
    checked(&q, &buf[..n], name)
}

/// The same over TCP.
pub fn tcp_query(ns: &NamedNetns, server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let q = query(name, rtype);
    let mut s = ns
        .run(move || TcpStream::connect_timeout(&server, Duration::from_secs(5)))
        .expect("enter pod netns")
        .unwrap_or_else(|e| panic!("TCP connection to {server} from the pod: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write_framed(&mut s, &q).expect("send DNS query over TCP");
    let a = read_framed(&mut s).unwrap_or_else(|e| panic!("no TCP answer for {name}: {e}"));
    checked(&q, &a, name)
}

/// The IPv4 addresses of the answer section.
pub fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}
