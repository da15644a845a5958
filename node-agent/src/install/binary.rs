//! The plugin binary in the host's CNI bin dir(s).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::atomic_write::{remove_stale_tmp, write_atomically};

/// File name of the plugin in a CNI bin dir (the `type` in configs).
pub const PLUGIN_BINARY: &str = "istio-cni";

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("cannot read plugin binary {path}: {source}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install plugin binary {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove plugin binary {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Identity and version of an installed file: if it is unchanged, so is
/// the content we put there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Self> {
        let m = fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Keeps `<dir>/istio-cni` equal to `src`. Returns whether it wrote.
/// `known` remembers what was verified last time, so an untouched file
/// costs one `stat`.
pub fn ensure_binary(
    src: &Path,
    dir: &Path,
    known: &mut Option<Fingerprint>,
) -> Result<bool, BinaryError> {
    let dest = dir.join(PLUGIN_BINARY);
    let current = Fingerprint::of(&dest);
    if current.is_some() && current == *known {
        return Ok(false);
    }
    let wanted = fs::read(src).map_err(|source| BinaryError::ReadSource {
        path: src.to_path_buf(),
        source,
    })?;
    if current.is_some() && fs::read(&dest).ok().as_deref() == Some(wanted.as_slice()) {
        *known = current;
        return Ok(false);
    }
    remove_stale_tmp(&dest);
    write_atomically(&dest, &wanted, 0o755).map_err(|source| BinaryError::Write {
        path: dest.clone(),
        source,
    })?;
    *known = Fingerprint::of(&dest);
    Ok(true)
}

/// Removes `<dir>/istio-cni` (absent is fine).
pub fn remove_binary(dir: &Path) -> Result<bool, BinaryError> {
    let dest = dir.join(PLUGIN_BINARY);
    match fs::remove_file(&dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(BinaryError::Remove { path: dest, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn installs_once_and_repairs_changes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-bin");
        fs::write(&src, b"\x7fELF plugin v1").unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let mut known = None;
        assert!(ensure_binary(&src, &bin, &mut known).unwrap());
        let dest = bin.join(PLUGIN_BINARY);
        assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            !ensure_binary(&src, &bin, &mut known).unwrap(),
            "unchanged: no write"
        );

        fs::write(&dest, b"tampered").unwrap();
        assert!(ensure_binary(&src, &bin, &mut known).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF plugin v1");

        fs::remove_file(&dest).unwrap();
        assert!(ensure_binary(&src, &bin, &mut known).unwrap());
        assert!(dest.exists());

        // same content written by someone else: verified, not rewritten
        let mut fresh = None;
        assert!(!ensure_binary(&src, &bin, &mut fresh).unwrap());
        assert!(remove_binary(&bin).unwrap());
        assert!(!remove_binary(&bin).unwrap());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = ensure_binary(&dir.path().join("missing"), dir.path(), &mut None).unwrap_err();
        assert!(e.to_string().contains("missing"));
        let src = dir.path().join("src");
        fs::write(&src, b"x").unwrap();
        let e = ensure_binary(&src, &dir.path().join("no-such-dir"), &mut None).unwrap_err();
        assert!(e.to_string().contains("no-such-dir"));
    }
}
