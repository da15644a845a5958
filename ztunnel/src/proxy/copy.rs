//! Plain TCP ⇄ TCP copy (passthrough and inbound plaintext), with half-close.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::hbone::{ByteCounters, CopyOutcome};

const INITIAL: usize = 16 * 1024;
const MAX: usize = 256 * 1024;

/// Copies both ways until both sides have sent EOF (each EOF is forwarded as a write
/// shutdown) or one side fails. `to_tunnel` counts `a → b`, `from_tunnel` `b → a`, live in
/// `counters`.
pub async fn copy_tcp(
    a: &mut TcpStream,
    b: &mut TcpStream,
    counters: &ByteCounters,
) -> CopyOutcome {
    let before = counters.load();
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let result = tokio::try_join!(
        copy_half(&mut ar, &mut bw, &counters.to_tunnel),
        copy_half(&mut br, &mut aw, &counters.from_tunnel)
    );
    counters.outcome_since(before, result.err())
}

async fn copy_half<R, W>(rd: &mut R, wr: &mut W, count: &AtomicU64) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL];
    loop {
        let n = rd
            .read(&mut buf)
            .await
            .map_err(|e| format!("TCP read: {e}"))?;
        if n == 0 {
            wr.shutdown()
                .await
                .map_err(|e| format!("TCP shutdown: {e}"))?;
            return Ok(());
        }
        wr.write_all(&buf[..n])
            .await
            .map_err(|e| format!("TCP write: {e}"))?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() && buf.len() < MAX {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
