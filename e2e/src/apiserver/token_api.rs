//! The token endpoints: TokenRequest (`POST
//! .../serviceaccounts/<sa>/token`) and TokenReview (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`).

use std::sync::Arc;
use std::time::Duration;

use http::Response;
use http::StatusCode;
use serde_json::{Value, json};

use super::http::{Body, Shared, json_response};
use super::status::ApiError;
use super::store::now_rfc3339;
use super::tokens::{self, DEFAULT_AUDIENCE, TokenSpec};

/// `POST .../serviceaccounts/<sa>/token`.
pub(super) fn token_request(
    shared: &Arc<Shared>,
    sa_res: usize,
    ns: &str,
    sa: &str,
    body: &Value,
) -> Result<Response<Body>, ApiError> {
    let spec = body.get("spec").cloned().unwrap_or(json!({}));
    let store = shared.lock();
    let account = store.get(sa_res, Some(ns), sa)?;
    let secs = spec
        .get("expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    if secs < 600 {
        return Err(ApiError::invalid(
            "serviceaccounts/token",
            sa,
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
        ));
    }
    let audiences: Vec<String> = spec
        .get("audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut token = TokenSpec {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        service_account_uid: account
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .map(str::to_string),
        audiences,
        expires: std::time::SystemTime::now() + Duration::from_secs(secs as u64),
        pod: None,
        node: None,
    };
    if let Some(bound) = spec.get("boundObjectRef").filter(|b| b.is_object()) {
        let kind = bound.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind != "Pod" {
            return Err(ApiError::bad_request(format!(
                "boundObjectRef kind {kind:?} is not supported by the kube-api-double (only Pod)"
            )));
        }
        let name = bound.get("name").and_then(Value::as_str).unwrap_or("");
        let pods = store.index("", "pods").expect("pods are served");
        let pod = store.get(pods, Some(ns), name)?;
        let uid = pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(want) = bound
            .get("uid")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            && want != uid
        {
            return Err(ApiError::conflict(
                "pods",
                name,
                &format!(
                    "the UID in the bound object reference ({want}) does not match the UID in record ({uid})"
                ),
            ));
        }
        token.pod = Some((name.to_string(), uid));
        token.node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
    }
    drop(store);
    let jwt = shared.signer.mint(&token);
    let mut out = body.clone();
    if !out.is_object() {
        out = json!({});
    }
    out["kind"] = json!("TokenRequest");
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["metadata"] = json!({"name": sa, "namespace": ns, "creationTimestamp": now_rfc3339()});
    out["spec"] = spec;
    out["spec"]["expirationSeconds"] = json!(secs);
    out["status"] = json!({
        "token": jwt,
        "expirationTimestamp": humantime::format_rfc3339_seconds(token.expires).to_string(),
    });
    Ok(json_response(StatusCode::CREATED, &out))
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
pub(super) fn token_review(shared: &Arc<Shared>, body: &Value) -> Result<Response<Body>, ApiError> {
    let token = body
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("");
    let wanted: Vec<String> = body
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![DEFAULT_AUDIENCE.to_string()]);
    let status = match review(shared, token, &wanted) {
        Ok(status) => status,
        Err(error) => json!({"authenticated": false, "user": {}, "error": error}),
    };
    let mut out = body.clone();
    if !out.is_object() {
        out = json!({});
    }
    out["kind"] = json!("TokenReview");
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["metadata"] = json!({"creationTimestamp": now_rfc3339()});
    out["status"] = status;
    Ok(json_response(StatusCode::CREATED, &out))
}

fn review(shared: &Arc<Shared>, token: &str, wanted: &[String]) -> Result<Value, String> {
    if token.is_empty() {
        return Err("spec.token is empty".into());
    }
    let claims = shared.signer.verify(token).map_err(|e| e.to_string())?;
    let have = tokens::audiences(&claims);
    let common: Vec<&String> = wanted.iter().filter(|w| have.contains(w)).collect();
    if common.is_empty() {
        return Err(format!(
            "token audiences {have:?} is invalid for the target audiences {wanted:?}"
        ));
    }
    let k = &claims["kubernetes.io"];
    let ns = k["namespace"].as_str().unwrap_or("");
    let sa = k["serviceaccount"]["name"].as_str().unwrap_or("");
    let store = shared.lock();
    let sa_res = store.index("", "serviceaccounts").expect("served");
    let account = store
        .get(sa_res, Some(ns), sa)
        .map_err(|_| format!("service account {ns}/{sa} has been deleted"))?;
    let sa_uid = account
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(want) = k["serviceaccount"]["uid"].as_str()
        && want != sa_uid
    {
        return Err(format!(
            "service account UID ({sa_uid}) does not match claim ({want})"
        ));
    }
    let mut extra = serde_json::Map::new();
    if let Some(jti) = claims["jti"].as_str() {
        extra.insert(
            tokens::EXTRA_CREDENTIAL_ID.into(),
            json!([format!("JTI={jti}")]),
        );
    }
    if let Some(pod) = k.get("pod").filter(|p| p.is_object()) {
        let name = pod["name"].as_str().unwrap_or("");
        let uid = pod["uid"].as_str().unwrap_or("");
        let pods = store.index("", "pods").expect("served");
        let current = store
            .get(pods, Some(ns), name)
            .map_err(|_| format!("pod {ns}/{name} has been deleted"))?;
        if current.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid) {
            return Err(format!(
                "pod {ns}/{name} has been deleted (UID {uid} no longer exists)"
            ));
        }
        extra.insert(tokens::EXTRA_POD_NAME.into(), json!([name]));
        extra.insert(tokens::EXTRA_POD_UID.into(), json!([uid]));
    }
    if let Some(node) = k.pointer("/node/name").and_then(Value::as_str) {
        extra.insert(tokens::EXTRA_NODE_NAME.into(), json!([node]));
    }
    Ok(json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": sa_uid,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": extra,
        },
        "audiences": common,
    }))
}
