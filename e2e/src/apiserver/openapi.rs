//! The smallest OpenAPI v3 documents kubectl needs: for each resource a
//! PATCH operation tagged with its group/version/kind that lists the
//! `fieldValidation` parameter. kubectl then validates on the server side
//! (which the double accepts and ignores) instead of downloading schemas
//! for client-side validation. No schemas are served: for `kubectl apply`
//! of an existing built-in object kubectl falls back to its compiled-in
//! patch metadata.

use serde_json::{Map, Value, json};

use super::resources::ResourceType;

/// Changes whenever the documents would (clients cache by it).
const HASH: &str = "kube-api-double-1";

fn gv_key(r: &ResourceType) -> String {
    r.gv_path().trim_start_matches('/').to_string()
}

/// `/openapi/v3`: where each group/version document is.
pub fn root(resources: &[ResourceType]) -> Value {
    let mut paths = Map::new();
    for r in resources {
        let k = gv_key(r);
        paths.insert(
            k.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{k}?hash={HASH}")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/<api/v1 | apis/g/v>`: `None` when nothing is served there.
pub fn group_version(resources: &[ResourceType], gv: &str) -> Option<Value> {
    let mut paths = Map::new();
    for r in resources.iter().filter(|r| gv_key(r) == gv) {
        let item = if r.namespaced {
            format!(
                "{}/namespaces/{{namespace}}/{}/{{name}}",
                r.gv_path(),
                r.plural
            )
        } else {
            format!("{}/{}/{{name}}", r.gv_path(), r.plural)
        };
        let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        paths.insert(
            item,
            json!({
                "patch": {
                    "operationId": format!("patch{}", r.kind),
                    "parameters": [param("dryRun"), param("fieldManager"), param("fieldValidation"), param("force")],
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                }
            }),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kube-api-double)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::super::resources::ALL;
    use super::*;

    #[test]
    fn documents_list_patch_with_field_validation() {
        let r = root(ALL);
        assert!(
            r["paths"]["api/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/api/v1?hash=")
        );
        assert!(r["paths"].get("apis/security.istio.io/v1").is_some());
        let core = group_version(ALL, "api/v1").unwrap();
        let pods = &core["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"];
        assert_eq!(pods["x-kubernetes-group-version-kind"]["kind"], "Pod");
        assert!(
            pods["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(core["paths"].get("/api/v1/nodes/{name}").is_some());
        assert!(group_version(ALL, "apis/nope/v1").is_none());
    }
}
