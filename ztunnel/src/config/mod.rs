//! Environment → typed configuration, with upstream ztunnel's variable names.
//!
//! [`Config::from_env`] reads the process environment; [`Config::from_lookup`] takes any
//! lookup function (tests). Every rejection names the variable and the offending value (or
//! file).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `PROXY_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// One ztunnel per node (in-pod via ZDS, or TPROXY).
    Shared,
    /// One workload, from inside that workload's network namespace.
    Dedicated,
}

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// HTTP/2 and pool settings (upstream names and defaults).
#[derive(Debug, Clone, serde::Serialize)]
pub struct H2Config {
    /// `HTTP2_STREAM_WINDOW_SIZE` (4 MiB).
    pub stream_window: u32,
    /// `HTTP2_CONNECTION_WINDOW_SIZE` (16 MiB).
    pub connection_window: u32,
    /// `HTTP2_FRAME_SIZE` (1 MiB).
    pub frame_size: u32,
    /// `POOL_MAX_STREAMS_PER_CONNECTION` (100).
    pub max_streams_per_connection: u32,
    /// `POOL_UNUSED_RELEASE_TIMEOUT` (5 min).
    #[serde(serialize_with = "humantime_duration")]
    pub pool_unused_release_timeout: Duration,
    /// PING interval (10 s).
    #[serde(serialize_with = "humantime_duration")]
    pub keepalive_interval: Duration,
    /// Connection dropped when no PONG within this (20 s).
    #[serde(serialize_with = "humantime_duration")]
    pub keepalive_timeout: Duration,
    /// Server: max concurrent streams per connection (200).
    pub server_max_concurrent_streams: u32,
}

impl Default for H2Config {
    fn default() -> Self {
        H2Config {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            frame_size: 1024 * 1024,
            max_streams_per_connection: 100,
            pool_unused_release_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            server_max_concurrent_streams: 200,
        }
    }
}

/// Listener ports of a proxy. Fixed by the protocol in production; tests may move them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProxyPorts {
    /// Outbound capture (15001).
    pub outbound: u16,
    /// Inbound plaintext capture (15006).
    pub inbound_plain: u16,
    /// HBONE (15008): listened on, and dialled on peers.
    pub hbone: u16,
}

impl Default for ProxyPorts {
    fn default() -> Self {
        ProxyPorts {
            outbound: 15001,
            inbound_plain: 15006,
            hbone: 15008,
        }
    }
}

impl ProxyPorts {
    /// Ports that must never be a connection's target.
    pub fn is_proxy_port(&self, port: u16) -> bool {
        port == self.outbound || port == self.inbound_plain || port == self.hbone
    }
}

/// The whole ztunnel configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub proxy_mode: ProxyMode,
    /// `PROXY_WORKLOAD_INFO` (dedicated mode).
    pub proxy_workload_info: Option<WorkloadInfo>,
    /// `INPOD_ENABLED` (shared mode): in-pod via ZDS, else TPROXY.
    pub inpod_enabled: bool,
    /// `INPOD_UDS`.
    pub inpod_uds: PathBuf,
    /// `PACKET_MARK`: SO_MARK on every socket (1337 in in-pod and dedicated mode).
    pub packet_mark: Option<u32>,
    /// `INPOD_PORT_REUSE`.
    pub inpod_port_reuse: bool,
    /// `LOCAL_XDS_PATH`.
    pub local_xds_path: Option<PathBuf>,
    /// `LOCAL_XDS`: the local config itself (YAML), read once; exclusive with
    /// `LOCAL_XDS_PATH`.
    #[serde(skip)]
    pub local_xds: Option<String>,
    /// `KUBERNETES_DISCOVERY`.
    pub kubernetes_discovery: bool,
    /// `XDS_ADDRESS`: istiod's delta xDS (`https://istiod.istio-system.svc:15012`).
    /// Unlike upstream, unset means no xDS (this ztunnel's default source is
    /// Kubernetes discovery or a local file); empty also means none, as upstream.
    pub xds_address: Option<String>,
    /// `XDS_ON_DEMAND`: subscribe to no addresses up front; ask istiod for each
    /// unknown one when the data path meets it (`state::on_demand`).
    pub xds_on_demand: bool,
    /// `XDS_ROOT_CA`: root(s) for istiod's serving certificate (default `ROOT_CA_PATH`).
    pub xds_root_ca: ControlPlaneRoots,
    /// `ALT_XDS_HOSTNAME`: the name istiod's certificate is checked for instead of the host
    /// of `XDS_ADDRESS` (e.g. an address through a load balancer or an IP).
    pub alt_xds_hostname: Option<String>,
    /// `CA_ADDRESS` (empty: local CA).
    pub ca_address: Option<String>,
    /// `CA_ROOT_CERT`, `CA_ROOT_KEY`.
    pub ca_root_cert: Option<PathBuf>,
    pub ca_root_key: Option<PathBuf>,
    /// `ROOT_CA_PATH` (remote CA: the trust bundle for HBONE peers, and the default root
    /// of the control-plane connections).
    pub root_ca_path: PathBuf,
    /// `CA_ROOT_CA`: root(s) for the CA's serving certificate (default `ROOT_CA_PATH`).
    pub ca_root_ca: ControlPlaneRoots,
    /// `ALT_CA_HOSTNAME`: the name the CA's certificate is checked for instead of the
    /// host of `CA_ADDRESS`.
    pub alt_ca_hostname: Option<String>,
    /// `CA_TOKEN_PATH`, else upstream's `AUTH_TOKEN`: the bearer token file for the CA and
    /// xDS.
    pub ca_token_path: PathBuf,
    /// `CRL_PATH`: PEM certificate revocation lists peers' chains are checked against
    /// (followed while running); unset = no revocation checks (as upstream).
    pub crl_path: Option<PathBuf>,
    /// `ISTIO_META_CLUSTER_ID`, else `CLUSTER_ID` (as upstream).
    pub cluster_id: String,
    /// `CLUSTER_DOMAIN` (`cluster.local`): Service hostnames are
    /// `<name>.<namespace>.svc.<domain>` (Kubernetes discovery).
    pub cluster_domain: String,
    /// `ROOT_NAMESPACE` (default `POD_NAMESPACE`, else `istio-system`; istiod's
    /// `meshConfig.rootNamespace`, which defaults to istiod's own namespace):
    /// AuthorizationPolicies and PeerAuthentications there without a selector are
    /// mesh-wide (Kubernetes discovery).
    pub root_namespace: String,
    /// `TRUST_DOMAIN`.
    pub trust_domain: String,
    /// `SECRET_TTL`.
    #[serde(serialize_with = "humantime_duration")]
    pub secret_ttl: Duration,
    /// `NODE_NAME`, `POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`.
    pub node_name: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub instance_ip: Option<IpAddr>,
    /// `ENABLE_ORIG_SRC` (unset: decided per mode).
    pub enable_orig_src: Option<bool>,
    /// `CA_TRUSTED_NODE_ACCOUNTS` (comma-separated `namespace/serviceaccount`; default
    /// `<POD_NAMESPACE>/ztunnel`, `istio-system/ztunnel` without `POD_NAMESPACE`): node
    /// proxies, whose pods may present the certificate of any workload of their node on
    /// inbound HBONE (a peer node proxy without original source; see `proxy::source_check`).
    pub trusted_node_accounts: Vec<NodeProxyAccount>,
    /// `TERMINATION_GRACE_PERIOD_SECONDS`: the pod's grace period (upstream semantics:
    /// kubelet's SIGKILL follows SIGTERM after it). Open connections get
    /// [`Config::drain_budget`] of it, not all of it.
    #[serde(serialize_with = "humantime_duration")]
    pub termination_grace_period: Duration,
    /// TCP keepalive of proxied sockets.
    pub keepalive: Keepalive,
    /// `CONNECTION_TERMINATION_DEADLINE`: how long open connections may run after SIGTERM,
    /// overriding the budget derived from the grace period (as upstream).
    #[serde(serialize_with = "optional_humantime_duration")]
    pub connection_termination_deadline: Option<Duration>,
    /// Data-plane worker threads: `ZTUNNEL_WORKER_THREADS`, else derived from the pod's
    /// CPU limit and request as upstream does (see [`threads`]).
    pub worker_threads: usize,
    /// `LOG_FORMAT`.
    pub log_format: LogFormat,
    pub h2: H2Config,
    pub ports: ProxyPorts,
    /// `IPV6_ENABLED` (true): false binds every listener on IPv4 only (`0.0.0.0`, and
    /// `127.0.0.1` for the localhost ones) and leaves IPv6 addresses out of DNS answers.
    pub ipv6_enabled: bool,
    /// `PREFERED_SERVICE_NAMESPACE` (upstream's spelling): the DNS proxy's tie-break
    /// among same-named Services of other namespaces.
    pub preferred_service_namespace: Option<String>,
    /// `ENABLE_RESPONSE_BAGGAGE` (true): inbound 200s carry the destination's `baggage`
    /// and an unknown source is described by its request `baggage`, as upstream.
    pub enable_response_baggage: bool,
    /// `NETWORK` (empty, as upstream): the network of this ztunnel's node. Addresses whose
    /// workload the state does not know yet (a pod served before its workload arrives,
    /// on-demand lookups of `<network>/<ip>`, a DNS client not in the state) are taken to
    /// be on it; known workloads carry their own.
    pub network: String,
    /// `LOCALHOST_APP_TUNNEL` (true, as upstream): a workload's PROXY application tunnel
    /// is reached on loopback when the proxy runs in its netns (in-pod, dedicated).
    pub localhost_app_tunnel: bool,
    /// `UNSTABLE_ENABLE_SOCKS5` (false, as upstream): each proxy also listens for SOCKS5
    /// CONNECT requests here, in its netns (`127.0.0.1:15080`; `proxy::socks5`).
    pub socks5_addr: Option<SocketAddr>,
    /// `ADMIN_ADDR` (localhost:15000).
    pub admin_addr: SocketAddr,
    /// `STATS_ADDR` ([::]:15020, `/metrics`).
    pub stats_addr: SocketAddr,
    /// `READINESS_ADDR` ([::]:15021, `/healthz/ready`).
    pub readiness_addr: SocketAddr,
    /// Timeout for upstream connects (HBONE and plaintext); `CONNECTION_TIMEOUT` (10 s).
    #[serde(serialize_with = "humantime_duration")]
    pub connect_timeout: Duration,
    /// Timeout for a TLS handshake, inbound and outbound (`HANDSHAKE_TIMEOUT`, 10 s); an
    /// outbound CONNECT must be answered within `connect_timeout` + this.
    #[serde(serialize_with = "humantime_duration")]
    pub handshake_timeout: Duration,
    pub dns: DnsProxyConfig,
}

/// The DNS proxy (port 15053), as upstream: on unless `ISTIO_META_DNS_CAPTURE=false`
/// (running it costs nothing; pods reach it only when their DNS is captured).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DnsProxyConfig {
    pub enabled: bool,
    /// `ISTIO_META_DNS_PROXY_ADDR` (`localhost:15053`) in each workload's netns.
    pub addr: DnsProxyAddr,
    /// Where the upstream resolvers and search domains come from (`DNS_RESOLV_CONF`,
    /// `/etc/resolv.conf`, ztunnel's own, as upstream).
    pub resolv_conf: PathBuf,
}

/// Where the DNS proxy listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DnsProxyAddr {
    /// `localhost:PORT`: 127.0.0.1 and, where the namespace has it, ::1.
    Localhost(u16),
    Addr(SocketAddr),
}

impl DnsProxyAddr {
    pub fn port(&self) -> u16 {
        match self {
            DnsProxyAddr::Localhost(p) => *p,
            DnsProxyAddr::Addr(a) => a.port(),
        }
    }

    fn parse(v: &str) -> Result<Self, String> {
        let v = v.trim();
        if let Some(port) = v.strip_prefix("localhost:") {
            return port
                .parse()
                .map(DnsProxyAddr::Localhost)
                .map_err(|e| format!("not a port after localhost: {e}"));
        }
        v.parse()
            .map(DnsProxyAddr::Addr)
            .map_err(|e| format!("expected localhost:PORT or IP:PORT: {e}"))
    }
}

fn humantime_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn optional_humantime_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => humantime_duration(d, s),
        None => s.serialize_none(),
    }
}

/// A rejected setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {field}={value:?}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_lookup(|_| None).expect("defaults are valid")
    }
}

/// TCP keepalive of every proxied socket (`KEEPALIVE_*`, `USER_TIMEOUT_ENABLED`; upstream's
/// names and defaults: on, first probe after 180 s idle, then every 180 s, 9 probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Keepalive {
    /// `KEEPALIVE_ENABLED` (true).
    pub enabled: bool,
    /// `KEEPALIVE_TIME` (180 s): idle time before the first probe.
    #[serde(serialize_with = "humantime_duration")]
    pub time: Duration,
    /// `KEEPALIVE_INTERVAL` (180 s): between probes.
    #[serde(serialize_with = "humantime_duration")]
    pub interval: Duration,
    /// `KEEPALIVE_RETRIES` (9): unanswered probes before the connection is dropped.
    pub retries: u32,
    /// `USER_TIMEOUT_ENABLED` (false): also drop a connection whose sent data stays
    /// unacknowledged for the keepalive's whole span (`TCP_USER_TIMEOUT` = time +
    /// interval × retries), as upstream.
    pub user_timeout: bool,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            enabled: true,
            time: Duration::from_secs(180),
            interval: Duration::from_secs(180),
            retries: 9,
            user_timeout: false,
        }
    }
}

impl Keepalive {
    /// `TCP_USER_TIMEOUT` when enabled.
    pub fn user_timeout(&self) -> Option<Duration> {
        (self.enabled && self.user_timeout).then(|| self.time + self.interval * self.retries)
    }
}

/// Roots a control-plane server's certificate (istiod's xDS, the CA) must chain to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum ControlPlaneRoots {
    /// A PEM file, read at each (re)connection.
    File(PathBuf),
    /// The system's trust store (the value `SYSTEM`, as upstream): for a control plane
    /// serving a publicly trusted certificate.
    System,
}

impl ControlPlaneRoots {
    fn from_value(v: Option<String>, default: &Path) -> Self {
        match v.as_deref().map(str::trim) {
            Some("SYSTEM") => ControlPlaneRoots::System,
            Some(p) if !p.is_empty() => ControlPlaneRoots::File(PathBuf::from(p)),
            _ => ControlPlaneRoots::File(default.to_path_buf()),
        }
    }
}

impl std::fmt::Display for ControlPlaneRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlPlaneRoots::File(p) => write!(f, "{}", p.display()),
            ControlPlaneRoots::System => f.write_str("SYSTEM (the system's trust store)"),
        }
    }
}

/// The shortest drain when the grace period allows it.
const MIN_DRAIN: Duration = Duration::from_secs(1);

/// How long open connections may run after SIGTERM (and after a workload is removed)
/// for a pod grace period `grace`: `grace` − 5 s when it is over 10 s, else `grace` − 1 s
/// (upstream ztunnel's rule), at least 1 s but never more than `grace`. The margin is
/// for closing what is left (TLS close, RST_STREAM, the pool) before kubelet's SIGKILL,
/// which would reset everything mid-stream.
pub fn drain_budget(grace: Duration) -> Duration {
    let margin = if grace > Duration::from_secs(10) {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(1)
    };
    grace.saturating_sub(margin).max(MIN_DRAIN.min(grace))
}

impl Config {
    /// The address listeners bind to for "every address": `[::]`, or `0.0.0.0` with
    /// `IPV6_ENABLED=false`.
    pub fn wildcard_ip(&self) -> std::net::IpAddr {
        if self.ipv6_enabled {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        }
    }

    /// Ports that must never be a connection's target: the listeners', SOCKS5's included.
    pub fn is_proxy_port(&self, port: u16) -> bool {
        self.ports.is_proxy_port(port) || self.socks5_addr.is_some_and(|a| a.port() == port)
    }

    /// `CONNECTION_TERMINATION_DEADLINE` when set, else [`drain_budget`] of
    /// `TERMINATION_GRACE_PERIOD_SECONDS`.
    pub fn drain_budget(&self) -> Duration {
        self.connection_termination_deadline
            .unwrap_or_else(|| drain_budget(self.termination_grace_period))
    }

    /// Reads the process environment (and upstream's mesh config file, when present).
    pub fn from_env() -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let mesh = match std::fs::read_to_string(proxy_config::MESH_CONFIG_FILE) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(ConfigError {
                    field: "mesh config",
                    value: proxy_config::MESH_CONFIG_FILE.into(),
                    reason: format!("cannot read: {e}"),
                });
            }
        };
        Config::from_sources(|k| env.get(k).cloned(), mesh.as_deref())
    }

    /// Reads settings through `get` (returns `None` for unset variables; empty counts as
    /// unset), without a mesh config file.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::from_sources(get, None)
    }

    /// [`Self::from_lookup`] with the mesh config file's text: its `defaultConfig` and
    /// `PROXY_CONFIG` fill in variables left unset (see [`proxy_config`]).
    pub fn from_sources(
        get: impl Fn(&str) -> Option<String>,
        mesh_config: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let raw = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let pc = proxy_config::ProxyConfig::parse(mesh_config, raw("PROXY_CONFIG").as_deref())?;
        let off = |k: &str| {
            raw(k).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "false" | "0" | "no" | "off"
                )
            })
        };
        let wildcard = if off("IPV6_ENABLED") {
            "0.0.0.0"
        } else {
            "[::]"
        };
        let local_source = raw("LOCAL_XDS_PATH").is_some()
            || raw("LOCAL_XDS").is_some()
            || (raw("KUBERNETES_DISCOVERY").is_some() && !off("KUBERNETES_DISCOVERY"));
        let get = |k: &str| raw(k).or_else(|| pc.default_for(k, wildcard, local_source));
        let err = |field: &'static str, value: &str, reason: String| ConfigError {
            field,
            value: value.to_string(),
            reason,
        };
        let parse_bool = |field: &'static str, default: bool| -> Result<bool, ConfigError> {
            match get(field) {
                None => Ok(default),
                Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => Ok(true),
                    "false" | "0" | "no" | "off" => Ok(false),
                    _ => Err(err(field, &v, "expected true or false".into())),
                },
            }
        };
        let parse_num = |field: &'static str, default: u64, min: u64| -> Result<u64, ConfigError> {
            match get(field) {
                None => Ok(default),
                Some(v) => {
                    let n: u64 = v
                        .trim()
                        .parse()
                        .map_err(|e| err(field, &v, format!("not a number: {e}")))?;
                    if n < min {
                        return Err(err(field, &v, format!("must be at least {min}")));
                    }
                    Ok(n)
                }
            }
        };
        let parse_duration =
            |field: &'static str, default: Duration| -> Result<Duration, ConfigError> {
                match get(field) {
                    None => Ok(default),
                    Some(v) => {
                        let d = humantime::parse_duration(v.trim()).map_err(|e| {
                            err(field, &v, format!("not a duration like 24h or 90s: {e}"))
                        })?;
                        if d.is_zero() {
                            return Err(err(field, &v, "must be positive".into()));
                        }
                        Ok(d)
                    }
                }
            };
        let parse_addr = |field: &'static str, default: &str| -> Result<SocketAddr, ConfigError> {
            let v = get(field).unwrap_or_else(|| default.to_string());
            v.trim()
                .parse()
                .map_err(|e| err(field, &v, format!("not an ip:port address: {e}")))
        };

        let proxy_mode = match get("PROXY_MODE").as_deref().map(str::trim) {
            None | Some("shared") => ProxyMode::Shared,
            Some("dedicated") => ProxyMode::Dedicated,
            Some(v) => return Err(err("PROXY_MODE", v, "expected shared or dedicated".into())),
        };
        let proxy_workload_info = match get("PROXY_WORKLOAD_INFO") {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse::<WorkloadInfo>()
                    .map_err(|r| err("PROXY_WORKLOAD_INFO", &v, r))?,
            ),
        };
        if proxy_mode == ProxyMode::Dedicated && proxy_workload_info.is_none() {
            return Err(err(
                "PROXY_WORKLOAD_INFO",
                "",
                "required with PROXY_MODE=dedicated (namespace/name/serviceaccount)".into(),
            ));
        }
        let inpod_enabled = parse_bool("INPOD_ENABLED", true)?;
        let packet_mark = match get("PACKET_MARK") {
            Some(v) => {
                let s = v.trim();
                let n = if let Some(hex) = s.strip_prefix("0x") {
                    u32::from_str_radix(hex, 16)
                } else {
                    s.parse()
                };
                Some(n.map_err(|e| err("PACKET_MARK", &v, format!("not a 32-bit mark: {e}")))?)
            }
            None if proxy_mode == ProxyMode::Dedicated || inpod_enabled => Some(1337),
            None => None,
        };
        let trust_domain = get("TRUST_DOMAIN").unwrap_or_else(|| "cluster.local".to_string());
        let cluster_domain = get("CLUSTER_DOMAIN")
            .map(|d| d.trim().trim_end_matches('.').to_string())
            .unwrap_or_else(|| "cluster.local".to_string());
        if cluster_domain.is_empty()
            || !cluster_domain
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(err(
                "CLUSTER_DOMAIN",
                &cluster_domain,
                "not a DNS domain like cluster.local".into(),
            ));
        }
        let worker_threads = threads::worker_threads(&get)?;
        let ipv6_enabled = parse_bool("IPV6_ENABLED", true)?;
        if trust_domain.contains('/') || trust_domain.contains(char::is_whitespace) {
            return Err(err(
                "TRUST_DOMAIN",
                &trust_domain,
                "must be a DNS-like name without '/' or spaces".into(),
            ));
        }
        let instance_ip = match get("INSTANCE_IP") {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse()
                    .map_err(|e| err("INSTANCE_IP", &v, format!("not an IP address: {e}")))?,
            ),
        };
        let enable_orig_src = match get("ENABLE_ORIG_SRC") {
            None => None,
            Some(_) => Some(parse_bool("ENABLE_ORIG_SRC", false)?),
        };
        let trusted_node_accounts = match get("CA_TRUSTED_NODE_ACCOUNTS") {
            Some(v) => v
                .split(',')
                .filter(|a| !a.trim().is_empty())
                .map(|a| a.parse::<NodeProxyAccount>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|r| err("CA_TRUSTED_NODE_ACCOUNTS", &v, r))?,
            None => vec![NodeProxyAccount {
                namespace: get("POD_NAMESPACE").unwrap_or_else(|| "istio-system".into()),
                service_account: "ztunnel".into(),
            }],
        };
        let log_format = match get("LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("plain") | Some("text") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(v) => return Err(err("LOG_FORMAT", v, "expected json or plain".into())),
        };
        let mut h2 = H2Config::default();
        h2.stream_window = parse_num("HTTP2_STREAM_WINDOW_SIZE", h2.stream_window.into(), 65535)?
            .min(u64::from(i32::MAX as u32)) as u32;
        h2.connection_window = parse_num(
            "HTTP2_CONNECTION_WINDOW_SIZE",
            h2.connection_window.into(),
            65535,
        )?
        .min(u64::from(i32::MAX as u32)) as u32;
        let frame = parse_num("HTTP2_FRAME_SIZE", h2.frame_size.into(), 16384)?;
        if frame > 16_777_215 {
            return Err(err(
                "HTTP2_FRAME_SIZE",
                &frame.to_string(),
                "at most 16777215 (HTTP/2 limit)".into(),
            ));
        }
        h2.frame_size = frame as u32;
        h2.max_streams_per_connection = parse_num(
            "POOL_MAX_STREAMS_PER_CONNECTION",
            h2.max_streams_per_connection.into(),
            1,
        )?
        .min(u64::from(u32::MAX)) as u32;
        h2.pool_unused_release_timeout = parse_duration(
            "POOL_UNUSED_RELEASE_TIMEOUT",
            h2.pool_unused_release_timeout,
        )?;

        let local_xds_path = get("LOCAL_XDS_PATH").map(PathBuf::from);
        let local_xds = get("LOCAL_XDS");
        if let (Some(inline), Some(_)) = (&local_xds, &local_xds_path) {
            return Err(err(
                "LOCAL_XDS",
                inline,
                "only one of LOCAL_XDS and LOCAL_XDS_PATH may be set".into(),
            ));
        }
        let kubernetes_discovery = parse_bool("KUBERNETES_DISCOVERY", false)?;
        let xds_address = get("XDS_ADDRESS").filter(|a| !a.trim().is_empty());
        if let Some(a) = &xds_address
            && kubernetes_discovery
        {
            return Err(err(
                "XDS_ADDRESS",
                a,
                "set together with KUBERNETES_DISCOVERY=true: use one source of workloads \
                 (istiod's xDS or the Kubernetes API)"
                    .into(),
            ));
        }
        let xds_on_demand = parse_bool("XDS_ON_DEMAND", false)?;
        if xds_on_demand && xds_address.is_none() {
            return Err(err(
                "XDS_ON_DEMAND",
                "true",
                "on-demand lookups ask istiod: set XDS_ADDRESS too".into(),
            ));
        }
        if xds_on_demand && parse_bool("ISTIO_META_DNS_CAPTURE", true)? {
            // As upstream: the DNS proxy answers from the full state, which on-demand
            // mode never has.
            return Err(err(
                "XDS_ON_DEMAND",
                "true",
                "the DNS proxy does not support on-demand mode: set ISTIO_META_DNS_CAPTURE=false"
                    .into(),
            ));
        }
        let root_ca_path: PathBuf = get("ROOT_CA_PATH")
            .unwrap_or_else(|| "./var/run/secrets/istio/root-cert.pem".into())
            .into();
        let network = get("NETWORK")
            .map(|n| n.trim().to_string())
            .unwrap_or_default();
        if network.contains('/') {
            return Err(err(
                "NETWORK",
                &network,
                "a network name has no '/' (addresses are named <network>/<ip>)".into(),
            ));
        }
        Ok(Config {
            proxy_mode,
            proxy_workload_info,
            inpod_enabled,
            inpod_uds: get("INPOD_UDS")
                .unwrap_or_else(|| "/var/run/ztunnel/ztunnel.sock".into())
                .into(),
            packet_mark,
            inpod_port_reuse: parse_bool("INPOD_PORT_REUSE", true)?,
            local_xds_path,
            local_xds,
            kubernetes_discovery,
            xds_address,
            xds_on_demand,
            xds_root_ca: ControlPlaneRoots::from_value(get("XDS_ROOT_CA"), &root_ca_path),
            alt_xds_hostname: get("ALT_XDS_HOSTNAME").filter(|h| !h.trim().is_empty()),
            ca_root_ca: ControlPlaneRoots::from_value(get("CA_ROOT_CA"), &root_ca_path),
            alt_ca_hostname: get("ALT_CA_HOSTNAME").filter(|h| !h.trim().is_empty()),
            ca_address: get("CA_ADDRESS"),
            ca_root_cert: get("CA_ROOT_CERT").map(PathBuf::from),
            ca_root_key: get("CA_ROOT_KEY").map(PathBuf::from),
            root_ca_path,
            crl_path: get("CRL_PATH")
                .filter(|p| !p.trim().is_empty())
                .map(PathBuf::from),
            ca_token_path: get("CA_TOKEN_PATH")
                .or_else(|| get("AUTH_TOKEN"))
                .unwrap_or_else(|| "./var/run/secrets/tokens/istio-token".into())
                .into(),
            cluster_id: get("ISTIO_META_CLUSTER_ID")
                .or_else(|| get("CLUSTER_ID"))
                .unwrap_or_else(|| "Kubernetes".into()),
            cluster_domain,
            root_namespace: get("ROOT_NAMESPACE")
                .or_else(|| get("POD_NAMESPACE"))
                .unwrap_or_else(|| "istio-system".into())
                .trim()
                .to_string(),
            trust_domain,
            secret_ttl: parse_duration("SECRET_TTL", Duration::from_secs(24 * 3600))?,
            node_name: get("NODE_NAME"),
            pod_name: get("POD_NAME"),
            pod_namespace: get("POD_NAMESPACE"),
            instance_ip,
            enable_orig_src,
            trusted_node_accounts,
            termination_grace_period: Duration::from_secs(parse_num(
                "TERMINATION_GRACE_PERIOD_SECONDS",
                5,
                0,
            )?),
            keepalive: Keepalive {
                enabled: parse_bool("KEEPALIVE_ENABLED", true)?,
                time: parse_duration("KEEPALIVE_TIME", Keepalive::default().time)?,
                interval: parse_duration("KEEPALIVE_INTERVAL", Keepalive::default().interval)?,
                retries: match parse_num("KEEPALIVE_RETRIES", 9, 1)? {
                    n @ 1..=127 => n as u32,
                    n => {
                        return Err(err(
                            "KEEPALIVE_RETRIES",
                            &n.to_string(),
                            "at most 127 (the kernel's TCP_KEEPCNT limit)".into(),
                        ));
                    }
                },
                user_timeout: parse_bool("USER_TIMEOUT_ENABLED", false)?,
            },
            connection_termination_deadline: match get("CONNECTION_TERMINATION_DEADLINE") {
                None => None,
                Some(_) => Some(parse_duration(
                    "CONNECTION_TERMINATION_DEADLINE",
                    Duration::ZERO,
                )?),
            },
            worker_threads,
            log_format,
            h2,
            ports: ProxyPorts::default(),
            ipv6_enabled,
            preferred_service_namespace: get("PREFERED_SERVICE_NAMESPACE")
                .map(|n| n.trim().to_string()),
            enable_response_baggage: parse_bool("ENABLE_RESPONSE_BAGGAGE", true)?,
            localhost_app_tunnel: parse_bool("LOCALHOST_APP_TUNNEL", true)?,
            socks5_addr: parse_bool("UNSTABLE_ENABLE_SOCKS5", false)?
                .then(|| SocketAddr::from(([127, 0, 0, 1], 15080))),
            network,
            admin_addr: parse_addr("ADMIN_ADDR", "127.0.0.1:15000")?,
            stats_addr: parse_addr("STATS_ADDR", &format!("{wildcard}:15020"))?,
            readiness_addr: parse_addr("READINESS_ADDR", &format!("{wildcard}:15021"))?,
            connect_timeout: parse_duration("CONNECTION_TIMEOUT", Duration::from_secs(10))?,
            handshake_timeout: parse_duration("HANDSHAKE_TIMEOUT", Duration::from_secs(10))?,
            dns: DnsProxyConfig {
                enabled: parse_bool("ISTIO_META_DNS_CAPTURE", true)?,
                addr: match get("ISTIO_META_DNS_PROXY_ADDR") {
                    None => DnsProxyAddr::Localhost(15053),
                    Some(v) => DnsProxyAddr::parse(&v)
                        .map_err(|r| err("ISTIO_META_DNS_PROXY_ADDR", &v, r))?,
                },
                resolv_conf: get("DNS_RESOLV_CONF")
                    .unwrap_or_else(|| "/etc/resolv.conf".into())
                    .into(),
            },
        })
    }
}

pub mod proxy_config;
mod workload_info;
pub use workload_info::{NodeProxyAccount, WorkloadInfo};
pub mod threads;

#[cfg(test)]
mod tests;
