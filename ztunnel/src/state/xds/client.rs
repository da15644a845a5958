//! The delta ADS stream to istiod and what its responses do to the store.
//!
//! One stream, two wildcard subscriptions (workloads+services, authorizations; with
//! `XDS_ON_DEMAND` addresses only by name, as the data path asks: `demand`). Each
//! response is converted resource by resource: the valid ones are applied to the store
//! in one batch, the invalid ones are named in a NACK (as upstream: one bad resource
//! does not hold back the others); otherwise the response is ACKed. Removed names are
//! mapped back to what they were (a workload uid, a service, a policy).
//!
//! Reconnects (stream ended, istiod restarted, connect failure) back off with jitter
//! from 1 s to 30 s and send `initial_resource_versions`, so istiod re-sends only what
//! changed and names what was removed meanwhile; the store keeps serving the last
//! known state in between.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::xds::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE, DeltaDiscoveryRequest, DeltaDiscoveryResponse, Status,
};
use tokio::sync::{mpsc, watch};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

use super::convert::{self, AddressResource};
use super::demand::Demanded;
use super::metrics::{Termination, XdsMetrics};
use super::{XdsError, XdsOptions};
use crate::state::on_demand::Demand;
use crate::state::workload::NamespacedHostname;
use crate::state::{SourceBatch, SourceHandle};

/// Largest response accepted (istiod sends the whole mesh on connect), as upstream.
const MAX_MESSAGE_SIZE: usize = 200 * 1024 * 1024;
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A stream that lived this long resets the back-off.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);

/// What this client holds, per type URL: resource name → version (sent back on
/// reconnect), and which Address names are services (a removal names only the
/// resource).
#[derive(Debug, Default)]
pub(super) struct Tracked {
    versions: HashMap<&'static str, HashMap<String, String>>,
    services: HashMap<String, NamespacedHostname>,
}

/// The outcome of one response.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub batch: SourceBatch,
    /// Rejected resources, `"<name>: <reason>"`.
    pub rejected: Vec<String>,
}

fn known_type(type_url: &str) -> Option<&'static str> {
    [ADDRESS_TYPE, AUTHORIZATION_TYPE]
        .into_iter()
        .find(|t| *t == type_url)
}

impl Tracked {
    pub(super) fn initial_versions(&self, type_url: &'static str) -> HashMap<String, String> {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }

    /// Converts a response into store changes; remembers versions of what was accepted.
    pub(super) fn response(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        defaults: &convert::ConvertDefaults,
    ) -> Applied {
        let mut out = Applied::default();
        let Some(type_url) = known_type(&resp.type_url) else {
            out.rejected
                .push(format!("unknown type URL {:?}", resp.type_url));
            return out;
        };
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                out.rejected.push(format!("{}: no resource", r.name));
                continue;
            };
            let accepted = if type_url == ADDRESS_TYPE {
                match convert::decode_address(any, defaults) {
                    Ok(AddressResource::Workload(w)) => {
                        self.services.remove(&r.name);
                        out.batch.upsert_workloads.push(w);
                        Ok(())
                    }
                    Ok(AddressResource::Service(s)) => {
                        self.services.insert(r.name.clone(), s.key());
                        out.batch.upsert_services.push(s);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            } else {
                convert::decode_authorization(any).map(|a| out.batch.upsert_policies.push(a))
            };
            match accepted {
                Ok(()) => {
                    self.versions
                        .entry(type_url)
                        .or_default()
                        .insert(r.name.clone(), r.version.clone());
                }
                Err(e) => out.rejected.push(format!("{}: {e}", r.name)),
            }
        }
        for name in &resp.removed_resources {
            if let Some(v) = self.versions.get_mut(type_url) {
                v.remove(name);
            }
            if type_url == AUTHORIZATION_TYPE {
                out.batch.remove_policies.push(name.clone());
            } else if let Some(key) = self.services.remove(name) {
                out.batch.remove_services.push(key);
            } else {
                // A workload uid (removing one this source never had is a no-op).
                out.batch.remove_workloads.push(name.clone());
            }
        }
        out
    }
}

/// `https://host:port` from `XDS_ADDRESS` (upstream's `host:port` form is read as
/// https), and the TLS server name.
pub fn parse_address(address: &str) -> Result<(Uri, String), XdsError> {
    crate::identity::istio_ca::parse_address(address).map_err(|e| match e {
        crate::identity::istio_ca::IstioCaError::Address { reason, .. } => XdsError::Address {
            address: address.to_string(),
            reason,
        },
        other => XdsError::Address {
            address: address.to_string(),
            reason: other.to_string(),
        },
    })
}

/// Request headers: bearer token (read fresh: kubelet rotates it), cluster id, extras.
fn headers(opts: &XdsOptions) -> Result<Vec<(AsciiMetadataKey, AsciiMetadataValue)>, XdsError> {
    let token = std::fs::read_to_string(&opts.token_path).map_err(|e| XdsError::Token {
        path: opts.token_path.clone(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    let value = |name: &str, v: &str| {
        v.parse::<AsciiMetadataValue>()
            .map_err(|e| XdsError::Header {
                name: name.to_string(),
                reason: e.to_string(),
            })
    };
    out.push((
        AsciiMetadataKey::from_static("authorization"),
        value("authorization", &format!("Bearer {}", token.trim()))?,
    ));
    out.push((
        AsciiMetadataKey::from_static("clusterid"),
        value("clusterid", &opts.cluster_id)?,
    ));
    for (name, v) in &opts.headers {
        let key = name
            .parse::<AsciiMetadataKey>()
            .map_err(|e| XdsError::Header {
                name: name.clone(),
                reason: e.to_string(),
            })?;
        out.push((key, value(name, v)?));
    }
    Ok(out)
}

async fn channel(opts: &XdsOptions) -> Result<Channel, XdsError> {
    let (uri, server_name) = parse_address(&opts.address)?;
    let server_name = opts.alt_hostname.clone().unwrap_or(server_name);
    let (tls, _) = crate::identity::grpc_channel::client_tls(&opts.roots, server_name)
        .await
        .map_err(|e| XdsError::Root {
            roots: opts.roots.clone(),
            reason: e.to_string(),
        })?;
    let endpoint = Endpoint::from(uri)
        .tls_config(tls)
        .map_err(|e| XdsError::Connect {
            address: opts.address.clone(),
            reason: format!("TLS setup: {e}"),
        })?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    crate::identity::grpc_channel::connect(endpoint, opts.mark)
        .await
        .map_err(|e| XdsError::Connect {
            address: opts.address.clone(),
            reason: error_chain(&e),
        })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Runs the client until the task is dropped: connect, stream, reconnect.
/// How upstream classifies the end of a stream (and whether to reconnect at once).
pub(super) fn termination(result: &Result<(), XdsError>) -> Termination {
    match result {
        Ok(()) => Termination::Complete,
        Err(XdsError::Stream { code, message, .. }) => {
            let routine = matches!(
                code,
                tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            ) || (*code == tonic::Code::Unavailable
                && (message.contains("transport is closing") || message.contains("goaway")));
            if routine {
                Termination::Reconnect
            } else {
                Termination::Error
            }
        }
        Err(XdsError::Closed) => Termination::Error,
        Err(_) => Termination::ConnectionError,
    }
}

/// On-demand mode's state across reconnects: the data path's requests and who waits.
pub(super) struct OnDemandState {
    pub requests: mpsc::UnboundedReceiver<Demand>,
    pub demanded: Demanded,
}

pub(super) async fn run(
    opts: XdsOptions,
    source: SourceHandle,
    synced: watch::Sender<bool>,
    metrics: XdsMetrics,
    mut on_demand: Option<OnDemandState>,
) {
    let mut tracked = Tracked::default();
    let mut backoff = BACKOFF_START;
    loop {
        let started = Instant::now();
        let result = stream_once(
            &opts,
            &source,
            &mut tracked,
            &synced,
            &metrics,
            on_demand.as_mut(),
        )
        .await;
        let reason = termination(&result);
        metrics.terminated(reason);
        match result {
            Ok(()) => tracing::warn!(
                address = %opts.address,
                "xDS stream closed by the server; reconnecting"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                ?reason,
                "xDS stream ended; reconnecting with back-off"
            ),
        }
        if started.elapsed() >= HEALTHY_STREAM || reason == Termination::Reconnect {
            backoff = BACKOFF_START;
        }
        let jitter = rand::random_range(0.5..1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The first request of each type on a new stream: a wildcard subscription, except
/// for addresses in on-demand mode — subscribed to `*` and unsubscribed in the same
/// request ("nothing", as upstream), then to every name asked for so far.
pub(super) fn initial_requests(
    node: &mesh_proto::xds::Node,
    tracked: &Tracked,
    demanded: Option<&Demanded>,
) -> Vec<DeltaDiscoveryRequest> {
    let mut out = Vec::new();
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let mut req = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.to_string(),
            initial_resource_versions: tracked.initial_versions(type_url),
            ..Default::default()
        };
        let on_demand = demanded.filter(|_| type_url == ADDRESS_TYPE);
        if on_demand.is_some() {
            req.resource_names_subscribe = vec!["*".into()];
            req.resource_names_unsubscribe = vec!["*".into()];
        }
        out.push(req);
        if let Some(names) = on_demand.map(Demanded::names).filter(|n| !n.is_empty()) {
            out.push(subscribe(names));
        }
    }
    out
}

fn subscribe(names: Vec<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.to_string(),
        resource_names_subscribe: names,
        ..Default::default()
    }
}

/// The next on-demand request, or never without on-demand mode.
async fn next_demand(on_demand: &mut Option<&mut OnDemandState>) -> Option<Demand> {
    match on_demand {
        Some(od) => od.requests.recv().await,
        None => std::future::pending().await,
    }
}

async fn stream_once(
    opts: &XdsOptions,
    source: &SourceHandle,
    tracked: &mut Tracked,
    synced: &watch::Sender<bool>,
    metrics: &XdsMetrics,
    mut on_demand: Option<&mut OnDemandState>,
) -> Result<(), XdsError> {
    let headers = headers(opts)?;
    let channel = channel(opts).await?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    if let Some(od) = on_demand.as_deref_mut() {
        od.demanded.new_stream();
    }
    let initial = initial_requests(
        &opts.node,
        tracked,
        on_demand.as_deref().map(|od| &od.demanded),
    );
    for req in initial {
        tx.send(req).await.map_err(|_| XdsError::Closed)?;
    }
    // Types that must have been answered once before ztunnel is ready: on-demand
    // addresses are never pushed in full.
    let expected: &[&str] = if on_demand.is_some() {
        &[AUTHORIZATION_TYPE]
    } else {
        &[ADDRESS_TYPE, AUTHORIZATION_TYPE]
    };
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut request = tonic::Request::new(outbound);
    for (k, v) in headers {
        request.metadata_mut().insert(k, v);
    }
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);
    let stream_err = |status: tonic::Status| XdsError::Stream {
        address: opts.address.clone(),
        code: status.code(),
        message: status.message().to_string(),
    };
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .map_err(stream_err)?
        .into_inner();
    tracing::info!(address = %opts.address, node = %opts.node.id, "xDS stream open");
    let mut received: Vec<String> = Vec::new();
    loop {
        let resp = tokio::select! {
            msg = responses.message() => match msg.map_err(stream_err)? {
                Some(resp) => resp,
                None => break,
            },
            demand = next_demand(&mut on_demand) => {
                let Some(demand) = demand else {
                    // The store (and with it the data path) is gone.
                    on_demand = None;
                    continue;
                };
                let key = demand.key.clone();
                let od = on_demand.as_deref_mut().expect("demands come only in on-demand mode");
                if od.demanded.add(demand) {
                    tracing::debug!(%key, "on-demand subscription");
                    tx.send(subscribe(vec![key])).await.map_err(|_| XdsError::Closed)?;
                }
                continue;
            }
        };
        let bytes: usize = resp
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref().map(|a| a.value.len()))
            .sum();
        metrics.received(&resp.type_url, bytes as u64);
        let applied = tracked.response(&resp, &opts.defaults);
        let changes = applied.batch.len();
        let batch = applied.batch;
        let src = source.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || src.apply(batch)).await {
            tracing::error!(error = %e, "store update panicked");
        }
        // After the store has it: waiters read the store when woken.
        if let Some(od) = on_demand.as_deref_mut()
            && resp.type_url == ADDRESS_TYPE
        {
            let answered = od.demanded.answered(&resp);
            if answered > 0 {
                tracing::debug!(
                    answered,
                    still_pending = od.demanded.pending(),
                    "on-demand requests answered"
                );
            }
        }
        let error_detail = (!applied.rejected.is_empty()).then(|| Status {
            code: tonic::Code::InvalidArgument as i32,
            message: applied.rejected.join("; "),
            details: Vec::new(),
        });
        match &error_detail {
            Some(s) => {
                tracing::error!(type_url = %resp.type_url, nonce = %resp.nonce, rejected = %s.message, "xDS resources rejected (NACK)")
            }
            None => {
                tracing::debug!(type_url = %resp.type_url, nonce = %resp.nonce, changes, removed = resp.removed_resources.len(), "xDS response applied (ACK)")
            }
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        })
        .await
        .map_err(|_| XdsError::Closed)?;
        if !received.contains(&resp.type_url) {
            received.push(resp.type_url.clone());
        }
        if !*synced.borrow() && expected.iter().all(|t| received.iter().any(|r| r == t)) {
            tracing::info!(address = %opts.address, on_demand = on_demand.is_some(), "xDS synced (workloads, services, authorizations)");
            synced.send_replace(true);
        }
    }
    Ok(())
}
