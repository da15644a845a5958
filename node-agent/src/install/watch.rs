//! The repair loop: a reconcile pass after every change in the watched dirs
//! (inotify via `notify`) and at least every `resync_interval`.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Installer;

/// Events usually come in bursts (write temp, rename, remove): wait this
/// long after the first one before looking.
const DEBOUNCE: Duration = Duration::from_millis(20);

pub(super) async fn run(installer: Arc<Installer>, shutdown: impl Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = match notify::recommended_watcher(move |ev: notify::Result<Event>| {
        if ev.as_ref().map(is_change).unwrap_or(true) {
            // Full channel: a pass is already pending, which covers this one.
            let _ = tx.try_send(());
        }
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch CNI dirs; checking on the resync interval only");
            None
        }
    };
    let cfg = installer.config();
    let dirs: Vec<PathBuf> = [
        Some(&cfg.bin_dir),
        cfg.secondary_bin_dir.as_ref(),
        Some(&cfg.conf_dir),
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    let mut watched: HashMap<PathBuf, u64> = HashMap::new();
    let resync = cfg.resync_interval;
    // Without a watcher its sender is gone: the channel is closed from the start.
    let mut events_open = watcher.is_some();
    tokio::pin!(shutdown);
    loop {
        if let Some(w) = watcher.as_mut() {
            refresh_watches(w, &dirs, &mut watched);
        }
        let inst = installer.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || inst.reconcile()).await {
            tracing::error!(error = %e, "CNI install pass panicked");
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = next_pass(&mut rx, &mut events_open, resync) => {}
        }
    }
}

/// Waits for the next pass: a change event (debounced) or `resync`. A closed event
/// channel (no watcher, or its thread gone) leaves only the resync — polling a closed
/// channel would run a pass every `DEBOUNCE`.
async fn next_pass(rx: &mut mpsc::Receiver<()>, events_open: &mut bool, resync: Duration) {
    tokio::select! {
        ev = rx.recv(), if *events_open => match ev {
            Some(()) => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
            None => {
                tracing::warn!("CNI dir watch stopped; checking on the resync interval only");
                *events_open = false;
                tokio::time::sleep(resync).await;
            }
        },
        _ = tokio::time::sleep(resync) => {}
    }
}

/// Watches each dir that exists; re-watches one that was replaced (a
/// removed dir takes its inotify watch with it).
fn refresh_watches(w: &mut impl Watcher, dirs: &[PathBuf], watched: &mut HashMap<PathBuf, u64>) {
    for dir in dirs {
        let ino = std::fs::metadata(dir).ok().map(|m| m.ino());
        match (ino, watched.get(dir).copied()) {
            (Some(now), Some(was)) if now == was => {}
            (Some(now), was) => {
                if was.is_some() {
                    let _ = w.unwatch(dir);
                }
                match w.watch(dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        watched.insert(dir.clone(), now);
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch dir");
                        watched.remove(dir);
                    }
                }
            }
            (None, Some(_)) => {
                let _ = w.unwatch(dir);
                watched.remove(dir);
            }
            (None, None) => {}
        }
    }
}

/// Opens and reads (ours included) are not changes.
fn is_change(ev: &Event) -> bool {
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    #[tokio::test]
    async fn a_closed_event_channel_waits_for_the_resync() {
        let resync = Duration::from_millis(300);
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut open = true;
        tx.try_send(()).unwrap();
        let t = std::time::Instant::now();
        next_pass(&mut rx, &mut open, resync).await;
        assert!(
            t.elapsed() < resync,
            "an event starts a pass after the debounce"
        );
        drop(tx);
        for _ in 0..2 {
            let t = std::time::Instant::now();
            next_pass(&mut rx, &mut open, resync).await;
            assert!(t.elapsed() >= resync, "closed channel: {:?}", t.elapsed());
        }
        assert!(!open);
        // No watcher at all: the same.
        let (_, mut rx) = mpsc::channel::<()>(1);
        let mut open = false;
        let t = std::time::Instant::now();
        next_pass(&mut rx, &mut open, resync).await;
        assert!(t.elapsed() >= resync);
    }

    #[test]
    fn reads_are_not_changes() {
        assert!(!is_change(&Event::new(EventKind::Access(
            AccessKind::Open(AccessMode::Any)
        ))));
        assert!(!is_change(&Event::new(EventKind::Access(
            AccessKind::Close(AccessMode::Read)
        ))));
        assert!(is_change(&Event::new(EventKind::Access(
            AccessKind::Close(AccessMode::Write)
        ))));
        assert!(is_change(&Event::new(EventKind::Create(CreateKind::File))));
        assert!(is_change(&Event::new(EventKind::Modify(ModifyKind::Any))));
    }
}
