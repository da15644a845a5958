//! PATCH bodies: JSON merge patch (RFC 7386), strategic merge patch (a
//! subset), JSON patch (RFC 6902) and server-side apply (approximated).

use serde_json::{Map, Value};

/// The patch types of the `Content-Type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies `patch` (already parsed) to `target`.
///
/// - merge: RFC 7386 (`null` deletes a key; lists are replaced).
/// - strategic: like merge, except that lists of objects that all carry a
///   `name` are merged element by element by `name` (containers, volumes,
///   env, ports with names ...), `$patch: delete` on such an element removes
///   it, `$patch: replace` replaces the list/map, and other `$` directives
///   (`$setElementOrder/...`, `$retainKeys`) are dropped. Other merge keys
///   (e.g. `containerPort`) are not known: such lists are replaced.
/// - json: RFC 6902.
/// - apply: treated as a merge patch of the applied configuration (no field
///   ownership).
pub fn apply(target: &mut Value, kind: PatchType, patch: &Value) -> Result<(), String> {
    match kind {
        PatchType::Merge | PatchType::Apply => {
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchType::Strategic => {
            strategic_merge(target, patch);
            Ok(())
        }
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| format!("invalid JSON patch: {e}"))?;
            json_patch::patch(target, &ops).map_err(|e| format!("JSON patch failed: {e}"))
        }
    }
}

fn is_named_object_list(v: &[Value]) -> bool {
    !v.is_empty()
        && v.iter().all(|e| {
            e.as_object()
                .is_some_and(|o| o.get("name").is_some_and(Value::is_string))
        })
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = strip_directives(patch);
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, pv) in p {
        if k.starts_with('$') {
            continue;
        }
        match pv {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => strategic_merge(t.entry(k.clone()).or_insert(Value::Null), pv),
            Value::Array(items) => {
                let existing = t.get_mut(k);
                match existing {
                    Some(Value::Array(cur))
                        if is_named_object_list(items)
                            && (cur.is_empty() || is_named_object_list(cur)) =>
                    {
                        merge_named_list(cur, items)
                    }
                    _ => {
                        let kept: Vec<Value> = items
                            .iter()
                            .filter(|e| e.get("$patch").and_then(Value::as_str) != Some("delete"))
                            .map(strip_directives)
                            .collect();
                        t.insert(k.clone(), Value::Array(kept));
                    }
                }
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
}

fn merge_named_list(cur: &mut Vec<Value>, items: &[Value]) {
    for item in items {
        let name = item.get("name").and_then(Value::as_str).unwrap_or_default();
        let pos = cur
            .iter()
            .position(|e| e.get("name").and_then(Value::as_str) == Some(name));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                cur.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut cur[i], item),
            (None, false) => cur.push(strip_directives(item)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_sets_and_removes_labels() {
        let mut o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        apply(
            &mut o,
            PatchType::Merge,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}}),
        )
        .unwrap();
        assert_eq!(o, json!({"metadata": {"labels": {"b": "2", "c": "3"}}}));
    }

    #[test]
    fn strategic_merges_named_lists_and_drops_directives() {
        let mut o = json!({"spec": {"containers": [
            {"name": "app", "image": "a:1", "ports": [{"containerPort": 80}]},
            {"name": "side", "image": "s:1"}
        ]}});
        let p = json!({"metadata": {"annotations": {"x": "y"}}, "spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
            "containers": [{"name": "app", "image": "a:2"}, {"name": "side", "$patch": "delete"}]
        }});
        apply(&mut o, PatchType::Strategic, &p).unwrap();
        assert_eq!(
            o["spec"]["containers"],
            json!([{"name": "app", "image": "a:2", "ports": [{"containerPort": 80}]}])
        );
        assert_eq!(o["metadata"]["annotations"]["x"], "y");
        assert!(o["spec"].get("$setElementOrder/containers").is_none());
        // unnamed lists are replaced
        let mut o = json!({"spec": {"ports": [{"port": 80}, {"port": 81}]}});
        apply(
            &mut o,
            PatchType::Strategic,
            &json!({"spec": {"ports": [{"port": 82}]}}),
        )
        .unwrap();
        assert_eq!(o["spec"]["ports"], json!([{"port": 82}]));
        // null removes, like merge patch
        let mut o = json!({"metadata": {"labels": {"a": "1"}}});
        apply(
            &mut o,
            PatchType::Strategic,
            &json!({"metadata": {"labels": {"a": null}}}),
        )
        .unwrap();
        assert_eq!(o, json!({"metadata": {"labels": {}}}));
    }

    #[test]
    fn json_patch_and_content_types() {
        let mut o = json!({"metadata": {"labels": {"a": "1"}}});
        apply(
            &mut o,
            PatchType::Json,
            &json!([
                {"op": "add", "path": "/metadata/labels/b", "value": "2"},
                {"op": "remove", "path": "/metadata/labels/a"}
            ]),
        )
        .unwrap();
        assert_eq!(o, json!({"metadata": {"labels": {"b": "2"}}}));
        let err = apply(
            &mut o,
            PatchType::Json,
            &json!([{"op": "remove", "path": "/nope"}]),
        )
        .unwrap_err();
        assert!(err.contains("JSON patch failed"), "{err}");
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }
}
