//! `net.ipv4.conf.*` settings GENEVE redirection needs.
//!
//! `/proc/sys/net` shows the namespace of the thread that opens it, so
//! [`SysctlRoot::apply`] and [`SysctlRoot::interfaces`] must run inside
//! [`crate::redirect::netns::Netns::run`] for the target namespace.
//!
//! Where that tree is mounted is configurable: in an unprivileged
//! container `/proc/sys` is read-only, so the chart mounts the host's
//! `/proc/sys/net` writable at `$HOST_PROC_DIR/sys/net` (the same
//! per-thread view, as `/proc/sys/net` resolves the opener's namespace).

use std::path::{Path, PathBuf};

use super::constants::*;
use super::sysctl_journal::{Journal, JournalError};

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot set {path} to {value}: {source}")]
    Write {
        path: PathBuf,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// One setting: `/proc/sys/net/ipv4/conf/<iface>/<key> = value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub iface: String,
    pub key: &'static str,
    pub value: &'static str,
}

/// The `sys/net` directory settings are written under, and optionally the
/// journal where the values they replace are kept (see
/// [`super::sysctl_journal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlRoot {
    dir: PathBuf,
    journal: Option<PathBuf>,
}

impl Default for SysctlRoot {
    fn default() -> Self {
        Self::new("/proc/sys/net")
    }
}

impl SysctlRoot {
    /// `dir` is a `sys/net` directory (`/proc/sys/net`, `/host/proc/sys/net`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            journal: None,
        }
    }

    /// `$HOST_PROC_DIR/sys/net` when it exists, else `/proc/sys/net`.
    pub fn under_proc(proc_dir: &Path) -> Self {
        let dir = proc_dir.join("sys/net");
        if dir.is_dir() {
            Self::new(dir)
        } else {
            Self::default()
        }
    }

    /// Records, in the file `journal`, the value every setting replaces
    /// (the first time it is changed), for [`SysctlRoot::restore`]. Only for
    /// one namespace: the node's.
    pub fn with_journal(self, journal: impl Into<PathBuf>) -> Self {
        Self {
            journal: Some(journal.into()),
            ..self
        }
    }

    /// The same directory without a journal (settings of other namespaces).
    pub fn without_journal(&self) -> Self {
        Self::new(self.dir.clone())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn journal(&self) -> Option<&Path> {
        self.journal.as_deref()
    }

    fn iface_exists(&self, iface: &str) -> bool {
        self.conf(iface).is_dir()
    }

    /// `<root>/ipv4/conf/<iface>`.
    fn conf(&self, iface: &str) -> PathBuf {
        self.dir.join("ipv4/conf").join(iface)
    }

    /// Where `s` lives: `<root>/ipv4/conf/<iface>/<key>`.
    pub fn path(&self, s: &Setting) -> PathBuf {
        self.conf(&s.iface).join(s.key)
    }

    /// Interfaces listed under `<root>/ipv4/conf` (without `all` and
    /// `default`), in the calling thread's namespace.
    pub fn interfaces(&self) -> std::io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(self.dir.join("ipv4/conf"))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name != "all" && name != "default" {
                v.push(name);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Writes every setting, in the calling thread's namespace. A setting of an
    /// interface that is gone by the time it is written (a pod's veth deleted
    /// meanwhile) is skipped: there is nothing left to configure.
    ///
    /// With a journal, the values about to be replaced are recorded (and the
    /// journal saved) before anything is written.
    pub fn apply(&self, settings: &[Setting]) -> Result<(), SysctlError> {
        if let Some(path) = &self.journal {
            let mut journal = Journal::load(path)?;
            let mut changed = false;
            for s in settings {
                if let Ok(current) = self.read(s) {
                    changed |= journal.record(&s.iface, s.key, &current, s.value);
                }
            }
            changed |= journal.prune(|iface| self.iface_exists(iface));
            if changed {
                journal.save(path)?;
            }
        }
        for s in settings {
            let path = self.path(s);
            match std::fs::write(&path, s.value) {
                Ok(()) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && s.iface != "all"
                        && s.iface != "default"
                        && !self.conf(&s.iface).exists() =>
                {
                    tracing::debug!(interface = %s.iface, key = s.key, "interface gone before its sysctl was written; skipped");
                }
                Err(source) => {
                    return Err(SysctlError::Write {
                        path: path.clone(),
                        value: s.value,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads one setting's current value (trimmed).
    pub fn read(&self, s: &Setting) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(self.path(s))?.trim().to_string())
    }

    /// Puts back the journal's original values, in the calling thread's
    /// namespace, where the setting still holds what the agent wrote (a
    /// value someone changed since is theirs) and the interface still
    /// exists; then removes the journal. A value that cannot be written back
    /// stays in the journal and is reported. Returns how many were restored.
    pub fn restore(&self) -> Result<usize, SysctlError> {
        let Some(path) = &self.journal else {
            return Ok(0);
        };
        let mut journal = Journal::load(path)?;
        let mut restored = 0;
        let mut failed = None;
        journal.retain(|e| {
            let file = self.conf(&e.iface).join(&e.key);
            match std::fs::read_to_string(&file) {
                Ok(v) if v.trim() == e.applied => match std::fs::write(&file, &e.original) {
                    Ok(()) => {
                        restored += 1;
                        false
                    }
                    Err(source) => {
                        failed.get_or_insert(SysctlError::Write {
                            path: file,
                            value: "its original value",
                            source,
                        });
                        true
                    }
                },
                // Changed by someone else since, or the interface is gone.
                _ => false,
            }
        });
        match failed {
            None => {
                Journal::remove(path)?;
                Ok(restored)
            }
            Some(e) => {
                journal.save(path)?;
                Err(e)
            }
        }
    }
}

fn rp_filter_off(iface: &str) -> Setting {
    Setting {
        iface: iface.to_string(),
        key: "rp_filter",
        value: "0",
    }
}

fn accept_local(iface: &str) -> Setting {
    Setting {
        iface: iface.to_string(),
        key: "accept_local",
        value: "1",
    }
}

/// Node settings: `rp_filter=0` on default, all, the ztunnel veth, both
/// tunnels and every other interface present (`all_ifaces`); `accept_local=1`
/// on the veth and both tunnels.
pub fn node_settings(ztunnel_veth: &str, all_ifaces: &[String]) -> Vec<Setting> {
    let mut v: Vec<Setting> = [
        "default",
        "all",
        ztunnel_veth,
        NODE_INBOUND_LINK,
        NODE_OUTBOUND_LINK,
    ]
    .into_iter()
    .map(rp_filter_off)
    .collect();
    for i in all_ifaces {
        if !v.iter().any(|s| &s.iface == i) {
            v.push(rp_filter_off(i));
        }
    }
    for i in [ztunnel_veth, NODE_INBOUND_LINK, NODE_OUTBOUND_LINK] {
        v.push(accept_local(i));
    }
    v
}

/// ztunnel netns settings (never journaled: they die with the pod):
/// `rp_filter=0` on default, all, the pod interface
/// and both tunnels.
pub fn ztunnel_settings(pod_iface: &str) -> Vec<Setting> {
    [
        "default",
        "all",
        pod_iface,
        ZTUNNEL_INBOUND_LINK,
        ZTUNNEL_OUTBOUND_LINK,
    ]
    .into_iter()
    .map(rp_filter_off)
    .collect()
}

/// The per-pod setting: `rp_filter=0` on the host device that leads to the
/// pod.
pub fn pod_settings(host_dev: &str) -> Vec<Setting> {
    vec![rp_filter_off(host_dev)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_settings_cover_every_interface_once() {
        let ifaces = vec!["eth0".to_string(), "veth1".to_string(), "lo".to_string()];
        let s = node_settings("veth1", &ifaces);
        let rp: Vec<&str> = s
            .iter()
            .filter(|x| x.key == "rp_filter")
            .map(|x| x.iface.as_str())
            .collect();
        assert_eq!(
            rp,
            [
                "default", "all", "veth1", "istioin", "istioout", "eth0", "lo"
            ]
        );
        let al: Vec<&str> = s
            .iter()
            .filter(|x| x.key == "accept_local")
            .map(|x| x.iface.as_str())
            .collect();
        assert_eq!(al, ["veth1", "istioin", "istioout"]);
        assert_eq!(
            SysctlRoot::default().path(&s[0]),
            PathBuf::from("/proc/sys/net/ipv4/conf/default/rp_filter")
        );
        assert_eq!(
            SysctlRoot::new("/host/proc/sys/net").path(&s[0]),
            PathBuf::from("/host/proc/sys/net/ipv4/conf/default/rp_filter")
        );
    }

    #[test]
    fn root_under_proc_falls_back_when_missing() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(SysctlRoot::under_proc(d.path()), SysctlRoot::default());
        std::fs::create_dir_all(d.path().join("sys/net")).unwrap();
        assert_eq!(
            SysctlRoot::under_proc(d.path()).dir(),
            d.path().join("sys/net")
        );
    }

    #[test]
    fn an_interface_gone_meanwhile_is_skipped_but_all_is_not() {
        let d = tempfile::tempdir().unwrap();
        let root = SysctlRoot::new(d.path());
        for i in ["all", "default", "eth0"] {
            std::fs::create_dir_all(d.path().join("ipv4/conf").join(i)).unwrap();
        }
        // vethgone was listed, then deleted before the write.
        let s = node_settings("eth0", &["vethgone".to_string()]);
        let s: Vec<Setting> = s
            .into_iter()
            .filter(|x| !x.iface.starts_with("istio"))
            .collect();
        root.apply(&s).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("ipv4/conf/eth0/accept_local")).unwrap(),
            "1"
        );
        std::fs::remove_dir_all(d.path().join("ipv4/conf/all")).unwrap();
        let e = root.apply(&s).unwrap_err();
        assert!(e.to_string().contains("all/rp_filter"), "{e}");
    }

    /// A fake `sys/net` tree with `rp_filter`/`accept_local` files.
    fn fake_tree(ifaces: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (i, rp) in ifaces {
            let dir = d.path().join("ipv4/conf").join(i);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("rp_filter"), rp).unwrap();
            std::fs::write(dir.join("accept_local"), "0").unwrap();
        }
        d
    }

    fn value(d: &tempfile::TempDir, iface: &str, key: &str) -> String {
        std::fs::read_to_string(d.path().join("ipv4/conf").join(iface).join(key))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn journaled_settings_are_restored_where_they_still_hold_our_value() {
        let d = fake_tree(&[
            ("all", "2"),
            ("default", "1"),
            ("eth0", "1"),
            ("veth1", "0"),
            ("vethpod", "1"),
        ]);
        let journal = d.path().join("run/geneve-sysctls.json");
        let root = SysctlRoot::new(d.path()).with_journal(&journal);
        let ifaces = root.interfaces().unwrap();
        let s: Vec<Setting> = node_settings("veth1", &ifaces)
            .into_iter()
            .filter(|x| !x.iface.starts_with("istio"))
            .collect();
        root.apply(&s).unwrap();
        root.apply(&pod_settings("vethpod")).unwrap();
        assert_eq!(value(&d, "all", "rp_filter"), "0");
        assert!(journal.exists());
        // An agent restart writes the same values again: originals kept.
        root.apply(&s).unwrap();
        // Meanwhile an operator set eth0 back to strict: theirs to keep.
        std::fs::write(d.path().join("ipv4/conf/eth0/rp_filter"), "1").unwrap();
        // The pod's veth went away with its pod.
        std::fs::remove_dir_all(d.path().join("ipv4/conf/vethpod")).unwrap();

        // all, default (rp_filter), veth1 (accept_local); eth0 is theirs,
        // veth1's rp_filter was already 0, vethpod is gone.
        assert_eq!(root.restore().unwrap(), 3);
        assert_eq!(value(&d, "all", "rp_filter"), "2");
        assert_eq!(value(&d, "default", "rp_filter"), "1");
        assert_eq!(value(&d, "eth0", "rp_filter"), "1");
        assert_eq!(value(&d, "veth1", "rp_filter"), "0");
        assert_eq!(value(&d, "veth1", "accept_local"), "0");
        assert!(!journal.exists(), "journal removed after a full restore");
        assert_eq!(root.restore().unwrap(), 0, "nothing left to restore");
    }

    #[test]
    fn without_a_journal_nothing_is_recorded() {
        let d = fake_tree(&[("all", "1"), ("default", "1")]);
        let journal = d.path().join("j.json");
        let root = SysctlRoot::new(d.path()).with_journal(&journal);
        root.without_journal()
            .apply(&ztunnel_settings("eth0")[..2])
            .unwrap();
        assert_eq!(value(&d, "all", "rp_filter"), "0");
        assert!(!journal.exists());
        assert_eq!(root.without_journal().restore().unwrap(), 0);
    }

    #[test]
    fn a_bad_journal_stops_the_change_before_anything_is_written() {
        let d = fake_tree(&[("all", "1"), ("default", "1")]);
        let journal = d.path().join("j.json");
        std::fs::write(&journal, "garbage").unwrap();
        let root = SysctlRoot::new(d.path()).with_journal(&journal);
        let e = root.apply(&ztunnel_settings("eth0")[..2]).unwrap_err();
        assert!(e.to_string().contains("j.json"), "{e}");
        assert_eq!(value(&d, "all", "rp_filter"), "1", "nothing written");
    }

    #[test]
    fn ztunnel_settings_list() {
        let s = ztunnel_settings("eth0");
        assert_eq!(s.len(), 5);
        assert!(s.iter().all(|x| x.key == "rp_filter" && x.value == "0"));
    }
}
