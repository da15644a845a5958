//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: who may get which
//! certificate.
//!
//! 1. `clusterid` header, when present, must be `CLUSTER_ID` (`Unauthenticated`).
//! 2. `authorization: Bearer <token>` checked with TokenReview (`Unauthenticated`;
//!    `Unavailable` when the API server cannot be asked).
//! 3. The requested identity is `metadata.ImpersonatedIdentity` when set, else the
//!    caller's own. It must be a SPIFFE id of `TRUST_DOMAIN` (`InvalidArgument` when
//!    malformed, `PermissionDenied` for another trust domain).
//! 4. Its own identity: always allowed. Another identity: only for a trusted node
//!    account (`CA_TRUSTED_NODE_ACCOUNTS`), only when a pod of that service account
//!    runs on the node of the caller's own pod (`PermissionDenied` otherwise).
//! 5. The CSR must verify and carry exactly one SAN, the requested identity's URI
//!    (`InvalidArgument`).
//! 6. Lifetime: `validity_duration` seconds, capped at `MAX_WORKLOAD_CERT_TTL`
//!    (which is also the default when it is 0 or negative).
//!
//! Every decision is logged (target `ca`) with the caller, the identity and the
//! reason, and counted in `mesh_ca_requests_total{outcome}`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Code, Request, Response, Status};

use super::authn::{AuthError, Authenticator, Caller, bearer_token};
use super::authority::{Authority, IssueError};
use super::config::ServiceAccountRef;
use super::metrics::CaMetrics;
use super::pods::{NodeAuthError, PodDirectory};

/// Metadata key for node-level issuance.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// gRPC header naming the caller's cluster.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// The rules the service applies.
#[derive(Debug, Clone)]
pub struct IssuePolicy {
    pub trust_domain: String,
    pub cluster_id: String,
    pub trusted_node_accounts: Vec<ServiceAccountRef>,
    pub max_ttl: Duration,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated(String),
    PermissionDenied(String),
    InvalidArgument(String),
    Unavailable(String),
    Internal(String),
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Refusal::Unauthenticated(_) => Code::Unauthenticated,
            Refusal::PermissionDenied(_) => Code::PermissionDenied,
            Refusal::InvalidArgument(_) => Code::InvalidArgument,
            Refusal::Unavailable(_) => Code::Unavailable,
            Refusal::Internal(_) => Code::Internal,
        }
    }

    pub fn outcome(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::PermissionDenied(_) => "permission_denied",
            Refusal::InvalidArgument(_) => "invalid_argument",
            Refusal::Unavailable(_) => "unavailable",
            Refusal::Internal(_) => "internal",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::Unauthenticated(m)
            | Refusal::PermissionDenied(m)
            | Refusal::InvalidArgument(m)
            | Refusal::Unavailable(m)
            | Refusal::Internal(m) => m,
        }
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Rejected(_) => Refusal::Unauthenticated(e.to_string()),
            AuthError::Unavailable(_) => Refusal::Unavailable(e.to_string()),
        }
    }
}

/// A granted request.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain: Vec<String>,
    pub identity: String,
    pub ttl: Duration,
    /// The caller's node when the identity was granted through node authorization.
    pub node: Option<String>,
}

/// The gRPC service.
pub struct CaService {
    policy: IssuePolicy,
    authn: Arc<dyn Authenticator>,
    pods: Arc<dyn PodDirectory>,
    authority: Arc<ArcSwap<Authority>>,
    metrics: CaMetrics,
}

impl CaService {
    pub fn new(
        policy: IssuePolicy,
        authn: Arc<dyn Authenticator>,
        pods: Arc<dyn PodDirectory>,
        authority: Arc<ArcSwap<Authority>>,
        metrics: CaMetrics,
    ) -> Self {
        CaService {
            policy,
            authn,
            pods,
            authority,
            metrics,
        }
    }

    /// Decides and signs. `caller` is filled as soon as it is known (for logs).
    pub async fn decide(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        req: &IstioCertificateRequest,
        caller_out: &mut Option<Caller>,
        identity_out: &mut Option<String>,
    ) -> Result<Issued, Refusal> {
        if let Some(cluster) = metadata.get(CLUSTER_ID_HEADER) {
            let cluster = cluster.to_str().unwrap_or("<not text>");
            if cluster != self.policy.cluster_id {
                return Err(Refusal::Unauthenticated(format!(
                    "client claims cluster {cluster:?}; this CA serves cluster {:?} only",
                    self.policy.cluster_id
                )));
            }
        }
        let header = metadata
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        let token = bearer_token(header)?;
        let caller = self.authn.authenticate(token).await?;
        *caller_out = Some(caller.clone());

        let own = caller.identity(&self.policy.trust_domain);
        let requested = impersonated_identity(req)?.unwrap_or_else(|| own.clone());
        *identity_out = Some(requested.clone());
        let (ns, sa) = parse_identity(&requested, &self.policy.trust_domain)?;

        let mut node = None;
        if requested != own {
            let trusted = self
                .policy
                .trusted_node_accounts
                .iter()
                .any(|a| a.namespace == caller.namespace && a.name == caller.service_account);
            if !trusted {
                return Err(Refusal::PermissionDenied(format!(
                    "{} may only request its own identity {own}, not {requested} \
                     (not in CA_TRUSTED_NODE_ACCOUNTS)",
                    caller.account()
                )));
            }
            let caller_node = self.pods.caller_node(&caller).await.map_err(node_refusal)?;
            let present = self
                .pods
                .runs_on_node(&caller_node, ns, sa)
                .await
                .map_err(node_refusal)?;
            if !present {
                return Err(Refusal::PermissionDenied(format!(
                    "node {caller_node} of {} runs no pod with service account {ns}/{sa}",
                    caller.account()
                )));
            }
            node = Some(caller_node);
        }

        let ttl = if req.validity_duration > 0 {
            Duration::from_secs(req.validity_duration as u64).min(self.policy.max_ttl)
        } else {
            self.policy.max_ttl
        };
        let authority = self.authority.load_full();
        let chain = authority
            .sign_workload_csr(&req.csr, &requested, ttl)
            .map_err(|e| match e {
                IssueError::Csr(e) => Refusal::InvalidArgument(e.to_string()),
                IssueError::Sign(e) => Refusal::Internal(e.to_string()),
            })?;
        Ok(Issued {
            chain,
            identity: requested,
            ttl,
            node,
        })
    }
}

fn node_refusal(e: NodeAuthError) -> Refusal {
    match e {
        NodeAuthError::Denied(m) => Refusal::PermissionDenied(m),
        NodeAuthError::Unavailable(_) => Refusal::Unavailable(e.to_string()),
    }
}

/// `metadata.ImpersonatedIdentity`, if present and non-empty.
fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<String>, Refusal> {
    use prost_types::value::Kind;
    let Some(field) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &field.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(Refusal::InvalidArgument(format!(
            "metadata.{IMPERSONATED_IDENTITY} must be a string"
        ))),
    }
}

/// `(namespace, service account)` of `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`.
fn parse_identity<'a>(id: &'a str, trust_domain: &str) -> Result<(&'a str, &'a str), Refusal> {
    let malformed = || {
        Refusal::InvalidArgument(format!(
            "identity {id:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
        ))
    };
    let rest = id.strip_prefix("spiffe://").ok_or_else(malformed)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
        return Err(malformed());
    };
    if td.is_empty() || ns.is_empty() || sa.is_empty() {
        return Err(malformed());
    }
    if *td != trust_domain {
        return Err(Refusal::PermissionDenied(format!(
            "identity {id} is in trust domain {td:?}; this CA issues for {trust_domain:?} only"
        )));
    }
    Ok((ns, sa))
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        let mut caller = None;
        let mut identity = None;
        let result = self
            .decide(
                request.metadata(),
                request.get_ref(),
                &mut caller,
                &mut identity,
            )
            .await;
        let caller = caller.map(|c| {
            let pod = c.pod_name.as_deref().unwrap_or("-").to_string();
            format!("{} (pod {pod})", c.account())
        });
        let caller = caller.as_deref().unwrap_or("-");
        let identity = identity.as_deref().unwrap_or("-");
        match result {
            Ok(issued) => {
                self.metrics.count("issued");
                tracing::info!(
                    target: "ca",
                    peer,
                    caller,
                    identity,
                    node = issued.node.as_deref().unwrap_or("-"),
                    ttl = %humantime::format_duration(issued.ttl),
                    "certificate issued"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: issued.chain,
                }))
            }
            Err(refusal) => {
                self.metrics.count(refusal.outcome());
                tracing::warn!(
                    target: "ca",
                    peer,
                    caller,
                    identity,
                    code = ?refusal.code(),
                    reason = refusal.message(),
                    "certificate refused"
                );
                Err(Status::new(refusal.code(), refusal.message().to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::authority::testing::generate_root;
    use super::*;
    use futures::future::BoxFuture;
    use std::collections::HashMap;

    const TD: &str = "cluster.local";

    /// Tokens are `"<ns>:<sa>:<pod>"`; `"expired"` is rejected.
    struct FakeAuthn;
    impl Authenticator for FakeAuthn {
        fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
            Box::pin(async move {
                let parts: Vec<&str> = token.split(':').collect();
                match parts.as_slice() {
                    [ns, sa, pod] => Ok(Caller {
                        namespace: ns.to_string(),
                        service_account: sa.to_string(),
                        pod_name: (!pod.is_empty()).then(|| pod.to_string()),
                        pod_uid: None,
                    }),
                    _ => Err(AuthError::Rejected("token has expired".into())),
                }
            })
        }
    }

    /// pods: (ns, name) -> (sa, node)
    struct FakePods(HashMap<(String, String), (String, String)>);
    impl PodDirectory for FakePods {
        fn caller_node<'a>(
            &'a self,
            caller: &'a Caller,
        ) -> BoxFuture<'a, Result<String, NodeAuthError>> {
            Box::pin(async move {
                let pod = caller
                    .pod_name
                    .clone()
                    .ok_or_else(|| NodeAuthError::Denied("not pod-bound".into()))?;
                self.0
                    .get(&(caller.namespace.clone(), pod))
                    .map(|(_, n)| n.clone())
                    .ok_or_else(|| NodeAuthError::Denied("no such pod".into()))
            })
        }
        fn runs_on_node<'a>(
            &'a self,
            node: &'a str,
            namespace: &'a str,
            sa: &'a str,
        ) -> BoxFuture<'a, Result<bool, NodeAuthError>> {
            Box::pin(async move {
                Ok(self
                    .0
                    .iter()
                    .any(|((ns, _), (s, n))| ns == namespace && s == sa && n == node))
            })
        }
    }

    fn service() -> CaService {
        let (cert, key) = generate_root("root");
        let authority = Authority::from_pem(&cert, &key, None, None).unwrap();
        let mut pods = HashMap::new();
        for (ns, name, sa, node) in [
            ("istio-system", "zt-1", "ztunnel", "n1"),
            ("istio-system", "zt-2", "ztunnel", "n2"),
            ("app", "web-1", "web", "n1"),
            ("app", "db-1", "db", "n2"),
        ] {
            pods.insert((ns.into(), name.into()), (sa.into(), node.into()));
        }
        CaService::new(
            IssuePolicy {
                trust_domain: TD.into(),
                cluster_id: "Kubernetes".into(),
                trusted_node_accounts: vec!["istio-system/ztunnel".parse().unwrap()],
                max_ttl: Duration::from_secs(24 * 3600),
            },
            Arc::new(FakeAuthn),
            Arc::new(FakePods(pods)),
            Arc::new(ArcSwap::from_pointee(authority)),
            CaMetrics::new(),
        )
    }

    fn csr_for(id: &str) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn request(csr_id: &str, impersonate: Option<&str>, ttl: i64) -> IstioCertificateRequest {
        let metadata = impersonate.map(|id| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        });
        IstioCertificateRequest {
            csr: csr_for(csr_id),
            validity_duration: ttl,
            metadata,
        }
    }

    async fn call(
        svc: &CaService,
        token: Option<&str>,
        cluster: Option<&str>,
        req: IstioCertificateRequest,
    ) -> Result<Issued, Refusal> {
        let mut md = tonic::metadata::MetadataMap::new();
        if let Some(t) = token {
            md.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(c) = cluster {
            md.insert(CLUSTER_ID_HEADER, c.parse().unwrap());
        }
        svc.decide(&md, &req, &mut None, &mut None).await
    }

    fn id(ns: &str, sa: &str) -> String {
        format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
    }

    #[tokio::test]
    async fn own_identity_and_node_impersonation_are_granted() {
        let svc = service();
        let own = call(
            &svc,
            Some("app:web:web-1"),
            Some("Kubernetes"),
            request(&id("app", "web"), None, 3600),
        )
        .await
        .unwrap();
        assert_eq!(own.identity, id("app", "web"));
        assert_eq!(own.ttl, Duration::from_secs(3600));
        assert!(own.node.is_none());

        let imp = call(
            &svc,
            Some("istio-system:ztunnel:zt-1"),
            None,
            request(&id("app", "web"), Some(&id("app", "web")), 0),
        )
        .await
        .unwrap();
        assert_eq!(imp.node.as_deref(), Some("n1"));
        assert_eq!(imp.ttl, Duration::from_secs(24 * 3600), "0 = the maximum");

        let capped = call(
            &svc,
            Some("app:web:web-1"),
            None,
            request(&id("app", "web"), None, 10 * 24 * 3600),
        )
        .await
        .unwrap();
        assert_eq!(capped.ttl, Duration::from_secs(24 * 3600));
    }

    #[tokio::test]
    async fn refusals_carry_the_right_code() {
        let svc = service();
        let web = id("app", "web");
        let db = id("app", "db");
        for (token, cluster, req, code, want) in [
            (
                None,
                None,
                request(&web, None, 60),
                Code::Unauthenticated,
                "no authorization header",
            ),
            (
                Some("expired"),
                None,
                request(&web, None, 60),
                Code::Unauthenticated,
                "expired",
            ),
            (
                Some("app:web:web-1"),
                Some("Other"),
                request(&web, None, 60),
                Code::Unauthenticated,
                "claims cluster",
            ),
            // db runs on n2 only; zt-1 is on n1.
            (
                Some("istio-system:ztunnel:zt-1"),
                None,
                request(&db, Some(&db), 60),
                Code::PermissionDenied,
                "node n1",
            ),
            // Not a node account.
            (
                Some("app:web:web-1"),
                None,
                request(&db, Some(&db), 60),
                Code::PermissionDenied,
                "only request its own identity",
            ),
            // Node account without a pod-bound token.
            (
                Some("istio-system:ztunnel:"),
                None,
                request(&web, Some(&web), 60),
                Code::PermissionDenied,
                "not pod-bound",
            ),
            // CSR for another identity than the one requested.
            (
                Some("istio-system:ztunnel:zt-1"),
                None,
                request(&db, Some(&web), 60),
                Code::InvalidArgument,
                "must be exactly",
            ),
            (
                Some("app:web:web-1"),
                None,
                request(&db, None, 60),
                Code::InvalidArgument,
                "must be exactly",
            ),
            (
                Some("istio-system:ztunnel:zt-1"),
                None,
                request(&web, Some("spiffe://other.td/ns/app/sa/web"), 60),
                Code::PermissionDenied,
                "trust domain",
            ),
            (
                Some("istio-system:ztunnel:zt-1"),
                None,
                request(&web, Some("web"), 60),
                Code::InvalidArgument,
                "is not spiffe://",
            ),
        ] {
            let r = call(&svc, token, cluster, req).await.unwrap_err();
            assert_eq!(r.code(), code, "{want}: {r:?}");
            assert!(r.message().contains(want), "{want}: {r:?}");
        }
    }

    #[tokio::test]
    async fn grpc_handler_counts_outcomes() {
        let svc = service();
        let mut req = Request::new(request(&id("app", "web"), None, 60));
        req.metadata_mut()
            .insert("authorization", "Bearer app:web:web-1".parse().unwrap());
        let resp = svc.create_certificate(req).await.unwrap();
        assert_eq!(resp.get_ref().cert_chain.len(), 2);
        let err = svc
            .create_certificate(Request::new(request(&id("app", "web"), None, 60)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(svc.metrics.count_of("issued"), 1);
        assert_eq!(svc.metrics.count_of("unauthenticated"), 1);
    }
}
