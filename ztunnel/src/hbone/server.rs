//! The HBONE server side: TLS accept and the HTTP/2 accept loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ServerTls;
use crate::config::H2Config;

/// Why an inbound TLS session was not established.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("TLS handshake did not complete within {0:?}")]
    Timeout(Duration),
    #[error("client did not negotiate ALPN h2")]
    Alpn,
}

/// TLS server handshake with a deadline; ALPN must be `h2`.
pub async fn tls_accept(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Result<ServerTls, AcceptError> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = tokio::time::timeout(timeout, accept)
        .await
        .map_err(|_| AcceptError::Timeout(timeout))?
        .map_err(AcceptError::Handshake)?;
    if tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_H2) {
        return Err(AcceptError::Alpn);
    }
    Ok(tls)
}

/// Serves HTTP/2 on `io`: each request is handed to `handler` in its own task on `tracker`.
/// When `stop` fires, a GOAWAY refuses new streams and the loop ends once open streams
/// have finished; a client that stops answering PINGs is dropped (see below). Returns the
/// connection error, if any.
pub async fn serve<T, H, Fut>(
    io: T,
    cfg: &H2Config,
    stop: CancellationToken,
    tracker: &TaskTracker,
    handler: H,
) -> Result<(), h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.frame_size)
        .max_concurrent_streams(cfg.server_max_concurrent_streams)
        .max_header_list_size(64 * 1024)
        .handshake::<T, Bytes>(io);
    // A client that completed TLS but never sends the HTTP/2 preface would hold its
    // socket and task forever (PINGs start only after the preface): it gets as long as
    // an unanswered PING would.
    let Ok(conn) = tokio::time::timeout(cfg.keepalive_timeout, handshake).await else {
        tracing::debug!(timeout = ?cfg.keepalive_timeout, "HBONE client sent no HTTP/2 preface; closing");
        return Ok(());
    };
    let mut conn = conn?;
    // As upstream: a PING every keepalive_interval; no PONG within keepalive_timeout means
    // the client is gone (node crash, partition, its netns deleted with the pod before a
    // FIN could leave) and the connection is dropped, which ends every stream and closes
    // the app connections behind them. Without it they would stay open forever.
    let mut ping = conn.ping_pong();
    let (interval, timeout) = (cfg.keepalive_interval, cfg.keepalive_timeout);
    let keepalive = async move {
        let Some(pp) = ping.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(interval).await;
            match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
                Err(_) => return format!("no PONG within {timeout:?}"),
            }
        }
    };
    tokio::pin!(keepalive);
    let mut stopping = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    tracker.spawn(handler(req, respond));
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.graceful_shutdown();
            }
            why = &mut keepalive => {
                tracing::info!(reason = %why, "HBONE client unresponsive; closing its connection and streams");
                return Ok(());
            }
        }
    }
}

/// Answers a request with an empty response of `status`, ending the stream.
pub fn respond_status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("a status-only response is valid");
    let _ = respond.send_response(resp, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::raw_frames::*;
    use tokio::io::AsyncWriteExt;

    /// The server announces upstream's settings (200 concurrent streams, 4 MiB stream window,
    /// 1 MiB frames, 64 KiB header list, connection window raised to 16 MiB) and answers a
    /// stop with GOAWAY, ending once the client is gone.
    #[tokio::test]
    async fn announces_upstream_settings_and_sends_goaway_on_stop() {
        let (mut client, server_io) = tokio::io::duplex(1 << 20);
        let stop = CancellationToken::new();
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let tracker = TaskTracker::new();
                serve(
                    server_io,
                    &H2Config::default(),
                    stop,
                    &tracker,
                    |_req, respond| async move { respond_status(respond, StatusCode::OK) },
                )
                .await
            })
        };
        client.write_all(PREFACE).await.unwrap();
        write_frame(&mut client, SETTINGS, 0, 0, &[]).await;
        let settings = read_frame(&mut client).await.unwrap().settings();
        let get = |id: u16| settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
        assert_eq!(
            get(SETTINGS_MAX_CONCURRENT_STREAMS),
            Some(200),
            "{settings:?}"
        );
        assert_eq!(
            get(SETTINGS_INITIAL_WINDOW_SIZE),
            Some(4 << 20),
            "{settings:?}"
        );
        assert_eq!(get(SETTINGS_MAX_FRAME_SIZE), Some(1 << 20), "{settings:?}");
        assert_eq!(
            get(SETTINGS_MAX_HEADER_LIST_SIZE),
            Some(64 << 10),
            "{settings:?}"
        );
        let mut conn_window = None;
        let mut goaway = false;
        let mut stopped = false;
        while let Some(f) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client))
            .await
            .expect("server frames")
        {
            match (f.kind, f.flags) {
                (WINDOW_UPDATE, _) if f.stream == 0 => conn_window = Some(f.window_increment()),
                (GOAWAY, _) => {
                    goaway = true;
                    break;
                }
                (SETTINGS, FLAG_ACK) if !stopped => {
                    stopped = true;
                    stop.cancel();
                }
                _ => {}
            }
        }
        assert_eq!(conn_window, Some((16 << 20) - 65_535));
        assert!(goaway, "no GOAWAY after stop");
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve ends after GOAWAY once the client is gone")
            .unwrap()
            .ok();
    }

    /// A client that completes TLS but never sends the HTTP/2 preface is dropped.
    #[tokio::test]
    async fn a_client_without_a_preface_is_dropped() {
        let (_client, server_io) = tokio::io::duplex(1 << 16);
        let cfg = H2Config {
            keepalive_timeout: Duration::from_millis(200),
            ..H2Config::default()
        };
        let tracker = TaskTracker::new();
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            serve(
                server_io,
                &cfg,
                CancellationToken::new(),
                &tracker,
                |_req, respond| async move { respond_status(respond, StatusCode::OK) },
            ),
        )
        .await
        .expect("serve gives up on a silent client");
        assert!(r.is_ok(), "{r:?}");
    }

    /// A client that stops answering (its node died; no FIN ever arrives) is PINGed and,
    /// without a PONG, dropped: its streams end instead of holding app connections forever.
    #[tokio::test]
    async fn an_unresponsive_client_is_pinged_and_dropped() {
        let (mut client, server_io) = tokio::io::duplex(1 << 20);
        let cfg = H2Config {
            keepalive_interval: Duration::from_millis(100),
            keepalive_timeout: Duration::from_millis(300),
            ..H2Config::default()
        };
        let stream_ended = CancellationToken::new();
        let server = {
            let ended = stream_ended.clone();
            tokio::spawn(async move {
                let tracker = TaskTracker::new();
                serve(server_io, &cfg, CancellationToken::new(), &tracker, {
                    move |req, _respond| {
                        let ended = ended.clone();
                        async move {
                            // The stream's body ends (with an error) once the connection
                            // is dropped.
                            let mut body = req.into_body();
                            while let Some(Ok(_)) = body.data().await {}
                            ended.cancel();
                        }
                    }
                })
                .await
            })
        };
        client.write_all(PREFACE).await.unwrap();
        write_frame(&mut client, SETTINGS, 0, 0, &[]).await;
        // One open stream: CONNECT 10.0.0.2:8080 (HPACK, literal without indexing).
        let mut block = vec![0x02, 7];
        block.extend_from_slice(b"CONNECT");
        block.extend_from_slice(&[0x01, 13]);
        block.extend_from_slice(b"10.0.0.2:8080");
        write_frame(&mut client, HEADERS, FLAG_END_HEADERS, 1, &block).await;
        // Read what the server sends, never answering: a PING (not an ACK) must come.
        let mut pinged = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(f)) = tokio::time::timeout_at(deadline, read_frame(&mut client)).await {
            if f.kind == PING && f.flags & FLAG_ACK == 0 {
                pinged = true;
                break;
            }
        }
        assert!(pinged, "no PING from the server");
        let r = tokio::time::timeout(Duration::from_secs(3), server).await;
        assert!(r.is_ok(), "serve did not give up on the silent client");
        tokio::time::timeout(Duration::from_secs(3), stream_ended.cancelled())
            .await
            .expect("the open stream ended with the connection");
        drop(client);
    }
}
