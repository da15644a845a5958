//! Replacing a file so that readers see the old or the new content, never a
//! part: write `<name>.tmp.<pid>.<n>` in the same directory, fsync, rename.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Infix of temporary names; files carrying it are ours to clean up.
pub const TMP_INFIX: &str = ".tmp.";

/// Writes `content` to `path` atomically with permission bits `mode`.
pub fn write_atomically(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    copy_atomically(path, &mut &content[..], mode)
}

/// Streams `content` into `path` atomically with permission bits `mode`
/// (large files never sit in memory whole).
pub fn copy_atomically(
    path: &Path,
    content: &mut dyn std::io::Read,
    mode: u32,
) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        std::io::copy(content, &mut f)?;
        f.flush()?;
        // The mode given to open() is filtered by the umask; state it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!("{name}{TMP_INFIX}{}.{n}", std::process::id()))
}

/// Removes temporary files left next to `path` by an interrupted write.
pub fn remove_stale_tmp(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!("{}{TMP_INFIX}", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.conflist");
        write_atomically(&p, b"one", 0o644).unwrap();
        write_atomically(&p, b"two", 0o755).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn stale_tmp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("istio-cni");
        fs::write(dir.path().join("istio-cni.tmp.1.2"), b"x").unwrap();
        fs::write(dir.path().join("bridge"), b"x").unwrap();
        remove_stale_tmp(&p);
        assert!(!dir.path().join("istio-cni.tmp.1.2").exists());
        assert!(dir.path().join("bridge").exists());
    }
}
