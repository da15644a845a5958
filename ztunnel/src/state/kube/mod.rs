//! The Kubernetes source (`KUBERNETES_DISCOVERY=true`): workloads, services and
//! authorization policies learnt from the API server, fed into the same
//! [`Store`](crate::state::Store) as the file source, so `/config_dump` and every
//! lookup look the same whichever source fed them.
//!
//! Six cluster-wide watches (kube-rs watchers: paginated list served from the
//! API server's cache, then `watch` from that resourceVersion with bookmarks; an
//! expired version (`410 Gone`) re-lists that one kind only, with jittered
//! back-off): Pods, Services, `discovery.k8s.io/v1` EndpointSlices, Nodes
//! (metadata only: a workload's locality is its node's topology labels, as
//! istiod gives it; a Node object's status is large and changes often), and
//! `security.istio.io` AuthorizationPolicies and PeerAuthentications (at `v1`,
//! or at `v1beta1` where the Istio CRDs predate 1.22: [`istio_watch`]).
//! PeerAuthentications become DENY policies with upstream's names
//! (`<root>/istio_converted_static_strict`,
//! `<ns>/converted_peer_authentication_<name>`) that the workloads they apply to
//! reference, as istiod does for ambient ([`crate::policy::kube::peer_authn`]):
//! a mesh-wide `mtls.mode: STRICT` refuses plaintext on 15006.
//!
//! Namespaces are not watched: nothing ztunnel enforces at L4 depends on
//! namespace labels (the node agent decides enrolment and marks pods with
//! `ambient.istio.io/redirection`), and one watch per node fewer matters at
//! scale (see `docs/discovery-cost.md`).
//!
//! A `403 Forbidden` on nodes (a role without `nodes` get/list/watch, as this
//! chart's before locality) is a warning, not a sync blocker: workloads then
//! have no locality (`unknown` in metrics, locality-aware load balancing has
//! nothing to prefer); the watch keeps retrying with back-off.
//!
//! A missing AuthorizationPolicy or PeerAuthentication CRD (404 at both `v1`
//! and `v1beta1`) is a warning, means "none", and is retried slowly (up to
//! every 60 s); other errors are logged and retried with the default back-off
//! (0.8 s doubling to 30 s; the two Istio kinds keep the slow back-off).
//!
//! Events are converted into compact facts ([`convert`]) kept in a
//! [`index::DiscoveryIndex`]; changes are batched (everything already received,
//! at most one store update per `min_update_interval`) and applied with one
//! snapshot rebuild on a blocking-pool thread; readers keep using the previous
//! snapshot until the swap. ztunnel runs discovery on a thread of its own
//! ([`KubeDiscovery::start_on_thread`]), so decoding and indexing never take time
//! from a data-plane thread either.
//!
//! [`KubeDiscovery::synced`] turns true once every kind has been listed once (the
//! Istio kinds also when their CRD is absent): until then authorization decisions
//! could be made on partial state, so ztunnel is not ready.

pub mod convert;
pub mod index;
mod istio_watch;
mod peer_authn;

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use crate::config::Config;
use crate::policy::kube::peer_authn::PeerAuthentication;
use crate::policy::kube::{AuthorizationPolicy, ConvertOptions};
use crate::state::SourceHandle;
pub use convert::ConvertSettings;
use index::DiscoveryIndex;

/// Source name in the store.
pub const SOURCE_NAME: &str = "kubernetes";

/// Discovery settings.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    pub settings: ConvertSettings,
    /// AuthorizationPolicies and PeerAuthentications here without a selector are
    /// mesh-wide (Istio's root namespace; `ROOT_NAMESPACE`).
    pub root_namespace: String,
    /// At most one store update per this interval (events in between are batched).
    pub min_update_interval: Duration,
}

impl KubeOptions {
    pub fn from_config(cfg: &Config) -> KubeOptions {
        KubeOptions {
            settings: ConvertSettings {
                trust_domain: cfg.trust_domain.clone(),
                cluster_id: cfg.cluster_id.clone(),
                cluster_domain: cfg.cluster_domain.clone(),
            },
            root_namespace: cfg.root_namespace.clone(),
            min_update_interval: Duration::from_millis(100),
        }
    }
}

/// A running discovery; stops when dropped.
pub struct KubeDiscovery {
    synced: watch::Receiver<bool>,
    runner: Runner,
}

enum Runner {
    /// A task on the caller's runtime.
    Task(tokio::task::JoinHandle<()>),
    /// A thread of its own (closing the sender stops it).
    Thread {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

impl Drop for KubeDiscovery {
    fn drop(&mut self) {
        match &mut self.runner {
            Runner::Task(t) => t.abort(),
            Runner::Thread { stop, thread } => {
                drop(stop.take());
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("Kubernetes client (in-cluster or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error("starting the discovery thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Which object kind an event or error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectKind {
    Pods,
    Services,
    EndpointSlices,
    Nodes,
    AuthorizationPolicies,
    PeerAuthentications,
}

impl ObjectKind {
    const ALL: [ObjectKind; 6] = [
        ObjectKind::Pods,
        ObjectKind::Services,
        ObjectKind::EndpointSlices,
        ObjectKind::Nodes,
        ObjectKind::AuthorizationPolicies,
        ObjectKind::PeerAuthentications,
    ];

    fn name(self) -> &'static str {
        match self {
            ObjectKind::Pods => "pods",
            ObjectKind::Services => "services",
            ObjectKind::EndpointSlices => "endpointslices.discovery.k8s.io",
            ObjectKind::Nodes => "nodes",
            ObjectKind::AuthorizationPolicies => "authorizationpolicies.security.istio.io",
            ObjectKind::PeerAuthentications => "peerauthentications.security.istio.io",
        }
    }

    /// The CRD's kind, for messages.
    fn crd_kind(self) -> &'static str {
        match self {
            ObjectKind::PeerAuthentications => "PeerAuthentication",
            _ => "AuthorizationPolicy",
        }
    }
}

// Events are boxed: a Pod is a few KiB, the stream item should not be.
enum Msg {
    Pod(Box<Event<Pod>>),
    Service(Box<Event<KubeService>>),
    Slice(Box<Event<EndpointSlice>>),
    Node(Box<Event<PartialObjectMeta<Node>>>),
    Policy(Box<Event<AuthorizationPolicy>>),
    PeerAuthn(Box<Event<PeerAuthentication>>),
    /// An Istio kind's CRD is served at no version: there are none.
    Absent(ObjectKind),
    Error(ObjectKind, watcher::Error),
}

impl Msg {
    fn kind(&self) -> ObjectKind {
        match self {
            Msg::Pod(_) => ObjectKind::Pods,
            Msg::Service(_) => ObjectKind::Services,
            Msg::Slice(_) => ObjectKind::EndpointSlices,
            Msg::Node(_) => ObjectKind::Nodes,
            Msg::Policy(_) => ObjectKind::AuthorizationPolicies,
            Msg::PeerAuthn(_) => ObjectKind::PeerAuthentications,
            Msg::Absent(k) | Msg::Error(k, _) => *k,
        }
    }

    fn is_init_done(&self) -> bool {
        match self {
            Msg::Pod(e) => matches!(**e, Event::InitDone),
            Msg::Service(e) => matches!(**e, Event::InitDone),
            Msg::Slice(e) => matches!(**e, Event::InitDone),
            Msg::Node(e) => matches!(**e, Event::InitDone),
            Msg::Policy(e) => matches!(**e, Event::InitDone),
            Msg::PeerAuthn(e) => matches!(**e, Event::InitDone),
            Msg::Absent(_) | Msg::Error(..) => false,
        }
    }
}

type MsgStream = Pin<Box<dyn Stream<Item = Msg> + Send>>;

fn watcher_config() -> watcher::Config {
    // List from the API server's watch cache (not a quorum read from etcd): that is what
    // makes a re-list after 410 Gone cheap.
    watcher::Config::default().any_semantic()
}

/// A watch of a built-in kind (default back-off).
fn stream_of<K, F>(api: Api<K>, kind: ObjectKind, wrap: F) -> MsgStream
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(Box<Event<K>>) -> Msg + Send + 'static,
{
    watcher::watcher(api, watcher_config())
        .default_backoff()
        .map(move |r| match r {
            Ok(e) => wrap(Box::new(e)),
            Err(e) => Msg::Error(kind, e),
        })
        .boxed()
}

/// Whether a failed watch of `kind` still lets discovery count as synced: nodes only
/// give locality, so a role without access to them costs that, not readiness.
fn sync_without(kind: ObjectKind, e: &watcher::Error) -> bool {
    kind == ObjectKind::Nodes && istio_watch::status_code(e) == Some(403)
}

impl KubeDiscovery {
    /// Starts the watches on the current tokio runtime, feeding `source`.
    pub fn start(client: kube::Client, source: SourceHandle, opts: KubeOptions) -> KubeDiscovery {
        let streams: Vec<MsgStream> = vec![
            stream_of(Api::<Pod>::all(client.clone()), ObjectKind::Pods, Msg::Pod),
            stream_of(
                Api::<KubeService>::all(client.clone()),
                ObjectKind::Services,
                Msg::Service,
            ),
            stream_of(
                Api::<EndpointSlice>::all(client.clone()),
                ObjectKind::EndpointSlices,
                Msg::Slice,
            ),
            // Metadata-only requests: labels are all that is read.
            stream_of(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                ObjectKind::Nodes,
                Msg::Node,
            ),
            istio_watch::stream::<AuthorizationPolicy, _>(
                client.clone(),
                ObjectKind::AuthorizationPolicies,
                Msg::Policy,
            ),
            istio_watch::stream::<PeerAuthentication, _>(
                client,
                ObjectKind::PeerAuthentications,
                Msg::PeerAuthn,
            ),
        ];
        let (synced_tx, synced) = watch::channel(false);
        let task = tokio::spawn(run(
            futures::stream::select_all(streams),
            source,
            opts,
            synced_tx,
        ));
        KubeDiscovery {
            synced,
            runner: Runner::Task(task),
        }
    }

    /// Starts discovery on a thread of its own (a single-threaded runtime): decoding
    /// watch events and indexing never run on a data-plane thread. `config`: `None` =
    /// in-cluster or `KUBECONFIG`.
    pub fn start_on_thread(
        config: Option<kube::Config>,
        source: SourceHandle,
        opts: KubeOptions,
    ) -> Result<KubeDiscovery, DiscoveryError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ztunnel-kube".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(DiscoveryError::Thread(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = match config {
                        Some(c) => kube::Client::try_from(c),
                        None => kube::Client::try_default().await,
                    };
                    let client = match client {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(DiscoveryError::Client(e)));
                            return;
                        }
                    };
                    let inner = KubeDiscovery::start(client, source, opts);
                    let _ = ready_tx.send(Ok(inner.synced()));
                    // Runs until the handle is dropped (sender closed).
                    let _ = stop_rx.await;
                    drop(inner);
                });
            })
            .map_err(DiscoveryError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(synced)) => Ok(KubeDiscovery {
                synced,
                runner: Runner::Thread {
                    stop: Some(stop_tx),
                    thread: Some(thread),
                },
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(DiscoveryError::Thread(std::io::Error::other(
                    "discovery thread exited",
                )))
            }
        }
    }

    /// `true` once every kind has been listed.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// The event loop: apply events to the index, flush batches into the store.
async fn run(
    mut streams: futures::stream::SelectAll<MsgStream>,
    source: SourceHandle,
    opts: KubeOptions,
    synced_tx: watch::Sender<bool>,
) {
    let mut index = DiscoveryIndex::new(
        opts.settings.clone(),
        ConvertOptions {
            root_namespace: opts.root_namespace.clone(),
        },
    );
    let mut listed: Vec<ObjectKind> = Vec::new();
    let mut last_flush = tokio::time::Instant::now() - opts.min_update_interval;
    tracing::info!(
        "Kubernetes discovery started (pods, services, endpointslices, nodes, \
         authorizationpolicies, peerauthentications)"
    );
    loop {
        let Some(first) = streams.next().await else {
            return;
        };
        let mut handle = |msg: Msg, index: &mut DiscoveryIndex| {
            let kind = msg.kind();
            let done = msg.is_init_done();
            match msg {
                Msg::Pod(e) => index.pod_event(*e),
                Msg::Service(e) => index.service_event(*e),
                Msg::Slice(e) => index.slice_event(*e),
                Msg::Node(e) => index.node_event(*e),
                Msg::Policy(e) => index.policy_event(*e),
                Msg::PeerAuthn(e) => index.peer_authn_event(*e),
                // Warned by the watch (istio_watch).
                Msg::Absent(kind) => {
                    if kind == ObjectKind::PeerAuthentications {
                        index.peer_authns_absent();
                    } else {
                        index.policies_absent();
                    }
                    if !listed.contains(&kind) {
                        listed.push(kind);
                    }
                }
                Msg::Error(kind, e) => {
                    if sync_without(kind, &e) {
                        if !listed.contains(&kind) {
                            tracing::warn!(resource = kind.name(), error = %e,
                                "no access to nodes (ztunnel's role needs nodes get/list/watch): \
                                 workloads have no locality; retrying with back-off");
                            listed.push(kind);
                        }
                    } else {
                        tracing::warn!(resource = kind.name(), error = %e, "Kubernetes watch failed; retrying with back-off");
                    }
                }
            }
            if done && !listed.contains(&kind) {
                listed.push(kind);
            }
        };
        handle(first, &mut index);
        let deadline = last_flush + opts.min_update_interval;
        loop {
            tokio::select! {
                biased;
                msg = streams.next() => match msg {
                    Some(m) => handle(m, &mut index),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let batch = index.flush();
        last_flush = tokio::time::Instant::now();
        if !batch.is_empty() {
            let changes = batch.len();
            let src = source.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || src.apply(batch)).await {
                tracing::error!(error = %e, "store update panicked");
            }
            let (pods, services, slices, policies) = index.counts();
            let peer_authentications = index.peer_authentication_count();
            tracing::debug!(
                changes,
                pods,
                services,
                slices,
                policies,
                peer_authentications,
                "Kubernetes state applied"
            );
        }
        if !*synced_tx.borrow() && ObjectKind::ALL.iter().all(|k| listed.contains(k)) {
            let (pods, services, slices, policies) = index.counts();
            let peer_authentications = index.peer_authentication_count();
            tracing::info!(
                pods,
                services,
                slices,
                nodes = index.node_count(),
                policies,
                peer_authentications,
                "Kubernetes discovery synced"
            );
            synced_tx.send_replace(true);
        }
    }
}

#[cfg(test)]
mod tests;
