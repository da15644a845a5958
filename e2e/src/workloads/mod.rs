//! The "containers" of the harness's application pods: small TCP programs
//! run by kubelet-lite from the `e2e-workload` binary (image
//! `e2e/workload`, see [`IMAGE`]), and the client functions tests call from
//! inside a pod's network namespace.
//!
//! Protocol (line based, plaintext, so a capture shows it when not in the
//! mesh):
//! - `<text>\n` → `<POD_NAME> <text>\n` (echo, tagged with the server pod's
//!   name so a client knows who answered);
//! - `BULK <n>\n` → `n` bytes of a fixed pattern, then the server closes
//!   (throughput, iperf-like).
//!
//! Programs ([`serve`], [`run_client`], [`run_bulk_client`]): an echo/bulk
//! server, a client that opens a new connection every interval and logs
//! one line per attempt (`ok`/`fail`), optionally keeping one long-lived
//! connection instead, and a bulk client that reports throughput.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Image short name of the workload binary (kubelet-lite maps it).
pub const IMAGE: &str = "e2e/workload";
/// Path of the binary inside that image.
pub const ENTRYPOINT: &str = "/usr/local/bin/e2e-workload";
/// Name of the binary in the cargo target dir.
pub const BINARY: &str = "e2e-workload";
/// The port servers listen on by default.
pub const DEFAULT_PORT: u16 = 8080;

const PATTERN: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_";

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: {what}: {source}")]
    Io {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: connection closed without a reply")]
    Closed { addr: SocketAddr },
}

/// One request/reply: connect to `addr`, send `msg`, read one reply line.
/// Blocking; run it inside the client pod's netns.
pub fn exchange(addr: SocketAddr, msg: &str, timeout: Duration) -> Result<String, WorkloadError> {
    let mut c = Conn::open(addr, timeout)?;
    c.request(msg)
}

/// A kept-open client connection.
#[derive(Debug)]
pub struct Conn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects (blocking; the socket belongs to the netns of the calling
    /// thread, wherever it is used later).
    pub fn open(addr: SocketAddr, timeout: Duration) -> Result<Self, WorkloadError> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| WorkloadError::Connect { addr, source })?;
        let io = |what| move |source| WorkloadError::Io { addr, what, source };
        s.set_read_timeout(Some(timeout))
            .map_err(io("set timeout"))?;
        s.set_write_timeout(Some(timeout))
            .map_err(io("set timeout"))?;
        s.set_nodelay(true).map_err(io("set nodelay"))?;
        let writer = s.try_clone().map_err(io("clone socket"))?;
        Ok(Self {
            addr,
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends one line, returns the reply line (without the newline).
    pub fn request(&mut self, msg: &str) -> Result<String, WorkloadError> {
        let addr = self.addr;
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|source| WorkloadError::Io {
                addr,
                what: "send",
                source,
            })?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| WorkloadError::Io {
                addr,
                what: "receive",
                source,
            })?;
        if n == 0 {
            return Err(WorkloadError::Closed { addr });
        }
        Ok(line.trim_end().to_string())
    }

    pub fn peer(&self) -> SocketAddr {
        self.addr
    }
}

/// Asks for `bytes` bytes and reads them; returns (bytes, elapsed).
pub fn bulk(
    addr: SocketAddr,
    bytes: u64,
    timeout: Duration,
) -> Result<(u64, Duration), WorkloadError> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| WorkloadError::Connect { addr, source })?;
    let io = |what| move |source| WorkloadError::Io { addr, what, source };
    s.set_read_timeout(Some(timeout))
        .map_err(io("set timeout"))?;
    s.write_all(format!("BULK {bytes}\n").as_bytes())
        .map_err(io("send"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf).map_err(io("receive"))? {
            0 => break,
            n => got += n as u64,
        }
    }
    Ok((got, t0.elapsed()))
}

fn handle(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let text = line.trim_end();
        if let Some(n) = text
            .strip_prefix("BULK ")
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            let chunk: Vec<u8> = PATTERN.iter().copied().cycle().take(64 * 1024).collect();
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                writer.write_all(&chunk[..k])?;
                left -= k as u64;
            }
            println!("bulk from={peer} bytes={n}");
            return Ok(());
        }
        writer.write_all(format!("{name} {text}\n").as_bytes())?;
    }
}

/// Serves echo/bulk on `port` (all addresses) forever; one thread per
/// connection. Logs one line per connection.
pub fn serve(port: u16, name: &str) -> std::io::Result<()> {
    let l = TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
    println!("listening port={port} name={name}");
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let name = name.to_string();
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            println!("accepted from={peer}");
            if let Err(e) = handle(s, &name) {
                println!("connection from={peer} error={e}");
            }
        });
    }
    Ok(())
}

/// Client loop settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub target: SocketAddr,
    pub interval: Duration,
    /// Stop after this many attempts (0 = forever).
    pub count: u64,
    pub message: String,
    /// Keep one connection open (reconnecting only after a failure)
    /// instead of a new connection per attempt.
    pub keep: bool,
    pub timeout: Duration,
}

/// Makes an attempt every interval, logging `ok`/`fail` lines. Returns the
/// number of failed attempts.
pub fn run_client(o: &ClientOptions) -> u64 {
    let mut failures = 0;
    let mut conn: Option<Conn> = None;
    let mut seq = 0u64;
    loop {
        seq += 1;
        let t0 = Instant::now();
        let msg = format!("{} #{seq}", o.message);
        let result = if o.keep {
            if conn.is_none() {
                conn = Conn::open(o.target, o.timeout)
                    .map(Some)
                    .unwrap_or_else(|e| {
                        println!("fail seq={seq} to={} error=\"{e}\"", o.target);
                        None
                    });
            }
            match conn.as_mut() {
                Some(c) => c.request(&msg),
                None => Err(WorkloadError::Closed { addr: o.target }),
            }
        } else {
            exchange(o.target, &msg, o.timeout)
        };
        match result {
            Ok(reply) => println!(
                "ok seq={seq} to={} ms={:.1} reply=\"{reply}\"",
                o.target,
                t0.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => {
                failures += 1;
                conn = None;
                println!("fail seq={seq} to={} error=\"{e}\"", o.target);
            }
        }
        if o.count != 0 && seq >= o.count {
            return failures;
        }
        std::thread::sleep(o.interval);
    }
}

/// Fetches `bytes` once and prints the throughput.
pub fn run_bulk_client(
    target: SocketAddr,
    bytes: u64,
    timeout: Duration,
) -> Result<f64, WorkloadError> {
    let (got, took) = bulk(target, bytes, timeout)?;
    let gbps = got as f64 * 8.0 / took.as_secs_f64() / 1e9;
    println!(
        "bulk to={target} bytes={got} seconds={:.3} gbit_per_s={gbps:.2}",
        took.as_secs_f64()
    );
    Ok(gbps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_and_bulk_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || handle(s, "srv"));
            }
        });
        let t = Duration::from_secs(5);
        assert_eq!(exchange(addr, "hi", t).unwrap(), "srv hi");
        let mut c = Conn::open(addr, t).unwrap();
        assert_eq!(c.request("a").unwrap(), "srv a");
        assert_eq!(c.request("b c").unwrap(), "srv b c");
        let (n, _) = bulk(addr, 1_000_003, t).unwrap();
        assert_eq!(n, 1_000_003);
        let o = ClientOptions {
            target: addr,
            interval: Duration::from_millis(1),
            count: 3,
            message: "m".into(),
            keep: true,
            timeout: t,
        };
        assert_eq!(run_client(&o), 0);
    }

    #[test]
    fn refused_connection_is_reported_with_the_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = exchange(addr, "x", Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
    }
}
