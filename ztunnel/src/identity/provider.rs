//! Where workload certificates come from.
//!
//! A provider receives a PEM CSR (ECDSA P-256 key, URI SAN = the SPIFFE identity) and returns
//! the signed chain as PEM strings, leaf first, the way Istio's
//! `IstioCertificateService/CreateCertificate` does (`csr` in, `cert_chain` out). The key never
//! leaves ztunnel. An Istio CA gRPC client implements this trait with
//! `csr_pem` → `IstioCertificateRequest.csr`, `ttl` → `validity_duration`,
//! `identity` → `metadata.ImpersonatedIdentity` (node impersonation).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::Identity;

/// One certificate request.
#[derive(Debug, Clone)]
pub struct CertificateRequest {
    /// The identity the certificate is for; the CSR's URI SAN carries the same value.
    pub identity: Identity,
    /// PEM-encoded PKCS#10 CSR.
    pub csr_pem: String,
    /// Requested lifetime (`SECRET_TTL`).
    pub ttl: Duration,
}

/// Failure of a provider.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The CA answered and refused (bad CSR, identity not allowed...). Retrying may not help.
    #[error("certificate for {identity}: rejected by {provider}: {reason}")]
    Rejected {
        provider: String,
        identity: Identity,
        reason: String,
    },
    /// The CA could not be reached or failed transiently.
    #[error("certificate for {identity}: {provider} unavailable: {reason}")]
    Unavailable {
        provider: String,
        identity: Identity,
        reason: String,
    },
}

/// Boxed future returned by [`CertificateProvider::sign`].
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<String>, ProviderError>> + Send + 'a>>;

/// A certificate authority client: CSR in, PEM chain out (leaf first, root last or omitted).
///
/// Implementations must be cheap to call concurrently; the [`super::SecretManager`] calls
/// `sign` once per identity per rotation.
pub trait CertificateProvider: Send + Sync + 'static {
    /// Short name for logs and `/config_dump` (e.g. `local-ca`, `istio-ca`).
    fn name(&self) -> &str;

    /// Signs the request.
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_>;
}
