//! Whether a CNI config file loads, judged as upstream's installer judges it
//! when it looks for the primary config (it loads each file with libcni,
//! v1.3, and passes over those that fail): the first file that loads is the
//! primary. Only the checks libcni makes are made here; whether istio-cni
//! can be chained into the file is `chain`'s business.
//!
//! - `.conf` / `.json`: one plugin (a JSON object whose `type` is a non-empty
//!   string).
//! - `.conflist`: a JSON object with a string `name`; `cniVersion` a string
//!   and `cniVersions` a list of versions when present; `disableCheck`,
//!   `disableGC`, `loadOnlyInlinedPlugins` booleans (or `"true"`/`"false"`)
//!   when present; `plugins` a non-empty list of plugins when present. Unless
//!   `loadOnlyInlinedPlugins`, the `.conf` plugin files in `<dir>/<name>/`
//!   are loaded too; at least one plugin in all.
//!
//! Not modelled: Go's case-insensitive matching of a plugin's field names,
//! and the types of fields nested in `ipam`, `dns` and `capabilities`.

use std::fs;
use std::path::Path;

use serde_json::Value;

use super::chain::ConfKind;

/// Why config file `name` in `dir` does not load (`None`: it does).
pub fn load_problem(dir: &Path, name: &str, kind: ConfKind) -> Option<String> {
    let v = match read(&dir.join(name)) {
        Ok(v) => v,
        Err(why) => return Some(why),
    };
    match kind {
        ConfKind::Single => plugin_problem(&v),
        ConfKind::List => list_problem(dir, &v),
    }
}

fn read(path: &Path) -> Result<Value, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON: {e}"))
}

/// A plugin as libcni decodes one (JSON `null` decodes to an empty plugin).
fn plugin_problem(v: &Value) -> Option<String> {
    let m = match v {
        Value::Object(m) => m,
        Value::Null => return Some(no_type()),
        _ => return Some("not a JSON object".into()),
    };
    for key in ["cniVersion", "name", "type"] {
        if !matches!(m.get(key), None | Some(Value::Null | Value::String(_))) {
            return Some(format!("{key:?} is not a string"));
        }
    }
    for key in ["capabilities", "ipam", "dns", "prevResult"] {
        if !matches!(m.get(key), None | Some(Value::Null | Value::Object(_))) {
            return Some(format!("{key:?} is not an object"));
        }
    }
    match m.get("type").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => None,
        _ => Some(no_type()),
    }
}

fn no_type() -> String {
    "no \"type\" (a plugin list in a single-plugin file?)".into()
}

fn list_problem(dir: &Path, v: &Value) -> Option<String> {
    let Value::Object(m) = v else {
        return Some("not a JSON object".into());
    };
    let name = match m.get("name") {
        Some(Value::String(n)) => n,
        Some(_) => return Some("\"name\" is not a string".into()),
        None => return Some("no \"name\"".into()),
    };
    let version = match m.get("cniVersion") {
        None => None,
        Some(Value::String(v)) => Some(v.as_str()),
        Some(_) => return Some("\"cniVersion\" is not a string".into()),
    };
    if let Some(vs) = m.get("cniVersions") {
        let Some(list) = vs.as_array() else {
            return Some("\"cniVersions\" is not a list".into());
        };
        let bad = list
            .iter()
            .find(|v| !v.as_str().is_some_and(is_version))
            .map(Value::to_string)
            .or_else(|| version.filter(|v| !is_version(v)).map(String::from));
        if let Some(bad) = bad {
            return Some(format!("invalid CNI version {bad}"));
        }
    }
    let mut inlined_only = false;
    for key in ["disableCheck", "disableGC", "loadOnlyInlinedPlugins"] {
        let on = match m.get(key) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
            Some(_) => return Some(format!("{key:?} is not a boolean")),
        };
        inlined_only |= key == "loadOnlyInlinedPlugins" && on;
    }
    let mut plugins = 0;
    match m.get("plugins") {
        None if inlined_only => {
            return Some("no \"plugins\" although \"loadOnlyInlinedPlugins\" is set".into());
        }
        None => {}
        Some(Value::Array(list)) if list.is_empty() => {
            return Some("no plugins in \"plugins\"".into());
        }
        Some(Value::Array(list)) => {
            for (i, p) in list.iter().enumerate() {
                if let Some(why) = plugin_problem(p) {
                    return Some(format!("plugin {i}: {why}"));
                }
            }
            plugins = list.len();
        }
        Some(_) => return Some("\"plugins\" is not a list".into()),
    }
    if !inlined_only {
        // As Go's filepath.Join: an absolute name stays under `dir`.
        match plugin_files(&dir.join(name.trim_start_matches('/'))) {
            Ok(n) => plugins += n,
            Err(why) => return Some(why),
        }
    }
    (plugins == 0).then(|| format!("no \"plugins\" and no plugin files in {name}/"))
}

/// Loads the `.conf` plugin files of a list's own dir; a missing dir has none.
fn plugin_files(dir: &Path) -> Result<usize, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("cannot list plugin dir {}: {e}", dir.display())),
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".conf") || e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        let why = match read(&path) {
            Ok(v) => plugin_problem(&v),
            Err(why) => Some(why),
        };
        if let Some(why) = why {
            return Err(format!("plugin file {}: {why}", path.display()));
        }
        n += 1;
    }
    Ok(n)
}

/// A CNI version as libcni parses one: empty, or up to three dot-separated
/// integers.
fn is_version(v: &str) -> bool {
    v.is_empty() || {
        let parts: Vec<&str> = v.split('.').collect();
        parts.len() <= 3 && parts.iter().all(|p| p.parse::<i64>().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problem(kind: ConfKind, v: &Value) -> Option<String> {
        let d = tempfile::tempdir().unwrap();
        let name = match kind {
            ConfKind::Single => "10-x.conf",
            ConfKind::List => "10-x.conflist",
        };
        fs::write(d.path().join(name), v.to_string()).unwrap();
        load_problem(d.path(), name, kind)
    }

    #[test]
    fn single_plugin_configs() {
        let ok = json!({"cniVersion": "1.0.0", "name": "k", "type": "bridge", "ipam": {}});
        assert_eq!(problem(ConfKind::Single, &ok), None);
        // No name, no version: libcni loads it (chaining may still refuse it).
        assert_eq!(problem(ConfKind::Single, &json!({"type": "bridge"})), None);
        for (bad, why) in [
            (json!({"cniVersion": "1.0.0", "name": "k"}), "type"),
            (json!({"type": ""}), "type"),
            (json!(null), "type"),
            (
                json!({"name": "l", "plugins": [{"type": "bridge"}]}),
                "type",
            ),
            (json!({"type": 3}), "\"type\" is not a string"),
            (json!({"type": "bridge", "name": ["k"]}), "\"name\""),
            (json!({"type": "bridge", "ipam": "host-local"}), "\"ipam\""),
            (json!([{"type": "bridge"}]), "not a JSON object"),
        ] {
            let got = problem(ConfKind::Single, &bad).unwrap_or_default();
            assert!(got.contains(why), "{bad}: {got:?}");
        }
    }

    #[test]
    fn config_lists() {
        let ok = json!({"cniVersion": "1.0.0", "name": "k", "disableCheck": "TRUE",
                        "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
        assert_eq!(problem(ConfKind::List, &ok), None);
        let versions = json!({"cniVersions": ["0.4.0", "1.1.0"], "name": "k",
                              "plugins": [{"type": "bridge"}]});
        assert_eq!(problem(ConfKind::List, &versions), None);
        for (bad, why) in [
            (json!({"name": "k"}), "no \"plugins\""),
            (json!({"name": "k", "plugins": []}), "no plugins"),
            (
                json!({"name": "k", "plugins": {"type": "bridge"}}),
                "not a list",
            ),
            (
                json!({"name": "k", "plugins": [{"type": "bridge"}, {"x": 1}]}),
                "plugin 1",
            ),
            (json!({"plugins": [{"type": "bridge"}]}), "no \"name\""),
            (
                json!({"name": 1, "plugins": [{"type": "bridge"}]}),
                "\"name\"",
            ),
            (
                json!({"name": "k", "cniVersion": 1, "plugins": [{"type": "b"}]}),
                "cniVersion",
            ),
            (
                json!({"name": "k", "cniVersions": ["1.x"], "plugins": [{"type": "b"}]}),
                "1.x",
            ),
            (
                json!({"name": "k", "disableGC": "yes", "plugins": [{"type": "b"}]}),
                "disableGC",
            ),
            (
                json!({"name": "k", "loadOnlyInlinedPlugins": true}),
                "loadOnlyInlinedPlugins",
            ),
            (json!(["k"]), "not a JSON object"),
        ] {
            let got = problem(ConfKind::List, &bad).unwrap_or_default();
            assert!(got.contains(why), "{bad}: {got:?}");
        }
    }

    #[test]
    fn unreadable_and_unparsable_files() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("10-a.conflist"), "{ not json").unwrap();
        let why = load_problem(d.path(), "10-a.conflist", ConfKind::List).unwrap();
        assert!(why.contains("not valid JSON"), "{why}");
        let why = load_problem(d.path(), "10-gone.conf", ConfKind::Single).unwrap();
        assert!(why.contains("cannot read"), "{why}");
    }

    #[test]
    fn a_lists_plugin_files_count_and_must_load() {
        let d = tempfile::tempdir().unwrap();
        let list = json!({"cniVersion": "1.0.0", "name": "net"});
        fs::write(d.path().join("10-net.conflist"), list.to_string()).unwrap();
        let check = || load_problem(d.path(), "10-net.conflist", ConfKind::List);
        assert!(check().unwrap().contains("no plugin files in net/"));
        fs::create_dir(d.path().join("net")).unwrap();
        fs::write(d.path().join("net/README"), "not a plugin").unwrap();
        fs::write(d.path().join("net/10-bridge.conf"), r#"{"type":"bridge"}"#).unwrap();
        assert_eq!(check(), None);
        fs::write(d.path().join("net/20-bad.conf"), r#"{"name":"x"}"#).unwrap();
        let why = check().unwrap();
        assert!(why.contains("20-bad.conf") && why.contains("type"), "{why}");
        // Inlined plugins only: the dir is not read, and "plugins" is needed.
        let inlined = json!({"name": "net", "loadOnlyInlinedPlugins": "true",
                             "plugins": [{"type": "bridge"}]});
        fs::write(d.path().join("10-net.conflist"), inlined.to_string()).unwrap();
        assert_eq!(check(), None);
    }

    #[test]
    fn versions_as_libcni_parses_them() {
        for ok in ["", "1", "0.4", "1.0.0", "+1.-0.0"] {
            assert!(is_version(ok), "{ok:?}");
        }
        for bad in ["1.0.0.0", "v1", "1..0", "1.0.x", " 1"] {
            assert!(!is_version(bad), "{bad:?}");
        }
    }
}
