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
//! The cgroup ties a process to a pod, not to a netns: a process of one pod
//! may be transiting another pod's netns. As upstream, a pairing is accepted
//! only when an interface inside the netns carries one of the pod's IPs
//! (`status.podIPs`, compared with IPv4-mapped IPv6 unmapped); a pod with no
//! IP yet cannot be verified and is not paired on this scan. A refused netns
//! is not recorded anywhere: every pod's scan is its own (we keep no set of
//! netns already paired, as upstream's one-pass scan does), so the pod that
//! does own it still finds it. Processes in the node's netns are never
//! candidates (host-network pods: enrolling them would capture the node).
//!
//! Blocking (reads /proc, enters netns): call it from a blocking thread.

use std::net::IpAddr;
use std::path::Path;

use crate::redirect::PodRedirect;
use crate::redirect::netlink;
use crate::redirect::netns::{Netns, NetnsId};

/// Error of a [`PodIpCheck`].
pub type CheckError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether an interface inside a netns carries one of a pod's IPs.
pub trait PodIpCheck: Send + Sync {
    /// Blocking: may enter `netns` on a thread of its own.
    fn holds_any(&self, netns: &Netns, ips: &[IpAddr]) -> Result<bool, CheckError>;
}

/// The real [`PodIpCheck`]: lists the netns' interface addresses through
/// rtnetlink from a thread inside it ([`netlink::addresses_blocking`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct InterfaceAddrCheck;

impl PodIpCheck for InterfaceAddrCheck {
    fn holds_any(&self, netns: &Netns, ips: &[IpAddr]) -> Result<bool, CheckError> {
        let addrs = netlink::addresses_blocking(netns)?;
        Ok(any_same_ip(&addrs, ips))
    }
}

/// Whether one of `addrs` is one of `ips`, IPv4-mapped IPv6 counting as the
/// IPv4 address it maps.
pub fn any_same_ip(addrs: &[IpAddr], ips: &[IpAddr]) -> bool {
    addrs
        .iter()
        .any(|a| ips.iter().any(|ip| a.to_canonical() == ip.to_canonical()))
}

/// The netns of the oldest process in `proc_root` whose cgroup names
/// `pod.uid` and whose netns holds one of `pod.ips` (`check`), skipping
/// processes in `host`'s netns (host-network containers would give us the
/// node's netns). `None` also when the pod has no IPs yet.
pub fn find_pod_netns(
    proc_root: &Path,
    pod: &PodRedirect,
    host: Option<NetnsId>,
    check: &dyn PodIpCheck,
) -> Option<Netns> {
    let uid = pod.uid.as_str();
    if uid.is_empty() {
        return None;
    }
    if pod.ips.is_empty() {
        tracing::debug!(
            pod = %pod.key(), uid,
            "pod has no IPs yet: cannot verify which netns is its own, not paired on this scan"
        );
        return None;
    }
    let mut candidates = pod_processes(proc_root, uid, host);
    candidates.sort_by_key(|c| c.started);
    for c in candidates {
        let netns = c.netns.path().display().to_string();
        match check.holds_any(&c.netns, &pod.ips) {
            Ok(true) => return Some(c.netns),
            Ok(false) => tracing::warn!(
                pod = %pod.key(), uid, pid = %c.pid, %netns, ips = ?pod.ips,
                "netns holds none of the pod's IPs: pairing refused \
                 (a foreign process may be transiting another pod's netns)"
            ),
            Err(e) => tracing::warn!(
                pod = %pod.key(), uid, pid = %c.pid, %netns, error = %e,
                "cannot verify the netns holds one of the pod's IPs: pairing refused"
            ),
        }
    }
    None
}

/// Checks a netns opened from a known path before it is used for `pod`: never the node's,
/// and, when the path is a process's (`<proc_root>/<pid>/ns/net`, as a cri-dockerd CNI
/// event or an earlier scan gives), one holding one of the pod's IPs: the process may have
/// exited since and its PID gone to a process of another pod or of the node. A bind-mounted
/// path (`/var/run/netns/...`) names its netns for as long as it exists.
pub fn verify_opened(
    proc_root: &Path,
    pod: &PodRedirect,
    netns: &Netns,
    host: Option<NetnsId>,
    check: &dyn PodIpCheck,
) -> Result<(), String> {
    let path = netns.path();
    if host.is_some() && netns.id().ok() == host {
        return Err(format!(
            "{} is the node's network namespace",
            path.display()
        ));
    }
    let is_process_path = path.strip_prefix(proc_root).is_ok_and(|rest| {
        let parts: Vec<_> = rest.components().map(|c| c.as_os_str()).collect();
        matches!(parts.as_slice(), [pid, ns, net]
            if pid.to_str().is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
                && *ns == "ns" && *net == "net")
    });
    if !is_process_path || pod.ips.is_empty() {
        return Ok(());
    }
    match check.holds_any(netns, &pod.ips) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "{} holds none of the pod's IPs {:?} (its process may have exited and the PID \
             been reused)",
            path.display(),
            pod.ips
        )),
        Err(e) => Err(format!(
            "cannot verify that {} holds one of the pod's IPs {:?}: {e}",
            path.display(),
            pod.ips
        )),
    }
}

/// A process of the pod, with the netns it is in.
struct Candidate {
    pid: String,
    /// Start time; one that cannot be read ranks last.
    started: u64,
    netns: Netns,
}

/// The pod's processes outside `host`'s netns, one per netns (its oldest).
fn pod_processes(proc_root: &Path, uid: &str, host: Option<NetnsId>) -> Vec<Candidate> {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found: Vec<(NetnsId, Candidate)> = Vec::new();
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
        let Ok(netns) = Netns::open(dir.join("ns/net")) else {
            continue;
        };
        let Ok(id) = netns.id() else {
            continue;
        };
        if Some(id) == host {
            tracing::debug!(uid, pid, "process in the node's netns ignored");
            continue;
        }
        let started = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| start_time(&stat))
            .unwrap_or(u64::MAX);
        let candidate = Candidate {
            pid: pid.to_string(),
            started,
            netns,
        };
        match found.iter_mut().find(|(i, _)| *i == id) {
            Some((_, seen)) if seen.started <= started => {}
            Some((_, seen)) => *seen = candidate,
            None => found.push((id, candidate)),
        }
    }
    found.into_iter().map(|(_, c)| c).collect()
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

    /// A new, empty netns (held open by the handle), or `None` without
    /// the privilege to make one.
    fn new_netns() -> Option<Netns> {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            Netns::current().ok()
        })
        .join()
        .unwrap()
    }

    /// `n` new netns, or `None` (test skipped) without the privilege.
    fn new_netns_n(n: usize) -> Option<Vec<Netns>> {
        let made: Option<Vec<Netns>> = (0..n).map(|_| new_netns()).collect();
        if made.is_none() {
            eprintln!("skipped: cannot create a netns (needs CAP_SYS_ADMIN)");
        }
        made
    }

    /// A path that opens `ns` for as long as the handle lives.
    fn fd_path(ns: &Netns) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        Path::new(&format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            ns.as_raw_fd()
        ))
        .to_path_buf()
    }

    fn pod(uid: &str, name: &str, ips: &[&str]) -> PodRedirect {
        PodRedirect {
            uid: uid.into(),
            name: name.into(),
            namespace: "demo".into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    /// A [`PodIpCheck`] that answers from a table of what each netns
    /// holds, or with an error, and records what it was asked.
    #[derive(Default)]
    struct FakeCheck {
        holds: Vec<(NetnsId, IpAddr)>,
        fail: bool,
        asked: std::sync::Mutex<Vec<NetnsId>>,
    }

    impl FakeCheck {
        fn holding(pairs: &[(&Netns, &str)]) -> Self {
            Self {
                holds: pairs
                    .iter()
                    .map(|(ns, ip)| (ns.id().unwrap(), ip.parse().unwrap()))
                    .collect(),
                ..Default::default()
            }
        }

        fn asked(&self) -> Vec<NetnsId> {
            self.asked.lock().unwrap().clone()
        }
    }

    impl PodIpCheck for FakeCheck {
        fn holds_any(&self, netns: &Netns, ips: &[IpAddr]) -> Result<bool, CheckError> {
            let id = netns.id()?;
            self.asked.lock().unwrap().push(id);
            if self.fail {
                return Err("netlink says no".into());
            }
            let addrs: Vec<IpAddr> = self
                .holds
                .iter()
                .filter(|(i, _)| *i == id)
                .map(|(_, ip)| *ip)
                .collect();
            Ok(any_same_ip(&addrs, ips))
        }
    }

    fn id(ns: &Netns) -> NetnsId {
        ns.id().unwrap()
    }

    /// Two processes of one pod in different netns (a container that made
    /// its own, or entered another pod's), both holding its IP: the oldest
    /// one's netns is the pod's, whatever order `/proc` lists them in (PIDs
    /// wrap around).
    #[test]
    fn the_oldest_process_of_the_pod_names_its_netns() {
        let uid = "aaaa-bbbb";
        let Some([sandbox, other]) = new_netns_n(2).map(|v| <[Netns; 2]>::try_from(v).unwrap())
        else {
            return;
        };
        let check = FakeCheck::holding(&[(&sandbox, "10.1.0.1"), (&other, "10.1.0.1")]);
        let p = pod(uid, "a", &["10.1.0.1"]);
        let (sandbox_path, other_path) = (fd_path(&sandbox), fd_path(&other));
        // Same PIDs both times, start times swapped: whichever PID /proc
        // lists first, one of the two cases puts the younger process there.
        for (old_pid, young_pid) in [("100", "200"), ("200", "100")] {
            let root = tempfile::tempdir().unwrap();
            fake_process(root.path(), old_pid, uid, &sandbox_path, 1_000);
            fake_process(root.path(), young_pid, uid, &other_path, 9_000);
            let ns = find_pod_netns(root.path(), &p, None, &check).expect("found");
            assert_eq!(id(&ns), id(&sandbox), "oldest process is pid {old_pid}");
        }
    }

    /// The netns of the pod's process holds one of its IPs (here its IPv6
    /// one, the IPv4 one given IPv4-mapped): accepted, and the check was
    /// asked with the pod's IPs for that netns.
    #[test]
    fn a_netns_holding_one_of_the_pod_ips_is_accepted() {
        let Some(v) = new_netns_n(1) else { return };
        let ns = &v[0];
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), "4242", "aaaa-bbbb", &fd_path(ns), 1_000);
        let check = FakeCheck::holding(&[(ns, "fd00::7")]);
        let p = pod("aaaa-bbbb", "a", &["::ffff:10.1.0.7", "fd00::7"]);
        let found = find_pod_netns(root.path(), &p, None, &check).expect("found");
        assert_eq!(id(&found), id(ns));
        assert_eq!(check.asked(), vec![id(ns)]);
        assert!(
            find_pod_netns(root.path(), &pod("other", "o", &["10.1.0.7"]), None, &check).is_none()
        );
    }

    /// Pod A's oldest process is in pod B's netns (a foreign process
    /// transiting it): without the IP check A would take B's netns. The
    /// pairing is refused with a warning naming A, A gets its own netns, and
    /// B's netns is still B's; a pod whose only process is foreign gets none.
    #[test]
    fn a_netns_without_the_pod_ips_is_refused_and_left_for_its_own_pod() {
        let Some(v) = new_netns_n(2) else { return };
        let (ns_a, ns_b) = (&v[0], &v[1]);
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), "100", "aaaa", &fd_path(ns_b), 1_000); // foreign
        fake_process(root.path(), "200", "bbbb", &fd_path(ns_b), 2_000);
        fake_process(root.path(), "300", "aaaa", &fd_path(ns_a), 3_000);
        fake_process(root.path(), "400", "cccc", &fd_path(ns_b), 500); // foreign only
        let check = FakeCheck::holding(&[(ns_a, "10.1.0.1"), (ns_b, "10.1.0.2")]);
        let (a, b, c) = (
            pod("aaaa", "a", &["10.1.0.1"]),
            pod("bbbb", "b", &["10.1.0.2"]),
            pod("cccc", "c", &["10.1.0.3"]),
        );
        let mut found = None;
        let logged = crate::test_support::warnings(|| {
            found = find_pod_netns(root.path(), &a, None, &check);
        });
        assert_eq!(found.map(|n| id(&n)), Some(id(ns_a)));
        let refusal = logged
            .lines()
            .find(|l| l.contains("pairing refused"))
            .unwrap_or_else(|| panic!("no refusal logged:\n{logged}"));
        assert!(
            refusal.contains("WARN") && refusal.contains("demo/a"),
            "{refusal}"
        );
        assert!(
            refusal.contains("foreign process may be transiting another pod's netns"),
            "{refusal}"
        );
        // Checked oldest first: B's netns, then A's.
        assert_eq!(check.asked(), vec![id(ns_b), id(ns_a)]);

        let b_ns = find_pod_netns(root.path(), &b, None, &check).expect("B's netns is left for B");
        assert_eq!(id(&b_ns), id(ns_b));
        let logged = crate::test_support::warnings(|| {
            assert!(find_pod_netns(root.path(), &c, None, &check).is_none());
        });
        assert!(logged.contains("demo/c"), "{logged}");
        assert_eq!(
            find_pod_netns(root.path(), &b, None, &check).map(|n| id(&n)),
            Some(id(ns_b))
        );
    }

    /// A pod whose IPs are not known yet cannot be verified: not paired on
    /// this scan, and no netns is even checked.
    #[test]
    fn a_pod_without_ips_is_not_paired_yet() {
        let Some(v) = new_netns_n(1) else { return };
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), "4242", "aaaa", &fd_path(&v[0]), 1_000);
        let check = FakeCheck::holding(&[(&v[0], "10.1.0.1")]);
        let logged = crate::test_support::warnings(|| {
            assert!(find_pod_netns(root.path(), &pod("aaaa", "a", &[]), None, &check).is_none());
        });
        assert!(check.asked().is_empty());
        assert!(logged.is_empty(), "{logged}");
        // Once known, it is.
        assert!(
            find_pod_netns(root.path(), &pod("aaaa", "a", &["10.1.0.1"]), None, &check).is_some()
        );
    }

    /// A process of the pod in the node's netns (a host-network container)
    /// is never a candidate, even where the node holds the pod's IP.
    #[test]
    fn processes_in_the_host_netns_are_skipped() {
        let Some(v) = new_netns_n(2) else { return };
        let (host, pod_ns) = (&v[0], &v[1]);
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), "100", "aaaa", &fd_path(host), 1_000);
        let check = FakeCheck::holding(&[(host, "10.1.0.1"), (pod_ns, "10.1.0.1")]);
        let p = pod("aaaa", "a", &["10.1.0.1"]);
        assert!(find_pod_netns(root.path(), &p, Some(id(host)), &check).is_none());
        assert!(check.asked().is_empty(), "the host netns was checked");
        // Without the host to compare with, it would have been taken.
        assert!(find_pod_netns(root.path(), &p, None, &check).is_some());
        // The pod's own netns, younger, is found past it.
        fake_process(root.path(), "200", "aaaa", &fd_path(pod_ns), 2_000);
        let found = find_pod_netns(root.path(), &p, Some(id(host)), &check).expect("found");
        assert_eq!(id(&found), id(pod_ns));
    }

    /// A check that fails refuses the pairing, with a warning naming the pod.
    #[test]
    fn a_failed_check_refuses_the_pairing() {
        let Some(v) = new_netns_n(1) else { return };
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), "4242", "aaaa", &fd_path(&v[0]), 1_000);
        let check = FakeCheck {
            fail: true,
            ..FakeCheck::holding(&[(&v[0], "10.1.0.1")])
        };
        let logged = crate::test_support::warnings(|| {
            assert!(
                find_pod_netns(root.path(), &pod("aaaa", "a", &["10.1.0.1"]), None, &check)
                    .is_none()
            );
        });
        let line = logged
            .lines()
            .find(|l| l.contains("demo/a"))
            .unwrap_or_default();
        assert!(
            line.contains("WARN") && line.contains("netlink says no"),
            "{logged}"
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(any_same_ip(&[ip("10.0.0.1")], &[ip("::ffff:10.0.0.1")]));
        assert!(any_same_ip(&[ip("::ffff:10.0.0.1")], &[ip("10.0.0.1")]));
        assert!(any_same_ip(
            &[ip("fd00::1"), ip("10.0.0.1")],
            &[ip("fd00::1")]
        ));
        assert!(!any_same_ip(
            &[ip("10.0.0.1")],
            &[ip("10.0.0.2"), ip("fd00::1")]
        ));
        assert!(!any_same_ip(&[], &[ip("10.0.0.1")]));
    }

    /// The real check, through rtnetlink inside each netns: the one with
    /// the pod's IP on an interface (a veth, as a pod's eth0) says yes, for the IPv4
    /// address as given or IPv4-mapped, and for the IPv6 one; the other says
    /// no. Then the whole scan with it pairs the pod with the right netns.
    #[test]
    fn the_interface_check_reads_the_addresses_inside_the_netns() {
        let Some(v) = new_netns_n(2) else { return };
        let (with_ip, without) = (&v[0], &v[1]);
        with_ip
            .run(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let (conn, handle, _) = rtnetlink::new_connection().unwrap();
                    tokio::spawn(conn);
                    handle
                        .link()
                        .add(rtnetlink::LinkVeth::new("pod0", "peer0").up().build())
                        .execute()
                        .await
                        .unwrap();
                    let link = handle
                        .link()
                        .get()
                        .match_name("pod0")
                        .execute()
                        .try_next()
                        .await
                        .unwrap()
                        .unwrap();
                    for (ip, len) in [("10.77.0.5", 24), ("fd00:77::5", 64)] {
                        handle
                            .address()
                            .add(link.header.index, ip.parse().unwrap(), len)
                            .execute()
                            .await
                            .unwrap();
                    }
                })
            })
            .unwrap();
        use futures::TryStreamExt;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let check = InterfaceAddrCheck;
        for pod_ips in [
            vec![ip("10.77.0.5")],
            vec![ip("::ffff:10.77.0.5")],
            vec![ip("10.9.9.9"), ip("fd00:77::5")],
        ] {
            assert!(check.holds_any(with_ip, &pod_ips).unwrap(), "{pod_ips:?}");
            assert!(!check.holds_any(without, &pod_ips).unwrap(), "{pod_ips:?}");
        }
        assert!(!check.holds_any(with_ip, &[ip("10.77.0.6")]).unwrap());

        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), "100", "aaaa", &fd_path(without), 1_000);
        fake_process(root.path(), "200", "aaaa", &fd_path(with_ip), 2_000);
        let p = pod("aaaa", "a", &["10.77.0.5"]);
        let found = find_pod_netns(root.path(), &p, None, &check).expect("found");
        assert_eq!(id(&found), id(with_ip));
    }

    /// Fake `/proc` entries whose `ns/net` is our own netns: found, unless
    /// that is the host's; other UIDs are not.
    #[test]
    fn finds_a_netns_in_a_fake_proc() {
        let root = tempfile::tempdir().unwrap();
        let uid = "aaaa-bbbb";
        let pid = root.path().join("4242");
        std::fs::create_dir_all(pid.join("ns")).unwrap();
        std::fs::write(pid.join("cgroup"), "0::/kubepods/podaaaa-bbbb/c1\n").unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", pid.join("ns/net")).unwrap();
        let own = Netns::current().unwrap();
        let check = FakeCheck::holding(&[(&own, "10.1.0.1")]);
        let p = pod(uid, "a", &["10.1.0.1"]);
        let ns = find_pod_netns(root.path(), &p, None, &check).expect("found");
        assert_eq!(id(&ns), id(&own));
        // the host's own netns is skipped
        assert!(find_pod_netns(root.path(), &p, Some(id(&own)), &check).is_none());
        assert!(
            find_pod_netns(root.path(), &pod("other", "o", &["10.1.0.1"]), None, &check).is_none()
        );
    }
}
