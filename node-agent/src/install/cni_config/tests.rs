use super::*;
use crate::test_support::warnings;
use serde_json::json;

fn entry() -> Value {
    json!({"type": "istio-cni", "name": "istio-cni", "ambient_enabled": true})
}

/// What `ensure_chained` and `ensure_owned` return.
type Outcome = Result<Option<String>, ConfigError>;

/// Chained mode in `dir` with the default settings, [`entry`] and a fresh
/// warning memo, the runtime's choice of primary.
fn chained(dir: &Path) -> Outcome {
    chained_memo(dir, &SkipWarnings::default())
}

/// [`chained`] with the primary named.
fn chained_to(dir: &Path, primary: &str) -> Outcome {
    ensure_chained(
        dir,
        &WriteSettings::default(),
        &entry(),
        Some(primary),
        &SkipWarnings::default(),
    )
}

/// [`chained`] warning through `memo` (one installer's).
fn chained_memo(dir: &Path, memo: &SkipWarnings) -> Outcome {
    ensure_chained(dir, &WriteSettings::default(), &entry(), None, memo)
}

/// Istio-owned mode in `dir`, as [`chained`].
fn owned(dir: &Path) -> Outcome {
    ensure_owned(
        dir,
        &WriteSettings::default(),
        &entry(),
        None,
        &SkipWarnings::default(),
    )
}

/// [`owned`] with the primary named.
fn owned_from(dir: &Path, primary: &str) -> Outcome {
    ensure_owned(
        dir,
        &WriteSettings::default(),
        &entry(),
        Some(primary),
        &SkipWarnings::default(),
    )
}

/// Uninstall from `dir` with the default settings: what changed.
fn uninstall(dir: &Path) -> Vec<String> {
    remove_all(dir, &WriteSettings::default()).unwrap()
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
    let e = chained(d.path()).unwrap_err();
    assert!(matches!(e, ConfigError::NoConfig { .. }));
    assert!(e.to_string().contains(&d.path().display().to_string()));
}

#[test]
fn conf_is_wrapped_then_left_alone_then_restored() {
    let d = tempfile::tempdir().unwrap();
    let orig = json!({"cniVersion": "0.4.0", "name": "k8s", "type": "bridge"});
    fs::write(d.path().join("10-bridge.conf"), orig.to_string()).unwrap();
    assert!(chained(d.path()).unwrap().is_some());
    assert!(!d.path().join("10-bridge.conf").exists());
    assert!(chained(d.path()).unwrap().is_none());
    // The primary CNI writes its .conf again: it sorts first, so it is wrapped again.
    fs::write(d.path().join("10-bridge.conf"), orig.to_string()).unwrap();
    assert!(chained(d.path()).unwrap().is_some());
    assert_eq!(config_files(d.path()).unwrap().len(), 1);
    let changed = uninstall(d.path());
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
    chained_to(d.path(), "10-bridge.conf").unwrap();
    assert!(chained_to(d.path(), "10-bridge.conf").unwrap().is_none());
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
    assert!(owned(d.path()).unwrap().is_some());
    assert!(owned(d.path()).unwrap().is_none());
    assert_eq!(
        read_json(&d.path().join("10-k.conflist")).unwrap(),
        primary,
        "primary untouched"
    );
    let ours = read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap();
    assert_eq!(ours["plugins"][1], entry());
    // primary drifts: our copy follows
    let primary2 =
        json!({"cniVersion":"1.0.0","name":"k","plugins":[{"type":"bridge"},{"type":"portmap"}]});
    fs::write(d.path().join("10-k.conflist"), primary2.to_string()).unwrap();
    assert!(owned(d.path()).unwrap().is_some());
    assert_eq!(
        read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap()["plugins"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    fs::write(d.path().join("01-first.conflist"), primary.to_string()).unwrap();
    let e = owned_from(d.path(), "10-k.conflist").unwrap_err();
    assert!(matches!(e, ConfigError::OwnedShadowed { .. }), "{e}");
    assert_eq!(uninstall(d.path()).len(), 1);
    assert!(uninstall(d.path()).is_empty());
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
    let change = chained(d.path()).unwrap().unwrap();
    assert!(change.contains("05-k.json"), "{change}");
    assert!(!d.path().join("05-k.json").exists());
    let wrapped = read_json(&d.path().join("05-k.conflist")).unwrap();
    assert_eq!(wrapped["plugins"][0], orig);
    assert_eq!(wrapped["plugins"][1], entry());
    assert_eq!(wrapped[WRAPPED_FROM_KEY], "05-k.json");
    assert!(!has_entry(&d.path().join("10-other.conflist")));
    assert!(chained(d.path()).unwrap().is_none());
    // An explicit name still finds it after the wrap.
    assert!(chained_to(d.path(), "05-k.json").unwrap().is_none());
    assert_eq!(uninstall(d.path()).len(), 1);
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
    let e = chained(d.path()).unwrap_err();
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
        let change = chained_memo(d.path(), &memo).unwrap().unwrap();
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
        assert!(chained_memo(d.path(), &memo).unwrap().is_none());
    });
    assert!(logged.is_empty(), "{logged}");
    // Another installer (its own memo) warns about each file once too.
    let other = SkipWarnings::default();
    for round in 0..2 {
        let logged = warnings(|| {
            assert!(chained_memo(d.path(), &other).unwrap().is_none());
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
    chained(d.path()).unwrap();
    assert!(has_entry(&later) && !has_entry(&first));

    fs::write(&first, list("a").to_string()).unwrap();
    let change = chained(d.path()).unwrap().unwrap();
    assert!(change.contains("05-a.conflist"), "{change}");
    assert!(has_entry(&first));
    assert!(chained(d.path()).unwrap().is_none());
    assert_eq!(uninstall(d.path()).len(), 2);
    assert_eq!(read_json(&first).unwrap(), list("a"));
    assert_eq!(read_json(&later).unwrap(), list("k"));
}

#[test]
fn nothing_that_loads_waits_naming_every_skipped_file() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("05-a.conflist"), "[]").unwrap();
    fs::write(d.path().join("10-b.conf"), r#"{"name":"b"}"#).unwrap();
    let e = chained(d.path()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(&e, ConfigError::NoConfig { skipped, .. } if skipped.len() == 2));
    assert!(msg.starts_with("waiting for a CNI config"), "{msg}");
    assert!(
        msg.contains("05-a.conflist: not a JSON object") && msg.contains("10-b.conf: no"),
        "{msg}"
    );
    let e = owned(d.path()).unwrap_err();
    assert!(matches!(e, ConfigError::NoConfig { .. }), "{e}");
}

#[test]
fn owned_config_is_built_from_and_shadowed_by_configs_that_load_only() {
    let d = tempfile::tempdir().unwrap();
    let broken = json!({"cniVersion":"1.0.0","name":"b"});
    fs::write(d.path().join("01-broken.conflist"), broken.to_string()).unwrap();
    fs::write(d.path().join("10-k.conflist"), list("k").to_string()).unwrap();
    let change = owned(d.path()).unwrap().unwrap();
    assert!(change.contains("10-k.conflist"), "{change}");
    let ours = read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap();
    assert_eq!(ours["name"], "k");
    assert_eq!(
        read_json(&d.path().join("01-broken.conflist")).unwrap(),
        broken
    );
    // Once it loads it sorts before ours: the runtime would use it.
    fs::write(d.path().join("01-broken.conflist"), list("b").to_string()).unwrap();
    let e = owned_from(d.path(), "10-k.conflist").unwrap_err();
    assert!(matches!(e, ConfigError::OwnedShadowed { .. }), "{e}");
}

#[test]
fn chained_then_owned_then_uninstall_leaves_no_entry() {
    let d = tempfile::tempdir().unwrap();
    let primary = d.path().join("10-k.conflist");
    fs::write(&primary, list("k").to_string()).unwrap();
    let bridge = json!({"cniVersion": "1.0.0", "name": "b", "type": "bridge"});
    fs::write(d.path().join("20-b.conf"), bridge.to_string()).unwrap();
    chained(d.path()).unwrap();
    chained_to(d.path(), "20-b.conf").unwrap();
    assert!(has_entry(&primary) && has_entry(&d.path().join("20-b.conflist")));

    let change = owned(d.path()).unwrap().unwrap();
    assert!(change.contains("left by chained mode"), "{change}");
    assert_eq!(
        read_json(&primary).unwrap(),
        list("k"),
        "primary is its own again"
    );
    assert_eq!(read_json(&d.path().join("20-b.conf")).unwrap(), bridge);
    let ours = read_json(&d.path().join(OWNED_CONFIG_NAME)).unwrap();
    assert_eq!(ours["plugins"].as_array().unwrap().len(), 2);
    assert!(owned(d.path()).unwrap().is_none());

    uninstall(d.path());
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
    owned(d.path()).unwrap();
    let ours = d.path().join(OWNED_CONFIG_NAME);
    assert!(ours.exists());

    let change = chained(d.path()).unwrap().unwrap();
    assert!(change.contains("left by istio-owned mode"), "{change}");
    assert!(!ours.exists(), "the owned copy is not a primary");
    assert!(has_entry(&primary));
    assert!(chained(d.path()).unwrap().is_none());
    uninstall(d.path());
    assert_eq!(read_json(&primary).unwrap(), list("k"));
}

#[test]
fn uninstall_removes_both_modes_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let primary = d.path().join("10-k.conflist");
    fs::write(&primary, list("k").to_string()).unwrap();
    chained(d.path()).unwrap();
    // A copy as istio-owned mode would have written it, next to the chained entry.
    let owned = chain::chain(&list("k"), ConfKind::List, &entry(), "x").unwrap();
    fs::write(d.path().join(OWNED_CONFIG_NAME), owned.to_string()).unwrap();
    let changed = uninstall(d.path());
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert!(!d.path().join(OWNED_CONFIG_NAME).exists());
    assert_eq!(read_json(&primary).unwrap(), list("k"));
    assert!(uninstall(&d.path().join("missing")).is_empty());
}
