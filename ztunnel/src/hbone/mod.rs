//! HBONE: HTTP/2 `CONNECT` tunnels inside mutual TLS, on port 15008.
//!
//! - [`headers`]: the CONNECT request (authority, `forwarded`, `baggage`, `traceparent`);
//! - [`pool`]: client connections, pooled per (source identity, destination identities,
//!   source IP, destination address), with upstream's window, frame and stream limits;
//! - [`server`]: the server side (TLS accept helper, HTTP/2 accept loop, graceful GOAWAY);
//! - [`stream`]: one tunnel and the TCP ⇄ tunnel byte copy;
//! - [`double`]: double HBONE's inner tunnel (TLS and HTTP/2 inside one pooled stream
//!   to an east-west gateway).
//!
//! HTTP/2 is `h2` used directly (no hyper): fewer layers on the data path.

pub mod double;
pub mod headers;
pub mod pool;
#[cfg(test)]
mod raw_frames;
pub mod server;
pub mod stream;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpStream;

pub use pool::{Pool, PoolKey};
pub use stream::{ByteCounters, CopyOutcome, H2Stream, copy_tcp_h2};

/// The TCP stream under TLS on both sides. rustls reads it straight into its record
/// buffer: a read buffer below TLS (tried: 64 KiB) costs a copy of every received byte and
/// measured ~5% more ztunnel CPU at 2 Gbit/s, more than the read syscalls it saves.
pub type TlsIo = TcpStream;
pub type ClientTls = tokio_rustls::client::TlsStream<TlsIo>;
pub type ServerTls = tokio_rustls::server::TlsStream<TlsIo>;

/// Failures of outbound HBONE, each naming the peer.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "connection to {dst} timed out after {timeout:?}, maybe a NetworkPolicy is blocking HBONE port 15008"
    )]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error("TLS handshake with {dst}: {source}")]
    Tls {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {dst}: peer did not negotiate ALPN h2")]
    Alpn { dst: SocketAddr },
    #[error("TLS handshake with {dst} did not complete within {timeout:?}")]
    TlsTimeout { dst: SocketAddr, timeout: Duration },
    #[error("{dst} did not answer CONNECT {authority} within {timeout:?}")]
    ResponseTimeout {
        dst: SocketAddr,
        authority: String,
        timeout: Duration,
    },
    /// Another stream's attempt to establish the connection this stream waited for failed.
    #[error("HBONE connection to {dst} failed while this stream waited for it: {cause}")]
    Waited {
        dst: SocketAddr,
        cause: String,
        /// What kind of failure `cause` was.
        kind: FailureKind,
    },
    #[error("HTTP/2 with {dst}: {source}")]
    H2 {
        dst: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{dst} answered CONNECT {authority} with {status}")]
    Status {
        dst: SocketAddr,
        authority: String,
        status: StatusCode,
    },
    #[error("no HTTP/2 connection to {dst} could take another stream")]
    PoolExhausted { dst: SocketAddr },
    /// Double HBONE's inner tunnel (TLS and CONNECT with the destination, through the
    /// gateway's stream) failed; `source` names the gateway as its peer.
    #[error("inner tunnel to {target} through the east-west gateway: {source}")]
    Inner {
        target: String,
        #[source]
        source: Box<HboneError>,
    },
}

/// What stage of opening an HBONE stream failed (for telemetry's
/// `response_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// TCP connect refused, reset or unreachable; or the peer failed the
    /// request (timeout, 503, ...).
    Connect,
    /// TCP connect timed out: typically a NetworkPolicy dropping 15008.
    ConnectTimeout,
    /// TLS handshake (certificate, identity, ALPN, timeout).
    Tls,
    /// HTTP/2 handshake or protocol error.
    H2,
    /// The peer answered 401: denied by its authorization policy.
    Denied,
}

impl HboneError {
    pub fn kind(&self) -> FailureKind {
        match self {
            HboneError::Connect { .. }
            | HboneError::ResponseTimeout { .. }
            | HboneError::PoolExhausted { .. } => FailureKind::Connect,
            HboneError::ConnectTimeout { .. } => FailureKind::ConnectTimeout,
            HboneError::Tls { .. } | HboneError::Alpn { .. } | HboneError::TlsTimeout { .. } => {
                FailureKind::Tls
            }
            HboneError::H2 { .. } => FailureKind::H2,
            HboneError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                FailureKind::Denied
            }
            HboneError::Status { .. } => FailureKind::Connect,
            HboneError::Waited { kind, .. } => *kind,
            HboneError::Inner { source, .. } => source.kind(),
        }
    }

    /// The failure itself: for double HBONE's inner tunnel, what failed inside it.
    pub fn innermost(&self) -> &HboneError {
        match self {
            HboneError::Inner { source, .. } => source.innermost(),
            e => e,
        }
    }
}

/// [`tls_connect`] that fails with [`HboneError::TlsTimeout`] after `timeout`.
pub async fn tls_connect_within(
    tcp: TcpStream,
    config: std::sync::Arc<rustls::ClientConfig>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<ClientTls, HboneError> {
    tokio::time::timeout(timeout, tls_connect(tcp, config, dst))
        .await
        .map_err(|_| HboneError::TlsTimeout { dst, timeout })?
}

/// TLS client handshake over `tcp` with `config`; ALPN must come out as `h2`.
pub async fn tls_connect(
    tcp: TcpStream,
    config: std::sync::Arc<rustls::ClientConfig>,
    dst: SocketAddr,
) -> Result<ClientTls, HboneError> {
    tls_connect_over(tcp, config, dst).await
}

/// [`tls_connect`] over any byte stream (double HBONE: an HBONE stream); `dst` names the
/// peer in errors.
pub async fn tls_connect_over<IO>(
    io: IO,
    config: std::sync::Arc<rustls::ClientConfig>,
    dst: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<IO>, HboneError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(crate::tls::placeholder_server_name(), io)
        .await
        .map_err(|source| HboneError::Tls { dst, source })?;
    if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
        return Err(HboneError::Alpn { dst });
    }
    Ok(tls)
}
