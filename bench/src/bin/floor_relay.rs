//! `bench-floor-relay`: the cheapest user-space proxy pair that can stand in for two
//! dedicated ztunnels in the bench topology, to measure what any two-proxy data path costs
//! on the machine (the floor under the mesh's added latency and CPU).
//!
//! Run in each pod behind the same in-pod capture rules as a ztunnel (arguments and
//! environment are ignored, so the bench starts it exactly like a ztunnel):
//! - `:15001` takes captured outbound connections, reads `SO_ORIGINAL_DST`, connects to
//!   the destination's `:15008` and sends the original destination (4-byte IPv4 address,
//!   2-byte port), then relays;
//! - `:15008` reads that header, connects to the destination, then relays;
//! - `:15021` answers every request `200` (the bench's readiness probe).
//!
//! No TLS, no HTTP/2, no event loop: a blocking thread per direction, so each message costs
//! one `read` and one `write` per hop (a ztunnel needs an `epoll_wait` besides). Every
//! socket carries the mesh's mark 0x539, so the capture rules let the relay's own traffic
//! through, as they do a ztunnel's.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};

use socket2::{Domain, Socket, Type};

const MARK: u32 = 0x539;

fn listen(port: u16) -> std::io::Result<TcpListener> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_mark(MARK)?;
    sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

fn connect(dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.set_mark(MARK)?;
    sock.set_tcp_nodelay(true)?;
    sock.connect(&SocketAddr::V4(dst).into())?;
    Ok(sock.into())
}

/// Copies `from` to `to` until end of stream, then half-closes `to`.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn relay(a: TcpStream, b: TcpStream) -> std::io::Result<()> {
    a.set_nodelay(true)?;
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    std::thread::spawn(move || pump(a2, b2));
    std::thread::spawn(move || pump(b, a));
    Ok(())
}

fn outbound(app: TcpStream) -> std::io::Result<()> {
    let dst = Socket::from(app.try_clone()?).original_dst_v4()?;
    let dst = dst
        .as_socket_ipv4()
        .ok_or_else(|| std::io::Error::other("original destination is not IPv4"))?;
    let mut peer = connect(SocketAddrV4::new(*dst.ip(), 15008))?;
    let mut header = [0u8; 6];
    header[..4].copy_from_slice(&dst.ip().octets());
    header[4..].copy_from_slice(&dst.port().to_be_bytes());
    peer.write_all(&header)?;
    relay(app, peer)
}

fn inbound(mut peer: TcpStream) -> std::io::Result<()> {
    let mut header = [0u8; 6];
    peer.read_exact(&mut header)?;
    let ip = Ipv4Addr::new(header[0], header[1], header[2], header[3]);
    let port = u16::from_be_bytes([header[4], header[5]]);
    let app = connect(SocketAddrV4::new(ip, port))?;
    relay(peer, app)
}

fn ready(mut probe: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let _ = probe.read(&mut buf)?;
    probe.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
}

fn serve(port: u16, handle: fn(TcpStream) -> std::io::Result<()>) -> std::io::Result<()> {
    let listener = listen(port)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Err(e) = handle(conn) {
                    eprintln!("bench-floor-relay :{port}: {e}");
                }
            });
        }
    });
    Ok(())
}

fn main() -> std::io::Result<()> {
    serve(15001, outbound)?;
    serve(15008, inbound)?;
    serve(15021, ready)?;
    loop {
        std::thread::park();
    }
}
