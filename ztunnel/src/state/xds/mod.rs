//! The xDS source (`XDS_ADDRESS`): workloads, services and L4 authorization policies
//! from istiod, as Istio's own ztunnel gets them, fed into the same
//! [`Store`](crate::state::Store) as the file and Kubernetes sources.
//!
//! Protocol (upstream's): Envoy's delta ADS (`DeltaAggregatedResources`) over TLS to
//! istiod's port 15012, verified against `XDS_ROOT_CA` (default `ROOT_CA_PATH`),
//! authenticated with `authorization: Bearer <CA_TOKEN_PATH token>` and `clusterid`,
//! plus every `XDS_HEADER_<NAME>` variable as a header. Wildcard subscriptions to
//! `type.googleapis.com/istio.workload.Address` (workloads by uid, services by
//! `<namespace>/<hostname>`) and `type.googleapis.com/istio.security.Authorization`
//! (`<namespace>/<name>`). The node is `ztunnel~<INSTANCE_IP>~<POD_NAME>.<ns>~<ns>.svc.cluster.local`
//! with metadata `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME` and every
//! `ISTIO_META_<KEY>` variable as `<KEY>` (istiod reads e.g. `CLUSTER_ID` there).
//!
//! [`XdsClient::synced`] turns true once both types have been answered once: until
//! then policy decisions could be made on partial state, so ztunnel is not ready.
//!
//! With `XDS_ON_DEMAND=true` addresses are not subscribed up front (upstream's
//! subscribe-and-unsubscribe `*`): the data path asks for each unknown address
//! through [`XdsClient::on_demand`] (`state::on_demand`), and readiness waits only for
//! the authorizations.
//! The stream itself ([`client`]) runs on a thread of its own, so decoding a large
//! push never takes time from a data-plane thread.

pub mod client;
pub mod convert;
mod demand;
pub mod metrics;

use std::path::PathBuf;
use std::time::Duration;

use mesh_proto::xds::Node;
use tokio::sync::watch;

use crate::config::{Config, ControlPlaneRoots};
use crate::state::SourceHandle;
use crate::state::on_demand::OnDemand;
pub use metrics::XdsMetrics;

/// Source name in the store.
pub const SOURCE_NAME: &str = "xds";
/// Prefix of variables that become request headers (`XDS_HEADER_FOO=bar` → `foo: bar`).
pub const XDS_HEADER_PREFIX: &str = "XDS_HEADER_";
/// Prefix of variables that become node metadata (`ISTIO_META_FOO=bar` → `FOO: bar`).
pub const ISTIO_META_PREFIX: &str = "ISTIO_META_";
/// Prefix of variables whose JSON value becomes node metadata
/// (`ISTIO_METAJSON_LABELS={"app":"x"}` → `LABELS: {app: x}`).
pub const ISTIO_METAJSON_PREFIX: &str = "ISTIO_METAJSON_";

/// A JSON value as a protobuf `Value`.
fn json_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, json_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// `XDS_ADDRESS`.
    pub address: String,
    /// `XDS_ROOT_CA` (default `ROOT_CA_PATH`).
    pub roots: ControlPlaneRoots,
    /// `ALT_XDS_HOSTNAME`: the name istiod's certificate must carry, instead of the host
    /// of `address`.
    pub alt_hostname: Option<String>,
    /// `CA_TOKEN_PATH` (the same projected token as for the CA).
    pub token_path: PathBuf,
    /// Sent as `clusterid`.
    pub cluster_id: String,
    /// `XDS_HEADER_*`, names lower-cased with `-` for `_`.
    pub headers: Vec<(String, String)>,
    pub node: Node,
    pub connect_timeout: Duration,
    pub defaults: convert::ConvertDefaults,
    /// `XDS_ON_DEMAND`.
    pub on_demand: bool,
    /// `SO_MARK` of the stream's socket
    /// ([`control_plane_mark`](crate::identity::grpc_channel::control_plane_mark)).
    pub mark: Option<u32>,
}

/// How long the data path waits for istiod to answer an on-demand lookup before it
/// refuses the connection (upstream waits without a bound).
pub const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(5);

impl XdsOptions {
    /// From the ztunnel configuration; `env` supplies `XDS_HEADER_*`, `ISTIO_META_*`
    /// and `ISTIO_METAJSON_*` variables.
    pub fn from_config(
        cfg: &Config,
        address: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> XdsOptions {
        let ip = cfg
            .instance_ip
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "1.1.1.1".into());
        let pod = cfg.pod_name.clone().unwrap_or_default();
        let ns = cfg.pod_namespace.clone().unwrap_or_default();
        let node_name = cfg.node_name.clone().unwrap_or_default();
        // As upstream: the pod's facts, then ISTIO_META_* (may override them), then
        // ISTIO_METAJSON_* (JSON values).
        let string = |v: String| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(v)),
        };
        let mut metadata: std::collections::BTreeMap<String, prost_types::Value> = [
            ("NAME", pod.clone()),
            ("NAMESPACE", ns.clone()),
            ("INSTANCE_IPS", ip.clone()),
            ("NODE_NAME", node_name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), string(v)))
        .collect();
        let mut headers = Vec::new();
        let mut json = Vec::new();
        for (k, v) in env {
            if let Some(name) = k.strip_prefix(XDS_HEADER_PREFIX)
                && !name.is_empty()
            {
                headers.push((name.to_ascii_lowercase().replace('_', "-"), v));
            } else if let Some(key) = k.strip_prefix(ISTIO_META_PREFIX)
                && !key.is_empty()
            {
                metadata.insert(key.to_string(), string(v));
            } else if let Some(key) = k.strip_prefix(ISTIO_METAJSON_PREFIX)
                && !key.is_empty()
            {
                match serde_json::from_str::<serde_json::Value>(&v) {
                    Ok(value) => json.push((key.to_string(), json_value(value))),
                    Err(e) => {
                        tracing::error!(variable = %k, error = %e, "not JSON; left out of the xDS node metadata")
                    }
                }
            }
        }
        metadata.extend(json);
        let node = Node {
            id: format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
            cluster: String::new(),
            metadata: Some(prost_types::Struct {
                fields: metadata.into_iter().collect(),
            }),
        };
        XdsOptions {
            address: address.to_string(),
            roots: cfg.xds_root_ca.clone(),
            alt_hostname: cfg.alt_xds_hostname.clone(),
            token_path: cfg.ca_token_path.clone(),
            cluster_id: cfg.cluster_id.clone(),
            headers,
            node,
            connect_timeout: cfg.connect_timeout,
            defaults: convert::ConvertDefaults {
                trust_domain: cfg.trust_domain.clone(),
                cluster_id: cfg.cluster_id.clone(),
            },
            on_demand: cfg.xds_on_demand,
            mark: crate::identity::grpc_channel::control_plane_mark(cfg),
        }
    }
}

/// Why a stream could not be opened or ended; each names the address or file.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("XDS_ADDRESS {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("xDS token {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error("XDS_ROOT_CA {roots}: {reason}")]
    Root {
        roots: ControlPlaneRoots,
        reason: String,
    },
    #[error("xDS header {name}: {reason}")]
    Header { name: String, reason: String },
    #[error("connecting to istiod at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("xDS stream to {address}: {code:?}: {message}")]
    Stream {
        address: String,
        code: tonic::Code,
        message: String,
    },
    #[error("xDS request stream closed")]
    Closed,
    #[error("starting the xDS thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running xDS client on a thread of its own; stops when dropped.
pub struct XdsClient {
    synced: watch::Receiver<bool>,
    on_demand: Option<OnDemand>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl XdsClient {
    /// Checks the address, then starts the client on its own thread (a
    /// single-threaded runtime) feeding `source`. Connection problems are not errors
    /// here: they are logged and retried.
    pub fn start_on_thread(
        opts: XdsOptions,
        source: SourceHandle,
        metrics: XdsMetrics,
    ) -> Result<XdsClient, XdsError> {
        client::parse_address(&opts.address)?;
        let (synced_tx, synced) = watch::channel(false);
        let (on_demand, od_state) = if opts.on_demand {
            let (demander, requests) = OnDemand::channel(ON_DEMAND_TIMEOUT);
            let state = client::OnDemandState {
                requests,
                demanded: Default::default(),
            };
            (Some(demander), Some(state))
        } else {
            (None, None)
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(XdsError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("ztunnel-xds".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = client::run(opts, source, synced_tx, metrics, od_state) => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .map_err(XdsError::Thread)?;
        Ok(XdsClient {
            synced,
            on_demand,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `true` once workloads/services and authorizations have each been received.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// With `XDS_ON_DEMAND`: the handle the store asks through
    /// ([`Store::set_on_demand`](crate::state::Store::set_on_demand)).
    pub fn on_demand(&self) -> Option<OnDemand> {
        self.on_demand.clone()
    }
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
