//! The TCP under ztunnel's control-plane gRPC channels (Istio CA, istiod's xDS).
//!
//! In dedicated mode ztunnel shares its workload's network namespace, whose capture
//! rules send every outbound connection to ztunnel's own port 15001 unless the socket
//! carries `PACKET_MARK` (0x539), as the proxy's sockets do. Unmarked, a connection to
//! istiod would loop through ztunnel's outbound proxy — and with `XDS_ON_DEMAND` wait
//! there for an xDS answer that needs this very connection. So in that mode these
//! sockets get the mark too; in the other modes ztunnel runs outside the captured
//! namespaces and they stay unmarked.

use std::io;
use std::net::SocketAddr;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::config::{Config, ControlPlaneRoots, ProxyMode};

/// TLS for a control-plane channel: the server's certificate must chain to `roots` and
/// name `server_name`. Returns the PEM read (empty for the system store), so a caller
/// can tell when the file changed.
pub async fn client_tls(
    roots: &ControlPlaneRoots,
    server_name: String,
) -> io::Result<(ClientTlsConfig, Vec<u8>)> {
    let tls = ClientTlsConfig::new().domain_name(server_name);
    match roots {
        ControlPlaneRoots::File(path) => {
            let pem = tokio::fs::read(path).await?;
            Ok((tls.ca_certificate(Certificate::from_pem(&pem)), pem))
        }
        // rustls-native-certs: the platform store, or SSL_CERT_FILE / SSL_CERT_DIR.
        ControlPlaneRoots::System => Ok((tls.with_native_roots(), Vec::new())),
    }
}

/// The `SO_MARK` control-plane sockets need under `cfg`.
pub fn control_plane_mark(cfg: &Config) -> Option<u32> {
    match cfg.proxy_mode {
        ProxyMode::Dedicated => cfg.packet_mark,
        ProxyMode::Shared => None,
    }
}

/// Connects `endpoint` now, its socket marked with `mark`.
pub async fn connect(
    endpoint: Endpoint,
    mark: Option<u32>,
) -> Result<Channel, tonic::transport::Error> {
    match mark {
        None => endpoint.connect().await,
        Some(mark) => endpoint.connect_with_connector(connector(mark)).await,
    }
}

/// Connects `endpoint` on first use, its sockets marked with `mark`.
pub fn connect_lazy(endpoint: Endpoint, mark: Option<u32>) -> Channel {
    match mark {
        None => endpoint.connect_lazy(),
        Some(mark) => endpoint.connect_with_connector_lazy(connector(mark)),
    }
}

type Connected = TokioIo<tokio::net::TcpStream>;

fn connector(
    mark: u32,
) -> impl tower::Service<
    Uri,
    Response = Connected,
    Error = io::Error,
    Future = impl Future<Output = io::Result<Connected>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: Uri| async move {
        let host = uri
            .host()
            .ok_or_else(|| io::Error::other(format!("{uri}: no host")))?
            .trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(443);
        let mut last = io::Error::other(format!("{host}:{port}: no address"));
        for addr in tokio::net::lookup_host((host, port)).await? {
            match connect_marked(addr, mark).await {
                Ok(s) => return Ok(TokioIo::new(s)),
                Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
            }
        }
        Err(last)
    })
}

async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<tokio::net::TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_mark(mark)
        .map_err(|e| io::Error::new(e.kind(), format!("SO_MARK {mark:#x}: {e}")))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    sock.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dedicated_mode_marks() {
        let cfg = |vars: &[(&str, &str)]| {
            let m: std::collections::HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_lookup(|k| m.get(k).cloned()).unwrap()
        };
        assert_eq!(control_plane_mark(&cfg(&[])), None);
        let dedicated = cfg(&[
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", "ns/name/sa"),
        ]);
        assert_eq!(control_plane_mark(&dedicated), Some(1337));
    }

    #[tokio::test]
    async fn the_connector_reaches_a_listener_with_the_mark() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let res = connect_marked(addr, 1337).await;
        match res {
            Ok(s) => {
                let (_peer, _) = l.accept().await.unwrap();
                let sock = socket2::SockRef::from(&s);
                assert_eq!(sock.mark().unwrap(), 1337);
            }
            // SO_MARK needs CAP_NET_ADMIN; the error names the mark.
            Err(e) => {
                eprintln!("skipped: {e}");
                assert!(e.to_string().contains("SO_MARK 0x539"), "{e}");
            }
        }
    }
}
