//! The plugin-event endpoint: HTTP/1.1 on the Unix socket
//! `<run_dir>/pluginevent.sock`, where the `istio-cni` plugin posts a
//! [`CmdAddEvent`] for each new pod (`POST /cmdadd`) and waits for the
//! agent's decision.
//!
//! | handler result | answer |
//! |---|---|
//! | `Ok(reply)` | `200`, JSON [`CmdAddReply`] |
//! | `Err(CmdAddRefusal::EnrolmentFailed)` | `500`, the reason as text (the plugin fails ADD, kubelet retries) |
//! | `Err(CmdAddRefusal::Undecided)` | `503`, the reason as text (the plugin decides from the API itself) |
//! | no result within the timeout, or the handler panicked | `503`, text naming the pod |
//! | body is not a `CmdAddEvent` | `400` |
//!
//! The handler runs in its own task: if the plugin gives up or the timeout
//! fires, the handler still runs to completion (it is never cancelled halfway
//! through an enrolment); its late result is logged.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use mesh_proto::cni_event::{
    CMD_ADD_PATH, CmdAddEvent, CmdAddReply, PLUGIN_EVENT_SOCKET, STATUS_ENROLMENT_FAILED,
    STATUS_UNDECIDED,
};

use crate::run_dir_socket::{RunDirSocket, RunDirSocketError};

/// Default bound on one handler call; below the plugin's own 5 s so the
/// plugin receives our 503 with a reason instead of timing out itself.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(4);
/// Largest request body accepted.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Decides about a pod the CNI plugin is adding. Implemented by the control
/// loop; `Err` says why the pod got no decision, with a reason the plugin puts
/// into its CNI error or log.
pub trait PodEventHandler: Send + Sync + 'static {
    fn cmd_add(&self, event: CmdAddEvent) -> BoxFuture<'_, Result<CmdAddReply, CmdAddRefusal>>;
}

/// Why the agent did not answer `200`; each kind has its own status, so the
/// plugin knows whether to fail ADD or to decide from the API itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdAddRefusal {
    /// The pod is ambient and could not be enrolled (no ztunnel, redirection
    /// failed): the pod must not start without redirection.
    #[error("{0}")]
    EnrolmentFailed(String),
    /// No decision now (still starting, the API lookup failed): the plugin
    /// looks the pod up itself, so pods outside the mesh are never held up.
    #[error("{0}")]
    Undecided(String),
}

impl CmdAddRefusal {
    /// The HTTP status this refusal is answered with.
    pub fn status(&self) -> StatusCode {
        let code = match self {
            Self::EnrolmentFailed(_) => STATUS_ENROLMENT_FAILED,
            Self::Undecided(_) => STATUS_UNDECIDED,
        };
        refusal_status(code)
    }
}

/// A bound, not yet serving, plugin-event socket.
#[derive(Debug)]
pub struct PluginEventListener(RunDirSocket);

impl PluginEventListener {
    /// Binds `<run_dir>/pluginevent.sock`, creating `run_dir` and replacing a
    /// socket left by a previous agent. Call inside a tokio runtime.
    pub fn bind(run_dir: &Path) -> Result<Self, RunDirSocketError> {
        RunDirSocket::bind(run_dir, PLUGIN_EVENT_SOCKET, "plugin-event").map(Self)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Serves until `shutdown` completes, then stops accepting and removes
    /// the socket file. Requests already being handled finish on their own.
    pub async fn serve(
        self,
        handler: Arc<dyn PodEventHandler>,
        handler_timeout: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        let route = move |req| route(req, handler.clone(), handler_timeout);
        self.0.serve(route, shutdown).await
    }
}

async fn route(
    req: Request<Incoming>,
    handler: Arc<dyn PodEventHandler>,
    handler_timeout: Duration,
) -> Response<Full<Bytes>> {
    if req.uri().path() != CMD_ADD_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("no endpoint {}", req.uri().path()),
        );
    }
    if req.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{CMD_ADD_PATH} takes POST, not {}", req.method()),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_EVENT_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read pod event: {e}"),
            );
        }
    };
    let event: CmdAddEvent = match serde_json::from_slice(&body) {
        Ok(ev) => ev,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("invalid pod event: {e}")),
    };
    handle(event, handler, handler_timeout).await
}

async fn handle(
    event: CmdAddEvent,
    handler: Arc<dyn PodEventHandler>,
    handler_timeout: Duration,
) -> Response<Full<Bytes>> {
    let pod = format!("{}/{}", event.pod_namespace, event.pod_name);
    tracing::debug!(pod = %pod, netns = %event.netns, "CNI ADD event");
    let task_pod = pod.clone();
    let mut task = tokio::spawn(async move {
        let r = handler.cmd_add(event).await;
        (task_pod, r)
    });
    let outcome = match tokio::time::timeout(handler_timeout, &mut task).await {
        Ok(joined) => joined,
        Err(_) => {
            tokio::spawn(async move {
                if let Ok((pod, r)) = task.await {
                    tracing::warn!(pod = %pod, result = ?r, "CNI ADD handler finished after the plugin was answered");
                }
            });
            tracing::warn!(pod = %pod, timeout = ?handler_timeout, "CNI ADD handler timed out");
            return text(
                refusal_status(STATUS_UNDECIDED),
                format!("node agent did not finish handling pod {pod} within {handler_timeout:?}"),
            );
        }
    };
    match outcome {
        Ok((_, Ok(reply))) => {
            tracing::info!(pod = %pod, enrolment = ?reply.enrolment, reason = %reply.reason, "CNI ADD handled");
            let body = serde_json::to_vec(&reply).expect("CmdAddReply is always serialisable");
            Response::builder()
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        }
        Ok((_, Err(refusal))) => {
            let status = refusal.status();
            tracing::warn!(pod = %pod, reason = %refusal, status = status.as_u16(), "CNI ADD refused");
            text(status, refusal.to_string())
        }
        Err(e) => {
            tracing::error!(pod = %pod, error = %e, "CNI ADD handler panicked");
            text(
                refusal_status(STATUS_UNDECIDED),
                format!("node agent failed while handling pod {pod}"),
            )
        }
    }
}

fn refusal_status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("the refusal statuses are valid HTTP statuses")
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
