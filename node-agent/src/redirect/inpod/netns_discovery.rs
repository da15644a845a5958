//! Finding a pod's network namespace without the CNI `Netns` path (agent
//! start-up): scan `/proc/<pid>/cgroup` for a process whose cgroup path names
//! the pod UID (`pod<uid>` with cgroupfs, `pod<uid_with_underscores>` with
//! systemd), and open that process' `ns/net`.
//!
//! Blocking (reads /proc): call it from a blocking thread.

use std::path::Path;

use crate::redirect::netns::Netns;

/// The netns of the first process in `proc_root` whose cgroup names pod
/// `uid`, skipping processes in `host_inode`'s netns (host-network
/// containers would give us the node's netns).
pub fn find_pod_netns(proc_root: &Path, uid: &str, host_inode: Option<u64>) -> Option<Netns> {
    if uid.is_empty() {
        return None;
    }
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    let entries = std::fs::read_dir(proc_root).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = proc_root.join(pid);
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        if !cgroup_names_pod(&cgroup, &dashed, &underscored) {
            continue;
        }
        let Ok(ns) = Netns::open(dir.join("ns/net")) else {
            continue;
        };
        if host_inode.is_some() && ns.inode().ok() == host_inode {
            continue;
        }
        return Some(ns);
    }
    None
}

fn cgroup_names_pod(cgroup: &str, dashed: &str, underscored: &str) -> bool {
    cgroup.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or(line);
        path.split('/').any(|seg| {
            let seg = seg.strip_suffix(".slice").unwrap_or(seg);
            seg == dashed || seg.split('-').any(|part| part == underscored)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_cgroupfs_and_systemd_paths() {
        let uid = "1b2c3d4e-0000-1111-2222-333344445555";
        let d = format!("pod{uid}");
        let u = format!("pod{}", uid.replace('-', "_"));
        let cgroupfs = format!("0::/kubepods/besteffort/{d}/0123abcd\n");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{u}.slice/cri-containerd-01.scope\n"
        );
        assert!(cgroup_names_pod(&cgroupfs, &d, &u));
        assert!(cgroup_names_pod(&systemd, &d, &u));
        assert!(!cgroup_names_pod(
            "0::/kubepods/besteffort/podother/x\n",
            &d,
            &u
        ));
        assert!(!cgroup_names_pod("0::/user.slice\n", &d, &u));
    }

    #[test]
    fn finds_a_netns_in_a_fake_proc() {
        let root = tempfile::tempdir().unwrap();
        let uid = "aaaa-bbbb";
        let pid = root.path().join("4242");
        std::fs::create_dir_all(pid.join("ns")).unwrap();
        std::fs::write(pid.join("cgroup"), "0::/kubepods/podaaaa-bbbb/c1\n").unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", pid.join("ns/net")).unwrap();
        let ns = find_pod_netns(root.path(), uid, None).expect("found");
        assert_eq!(
            ns.inode().unwrap(),
            Netns::current().unwrap().inode().unwrap()
        );
        // the host's own netns is skipped
        let host = Netns::current().unwrap().inode().ok();
        assert!(find_pod_netns(root.path(), uid, host).is_none());
        assert!(find_pod_netns(root.path(), "other", None).is_none());
    }
}
