//! One HBONE stream (an HTTP/2 CONNECT tunnel) and the byte copy between it and a TCP socket.
//!
//! The copy runs both directions in the caller's task (no extra task per direction), reads
//! TCP into a growing `BytesMut` whose chunks are handed to h2 without copying, respects
//! HTTP/2 flow control (capacity is reserved before sending, received capacity is released
//! only after the bytes were written to TCP), and handles half-close: TCP EOF becomes
//! END_STREAM, END_STREAM becomes a TCP write shutdown. An error on either side resets the
//! stream.

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
    send: SendStream<Bytes>,
    recv: RecvStream,
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
    let result = {
        let up = tcp_to_h2(&mut rd, &mut h2.send, &counters.to_tunnel);
        let down = h2_to_tcp(&mut h2.recv, &mut wr, &counters.from_tunnel);
        tokio::try_join!(up, down)
    };
    let error = match result {
        Ok(_) => None,
        Err(e) => {
            h2.send.send_reset(Reason::CANCEL);
            Some(e)
        }
    };
    counters.outcome_since(before, error)
}

/// Reads `rd` until EOF, sending each chunk on `send`; EOF becomes END_STREAM.
pub async fn tcp_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut SendStream<Bytes>,
    count: &AtomicU64,
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    let mut want = INITIAL_READ;
    loop {
        buf.reserve(want);
        let spare = buf.capacity() - buf.len();
        let n = rd
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("TCP read: {e}"))?;
        if n == 0 {
            send.send_data(Bytes::new(), true)
                .map_err(|e| format!("send end of stream: {e}"))?;
            return Ok(());
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
        let chunk = chunk.map_err(|e| format!("receive from tunnel: {e}"))?;
        let n = chunk.len();
        wr.write_all(&chunk)
            .await
            .map_err(|e| format!("TCP write: {e}"))?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        let _ = recv.flow_control().release_capacity(n);
    }
    wr.shutdown()
        .await
        .map_err(|e| format!("shutdown after end of stream: {e}"))?;
    Ok(())
}
