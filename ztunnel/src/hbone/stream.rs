//! One HBONE stream (an HTTP/2 CONNECT tunnel) and the byte copy between it and a TCP socket.
//!
//! The copy runs both directions in the caller's task (no extra task per direction), reads
//! TCP into a growing `BytesMut` whose chunks are handed to h2 without copying, respects
//! HTTP/2 flow control (capacity is reserved before sending, received capacity is released
//! only after the bytes were written to TCP), and handles half-close: TCP EOF becomes
//! END_STREAM, END_STREAM becomes a TCP write shutdown.
//!
//! As upstream's copy: an app that resets or goes away (ECONNRESET, EPIPE, ENOTCONN) ends
//! its direction like a close, so what it wrote before still reaches the other side (an
//! HTTP server answering early and closing with unread input resets its socket), and a
//! peer's RST_STREAM with CANCEL or NO_ERROR ends the tunnel's direction like END_STREAM.
//! Any other error resets the stream.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// First read buffer; doubles up to [`MAX_READ`] while reads fill it.
const INITIAL_READ: usize = 16 * 1024;
const MAX_READ: usize = 1024 * 1024;

/// The two halves of a CONNECT tunnel.
pub struct H2Stream {
    pub(super) send: SendStream<Bytes>,
    pub(super) recv: RecvStream,
    /// Dropped with the stream (pool slot accounting).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").finish_non_exhaustive()
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            _guard: None,
        }
    }

    pub(crate) fn with_guard(mut self, guard: Box<dyn Send + Sync>) -> Self {
        self._guard = Some(guard);
        self
    }
}

/// Byte counts of a finished copy and the first error, if any.
#[derive(Debug, Default, Clone)]
pub struct CopyOutcome {
    /// TCP → tunnel.
    pub to_tunnel: u64,
    /// Tunnel → TCP.
    pub from_tunnel: u64,
    pub error: Option<String>,
}

/// Live byte counts of one copy, readable while it runs (`/debug/connections`).
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// TCP → tunnel (or, for a TCP ⇄ TCP copy, first socket → second).
    pub to_tunnel: AtomicU64,
    /// Tunnel → TCP.
    pub from_tunnel: AtomicU64,
}

impl ByteCounters {
    /// (to_tunnel, from_tunnel) now.
    pub fn load(&self) -> (u64, u64) {
        (
            self.to_tunnel.load(Ordering::Relaxed),
            self.from_tunnel.load(Ordering::Relaxed),
        )
    }

    /// The outcome of a copy that started when the counters read `before`.
    pub fn outcome_since(&self, before: (u64, u64), error: Option<String>) -> CopyOutcome {
        let (to, from) = self.load();
        CopyOutcome {
            to_tunnel: to - before.0,
            from_tunnel: from - before.1,
            error,
        }
    }
}

/// Copies between `tcp` and the tunnel until both directions are finished, counting into
/// `counters` as bytes move.
pub async fn copy_tcp_h2(
    tcp: &mut TcpStream,
    mut h2: H2Stream,
    counters: &ByteCounters,
) -> CopyOutcome {
    let before = counters.load();
    let (mut rd, mut wr) = tcp.split();
    let result: Result<(), String> = {
        let up = tcp_to_h2(&mut rd, &mut h2.send, &counters.to_tunnel);
        let down = h2_to_tcp(&mut h2.recv, &mut wr, &counters.from_tunnel);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    // The app reset its socket: nothing more can reach it either; what it
                    // wrote goes out with END_STREAM, the tunnel's other direction is
                    // cancelled when the stream is dropped.
                    Ok(TcpEnd::Reset) => break Ok(()),
                    Ok(TcpEnd::Eof) => up_done = true,
                    Err(e) => break Err(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Err(e),
                },
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    let error = match result {
        Ok(()) => None,
        Err(e) => {
            h2.send.send_reset(Reason::CANCEL);
            Some(e)
        }
    };
    counters.outcome_since(before, error)
}

/// How the TCP side of a copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpEnd {
    /// EOF: the app closed its write side (it may still read).
    Eof,
    /// The app reset or abandoned the connection.
    Reset,
}

/// Reads `rd` until EOF (or a reset), sending each chunk on `send`; the end becomes
/// END_STREAM.
pub async fn tcp_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut SendStream<Bytes>,
    count: &AtomicU64,
) -> Result<TcpEnd, String> {
    let mut buf = BytesMut::new();
    let mut want = INITIAL_READ;
    loop {
        buf.reserve(want);
        let spare = buf.capacity() - buf.len();
        let (n, end) = match rd.read_buf(&mut buf).await {
            Ok(n) => (n, TcpEnd::Eof),
            Err(e) if is_peer_gone(&e) => (0, TcpEnd::Reset),
            Err(e) => return Err(format!("TCP read: {e}")),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)
                .map_err(|e| format!("send end of stream: {e}"))?;
            return Ok(end);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n >= spare && want < MAX_READ {
            want *= 2;
        }
        while !buf.is_empty() {
            let cap = wait_capacity(send, buf.len()).await?;
            let chunk = buf.split_to(cap.min(buf.len())).freeze();
            send.send_data(chunk, false)
                .map_err(|e| format!("send to tunnel: {e}"))?;
        }
    }
}

async fn wait_capacity(send: &mut SendStream<Bytes>, want: usize) -> Result<usize, String> {
    send.reserve_capacity(want);
    let cap = send.capacity();
    if cap > 0 {
        return Ok(cap);
    }
    loop {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => return Ok(n),
            Some(Err(e)) => return Err(format!("tunnel stream failed: {e}")),
            None => return Err("tunnel stream closed by peer".to_string()),
        }
    }
}

/// Writes every DATA frame of `recv` to `wr`; END_STREAM becomes a write shutdown.
pub async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    wr: &mut W,
    count: &AtomicU64,
) -> Result<(), String> {
    while let Some(chunk) = recv.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) if matches!(e.reason(), Some(Reason::CANCEL | Reason::NO_ERROR)) => break,
            Err(e) => return Err(format!("receive from tunnel: {e}")),
        };
        let n = chunk.len();
        match wr.write_all(&chunk).await {
            Ok(()) => {}
            // The app is gone: nothing more can be delivered.
            Err(e) if is_peer_gone(&e) => return Ok(()),
            Err(e) => return Err(format!("TCP write: {e}")),
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        let _ = recv.flow_control().release_capacity(n);
    }
    match wr.shutdown().await {
        Ok(()) => Ok(()),
        Err(e) if is_peer_gone(&e) => Ok(()),
        Err(e) => Err(format!("shutdown after end of stream: {e}")),
    }
}

/// The app reset its connection or went away: its direction ends as if it had closed.
pub(crate) fn is_peer_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};

    /// An HTTP/2 client and server over an in-memory pipe, their connections driven by
    /// tasks; returns the server's end of one CONNECT stream and the client's.
    async fn tunnel() -> (H2Stream, (SendStream<Bytes>, RecvStream)) {
        let (c, s) = tokio::io::duplex(16 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond
                .send_response(Response::builder().status(200).body(()).unwrap(), false)
                .unwrap();
            H2Stream::new(send, req.into_body())
        });
        let (client, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.2:8080")
            .body(())
            .unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let server_end = server.await.unwrap();
        let recv = resp.await.unwrap().into_body();
        (server_end, (send, recv))
    }

    /// A server app that writes its answer and then resets the connection (closing with
    /// unread input): every byte it wrote reaches the client, then END_STREAM.
    #[tokio::test]
    async fn an_app_reset_after_writing_delivers_what_it_wrote() {
        // Small enough to sit in the proxy side's receive buffer before the reset.
        const LEN: usize = 64 * 1024;
        let (server_end, (_send, mut recv)) = tunnel().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut proxy_side, _) = listener.accept().await.unwrap();
        // Unread input makes the close a reset (as with SO_LINGER 0).
        proxy_side
            .write_all(b"request the app never reads")
            .await
            .unwrap();
        app.write_all(&vec![7u8; LEN]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        app.set_zero_linger().unwrap();
        drop(app);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let copy = tokio::spawn(async move {
            let counters = ByteCounters::default();
            copy_tcp_h2(&mut proxy_side, server_end, &counters).await
        });
        let mut got = 0;
        let end = loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), recv.data())
                .await
                .unwrap_or_else(|_| panic!("stalled after {got} bytes"));
            match next {
                Some(Ok(d)) => {
                    got += d.len();
                    let _ = recv.flow_control().release_capacity(d.len());
                }
                Some(Err(e)) => break Err(e.to_string()),
                None => break Ok(()),
            }
        };
        assert_eq!((got, end), (LEN, Ok(())));
        let out = copy.await.unwrap();
        assert_eq!(out.to_tunnel, LEN as u64);
    }
}
