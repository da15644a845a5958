//! `meta.k8s.io/v1` Table responses (what `kubectl get` asks for), so its
//! output has the usual columns: pods show READY/STATUS/RESTARTS (and IP
//! and NODE with `-o wide`), namespaces STATUS, services TYPE/CLUSTER-IP/
//! PORT(S), nodes STATUS/VERSION; every other kind NAME and AGE.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::resources::ResourceType;

/// True when the client's first choice is a Table.
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
}

fn col(name: &str, ty: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

/// `5s`, `3m10s`, `42m`, `5h3m`, `20h`, `3d`: like kubectl's ages.
pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=599 => format!("{}m{}s", s / 60, s % 60),
        600..=10_799 => format!("{}m", s / 60),
        10_800..=28_799 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        28_800..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn age(obj: &Value) -> String {
    obj.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(human_age)
        .unwrap_or_else(|| "<unknown>".into())
}

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn or_none(v: &str) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.to_string()
    }
}

fn columns(r: &ResourceType) -> Vec<Value> {
    let mut c = vec![col("Name", "string", 0)];
    match (r.group, r.plural) {
        ("", "pods") => c.extend([
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "integer", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
        ]),
        ("", "namespaces") => c.extend([col("Status", "string", 0), col("Age", "string", 0)]),
        ("", "services") => c.extend([
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            col("Age", "string", 0),
            col("Selector", "string", 1),
        ]),
        ("", "nodes") => c.extend([
            col("Status", "string", 0),
            col("Roles", "string", 0),
            col("Age", "string", 0),
            col("Version", "string", 0),
        ]),
        _ => c.push(col("Age", "string", 0)),
    }
    c
}

fn cells(r: &ResourceType, o: &Value) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    match (r.group, r.plural) {
        ("", "pods") => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let ready = statuses.map_or(0, |v| v.iter().filter(|c| c["ready"] == true).count());
            let restarts: i64 = statuses.map_or(0, |v| {
                v.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
            });
            let status = if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating".to_string()
            } else {
                or_none(s(o, "/status/phase"))
            };
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts),
                json!(age(o)),
                json!(or_none(s(o, "/status/podIP"))),
                json!(or_none(s(o, "/spec/nodeName"))),
            ]
        }
        ("", "namespaces") => vec![name, json!(s(o, "/status/phase")), json!(age(o))],
        ("", "services") => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let selector: Vec<String> = o
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(s(o, "/spec/type")),
                json!(or_none(s(o, "/spec/clusterIP"))),
                json!("<none>"),
                json!(or_none(&ports.join(","))),
                json!(age(o)),
                json!(or_none(&selector.join(","))),
            ]
        }
        ("", "nodes") => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            vec![
                name,
                json!(ready),
                json!("<none>"),
                json!(age(o)),
                json!(or_none(s(o, "/status/nodeInfo/kubeletVersion"))),
            ]
        }
        _ => vec![name, json!(age(o))],
    }
}

/// A Table of `items`. `include` is the `includeObject` query parameter
/// (`None`, `Object`, default `Metadata`).
pub fn table(r: &ResourceType, items: &[Value], resource_version: u64, include: &str) -> Value {
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let object = match include {
                "None" => Value::Null,
                "Object" => o.clone(),
                _ => super::http::partial_metadata(o),
            };
            json!({"cells": cells(r, o), "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": columns(r),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::super::resources::ALL;
    use super::*;

    #[test]
    fn pod_rows_have_the_usual_columns() {
        let pods = ALL.iter().find(|r| r.plural == "pods").unwrap();
        let p = json!({"metadata": {"name": "web", "creationTimestamp": humantime::format_rfc3339_seconds(SystemTime::now()).to_string()},
            "spec": {"nodeName": "node1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.2", "containerStatuses": [{"ready": true, "restartCount": 1}, {"ready": false, "restartCount": 2}]}});
        let t = table(pods, &[p], 7, "Metadata");
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["web", "1/2", "Running", 3, "0s", "10.244.1.2", "node1"])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 7);
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }

    #[test]
    fn ages_read_like_kubectl() {
        for (secs, want) in [
            (5, "5s"),
            (190, "3m10s"),
            (2520, "42m"),
            (18_180, "5h3m"),
            (72_000, "20h"),
            (259_200, "3d"),
        ] {
            assert_eq!(human_age(Duration::from_secs(secs)), want);
        }
    }
}
