//! The values GENEVE mode's node sysctls replaced, kept in a file so that
//! uninstalling puts them back even after agent restarts.
//!
//! GENEVE mode turns `rp_filter` off node-wide (`all`, `default`, every
//! interface) and `accept_local` on. Without a record, `helm uninstall`
//! would leave the node's reverse-path filter off for good. The journal
//! lives in the agent's run directory (a hostPath, so it outlives the
//! agent's pod): the first time a setting is changed its original value is
//! written there, before the change; later changes of the same setting keep
//! that first original. [`super::sysctl::SysctlRoot::restore`] reads it
//! back at uninstall.
//!
//! Format (JSON): `{"version":1,"settings":[{"iface":"all","key":"rp_filter",
//! "original":"2","applied":"0"}]}`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read the sysctl journal {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sysctl journal {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("sysctl journal {path} has version {found}, this agent reads {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write the sysctl journal {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One replaced setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub iface: String,
    pub key: String,
    /// The value before the agent first changed it.
    pub original: String,
    /// The value the agent wrote.
    pub applied: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    version: u32,
    settings: Vec<Entry>,
}

impl Default for Journal {
    fn default() -> Self {
        Self {
            version: VERSION,
            settings: Vec::new(),
        }
    }
}

/// File name of the journal in the agent's run directory.
pub const JOURNAL_FILE: &str = "geneve-sysctls.json";

impl Journal {
    /// Reads `path`; a missing file is an empty journal.
    pub fn load(path: &Path) -> Result<Self, JournalError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(JournalError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let j: Self = serde_json::from_slice(&text).map_err(|source| JournalError::Parse {
            path: path.into(),
            source,
        })?;
        if j.version != VERSION {
            return Err(JournalError::Version {
                path: path.into(),
                found: j.version,
            });
        }
        Ok(j)
    }

    /// Writes the journal to `path` atomically (temporary file, fsync,
    /// rename), creating the directory.
    pub fn save(&self, path: &Path) -> Result<(), JournalError> {
        use std::io::Write;
        let err = |source| JournalError::Write {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("journal serializes"))
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Deletes the journal file (missing is fine).
    pub fn remove(path: &Path) -> Result<(), JournalError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Write {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.settings
    }

    /// Notes that `iface`/`key`, now `current`, is about to become
    /// `applied`. Only a real change of a setting not recorded yet is
    /// recorded (its first original wins); a recorded setting gets the new
    /// `applied`. Returns whether the journal changed.
    pub fn record(&mut self, iface: &str, key: &str, current: &str, applied: &str) -> bool {
        if let Some(e) = self
            .settings
            .iter_mut()
            .find(|e| e.iface == iface && e.key == key)
        {
            if e.applied == applied {
                return false;
            }
            e.applied = applied.to_string();
            return true;
        }
        if current == applied {
            return false;
        }
        self.settings.push(Entry {
            iface: iface.to_string(),
            key: key.to_string(),
            original: current.to_string(),
            applied: applied.to_string(),
        });
        true
    }

    /// Drops entries of interfaces that no longer exist (`all` and
    /// `default` always exist); returns whether any was dropped.
    pub fn prune(&mut self, exists: impl Fn(&str) -> bool) -> bool {
        let before = self.settings.len();
        self.settings
            .retain(|e| e.iface == "all" || e.iface == "default" || exists(&e.iface));
        self.settings.len() != before
    }

    /// Keeps the entries `keep` returns true for.
    pub fn retain(&mut self, keep: impl FnMut(&Entry) -> bool) {
        self.settings.retain(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_original_wins_and_unchanged_settings_are_not_recorded() {
        let mut j = Journal::default();
        assert!(!j.record("eth0", "rp_filter", "0", "0"), "no change");
        assert!(j.record("all", "rp_filter", "2", "0"));
        assert!(!j.record("all", "rp_filter", "0", "0"), "already ours");
        // Someone set it back to 1 and the agent writes 0 again: the
        // original stays the value from before the agent's first change.
        assert!(!j.record("all", "rp_filter", "1", "0"));
        assert_eq!(
            j.entries(),
            [Entry {
                iface: "all".into(),
                key: "rp_filter".into(),
                original: "2".into(),
                applied: "0".into()
            }]
        );
    }

    #[test]
    fn prune_keeps_all_and_default() {
        let mut j = Journal::default();
        for i in ["all", "default", "veth1", "eth0"] {
            j.record(i, "rp_filter", "1", "0");
        }
        assert!(j.prune(|i| i == "eth0"));
        let ifaces: Vec<&str> = j.entries().iter().map(|e| e.iface.as_str()).collect();
        assert_eq!(ifaces, ["all", "default", "eth0"]);
        assert!(!j.prune(|i| i == "eth0"));
    }

    #[test]
    fn save_load_remove_round_trip_and_bad_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/geneve-sysctls.json");
        assert_eq!(Journal::load(&path).unwrap().entries(), []);
        let mut j = Journal::load(&path).unwrap();
        j.record("all", "rp_filter", "1", "0");
        j.save(&path).unwrap();
        assert_eq!(Journal::load(&path).unwrap(), j);
        assert!(!path.with_extension("tmp").exists());
        Journal::remove(&path).unwrap();
        Journal::remove(&path).unwrap();

        std::fs::write(&path, "{not json").unwrap();
        let e = Journal::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("geneve-sysctls.json") && e.contains("not valid"),
            "{e}"
        );
        std::fs::write(&path, r#"{"version":7,"settings":[]}"#).unwrap();
        let e = Journal::load(&path).unwrap_err().to_string();
        assert!(e.contains("version 7"), "{e}");
    }
}
