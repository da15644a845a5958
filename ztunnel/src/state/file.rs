//! The `LOCAL_XDS_PATH` source: a YAML file with `workloads`, `services` and `policies` in
//! upstream ztunnel's local-config schema, reloaded whenever it changes.
//!
//! A file that does not parse at start-up is fatal (the error names the file, the field path
//! and the line); a bad edit later is logged and the previous content stays in force.

use std::path::Path;

use serde::Deserialize;

use super::SourceHandle;
use super::workload::{Service, Workload};
use crate::policy::model::Authorization;

/// Source name used in the store.
pub const SOURCE_NAME: &str = "file";

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Authorization>,
}

/// Values filled in where the file leaves them empty.
#[derive(Debug, Clone)]
pub struct FileDefaults {
    pub trust_domain: String,
    pub cluster_id: String,
}

#[derive(Debug, thiserror::Error)]
#[error("LOCAL_XDS_PATH {path}: {reason}")]
pub struct FileError {
    pub path: String,
    pub reason: String,
}

/// Parses the file's text; `path` is only used in errors.
pub fn parse(text: &str, path: &Path, defaults: &FileDefaults) -> Result<LocalConfig, FileError> {
    let err = |reason: String| FileError {
        path: path.display().to_string(),
        reason,
    };
    let mut cfg: LocalConfig = if text.trim().is_empty() {
        LocalConfig::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| err(name_service(text, e)))?
    };
    let mut seen = std::collections::HashSet::new();
    for (i, w) in cfg.workloads.iter_mut().enumerate() {
        if w.namespace.is_empty() {
            return Err(err(format!("workloads[{i}].namespace: must not be empty")));
        }
        if w.trust_domain.is_empty() {
            w.trust_domain = defaults.trust_domain.clone();
        }
        if w.cluster_id.is_empty() {
            w.cluster_id = defaults.cluster_id.clone();
        }
        if w.uid.is_empty() {
            w.uid = format!("{}//v1/Pod/{}/{}", w.cluster_id, w.namespace, w.name);
        }
        if !seen.insert(w.uid.clone()) {
            return Err(err(format!(
                "workloads[{i}].uid: duplicate uid {:?}",
                w.uid
            )));
        }
        for key in w.services.keys() {
            if !key.contains('/') {
                return Err(err(format!(
                    "workloads[{i}].services: key {key:?} is not <namespace>/<hostname>"
                )));
            }
        }
    }
    for (i, s) in cfg.services.iter().enumerate() {
        if s.hostname.is_empty() || s.namespace.is_empty() {
            return Err(err(format!(
                "services[{i}]: namespace and hostname must not be empty"
            )));
        }
    }
    Ok(cfg)
}

/// A YAML error inside `services[i]` also names that service (`<namespace>/<hostname>`),
/// when the text says which it is.
fn name_service(text: &str, e: serde_yaml_ng::Error) -> String {
    let msg = e.to_string();
    let index = msg
        .strip_prefix("services[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(i, _)| i.parse::<usize>().ok());
    let Some(i) = index else {
        return msg;
    };
    let Ok(doc) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) else {
        return msg;
    };
    let svc = &doc["services"][i];
    match (svc["namespace"].as_str(), svc["hostname"].as_str()) {
        (Some(ns), Some(host)) => format!("service {ns}/{host}: {msg}"),
        _ => msg,
    }
}

/// Reads and parses the file.
pub fn load(path: &Path, defaults: &FileDefaults) -> Result<LocalConfig, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        path: path.display().to_string(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(&text, path, defaults)
}

pub use crate::file_watch::FileWatcher;

/// Loads the file into `source` (error if it does not parse) and reloads it on every change
/// (see [`crate::file_watch`]). Reloads run on the watcher's own thread; a bad edit is logged
/// and the previous content stays in force.
pub fn watch(
    path: &Path,
    source: SourceHandle,
    defaults: FileDefaults,
) -> Result<FileWatcher, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        path: path.display().to_string(),
        reason: format!("cannot read: {e}"),
    })?;
    apply(parse(&text, path, &defaults)?, &source);
    tracing::info!(path = %path.display(), "local config loaded");
    let file = path.to_path_buf();
    crate::file_watch::watch(path, text, move |text| {
        reload(&file, text, &source, &defaults)
    })
    .map_err(|e| FileError {
        path: e.path,
        reason: format!("cannot watch: {}", e.reason),
    })
}

/// Applies a changed file; false (and the previous content stays) if it does not parse.
fn reload(path: &Path, text: &str, source: &SourceHandle, defaults: &FileDefaults) -> bool {
    match parse(text, path, defaults) {
        Ok(cfg) => {
            let counts = (cfg.workloads.len(), cfg.services.len(), cfg.policies.len());
            apply(cfg, source);
            tracing::info!(path = %path.display(), workloads = counts.0, services = counts.1, policies = counts.2, "local config reloaded");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "local config rejected; keeping the previous content");
            false
        }
    }
}

fn apply(cfg: LocalConfig, source: &SourceHandle) {
    source.replace_all(cfg.workloads, cfg.services, cfg.policies);
}

/// Unit tests' state: a store fed from local-config `yaml` (defaults
/// `cluster.local`, `Kubernetes`) under source `file`. Panics on bad YAML.
#[cfg(test)]
pub(crate) fn test_store(yaml: &str) -> super::Store {
    let cfg = parse(
        yaml,
        Path::new("test.yaml"),
        &FileDefaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        },
    )
    .unwrap();
    let store = super::Store::new();
    apply(cfg, &store.source("file"));
    store
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;
    use crate::state::workload::{GatewayAddress, GatewayDestination};
    use std::time::Duration;

    fn defaults() -> FileDefaults {
        FileDefaults {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
        }
    }

    const EXAMPLE: &str = r#"
workloads:
- uid: Kubernetes//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  trustDomain: cluster.local
  services:
    "default/example.com":
      80: 8080
- name: plain
  namespace: other
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  waypoint:
    destination: "/10.0.0.9"
    hboneMtlsPort: 15008
  services: {}
services:
- name: example.com
  namespace: default
  hostname: example.com
  vips: ["/127.10.0.1"]
  ports:
    80: 8080
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/default"]
policies:
- name: allow-all-but-9999
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - notDestinationPorts: [9999]
"#;

    #[test]
    fn parses_upstream_schema_and_fills_defaults() {
        let cfg = parse(EXAMPLE, Path::new("/cfg.yaml"), &defaults()).unwrap();
        assert_eq!(cfg.workloads.len(), 2);
        let plain = &cfg.workloads[1];
        assert_eq!(plain.uid, "Kubernetes//v1/Pod/other/plain");
        assert_eq!(plain.trust_domain, "cluster.local");
        assert_eq!(plain.service_account, "default");
        assert!(plain.waypoint.is_some());
        assert_eq!(cfg.services[0].ports[&80], 8080);
        assert_eq!(cfg.services[0].san_identities().len(), 1);
        assert_eq!(cfg.policies[0].name, "allow-all-but-9999");
        let store = Store::new();
        apply(cfg, &store.source(SOURCE_NAME));
        let s = store.snapshot();
        assert_eq!(s.policies().len(), 1);
        let svc = s.service_by_vip("", "127.10.0.1".parse().unwrap()).unwrap();
        let (w, port) = s.pick_endpoint(svc, 80).unwrap();
        assert_eq!((w.name.as_str(), port), ("local", 8080));
    }

    #[test]
    fn gateway_hostnames_in_upstreams_string_form() {
        // Upstream writes a hostname destination as "<namespace>/<hostname>" (an address as
        // "<network>/<ip>"); the map form is accepted too.
        let text = r#"
workloads:
- name: a
  namespace: ns
  workloadIps: ["10.0.0.1"]
  waypoint:
    destination: ns/waypoint.ns.svc.cluster.local
    hboneMtlsPort: 15008
  networkGateway:
    destination: {namespace: istio-system, hostname: eastwest.example.com}
    hboneMtlsPort: 15009
  services: {}
services:
- name: svc
  namespace: ns
  hostname: svc.ns.svc.cluster.local
  vips: ["/10.96.0.1", "remote/10.96.0.1"]
  ports: {80: 8080}
  waypoint: {destination: "ns/waypoint.ns.svc.cluster.local", hboneMtlsPort: 15008}
"#;
        let cfg = parse(text, Path::new("/cfg.yaml"), &defaults()).unwrap();
        let host = |gw: &Option<GatewayAddress>| match &gw.as_ref().unwrap().destination {
            GatewayDestination::Hostname(h) => h.to_string(),
            d => panic!("{d:?}"),
        };
        assert_eq!(
            host(&cfg.workloads[0].waypoint),
            "ns/waypoint.ns.svc.cluster.local"
        );
        assert_eq!(
            host(&cfg.workloads[0].network_gateway),
            "istio-system/eastwest.example.com"
        );
        assert_eq!(
            host(&cfg.services[0].waypoint),
            "ns/waypoint.ns.svc.cluster.local"
        );
        let networks: Vec<_> = cfg.services[0].vips.iter().map(|v| v.to_string()).collect();
        assert_eq!(networks, ["/10.96.0.1", "remote/10.96.0.1"]);
        // A hostname that is not <namespace>/<hostname> is still refused, naming the field.
        let bad = "workloads:\n- namespace: a\n  waypoint: {destination: nohost}\n";
        let e = parse(bad, Path::new("/cfg.yaml"), &defaults()).unwrap_err();
        assert!(e.to_string().contains("waypoint"), "{e}");
    }

    #[test]
    fn visibility_cidr_vips_and_weighted_waypoints_in_upstreams_form() {
        let text = r#"
services:
- name: svc
  namespace: ns
  hostname: svc.ns.svc.cluster.local
  vips: ["/10.96.0.1"]
  cidrVips: [{network: "", cidr: 10.96.8.0/24}, {network: west, cidr: "fd00:8::/64"}]
  ports: {80: 8080}
  waypoint: {destination: ns/wp.ns.svc.cluster.local}
  weightedWaypoints:
  - destination: {destination: ns/wp.ns.svc.cluster.local, hboneMtlsPort: 15008}
    weight: 90
  - {destination: {destination: /10.0.0.9}, weight: 10}
  visibility: Namespace
- {name: plain, namespace: ns, hostname: plain.example.com}
"#;
        let cfg = parse(text, Path::new("/cfg.yaml"), &defaults()).unwrap();
        let svc = &cfg.services[0];
        assert_eq!(svc.visibility, crate::state::Visibility::Namespace);
        let ranges: Vec<String> = svc.cidr_vips.iter().map(|c| c.to_string()).collect();
        assert_eq!(ranges, ["/10.96.8.0/24", "west/fd00:8::/64"]);
        let weights: Vec<(String, u32)> = svc
            .weighted_waypoints
            .iter()
            .map(|w| (crate::state::gateway::describe(&w.destination), w.weight))
            .collect();
        assert_eq!(
            weights,
            [
                ("ns/wp.ns.svc.cluster.local:15008".to_string(), 90),
                ("/10.0.0.9:15008".to_string(), 10)
            ]
        );
        // Defaults: public, no ranges, no weighted waypoints.
        let plain = &cfg.services[1];
        assert_eq!(plain.visibility, crate::state::Visibility::Public);
        assert!(plain.cidr_vips.is_empty() && plain.weighted_waypoints.is_empty());
        // The dump form: visibility always, the lists only when set.
        let dumped = serde_json::to_value(plain).unwrap();
        assert_eq!(dumped["visibility"], "Public");
        assert!(dumped.get("cidrVips").is_none() && dumped.get("weightedWaypoints").is_none());
        let dumped = serde_json::to_value(svc).unwrap();
        assert_eq!(dumped["cidrVips"][0]["cidr"], "10.96.8.0/24");
        assert_eq!(dumped["weightedWaypoints"][1]["weight"], 10);
    }

    #[test]
    fn rejections_name_file_and_field() {
        for (text, want) in [
            ("workloads:\n- namespace: a\n  bogus: 1\n", "bogus"),
            ("workloads:\n- namespace: a\n  protocol: UDP\n", "protocol"),
            (
                "workloads:\n- namespace: a\n  workloadIps: [\"1.2.3\"]\n",
                "workloadIps",
            ),
            (
                "services:\n- name: a\n  namespace: b\n  hostname: c\n  vips: [\"1.2.3.4\"]\n",
                "vips",
            ),
            ("extra: 1\n", "extra"),
            ("workloads:\n- name: a\n", "namespace"),
            (
                "workloads:\n- namespace: a\n  services:\n    nohost: {}\n",
                "nohost",
            ),
            (
                "workloads:\n- namespace: a\n  name: x\n- namespace: a\n  name: x\n",
                "duplicate uid",
            ),
            ("policies:\n- name: p\n", "policies"),
            (
                "services:\n- {name: a, namespace: b, hostname: c, loadBalancer: {healthPolicy: ALLOW_ALL}}\n",
                "healthPolicy",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c, loadBalancer: {routingPreference: [Node]}}\n",
                "routingPreference",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c, ipFamilies: IPV4}\n",
                "ipFamilies",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c, visibility: NAMESPACE}\n",
                "visibility",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c, cidrVip: []}\n",
                "cidrVip",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c,\n   cidrVips: [{network: '', cidr: 10.0.0.0/40}]}\n",
                "service b/c: services[0].cidrVips[0]: cidr \"10.0.0.0/40\": prefix length 40 longer than 32",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c,\n   cidrVips: [{netwrok: '', cidr: 10.0.0.0/8}]}\n",
                "netwrok",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c,\n   weightedWaypoints: [{destination: {destination: /10.0.0.1}, wieght: 1}]}\n",
                "wieght",
            ),
            (
                "services:\n- {name: a, namespace: b, hostname: c,\n   weightedWaypoints: [{weight: 1}]}\n",
                "service b/c: services[0].weightedWaypoints[0]: missing field `destination`",
            ),
        ] {
            let e = parse(text, Path::new("/etc/ztunnel/local.yaml"), &defaults())
                .unwrap_err()
                .to_string();
            assert!(e.contains("LOCAL_XDS_PATH /etc/ztunnel/local.yaml"), "{e}");
            assert!(e.contains(want), "{text:?} -> {e}");
        }
    }

    #[test]
    fn reloads_on_change_and_keeps_old_state_on_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.yaml");
        std::fs::write(&path, "workloads:\n- namespace: a\n  name: one\n").unwrap();
        let store = Store::new();
        let _w = watch(&path, store.source(SOURCE_NAME), defaults()).unwrap();
        assert_eq!(store.snapshot().workloads().count(), 1);

        let wait_for = |n: usize| {
            for _ in 0..100 {
                if store.snapshot().workloads().count() == n {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        };
        // Replace by rename, the way editors and ConfigMaps do.
        let tmp = dir.path().join("local.yaml.tmp");
        std::fs::write(
            &tmp,
            "workloads:\n- namespace: a\n  name: one\n- namespace: a\n  name: two\n",
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(wait_for(2), "reload after rename");

        std::fs::write(&path, "workloads: [this is not a workload").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(store.snapshot().workloads().count(), 2, "bad edit ignored");

        std::fs::write(&path, "workloads: []\n").unwrap();
        assert!(wait_for(0), "reload after in-place write");
    }

    #[test]
    fn reads_and_unrelated_files_do_not_trigger_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.yaml");
        std::fs::write(&path, "workloads:\n- namespace: a\n  name: one\n").unwrap();
        let store = Store::new();
        let w = watch(&path, store.source(SOURCE_NAME), defaults()).unwrap();
        let version = store.snapshot().version;
        let rx = store.subscribe();
        // Reading the file and writing another file in the directory change nothing.
        for i in 0..5 {
            let _ = std::fs::read_to_string(&path).unwrap();
            std::fs::write(dir.path().join("other.log"), format!("line {i}")).unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(store.snapshot().version, version);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(w.rereads(), 0, "the file was re-read without a change");
        // A real change still reloads.
        std::fs::write(&path, "workloads: []\n").unwrap();
        for _ in 0..100 {
            if store.snapshot().workloads().count() == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no reload after a change");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let store = Store::new();
        let e = watch(
            Path::new("/nonexistent/ztunnel.yaml"),
            store.source(SOURCE_NAME),
            defaults(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("/nonexistent/ztunnel.yaml"), "{e}");
    }
}
