//! Pod cgroups, so that a pod's processes can be found the way a node
//! agent finds them on a real node: `/proc/<pid>/cgroup` names
//! `…/kubepods/pod<uid>/<container>` (cgroupfs driver layout).
//!
//! The directories live under `<hierarchy>/<scope prefix>/<node>/kubepods/…` in
//! one writable hierarchy (cgroup v1 `pids`, else v2), are removed when the
//! pod goes, and leftovers of killed runs are swept by [`sweep_stale`]
//! (a prefix whose scope record under `/run/netsim` is gone). Without a
//! writable hierarchy (e.g. inside the test VM) pods simply get no cgroup
//! and agents find their netns through the CNI records only.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::netsim::REGISTRY_DIR;

/// Candidate hierarchies, in order of preference.
const HIERARCHIES: [&str; 3] = [
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup",
];

/// A writable hierarchy where we may create directories, if any.
pub fn hierarchy() -> Option<PathBuf> {
    HIERARCHIES.iter().map(PathBuf::from).find(|p| {
        p.join("cgroup.procs").exists() && {
            let probe = p.join(format!(".kubelet-lite-probe-{}", std::process::id()));
            let ok = std::fs::create_dir(&probe).is_ok();
            let _ = std::fs::remove_dir(&probe);
            ok
        }
    })
}

/// The cgroup tree of one node's pods.
pub fn node_dir(hierarchy: &Path, prefix: &str, node: &str) -> PathBuf {
    hierarchy.join(prefix).join(node).join("kubepods")
}

/// The cgroup directory of a pod.
pub fn pod_dir(hierarchy: &Path, prefix: &str, node: &str, uid: &str) -> PathBuf {
    node_dir(hierarchy, prefix, node).join(format!("pod{uid}"))
}

/// Creates `dir` and moves `pid` into it.
pub fn join(dir: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// Sub-directories of `dir`, deepest first, then `dir` itself.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

/// Kills what is left in `dir` and below and removes the directories
/// (deepest first; waits briefly for killed processes to leave).
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for d in walk(dir) {
        loop {
            let pids: Vec<i32> = std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            for p in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if std::fs::remove_dir(&d).is_ok() || !d.exists() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Removes cgroup trees `<hierarchy>/<tag>-<hex>` whose scope is gone
/// (no record `/run/netsim/<prefix>`). Call after the scope's own stale
/// clean-up.
pub fn sweep_stale(tag: &str) -> Vec<PathBuf> {
    let Some(h) = hierarchy() else {
        return Vec::new();
    };
    let start = format!("{tag}-");
    let mut removed = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&h) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_prefix(&start) else {
                continue;
            };
            if hex.len() != 4 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            if Path::new(REGISTRY_DIR).join(&name).exists() {
                continue;
            }
            remove_tree(&e.path());
            removed.push(e.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dirs_name_the_pod_like_cgroupfs() {
        let d = pod_dir(Path::new("/sys/fs/cgroup/pids"), "sc-1a2b", "node1", "u-1").join("app");
        assert_eq!(
            d,
            Path::new("/sys/fs/cgroup/pids/sc-1a2b/node1/kubepods/podu-1/app")
        );
    }
}
