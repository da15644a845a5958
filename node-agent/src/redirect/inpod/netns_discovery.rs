//! Finding a pod's network namespace without the CNI `Netns` path (agent
//! start-up): scan `/proc/<pid>/cgroup` for a process whose cgroup path names
//! the pod UID (`pod<uid>` with cgroupfs, `pod<uid_with_underscores>` with
//! systemd), and open that process' `ns/net`.
//!
//! When several processes of the pod qualify (a container that made a netns
//! of its own, a process that entered another pod's netns), the netns of the
//! oldest one (earliest start time, `/proc/<pid>/stat` field 22) is the
//! pod's: that is the sandbox's, as upstream (`podcgroupns_linux.go`)
//! decides. `/proc` lists PIDs in ascending order, which is start order only
//! until PIDs wrap around.
//!
//! Blocking (reads /proc): call it from a blocking thread.

use std::path::Path;

use crate::redirect::netns::Netns;

/// The netns of the oldest process in `proc_root` whose cgroup names pod
/// `uid`, skipping processes in `host_inode`'s netns (host-network
/// containers would give us the node's netns).
pub fn find_pod_netns(proc_root: &Path, uid: &str, host_inode: Option<u64>) -> Option<Netns> {
    if uid.is_empty() {
        return None;
    }
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    let entries = std::fs::read_dir(proc_root).ok()?;
    // (start time, netns); a process whose start time cannot be read ranks last.
    let mut best: Option<(u64, Netns)> = None;
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
        let started = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| start_time(&stat))
            .unwrap_or(u64::MAX);
        if best.as_ref().is_some_and(|(t, _)| *t <= started) {
            continue;
        }
        let Ok(ns) = Netns::open(dir.join("ns/net")) else {
            continue;
        };
        if host_inode.is_some() && ns.inode().ok() == host_inode {
            continue;
        }
        best = Some((started, ns));
    }
    best.map(|(_, ns)| ns)
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command name
/// (field 2, in parentheses) may contain spaces and parentheses, so fields
/// are counted after its last `)`.
fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
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
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat =
            "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("4242 (short) S 1"), None);
        assert_eq!(start_time("garbage"), None);
    }

    /// A fake `/proc/<pid>` of pod `uid` whose netns is `netns` and whose
    /// start time is `started`.
    fn fake_process(root: &Path, pid: &str, uid: &str, netns: &Path, started: u64) {
        let dir = root.join(pid);
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(
            dir.join("cgroup"),
            format!("0::/kubepods/pod{uid}/c{pid}\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join("stat"),
            format!("{pid} (sleep) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {started} 1 1\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(netns, dir.join("ns/net")).unwrap();
    }

    /// Two processes of one pod in different netns (a container that made
    /// its own, or entered another pod's): the oldest one's netns is the
    /// pod's, whatever order `/proc` lists them in (PIDs wrap around).
    #[test]
    fn the_oldest_process_of_the_pod_names_its_netns() {
        let uid = "aaaa-bbbb";
        let sandbox = Netns::current().unwrap();
        let Ok(other) = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            Netns::current().map_err(|_| nix::errno::Errno::EIO)
        })
        .join()
        .unwrap() else {
            eprintln!("skipped: cannot create a netns (needs CAP_SYS_ADMIN)");
            return;
        };
        let fd_path = |ns: &Netns| {
            use std::os::fd::AsRawFd;
            Path::new(&format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                ns.as_raw_fd()
            ))
            .to_path_buf()
        };
        let (sandbox_path, other_path) = (fd_path(&sandbox), fd_path(&other));
        // Same PIDs both times, start times swapped: whichever PID /proc
        // lists first, one of the two cases puts the younger process there.
        for (old_pid, young_pid) in [("100", "200"), ("200", "100")] {
            let root = tempfile::tempdir().unwrap();
            fake_process(root.path(), old_pid, uid, &sandbox_path, 1_000);
            fake_process(root.path(), young_pid, uid, &other_path, 9_000);
            let ns = find_pod_netns(root.path(), uid, None).expect("found");
            assert_eq!(
                ns.inode().unwrap(),
                sandbox.inode().unwrap(),
                "oldest process is pid {old_pid}"
            );
        }
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
