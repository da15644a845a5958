//! The CNI plugin's log lines, received on `<run_dir>/log.sock` (`POST /log`, upstream
//! istio-cni's format: see [`mesh_proto::plugin_log`]) and written to the agent's own log
//! with scope `cni-plugin`, so `kubectl logs` on the agent shows what the plugin decided
//! for each pod; the container runtime's log on the node has them too.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use mesh_proto::plugin_log::{PLUGIN_LOG_PATH, PLUGIN_LOG_SOCKET, PluginLogLine, parse_batch};

use crate::run_dir_socket::{RunDirSocket, RunDirSocketError};

/// Tracing target of the relayed lines (`scope=cni-plugin` in JSON logs).
pub const TARGET: &str = "cni_plugin";
/// Largest batch accepted (one plugin run logs a handful of lines).
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Where received lines go: the agent's log in production, a collector in tests.
pub type Sink = Arc<dyn Fn(PluginLogLine) + Send + Sync>;

/// A bound, not yet serving, log socket.
#[derive(Debug)]
pub struct PluginLogListener(RunDirSocket);

impl PluginLogListener {
    /// Binds `<run_dir>/log.sock` (replacing a previous agent's).
    pub fn bind(run_dir: &Path) -> Result<Self, RunDirSocketError> {
        RunDirSocket::bind(run_dir, PLUGIN_LOG_SOCKET, "plugin-log").map(Self)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Serves until `shutdown`, handing each received line to `sink`.
    pub async fn serve(self, sink: Sink, shutdown: impl Future<Output = ()>) {
        let route = move |req| route(req, sink.clone());
        self.0.serve(route, shutdown).await
    }
}

/// Writes `line` to the agent's log at its level, with target [`TARGET`]; the plugin's
/// own time and fields go along as `plugin_time` and `fields`.
pub fn relog(line: PluginLogLine) {
    let fields = line
        .fields
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let (msg, time) = (line.msg.as_str(), line.time.as_str());
    match line.level.as_str() {
        "error" => tracing::error!(target: "cni_plugin", plugin_time = time, fields, "{msg}"),
        "warn" => tracing::warn!(target: "cni_plugin", plugin_time = time, fields, "{msg}"),
        "info" => tracing::info!(target: "cni_plugin", plugin_time = time, fields, "{msg}"),
        _ => tracing::debug!(target: "cni_plugin", plugin_time = time, fields, "{msg}"),
    }
}

async fn route(req: Request<Incoming>, sink: Sink) -> Response<Full<Bytes>> {
    if req.uri().path() != PLUGIN_LOG_PATH {
        let why = format!("no endpoint {}", req.uri().path());
        return status(StatusCode::NOT_FOUND, why);
    }
    if req.method() != Method::POST {
        let why = format!("{PLUGIN_LOG_PATH} takes POST, not {}", req.method());
        return status(StatusCode::METHOD_NOT_ALLOWED, why);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                format!("cannot read log lines: {e}"),
            );
        }
    };
    match parse_batch(&body) {
        Ok(lines) => {
            for line in lines {
                sink(line);
            }
            status(StatusCode::OK, String::new())
        }
        Err(e) => {
            tracing::warn!(error = %e, "CNI plugin sent log lines that are not a JSON array of strings");
            status(StatusCode::BAD_REQUEST, format!("invalid log lines: {e}"))
        }
    }
}

fn status(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    async fn post(socket: &Path, path: &str, body: Vec<u8>) -> StatusCode {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::post(path)
            .header(http::header::HOST, "agent")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        send.send_request(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn received_lines_reach_the_sink_and_bad_bodies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let listener = PluginLogListener::bind(dir.path()).unwrap();
        let socket = listener.path().to_path_buf();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink: Sink = {
            let got = got.clone();
            Arc::new(move |l| got.lock().unwrap().push(l))
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(listener.serve(sink, async move {
            let _ = stopped.await;
        }));
        let line =
            r#"{"level":"info","time":"2026-11-29T03:00:00Z","msg":"pod added","pod":"ns/web"}"#;
        let body = mesh_proto::plugin_log::encode_batch(&[line.to_string()]);
        assert_eq!(post(&socket, PLUGIN_LOG_PATH, body).await, StatusCode::OK);
        assert_eq!(
            post(&socket, PLUGIN_LOG_PATH, b"{}".to_vec()).await,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            post(&socket, "/other", Vec::new()).await,
            StatusCode::NOT_FOUND
        );
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].msg.as_str(), got[0].fields[0].1.as_str()),
            ("pod added", "ns/web")
        );
        stop.send(()).unwrap();
        server.await.unwrap();
        assert!(!socket.exists(), "the socket is removed on shutdown");
    }
}
