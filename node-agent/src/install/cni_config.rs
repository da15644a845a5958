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
mod tests;
