//! [`CertificateProvider`] over Istio's CA API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`): istiod, istio-csr
//! or the built-in CA (`node-agent ca`).
//!
//! Per request: the bearer token is read fresh from `CA_TOKEN_PATH` (kubelet rotates
//! the projected token in place); headers `authorization: Bearer <token>`,
//! `clusterid: <CLUSTER_ID>` and every `CA_HEADER_<NAME>=<value>` (as `<name>`);
//! body `csr`, `validity_duration` (seconds) and, in shared mode,
//! `metadata.ImpersonatedIdentity = <SPIFFE id>` (node-level issuance: the CA checks
//! that a pod of that identity runs on our node).
//!
//! TLS to the CA is verified against `ROOT_CA_PATH` with the host of `CA_ADDRESS`
//! as server name (an IP address is matched against IP SANs). The root file is
//! re-read on every request; the gRPC channel is rebuilt when it changes. Connect
//! and request timeouts bound every call. Rotation and back-off are the
//! [`super::SecretManager`]'s job: this provider only answers or fails.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::Code;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

use super::Identity;
use super::provider::{CertificateProvider, CertificateRequest, ProviderError, SignFuture};
use crate::config::{Config, ControlPlaneRoots, ProxyMode};

/// Metadata key for node-level issuance.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Prefix of environment variables that become extra request headers.
pub const CA_HEADER_PREFIX: &str = "CA_HEADER_";
const PROVIDER_NAME: &str = "istio-ca";

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct IstioCaOptions {
    /// `CA_ADDRESS`: `https://host:port`, or upstream's `host:port` (read as https).
    pub address: String,
    /// `CA_ROOT_CA` (default `ROOT_CA_PATH`): trust root(s) for the CA's serving
    /// certificate.
    pub roots: ControlPlaneRoots,
    /// `ALT_CA_HOSTNAME`: the name the CA's certificate must carry, instead of the host of
    /// `address`.
    pub alt_hostname: Option<String>,
    /// `CA_TOKEN_PATH`: the projected service-account token (audience `istio-ca`).
    pub token_path: PathBuf,
    /// `CLUSTER_ID`, sent as `clusterid`.
    pub cluster_id: String,
    /// Send `ImpersonatedIdentity` (shared mode: ztunnel asks for its workloads).
    pub impersonate: bool,
    /// `CA_HEADER_*`: extra headers, names lower-cased.
    pub extra_headers: Vec<(String, String)>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// `SO_MARK` of the channel's sockets ([`super::grpc_channel::control_plane_mark`]).
    pub mark: Option<u32>,
}

impl IstioCaOptions {
    /// From the ztunnel configuration; `env` supplies `CA_HEADER_*` variables.
    pub fn from_config(
        cfg: &Config,
        address: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> IstioCaOptions {
        let extra_headers = env
            .into_iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(CA_HEADER_PREFIX)?;
                (!name.is_empty()).then(|| (name.to_ascii_lowercase().replace('_', "-"), v))
            })
            .collect();
        IstioCaOptions {
            address: address.to_string(),
            roots: cfg.ca_root_ca.clone(),
            alt_hostname: cfg.alt_ca_hostname.clone(),
            token_path: cfg.ca_token_path.clone(),
            cluster_id: cfg.cluster_id.clone(),
            impersonate: cfg.proxy_mode == ProxyMode::Shared,
            extra_headers,
            connect_timeout: cfg.connect_timeout,
            request_timeout: Duration::from_secs(30),
            mark: super::grpc_channel::control_plane_mark(cfg),
        }
    }
}

/// The client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IstioCaError {
    #[error("CA_ADDRESS {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("CA_HEADER_{name}: {reason}")]
    Header { name: String, reason: String },
    #[error("local CA: {0}")]
    LocalCa(#[from] super::local_ca::LocalCaError),
    #[error("no certificate authority: set CA_ADDRESS, or CA_ROOT_CERT and CA_ROOT_KEY")]
    NoCa,
}

struct CachedChannel {
    root_pem: Vec<u8>,
    channel: Channel,
}

/// The Istio CA gRPC client.
pub struct IstioCaClient {
    opts: IstioCaOptions,
    uri: Uri,
    server_name: String,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    channel: Mutex<Option<CachedChannel>>,
}

impl std::fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCaClient")
            .field("uri", &self.uri)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// `https://host:port` from `CA_ADDRESS`, and the TLS server name.
pub fn parse_address(address: &str) -> Result<(Uri, String), IstioCaError> {
    let fail = |reason: &str| IstioCaError::Address {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = address.trim();
    let full = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("https://{trimmed}")
    };
    let uri: Uri = full.parse().map_err(|_| fail("not a URL or host:port"))?;
    if uri.scheme_str() != Some("https") {
        return Err(fail(
            "only https is supported (istiod serves the CA API and xDS over TLS)",
        ));
    }
    let host = uri.host().ok_or_else(|| fail("no host"))?;
    if uri.port_u16().is_none() {
        return Err(fail("no port (istiod and the built-in CA listen on 15012)"));
    }
    let server_name = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((uri, server_name))
}

impl IstioCaClient {
    pub fn new(opts: IstioCaOptions) -> Result<IstioCaClient, IstioCaError> {
        let (uri, server_name) = parse_address(&opts.address)?;
        let mut headers = Vec::new();
        for (name, value) in &opts.extra_headers {
            let fail = |reason: String| IstioCaError::Header {
                name: name.to_ascii_uppercase().replace('-', "_"),
                reason,
            };
            let key: AsciiMetadataKey = name
                .parse()
                .map_err(|e| fail(format!("not a header name: {e}")))?;
            let value: AsciiMetadataValue = value
                .parse()
                .map_err(|e| fail(format!("not a header value: {e}")))?;
            headers.push((key, value));
        }
        Ok(IstioCaClient {
            opts,
            uri,
            server_name,
            headers,
            channel: Mutex::new(None),
        })
    }

    fn unavailable(&self, identity: &Identity, reason: String) -> ProviderError {
        ProviderError::Unavailable {
            provider: format!("{PROVIDER_NAME} {}", self.uri),
            identity: identity.clone(),
            reason,
        }
    }

    /// The channel for the current root (rebuilt when the `CA_ROOT_CA` file changed).
    async fn channel(&self, identity: &Identity) -> Result<Channel, ProviderError> {
        let roots = &self.opts.roots;
        let server_name = self
            .opts
            .alt_hostname
            .clone()
            .unwrap_or_else(|| self.server_name.clone());
        let (tls, root) = super::grpc_channel::client_tls(roots, server_name)
            .await
            .map_err(|e| {
                self.unavailable(identity, format!("CA_ROOT_CA {roots}: cannot read: {e}"))
            })?;
        let mut cached = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref()
            && c.root_pem == root
        {
            return Ok(c.channel.clone());
        }
        let endpoint = Endpoint::from(self.uri.clone())
            .tls_config(tls)
            .map_err(|e| {
                self.unavailable(
                    identity,
                    format!("CA_ROOT_CA {roots}: TLS setup failed: {e}"),
                )
            })?
            .connect_timeout(self.opts.connect_timeout)
            .timeout(self.opts.request_timeout)
            .tcp_nodelay(true);
        let channel = super::grpc_channel::connect_lazy(endpoint, self.opts.mark);
        if cached.is_some() {
            tracing::info!(roots = %roots, "CA trust root changed; reconnecting");
        }
        *cached = Some(CachedChannel {
            root_pem: root,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    async fn create(&self, request: CertificateRequest) -> Result<Vec<String>, ProviderError> {
        let identity = request.identity.clone();
        let token_path = &self.opts.token_path;
        let token = tokio::fs::read_to_string(token_path).await.map_err(|e| {
            self.unavailable(
                &identity,
                format!("CA_TOKEN_PATH {}: cannot read: {e}", token_path.display()),
            )
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(self.unavailable(
                &identity,
                format!("CA_TOKEN_PATH {}: empty token", token_path.display()),
            ));
        }
        let channel = self.channel(&identity).await?;
        let metadata = self.opts.impersonate.then(|| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: request.csr_pem,
            validity_duration: request.ttl.as_secs().min(i64::MAX as u64) as i64,
            metadata,
        });
        req.set_timeout(self.opts.request_timeout);
        let md = req.metadata_mut();
        let bearer: AsciiMetadataValue = format!("Bearer {token}").parse().map_err(|_| {
            self.unavailable(
                &identity,
                format!(
                    "CA_TOKEN_PATH {}: token is not valid header text",
                    token_path.display()
                ),
            )
        })?;
        md.insert("authorization", bearer);
        if let Ok(v) = self.opts.cluster_id.parse() {
            md.insert("clusterid", v);
        }
        for (k, v) in &self.headers {
            md.insert(k.clone(), v.clone());
        }
        let mut client = IstioCertificateServiceClient::new(channel);
        let response = tokio::time::timeout(
            self.opts.request_timeout + Duration::from_secs(1),
            client.create_certificate(req),
        )
        .await
        .map_err(|_| {
            self.unavailable(
                &identity,
                format!("no answer within {:?}", self.opts.request_timeout),
            )
        })?;
        match response {
            Ok(resp) => {
                let chain = resp.into_inner().cert_chain;
                if chain.is_empty() {
                    return Err(ProviderError::Rejected {
                        provider: format!("{PROVIDER_NAME} {}", self.uri),
                        identity,
                        reason: "empty certificate chain in the answer".into(),
                    });
                }
                Ok(chain)
            }
            Err(status) => Err(status_error(&self.uri, identity, &status)),
        }
    }
}

/// Refusals (the CA decided) vs failures (retry may help).
fn status_error(uri: &Uri, identity: Identity, status: &tonic::Status) -> ProviderError {
    let provider = format!("{PROVIDER_NAME} {uri}");
    let reason = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition => ProviderError::Rejected {
            provider,
            identity,
            reason,
        },
        _ => ProviderError::Unavailable {
            provider,
            identity,
            reason,
        },
    }
}

impl CertificateProvider for IstioCaClient {
    fn name(&self) -> &str {
        PROVIDER_NAME
    }

    fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
        Box::pin(self.create(request))
    }
}

/// The provider ztunnel uses: the Istio CA client when `CA_ADDRESS` is set, else the
/// local CA from `CA_ROOT_CERT`/`CA_ROOT_KEY`. `env` supplies `CA_HEADER_*`
/// (`std::env::vars()` in the binary).
pub fn provider_from_config(
    cfg: &Config,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<std::sync::Arc<dyn CertificateProvider>, IstioCaError> {
    if let Some(address) = cfg.ca_address.as_deref() {
        let client = IstioCaClient::new(IstioCaOptions::from_config(cfg, address, env))?;
        tracing::info!(ca = %client.uri, root = %cfg.ca_root_ca, token = %cfg.ca_token_path.display(), "using the Istio CA");
        return Ok(std::sync::Arc::new(client));
    }
    match (&cfg.ca_root_cert, &cfg.ca_root_key) {
        (Some(cert), Some(key)) => {
            let ca = super::local_ca::LocalCa::from_files(cert, key)?;
            tracing::info!(cert = %cert.display(), "using the local CA");
            Ok(std::sync::Arc::new(ca))
        }
        _ => Err(IstioCaError::NoCa),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_both_forms() {
        let (uri, name) = parse_address("https://mesh-ca.istio-system.svc:15012").unwrap();
        assert_eq!(uri.to_string(), "https://mesh-ca.istio-system.svc:15012/");
        assert_eq!(name, "mesh-ca.istio-system.svc");
        let (uri, name) = parse_address("istiod.istio-system.svc:15012").unwrap();
        assert_eq!(uri.scheme_str(), Some("https"));
        assert_eq!(name, "istiod.istio-system.svc");
        let (_, name) = parse_address("[::1]:15012").unwrap();
        assert_eq!(name, "::1");
        for bad in ["http://istiod:15012", "istiod", "https://istiod", "::bad::"] {
            let e = parse_address(bad).unwrap_err().to_string();
            assert!(e.contains("CA_ADDRESS") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn options_from_config() {
        let cfg = Config::from_lookup(|k| match k {
            "CA_ADDRESS" => Some("https://mesh-ca.istio-system.svc:15012".into()),
            "CLUSTER_ID" => Some("c1".into()),
            _ => None,
        })
        .unwrap();
        let o = IstioCaOptions::from_config(
            &cfg,
            cfg.ca_address.as_deref().unwrap(),
            [
                ("CA_HEADER_X_TENANT".to_string(), "blue".to_string()),
                ("OTHER".to_string(), "x".to_string()),
            ],
        );
        assert!(o.impersonate, "shared mode impersonates");
        assert_eq!(o.cluster_id, "c1");
        assert_eq!(
            o.extra_headers,
            vec![("x-tenant".to_string(), "blue".to_string())]
        );
        let client = IstioCaClient::new(o).unwrap();
        assert_eq!(client.headers.len(), 1);
        let dedicated = Config::from_lookup(|k| match k {
            "PROXY_MODE" => Some("dedicated".into()),
            "PROXY_WORKLOAD_INFO" => Some("ns/name/sa".into()),
            _ => None,
        })
        .unwrap();
        assert!(!IstioCaOptions::from_config(&dedicated, "h:1", []).impersonate);
    }

    #[test]
    fn refusal_codes_map_to_rejected() {
        let uri: Uri = "https://ca:15012".parse().unwrap();
        let id = Identity::new("td", "ns", "sa");
        for (code, rejected) in [
            (Code::PermissionDenied, true),
            (Code::Unauthenticated, true),
            (Code::InvalidArgument, true),
            (Code::Unavailable, false),
            (Code::DeadlineExceeded, false),
            (Code::Internal, false),
        ] {
            let e = status_error(&uri, id.clone(), &tonic::Status::new(code, "why"));
            assert_eq!(
                matches!(e, ProviderError::Rejected { .. }),
                rejected,
                "{code:?}"
            );
            assert!(
                e.to_string().contains("why") && e.to_string().contains("ns/sa"),
                "{e}"
            );
        }
    }

    #[test]
    fn no_ca_configured_is_an_error() {
        let cfg = Config::from_lookup(|_| None).unwrap();
        let Err(e) = provider_from_config(&cfg, []) else {
            panic!("a provider without any CA setting");
        };
        let e = e.to_string();
        assert!(e.contains("CA_ADDRESS"), "{e}");
    }

    #[tokio::test]
    async fn missing_token_and_root_files_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = IstioCaOptions {
            address: "https://127.0.0.1:1".into(),
            roots: ControlPlaneRoots::File(dir.path().join("root.pem")),
            alt_hostname: None,
            token_path: dir.path().join("token"),
            cluster_id: "Kubernetes".into(),
            impersonate: true,
            extra_headers: vec![],
            connect_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_millis(500),
            mark: None,
        };
        let req = || CertificateRequest {
            identity: Identity::new("td", "ns", "sa"),
            csr_pem: String::new(),
            ttl: Duration::from_secs(60),
        };
        let e = IstioCaClient::new(o.clone())
            .unwrap()
            .sign(req())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("CA_TOKEN_PATH"), "{e}");
        std::fs::write(&o.token_path, "tok\n").unwrap();
        let e = IstioCaClient::new(o.clone())
            .unwrap()
            .sign(req())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("CA_ROOT_CA"), "{e}");
        // A root that does not parse, or a CA that is not there: unavailable, not a panic.
        std::fs::write(dir.path().join("root.pem"), "garbage").unwrap();
        o.request_timeout = Duration::from_millis(300);
        let e = IstioCaClient::new(o)
            .unwrap()
            .sign(req())
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Unavailable { .. }), "{e}");
    }
}
