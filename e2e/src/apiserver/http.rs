//! The HTTP side: connection handling (hyper 1, HTTP/1.1), request parsing,
//! routing to the store, responses.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::discovery;
use super::patch::PatchType;
use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{Part, Preconditions, Store};
use super::table;
use super::tokens::TokenSigner;
use super::watch::{self as watcher, Start, WatchRequest};

pub type Body = BoxBody<Bytes, Infallible>;

/// State shared by all connections.
pub struct Shared {
    store: Mutex<Store>,
    /// Latest resourceVersion; watchers wake on change.
    pub changed: watch::Sender<u64>,
    /// Bumped to end every open watch.
    pub closing: watch::Sender<u64>,
    pub signer: TokenSigner,
    pub bookmark_interval: Duration,
    /// Requests served, by `"<verb> <plural>"`.
    stats: Mutex<BTreeMap<String, u64>>,
    /// `host:port` of the first listener (for `/api`).
    pub server_address: Mutex<String>,
    /// Watch streams currently open.
    pub open_watches: std::sync::atomic::AtomicUsize,
    /// Resources (group, plural) answered with 404 for now (a CRD removed
    /// while the server runs); their objects are kept.
    pub unserved: Mutex<Vec<(&'static str, &'static str)>>,
    /// Resources (group, plural) whose every request is answered with this
    /// error for now (RBAC removed, an overloaded server).
    pub failing: Mutex<Vec<((&'static str, &'static str), ApiError)>>,
}

impl Shared {
    pub fn new(store: Store, signer: TokenSigner, bookmark_interval: Duration) -> Self {
        let rv = store.resource_version();
        Self {
            store: Mutex::new(store),
            changed: watch::channel(rv).0,
            closing: watch::channel(0).0,
            signer,
            bookmark_interval,
            stats: Mutex::new(BTreeMap::new()),
            server_address: Mutex::new(String::new()),
            open_watches: std::sync::atomic::AtomicUsize::new(0),
            unserved: Mutex::new(Vec::new()),
            failing: Mutex::new(Vec::new()),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a write and wakes the watchers.
    pub fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (out, rv) = {
            let mut s = self.lock();
            let out = f(&mut s);
            (out, s.resource_version())
        };
        self.changed.send_replace(rv);
        out
    }

    pub fn resource(&self, i: usize) -> ResourceType {
        *self.lock().resource(i)
    }

    pub fn count(&self, verb: &str, plural: &str) {
        *self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{verb} {plural}"))
            .or_default() += 1;
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(super) fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("JSON"))).boxed())
        .expect("response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    )
}

/// `PartialObjectMetadata` of an object (for metadata-only clients).
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

/// A request for a resource, parsed from the path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

/// Parses `/api/v1/...` and `/apis/<g>/<v>/...` resource paths.
fn parse_target(store: &Store, segs: &[&str]) -> Result<Target, ApiError> {
    let path = format!("/{}", segs.join("/"));
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route(&path)),
    };
    let find = |plural: &str| {
        store
            .resources()
            .iter()
            .position(|r| r.group == group && r.version == version && r.plural == plural)
            .ok_or_else(|| ApiError::no_route(&path))
    };
    let t = |res, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        res,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        sub: sub.map(str::to_string),
    };
    let target = match rest {
        // /api/v1/namespaces/{ns}/{plural}[/{name}[/{sub}]] (not the
        // namespace's own subresources)
        ["namespaces", ns, plural, tail @ ..]
            if !group.is_empty() || (*plural != "status" && *plural != "finalize") =>
        {
            let res = find(plural)?;
            if !store.resource(res).namespaced {
                return Err(ApiError::no_route(&path));
            }
            match tail {
                [] => t(res, Some(ns), None, None),
                [name] => t(res, Some(ns), Some(name), None),
                [name, sub] => t(res, Some(ns), Some(name), Some(sub)),
                _ => return Err(ApiError::no_route(&path)),
            }
        }
        [plural] => t(find(plural)?, None, None, None),
        [plural, name] => {
            let res = find(plural)?;
            if store.resource(res).namespaced {
                return Err(ApiError::no_route(&path));
            }
            t(res, None, Some(name), None)
        }
        [plural, name, sub] => {
            let res = find(plural)?;
            if store.resource(res).namespaced {
                return Err(ApiError::no_route(&path));
            }
            t(res, None, Some(name), Some(sub))
        }
        _ => return Err(ApiError::no_route(&path)),
    };
    if let Some(sub) = &target.sub
        && !store
            .resource(target.res)
            .subresources
            .contains(&sub.as_str())
    {
        return Err(ApiError::no_route(&path));
    }
    Ok(target)
}

/// Serves one request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::bad_request(format!(
                "reading the request body: {e}"
            ))));
        }
    };
    let resp = route(&shared, &method, &path, &query, &headers, body).await;
    tracing::debug!(target: "kube_api_double", %method, %path, status = resp.status().as_u16(), "request");
    Ok(resp)
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Discovery and health.
    if *method == Method::GET {
        let resources = shared.lock().resources().to_vec();
        let doc = match segs.as_slice() {
            ["version"] => Some(discovery::version()),
            ["api"] => Some(discovery::core_versions(
                &shared
                    .server_address
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            )),
            ["apis"] => Some(discovery::group_list(&resources)),
            ["api", v] => discovery::resource_list(&resources, "", v),
            ["apis", g] => discovery::group(&resources, g),
            ["apis", g, v] => discovery::resource_list(&resources, g, v),
            ["openapi", "v3"] => Some(super::openapi::root(&resources)),
            ["openapi", "v3", rest @ ..] => {
                super::openapi::group_version(&resources, &rest.join("/"))
            }
            ["healthz"] | ["readyz"] | ["livez"] => {
                return Response::builder()
                    .status(200)
                    .header(header::CONTENT_TYPE, "text/plain")
                    .body(Full::new(Bytes::from_static(b"ok")).boxed())
                    .expect("response");
            }
            _ => None,
        };
        if let Some(doc) = doc {
            return json_response(StatusCode::OK, &doc);
        }
        if matches!(
            segs.as_slice(),
            ["api", _] | ["apis", _] | ["apis", _, _] | ["openapi", ..]
        ) {
            return error_response(&ApiError::no_route(path));
        }
    }
    let target = {
        let store = shared.lock();
        parse_target(&store, &segs)
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let r = shared.resource(target.res);
    if shared
        .unserved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&(r.group, r.plural))
    {
        return error_response(&ApiError::no_route(path));
    }
    let injected = shared
        .failing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(res, _)| *res == (r.group, r.plural))
        .map(|(_, e)| e.clone());
    if let Some(e) = injected {
        return error_response(&e);
    }
    match resource_request(shared, method, &target, query, headers, body).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("protobuf") {
        return super::protobuf::decode(body).map_err(ApiError::unsupported_media_type);
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(je) if ct.contains("yaml") => serde_yaml_ng::from_slice(body).map_err(|ye| {
            ApiError::bad_request(format!("the body is neither JSON ({je}) nor YAML ({ye})"))
        }),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

fn accept(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn wants_partial(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            // Only when the first preference asks for it.
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
        })
}

fn dry_run(query: &BTreeMap<String, String>) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

async fn resource_request(
    shared: &Arc<Shared>,
    method: &Method,
    t: &Target,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let r = shared.resource(t.res);
    let ns = t.namespace.as_deref();
    let part = match t.sub.as_deref() {
        None => Part::Main,
        Some("status") => Part::Status,
        Some(_) => Part::Main,
    };
    if r.create_only {
        return match (method, &t.name) {
            (&Method::POST, None) => {
                shared.count("create", r.plural);
                super::token_api::token_review(shared, &parse_body(headers, &body)?)
            }
            _ => Err(ApiError::method_not_allowed(format!(
                "{} only supports create",
                r.qualified()
            ))),
        };
    }
    match (method.clone(), t.name.as_deref(), t.sub.as_deref()) {
        (Method::GET, None, None) => {
            let labels =
                LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
                    .map_err(ApiError::bad_request)?;
            let fields =
                FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
                    .map_err(ApiError::bad_request)?;
            let partial = wants_partial(headers);
            if query.get("watch").is_some_and(|v| v == "true" || v == "1") {
                shared.count("watch", r.plural);
                let rv = query
                    .get("resourceVersion")
                    .map(String::as_str)
                    .unwrap_or("");
                let start = if query.get("sendInitialEvents").is_some_and(|v| v == "true") {
                    Start::Now {
                        initial_end_bookmark: true,
                    }
                } else if rv.is_empty() || rv == "0" {
                    Start::Now {
                        initial_end_bookmark: false,
                    }
                } else {
                    Start::After(rv.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                    })?)
                };
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::from_secs(1800));
                let req = WatchRequest {
                    res: t.res,
                    namespace: t.namespace.clone(),
                    labels,
                    fields,
                    start,
                    bookmarks: query
                        .get("allowWatchBookmarks")
                        .is_some_and(|v| v == "true"),
                    timeout,
                    partial,
                };
                let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
                tokio::spawn(watcher::run(shared.clone(), req, tx));
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                });
                return Ok(Response::builder()
                    .status(200)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::TRANSFER_ENCODING, "chunked")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .expect("response"));
            }
            shared.count("list", r.plural);
            let (items, rv) = shared.lock().list(t.res, ns, &labels, &fields);
            let list = if table::wanted(accept(headers)) {
                let include = query.get("includeObject").map(String::as_str).unwrap_or("");
                table::table(&r, &items, rv, include)
            } else if partial {
                json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
                })
            } else {
                json!({
                    "kind": r.list_kind(),
                    "apiVersion": r.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                })
            };
            Ok(json_response(StatusCode::OK, &list))
        }
        (Method::GET, Some(name), None | Some("status")) => {
            shared.count("get", r.plural);
            let (obj, rv) = {
                let store = shared.lock();
                (store.get(t.res, ns, name)?, store.resource_version())
            };
            let obj = if table::wanted(accept(headers)) {
                let include = query.get("includeObject").map(String::as_str).unwrap_or("");
                table::table(&r, &[obj], rv, include)
            } else if wants_partial(headers) {
                partial_metadata(&obj)
            } else {
                obj
            };
            Ok(json_response(StatusCode::OK, &obj))
        }
        (Method::POST, None, None) => {
            shared.count("create", r.plural);
            let obj = parse_body(headers, &body)?;
            let created = shared.write(|s| s.create(t.res, ns, obj, dry_run(query)))?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Method::POST, Some(name), Some("token")) => {
            shared.count("create", "serviceaccounts/token");
            super::token_api::token_request(
                shared,
                t.res,
                ns.unwrap_or_default(),
                name,
                &parse_body(headers, &body)?,
            )
        }
        (Method::PUT, Some(name), None | Some("status")) => {
            shared.count("update", r.plural);
            let obj = parse_body(headers, &body)?;
            let out = shared.write(|s| s.update(t.res, ns, name, obj, part, dry_run(query)))?;
            Ok(json_response(StatusCode::OK, &out))
        }
        (Method::PATCH, Some(name), None | Some("status")) => {
            shared.count("patch", r.plural);
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = PatchType::from_content_type(ct).ok_or_else(|| {
                ApiError::unsupported_media_type(format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"
                ))
            })?;
            let patch = parse_body(headers, &body)?;
            let out =
                shared.write(|s| s.patch(t.res, ns, name, kind, &patch, part, dry_run(query)))?;
            Ok(json_response(StatusCode::OK, &out))
        }
        (Method::DELETE, Some(name), None) => {
            shared.count("delete", r.plural);
            let opts: Value = if body.is_empty() {
                json!({})
            } else {
                parse_body(headers, &body)?
            };
            let pre = Preconditions {
                uid: opts
                    .pointer("/preconditions/uid")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                resource_version: opts
                    .pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            };
            let body_dry = opts
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v == "All"));
            let out =
                shared.write(|s| s.delete(t.res, ns, name, &pre, dry_run(query) || body_dry))?;
            Ok(json_response(StatusCode::OK, &out))
        }
        (m, _, _) => Err(ApiError::method_not_allowed(format!(
            "{m} is not supported on {}{}",
            r.qualified(),
            t.sub
                .as_deref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::resources::ALL;
    use super::*;

    #[test]
    fn queries_are_decoded() {
        let q = parse_query(Some(
            "labelSelector=app%3Dweb%2C%21x&watch=true&fieldSelector=spec.nodeName%3Dn1&a+b=c+d&bad=%zz",
        ));
        assert_eq!(q["labelSelector"], "app=web,!x");
        assert_eq!(q["fieldSelector"], "spec.nodeName=n1");
        assert_eq!(q["a b"], "c d");
        assert_eq!(q["bad"], "%zz");
    }

    #[test]
    fn paths_map_to_resources() {
        let s = Store::new(ALL.to_vec(), 10);
        let t = |p: &str| {
            let segs: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
            parse_target(&s, &segs).map(|t| {
                (
                    s.resource(t.res).plural,
                    t.namespace.unwrap_or_default(),
                    t.name.unwrap_or_default(),
                    t.sub.unwrap_or_default(),
                )
            })
        };
        assert_eq!(
            t("/api/v1/namespaces").unwrap(),
            ("namespaces", "".into(), "".into(), "".into())
        );
        assert_eq!(
            t("/api/v1/namespaces/demo").unwrap(),
            ("namespaces", "".into(), "demo".into(), "".into())
        );
        assert_eq!(
            t("/api/v1/namespaces/demo/status").unwrap(),
            ("namespaces", "".into(), "demo".into(), "status".into())
        );
        assert_eq!(
            t("/api/v1/namespaces/demo/pods").unwrap(),
            ("pods", "demo".into(), "".into(), "".into())
        );
        assert_eq!(
            t("/api/v1/namespaces/demo/pods/p/status").unwrap(),
            ("pods", "demo".into(), "p".into(), "status".into())
        );
        assert_eq!(
            t("/api/v1/pods").unwrap(),
            ("pods", "".into(), "".into(), "".into())
        );
        assert_eq!(
            t("/api/v1/namespaces/d/serviceaccounts/s/token").unwrap().3,
            "token"
        );
        assert_eq!(
            t("/apis/apps/v1/namespaces/x/daemonsets/d").unwrap().0,
            "daemonsets"
        );
        assert_eq!(
            t("/apis/security.istio.io/v1/authorizationpolicies")
                .unwrap()
                .0,
            "authorizationpolicies"
        );
        assert_eq!(t("/api/v1/nodes/n1/status").unwrap().3, "status");
        for bad in [
            "/api/v1/pods/x",
            "/api/v1/namespaces/d/pods/p/exec",
            "/api/v2/pods",
            "/apis/nope/v1/x",
            "/api/v1/namespaces/d/nodes",
        ] {
            assert_eq!(t(bad).unwrap_err().code, 404, "{bad}");
        }
    }
}
