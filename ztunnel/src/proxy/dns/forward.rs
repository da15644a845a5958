//! Forwarding what the mesh does not know to the upstream resolvers of ztunnel's own
//! `resolv.conf` (as upstream: in Kubernetes, the cluster DNS). The query is relayed as
//! the client sent it (EDNS, DNSSEC bits and all) from a socket of the client's proxy
//! (in-pod: inside the pod's netns, marked so the pod's capture rules let it through),
//! and the first answer carrying the query's ID is relayed back unchanged. As upstream's
//! resolver (hickory's defaults with resolv.conf's options), two servers are asked at a
//! time (the next pair when both fail), and the list is tried `attempts` times (2).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::SocketFactory;

/// How long one upstream server may take to answer (resolv.conf's `timeout`, 5 s).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// resolv.conf's default `attempts`; more than [`MAX_ATTEMPTS`] are not made.
const DEFAULT_ATTEMPTS: u32 = 2;
const MAX_ATTEMPTS: u32 = 5;
/// Servers asked at once (hickory's `num_concurrent_reqs`).
const CONCURRENT: usize = 2;
/// glibc's default when resolv.conf names no server.
const DEFAULT_SERVER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The upstream resolvers and search domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
    /// Search domains (normalized), used by dedicated-mode lookups.
    pub search: Vec<String>,
    pub timeout: Duration,
    /// Times the server list is tried before giving up (resolv.conf `attempts`).
    pub attempts: u32,
}

/// Forwarding a query failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream DNS server {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream DNS server {server} did not answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("no upstream DNS server configured")]
    NoServer,
}

impl Upstreams {
    /// Reads `path`; an unreadable or empty file gives glibc's defaults (127.0.0.1, no
    /// search domains) with a warning naming the file.
    pub fn load(path: &Path) -> Upstreams {
        match std::fs::read(path) {
            Ok(bytes) => Upstreams::parse(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "cannot parse resolv.conf; forwarding DNS to 127.0.0.1:53");
                Upstreams::defaults()
            }),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read resolv.conf; forwarding DNS to 127.0.0.1:53");
                Upstreams::defaults()
            }
        }
    }

    fn defaults() -> Upstreams {
        Upstreams {
            servers: vec![SocketAddr::new(DEFAULT_SERVER, 53)],
            search: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// Parses resolv.conf text.
    pub fn parse(bytes: &[u8]) -> Result<Upstreams, resolv_conf::ParseError> {
        let conf = resolv_conf::Config::parse(bytes)?;
        let mut servers: Vec<SocketAddr> = conf
            .nameservers
            .iter()
            .map(|ns| SocketAddr::new(IpAddr::from(ns), 53))
            .collect();
        if servers.is_empty() {
            servers.push(SocketAddr::new(DEFAULT_SERVER, 53));
        }
        let search = conf
            .get_search()
            .cloned()
            .or_else(|| conf.get_domain().map(|d| vec![d.clone()]))
            .unwrap_or_default()
            .iter()
            .map(|d| super::lookup::normalize(d))
            .filter(|d| !d.is_empty())
            .collect();
        let timeout = match conf.timeout {
            0 => DEFAULT_TIMEOUT,
            s => Duration::from_secs(u64::from(s)).min(DEFAULT_TIMEOUT),
        };
        let attempts = match conf.attempts {
            0 => DEFAULT_ATTEMPTS,
            n => n.min(MAX_ATTEMPTS),
        };
        Ok(Upstreams {
            servers,
            search,
            timeout,
            attempts,
        })
    }

    /// Relays `query` over UDP, or over TCP (length-prefixed) when `tcp`, to the servers
    /// two at a time until one answers; the whole list `attempts` times. The error is the
    /// last server's.
    pub async fn forward(
        &self,
        sockets: &dyn SocketFactory,
        query: &[u8],
        tcp: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut last = ForwardError::NoServer;
        for _ in 0..self.attempts.max(1) {
            for batch in self.servers.chunks(CONCURRENT) {
                let mut pending: FuturesUnordered<_> = batch
                    .iter()
                    .map(|&server| self.exchange(sockets, server, query, tcp))
                    .collect();
                while let Some(result) = pending.next().await {
                    match result {
                        Ok(answer) => return Ok(answer),
                        Err(e) => last = e,
                    }
                }
            }
        }
        Err(last)
    }

    /// One query to one server, within the timeout.
    async fn exchange(
        &self,
        sockets: &dyn SocketFactory,
        server: SocketAddr,
        query: &[u8],
        tcp: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        let exchange = async {
            if tcp {
                tcp_exchange(sockets, server, query).await
            } else {
                udp_exchange(sockets, server, query).await
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(source)) => Err(ForwardError::Io { server, source }),
            Err(_) => Err(ForwardError::Timeout {
                server,
                timeout: self.timeout,
            }),
        }
    }
}

async fn udp_exchange(
    sockets: &dyn SocketFactory,
    server: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let any: IpAddr = match server {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = sockets.bind_udp(SocketAddr::new(any, 0)).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // A stray datagram (not this query's ID) is not the answer.
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(
    sockets: &dyn SocketFactory,
    server: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let mut stream = sockets.connect(server, None).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering"))
}

/// Writes one DNS-over-TCP message (2-byte length prefix).
pub async fn write_framed<W: AsyncWriteExt + Unpin>(w: &mut W, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    w.write_all(&framed).await
}

/// Reads one DNS-over-TCP message; `None` at a clean end of stream before it.
pub async fn read_framed<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_servers_search_and_timeout() {
        let u = Upstreams::parse(
            b"nameserver 10.96.0.10\nnameserver fd00::a\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local.\noptions ndots:5 timeout:2 attempts:3\n",
        )
        .unwrap();
        assert_eq!(
            u.servers,
            [
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::a]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            u.search,
            [
                "ns1.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(u.timeout, Duration::from_secs(2));
        assert_eq!(u.attempts, 3);
        let u = Upstreams::parse(b"domain corp.example\n").unwrap();
        assert_eq!(u.servers, ["127.0.0.1:53".parse::<SocketAddr>().unwrap()]);
        assert_eq!(u.search, ["corp.example"]);
        assert_eq!(u.timeout, DEFAULT_TIMEOUT);
        assert_eq!(u.attempts, DEFAULT_ATTEMPTS);
        let missing = Upstreams::load(Path::new("/nonexistent/resolv.conf"));
        assert_eq!(missing, Upstreams::defaults());
    }
}
