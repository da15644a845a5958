//! The node's CNI config dir: find the primary config (the runtimes' choice:
//! the first `.conf`/`.conflist`/`.json` in lexical order; `.conflist` is a
//! plugin list, `.conf` and `.json` one plugin, as libcni, go-cni (containerd)
//! and CRI-O read them), keep istio-cni chained into it (or into our own
//! config that sorts first), and take it out again.
//!
//! As upstream's installer, files that do not load (see [`loadable`]) are
//! passed over, each named in a warning: the primary is the first file that
//! loads. The choice is made again on every pass, so when a file that sorts
//! earlier starts to load (fixed, or newly written) istio-cni is chained into
//! it from then on, as into any new primary. (Upstream keeps the file it chose
//! first for the life of the process and only warns that it was preempted.)
//!
//! Each mode removes the other's leftovers, so switching
//! `ISTIO_OWNED_CNI_CONFIG` on a running node converges: chained mode deletes
//! `02-istio-cni.conflist` (never a primary), owned mode takes istio-cni out
//! of every other config, and uninstall does both whatever the mode.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use super::atomic_write::{remove_stale_tmp, write_atomically};
use super::chain::{self, ChainError, ConfKind, Unchained};
use super::loadable;

/// Name of the config written in istio-owned mode (sorts before the usual
/// `10-*` primary configs).
pub const OWNED_CONFIG_NAME: &str = "02-istio-cni.conflist";

/// Top-level key of a `.conflist` we made from a single-plugin `.json`
/// config, naming that file, so uninstall gives it back under its own name
/// (a list made from a `.conf` needs none: `.conf` is the default).
pub const WRAPPED_FROM_KEY: &str = "istio_cni_wrapped_from";

/// Mode of the configs we write: owner only (CIS benchmark 1.1.9), as upstream;
/// `CNI_CONF_GROUP_READ=true` adds group read.
pub const CONFIG_MODE: u32 = 0o600;
pub const CONFIG_MODE_GROUP_READ: u32 = 0o640;

/// How the installer writes configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSettings {
    /// The istio-owned config's file name (default [`OWNED_CONFIG_NAME`]).
    pub owned_name: String,
    /// File mode of every config written ([`CONFIG_MODE`] or
    /// [`CONFIG_MODE_GROUP_READ`]).
    pub mode: u32,
}

impl Default for WriteSettings {
    fn default() -> Self {
        Self {
            owned_name: OWNED_CONFIG_NAME.into(),
            mode: CONFIG_MODE,
        }
    }
}

/// A config file passed over when looking for the primary: it does not load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file's name in the conf dir.
    pub file: String,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.reason)
    }
}

fn skipped_note(skipped: &[Skipped]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let list: Vec<String> = skipped.iter().map(Skipped::to_string).collect();
    format!("; skipped, as they do not load: {}", list.join("; "))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "waiting for a CNI config (.conf, .conflist or .json) in {dir}{}",
        skipped_note(skipped)
    )]
    NoConfig { dir: PathBuf, skipped: Vec<Skipped> },
    #[error("cannot list CNI config dir {dir}: {source}")]
    List {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read CNI config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI config {path} is not valid JSON: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("cannot write CNI config {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove CNI config {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{first} sorts before {ours} in {dir}: the runtime uses {first}, which has no istio-cni"
    )]
    OwnedShadowed {
        dir: PathBuf,
        first: String,
        ours: String,
    },
}

/// Config files in `dir`, in the order libcni considers them.
pub fn config_files(dir: &Path) -> Result<Vec<(String, ConfKind)>, ConfigError> {
    let entries = fs::read_dir(dir).map_err(|source| ConfigError::List {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<(String, ConfKind)> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kind = kind_of(&name)?;
            Some((name, kind))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn kind_of(name: &str) -> Option<ConfKind> {
    if name.ends_with(".conflist") {
        Some(ConfKind::List)
    } else if name.ends_with(".conf") || name.ends_with(".json") {
        // Runtimes read a `.json` exactly as a `.conf` (a list in it is
        // refused for lack of a `type`, here as there).
        Some(ConfKind::Single)
    } else {
        None
    }
}

fn read_json(path: &Path) -> Result<Value, ConfigError> {
    let bytes = fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_json(path: &Path, v: &Value, mode: u32) -> Result<(), ConfigError> {
    let mut text = serde_json::to_vec_pretty(v).expect("JSON values always serialise");
    text.push(b'\n');
    remove_stale_tmp(path);
    write_atomically(path, &text, mode).map_err(|source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn remove(path: &Path) -> Result<(), ConfigError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ConfigError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn with_ext(name: &str, ext: &str) -> String {
    let stem = name
        .strip_suffix(".conflist")
        .or_else(|| name.strip_suffix(".conf"))
        .or_else(|| name.strip_suffix(".json"))
        .unwrap_or(name);
    format!("{stem}.{ext}")
}

/// Picks the primary config: `explicit` if given (or the `.conflist` we
/// made of it), else the first config file that loads (the others before it
/// are warned about through `warned`, see [`SkipWarnings`]). Our own istio-owned config
/// (`owned`) is never the primary.
fn primary(
    dir: &Path,
    owned: &str,
    explicit: Option<&str>,
    warned: &SkipWarnings,
) -> Result<(String, ConfKind), ConfigError> {
    let files: Vec<_> = config_files(dir)?
        .into_iter()
        .filter(|(n, _)| n != owned)
        .collect();
    let mut skipped = Vec::new();
    let found = match explicit {
        Some(name) => files
            .iter()
            .find(|(n, _)| n == name)
            .or_else(|| {
                let wrapped = with_ext(name, "conflist");
                files.iter().find(|(n, _)| *n == wrapped)
            })
            .cloned(),
        None => first_that_loads(dir, files, &mut skipped),
    };
    warned.warn(dir, &skipped);
    found.ok_or_else(|| ConfigError::NoConfig {
        dir: dir.to_path_buf(),
        skipped,
    })
}

/// The first of `files` (in `dir`) that loads; those before it go to
/// `skipped`.
fn first_that_loads(
    dir: &Path,
    files: Vec<(String, ConfKind)>,
    skipped: &mut Vec<Skipped>,
) -> Option<(String, ConfKind)> {
    for (file, kind) in files {
        match loadable::load_problem(dir, &file, kind) {
            None => return Some((file, kind)),
            Some(reason) => skipped.push(Skipped { file, reason }),
        }
    }
    None
}

/// What was last warned about per conf dir, for one installer: its repair
/// loop looks every second, so a file that keeps failing to load is warned
/// about once (and again when its reason changes, or after it loaded in
/// between).
#[derive(Debug, Default)]
pub struct SkipWarnings {
    warned: Mutex<BTreeMap<PathBuf, Vec<Skipped>>>,
}

impl SkipWarnings {
    /// Logs the files passed over when looking for the primary in `dir`.
    fn warn(&self, dir: &Path, skipped: &[Skipped]) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        let before = warned.remove(dir).unwrap_or_default();
        for s in skipped {
            let file = dir.join(&s.file);
            if before.contains(s) {
                tracing::debug!(file = %file.display(), reason = %s.reason, "CNI config still skipped");
            } else {
                tracing::warn!(file = %file.display(), reason = %s.reason,
                    "CNI config skipped: it does not load (the primary is the first that does)");
            }
        }
        if !skipped.is_empty() {
            warned.insert(dir.to_path_buf(), skipped.to_vec());
        }
    }
}

/// Joins change descriptions into one (`None`: nothing changed).
fn joined(changes: Vec<String>) -> Option<String> {
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// Removes the istio-owned config `<dir>/<owned>` if it is there.
fn remove_owned_file(dir: &Path, owned: &str) -> Result<Option<String>, ConfigError> {
    let ours = dir.join(owned);
    if !ours.exists() {
        return Ok(None);
    }
    remove(&ours)?;
    Ok(Some(format!("removed {}", ours.display())))
}

/// Chained mode: makes sure the primary config carries `entry` (after
/// removing a leftover istio-owned config, which would otherwise sort
/// first and be what the runtime uses; `owned` is its file name). Returns a
/// description of what was changed, or `None` when nothing was.
pub fn ensure_chained(
    dir: &Path,
    w: &WriteSettings,
    entry: &Value,
    explicit: Option<&str>,
    warned: &SkipWarnings,
) -> Result<Option<String>, ConfigError> {
    let mut changes: Vec<String> = remove_owned_file(dir, &w.owned_name)?
        .map(|c| format!("{c} (left by istio-owned mode)"))
        .into_iter()
        .collect();
    let (name, kind) = primary(dir, &w.owned_name, explicit, warned)?;
    let path = dir.join(&name);
    let current = read_json(&path)?;
    match kind {
        ConfKind::List => {
            if !chain::is_chained(&current, entry) {
                let out = chain::chain(&current, kind, entry, &path.to_string_lossy())?;
                write_json(&path, &out, w.mode)?;
                changes.push(format!("chained istio-cni into {}", path.display()));
            }
        }
        ConfKind::Single => {
            let mut out = chain::chain(&current, kind, entry, &path.to_string_lossy())?;
            if !name.ends_with(".conf") {
                out[WRAPPED_FROM_KEY] = Value::String(name.clone());
            }
            let list = dir.join(with_ext(&name, "conflist"));
            write_json(&list, &out, w.mode)?;
            remove(&path)?;
            changes.push(format!(
                "wrapped {} with istio-cni into {}",
                path.display(),
                list.display()
            ));
        }
    }
    Ok(joined(changes))
}

/// Istio-owned mode: keeps `<dir>/<owned>` (default [`OWNED_CONFIG_NAME`])
/// equal to the primary config plus `entry`, and checks that it is the config
/// the runtime uses (sorts first). istio-cni entries in other configs (left
/// by chained mode) are taken out first, so the primary is the primary CNI's
/// own.
pub fn ensure_owned(
    dir: &Path,
    w: &WriteSettings,
    entry: &Value,
    explicit: Option<&str>,
    warned: &SkipWarnings,
) -> Result<Option<String>, ConfigError> {
    let owned = w.owned_name.as_str();
    let mut changes: Vec<String> = unchain_all(dir, w)?
        .into_iter()
        .map(|c| format!("{c} (left by chained mode)"))
        .collect();
    let (name, kind) = primary(dir, owned, explicit, warned)?;
    let primary_path = dir.join(&name);
    let primary_conf = read_json(&primary_path)?;
    let wanted = chain::chain(&primary_conf, kind, entry, &primary_path.to_string_lossy())?;
    let ours = dir.join(owned);
    match read_json(&ours) {
        Ok(current) if current == wanted => {}
        _ => {
            write_json(&ours, &wanted, w.mode)?;
            changes.push(format!(
                "wrote {} from {}",
                ours.display(),
                primary_path.display()
            ));
        }
    }
    // As upstream: the first config that loads must be ours.
    let first = config_files(dir)?
        .into_iter()
        .find(|(n, kind)| n == owned || loadable::load_problem(dir, n, *kind).is_none());
    match first {
        Some((first, _)) if first != owned => Err(ConfigError::OwnedShadowed {
            dir: dir.to_path_buf(),
            first,
            ours: owned.into(),
        }),
        _ => Ok(joined(changes)),
    }
}

/// Uninstall, in either mode: removes the istio-owned config `owned` and
/// takes istio-cni out of every other config list in `dir` (see
/// [`unchain_all`]). Returns what changed.
pub fn remove_all(dir: &Path, w: &WriteSettings) -> Result<Vec<String>, ConfigError> {
    let mut changed: Vec<String> = remove_owned_file(dir, &w.owned_name)?.into_iter().collect();
    changed.extend(unchain_all(dir, w)?);
    Ok(changed)
}

/// Takes istio-cni out of every config list in `dir` except the
/// istio-owned config `owned`, turning a list we made from a `.conf` or `.json`
/// back into that file (unless the primary CNI has written a new one
/// meanwhile). A missing dir is not an error. Returns what changed.
fn unchain_all(dir: &Path, w: &WriteSettings) -> Result<Vec<String>, ConfigError> {
    let mut changed = Vec::new();
    let files = match config_files(dir) {
        Ok(f) => f,
        Err(ConfigError::List { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(changed);
        }
        Err(e) => return Err(e),
    };
    for (name, kind) in files {
        if kind != ConfKind::List || name == w.owned_name {
            continue;
        }
        let path = dir.join(&name);
        let Ok(current) = read_json(&path) else {
            continue;
        };
        match chain::unchain(&current) {
            Unchained::Unchanged => {}
            Unchained::List(v) => {
                write_json(&path, &v, w.mode)?;
                changed.push(format!("removed istio-cni from {}", path.display()));
            }
            Unchained::Single(v) => {
                let original = current
                    .get(WRAPPED_FROM_KEY)
                    .and_then(Value::as_str)
                    .filter(|n| !n.contains('/') && kind_of(n) == Some(ConfKind::Single))
                    .map(String::from)
                    .unwrap_or_else(|| with_ext(&name, "conf"));
                let conf = dir.join(original);
                if conf.exists() {
                    changed.push(format!(
                        "removed {} ({} was rewritten by the primary CNI)",
                        path.display(),
                        conf.display()
                    ));
                } else {
                    write_json(&conf, &v, w.mode)?;
                    changed.push(format!(
                        "restored {} from {}",
                        conf.display(),
                        path.display()
                    ));
                }
                remove(&path)?;
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::warnings;
    use serde_json::json;

    fn entry() -> Value {
        json!({"type": "istio-cni", "name": "istio-cni", "ambient_enabled": true})
    }

    #[test]
    fn lexical_order_and_extensions() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "20-b.conflist",
            "10-a.conf",
            "05-x.json",
            "99-z.conflist.tmp.1.2",
            "README",
        ] {
            fs::write(d.path().join(n), "{}").unwrap();
        }
        fs::create_dir(d.path().join("00-dir.conf")).unwrap();
        let names: Vec<String> = config_files(d.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["05-x.json", "10-a.conf", "20-b.conflist"]);
    }

    #[test]
    fn waits_for_a_config() {
        let d = tempfile::tempdir().unwrap();
        let e = ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::NoConfig { .. }));
        assert!(e.to_string().contains(&d.path().display().to_string()));
    }

    #[test]
    fn conf_is_wrapped_then_left_alone_then_restored() {
        let d = tempfile::tempdir().unwrap();
        let orig = json!({"cniVersion": "0.4.0", "name": "k8s", "type": "bridge"});
        fs::write(d.path().join("10-bridge.conf"), orig.to_string()).unwrap();
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_some()
        );
        assert!(!d.path().join("10-bridge.conf").exists());
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );
        // The primary CNI writes its .conf again: it sorts first, so it is wrapped again.
        fs::write(d.path().join("10-bridge.conf"), orig.to_string()).unwrap();
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_some()
        );
        assert_eq!(config_files(d.path()).unwrap().len(), 1);
        let changed = remove_all(d.path(), &WriteSettings::default()).unwrap();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(read_json(&d.path().join("10-bridge.conf")).unwrap(), orig);
        assert!(!d.path().join("10-bridge.conflist").exists());
    }

    #[test]
    fn explicit_primary_name_follows_the_wrap() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("00-other.conflist"),
            json!({"cniVersion":"1.0.0","name":"o","plugins":[{"type":"x"}]}).to_string(),
        )
        .unwrap();
        fs::write(
            d.path().join("10-bridge.conf"),
            json!({"cniVersion":"1.0.0","name":"k","type":"bridge"}).to_string(),
        )
        .unwrap();
        ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            Some("10-bridge.conf"),
            &SkipWarnings::default(),
        )
        .unwrap();
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                Some("10-bridge.conf"),
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );
        let other = read_json(&d.path().join("00-other.conflist")).unwrap();
        assert_eq!(
            other["plugins"].as_array().unwrap().len(),
            1,
            "00-other untouched"
        );
    }

    #[test]
    fn owned_config_tracks_primary_and_must_sort_first() {
        let d = tempfile::tempdir().unwrap();
        let primary = json!({"cniVersion":"1.0.0","name":"k","plugins":[{"type":"bridge"}]});
        fs::write(d.path().join("10-k.conflist"), primary.to_string()).unwrap();
        assert!(
            ensure_owned(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_some()
        );
        assert!(
            ensure_owned(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );
        assert_eq!(
            read_json(&d.path().join("10-k.conflist")).unwrap(),
            primary,
            "primary untouched"
        );
        let ours = read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap();
        assert_eq!(ours["plugins"][1], entry());
        // primary drifts: our copy follows
        let primary2 = json!({"cniVersion":"1.0.0","name":"k","plugins":[{"type":"bridge"},{"type":"portmap"}]});
        fs::write(d.path().join("10-k.conflist"), primary2.to_string()).unwrap();
        assert!(
            ensure_owned(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_some()
        );
        assert_eq!(
            read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap()["plugins"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        fs::write(d.path().join("01-first.conflist"), primary.to_string()).unwrap();
        let e = ensure_owned(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            Some("10-k.conflist"),
            &SkipWarnings::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::OwnedShadowed { .. }), "{e}");
        assert_eq!(
            remove_all(d.path(), &WriteSettings::default())
                .unwrap()
                .len(),
            1
        );
        assert!(
            remove_all(d.path(), &WriteSettings::default())
                .unwrap()
                .is_empty()
        );
    }

    fn has_entry(path: &Path) -> bool {
        read_json(path).unwrap()["plugins"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["type"] == "istio-cni"))
    }

    fn list(name: &str) -> Value {
        json!({"cniVersion":"1.0.0","name":name,"plugins":[{"type":"bridge"}]})
    }

    /// Configs we write are owner-only by default (CIS 1.1.9), group-readable
    /// with `CNI_CONF_GROUP_READ`, in both modes.
    #[test]
    fn written_configs_have_the_configured_mode() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for (w, want) in [
            (WriteSettings::default(), 0o600),
            (
                WriteSettings {
                    mode: CONFIG_MODE_GROUP_READ,
                    ..WriteSettings::default()
                },
                0o640,
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let primary = d.path().join("10-k.conflist");
            fs::write(&primary, list("k").to_string()).unwrap();
            fs::set_permissions(&primary, fs::Permissions::from_mode(0o644)).unwrap();
            ensure_chained(d.path(), &w, &entry(), None, &SkipWarnings::default()).unwrap();
            assert_eq!(mode(&primary), want, "chained primary");
            ensure_owned(d.path(), &w, &entry(), None, &SkipWarnings::default()).unwrap();
            assert_eq!(
                mode(&d.path().join(OWNED_CONFIG_NAME)),
                want,
                "owned config"
            );
            assert_eq!(mode(&primary), want, "unchained primary");
        }
    }

    #[test]
    fn json_single_config_is_the_primary_and_comes_back_as_json() {
        let d = tempfile::tempdir().unwrap();
        let orig = json!({"cniVersion": "0.4.0", "name": "k8s", "type": "bridge"});
        fs::write(d.path().join("05-k.json"), orig.to_string()).unwrap();
        fs::write(d.path().join("10-other.conflist"), list("o").to_string()).unwrap();
        let change = ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap()
        .unwrap();
        assert!(change.contains("05-k.json"), "{change}");
        assert!(!d.path().join("05-k.json").exists());
        let wrapped = read_json(&d.path().join("05-k.conflist")).unwrap();
        assert_eq!(wrapped["plugins"][0], orig);
        assert_eq!(wrapped["plugins"][1], entry());
        assert_eq!(wrapped[WRAPPED_FROM_KEY], "05-k.json");
        assert!(!has_entry(&d.path().join("10-other.conflist")));
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );
        // An explicit name still finds it after the wrap.
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                Some("05-k.json"),
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );
        assert_eq!(
            remove_all(d.path(), &WriteSettings::default())
                .unwrap()
                .len(),
            1
        );
        assert_eq!(read_json(&d.path().join("05-k.json")).unwrap(), orig);
        assert!(!d.path().join("05-k.conf").exists());
        assert!(!d.path().join("05-k.conflist").exists());
    }

    #[test]
    fn json_holding_a_list_is_refused_naming_the_file() {
        // Runtimes read .json as one plugin: a list there has no `type`, so
        // it does not load, and is named while nothing else does.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("05-l.json"), list("l").to_string()).unwrap();
        let e = ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::NoConfig { .. }), "{msg}");
        assert!(msg.contains("05-l.json") && msg.contains("type"), "{msg}");
        assert_eq!(read_json(&d.path().join("05-l.json")).unwrap(), list("l"));
    }

    /// Files that sort first but do not load (as upstream's installer checks
    /// them with libcni) are passed over, untouched, each warned about once
    /// with its reason; the first file that loads is chained.
    #[test]
    fn configs_that_do_not_load_are_skipped_and_warned_about() {
        let d = tempfile::tempdir().unwrap();
        let bad = [
            ("00-garbage.conflist", "{ not json".to_string()),
            (
                "01-no-plugins.conflist",
                json!({"cniVersion":"1.0.0","name":"n"}).to_string(),
            ),
            (
                "02-empty.conflist",
                json!({"cniVersion":"1.0.0","name":"e","plugins":[]}).to_string(),
            ),
            (
                "03-no-type.conf",
                json!({"cniVersion":"1.0.0","name":"t"}).to_string(),
            ),
        ];
        for (name, text) in &bad {
            fs::write(d.path().join(name), text).unwrap();
        }
        let primary = d.path().join("10-k.conflist");
        fs::write(&primary, list("k").to_string()).unwrap();

        let memo = SkipWarnings::default(); // one installer's
        let logged = warnings(|| {
            let change = ensure_chained(d.path(), &WriteSettings::default(), &entry(), None, &memo)
                .unwrap()
                .unwrap();
            assert!(change.contains("10-k.conflist"), "{change}");
        });
        assert!(has_entry(&primary));
        for (name, text) in &bad {
            assert_eq!(&fs::read_to_string(d.path().join(name)).unwrap(), text);
            let line = logged.lines().find(|l| l.contains(name));
            assert!(line.is_some_and(|l| l.contains("WARN")), "{name}: {logged}");
        }
        for reason in [
            "not valid JSON",
            "no \"plugins\"",
            "no plugins",
            "no \"type\"",
        ] {
            assert!(logged.contains(reason), "{reason}: {logged}");
        }
        // The repair loop looks again and again: no new warning.
        let logged = warnings(|| {
            assert!(
                ensure_chained(d.path(), &WriteSettings::default(), &entry(), None, &memo)
                    .unwrap()
                    .is_none()
            );
        });
        assert!(logged.is_empty(), "{logged}");
        // Another installer (its own memo) warns about each file once too.
        let other = SkipWarnings::default();
        for round in 0..2 {
            let logged = warnings(|| {
                assert!(
                    ensure_chained(d.path(), &WriteSettings::default(), &entry(), None, &other)
                        .unwrap()
                        .is_none()
                );
            });
            for (name, _) in &bad {
                assert_eq!(logged.contains(name), round == 0, "{name}: {logged}");
            }
        }
    }

    /// A skipped file that is fixed becomes the primary (the first that
    /// loads), as a new primary would; the old one keeps its entry until
    /// uninstall, which takes it out of both.
    #[test]
    fn a_skipped_config_that_is_fixed_becomes_the_primary() {
        let d = tempfile::tempdir().unwrap();
        let first = d.path().join("05-a.conflist");
        let later = d.path().join("10-k.conflist");
        fs::write(&first, json!({"cniVersion":"1.0.0","name":"a"}).to_string()).unwrap();
        fs::write(&later, list("k").to_string()).unwrap();
        ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap();
        assert!(has_entry(&later) && !has_entry(&first));

        fs::write(&first, list("a").to_string()).unwrap();
        let change = ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap()
        .unwrap();
        assert!(change.contains("05-a.conflist"), "{change}");
        assert!(has_entry(&first));
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );
        assert_eq!(
            remove_all(d.path(), &WriteSettings::default())
                .unwrap()
                .len(),
            2
        );
        assert_eq!(read_json(&first).unwrap(), list("a"));
        assert_eq!(read_json(&later).unwrap(), list("k"));
    }

    #[test]
    fn nothing_that_loads_waits_naming_every_skipped_file() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("05-a.conflist"), "[]").unwrap();
        fs::write(d.path().join("10-b.conf"), r#"{"name":"b"}"#).unwrap();
        let e = ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(&e, ConfigError::NoConfig { skipped, .. } if skipped.len() == 2));
        assert!(msg.starts_with("waiting for a CNI config"), "{msg}");
        assert!(
            msg.contains("05-a.conflist: not a JSON object") && msg.contains("10-b.conf: no"),
            "{msg}"
        );
        let e = ensure_owned(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::NoConfig { .. }), "{e}");
    }

    #[test]
    fn owned_config_is_built_from_and_shadowed_by_configs_that_load_only() {
        let d = tempfile::tempdir().unwrap();
        let broken = json!({"cniVersion":"1.0.0","name":"b"});
        fs::write(d.path().join("01-broken.conflist"), broken.to_string()).unwrap();
        fs::write(d.path().join("10-k.conflist"), list("k").to_string()).unwrap();
        let change = ensure_owned(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap()
        .unwrap();
        assert!(change.contains("10-k.conflist"), "{change}");
        let ours = read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap();
        assert_eq!(ours["name"], "k");
        assert_eq!(
            read_json(&d.path().join("01-broken.conflist")).unwrap(),
            broken
        );
        // Once it loads it sorts before ours: the runtime would use it.
        fs::write(d.path().join("01-broken.conflist"), list("b").to_string()).unwrap();
        let e = ensure_owned(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            Some("10-k.conflist"),
            &SkipWarnings::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::OwnedShadowed { .. }), "{e}");
    }

    #[test]
    fn chained_then_owned_then_uninstall_leaves_no_entry() {
        let d = tempfile::tempdir().unwrap();
        let primary = d.path().join("10-k.conflist");
        fs::write(&primary, list("k").to_string()).unwrap();
        let bridge = json!({"cniVersion": "1.0.0", "name": "b", "type": "bridge"});
        fs::write(d.path().join("20-b.conf"), bridge.to_string()).unwrap();
        ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap();
        ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            Some("20-b.conf"),
            &SkipWarnings::default(),
        )
        .unwrap();
        assert!(has_entry(&primary) && has_entry(&d.path().join("20-b.conflist")));

        let change = ensure_owned(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap()
        .unwrap();
        assert!(change.contains("left by chained mode"), "{change}");
        assert_eq!(
            read_json(&primary).unwrap(),
            list("k"),
            "primary is its own again"
        );
        assert_eq!(read_json(&d.path().join("20-b.conf")).unwrap(), bridge);
        let ours = read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap();
        assert_eq!(ours["plugins"].as_array().unwrap().len(), 2);
        assert!(
            ensure_owned(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );

        remove_all(d.path(), &WriteSettings::default()).unwrap();
        let names: Vec<String> = config_files(d.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["10-k.conflist", "20-b.conf"]);
        assert_eq!(read_json(&primary).unwrap(), list("k"));
    }

    #[test]
    fn owned_then_chained_chains_the_real_primary() {
        let d = tempfile::tempdir().unwrap();
        let primary = d.path().join("10-k.conflist");
        fs::write(&primary, list("k").to_string()).unwrap();
        ensure_owned(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap();
        let ours = d.path().join(OWNED_CONFIG_NAME);
        assert!(ours.exists());

        let change = ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap()
        .unwrap();
        assert!(change.contains("left by istio-owned mode"), "{change}");
        assert!(!ours.exists(), "the owned copy is not a primary");
        assert!(has_entry(&primary));
        assert!(
            ensure_chained(
                d.path(),
                &WriteSettings::default(),
                &entry(),
                None,
                &SkipWarnings::default()
            )
            .unwrap()
            .is_none()
        );
        remove_all(d.path(), &WriteSettings::default()).unwrap();
        assert_eq!(read_json(&primary).unwrap(), list("k"));
    }

    #[test]
    fn uninstall_removes_both_modes_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let primary = d.path().join("10-k.conflist");
        fs::write(&primary, list("k").to_string()).unwrap();
        ensure_chained(
            d.path(),
            &WriteSettings::default(),
            &entry(),
            None,
            &SkipWarnings::default(),
        )
        .unwrap();
        // A copy as istio-owned mode would have written it, next to the chained entry.
        let owned = chain::chain(&list("k"), ConfKind::List, &entry(), "x").unwrap();
        fs::write(d.path().join(OWNED_CONFIG_NAME), owned.to_string()).unwrap();
        let changed = remove_all(d.path(), &WriteSettings::default()).unwrap();
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert!(!d.path().join(OWNED_CONFIG_NAME).exists());
        assert_eq!(read_json(&primary).unwrap(), list("k"));
        assert!(
            remove_all(&d.path().join("missing"), &WriteSettings::default())
                .unwrap()
                .is_empty()
        );
    }
}
