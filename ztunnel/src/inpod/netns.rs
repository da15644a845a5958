//! Pod network namespaces received over ZDS, and the one place in ztunnel
//! that enters them.
//!
//! [`NetnsExecutor`] owns a dedicated OS thread that does nothing but enter a
//! namespace (`setns`) and run a short closure there (create a socket). It is
//! never a runtime thread and never runs anything else, so no task can ever
//! find itself in the wrong namespace; it is cheap enough for per-connection
//! outbound sockets (a channel round trip plus `setns` when the namespace
//! changes).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use nix::sched::{CloneFlags, setns};

/// `ioctl(fd, NS_GET_NSTYPE)`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// `NSFS_MAGIC` from `linux/magic.h`.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// True when `fd` is a network namespace: `NS_GET_NSTYPE` must answer
/// `CLONE_NEWNET`; where that ioctl does not exist (ENOTTY on kernels before
/// 4.11), the file must at least be on nsfs. (Kernels before 3.19 kept
/// namespace files on procfs; accepting procfs would accept any /proc file,
/// so they are not supported.)
pub fn is_netns(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: NS_GET_NSTYPE takes no argument and only inspects the fd.
    let ty = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if ty >= 0 {
        return ty == libc::CLONE_NEWNET;
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOTTY) {
        return false;
    }
    match nix::sys::statfs::fstatfs(fd) {
        Ok(st) => st.filesystem_type().0 == NSFS_MAGIC,
        Err(_) => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("fd is not a network namespace")]
    NotNetns,
    #[error("fstat of netns fd: {0}")]
    Stat(#[source] nix::Error),
    #[error("entering netns {inode}: {source}")]
    Enter {
        inode: u64,
        #[source]
        source: nix::Error,
    },
    #[error("netns worker thread: {0}")]
    Worker(String),
}

/// A workload's network namespace (validated), identified by its inode.
#[derive(Debug)]
pub struct InpodNetns {
    fd: OwnedFd,
    inode: u64,
}

impl InpodNetns {
    /// Takes ownership of `fd` after checking it is a network namespace (the
    /// fd is closed when it is not).
    pub fn new(fd: OwnedFd) -> Result<Self, NetnsError> {
        if !is_netns(fd.as_fd()) {
            return Err(NetnsError::NotNetns);
        }
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(NetnsError::Stat)?;
        Ok(Self {
            fd,
            inode: st.st_ino,
        })
    }

    /// The calling thread's network namespace.
    pub fn current() -> std::io::Result<Self> {
        let f = std::fs::File::open("/proc/thread-self/ns/net")?;
        Self::new(f.into()).map_err(std::io::Error::other)
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }
}

impl AsFd for InpodNetns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A dedicated thread that runs closures inside a given netns.
pub struct NetnsExecutor {
    tx: std::sync::Mutex<mpsc::Sender<(Arc<InpodNetns>, Job)>>,
}

impl NetnsExecutor {
    /// The process-wide executor (its thread starts on first use).
    pub fn global() -> &'static NetnsExecutor {
        static EXEC: OnceLock<NetnsExecutor> = OnceLock::new();
        EXEC.get_or_init(NetnsExecutor::start)
    }

    fn start() -> Self {
        let (tx, rx) = mpsc::channel::<(Arc<InpodNetns>, Job)>();
        // The thread's own (home) netns: it returns there whenever the queue
        // is empty, so it never keeps a deleted pod's netns alive.
        let home = std::fs::File::open("/proc/thread-self/ns/net").map(OwnedFd::from);
        std::thread::Builder::new()
            .name("ztunnel-netns".into())
            .spawn(move || {
                let home = match home {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        tracing::warn!(error = %e, "netns thread: cannot open its own netns");
                        None
                    }
                };
                let mut current: Option<u64> = None;
                let mut next = rx.recv().ok();
                while let Some((ns, job)) = next.take() {
                    if current != Some(ns.inode) {
                        if let Err(e) = setns(ns.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
                            // The job's result channel is dropped with it:
                            // the caller sees a worker error.
                            tracing::error!(inode = ns.inode, error = %e, "setns failed");
                            current = None;
                        } else {
                            current = Some(ns.inode);
                        }
                    }
                    if current == Some(ns.inode) {
                        // A panic inside would kill this thread; contain it.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    } else {
                        drop(job);
                    }
                    drop(ns);
                    next = match rx.try_recv() {
                        Ok(item) => Some(item),
                        Err(mpsc::TryRecvError::Empty) => {
                            if let Some(h) = &home
                                && current.is_some()
                                && setns(h.as_fd(), CloneFlags::CLONE_NEWNET).is_ok()
                            {
                                current = None;
                            }
                            rx.recv().ok()
                        }
                        Err(mpsc::TryRecvError::Disconnected) => None,
                    };
                }
            })
            .expect("spawning the netns thread");
        Self {
            tx: std::sync::Mutex::new(tx),
        }
    }

    /// Runs `f` inside `ns` on the executor thread and returns its result.
    pub async fn run<T, F>(&self, ns: &Arc<InpodNetns>, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = rtx.send(f());
        });
        self.tx
            .lock()
            .map_err(|_| NetnsError::Worker("executor lock poisoned".into()))?
            .send((ns.clone(), job))
            .map_err(|_| NetnsError::Worker("executor thread gone".into()))?;
        rrx.await.map_err(|_| {
            NetnsError::Worker(format!(
                "work in netns {} did not complete (setns failed or it panicked)",
                ns.inode
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_check() {
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        assert!(is_netns(f.as_fd()));
        let f = std::fs::File::open("/proc/self/ns/mnt").unwrap();
        assert!(!is_netns(f.as_fd()));
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!is_netns(f.as_fd()));
        assert!(matches!(
            InpodNetns::new(f.into()),
            Err(NetnsError::NotNetns)
        ));
    }

    #[tokio::test]
    async fn executor_runs_inside_the_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        let here = InpodNetns::current().unwrap().inode();
        let other = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            InpodNetns::current().unwrap()
        })
        .join()
        .unwrap();
        let other = Arc::new(other);
        let want = other.inode();
        let got = NetnsExecutor::global()
            .run(&other, || InpodNetns::current().unwrap().inode())
            .await
            .unwrap();
        assert_eq!(got, want);
        assert_ne!(got, here);
        assert_eq!(InpodNetns::current().unwrap().inode(), here);
        // a panic is contained and reported; the executor keeps working
        let r = NetnsExecutor::global()
            .run(&other, || -> u64 { panic!("boom") })
            .await;
        assert!(r.is_err());
        let again = NetnsExecutor::global()
            .run(&other, || InpodNetns::current().unwrap().inode())
            .await
            .unwrap();
        assert_eq!(again, want);
    }
}
