//! rustls configurations for HBONE and the SPIFFE verifiers.
//!
//! - TLS 1.3 only, `TLS_AES_128_GCM_SHA256` / `TLS_AES_256_GCM_SHA384`, aws-lc-rs with its
//!   default key exchange groups (X25519, P-256, P-384, X25519MLKEM768), as upstream: a peer
//!   restricted to one of them (upstream's `COMPLIANCE_POLICY=pqc` offers X25519MLKEM768
//!   only) still connects.
//! - ALPN `h2` offered and required on both sides; SNI never sent; no resumption.
//! - Server ([`server_config`]): client certificate required, chained to the trust roots, with a
//!   URI SAN in the local trust domain ([`verifier::TrustDomainVerifier`]).
//! - Client ([`client_config`]): server chain verified to the roots and its URI SAN equal to one
//!   of the expected identities ([`verifier::IdentityVerifier`]).
//!
//! Configurations are built per handshake from the current [`WorkloadCertificate`] (cheap: a
//! few reference counts), which is how certificate rotation reaches new connections while old
//! ones keep their session.

pub mod crl;
pub mod roots;
#[cfg(test)]
mod test_pki;
pub mod verifier;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use crate::identity::certificate::identities_of;
use crate::identity::{Identity, WorkloadCertificate};

pub use roots::TrustRoots;
pub use verifier::{IdentityVerifier, TrustDomainVerifier};

/// The only application protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust roots {source_name}: {reason}")]
    Roots { source_name: String, reason: String },
}

/// The process-wide crypto provider: aws-lc-rs, TLS 1.3 AES-GCM suites, the provider's
/// default key exchange groups (upstream keeps them too).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites = vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
            ];
            Arc::new(p)
        })
        .clone()
}

/// Server configuration for the HBONE listener of `cert`'s workload.
pub fn server_config(
    cert: &WorkloadCertificate,
    roots: &TrustRoots,
    trust_domain: &str,
) -> Arc<ServerConfig> {
    let provider = crypto_provider();
    let verifier = TrustDomainVerifier::new(roots, trust_domain, provider.clone());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported by the aws-lc-rs provider")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(FixedCert(cert.certified_key().clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Arc::new(cfg)
}

/// Client configuration presenting `cert` and accepting only servers proving one of
/// `expected` identities.
pub fn client_config(
    cert: &WorkloadCertificate,
    roots: &TrustRoots,
    expected: Vec<Identity>,
) -> Arc<ClientConfig> {
    let provider = crypto_provider();
    let verifier = IdentityVerifier::new(roots, expected, provider.clone());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported by the aws-lc-rs provider")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(FixedCert(cert.certified_key().clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = Resumption::disabled();
    Arc::new(cfg)
}

/// The placeholder server name HBONE clients use (never sent: SNI is off).
pub fn placeholder_server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
}

/// The peer's SPIFFE identity from its leaf certificate: the first Istio-shaped URI SAN in
/// `trust_domain`, the one [`verifier::TrustDomainVerifier`] accepted the certificate for (a
/// certificate may carry SANs of other trust domains too; authorizing one of those would
/// authorize a name the handshake never checked).
pub fn peer_identity(
    peer_certs: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Option<Identity> {
    let leaf = peer_certs?.first()?;
    identities_of(leaf)
        .ok()?
        .into_iter()
        .find(|id| id.trust_domain() == trust_domain)
}

/// A resolver that always presents the same certificate.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::test_pki::{ca, leaf, now_valid, roots};
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};

    /// Runs one handshake; returns (client result, server result, server-seen peer identity).
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> (Result<(), String>, Result<Option<Identity>, String>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let c = async move {
            tokio_rustls::TlsConnector::from(client)
                .connect(placeholder_server_name(), a)
                .await
                .map(|s| {
                    assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN_H2));
                })
                .map_err(|e| e.to_string())
        };
        let s = async move {
            tokio_rustls::TlsAcceptor::from(server)
                .accept(b)
                .await
                .map(|s| peer_identity(s.get_ref().1.peer_certificates(), "cluster.local"))
                .map_err(|e| e.to_string())
        };
        tokio::join!(c, s)
    }

    #[tokio::test]
    async fn mutual_tls_with_expected_identities() {
        let ca = ca("ec");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let ca_cert = leaf(&ca, &a, now_valid());
        let cb_cert = leaf(&ca, &b, now_valid());
        let (c, s) = handshake(
            client_config(&ca_cert, &roots(&ca), vec![b.clone()]),
            server_config(&cb_cert, &roots(&ca), "cluster.local"),
        )
        .await;
        c.unwrap();
        assert_eq!(s.unwrap(), Some(a));
    }

    #[tokio::test]
    async fn rsa_root_chain_verifies() {
        let ca = ca("rsa");
        let a = Identity::new("cluster.local", "ns", "a");
        let cert = leaf(&ca, &a, now_valid());
        let (c, s) = handshake(
            client_config(&cert, &roots(&ca), vec![a.clone()]),
            server_config(&cert, &roots(&ca), "cluster.local"),
        )
        .await;
        c.unwrap();
        assert_eq!(s.unwrap(), Some(a));
    }

    #[tokio::test]
    async fn client_refuses_unexpected_server_identity() {
        let ca = ca("ec");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let evil = Identity::new("cluster.local", "ns", "evil");
        let (c, _s) = handshake(
            client_config(&leaf(&ca, &a, now_valid()), &roots(&ca), vec![b]),
            server_config(&leaf(&ca, &evil, now_valid()), &roots(&ca), "cluster.local"),
        )
        .await;
        let err = c.unwrap_err();
        assert!(
            err.contains("evil") && err.contains("not one of the expected"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn server_refuses_other_trust_domain() {
        let ca = ca("ec");
        let a = Identity::new("other.domain", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let (_c, s) = handshake(
            client_config(&leaf(&ca, &a, now_valid()), &roots(&ca), vec![b.clone()]),
            server_config(&leaf(&ca, &b, now_valid()), &roots(&ca), "cluster.local"),
        )
        .await;
        let err = s.unwrap_err();
        assert!(err.contains("not in trust domain"), "{err}");
    }

    /// A client certificate with URI SANs in two trust domains, signed by the trusted root.
    fn two_domain_leaf(first: &Identity, second: &Identity) -> WorkloadCertificate {
        use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/ca");
        let root_pem = std::fs::read_to_string(dir.join("ec-root.pem")).unwrap();
        let root_key =
            KeyPair::from_pem(&std::fs::read_to_string(dir.join("ec-root.key")).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = [first, second]
            .iter()
            .map(|id| SanType::URI(id.to_string().try_into().unwrap()))
            .collect();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        WorkloadCertificate::from_pem(first, &key.serialize_pem(), &[cert.pem(), root_pem]).unwrap()
    }

    #[tokio::test]
    async fn server_authorizes_the_san_in_its_trust_domain() {
        let ca = ca("ec");
        let foreign = Identity::new("other.domain", "ns", "admin");
        let own = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let (c, s) = handshake(
            client_config(
                &two_domain_leaf(&foreign, &own),
                &roots(&ca),
                vec![b.clone()],
            ),
            server_config(&leaf(&ca, &b, now_valid()), &roots(&ca), "cluster.local"),
        )
        .await;
        c.unwrap();
        assert_eq!(
            s.unwrap(),
            Some(own),
            "the identity the trust-domain check accepted, not the first SAN"
        );
    }

    #[tokio::test]
    async fn both_sides_refuse_untrusted_root() {
        let good = ca("ec");
        let rogue = ca("rsa");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        // Client cert from a rogue CA: server refuses.
        let (_c, s) = handshake(
            client_config(
                &leaf(&rogue, &a, now_valid()),
                &roots(&good),
                vec![b.clone()],
            ),
            server_config(
                &leaf(&good, &b, now_valid()),
                &roots(&good),
                "cluster.local",
            ),
        )
        .await;
        let err = s.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        // Server cert from a rogue CA: client refuses.
        let (c, _s) = handshake(
            client_config(
                &leaf(&good, &a, now_valid()),
                &roots(&good),
                vec![b.clone()],
            ),
            server_config(
                &leaf(&rogue, &b, now_valid()),
                &roots(&good),
                "cluster.local",
            ),
        )
        .await;
        let err = c.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn server_refuses_expired_client_certificate() {
        let ca = ca("ec");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let now = SystemTime::now();
        let expired = now - Duration::from_secs(7200)..now - Duration::from_secs(3600);
        let (_c, s) = handshake(
            client_config(&leaf(&ca, &a, expired), &roots(&ca), vec![b.clone()]),
            server_config(&leaf(&ca, &b, now_valid()), &roots(&ca), "cluster.local"),
        )
        .await;
        let err = s.unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }

    /// With revocation lists: a listed client is refused by the server, a listed server by
    /// the client (rustls' `Revoked`), others connect; without lists nothing is checked.
    #[tokio::test]
    async fn revoked_certificates_are_refused_on_both_sides() {
        use crate::tls::crl::{CrlSet, RevocationLists};
        let ca = ca("ec");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let (a_cert, b_cert) = (leaf(&ca, &a, now_valid()), leaf(&ca, &b, now_valid()));
        let lists = RevocationLists::new(CrlSet::default());
        let checked = roots(&ca).with_revocation(lists.clone());
        let run = |trust: TrustRoots| {
            handshake(
                client_config(&a_cert, &trust, vec![b.clone()]),
                server_config(&b_cert, &trust, "cluster.local"),
            )
        };
        let (c, s) = run(checked.clone()).await;
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
        let revoke = |serial: &str| {
            let pem = ca.revocation_list_pem(&[serial]).unwrap();
            lists.replace(CrlSet::from_pem(&pem, "crl").unwrap());
        };
        revoke(a_cert.serial());
        let (_c, s) = run(checked.clone()).await;
        let err = s.unwrap_err();
        assert!(err.to_lowercase().contains("revoked"), "{err}");
        revoke(b_cert.serial());
        let (c, _s) = run(checked.clone()).await;
        let err = c.unwrap_err();
        assert!(err.to_lowercase().contains("revoked"), "{err}");
        // The same roots without the lists: no check.
        let (c, s) = run(roots(&ca)).await;
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    }

    /// Peers limited to one key exchange group our aws-lc provider supports by default
    /// (upstream's post-quantum policy: X25519MLKEM768 only; a P-384-only stack) connect.
    #[tokio::test]
    async fn server_accepts_every_default_key_exchange_group() {
        use rustls::crypto::aws_lc_rs::kx_group;
        let ca = ca("ec");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let client_cert = leaf(&ca, &a, now_valid());
        for group in [kx_group::X25519MLKEM768, kx_group::SECP384R1] {
            let mut p = (*crypto_provider()).clone();
            p.kx_groups = vec![group];
            let p = Arc::new(p);
            let mut client = ClientConfig::builder_with_provider(p.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(IdentityVerifier::new(
                    &roots(&ca),
                    vec![b.clone()],
                    p,
                )))
                .with_client_cert_resolver(Arc::new(FixedCert(
                    client_cert.certified_key().clone(),
                )));
            client.alpn_protocols = vec![ALPN_H2.to_vec()];
            let (c, s) = handshake(
                Arc::new(client),
                server_config(&leaf(&ca, &b, now_valid()), &roots(&ca), "cluster.local"),
            )
            .await;
            c.unwrap_or_else(|e| panic!("{:?}: {e}", group.name()));
            assert_eq!(s.unwrap(), Some(a.clone()));
        }
    }

    #[test]
    fn roots_from_garbage_name_the_source() {
        let err = TrustRoots::from_pem("not pem", "/etc/roots.pem").unwrap_err();
        assert!(err.to_string().contains("/etc/roots.pem"), "{err}");
    }
}
