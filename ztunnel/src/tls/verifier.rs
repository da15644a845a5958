//! SPIFFE certificate verifiers.
//!
//! Both verify the chain to the trust roots with webpki (validity period included), check it
//! against the revocation lists when `CRL_PATH` is set, and then look at the leaf's URI
//! SANs; DNS SANs and the server name are ignored.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};

use super::TrustRoots;
use crate::identity::Identity;
use crate::identity::certificate::identities_of;

/// The peer's certificate is valid but names the wrong workload.
pub struct IdentityMismatch {
    pub expected: Vec<Identity>,
    pub actual: Vec<Identity>,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer identity {:?} is not one of the expected {:?}",
            self.actual, self.expected
        )
    }
}

// rustls prints these with `{:?}` inside its own message: keep them readable.
impl fmt::Debug for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for IdentityMismatch {}

/// The peer's certificate is valid but from another trust domain.
pub struct TrustDomainMismatch {
    pub trust_domain: String,
    pub actual: Vec<Identity>,
}

impl fmt::Display for TrustDomainMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer identity {:?} is not in trust domain {:?}",
            self.actual, self.trust_domain
        )
    }
}

impl fmt::Debug for TrustDomainMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for TrustDomainMismatch {}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The chain against the revocation lists of `roots` (when configured): a revoked
/// certificate is rustls' `Revoked` (the handshake fails with that reason and the peer gets
/// a `certificate_revoked` alert).
fn check_revocation(
    roots: &TrustRoots,
    store: &rustls::RootCertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), Error> {
    let Some(lists) = roots.revocation() else {
        return Ok(());
    };
    match lists
        .current()
        .check(end_entity, intermediates, store, now, usage)
    {
        Ok(()) => Ok(()),
        Err(webpki::Error::CertRevoked) => {
            Err(Error::InvalidCertificate(CertificateError::Revoked))
        }
        Err(e) => Err(other(e)),
    }
}

fn bad_san(reason: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        std::io::Error::other(reason),
    ))))
}

/// Client side: the server must prove one of the expected identities.
#[derive(Debug)]
pub struct IdentityVerifier {
    roots: TrustRoots,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl IdentityVerifier {
    pub fn new(roots: &TrustRoots, expected: Vec<Identity>, provider: Arc<CryptoProvider>) -> Self {
        IdentityVerifier {
            roots: roots.clone(),
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let store = self.roots.store();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &store,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_revocation(
            &self.roots,
            &store,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let actual = identities_of(end_entity).map_err(bad_san)?;
        if actual.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(other(IdentityMismatch {
                expected: self.expected.clone(),
                actual,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: the client must present a chain to the roots with a URI SAN in our trust
/// domain. Which identity it is gets decided after the handshake (authorization).
#[derive(Debug)]
pub struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    roots: TrustRoots,
    store: Arc<rustls::RootCertStore>,
}

impl TrustDomainVerifier {
    pub fn new(roots: &TrustRoots, trust_domain: &str, provider: Arc<CryptoProvider>) -> Self {
        let store = roots.store();
        let inner = WebPkiClientVerifier::builder_with_provider(store.clone(), provider)
            .build()
            .expect("a non-empty root store always builds a client verifier");
        TrustDomainVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
            roots: roots.clone(),
            store,
        }
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the client has one certificate anyway and this keeps handshakes small.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_revocation(
            &self.roots,
            &self.store,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        let actual = identities_of(end_entity).map_err(bad_san)?;
        if actual
            .iter()
            .any(|id| id.trust_domain() == self.trust_domain)
        {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(other(TrustDomainMismatch {
                trust_domain: self.trust_domain.clone(),
                actual,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
