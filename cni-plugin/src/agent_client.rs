//! Talks to the node agent on its Unix sockets, each exchange one HTTP/1.1 `POST`:
//! asking about a new pod (`/cmdadd`, bounded by a timeout), forwarding the run's log
//! lines (`/log`, written without waiting for the answer).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use mesh_proto::cni_event::{CMD_ADD_PATH, CmdAddEvent, CmdAddReply};

/// Longest agent answer we read (a reply is a few hundred bytes).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The agent answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAnswer {
    /// `200`. The reply body is ours; an upstream agent sends none.
    Accepted(Option<CmdAddReply>),
    /// Any other status, with the agent's reason.
    Refused { status: u16, reason: String },
}

/// The agent could not be asked (not running, not listening, hung).
#[derive(Debug, thiserror::Error)]
pub enum AgentUnreachable {
    #[error("cannot connect to the node agent at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the node agent at {socket} failed: {source}")]
    Http {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("reading the node agent's answer at {socket} failed: {reason}")]
    Body { socket: PathBuf, reason: String },
    #[error("the node agent at {socket} did not answer within {after:?}")]
    Timeout { socket: PathBuf, after: Duration },
}

/// Sends `event` and waits at most `timeout` for the whole exchange.
pub async fn send_cmd_add(
    socket: &Path,
    event: &CmdAddEvent,
    timeout: Duration,
) -> Result<AgentAnswer, AgentUnreachable> {
    within(socket, timeout, exchange(socket, event)).await
}

/// Posts the run's JSON log `lines` to the agent's log socket and returns once they are
/// written, without waiting for the agent's answer: the plugin is about to exit, and the
/// agent reads a request whose writer has gone (its endpoint keeps half-closed
/// connections). The connect and each write are bounded by `timeout`: an agent that is
/// alive but not accepting (frozen, wedged, its backlog full) must not hold up the pod.
/// No async runtime: this runs on every ADD, including those that never needed one.
pub fn post_log_lines(socket: &Path, lines: &[String], timeout: Duration) -> std::io::Result<()> {
    use std::io::Write;
    let body = mesh_proto::plugin_log::encode_batch(lines);
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: istio-cni-agent\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        mesh_proto::plugin_log::PLUGIN_LOG_PATH,
        body.len()
    );
    let mut stream = connect_bounded(socket, timeout)?;
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)
}

/// A blocking Unix stream connection whose connect and writes give up after `timeout`.
/// `SO_SNDTIMEO` is set before `connect`: on Linux a Unix-socket connect to a listener
/// with a full backlog waits for that long (then fails with `EAGAIN`) instead of forever.
fn connect_bounded(
    socket: &Path,
    timeout: Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    s.set_write_timeout(Some(timeout))?;
    s.connect(&SockAddr::unix(socket)?)?;
    Ok(s.into())
}

/// `exchange` with the agent at `socket`, given up after `timeout`.
async fn within(
    socket: &Path,
    timeout: Duration,
    exchange: impl Future<Output = Result<AgentAnswer, AgentUnreachable>>,
) -> Result<AgentAnswer, AgentUnreachable> {
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(AgentUnreachable::Timeout {
                socket: socket.to_path_buf(),
                after: timeout,
            })
        })
}

async fn exchange(socket: &Path, event: &CmdAddEvent) -> Result<AgentAnswer, AgentUnreachable> {
    let body = serde_json::to_vec(event).expect("CmdAddEvent is always serialisable");
    post(socket, CMD_ADD_PATH, body).await
}

/// One JSON `POST` of `body` to `path` on `socket`: the status and the reply.
async fn post(socket: &Path, path: &str, body: Vec<u8>) -> Result<AgentAnswer, AgentUnreachable> {
    let http_err = |source| AgentUnreachable::Http {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| AgentUnreachable::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let conn = tokio::spawn(conn);
    let req = http::Request::post(path)
        .header(http::header::HOST, "istio-cni-agent")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static request parts are valid");
    let resp = sender.send_request(req).await.map_err(http_err)?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| AgentUnreachable::Body {
            socket: socket.to_path_buf(),
            reason: e.to_string(),
        })?
        .to_bytes();
    conn.abort();
    if status == http::StatusCode::OK {
        Ok(AgentAnswer::Accepted(serde_json::from_slice(&bytes).ok()))
    } else {
        let reason = String::from_utf8_lossy(&bytes).trim().to_string();
        Ok(AgentAnswer::Refused {
            status: status.as_u16(),
            reason: if reason.is_empty() {
                status.to_string()
            } else {
                reason
            },
        })
    }
}
