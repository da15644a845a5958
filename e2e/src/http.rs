//! A plain HTTP/1.1 GET for tests that probe admin, readiness and metrics endpoints
//! from async code (the netns-aware blocking variant is
//! [`crate::dedicated_mesh::http_get`]).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The whole response (status line, headers, body) of `GET path` at `addr`, or `None`
/// when nothing answers.
pub async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}
