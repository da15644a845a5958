//! HTTP endpoints for operators: admin on `localhost:15000` (127.0.0.1 and ::1;
//! `/config_dump`,
//! `/debug/connections`, `/debug/pprof/profile`), Prometheus on `[::]:15020/metrics`, readiness on
//! `[::]:15021/healthz/ready`. HTTP/1.1 (hyper), served on the admin runtime, never on the
//! data-plane threads.

pub mod config_dump;
pub mod pprof;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::identity::SecretManager;
use crate::proxy::ProxyHandle;
use crate::readiness::Readiness;
use crate::state::Store;

/// Lists the running proxies (name, handle).
pub type ProxyLister = Arc<dyn Fn() -> Vec<(String, ProxyHandle)> + Send + Sync>;

/// What the endpoints read.
pub struct AdminState {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub certs: Arc<SecretManager>,
    /// The trust roots (their certificates are shown in `/config_dump`).
    pub roots: crate::tls::roots::TrustRoots,
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
    pub proxies: ProxyLister,
    /// Cancelled by `POST /quitquitquit`: ztunnel drains and exits as on SIGTERM.
    pub quit: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
#[error("binding the {name} endpoint on {addr}: {source}")]
pub struct AdminError {
    pub name: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Bound addresses.
#[derive(Debug, Clone, Copy)]
pub struct AdminAddresses {
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Admin,
    Stats,
    Readiness,
}

/// Binds the three listeners and serves them on the current runtime until `stop`.
pub async fn start(
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> Result<AdminAddresses, AdminError> {
    let bind = |name: &'static str, addr: SocketAddr| async move {
        bind_dual(addr)
            .await
            .map_err(|source| AdminError { name, addr, source })
    };
    let admin = bind("admin", state.cfg.admin_addr).await?;
    let stats = bind("metrics", state.cfg.stats_addr).await?;
    let ready = bind("readiness", state.cfg.readiness_addr).await?;
    let addrs = AdminAddresses {
        admin: admin.local_addr().unwrap_or(state.cfg.admin_addr),
        stats: stats.local_addr().unwrap_or(state.cfg.stats_addr),
        readiness: ready.local_addr().unwrap_or(state.cfg.readiness_addr),
    };
    let admin_v6 = match state.cfg.ipv6_enabled {
        true => ipv6_loopback_twin(addrs.admin).await,
        false => None,
    };
    for (listener, endpoint) in [
        (admin, Endpoint::Admin),
        (stats, Endpoint::Stats),
        (ready, Endpoint::Readiness),
    ]
    .into_iter()
    .chain(admin_v6.map(|l| (l, Endpoint::Admin)))
    {
        tokio::spawn(serve(listener, endpoint, state.clone(), stop.clone()));
    }
    Ok(addrs)
}

/// Admin on "localhost" means both loopbacks, as upstream: for `127.0.0.1:port` also
/// `[::1]:port` (so port-forwarding to `localhost` works whichever family it picks),
/// skipped with a debug line where the namespace has no IPv6 loopback.
async fn ipv6_loopback_twin(v4: SocketAddr) -> Option<TcpListener> {
    if v4.ip() != std::net::IpAddr::from([127, 0, 0, 1]) {
        return None;
    }
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v4.port()));
    match TcpListener::bind(v6).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(addr = %v6, error = %e, "admin not served on the IPv6 loopback");
            None
        }
    }
}

/// `[::]` falls back to `0.0.0.0` where IPv6 is unavailable.
async fn bind_dual(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() => {
            TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port())))
                .await
                .map_err(|_| e)
        }
        r => r,
    }
}

async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    state: Arc<AdminState>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let state = state.clone();
                async move {
                    let resp = match (endpoint, req.uri().path()) {
                        (Endpoint::Admin, "/debug/pprof/profile")
                            if req.method() == Method::GET =>
                        {
                            pprof::profile(req.uri().query()).await
                        }
                        _ => route(endpoint, &state, &req),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// `/logging` (as upstream's, for `istioctl ztunnel-config log`): GET shows the filter;
/// POST `?level=<filter>` sets it (`RUST_LOG` syntax: `debug`, `info,access=debug`, or a
/// bare level for everything), POST `?reset` restores the start-up filter.
fn logging<B>(req: &http::Request<B>) -> Response<Full<Bytes>> {
    use crate::telemetry::logging;
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let current = |status| {
        text(
            status,
            format!(
                "current log level is {}\n",
                logging::current_filter().unwrap_or_else(|| "unknown".into())
            ),
        )
    };
    match *req.method() {
        Method::GET | Method::HEAD => current(StatusCode::OK),
        Method::POST => {
            let wanted = if query.iter().any(|(k, _)| k == "reset") {
                None
            } else {
                match query.iter().find(|(k, _)| k == "level") {
                    Some((_, v)) => Some(v.as_str()),
                    None => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            "POST /logging needs ?level=<filter> or ?reset\n",
                        );
                    }
                }
            };
            match logging::set_filter(wanted) {
                Ok(_) => current(StatusCode::OK),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n"),
    }
}

fn route<B>(
    endpoint: Endpoint,
    state: &AdminState,
    req: &http::Request<B>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if endpoint == Endpoint::Admin && path == "/logging" {
        return logging(req);
    }
    if endpoint == Endpoint::Admin && path == "/quitquitquit" {
        // As upstream: POST only; the same drain as SIGTERM.
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
        }
        tracing::info!("/quitquitquit: draining");
        state.quit.cancel();
        return text(StatusCode::OK, "draining\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match (endpoint, path) {
        (Endpoint::Readiness | Endpoint::Admin, "/healthz/ready") => {
            let pending = state.readiness.pending();
            if state.readiness.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready, waiting for: {}\n", pending.join(", ")),
                )
            }
        }
        (Endpoint::Stats, "/metrics" | "/stats/prometheus") => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => Response::builder()
                    .header(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(body)))
                    .expect("static response parts are valid"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        (Endpoint::Admin, "/config_dump") => json(config_dump::config_dump(state)),
        (Endpoint::Admin, "/debug/connections") => json(config_dump::connections(state)),
        (Endpoint::Admin, "/debug/pprof/heap" | "/debug/pprof/heap/profiling") => pprof::heap(),
        (Endpoint::Admin, "/") => text(
            StatusCode::OK,
            "ztunnel admin\n  /config_dump         workloads, services, policies, certificates, proxies\n  /debug/connections   open connections and pooled HBONE connections per proxy\n  /debug/pprof/profile a CPU profile in pprof format; ?seconds=1-300 (10), ?frequency=1-1000 Hz (100)\n  /healthz/ready       readiness\n  /logging             GET: the log filter; POST ?level=<RUST_LOG filter> sets it, POST ?reset restores the start-up one\n",
        ),
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admin_on_localhost_listens_on_both_loopbacks() {
        let v4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = v4.local_addr().unwrap();
        let Some(v6) = ipv6_loopback_twin(addr).await else {
            // Only where the test's namespace has no ::1 (IPv6 disabled).
            assert!(
                TcpListener::bind("[::1]:0").await.is_err(),
                "::1 is usable but no twin was bound"
            );
            eprintln!("skipped: no IPv6 loopback here");
            return;
        };
        assert_eq!(
            v6.local_addr().unwrap(),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        );
        // Not for other addresses (an explicit ADMIN_ADDR is taken as given).
        assert!(
            ipv6_loopback_twin(SocketAddr::from(([0, 0, 0, 0], addr.port())))
                .await
                .is_none()
        );
    }
}
