//! Helpers shared by this crate's unit tests. Compiled only under
//! `cfg(test)`: production code never imports it.

use std::future::Future;
use std::sync::{Arc, Mutex};

/// A `tracing` writer that keeps what is written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// A subscriber for the calling thread that writes WARN and above here.
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        let w = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish()
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// What the calling thread logs at WARN and above while `f` runs.
pub fn warnings(f: impl FnOnce()) -> String {
    let buf = Captured::default();
    tracing::subscriber::with_default(buf.subscriber(), f);
    buf.text()
}

/// What the calling thread logs at WARN and above while `f` is awaited
/// (on a current-thread runtime, everything `f` does itself; not what it
/// spawns on other threads).
pub async fn warnings_async(f: impl Future<Output = ()>) -> String {
    let buf = Captured::default();
    {
        let _log = tracing::subscriber::set_default(buf.subscriber());
        f.await;
    }
    buf.text()
}
