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
//!
//! h2 resets a client's stream dropped while the peer's direction is still open with
//! CANCEL, and a CANCEL discards the DATA and END_STREAM it has not written yet (a server's
//! stream is reset with NO_ERROR, which keeps them). So a client stream whose app reset
//! [lingers](H2Stream::linger) before it is dropped.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// First read buffer; doubles up to [`MAX_READ`] while reads fill it.
const INITIAL_READ: usize = 16 * 1024;
const MAX_READ: usize = 1024 * 1024;

/// How long a stream whose own direction has ended waits for the peer to end its
/// direction before it is dropped (see [`H2Stream::linger`]).
pub const LINGER: Duration = Duration::from_secs(5);

/// The two halves of a CONNECT tunnel.
pub struct H2Stream {
    pub(super) send: SendStream<Bytes>,
    pub(super) recv: RecvStream,
    /// The client's end (ours opened it): dropped early it is reset with CANCEL.
    client: bool,
    /// Dropped with the stream (pool slot accounting).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").finish_non_exhaustive()
    }
}

impl H2Stream {
    /// A server's end of a stream (an accepted CONNECT).
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            client: false,
            _guard: None,
        }
    }

    /// A client's end of a stream (a CONNECT we sent).
    pub fn client(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            client: true,
            ..Self::new(send, recv)
        }
    }

    /// Waits, at most [`LINGER`], for the peer to end its direction, discarding what it
    /// still sends, then drops the stream. Our END_STREAM (and the DATA before it) is then
    /// written before the stream goes: dropped while the peer's direction is open, a
    /// client's stream is reset with CANCEL, and h2 discards what it has not written.
    pub async fn linger(mut self) {
        let drain = async {
            while let Some(Ok(chunk)) = self.recv.data().await {
                let _ = self.recv.flow_control().release_capacity(chunk.len());
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
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
    let mut app_reset = false;
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
                    // cancelled when the stream is dropped (a client's after lingering).
                    Ok(TcpEnd::Reset) => {
                        app_reset = true;
                        break Ok(());
                    }
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
            // The app must not take a failed tunnel for a complete exchange: closing its
            // connection sends a reset, not a FIN.
            let _ = socket2::SockRef::from(&*tcp).set_linger(Some(Duration::ZERO));
            Some(e)
        }
    };
    if app_reset && h2.client {
        h2.linger().await;
    }
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
            if let Err(e) = send.send_data(Bytes::new(), true)
                && !ended_by_peer(send)
            {
                return Err(format!("send end of stream: {e}"));
            }
            return Ok(end);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n >= spare && want < MAX_READ {
            want *= 2;
        }
        while !buf.is_empty() {
            let cap = match wait_capacity(send, buf.len()).await {
                Ok(cap) => cap,
                Err(_) if ended_by_peer(send) => return Ok(TcpEnd::Eof),
                Err(e) => return Err(e),
            };
            let chunk = buf.split_to(cap.min(buf.len())).freeze();
            if let Err(e) = send.send_data(chunk, false) {
                if ended_by_peer(send) {
                    return Ok(TcpEnd::Eof);
                }
                return Err(format!("send to tunnel: {e}"));
            }
        }
    }
}

/// Whether the peer ended the stream with RST_STREAM NO_ERROR or CANCEL (an app that
/// answered and went away, as the peer's copy ends it): what this direction still has is
/// not wanted, which is the peer's close, not a failure of the tunnel.
fn ended_by_peer(send: &mut SendStream<Bytes>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(
        send.poll_reset(&mut cx),
        std::task::Poll::Ready(Ok(Reason::NO_ERROR | Reason::CANCEL))
    )
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

    /// A loopback TCP connection: (the app's end, the proxy's end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy_side, _) = listener.accept().await.unwrap();
        (app, proxy_side)
    }

    /// Copies between `proxy_side` and the client stream `(send, recv)` on a task of its
    /// own; the task returns the copy's outcome.
    fn spawn_client_copy(
        mut proxy_side: TcpStream,
        (send, recv): (SendStream<Bytes>, RecvStream),
    ) -> tokio::task::JoinHandle<CopyOutcome> {
        tokio::spawn(async move {
            let counters = ByteCounters::default();
            copy_tcp_h2(&mut proxy_side, H2Stream::client(send, recv), &counters).await
        })
    }

    /// The proxy's end of a TCP connection whose app wrote `len` bytes and then reset it
    /// (closing with unread input, and SO_LINGER 0).
    async fn app_wrote_then_reset(len: usize) -> TcpStream {
        let (mut app, mut proxy_side) = tcp_pair().await;
        proxy_side
            .write_all(b"input the app never reads")
            .await
            .unwrap();
        app.write_all(&vec![7u8; len]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        app.set_zero_linger().unwrap();
        drop(app);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        proxy_side
    }

    /// Reads `recv` to its end: the byte count, and how it ended.
    async fn read_to_end(recv: &mut RecvStream) -> (usize, Result<(), String>) {
        let mut got = 0;
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), recv.data())
                .await
                .unwrap_or_else(|_| panic!("stalled after {got} bytes"));
            match next {
                Some(Ok(d)) => {
                    got += d.len();
                    let _ = recv.flow_control().release_capacity(d.len());
                }
                Some(Err(e)) => return (got, Err(e.to_string())),
                None => return (got, Ok(())),
            }
        }
    }

    /// A server app that writes its answer and then resets the connection: every byte it
    /// wrote reaches the client, then END_STREAM.
    #[tokio::test]
    async fn an_app_reset_after_writing_delivers_what_it_wrote() {
        // Small enough to sit in the proxy side's receive buffer before the reset.
        const LEN: usize = 64 * 1024;
        let (server_end, (_send, mut recv)) = tunnel().await;
        let mut proxy_side = app_wrote_then_reset(LEN).await;
        let copy = tokio::spawn(async move {
            let counters = ByteCounters::default();
            copy_tcp_h2(&mut proxy_side, server_end, &counters).await
        });
        assert_eq!(read_to_end(&mut recv).await, (LEN, Ok(())));
        let out = copy.await.unwrap();
        assert_eq!(out.to_tunnel, LEN as u64);
    }

    /// A tunnel that fails (here the peer resets the stream with INTERNAL_ERROR) reaches
    /// the app as a connection reset, after what did arrive, not as a FIN it could take
    /// for the end of a complete answer.
    #[tokio::test]
    async fn a_failed_tunnel_resets_the_app_connection() {
        use tokio::io::AsyncReadExt;
        let (mut server_end, client_end) = tunnel().await;
        let (mut app, proxy_side) = tcp_pair().await;
        let copy = spawn_client_copy(proxy_side, client_end);
        server_end
            .send
            .send_data(Bytes::from_static(b"partial"), false)
            .unwrap();
        let mut got = [0u8; 7];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"partial");
        server_end.send.send_reset(Reason::INTERNAL_ERROR);
        let out = copy.await.unwrap();
        assert!(out.error.is_some(), "{out:?}");
        let mut rest = Vec::new();
        let end = app.read_to_end(&mut rest).await;
        assert_eq!(
            end.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }

    /// The peer's app answered and reset (its ztunnel sends END_STREAM, then RST_STREAM
    /// NO_ERROR): when the client app then closes, its END_STREAM cannot be sent, and that
    /// is the end of a complete exchange, not a failed tunnel.
    #[tokio::test]
    async fn a_peer_that_answered_and_reset_is_a_clean_end() {
        use tokio::io::AsyncReadExt;
        let (mut server_end, client_end) = tunnel().await;
        let (mut app, proxy_side) = tcp_pair().await;
        let copy = spawn_client_copy(proxy_side, client_end);
        server_end
            .send
            .send_data(Bytes::from_static(b"answer"), true)
            .unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
        server_end.send.send_reset(Reason::NO_ERROR);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(app);
        let out = copy.await.unwrap();
        assert_eq!((out.from_tunnel, out.error), (6, None));
    }

    /// The same on the client's end (an outbound app that writes and resets): every byte
    /// reaches the server, then END_STREAM, although the server's direction is still open
    /// when the app goes (an early drop would reset the stream with CANCEL and h2 would
    /// discard what it had not written).
    #[tokio::test]
    async fn a_client_app_reset_after_writing_delivers_what_it_wrote() {
        // Within the initial stream window: all of it is queued at once.
        const LEN: usize = 32 * 1024;
        let (mut server_end, client_end) = tunnel().await;
        let copy = spawn_client_copy(app_wrote_then_reset(LEN).await, client_end);
        assert_eq!(read_to_end(&mut server_end.recv).await, (LEN, Ok(())));
        server_end.send.send_data(Bytes::new(), true).unwrap();
        let out = copy.await.unwrap();
        assert_eq!((out.to_tunnel, out.error), (LEN as u64, None));
    }
}
