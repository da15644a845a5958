//! Per-test naming and clean-up.
//!
//! A [`Scope`] owns a unique prefix `<tag>-<4 hex>` (e.g. `zt-3fa9`). Every
//! named namespace it creates is `/run/netns/<prefix>-<name>`; nothing else
//! is created in the root namespace (links, bridges and addresses live
//! inside those namespaces and disappear with them). Processes spawned in
//! its namespaces carry `NETSIM_OWNER=<prefix>` in their environment.
//!
//! A small record `/run/netsim/<prefix>` holds the owning process's pid and
//! start time, so that [`cleanup_stale`] can tell leftovers of a killed run
//! (owner dead) from a scope of a test that is still running (owner alive),
//! even when two test binaries use the same tag at the same time.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::error::{NetsimError, Result, io_err};
use super::namespace::{NETNS_RUN_DIR, NamedNetns, list_named, remove_netns_file};
use super::process::{kill_all, pids_in_netns, pids_with_owner};

/// Directory of scope records and per-scope scratch directories.
pub const REGISTRY_DIR: &str = "/run/netsim";

/// Set to `1` to keep a scope's scratch directory (logs) after clean-up.
pub const KEEP_ENV: &str = "NETSIM_KEEP";

/// A unique per-test prefix; removes everything created under it on drop.
#[derive(Debug)]
pub struct Scope {
    tag: String,
    prefix: String,
    record: PathBuf,
    dir: PathBuf,
}

/// Checks a tag: 1–12 characters of `[a-z0-9]`.
fn check_tag(tag: &str) -> Result<()> {
    if tag.is_empty()
        || tag.len() > 12
        || !tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(NetsimError::Invalid(format!(
            "invalid scope tag {tag:?}: use 1-12 characters of [a-z0-9]"
        )));
    }
    Ok(())
}

/// Start time (clock ticks since boot) of `pid`, field 22 of its stat.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// True when the record at `path` names a process that is still running.
fn owner_alive(path: &Path) -> bool {
    let Ok(s) = std::fs::read_to_string(path) else {
        return false;
    };
    let mut it = s.split_whitespace();
    let (Some(pid), Some(start)) = (
        it.next().and_then(|p| p.parse::<u32>().ok()),
        it.next().and_then(|p| p.parse::<u64>().ok()),
    ) else {
        return false;
    };
    start_time(pid) == Some(start)
}

fn random_suffix() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut x =
        (std::process::id() as u64) << 32 ^ nanos as u64 ^ (n as u64).wrapping_mul(0x9e37_79b9);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((x ^ (x >> 31)) & 0xffff) as u32
}

impl Scope {
    /// Cleans up leftovers of earlier runs with the same `tag`
    /// ([`cleanup_stale`]), then claims a fresh unique prefix.
    ///
    /// Use one tag per test (e.g. `nsim1`); tags are 1–12 of `[a-z0-9]`.
    pub fn new(tag: &str) -> Result<Self> {
        check_tag(tag)?;
        cleanup_stale(tag)?;
        std::fs::create_dir_all(REGISTRY_DIR)
            .map_err(io_err("-", format!("create {REGISTRY_DIR}")))?;
        let me = std::process::id();
        let start = start_time(me).unwrap_or(0);
        for _ in 0..64 {
            let prefix = format!("{tag}-{:04x}", random_suffix());
            let record = Path::new(REGISTRY_DIR).join(&prefix);
            // The record appears atomically with its content (a hard link
            // of a filled temporary file), so a concurrent cleanup_stale
            // never sees an empty record and takes the scope for dead.
            let tmp = Path::new(REGISTRY_DIR).join(format!(".{prefix}.{me}.tmp"));
            std::fs::write(&tmp, format!("{me} {start}\n"))
                .map_err(io_err("-", format!("write {}", tmp.display())))?;
            let linked = std::fs::hard_link(&tmp, &record);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("-", format!("create {}", record.display()))(e)),
            }
            // A leftover namespace with this prefix but no record: take another.
            if !list_named(&format!("{prefix}-")).is_empty() {
                let _ = std::fs::remove_file(&record);
                continue;
            }
            let dir = Path::new(REGISTRY_DIR).join(format!("{prefix}.d"));
            std::fs::create_dir_all(&dir)
                .map_err(io_err("-", format!("create {}", dir.display())))?;
            return Ok(Self {
                tag: tag.to_string(),
                prefix,
                record,
                dir,
            });
        }
        Err(NetsimError::Invalid(format!(
            "scope {tag}: no free prefix after 64 attempts"
        )))
    }

    /// `<tag>-<hex>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Full namespace name for `name`: `<prefix>-<name>`.
    pub fn netns_name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Creates the named namespace `<prefix>-<name>` (removed on drop of the
    /// returned value, and in any case when the scope is cleaned up).
    pub fn create_netns(&self, name: &str) -> Result<NamedNetns> {
        NamedNetns::create(&self.netns_name(name), Some(&self.prefix))
    }

    /// A scratch directory for this scope (`/run/netsim/<prefix>.d`): logs,
    /// CNI IPAM state, config files. Removed on clean-up unless
    /// `NETSIM_KEEP=1`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills this scope's processes and removes its namespaces now. The
    /// scope stays usable.
    pub fn cleanup(&self) {
        cleanup_prefix(&self.prefix);
    }

    /// Names of this scope's namespaces that exist now.
    pub fn remaining_netns(&self) -> Vec<String> {
        list_named(&format!("{}-", self.prefix))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        cleanup_prefix(&self.prefix);
        if std::env::var(KEEP_ENV).as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

/// Kills every process marked with `prefix` or living in one of its
/// namespaces, then removes its namespace files.
fn cleanup_prefix(prefix: &str) {
    let names = list_named(&format!("{prefix}-"));
    let mut inodes = HashSet::new();
    for n in &names {
        if let Ok(st) = nix::sys::stat::stat(Path::new(NETNS_RUN_DIR).join(n).as_path()) {
            inodes.insert(st.st_ino);
        }
    }
    let mut pids: Vec<i32> = pids_with_owner(|o| o == prefix)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    pids.extend(pids_in_netns(&inodes));
    pids.sort_unstable();
    pids.dedup();
    kill_all(&pids);
    for n in names {
        remove_netns_file(&Path::new(NETNS_RUN_DIR).join(n));
    }
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleReport {
    pub prefixes: Vec<String>,
    pub netns: Vec<String>,
    pub processes: Vec<i32>,
}

/// Removes leftovers of earlier runs that used `tag` and whose owning
/// process is gone: their processes (by the `NETSIM_OWNER` marker or by
/// living in their namespaces), namespace files, scratch directories and
/// records. Scopes whose owner still runs are left alone. Called by
/// [`Scope::new`]; callable directly (e.g. from a clean-up script).
pub fn cleanup_stale(tag: &str) -> Result<StaleReport> {
    check_tag(tag)?;
    let start = format!("{tag}-");
    let is_prefix = |s: &str| {
        s.strip_prefix(&start)
            .is_some_and(|h| h.len() == 4 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let prefix_of = |name: &str| -> Option<String> {
        let p = name.get(..start.len() + 4)?;
        is_prefix(p).then(|| p.to_string())
    };
    let alive = |prefix: &str| owner_alive(&Path::new(REGISTRY_DIR).join(prefix));

    let mut stale: HashSet<String> = HashSet::new();
    if let Ok(rd) = std::fs::read_dir(REGISTRY_DIR) {
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = name.strip_suffix(".d").unwrap_or(&name).to_string();
            if is_prefix(&p) && !alive(&p) {
                stale.insert(p);
            }
        }
    }
    for n in list_named(&start) {
        if let Some(p) = prefix_of(&n)
            && !alive(&p)
        {
            stale.insert(p);
        }
    }
    let mut report = StaleReport::default();
    // Marked processes of dead owners, even if their namespace is gone.
    for (pid, owner) in pids_with_owner(|o| is_prefix(o)) {
        if !alive(&owner) {
            report.processes.push(pid);
            stale.insert(owner);
        }
    }
    kill_all(&report.processes);
    let mut stale: Vec<String> = stale.into_iter().collect();
    stale.sort();
    for p in &stale {
        report.netns.extend(list_named(&format!("{p}-")));
        cleanup_prefix(p);
        let _ = std::fs::remove_dir_all(Path::new(REGISTRY_DIR).join(format!("{p}.d")));
        let _ = std::fs::remove_file(Path::new(REGISTRY_DIR).join(p));
    }
    report.prefixes = stale;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked() {
        for bad in ["", "Zt", "a-b", "abcdefghijklm", "a/b"] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
        check_tag("nsim1").unwrap();
    }

    #[test]
    fn own_process_is_alive_and_a_bogus_record_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("r");
        let me = std::process::id();
        std::fs::write(&rec, format!("{me} {}\n", start_time(me).unwrap())).unwrap();
        assert!(owner_alive(&rec));
        std::fs::write(&rec, format!("{me} 1\n")).unwrap();
        assert!(!owner_alive(&rec), "start time mismatch means pid reuse");
        std::fs::write(&rec, "garbage").unwrap();
        assert!(!owner_alive(&rec));
        assert!(!owner_alive(&dir.path().join("missing")));
    }
}
