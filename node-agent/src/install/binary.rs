//! The plugin binary in the host's CNI bin dir(s).

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::atomic_write::{copy_atomically, remove_stale_tmp};

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
    let read_err = |source| BinaryError::ReadSource {
        path: src.to_path_buf(),
        source,
    };
    if current.is_some() && same_content(src, &dest).map_err(read_err)? {
        *known = current;
        return Ok(false);
    }
    remove_stale_tmp(&dest);
    let mut source = File::open(src).map_err(read_err)?;
    copy_atomically(&dest, &mut source, 0o755).map_err(|source| BinaryError::Write {
        path: dest.clone(),
        source,
    })?;
    *known = Fingerprint::of(&dest);
    Ok(true)
}

/// Compares two files chunk by chunk (the plugin is tens of MB: never read
/// it whole). An unreadable `dest` counts as different; an unreadable `src`
/// is an error.
fn same_content(src: &Path, dest: &Path) -> std::io::Result<bool> {
    let mut a = File::open(src)?;
    let Ok(mut b) = File::open(dest) else {
        return Ok(false);
    };
    if a.metadata()?.len() != b.metadata().map(|m| m.len()).unwrap_or(u64::MAX) {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut a, &mut ba)?;
        let m = match read_full(&mut b, &mut bb) {
            Ok(m) => m,
            Err(_) => return Ok(false),
        };
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn large_binaries_compare_by_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-bin");
        let mut content = vec![7u8; 300 * 1024 + 17];
        fs::write(&src, &content).unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let mut known = None;
        assert!(ensure_binary(&src, &bin, &mut known).unwrap());
        let dest = bin.join(PLUGIN_BINARY);
        assert_eq!(fs::read(&dest).unwrap(), content);
        // same length, one byte different in the last chunk: rewritten
        let last = content.len() - 1;
        content[last] = 8;
        fs::write(&dest, &content).unwrap();
        let mut fresh = None;
        assert!(ensure_binary(&src, &bin, &mut fresh).unwrap());
        assert_eq!(fs::read(&dest).unwrap()[last], 7);
        // identical: verified, not rewritten
        let mut again = None;
        assert!(!ensure_binary(&src, &bin, &mut again).unwrap());
    }

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
