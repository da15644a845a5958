//! Named network namespaces, created and removed the way `ip netns add/del`
//! does it (in Rust, no `ip` command): a file under `/run/netns` with the
//! namespace bind-mounted onto it, `/run/netns` itself being a shared mount
//! point so the mount is visible to every mount namespace.
//!
//! Work inside a namespace goes through
//! [`node_agent::redirect::netns::Netns`], which runs it on a dedicated
//! thread; the caller's thread never changes namespace.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use node_agent::redirect::netns::Netns;

use super::error::{NetsimError, Result, io_err};
use super::process::{OWNER_ENV, configure_netns_command};

/// Where named namespaces live (iproute2's `NETNS_RUN_DIR`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A network namespace with a name under [`NETNS_RUN_DIR`].
///
/// Created ones (`owned`) are removed on drop: the bind mount is detached and
/// the file deleted. The namespace then disappears once no process, socket
/// or open handle refers to it any more (links inside it go with it; a veth
/// whose one end goes also loses the other end).
#[derive(Debug)]
pub struct NamedNetns {
    name: String,
    path: PathBuf,
    ns: Netns,
    /// Written into the environment of processes spawned here
    /// ([`OWNER_ENV`]), so leftovers of a killed run can be found.
    owner: Option<String>,
    owned: bool,
}

static RUN_DIR_SETUP: Mutex<bool> = Mutex::new(false);

/// Makes [`NETNS_RUN_DIR`] exist and be a shared mount point (as iproute2
/// does), so that namespace bind mounts propagate to all mount namespaces.
fn ensure_run_dir() -> Result<()> {
    let mut done = RUN_DIR_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir).map_err(io_err("-", format!("create {NETNS_RUN_DIR}")))?;
    let make_shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => {}
        // Not a mount point yet: bind it onto itself, then retry.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| NetsimError::Io {
                netns: "-".into(),
                action: format!("bind-mount {NETNS_RUN_DIR} onto itself"),
                source: e.into(),
            })?;
            make_shared().map_err(|e| NetsimError::Io {
                netns: "-".into(),
                action: format!("make {NETNS_RUN_DIR} a shared mount"),
                source: e.into(),
            })?;
        }
        Err(e) => {
            return Err(NetsimError::Io {
                netns: "-".into(),
                action: format!("make {NETNS_RUN_DIR} a shared mount"),
                source: e.into(),
            });
        }
    }
    *done = true;
    Ok(())
}

/// Checks a namespace name: non-empty, no `/`, not `.`/`..`.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || name.contains('/')
        || name == "."
        || name == ".."
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(NetsimError::Invalid(format!("invalid netns name {name:?}")));
    }
    Ok(())
}

impl NamedNetns {
    /// Creates `/run/netns/<name>` with a fresh network namespace behind it,
    /// with `lo` up. Fails if the name exists.
    ///
    /// `owner` is the scope prefix recorded in the environment of processes
    /// spawned through [`NamedNetns::command`] (see [`super::Scope`]).
    pub fn create(name: &str, owner: Option<&str>) -> Result<Self> {
        check_name(name)?;
        ensure_run_dir()?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(name, format!("create {}", path.display())))?;
        let mount_path = path.clone();
        let made = std::thread::Builder::new()
            .name("netns-create".into())
            .spawn(move || -> std::result::Result<(), (String, nix::Error)> {
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| ("unshare(CLONE_NEWNET)".into(), e))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &mount_path,
                    Some("none"),
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| (format!("bind-mount onto {}", mount_path.display()), e))
            })
            .map_err(io_err(name, "start netns-create thread"))?
            .join()
            .map_err(|_| NetsimError::Invalid(format!("netns {name}: creation thread panicked")))?;
        if let Err((action, e)) = made {
            let _ = std::fs::remove_file(&path);
            return Err(NetsimError::Io {
                netns: name.into(),
                action,
                source: e.into(),
            });
        }
        let ns = match Netns::open(&path) {
            Ok(ns) => ns,
            Err(e) => {
                remove_netns_file(&path);
                return Err(e.into());
            }
        };
        let this = Self {
            name: name.to_string(),
            path,
            ns,
            owner: owner.map(str::to_string),
            owned: true,
        };
        this.link_up("lo")?;
        Ok(this)
    }

    /// Opens an existing named namespace; it is not removed on drop.
    pub fn open(name: &str) -> Result<Self> {
        check_name(name)?;
        let path = Path::new(NETNS_RUN_DIR).join(name);
        let ns = Netns::open(&path)?;
        Ok(Self {
            name: name.to_string(),
            path,
            ns,
            owner: None,
            owned: false,
        })
    }

    /// The full name (file name under `/run/netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what CNI plugins get as `CNI_NETNS`, and what
    /// `ip netns exec <name>` uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace handle (the agent's type).
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Namespace identity (inode of the nsfs file).
    pub fn inode(&self) -> Result<u64> {
        self.ns
            .inode()
            .map_err(io_err(&self.name, "stat namespace"))
    }

    /// Runs `f` on a fresh thread inside this namespace (blocking the
    /// caller until it returns). Sockets created inside keep belonging to
    /// this namespace after `f` returns, wherever they are used.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        Ok(self.ns.run(f)?)
    }

    /// Like [`NamedNetns::run`], for async callers: does not block the
    /// runtime thread.
    pub async fn run_async<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        Ok(self.ns.run_async(f).await?)
    }

    /// A [`Command`] that runs `program` inside this namespace: the child
    /// enters the namespace before `exec` (with a private mount namespace
    /// where `/sys` shows this namespace's devices, as `ip netns exec`
    /// does), leads its own process group, and carries the scope marker in
    /// its environment. Spawn it yourself, or with
    /// [`super::Process::spawn`] to get kill-on-drop. For tokio, use
    /// `tokio::process::Command::from(cmd)`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // Holding an extra reference keeps the fd valid until the child
        // has called setns, whoever drops what in the meantime.
        let fd: Arc<OwnedFd> = Arc::new(
            self.ns
                .as_fd()
                .try_clone_to_owned()
                .expect("duplicate a netns fd"),
        );
        configure_netns_command(&mut cmd, fd);
        if let Some(owner) = &self.owner {
            cmd.env(OWNER_ENV, owner);
        }
        cmd
    }

    /// Writes a sysctl inside this namespace (`key` in dotted or slash form,
    /// e.g. `net.ipv4.ip_forward`).
    pub fn sysctl_set(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        let value = value.to_string();
        let p = path.clone();
        self.run(move || std::fs::write(&p, value))?
            .map_err(io_err(&self.name, format!("write {}", path.display())))
    }

    /// Reads a sysctl inside this namespace (trimmed).
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        let p = path.clone();
        let v = self
            .run(move || std::fs::read_to_string(&p))?
            .map_err(io_err(&self.name, format!("read {}", path.display())))?;
        Ok(v.trim().to_string())
    }

    /// Removes the namespace now (same as dropping an owned one: processes
    /// inside are killed).
    pub fn delete(mut self) {
        self.owned = true;
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.ns.as_raw_fd()
    }
}

impl Drop for NamedNetns {
    /// For an owned namespace: kills the processes living in it, then
    /// removes its file.
    fn drop(&mut self) {
        if self.owned {
            if let Ok(ino) = self.ns.inode() {
                let pids = super::process::pids_in_netns(&[ino].into_iter().collect());
                super::process::kill_all(&pids);
            }
            remove_netns_file(&self.path);
        }
    }
}

fn sysctl_path(key: &str) -> Result<PathBuf> {
    if key.is_empty() || key.contains("..") || key.starts_with('/') {
        return Err(NetsimError::Invalid(format!("invalid sysctl key {key:?}")));
    }
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    Ok(Path::new("/proc/sys").join(rel))
}

/// Detaches the bind mount at `path` and deletes the file. Missing files and
/// non-mounts are fine (idempotent).
pub(crate) fn remove_netns_file(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

/// Names of all entries under [`NETNS_RUN_DIR`] starting with `prefix`.
pub(crate) fn list_named(prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_map_to_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        assert!(sysctl_path("../etc/passwd").is_err());
        assert!(sysctl_path("/etc").is_err());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "..", ".", "a b"] {
            let err = check_name(bad).unwrap_err();
            assert!(err.to_string().contains("invalid netns name"), "{err}");
        }
        check_name("zt-1a2b-node1").unwrap();
    }
}
