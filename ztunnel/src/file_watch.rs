//! Following a mounted file: the local config (`LOCAL_XDS_PATH`) and the trust bundle
//! (`ROOT_CA_PATH`) are re-read when they change, without a restart.
//!
//! The file's directory is watched (inotify through `notify`), not the file: editors and
//! Kubernetes ConfigMap volumes replace files by rename (ConfigMaps swap a `..data` symlink),
//! which a watch on the file itself would miss. Only changes count (not the accesses our own
//! reads cause), and the content is compared with the last accepted one, so spurious events
//! cost a read and nothing else.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {reason}")]
pub struct WatchError {
    pub path: String,
    pub reason: String,
}

/// Keeps the file watched while alive.
pub struct FileWatcher {
    _watcher: notify::RecommendedWatcher,
    rereads: Arc<AtomicU64>,
}

impl FileWatcher {
    /// How many times the file was read again because of a change event.
    pub fn rereads(&self) -> u64 {
        self.rereads.load(Ordering::Relaxed)
    }
}

/// Calls `on_change` with the file's new text whenever it differs from the last accepted
/// text (`initial` at first). `on_change` returns whether it accepted the text; a rejected
/// text is offered again at the next change event. Calls run on the watcher's own thread;
/// an unreadable file, or one that is not UTF-8, is logged and skipped.
pub fn watch(
    path: &Path,
    initial: String,
    on_change: impl Fn(&str) -> bool + Send + 'static,
) -> Result<FileWatcher, WatchError> {
    let name = path.display().to_string();
    watch_bytes(
        path,
        initial.into_bytes(),
        move |bytes| match std::str::from_utf8(bytes) {
            Ok(text) => on_change(text),
            Err(e) => {
                tracing::warn!(path = %name, error = %e, "watched file is not UTF-8 text; keeping the previous content");
                false
            }
        },
    )
}

/// [`watch`] for any content (e.g. a DER file): `on_change` gets the file's bytes.
pub fn watch_bytes(
    path: &Path,
    initial: Vec<u8>,
    on_change: impl Fn(&[u8]) -> bool + Send + 'static,
) -> Result<FileWatcher, WatchError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file: PathBuf = path.to_path_buf();
    let file_name = file.file_name().map(OsStr::to_os_string);
    let last = Mutex::new(initial);
    let rereads = Arc::new(AtomicU64::new(0));
    let counter = rereads.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            return;
        };
        if !concerns_file(&event, file_name.as_deref()) {
            return;
        }
        // Let a writer finish (truncate + write arrive as separate events).
        std::thread::sleep(Duration::from_millis(50));
        counter.fetch_add(1, Ordering::Relaxed);
        let text = match std::fs::read(&file) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %file.display(), error = %e, "watched file unreadable; keeping the previous content");
                return;
            }
        };
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if *last != text && on_change(&text) {
            *last = text;
        }
    })
    .map_err(|e| WatchError {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| WatchError {
            path: path.display().to_string(),
            reason: format!("directory {}: {e}", dir.display()),
        })?;
    Ok(FileWatcher {
        _watcher: watcher,
        rereads,
    })
}

/// Whether a directory event may have changed the file: a change (not a mere access) of the
/// file itself or of a `..`-prefixed entry (Kubernetes ConfigMap volumes swap `..data`).
fn concerns_file(event: &notify::Event, file_name: Option<&OsStr>) -> bool {
    use notify::EventKind;
    if !matches!(
        event.kind,
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    ) {
        return false;
    }
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            let name = p.file_name();
            name == file_name || name.is_some_and(|n| n.to_string_lossy().starts_with(".."))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn event_filter() {
        use notify::event::{AccessKind, CreateKind, ModifyKind};
        use notify::{Event, EventKind};
        let n = Some(OsStr::new("local.yaml"));
        let ev = |kind, p: &str| Event::new(kind).add_path(PathBuf::from(p));
        assert!(!concerns_file(
            &ev(EventKind::Access(AccessKind::Any), "/d/local.yaml"),
            n
        ));
        assert!(concerns_file(
            &ev(EventKind::Modify(ModifyKind::Any), "/d/local.yaml"),
            n
        ));
        assert!(!concerns_file(
            &ev(EventKind::Modify(ModifyKind::Any), "/d/x.log"),
            n
        ));
        assert!(concerns_file(
            &ev(EventKind::Create(CreateKind::Any), "/d/..data"),
            n
        ));
    }

    /// A ConfigMap-style update: the file is a symlink through `..data`, and the update
    /// swaps `..data` to a new directory by rename.
    #[test]
    fn follows_configmap_symlink_swaps_and_offers_rejected_text_again() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(d.join("..v1/root-cert.pem"), "one").unwrap();
        std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/root-cert.pem", d.join("root-cert.pem")).unwrap();
        let path = d.join("root-cert.pem");
        let (tx, rx) = mpsc::channel();
        let _w = watch(&path, "one".into(), move |text| {
            tx.send(text.to_string()).unwrap();
            text != "bad"
        })
        .unwrap();
        let swap = |version: &str, text: &str| {
            std::fs::create_dir(d.join(version)).unwrap();
            std::fs::write(d.join(version).join("root-cert.pem"), text).unwrap();
            std::os::unix::fs::symlink(version, d.join("..data_tmp")).unwrap();
            std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        };
        // Everything offered until the events of one change have settled.
        let offered = || {
            let mut got = vec![rx.recv_timeout(Duration::from_secs(5)).unwrap()];
            while let Ok(t) = rx.recv_timeout(Duration::from_millis(400)) {
                got.push(t);
            }
            got
        };
        swap("..v2", "two");
        assert_eq!(offered(), ["two"]);
        swap("..v3", "bad");
        assert!(offered().iter().all(|t| t == "bad"));
        // Rejected: the next event in the directory offers it again.
        std::fs::write(d.join("..touch"), "x").unwrap();
        assert!(offered().iter().all(|t| t == "bad"));
        // Back to the last accepted text: it is never offered again (the rejected one may
        // still be, by events handled before the swap landed), not even after a later event.
        swap("..v4", "two");
        std::fs::write(d.join("..touch"), "y").unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let late: Vec<String> = rx.try_iter().collect();
        assert!(late.iter().all(|t| t == "bad"), "{late:?}");
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_file() {
        let e = watch(
            Path::new("/nonexistent/dir/roots.pem"),
            String::new(),
            |_| true,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("/nonexistent/dir/roots.pem"), "{e}");
    }
}
