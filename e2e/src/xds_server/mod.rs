//! A test double of istiod's xDS server: test harness, not product code.
//!
//! Serves `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`
//! (delta xDS) with the two resource types istiod sends ambient ztunnels
//! ([`ADDRESS_TYPE`]: workloads named by uid and services named
//! `<namespace>/<hostname>`; [`AUTHORIZATION_TYPE`]: policies named
//! `<namespace>/<name>`), so real ztunnel binaries (ours and Istio's) can connect.
//!
//! Behaviour:
//! - each stream keeps its own subscriptions (wildcard, i.e. no names or `*`, or
//!   explicit names) and what its client holds (name -> version, seeded from
//!   `initial_resource_versions`); every subscription request is answered (even
//!   with an empty response), later changes are pushed as deltas: only the
//!   resources whose version the client lacks, plus `removed_resources`;
//! - explicit names select as istiod's on-demand lookup does ([`XdsHandle::demanded`]
//!   lists them): by resource name or alias (`<network>/<ip>` of a workload's
//!   addresses or a service's VIPs, sent as the resource's `aliases`), a service
//!   together with its workloads; a name nothing matches is answered in
//!   `removed_resources`. Subscribing to `*` and unsubscribing it in one request (what
//!   on-demand clients do) leaves only the explicit names; a name passed to
//!   [`XdsHandle::withhold`] is never answered (an overloaded istiod);
//! - a resource's version is a counter bumped on every set; changes made in quick
//!   succession may be coalesced into one response;
//! - every response has a server-unique nonce; ACKs and NACKs are recorded
//!   ([`XdsHandle::acks`]) but change nothing (like istiod, a NACKed resource is
//!   not resent);
//! - the `authorization: Bearer <token>` and `clusterid` headers of each stream
//!   are recorded with its node ([`XdsHandle::nodes`]); with
//!   [`XdsServer::require_token`] other tokens are refused with `Unauthenticated`.
//!
//! The server runs on its own runtime, so sync and async tests can use it alike.
//! Waiting: [`XdsHandle::wait_for`] / [`XdsHandle::wait_acked`] are async (they
//! need the caller's tokio runtime, with time enabled);
//! [`XdsHandle::wait_for_blocking`] / [`XdsHandle::wait_acked_blocking`] are for
//! sync code (they panic if called from async code).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use mesh_proto::security::Authorization;
use mesh_proto::workload::{Address, Service, Workload, address};
use mesh_proto::xds::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

pub use mesh_proto::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

mod state;
use state::{Shared, State, alias, resource};

/// An ACK or NACK received from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The stream it came on (see [`NodeInfo::stream`]).
    pub stream: u64,
    pub type_url: String,
    pub nonce: String,
    /// `Some(error_detail.message)` for a NACK.
    pub error: Option<String>,
}

/// One accepted stream: its client's node (filled in by its first request that
/// carries one) and headers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub stream: u64,
    pub id: String,
    pub cluster: String,
    /// The node metadata `Struct` as JSON (`Null` when absent).
    pub metadata: serde_json::Value,
    /// The `authorization` header without its `Bearer ` prefix.
    pub token: Option<String>,
    /// The `clusterid` header.
    pub cluster_id: Option<String>,
}

/// A request that changed a stream's subscription (the first of each type does).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subscription {
    pub stream: u64,
    pub type_url: String,
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
}

/// Builder: `XdsServer::new().tls(cert, key).require_token("t").start(addr)`.
#[derive(Default)]
pub struct XdsServer {
    tls: Option<(String, String)>,
    token: Option<String>,
}

impl XdsServer {
    /// Plaintext, accepting any (or no) token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves TLS with this certificate (chain) and key, PEM. istiod's
    /// certificate is for `istiod.istio-system.svc`.
    pub fn tls(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.tls = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Refuses streams whose `authorization` header is not `Bearer <token>`.
    pub fn require_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Binds `addr` (port 0 picks one, see [`XdsHandle::addr`]) and serves on a
    /// runtime of its own until the handle is dropped.
    pub fn start(self, addr: SocketAddr) -> std::io::Result<XdsHandle> {
        self.start_on(std::net::TcpListener::bind(addr)?)
    }

    /// [`Self::start`] on a listener bound elsewhere (e.g. in a simulated underlay
    /// namespace, so ztunnels in pods reach it).
    pub fn start_on(self, listener: std::net::TcpListener) -> std::io::Result<XdsHandle> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key)) = &self.tls {
            let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            builder = builder.tls_config(tls).map_err(std::io::Error::other)?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("xds-double")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            data: watch::channel(0).0,
            events: watch::channel(()).0,
            close: watch::channel(0).0,
            token: self.token,
        });
        let incoming = {
            let _enter = runtime.enter();
            TcpIncoming::from(tokio::net::TcpListener::from_std(listener)?).with_nodelay(Some(true))
        };
        let router =
            builder.add_service(AggregatedDiscoveryServiceServer::new(Ads(shared.clone())));
        runtime.spawn(async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::warn!(target: "xds_double", "xDS server failed: {e}");
            }
        });
        Ok(XdsHandle {
            shared,
            runtime: Some(runtime),
            addr,
        })
    }
}

/// A running server; dropping it stops it.
pub struct XdsHandle {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl std::fmt::Debug for XdsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl XdsHandle {
    /// The bound address (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds or replaces a workload (named by its `uid`, aliased `<network>/<ip>` for
    /// each address, a member of the services its `services` names) and pushes it.
    pub fn set_workload(&self, w: Workload) {
        let name = w.uid.clone();
        let aliases = w
            .addresses
            .iter()
            .filter_map(|a| alias(&w.network, a))
            .collect();
        let services: Vec<String> = w.services.keys().cloned().collect();
        let value = Address {
            r#type: Some(address::Type::Workload(w)),
        };
        let uid = name.clone();
        let resource = resource(ADDRESS_TYPE, name, aliases, value.encode_to_vec());
        // One change (one push): the resource and its service memberships together.
        self.store(ADDRESS_TYPE, resource, move |st| {
            for members in st.members.values_mut() {
                members.remove(&uid);
            }
            for svc in services {
                st.members.entry(svc).or_default().insert(uid.clone());
            }
        });
    }

    /// Adds or replaces a service (named `<namespace>/<hostname>`, aliased
    /// `<network>/<vip>` for each VIP) and pushes it.
    pub fn set_service(&self, s: Service) {
        let name = format!("{}/{}", s.namespace, s.hostname);
        let aliases = s
            .addresses
            .iter()
            .filter_map(|a| alias(&a.network, &a.address))
            .collect();
        let value = Address {
            r#type: Some(address::Type::Service(s)),
        };
        self.push_raw(
            ADDRESS_TYPE,
            resource(ADDRESS_TYPE, name, aliases, value.encode_to_vec()),
        );
    }

    /// Every request that subscribed or unsubscribed (or was a stream's first of its
    /// type), in order.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.shared.lock().subscriptions.clone()
    }

    /// Every Address name a client subscribed to explicitly (on-demand lookups), in
    /// order.
    pub fn demanded(&self) -> Vec<String> {
        self.shared.lock().demanded.clone()
    }

    /// Never answers an explicit subscription to `name` (an on-demand lookup): neither
    /// the resources it matches nor its absence, as an overloaded istiod.
    pub fn withhold(&self, name: &str) {
        self.shared
            .mutate(|s| _ = s.withheld.insert(name.to_string()));
    }

    /// Removes a workload (uid) or service (`<namespace>/<hostname>`).
    pub fn remove_address(&self, name: &str) {
        self.shared.mutate(|st| {
            st.members.remove(name);
            for members in st.members.values_mut() {
                members.remove(name);
            }
        });
        self.remove_raw(ADDRESS_TYPE, name);
    }

    /// Adds or replaces a policy (named `<namespace>/<name>`) and pushes it.
    pub fn set_authorization(&self, a: Authorization) {
        let name = format!("{}/{}", a.namespace, a.name);
        self.push_raw(
            AUTHORIZATION_TYPE,
            resource(AUTHORIZATION_TYPE, name, Vec::new(), a.encode_to_vec()),
        );
    }

    /// Removes a policy (`<namespace>/<name>`).
    pub fn remove_authorization(&self, name: &str) {
        self.remove_raw(AUTHORIZATION_TYPE, name);
    }

    /// Stores `resource` as it is under `type_url` (named by `resource.name`; an
    /// empty version gets a fresh one) and pushes it: for malformed resources.
    pub fn push_raw(&self, type_url: &str, resource: Resource) {
        self.store(type_url, resource, |_| {});
    }

    /// Stores `resource` (see [`Self::push_raw`]) and applies `also` in the same change.
    fn store(&self, type_url: &str, mut resource: Resource, also: impl FnOnce(&mut State)) {
        self.shared.mutate(|s| {
            if resource.version.is_empty() {
                s.next_version += 1;
                resource.version = s.next_version.to_string();
            }
            s.resources
                .entry(type_url.to_string())
                .or_default()
                .insert(resource.name.clone(), resource);
            also(s);
        });
    }

    /// Removes the resource `name` of any type.
    pub fn remove_raw(&self, type_url: &str, name: &str) {
        self.shared.mutate(|s| {
            if let Some(r) = s.resources.get_mut(type_url) {
                r.remove(name);
            }
        });
    }

    /// Every ACK and NACK received, in order.
    pub fn acks(&self) -> Vec<Ack> {
        self.shared.lock().acks.clone()
    }

    /// Every stream accepted, in order.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.shared.lock().nodes.clone()
    }

    /// The tokens of the streams refused by [`XdsServer::require_token`].
    pub fn rejected_tokens(&self) -> Vec<Option<String>> {
        self.shared.lock().rejected.clone()
    }

    /// Streams currently open.
    pub fn connected(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Ends every open stream with `Unavailable` (clients reconnect).
    pub fn close_streams(&self) {
        self.shared.close.send_modify(|g| *g += 1);
    }

    /// Waits until `pred(self)` holds; re-checked after every change (resources,
    /// streams, ACKs). False on timeout.
    pub async fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&Self) -> bool) -> bool {
        let mut rx = self.shared.events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if pred(self) {
                return true;
            }
            let changed = tokio::time::timeout_at(deadline, rx.changed());
            if !matches!(changed.await, Ok(Ok(()))) {
                return pred(self);
            }
        }
    }

    /// Waits until at least one stream subscribes to `type_url` and every such
    /// stream has been sent the resources as of this call and ACKed its latest
    /// response of that type. `Err` holds the NACK's message, or why it timed out.
    pub async fn wait_acked(&self, type_url: &str, timeout: Duration) -> Result<(), String> {
        let target = self.shared.lock().rev;
        let mut outcome = None;
        let state = |h: &Self| h.shared.lock().ack_state(type_url, target);
        self.wait_for(timeout, |h| {
            outcome = state(h);
            outcome.is_some()
        })
        .await;
        outcome.unwrap_or_else(|| Err(format!("no ACK of {type_url} within {timeout:?}")))
    }

    /// [`Self::wait_for`] for sync code (panics in async code).
    pub fn wait_for_blocking(&self, timeout: Duration, pred: impl FnMut(&Self) -> bool) -> bool {
        self.runtime().block_on(self.wait_for(timeout, pred))
    }

    /// [`Self::wait_acked`] for sync code (panics in async code).
    pub fn wait_acked_blocking(&self, type_url: &str, timeout: Duration) -> Result<(), String> {
        self.runtime().block_on(self.wait_acked(type_url, timeout))
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime present until drop")
    }
}

impl Drop for XdsHandle {
    fn drop(&mut self) {
        self.close_streams();
        if let Some(rt) = self.runtime.take() {
            // Allowed from async contexts too (unlike dropping it).
            rt.shutdown_background();
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

struct Ads(Arc<Shared>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let header = |k: &str| {
            request
                .metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let token = header("authorization").map(|v| match v.strip_prefix("Bearer ") {
            Some(t) => t.to_string(),
            None => v,
        });
        let cluster_id = header("clusterid");
        let shared = self.0.clone();
        if let Some(required) = &shared.token
            && token.as_deref() != Some(required.as_str())
        {
            shared.lock().rejected.push(token);
            shared.notify();
            return Err(Status::unauthenticated("missing or wrong bearer token"));
        }
        let id = {
            let mut s = shared.lock();
            s.next_stream += 1;
            let id = s.next_stream;
            s.streams.insert(id, HashMap::new());
            let info = NodeInfo {
                stream: id,
                token,
                cluster_id,
                ..Default::default()
            };
            s.nodes.push(info);
            id
        };
        shared.notify();
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(run_stream(shared, id, request.into_inner(), tx));
        let out = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves stream `id` until either side ends it.
async fn run_stream(
    shared: Arc<Shared>,
    id: u64,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let mut data = shared.data.subscribe();
    let mut close = shared.close.subscribe();
    let mut subs = HashMap::new();
    'stream: loop {
        let responses: Vec<DeltaDiscoveryResponse> = tokio::select! {
            msg = inbound.next() => match msg {
                Some(Ok(req)) => shared.on_request(id, &mut subs, req).into_iter().collect(),
                Some(Err(_)) | None => break,
            },
            changed = data.changed() => {
                if changed.is_err() {
                    break;
                }
                let mut s = shared.lock();
                let out = subs
                    .iter_mut()
                    .filter_map(|(t, sub)| s.delta(id, t, sub, None))
                    .collect();
                drop(s);
                shared.notify();
                out
            }
            _ = close.changed() => {
                let _ = tx.send(Err(Status::unavailable("stream closed by the xDS double"))).await;
                break;
            }
            _ = tx.closed() => break,
        };
        for r in responses {
            if tx.send(Ok(r)).await.is_err() {
                break 'stream;
            }
        }
    }
    shared.lock().streams.remove(&id);
    shared.notify();
}

/// A serving certificate and key (PEM) for istiod, for `names` (DNS names or IP
/// addresses), signed by the root `root_cert_pem` / `root_key_pem`.
pub fn serving_cert(
    root_cert_pem: &str,
    root_key_pem: &str,
    names: &[String],
) -> Result<(String, String), rcgen::Error> {
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(root_cert_pem, rcgen::KeyPair::from_pem(root_key_pem)?)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(names.to_vec())?.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A namespace-scoped DENY policy named `<namespace>/<name>` for one principal
/// (`<trust domain>/ns/<ns>/sa/<sa>`), as istiod converts such an AuthorizationPolicy.
pub fn deny_principal(namespace: &str, name: &str, principal: &str) -> Authorization {
    use mesh_proto::security as sec;
    Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(principal.into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

#[cfg(test)]
mod tests;
