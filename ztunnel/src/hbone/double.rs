//! Double HBONE, as upstream's multi-network support: a client reaches a workload on
//! another network through that network's east-west gateway.
//!
//! - The outer tunnel is an ordinary pooled HBONE stream to the gateway; its CONNECT names
//!   `service-hostname:port`, and the gateway relays the stream's bytes, unread, to a
//!   destination's HBONE port.
//! - Inside it the client runs a second HBONE connection of its own: TLS with the source
//!   workload's certificate, verified against the destination's identities, then HTTP/2
//!   and a CONNECT with the same authority plus `x-forwarded-network`. That connection is
//!   not pooled (a pooled one would pin every later client to the first destination the
//!   gateway picked); it closes when its one stream ends.
//!
//! [`StreamIo`] makes an HBONE stream a byte stream for the inner TLS.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use rustls::pki_types::CertificateDer;

use super::pool::{Pool, client_builder, send_connect};
use super::{H2Stream, HboneError};
use crate::tls::crl::{RevocationWatch, until_revoked};

/// An HBONE stream as `AsyncRead + AsyncWrite`. Received capacity is released as the
/// reader consumes it; shutdown sends END_STREAM.
///
/// Dropped after shutdown while the peer's direction is still open (the inner HTTP/2
/// connection closes before the gateway has relayed the destination's close), the stream
/// [lingers](H2Stream::linger): dropping it at once would reset it with CANCEL, which
/// discards the END_STREAM h2 may not have written yet.
pub struct StreamIo {
    /// `None` once dropped.
    stream: Option<H2Stream>,
    /// Received and not yet read.
    pending: Bytes,
    read_done: bool,
    write_done: bool,
}

impl StreamIo {
    pub fn new(stream: H2Stream) -> Self {
        StreamIo {
            stream: Some(stream),
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let stream = this.stream.as_mut().expect("only taken on drop");
        while this.pending.is_empty() {
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(stream.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                // As the TCP copy: a peer's CANCEL or NO_ERROR reset ends the direction.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::CANCEL | Reason::NO_ERROR)) => {
                    this.read_done = true
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => this.read_done = true,
            }
        }
        let n = buf.remaining().min(this.pending.len());
        buf.put_slice(&this.pending.split_to(n));
        let _ = stream.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self
            .get_mut()
            .stream
            .as_mut()
            .expect("only taken on drop")
            .send;
        send.reserve_capacity(buf.len());
        loop {
            let cap = send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io::Error::other)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by the peer",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 buffers what was sent; its connection task writes it out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_done {
            this.write_done = true;
            let stream = this.stream.as_mut().expect("only taken on drop");
            stream
                .send
                .send_data(Bytes::new(), true)
                .map_err(io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if !self.write_done || self.read_done {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(stream.linger());
    }
}

/// Deadlines of the inner tunnel's two steps.
#[derive(Debug, Clone, Copy)]
pub struct InnerTimeouts {
    pub handshake: Duration,
    pub response: Duration,
}

impl Pool {
    /// Opens double HBONE's inner tunnel over `outer` (a stream to the east-west gateway
    /// at `gateway`): TLS with `tls` (the source's certificate, the destination's
    /// identities), an HTTP/2 connection of its own with the pool's settings, and CONNECT
    /// `request`. Errors name the gateway. The connection ends with its stream, when the
    /// pool shuts down, or when the watch `revocation` makes of the destination's
    /// certificates (`CRL_PATH`) fires.
    pub async fn open_inner_stream<W>(
        &self,
        outer: H2Stream,
        tls: Arc<rustls::ClientConfig>,
        gateway: SocketAddr,
        request: Request<()>,
        timeouts: InnerTimeouts,
        revocation: W,
    ) -> Result<H2Stream, HboneError>
    where
        W: FnOnce(Option<&[CertificateDer<'_>]>) -> Option<RevocationWatch>,
    {
        let handshake = super::tls_connect_over(StreamIo::new(outer), tls, gateway);
        let tls = tokio::time::timeout(timeouts.handshake, handshake)
            .await
            .map_err(|_| HboneError::TlsTimeout {
                dst: gateway,
                timeout: timeouts.handshake,
            })??;
        let watch = revocation(tls.get_ref().1.peer_certificates());
        let h2_err = |source| HboneError::H2 {
            dst: gateway,
            source,
        };
        let (send, conn) = client_builder(self.cfg())
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(h2_err)?;
        let shutdown = self.shutdown_token();
        let watching = watch.is_some();
        self.tracker().spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(gateway = %gateway, error = %e, "double HBONE inner connection ended");
                },
                _ = shutdown.cancelled() => {}
                () = until_revoked(watch), if watching => {}
            }
        });
        let deadline = tokio::time::Instant::now() + timeouts.response;
        let timed_out = || HboneError::ResponseTimeout {
            dst: gateway,
            authority: request.uri().to_string(),
            timeout: timeouts.response,
        };
        let mut send = tokio::time::timeout_at(deadline, send.ready())
            .await
            .map_err(|_| timed_out())?
            .map_err(h2_err)?;
        // `send` is dropped on return: the connection closes once the stream is done.
        send_connect(&mut send, request, gateway, deadline, timeouts.response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CONNECT stream between an h2 client and server over an in-memory pipe: the
    /// client's end as `StreamIo`, the server's send and receive halves.
    async fn tunnel() -> (StreamIo, h2::SendStream<Bytes>, h2::RecvStream) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (send, req.into_body())
        });
        let (send, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let req = Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.2:80")
            .body(())
            .unwrap();
        let (resp, out) = send.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        let (s_send, s_recv) = server.await.unwrap();
        (
            StreamIo::new(H2Stream::client(out, resp.into_body())),
            s_send,
            s_recv,
        )
    }

    #[tokio::test]
    async fn stream_io_carries_bytes_both_ways_and_half_closes() {
        let (mut io, mut s_send, mut s_recv) = tunnel().await;
        // More than one HTTP/2 window's worth of default frames, in both directions.
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let up = big.clone();
        let writer = tokio::spawn(async move {
            io.write_all(&up).await.unwrap();
            io.shutdown().await.unwrap();
            io
        });
        let mut got = Vec::new();
        while let Some(chunk) = s_recv.data().await {
            let chunk = chunk.unwrap();
            s_recv.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, big, "client -> server, then END_STREAM");
        let mut io = writer.await.unwrap();
        s_send
            .send_data(Bytes::from_static(b"reply"), true)
            .unwrap();
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply", "server -> client, then EOF");
    }

    #[tokio::test]
    async fn a_reset_stream_fails_the_read() {
        let (mut io, mut s_send, _s_recv) = tunnel().await;
        s_send.send_reset(Reason::PROTOCOL_ERROR);
        let mut buf = [0u8; 8];
        let e = io.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("protocol error"), "{e}");
    }
}
