//! HTTP/1.1 endpoints on Unix sockets in the run dir, where the CNI plugin reaches the
//! agent (`pluginevent.sock`, `log.sock`): binding (replacing a previous agent's socket)
//! and serving (the accept loop is `http_endpoint`'s).

use std::future::Future;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum RunDirSocketError {
    #[error("cannot create run dir {path}: {source}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove stale {what} socket {path}: {source}")]
    Stale {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {what} socket {path}: {source}")]
    Bind {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bound, not yet serving, socket.
#[derive(Debug)]
pub struct RunDirSocket {
    listener: UnixListener,
    path: PathBuf,
    /// What it is for, in logs and errors.
    what: &'static str,
}

impl RunDirSocket {
    /// Binds `<run_dir>/<name>`, creating `run_dir` and replacing a socket left by a
    /// previous agent. Call inside a tokio runtime.
    pub fn bind(run_dir: &Path, name: &str, what: &'static str) -> Result<Self, RunDirSocketError> {
        std::fs::create_dir_all(run_dir).map_err(|source| RunDirSocketError::RunDir {
            path: run_dir.to_path_buf(),
            source,
        })?;
        let path = run_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(RunDirSocketError::Stale { what, path, source }),
        }
        let listener = UnixListener::bind(&path).map_err(|source| RunDirSocketError::Bind {
            what,
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            listener,
            path,
            what,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `route` for every request until `shutdown` completes, then stops accepting
    /// and removes the socket file. Requests already being handled finish on their own.
    pub async fn serve<R, Fut>(self, route: R, shutdown: impl Future<Output = ()>)
    where
        R: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let Self {
            listener,
            path,
            what,
        } = self;
        tracing::info!(socket = %path.display(), "{what} endpoint listening");
        let endpoint = format!("{what} socket {}", path.display());
        let l = &listener;
        // Half-closed connections are served: the plugin writes its log lines and exits
        // without waiting for the answer.
        crate::http_endpoint::serve_http1(
            &endpoint,
            move || async move { l.accept().await.map(|(stream, _)| stream) },
            route,
            true,
            shutdown,
        )
        .await;
        drop(listener);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove {what} socket");
        }
        tracing::info!(socket = %path.display(), "{what} endpoint stopped");
    }
}
