//! The agent's small plain-HTTP endpoints (readiness, metrics, the CA's
//! metrics): one accept loop serving HTTP/1 with a synchronous answer
//! function, and the `/metrics` answer they share.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub type Answer = Response<Full<Bytes>>;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves every connection on `listener` with `answer` until `shutdown`
/// completes; `what` names the endpoint in logs. Accept errors (e.g. out of
/// file descriptors) are logged and retried after 50 ms.
pub async fn serve<F>(
    what: &'static str,
    listener: TcpListener,
    answer: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(&Request<Incoming>) -> Answer + Clone + Send + Sync + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(endpoint = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = answer(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
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
