//! Processes inside simulated namespaces: how a [`Command`] enters a netns,
//! a kill-on-drop guard, run-with-timeout, and the `/proc` scans that find
//! leftovers.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::error::{NetsimError, Result};

/// Environment variable carrying the owning scope's prefix in every process
/// spawned through [`super::NamedNetns::command`]; [`super::cleanup_stale`]
/// uses it to find processes of a killed run.
pub const OWNER_ENV: &str = "NETSIM_OWNER";

/// Adds the namespace switch to `cmd`: in the child, after `fork` and before
/// `exec`, `setns(fd, CLONE_NEWNET)`; then a private mount namespace with
/// `/sys` remounted so it describes the new network namespace (like `ip
/// netns exec`; failures of that part are ignored); and a new process group
/// so the whole tree can be signalled.
pub(crate) fn configure_netns_command(cmd: &mut Command, fd: Arc<OwnedFd>) {
    // Everything the child needs is prepared here: between fork and exec
    // only async-signal-safe calls are allowed (no allocation).
    let root = CString::new("/").unwrap();
    let sys = CString::new("/sys").unwrap();
    let sysfs = CString::new("sysfs").unwrap();
    cmd.process_group(0);
    // SAFETY: the closure only makes raw system calls on values prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::unshare(libc::CLONE_NEWNS) == 0 {
                libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_SLAVE | libc::MS_REC,
                    std::ptr::null(),
                );
                libc::umount2(sys.as_ptr(), libc::MNT_DETACH);
                libc::mount(
                    sysfs.as_ptr(),
                    sys.as_ptr(),
                    sysfs.as_ptr(),
                    0,
                    std::ptr::null(),
                );
            }
            Ok(())
        });
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args().take(4) {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A spawned process that is terminated (its whole process group: SIGTERM,
/// then SIGKILL after a grace period) when dropped.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
    label: String,
    grace: Duration,
}

impl Process {
    /// Spawns `cmd` (usually from [`super::NamedNetns::command`]).
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let label = describe(&cmd);
        let child = cmd.spawn().map_err(|source| NetsimError::Io {
            netns: "-".into(),
            action: format!("spawn {label}"),
            source,
        })?;
        Ok(Self {
            child: Some(child),
            label,
            grace: Duration::from_secs(2),
        })
    }

    /// How long [`Drop`] waits after SIGTERM before SIGKILL (default 2 s).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The program and first arguments, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The underlying child (for its piped stdio, `try_wait` ...).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("process already released")
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Sends `sig` to the process group (to the process alone when it does
    /// not lead a group, e.g. a [`Command`] not made by
    /// [`super::NamedNetns::command`]).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid() as i32;
        signal_group(pid, sig).map_err(|e| NetsimError::Io {
            netns: "-".into(),
            action: format!("send {sig} to {} (pid {pid})", self.label),
            source: e.into(),
        })
    }

    /// Waits up to `timeout` for the exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(self.child(), timeout)
    }

    /// SIGTERM to the group, wait up to `grace`, then SIGKILL; returns the
    /// exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = child.id() as i32;
        if let Ok(Some(st)) = child.try_wait() {
            // The leader is gone; children in its group may remain.
            let _ = signal_group(pid, Signal::SIGKILL);
            return Some(st);
        }
        let _ = signal_group(pid, Signal::SIGTERM);
        if let Some(st) = wait_child(child, grace) {
            let _ = signal_group(pid, Signal::SIGKILL);
            return Some(st);
        }
        let _ = signal_group(pid, Signal::SIGKILL);
        wait_child(child, Duration::from_secs(5))
    }

    /// Releases the child without killing it.
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("process already released")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate(self.grace);
        }
    }
}

/// `killpg(pid)`, or `kill(pid)` when `pid` leads no group. Never signals
/// pid 0 or our own group.
fn signal_group(pid: i32, sig: Signal) -> nix::Result<()> {
    if pid <= 0 {
        return Err(nix::errno::Errno::ESRCH);
    }
    match killpg(Pid::from_raw(pid), sig) {
        Err(nix::errno::Errno::ESRCH) => nix::sys::signal::kill(Pid::from_raw(pid), sig),
        other => other,
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `cmd` to completion with captured stdout/stderr; kills it (and its
/// group) when it runs longer than `timeout` and reports that as an error
/// naming the command.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let label = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = Process::spawn(cmd)?;
    let mut out = p.child().stdout.take().expect("piped stdout");
    let mut err = p.child().stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = p.wait_timeout(timeout);
    let status = match status {
        Some(st) => st,
        None => {
            p.terminate(Duration::from_millis(200));
            let stderr = t_err.join().unwrap_or_default();
            return Err(NetsimError::Invalid(format!(
                "{label}: still running after {timeout:?}, killed; stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
    };
    // The leader exited; dropping the guard also kills what is left of its
    // group, so nothing holds the pipes open.
    drop(p);
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Formats a failed [`Output`] for error messages.
pub fn describe_failure(what: &str, out: &Output) -> String {
    let code = match out.status.code() {
        Some(c) => format!("exit code {c}"),
        None => format!("signal {:?}", out.status.signal()),
    };
    format!(
        "{what}: {code}; stdout: {}; stderr: {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// All pids in `/proc` except our own.
fn all_pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|&p| p != me)
        .collect()
}

/// The value of [`OWNER_ENV`] in a process's environment, if any.
fn owner_of(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{OWNER_ENV}=");
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(key.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Pids whose owner marker satisfies `pred`.
pub(crate) fn pids_with_owner(pred: impl Fn(&str) -> bool) -> Vec<(i32, String)> {
    all_pids()
        .into_iter()
        .filter_map(|p| owner_of(p).filter(|o| pred(o)).map(|o| (p, o)))
        .collect()
}

/// Pids whose network namespace is one of `inodes`.
pub(crate) fn pids_in_netns(inodes: &HashSet<u64>) -> Vec<i32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    all_pids()
        .into_iter()
        .filter(|p| {
            nix::sys::stat::stat(format!("/proc/{p}/ns/net").as_str())
                .map(|st| inodes.contains(&st.st_ino))
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILLs `pids` and waits (briefly) until they are gone.
pub(crate) fn kill_all(pids: &[i32]) {
    for &p in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for &p in pids {
        let ns = format!("/proc/{p}/ns/net");
        while nix::sys::stat::stat(ns.as_str()).is_ok() && Instant::now() < deadline {
            // (a zombie has no namespaces any more: it counts as gone, and
            // whoever holds its `Child` can still collect the status)
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl super::NamedNetns {
    /// Runs `program args...` inside this namespace to completion (killed
    /// after `timeout`) and returns its output, whatever the exit code.
    pub fn output<I, S>(&self, program: &str, args: I, timeout: Duration) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        output_with_timeout(cmd, timeout).map_err(|e| match e {
            NetsimError::Invalid(m) => NetsimError::Invalid(format!("netns {}: {m}", self.name())),
            NetsimError::Io { action, source, .. } => NetsimError::Io {
                netns: self.name().to_string(),
                action,
                source,
            },
            other => other,
        })
    }

    /// Like [`NamedNetns::output`] but fails unless the exit code is 0;
    /// returns stdout.
    pub fn exec<I, S>(&self, program: &str, args: I, timeout: Duration) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.output(program, &args, timeout)?;
        if !out.status.success() {
            let mut what = format!("netns {}: {program}", self.name());
            for a in &args {
                what.push(' ');
                what.push_str(&a.to_string_lossy());
            }
            return Err(NetsimError::Invalid(describe_failure(&what, &out)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Spawns `program args...` in this namespace with kill-on-drop;
    /// stdout/stderr go to `log` (appended) when given, else are discarded.
    pub fn spawn<I, S>(
        &self,
        program: &str,
        args: I,
        log: Option<&std::path::Path>,
    ) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(super::error::io_err(
                        self.name(),
                        format!("open log {}", path.display()),
                    ))?;
                let f2 = f.try_clone().map_err(super::error::io_err(
                    self.name(),
                    format!("dup log {}", path.display()),
                ))?;
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        Process::spawn(cmd).map_err(|e| match e {
            NetsimError::Io { action, source, .. } => NetsimError::Io {
                netns: self.name().to_string(),
                action,
                source,
            },
            other => other,
        })
    }
}
