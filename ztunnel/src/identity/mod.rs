//! Workload identities and their certificates.
//!
//! - [`Identity`] — `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`provider::CertificateProvider`]: where certificates come from (CSR in, PEM chain out).
//!   [`local_ca::LocalCa`] signs them from `CA_ROOT_CERT`/`CA_ROOT_KEY`;
//!   [`istio_ca::IstioCaClient`] asks an Istio CA (`CA_ADDRESS`).
//! - [`manager::SecretManager`]: one certificate per identity, fetched on first use, renewed at
//!   half of its lifetime; TLS resolvers read the current one at handshake time. Forgotten
//!   when no owner keeps it any more (`owners`: in-pod account holds, the node-wide claim).
//! - [`limiter`]: at most 8 CSRs in flight; connections first, then prefetches, then renewals.

pub mod certificate;
pub mod grpc_channel;
pub mod istio_ca;
pub mod limiter;
pub mod local_ca;
pub mod manager;
mod owners;
pub mod provider;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use certificate::WorkloadCertificate;
pub use manager::SecretManager;
pub use provider::{CertificateProvider, CertificateRequest, ProviderError};

const SPIFFE_SCHEME: &str = "spiffe://";

/// A SPIFFE workload identity in Istio's form.
///
/// Cheap to clone (one reference count).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<IdentityParts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct IdentityParts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not an Istio SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?}: missing spiffe:// scheme")]
    Scheme(String),
    #[error("identity {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
}

impl Identity {
    /// Builds an identity from its parts.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Identity(Arc::new(IdentityParts {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }))
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The principal as written in Istio authorization policies (no `spiffe://` prefix).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(*td, *ns, *sa))
            }
            _ => Err(IdentityError::Shape(s.to_string())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_SCHEME}{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let s = "spiffe://cluster.local/ns/default/sa/sleep";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), s);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(id, Identity::new("cluster.local", "default", "sleep"));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "cluster.local/ns/default/sa/sleep",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/namespace/a/sa/b",
            "spiffe://td/ns/a/sa/b/extra",
        ] {
            let err = bad.parse::<Identity>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
