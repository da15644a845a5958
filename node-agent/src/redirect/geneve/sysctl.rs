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

#[derive(Debug, thiserror::Error)]
#[error("cannot set {path} to {value}: {source}")]
pub struct SysctlError {
    pub path: PathBuf,
    pub value: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// One setting: `/proc/sys/net/ipv4/conf/<iface>/<key> = value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub iface: String,
    pub key: &'static str,
    pub value: &'static str,
}

/// The `sys/net` directory settings are written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlRoot(PathBuf);

impl Default for SysctlRoot {
    fn default() -> Self {
        Self(PathBuf::from("/proc/sys/net"))
    }
}

impl SysctlRoot {
    /// `dir` is a `sys/net` directory (`/proc/sys/net`, `/host/proc/sys/net`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    /// `$HOST_PROC_DIR/sys/net` when it exists, else `/proc/sys/net`.
    pub fn under_proc(proc_dir: &Path) -> Self {
        let dir = proc_dir.join("sys/net");
        if dir.is_dir() {
            Self(dir)
        } else {
            Self::default()
        }
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// Where `s` lives: `<root>/ipv4/conf/<iface>/<key>`.
    pub fn path(&self, s: &Setting) -> PathBuf {
        self.0.join("ipv4/conf").join(&s.iface).join(s.key)
    }

    /// Interfaces listed under `<root>/ipv4/conf` (without `all` and
    /// `default`), in the calling thread's namespace.
    pub fn interfaces(&self) -> std::io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(self.0.join("ipv4/conf"))? {
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
    pub fn apply(&self, settings: &[Setting]) -> Result<(), SysctlError> {
        for s in settings {
            let path = self.path(s);
            match std::fs::write(&path, s.value) {
                Ok(()) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && s.iface != "all"
                        && s.iface != "default"
                        && !self.0.join("ipv4/conf").join(&s.iface).exists() =>
                {
                    tracing::debug!(interface = %s.iface, key = s.key, "interface gone before its sysctl was written; skipped");
                }
                Err(source) => {
                    return Err(SysctlError {
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

/// ztunnel netns settings: `rp_filter=0` on default, all, the pod interface
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

    #[test]
    fn ztunnel_settings_list() {
        let s = ztunnel_settings("eth0");
        assert_eq!(s.len(), 5);
        assert!(s.iter().all(|x| x.key == "rp_filter" && x.value == "0"));
    }
}
