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
