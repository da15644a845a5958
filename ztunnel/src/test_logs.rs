//! Test helper (compiled for unit tests only, never used by production code): captures
//! what `tracing` logs while a closure runs.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// An in-memory log writer; clones share the buffer.
#[derive(Clone, Default)]
pub struct Buf(Arc<Mutex<Vec<u8>>>);

impl Buf {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// tracing caches each callsite's interest. While only one dispatcher is registered, a
/// callsite first hit on another test thread (no subscriber there) is cached as "never"
/// for everyone, and a capture would miss it. A second, permanent dispatcher that wants
/// nothing keeps interest at "sometimes" (asked per event). Call before capturing.
pub fn keep_callsites_live() {
    static ANCHOR: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    ANCHOR.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

/// The plain-text log lines (INFO and above) of `f`.
pub fn capture(f: impl FnOnce()) -> String {
    keep_callsites_live();
    let buf = Buf::default();
    let out = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || out.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(sub, f);
    buf.text()
}
