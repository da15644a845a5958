//! Network namespaces: open them, check them, and run work inside them.
//!
//! This is the only place in the agent that calls `setns(2)`. Work for a
//! namespace runs on a dedicated OS thread that enters the namespace, runs the
//! closure and then exits. The thread is never reused, so whatever the closure
//! does (panic included) no runtime or pool thread is ever left in another
//! namespace, and the caller's thread never changes namespace at all.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// `ioctl(fd, NS_GET_NSTYPE)`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `NSFS_MAGIC` from `linux/magic.h`, for kernels without `NS_GET_NSTYPE`.
const NSFS_MAGIC: i64 = 0x6e73_6673;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open netns {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("cannot enter netns {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start a thread for netns {path}: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("work inside netns {path} panicked")]
    Panicked { path: PathBuf },
}

/// Which network namespace a handle is on: the (device, inode) pair of its
/// nsfs file (see [`Netns::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub inode: u64,
}

/// An open handle on a network namespace. Holding it keeps the namespace
/// alive even if its bind mount is removed.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/x` or
    /// `/proc/<pid>/ns/net`) and checks that it is a network namespace.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let fd: OwnedFd = file.into();
        if !is_netns(fd.as_fd()) {
            return Err(NetnsError::NotNetns { path });
        }
        Ok(Self { fd, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Wraps an fd received from elsewhere (checked to be a netns).
    pub fn from_fd(fd: OwnedFd, label: impl Into<PathBuf>) -> Result<Self, NetnsError> {
        let path = label.into();
        if !is_netns(fd.as_fd()) {
            return Err(NetnsError::NotNetns { path });
        }
        Ok(Self { fd, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Namespace identity (inode number), equal for two handles on the same
    /// namespace.
    pub fn inode(&self) -> std::io::Result<u64> {
        let st = nix::sys::stat::fstat(self.fd.as_fd()).map_err(std::io::Error::from)?;
        Ok(st.st_ino)
    }

    /// Namespace identity as upstream compares it: (device, inode) of the
    /// nsfs file. Equal for two handles on the same namespace.
    pub fn id(&self) -> std::io::Result<NetnsId> {
        let st = nix::sys::stat::fstat(self.fd.as_fd()).map_err(std::io::Error::from)?;
        Ok(NetnsId {
            dev: st.st_dev,
            inode: st.st_ino,
        })
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its
    /// result. Blocks the caller: use [`Netns::run_async`] from async code.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, || {
                    setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NetnsError::Enter {
                            path: self.path.clone(),
                            source,
                        }
                    })?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            handle.join().map_err(|_| NetnsError::Panicked {
                path: self.path.clone(),
            })?
        })
    }

    /// Like [`Netns::run`] but never blocks an async runtime thread: the work
    /// runs on its own thread and the caller awaits its result.
    pub async fn run_async<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.try_clone().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        let path = self.path.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                let _ = tx.send(ns.run(f));
            })
            .map_err(|source| NetnsError::Thread {
                path: path.clone(),
                source,
            })?;
        rx.await.map_err(|_| NetnsError::Panicked { path })?
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Netns {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// True when `fd` refers to a network namespace: `NS_GET_NSTYPE` must say
/// `CLONE_NEWNET`; where that ioctl is unavailable (kernels before 4.11), the
/// file must at least live on nsfs.
pub fn is_netns(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let ty = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if ty >= 0 {
        return ty == libc::CLONE_NEWNET;
    }
    match nix::sys::statfs::fstatfs(fd) {
        // nsfs answers ENOTTY only when the ioctl itself is unknown.
        Ok(st) => st.filesystem_type().0 == NSFS_MAGIC,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn can_unshare() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn current_is_a_netns_and_a_file_is_not() {
        let ns = Netns::current().expect("own netns");
        assert!(ns.inode().unwrap() > 0);
        let err = Netns::open("/proc/self/status").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        assert!(err.to_string().contains("/proc/self/status"));
        let err = Netns::open("/nonexistent/netns").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"));
        // a mount namespace is a namespace, but not a network one
        let err = Netns::open("/proc/self/ns/mnt").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }));
    }

    #[test]
    fn run_enters_the_namespace_and_leaves_the_caller_alone() {
        if !can_unshare() {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        let before = Netns::current().unwrap().inode().unwrap();
        // Create an anonymous namespace on a helper thread and keep an fd.
        let other = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            Netns::current().unwrap()
        })
        .join()
        .unwrap();
        let other_ino = other.inode().unwrap();
        assert_ne!(before, other_ino);
        let inside = other
            .run(|| Netns::current().unwrap().inode().unwrap())
            .unwrap();
        assert_eq!(inside, other_ino);
        assert_eq!(Netns::current().unwrap().inode().unwrap(), before);
        // a panic inside is reported, and the caller is unaffected
        let err = other.run(|| panic!("boom")).map(|_: ()| ()).unwrap_err();
        assert!(matches!(err, NetnsError::Panicked { .. }));
        assert_eq!(Netns::current().unwrap().inode().unwrap(), before);
    }

    #[tokio::test]
    async fn run_async_does_not_move_the_runtime_thread() {
        if !can_unshare() {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        let before = Netns::current().unwrap().inode().unwrap();
        let other = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            Netns::current().unwrap()
        })
        .join()
        .unwrap();
        let want = other.inode().unwrap();
        let got = other
            .run_async(|| Netns::current().unwrap().inode().unwrap())
            .await
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(Netns::current().unwrap().inode().unwrap(), before);
    }
}
