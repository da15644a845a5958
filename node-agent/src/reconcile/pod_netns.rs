//! Where a pod's network namespace is.
//!
//! 1. The `Netns` path of the pod's CNI ADD (e.g. `/var/run/netns/cni-…`),
//!    remembered for every pod — mesh or not, so that labelling a namespace
//!    later finds its running pods — in `<CNI_AGENT_RUN_DIR>/pod-netns/<uid>`
//!    (one small file per pod, written atomically). The run dir is a host
//!    path, so the record survives agent restarts and upgrades.
//! 2. Otherwise a scan of `HOST_PROC_DIR` for a process whose cgroup names
//!    the pod UID and whose netns holds one of the pod's IPs
//!    (`redirect::inpod::netns_discovery`), giving `<proc>/<pid>/ns/net`:
//!    pods that started while no agent ran.
//!
//! A remembered path is used only if it still opens as a network namespace.
//! Records are removed when the pod is deleted, and at start-up for pods the
//! API no longer lists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::install::atomic_write::write_atomically;
use crate::redirect::PodRedirect;
use crate::redirect::inpod::netns_discovery::{InterfaceAddrCheck, PodIpCheck, find_pod_netns};
use crate::redirect::netns::{Netns, NetnsId};

/// Sub-directory of the run dir holding the records.
pub const POD_NETNS_DIR: &str = "pod-netns";

#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error("cannot create pod netns record dir {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write pod netns record {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Remembered CNI netns paths by pod UID.
pub struct NetnsPaths {
    dir: PathBuf,
    map: Mutex<HashMap<String, PathBuf>>,
}

/// UIDs become file names: only `[A-Za-z0-9-]` (Kubernetes UIDs are UUIDs).
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl NetnsPaths {
    /// Opens (creating) `<run_dir>/pod-netns` and loads its records.
    /// Blocking: call before serving or from a blocking thread.
    pub fn load(run_dir: &Path) -> Result<Self, PodNetnsError> {
        let dir = run_dir.join(POD_NETNS_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| PodNetnsError::Dir {
            path: dir.clone(),
            source,
        })?;
        let mut map = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(uid) = name.to_str().filter(|u| valid_uid(u)) else {
                    continue; // temporary files of an interrupted write
                };
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    let text = text.trim();
                    if !text.is_empty() {
                        map.insert(uid.to_string(), PathBuf::from(text));
                    }
                }
            }
        }
        tracing::debug!(dir = %dir.display(), records = map.len(), "pod netns records loaded");
        Ok(Self {
            dir,
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PathBuf>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, uid: &str) -> Option<PathBuf> {
        self.lock().get(uid).cloned()
    }

    pub fn uids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Records `path` for `uid` (memory, and disk unless unchanged).
    pub async fn remember(&self, uid: &str, path: &Path) -> Result<(), PodNetnsError> {
        if self
            .lock()
            .insert(uid.to_string(), path.to_path_buf())
            .as_deref()
            == Some(path)
        {
            return Ok(());
        }
        if !valid_uid(uid) {
            tracing::warn!(
                uid,
                "pod UID is not a safe file name: netns path kept in memory only"
            );
            return Ok(());
        }
        let file = self.dir.join(uid);
        let content = path.as_os_str().as_encoded_bytes().to_vec();
        let target = file.clone();
        tokio::task::spawn_blocking(move || write_atomically(&target, &content, 0o600))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| PodNetnsError::Write { path: file, source })
    }

    /// Forgets `uid` (memory and disk).
    pub async fn forget(&self, uid: &str) {
        if self.lock().remove(uid).is_none() || !valid_uid(uid) {
            return;
        }
        let file = self.dir.join(uid);
        let _ = tokio::task::spawn_blocking(move || match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot remove pod netns record")
            }
        })
        .await;
    }
}

/// Finds pods' netns: remembered path, then a `/proc` scan.
pub struct NetnsResolver {
    paths: Arc<NetnsPaths>,
    proc_root: PathBuf,
    /// The node's netns: processes in it are host-network. This is the
    /// agent's own netns, not `<HOST_PROC_DIR>/1/ns/net` as upstream reads
    /// it: the agent runs `hostNetwork`, so in a cluster both are the node's,
    /// but ours is the netns this agent treats as the node everywhere else
    /// (the in-pod redirector's host default, where the probe SNAT goes), and
    /// stays right where the agent's node is not PID 1's netns (the e2e
    /// harness runs agents in simulated nodes' netns under the machine's
    /// `/proc`), and needs no ptrace access to PID 1.
    host: Option<NetnsId>,
    /// Whether a discovered netns holds one of the pod's IPs.
    check: Arc<dyn PodIpCheck>,
}

impl NetnsResolver {
    pub fn new(paths: Arc<NetnsPaths>, proc_root: PathBuf) -> Self {
        let host = Netns::current().ok().and_then(|n| n.id().ok());
        Self {
            paths,
            proc_root,
            host,
            check: Arc::new(InterfaceAddrCheck),
        }
    }

    pub fn paths(&self) -> &Arc<NetnsPaths> {
        &self.paths
    }

    /// A netns path from a CNI event, as this agent can open it. Runtimes that name
    /// the sandbox by process (cri-dockerd: `/proc/<pid>/ns/net`) give a path in the
    /// node's PID namespace; the agent has its own, and sees the node's `/proc` at
    /// `HOST_PROC_DIR`. Other paths (`/var/run/netns/…`) are mounted unchanged.
    pub fn event_netns_path(&self, event_netns: &str) -> PathBuf {
        match Path::new(event_netns).strip_prefix("/proc") {
            Ok(rest) if self.proc_root != Path::new("/proc") => self.proc_root.join(rest),
            _ => PathBuf::from(event_netns),
        }
    }

    /// The path of `pod`'s netns, if it can be found: its remembered CNI
    /// path, else a `/proc` scan, whose find must hold one of `pod.ips`.
    pub async fn resolve(&self, pod: &PodRedirect) -> Option<PathBuf> {
        let remembered = self.paths.get(&pod.uid);
        let proc_root = self.proc_root.clone();
        let host = self.host;
        let check = self.check.clone();
        let pod = pod.clone();
        tokio::task::spawn_blocking(move || {
            let uid = &pod.uid;
            if let Some(p) = remembered {
                match Netns::open(&p) {
                    Ok(ns) if ns.id().ok() != host => return Some(p),
                    Ok(_) => {
                        tracing::debug!(%uid, path = %p.display(), "remembered netns is the node's")
                    }
                    Err(e) => tracing::debug!(%uid, error = %e, "remembered netns is gone"),
                }
            }
            find_pod_netns(&proc_root, &pod, host, check.as_ref()).map(|ns| ns.path().to_path_buf())
        })
        .await
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_survive_a_reload_and_are_forgotten() {
        let run = tempfile::tempdir().unwrap();
        let p = NetnsPaths::load(run.path()).unwrap();
        p.remember("1111-aaaa", Path::new("/var/run/netns/cni-1"))
            .await
            .unwrap();
        p.remember("2222-bbbb", Path::new("/var/run/netns/cni-2"))
            .await
            .unwrap();
        // unsafe UIDs stay in memory only
        p.remember("../x", Path::new("/var/run/netns/cni-3"))
            .await
            .unwrap();
        assert_eq!(p.get("../x"), Some(PathBuf::from("/var/run/netns/cni-3")));
        drop(p);
        let p = NetnsPaths::load(run.path()).unwrap();
        let mut uids = p.uids();
        uids.sort();
        assert_eq!(uids, vec!["1111-aaaa", "2222-bbbb"]);
        assert_eq!(
            p.get("1111-aaaa"),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        p.forget("1111-aaaa").await;
        assert!(!run.path().join(POD_NETNS_DIR).join("1111-aaaa").exists());
        let p = NetnsPaths::load(run.path()).unwrap();
        assert_eq!(p.uids(), vec!["2222-bbbb"]);
    }

    #[test]
    fn process_netns_paths_are_read_through_host_proc() {
        let paths = Arc::new(NetnsPaths::load(tempfile::tempdir().unwrap().path()).unwrap());
        let host = NetnsResolver::new(paths.clone(), PathBuf::from("/host/proc"));
        assert_eq!(
            host.event_netns_path("/proc/4242/ns/net"),
            PathBuf::from("/host/proc/4242/ns/net")
        );
        assert_eq!(
            host.event_netns_path("/var/run/netns/cni-1"),
            PathBuf::from("/var/run/netns/cni-1")
        );
        // `/procfoo` is not under /proc.
        assert_eq!(
            host.event_netns_path("/procfoo/1"),
            PathBuf::from("/procfoo/1")
        );
        let same = NetnsResolver::new(paths, PathBuf::from("/proc"));
        assert_eq!(
            same.event_netns_path("/proc/4242/ns/net"),
            PathBuf::from("/proc/4242/ns/net")
        );
    }

    /// A [`PodIpCheck`] with one answer for every netns.
    struct Answer(bool);

    impl PodIpCheck for Answer {
        fn holds_any(
            &self,
            _: &Netns,
            _: &[std::net::IpAddr],
        ) -> Result<bool, crate::redirect::inpod::netns_discovery::CheckError> {
            Ok(self.0)
        }
    }

    fn pod(uid: &str, ip: &str) -> PodRedirect {
        PodRedirect {
            uid: uid.into(),
            name: "p".into(),
            namespace: "demo".into(),
            ips: vec![ip.parse().unwrap()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn resolver_prefers_a_live_record_then_scans_proc() {
        let run = tempfile::tempdir().unwrap();
        let paths = Arc::new(NetnsPaths::load(run.path()).unwrap());
        let proc = tempfile::tempdir().unwrap();
        // A fake /proc with one process of pod "cafe-0001" whose ns/net is
        // a real netns handle (ours).
        let pid = proc.path().join("4242");
        std::fs::create_dir_all(pid.join("ns")).unwrap();
        std::fs::write(pid.join("cgroup"), "0::/kubepods/podcafe-0001/c1\n").unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", pid.join("ns/net")).unwrap();
        let mut r = NetnsResolver::new(paths.clone(), proc.path().to_path_buf());
        // Our own netns is the "node" here; pretend it is not, so the fake
        // process counts as a pod.
        r.host = None;
        r.check = Arc::new(Answer(true));
        let (cafe, beef) = (pod("cafe-0001", "10.0.0.1"), pod("beef-0002", "10.0.0.2"));
        assert_eq!(r.resolve(&cafe).await, Some(pid.join("ns/net")));
        assert_eq!(r.resolve(&beef).await, None);
        // a pod with no IPs yet is not paired by the scan
        let no_ips = PodRedirect {
            ips: vec![],
            ..cafe.clone()
        };
        assert_eq!(r.resolve(&no_ips).await, None);
        // a record that does not open as a netns falls back to the scan
        let bogus = run.path().join("not-a-netns");
        std::fs::write(&bogus, "").unwrap();
        paths.remember("cafe-0001", &bogus).await.unwrap();
        assert_eq!(r.resolve(&cafe).await, Some(pid.join("ns/net")));
        // a live record wins
        paths
            .remember("beef-0002", Path::new("/proc/self/ns/net"))
            .await
            .unwrap();
        assert_eq!(
            r.resolve(&beef).await,
            Some(PathBuf::from("/proc/self/ns/net"))
        );
        // The scan's find must hold one of the pod's IPs; a remembered CNI
        // path is the runtime's word and is not checked.
        r.check = Arc::new(Answer(false));
        assert_eq!(r.resolve(&cafe).await, None);
        assert_eq!(
            r.resolve(&beef).await,
            Some(PathBuf::from("/proc/self/ns/net"))
        );
    }
}
