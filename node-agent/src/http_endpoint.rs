//! The agent's small plain-HTTP endpoints (readiness, metrics, the CA's
//! metrics): the HTTP/1 accept loop they and the run-dir sockets share
//! ([`serve_http1`]), its TCP form with a synchronous answer function
//! ([`serve`]), and the `/metrics` answer they share. Also [`bind`], how every
//! TCP listener of the agent and the CA (these endpoints and the CA's gRPC
//! port) is bound: the IPv6 wildcard falls back to IPv4 on nodes without IPv6.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

pub type Answer = Response<Full<Bytes>>;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address last tried (`0.0.0.0:<port>` after a fallback).
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Listens on `addr`. The IPv6 wildcard (`[::]`, every listener's default)
/// is retried as `0.0.0.0` on the same port when the node has no IPv6
/// ([`ipv4_fallback`]); any other failure is reported for `addr` itself.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(source) => match ipv4_fallback(addr, &source) {
            Some(v4) => {
                tracing::info!(%addr, error = %source, fallback = %v4, "no IPv6 on this node; listening on IPv4");
                TcpListener::bind(v4)
                    .await
                    .map_err(|source| BindError { addr: v4, source })
            }
            None => Err(BindError { addr, source }),
        },
    }
}

/// Where to listen instead after binding `addr` failed with `err`:
/// `0.0.0.0:<port>` when `addr` is the IPv6 wildcard and the error says IPv6
/// is missing — `EAFNOSUPPORT` (booted with `ipv6.disable=1`: no IPv6 sockets
/// at all) or `EADDRNOTAVAIL`. `None` otherwise: a port in use or a refused
/// privilege is the same on IPv4, and retrying would hide the real error (or
/// silently serve IPv4 only).
pub fn ipv4_fallback(addr: SocketAddr, err: &io::Error) -> Option<SocketAddr> {
    let no_ipv6 = matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    );
    (addr.is_ipv6() && addr.ip().is_unspecified() && no_ipv6)
        .then(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()))
}

/// Serves every connection on `listener` with `answer` until `shutdown`
/// completes; `what` names the endpoint in logs.
pub async fn serve<F>(
    what: &'static str,
    listener: TcpListener,
    answer: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(&Request<Incoming>) -> Answer + Clone + Send + Sync + 'static,
{
    let listener = &listener;
    serve_http1(
        what,
        move || async move { listener.accept().await.map(|(stream, _)| stream) },
        move |req| std::future::ready(answer(&req)),
        false,
        shutdown,
    )
    .await;
}

/// Takes connections from `accept` until `shutdown` completes and serves each
/// as HTTP/1.1 with `route` on a task of its own; with `half_close`, a client
/// that shut down its side after the request still gets it handled. Accept
/// errors (e.g. out of file descriptors) are logged naming `what` and retried
/// after 50 ms.
pub async fn serve_http1<S, A, AF, R, RF>(
    what: &str,
    mut accept: A,
    route: R,
    half_close: bool,
    shutdown: impl Future<Output = ()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> AF,
    AF: Future<Output = io::Result<S>>,
    R: Fn(Request<Incoming>) -> RF + Clone + Send + 'static,
    RF: Future<Output = Answer> + Send + 'static,
{
    tokio::pin!(shutdown);
    // Named in each connection's task (its error log), shared rather than copied per
    // connection.
    let endpoint: std::sync::Arc<str> = what.into();
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(endpoint = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let route = route.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let answer = route(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .half_close(half_close)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(endpoint = &*endpoint, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// 404 naming the path asked for.
pub fn not_found(req: &Request<Incoming>) -> Answer {
    text(
        StatusCode::NOT_FOUND,
        format!("no endpoint {}\n", req.uri().path()),
    )
}

/// OpenMetrics text from `render` on `path`, 404 elsewhere.
pub fn metrics(req: &Request<Incoming>, path: &str, render: impl FnOnce() -> String) -> Answer {
    if req.uri().path() != path {
        return not_found(req);
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, OPENMETRICS)
        .body(Full::new(Bytes::from(render())))
        .expect("static response parts are valid")
}

/// A raw `GET path` (HTTP/1.1, connection closed), for the endpoints' tests.
#[cfg(test)]
pub(crate) async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os_error(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn ipv6_wildcard_without_ipv6_falls_back_to_ipv4_wildcard() {
        let any6: SocketAddr = "[::]:15012".parse().unwrap();
        let any4: SocketAddr = "0.0.0.0:15012".parse().unwrap();
        // ipv6.disable=1: socket(AF_INET6) fails with EAFNOSUPPORT.
        assert_eq!(
            ipv4_fallback(any6, &os_error(libc::EAFNOSUPPORT)),
            Some(any4)
        );
        assert_eq!(
            ipv4_fallback(any6, &os_error(libc::EADDRNOTAVAIL)),
            Some(any4)
        );
        let any6_ready: SocketAddr = "[::]:8000".parse().unwrap();
        assert_eq!(
            ipv4_fallback(any6_ready, &os_error(libc::EAFNOSUPPORT)),
            Some("0.0.0.0:8000".parse().unwrap())
        );
    }

    #[test]
    fn no_fallback_for_other_errors_or_addresses() {
        let any6: SocketAddr = "[::]:15012".parse().unwrap();
        for code in [libc::EADDRINUSE, libc::EACCES] {
            assert_eq!(ipv4_fallback(any6, &os_error(code)), None, "errno {code}");
        }
        for addr in [
            "[::1]:15012",
            "[fd00::1]:15012",
            "0.0.0.0:15012",
            "10.0.0.1:15012",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(
                ipv4_fallback(addr, &os_error(libc::EAFNOSUPPORT)),
                None,
                "{addr}"
            );
        }
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_for_the_address_asked_for() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        assert_eq!(err.addr, addr);
        assert_eq!(err.source.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        let ok = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert!(ok.local_addr().unwrap().ip().is_loopback());
    }

    #[tokio::test]
    async fn metrics_on_its_path_404_elsewhere_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let answer = |req: &Request<Incoming>| metrics(req, "/metrics", || "up 1\n".to_string());
        let server = tokio::spawn(serve("test", listener, answer, async {
            let _ = stop_rx.await;
        }));
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(OPENMETRICS) && ok.ends_with("up 1\n"), "{ok}");
        let missing = get(addr, "/stats").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        assert!(missing.ends_with("no endpoint /stats\n"), "{missing}");
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns once shutdown completes")
            .unwrap();
    }
}
