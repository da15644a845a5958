//! **A test double of the Kubernetes API server — not a product.**
//!
//! An in-memory, single-process HTTP server speaking enough of the
//! Kubernetes REST API for real `kubectl` (v1.32) and kube-rs clients, so
//! the project's programs and tests can run against "a cluster" on a
//! machine without Kubernetes. Plain HTTP, no authentication, no
//! authorization, no admission beyond a few defaults, no persistence.
//!
//! # What it serves
//! - Discovery: `/version`, `/api`, `/apis`, `/api/v1`, `/apis/<g>[/<v>]`
//!   (plain `APIVersions`/`APIGroupList`/`APIResourceList`; kubectl falls
//!   back to them from aggregated discovery). `/openapi/v3` documents with
//!   just enough for kubectl to choose server-side field validation (which
//!   is accepted and ignored); no schemas.
//! - Resources ([`resources::ALL`]): namespaces, pods (+`status`),
//!   services, serviceaccounts (+`token`), nodes, configmaps, secrets,
//!   events (core and `events.k8s.io`), endpoints, endpointslices, apps/v1
//!   daemonsets and deployments, leases, `security.istio.io/v1`
//!   authorizationpolicies and peerauthentications (arbitrary JSON; at
//!   `v1beta1` instead with [`ApiServer::istio_security_v1beta1_only`], as
//!   Istio CRDs before 1.22 serve them), `authentication.k8s.io/v1`
//!   tokenreviews (create only).
//! - Verbs: list (label selectors `k=v`, `k!=v`, `k`, `!k`, `k in (..)`,
//!   `k notin (..)`; field selectors on any dotted path, e.g.
//!   `metadata.name`, `spec.nodeName`), get, create (uid,
//!   resourceVersion, creationTimestamp, generateName, namespace must
//!   exist), update (resourceVersion conflicts), patch (merge, strategic
//!   merge (named lists merged by `name`), JSON patch, apply (as a merge)),
//!   delete (immediate, except namespaces: Terminating first, then removed
//!   with their content [`NAMESPACE_FINALIZE_AFTER`] later), `dryRun=All`.
//!   Writes to `status` go through the `/status` subresource only (and it
//!   changes only status, labels and annotations), as in the real server.
//! - Watch: `?watch=true` with `resourceVersion`, `allowWatchBookmarks`,
//!   `timeoutSeconds`, `sendInitialEvents`; newline-delimited JSON events
//!   (ADDED/MODIFIED/DELETED/BOOKMARK); a resourceVersion older than the
//!   retained event window gets an ERROR event with a 410 `Expired` Status
//!   (kube-rs watchers then re-list). Objects moving out of (into) a
//!   selector are sent as DELETED (ADDED).
//! - TokenRequest / TokenReview with HMAC-signed JWT-shaped tokens
//!   ([`tokens`]); bound pod tokens carry the pod name/uid (and node) in
//!   the review's `user.extra`.
//! - A few things real controllers would do: namespaces get a `default`
//!   ServiceAccount and the `kubernetes.io/metadata.name` label; services a
//!   cluster IP from 10.96.0.0/16; pods `serviceAccountName: default` and
//!   `status.phase: Pending` on create; secrets' `stringData` is encoded.
//! - `kubectl get` tables ([`table`]): the usual columns for pods,
//!   namespaces, services, nodes.
//!
//! kubectl caches discovery per `host:port` under `~/.kube/cache`: tests
//! that restart the double on the same port with other resources should
//! give kubectl its own `HOME` (or `--cache-dir`).
//!
//! Not served: protobuf (except what `kubectl create <kind>` sends, see
//! [`protobuf`]), OpenAPI schemas and v2, server-side apply field ownership,
//! pagination (`limit` is ignored, everything comes in one page), graceful
//! deletion, finalizers, RBAC.
//!
//! # Use
//! In-process (a dedicated thread runs the server, so it works from sync
//! and async tests alike):
//! ```no_run
//! let api = e2e::apiserver::ApiServer::start().unwrap();
//! let kubeconfig = std::env::temp_dir().join("kubeconfig");
//! api.write_kubeconfig(&kubeconfig).unwrap();
//! // kubectl --kubeconfig <file> ..., or kube::Client::try_from(api.kube_config())
//! ```
//! As a process: `kube-api-double --listen 127.0.0.1:6443 --kubeconfig-out
//! /tmp/kubeconfig`, then `kubectl --kubeconfig /tmp/kubeconfig get ns`.

pub mod defaults;
pub mod discovery;
mod http;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod selector;
pub mod status;
pub mod store;
pub mod table;
mod token_api;
pub mod tokens;
mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::Value;

pub use status::ApiError;
pub use tokens::{DEFAULT_AUDIENCE, TokenSigner, TokenSpec};

use http::Shared;

/// How long a deleted namespace stays Terminating before its content and
/// then the namespace are removed.
pub const NAMESPACE_FINALIZE_AFTER: Duration = Duration::from_secs(2);

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("kube-api-double: cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kube-api-double: cannot start its runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("kube-api-double: cannot write kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Settings; `ApiServer::default()` listens on an ephemeral port of
/// 127.0.0.1.
#[derive(Debug)]
pub struct ApiServer {
    listen: Vec<SocketAddr>,
    listeners: Vec<std::net::TcpListener>,
    event_window: usize,
    bookmark_interval: Duration,
    signer: Option<TokenSigner>,
    authorization_policy_crd: bool,
    peer_authentication_crd: bool,
    /// The version the Istio `security.istio.io` kinds are served at.
    istio_security_version: &'static str,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            listeners: Vec::new(),
            event_window: 10_000,
            bookmark_interval: Duration::from_secs(5),
            signer: None,
            authorization_policy_crd: true,
            peer_authentication_crd: true,
            istio_security_version: "v1",
        }
    }
}

impl ApiServer {
    /// Starts a server with default settings on `127.0.0.1:<ephemeral>`.
    pub fn start() -> Result<ApiServerHandle, ApiServerError> {
        Self::default().run()
    }

    /// Adds an address to listen on (`127.0.0.1:0` picks a port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// Adds an already bound listener (e.g. one bound inside a network
    /// namespace with `netsim::Cluster::bind_host_tcp`).
    pub fn listener(mut self, l: std::net::TcpListener) -> Self {
        self.listeners.push(l);
        self
    }

    /// How many change events are retained for watches to resume from
    /// (default 10 000); older resourceVersions get 410 Gone.
    pub fn event_window(mut self, n: usize) -> Self {
        self.event_window = n;
        self
    }

    /// How often open watches that asked for bookmarks get one (default 5 s).
    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    /// The key tokens are signed with (default: random).
    pub fn signer(mut self, s: TokenSigner) -> Self {
        self.signer = Some(s);
        self
    }

    /// Serve without the `security.istio.io` AuthorizationPolicy resource
    /// (a cluster where the CRD is not installed).
    pub fn without_authorization_policy_crd(mut self) -> Self {
        self.authorization_policy_crd = false;
        self
    }

    /// Serve without the `security.istio.io` PeerAuthentication resource.
    pub fn without_peer_authentication_crd(mut self) -> Self {
        self.peer_authentication_crd = false;
        self
    }

    /// Serve the `security.istio.io` AuthorizationPolicy and
    /// PeerAuthentication resources at `v1beta1` only (no `v1`: a cluster whose
    /// Istio CRDs predate Istio 1.22). Objects are created, listed and watched
    /// as `security.istio.io/v1beta1`.
    pub fn istio_security_v1beta1_only(mut self) -> Self {
        self.istio_security_version = "v1beta1";
        self
    }

    /// Binds and starts serving on a dedicated thread.
    pub fn run(self) -> Result<ApiServerHandle, ApiServerError> {
        let mut listeners = self.listeners;
        let mut addrs = self.listen;
        if addrs.is_empty() && listeners.is_empty() {
            addrs.push(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        for a in addrs {
            listeners.push(std::net::TcpListener::bind(a).map_err(|source| {
                ApiServerError::Listen {
                    addr: a.to_string(),
                    source,
                }
            })?);
        }
        let resources = served_resources(
            self.authorization_policy_crd,
            self.peer_authentication_crd,
            self.istio_security_version,
        );
        let store = store::Store::new(resources, self.event_window);
        let shared = Arc::new(Shared::new(
            store,
            self.signer.unwrap_or_else(TokenSigner::random),
            self.bookmark_interval,
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-api-double")
            .enable_all()
            .build()
            .map_err(ApiServerError::Runtime)?;
        let mut handle = ApiServerHandle {
            shared,
            runtime: Some(runtime),
            addrs: Vec::new(),
        };
        // The namespace "controller": removes deleted namespaces' content
        // NAMESPACE_FINALIZE_AFTER after the deletion. Not at once: `kubectl
        // delete -f` of a namespace and its content deletes them one by one
        // after the namespace, and expects them still there (a real cluster's
        // controller takes seconds).
        let ctl = handle.shared.clone();
        handle.runtime().spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if ctl.lock().has_terminating() {
                    let cutoff = std::time::Instant::now() - NAMESPACE_FINALIZE_AFTER;
                    ctl.write(|s| s.finalize_namespaces_deleted_before(cutoff));
                }
            }
        });
        for l in listeners {
            handle
                .add_listener(l)
                .map_err(|source| ApiServerError::Listen {
                    addr: "a given listener".into(),
                    source,
                })?;
        }
        Ok(handle)
    }
}

/// [`resources::ALL`] without the Istio kinds left out, the Istio kinds served
/// at `istio_version`.
fn served_resources(
    authorization_policy: bool,
    peer_authentication: bool,
    istio_version: &'static str,
) -> Vec<resources::ResourceType> {
    resources::ALL
        .iter()
        .copied()
        .filter(|r| {
            (authorization_policy || (r.group, r.plural) != resources::AUTHORIZATION_POLICY)
                && (peer_authentication || (r.group, r.plural) != resources::PEER_AUTHENTICATION)
        })
        .map(|mut r| {
            if [
                resources::AUTHORIZATION_POLICY,
                resources::PEER_AUTHENTICATION,
            ]
            .contains(&(r.group, r.plural))
            {
                r.version = istio_version;
            }
            r
        })
        .collect()
}

/// A running server. Dropping it stops it (open watches end).
pub struct ApiServerHandle {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    addrs: Vec<SocketAddr>,
}

impl std::fmt::Debug for ApiServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerHandle")
            .field("addrs", &self.addrs)
            .finish()
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "kube_api_double", "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| http::handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl ApiServerHandle {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime present until drop")
    }

    /// Serves on another listener too (e.g. one inside a simulated
    /// underlay namespace, so processes in nodes and pods reach the API).
    pub fn add_listener(&mut self, l: std::net::TcpListener) -> std::io::Result<SocketAddr> {
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let l = {
            let _guard = self.runtime().enter();
            tokio::net::TcpListener::from_std(l)?
        };
        if self.addrs.is_empty() {
            *self
                .shared
                .server_address
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = addr.to_string();
        }
        self.runtime().spawn(accept_loop(l, self.shared.clone()));
        self.addrs.push(addr);
        Ok(addr)
    }

    /// Addresses served, first = [`ApiServerHandle::url`]'s.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// `http://<first address>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addrs[0])
    }

    /// A kubeconfig (YAML) pointing at `server` (e.g. [`Self::url`]), with
    /// an empty user; kubectl and kube-rs both accept it.
    pub fn kubeconfig_yaml_for(server: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-api-double\n  cluster:\n    server: {server}\ncontexts:\n- name: kube-api-double\n  context:\n    cluster: kube-api-double\n    user: kube-api-double\n    namespace: default\ncurrent-context: kube-api-double\nusers:\n- name: kube-api-double\n  user: {{}}\n"
        )
    }

    /// Writes a kubeconfig for [`Self::url`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), ApiServerError> {
        write_kubeconfig_for(path, &self.url())
    }

    /// A kube-rs configuration for [`Self::url`] (build the client inside
    /// your runtime: `kube::Client::try_from(cfg)`).
    pub fn kube_config(&self) -> kube::Config {
        let mut cfg = kube::Config::new(self.url().parse().expect("server URL"));
        cfg.default_namespace = "default".into();
        cfg.read_timeout = None;
        cfg
    }

    /// The token signer (to verify or mint tokens).
    pub fn signer(&self) -> &TokenSigner {
        &self.shared.signer
    }

    /// Mints a token as TokenRequest would, but with any expiry (also in
    /// the past) and without checking that the account or pod exist. When
    /// the account exists its UID is bound into the token.
    pub fn mint_token(&self, spec: &TokenSpec) -> String {
        let mut spec = spec.clone();
        if spec.service_account_uid.is_none() {
            let store = self.shared.lock();
            if let Some(i) = store.index("", "serviceaccounts")
                && let Ok(sa) = store.get(i, Some(&spec.namespace), &spec.service_account)
            {
                spec.service_account_uid = sa
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
        }
        self.shared.signer.mint(&spec)
    }

    /// Forgets all retained events and moves the resourceVersion on, so
    /// every version clients hold is too old: their watches (open ones on
    /// their next wake-up, and every resumption) get 410 Gone and kube-rs
    /// watchers re-list.
    pub fn compact(&self) {
        self.shared.write(|s| s.compact());
    }

    /// Stops (`false`) or resumes (`true`) serving resource `group`/`plural`
    /// over HTTP, at every version, as if its CRD were removed and installed
    /// again: requests get 404 meanwhile and open watches of it end (other
    /// watches end too and resume). Objects are kept.
    pub fn set_served(&self, (group, plural): (&'static str, &'static str), served: bool) {
        {
            let mut unserved = self
                .shared
                .unserved
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            unserved.retain(|r| *r != (group, plural));
            if !served {
                unserved.push((group, plural));
            }
        }
        if !served {
            self.close_watches();
        }
    }

    /// Answers every request for resource `group`/`plural` with `error`
    /// (`None`: serve it again), e.g. [`ApiError::forbidden`] as after its
    /// RBAC was deleted or [`ApiError::unavailable`]. Objects are kept.
    pub fn set_failing(
        &self,
        (group, plural): (&'static str, &'static str),
        error: Option<ApiError>,
    ) {
        let mut failing = self
            .shared
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failing.retain(|(r, _)| *r != (group, plural));
        if let Some(e) = error {
            failing.push(((group, plural), e));
        }
    }

    /// Ends every open watch (clients reconnect from their last version).
    pub fn close_watches(&self) {
        self.shared.closing.send_modify(|g| *g += 1);
    }

    /// How many requests of `verb` (`list`, `watch`, `get`, `create`,
    /// `update`, `patch`, `delete`; `gone` = 410 answers to watches) were
    /// served for resource `plural`.
    pub fn request_count(&self, verb: &str, plural: &str) -> u64 {
        self.shared
            .counts()
            .get(&format!("{verb} {plural}"))
            .copied()
            .unwrap_or(0)
    }

    /// Watch streams open now (a watch ends at its timeout, when its client
    /// goes away, or on [`Self::close_watches`]).
    pub fn open_watches(&self) -> usize {
        self.shared
            .open_watches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    fn resolve(&self, api_version: &str, kind: &str) -> Result<usize, ApiError> {
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        self.shared
            .lock()
            .index_by_kind(group, kind)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "no resource for apiVersion {api_version} kind {kind}"
                ))
            })
    }

    /// Creates an object directly (no HTTP): `apiVersion`, `kind` and
    /// `metadata.namespace` (for namespaced kinds) pick where it goes.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let av = obj["apiVersion"].as_str().unwrap_or("").to_string();
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        let res = self.resolve(&av, &kind)?;
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.shared
            .write(|s| s.create(res, ns.as_deref(), obj, false))
    }

    /// Reads an object directly.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let res = self.resolve(api_version, kind)?;
        self.shared.lock().get(res, namespace, name)
    }

    /// Merge-patches an object (or its `/status` when `status` is true)
    /// directly, as a kubelet or controller would.
    pub fn merge_patch(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let res = self.resolve(api_version, kind)?;
        let part = if status {
            store::Part::Status
        } else {
            store::Part::Main
        };
        self.shared.write(|s| {
            s.patch(
                res,
                namespace,
                name,
                patch::PatchType::Merge,
                patch,
                part,
                false,
            )
        })
    }

    /// Deletes an object directly.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let res = self.resolve(api_version, kind)?;
        self.shared.write(|s| {
            s.delete(
                res,
                namespace,
                name,
                &store::Preconditions::default(),
                false,
            )
        })
    }
}

/// Writes a kubeconfig for `server` to `path`.
pub fn write_kubeconfig_for(path: &Path, server: &str) -> Result<(), ApiServerError> {
    std::fs::write(path, ApiServerHandle::kubeconfig_yaml_for(server)).map_err(|source| {
        ApiServerError::Kubeconfig {
            path: path.display().to_string(),
            source,
        }
    })
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.close_watches();
        if let Some(rt) = self.runtime.take() {
            // Allowed from async contexts too (unlike dropping it).
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `security.istio.io` at v1beta1 only: discovery, routing and `apiVersion`
    /// checks follow; nothing at v1.
    #[test]
    fn istio_kinds_can_be_served_at_v1beta1_only() {
        let res = served_resources(true, true, "v1beta1");
        assert_eq!(
            discovery::groups(&res)
                .into_iter()
                .find(|(g, _)| *g == "security.istio.io"),
            Some(("security.istio.io", vec!["v1beta1"]))
        );
        let list = discovery::resource_list(&res, "security.istio.io", "v1beta1").unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["authorizationpolicies", "peerauthentications"]);
        assert!(discovery::resource_list(&res, "security.istio.io", "v1").is_none());

        let api = ApiServer::default()
            .istio_security_v1beta1_only()
            .run()
            .unwrap();
        api.create(serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "app"}}))
            .unwrap();
        let pa = serde_json::json!({"apiVersion": "security.istio.io/v1beta1",
            "kind": "PeerAuthentication", "metadata": {"name": "default", "namespace": "app"},
            "spec": {"mtls": {"mode": "STRICT"}}});
        let created = api.create(pa.clone()).unwrap();
        assert_eq!(created["apiVersion"], "security.istio.io/v1beta1");
        let mut v1 = pa;
        v1["apiVersion"] = "security.istio.io/v1".into();
        v1["metadata"]["name"] = "other".into();
        assert!(api.create(v1).is_err(), "v1 is not served");
        assert!(
            api.get(
                "security.istio.io/v1beta1",
                "PeerAuthentication",
                Some("app"),
                "default"
            )
            .is_ok()
        );
        // Default: v1 only.
        let res = served_resources(true, false, "v1");
        assert!(discovery::resource_list(&res, "security.istio.io", "v1beta1").is_none());
        let v1 = discovery::resource_list(&res, "security.istio.io", "v1").unwrap();
        assert_eq!(v1["resources"].as_array().unwrap().len(), 1);
    }
}
