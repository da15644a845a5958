//! The signing authority: the CA certificate and key from `CA_CERT_DIR` (Istio's
//! plugged-in CA layout), workload leaf issuance from a CSR, and the CA's own
//! serving certificate.
//!
//! Layout: `ca-cert.pem` (the signing certificate: a root or an intermediate),
//! `ca-key.pem` (its key: SEC1 `EC PRIVATE KEY`, PKCS#8, or RSA PKCS#1/PKCS#8),
//! `root-cert.pem` (the trust root; optional when `ca-cert.pem` is self-signed),
//! `cert-chain.pem` (from `ca-cert.pem` up to the root; optional).
//!
//! Leaves: ECDSA P-256 or RSA (≥ 2048) public key taken from the CSR, after the
//! CSR's signature is verified; empty subject; exactly one SAN, the SPIFFE URI
//! (critical, as the subject is empty); digitalSignature + keyEncipherment;
//! serverAuth + clientAuth; never a CA, whatever the CSR asks. Nothing else from
//! the CSR is copied.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::bundle::verify_chain_to_root;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// File names inside `CA_CERT_DIR`.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// Leaves start this long before "now" to tolerate clock skew between peers.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of the CA's own serving certificate (re-issued at half-life).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// The CA material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("CA_CERT_DIR {dir}: {file}: {reason}")]
pub struct LoadError {
    pub dir: String,
    pub file: &'static str,
    pub reason: String,
}

/// A CSR that cannot be signed for the requested identity (gRPC `InvalidArgument`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("CSR for {identity}: {reason}")]
pub struct CsrError {
    pub identity: String,
    pub reason: String,
}

/// Signing failed for a reason that is not the caller's (gRPC `Internal`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("signing certificate for {subject}: {reason}")]
pub struct SignError {
    pub subject: String,
    pub reason: String,
}

/// Why a workload certificate was not issued.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// A loaded CA. Immutable; a reload builds a new one.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates sent after the leaf: `cert-chain.pem` (or `ca-cert.pem`), then the
    /// root unless the chain already ends with it.
    chain_pem: Vec<String>,
    root_pem: String,
    ca_not_after: SystemTime,
    root_not_after: SystemTime,
    /// The raw file contents it was built from (reload compares them).
    source: Vec<u8>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("chain_len", &self.chain_pem.len())
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

/// The raw content of the CA files, read together (compared to detect rotation).
pub fn read_sources(dir: &Path) -> Result<Vec<u8>, LoadError> {
    let mut all = Vec::new();
    for file in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
        match std::fs::read(dir.join(file)) {
            Ok(bytes) => all.extend_from_slice(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(LoadError {
                    dir: dir.display().to_string(),
                    file,
                    reason: format!("cannot read: {e}"),
                });
            }
        }
        all.push(0);
    }
    Ok(all)
}

impl Authority {
    /// Loads and checks the files of `dir`.
    pub fn load(dir: &Path) -> Result<Authority, LoadError> {
        let source = read_sources(dir)?;
        let read = |file: &'static str, required: bool| -> Result<Option<String>, LoadError> {
            let path: PathBuf = dir.join(file);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
                Err(e) => Err(LoadError {
                    dir: dir.display().to_string(),
                    file,
                    reason: format!("cannot read: {e}"),
                }),
            }
        };
        let ca_cert = read(CA_CERT_FILE, true)?.unwrap_or_default();
        let ca_key = read(CA_KEY_FILE, true)?.unwrap_or_default();
        let root = read(ROOT_CERT_FILE, false)?;
        let chain = read(CERT_CHAIN_FILE, false)?;
        let mut authority =
            Authority::from_pem(&ca_cert, &ca_key, root.as_deref(), chain.as_deref()).map_err(
                |(file, reason)| LoadError {
                    dir: dir.display().to_string(),
                    file,
                    reason,
                },
            )?;
        authority.source = source;
        Ok(authority)
    }

    /// Builds an authority from PEM text. The error names the offending file.
    pub fn from_pem(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        root_pem: Option<&str>,
        chain_pem: Option<&str>,
    ) -> Result<Authority, (&'static str, String)> {
        let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
            .map_err(|e| (CA_CERT_FILE, format!("no PEM certificate: {e}")))?;
        let (_, ca_x509) = X509Certificate::from_der(ca_der.as_ref())
            .map_err(|e| (CA_CERT_FILE, format!("cannot parse certificate: {e}")))?;
        if !ca_x509.is_ca() {
            return Err((
                CA_CERT_FILE,
                "not a CA certificate (basicConstraints CA:false or absent)".into(),
            ));
        }
        let ca_not_after = to_system(ca_x509.validity().not_after.timestamp());
        if ca_not_after <= SystemTime::now() {
            return Err((
                CA_CERT_FILE,
                format!(
                    "expired at {}",
                    humantime::format_rfc3339_seconds(ca_not_after)
                ),
            ));
        }
        let key_der = PrivateKeyDer::from_pem_slice(ca_key_pem.as_bytes())
            .map_err(|e| (CA_KEY_FILE, format!("no PEM private key: {e}")))?;
        let key = KeyPair::try_from(&key_der)
            .map_err(|e| (CA_KEY_FILE, format!("unsupported private key: {e}")))?;
        if key.der_bytes() != ca_x509.public_key().subject_public_key.data.as_ref() {
            return Err((CA_KEY_FILE, format!("does not match {CA_CERT_FILE}")));
        }
        let ca_pem = pem_cert(&ca_der);

        let root_pem = match root_pem {
            Some(text) => {
                let der = CertificateDer::from_pem_slice(text.as_bytes())
                    .map_err(|e| (ROOT_CERT_FILE, format!("no PEM certificate: {e}")))?;
                pem_cert(&der)
            }
            None if ca_x509.subject() == ca_x509.issuer() => ca_pem.clone(),
            None => {
                return Err((
                    ROOT_CERT_FILE,
                    format!("missing, and {CA_CERT_FILE} is not self-signed"),
                ));
            }
        };
        let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| (ROOT_CERT_FILE, format!("no PEM certificate: {e}")))?;
        let (_, root_x509) = X509Certificate::from_der(root_der.as_ref())
            .map_err(|e| (ROOT_CERT_FILE, format!("cannot parse certificate: {e}")))?;
        let root_not_after = to_system(root_x509.validity().not_after.timestamp());

        let mut chain_ders = Vec::new();
        let mut chain: Vec<String> = match chain_pem {
            Some(text) => {
                let mut out = Vec::new();
                for der in CertificateDer::pem_slice_iter(text.as_bytes()) {
                    let der = der.map_err(|e| (CERT_CHAIN_FILE, format!("bad PEM: {e}")))?;
                    out.push(pem_cert(&der));
                    chain_ders.push(der);
                }
                if out.is_empty() {
                    return Err((CERT_CHAIN_FILE, "no certificate".into()));
                }
                if out[0] != ca_pem {
                    out.insert(0, ca_pem.clone());
                }
                out
            }
            None => vec![ca_pem.clone()],
        };
        if chain.last() != Some(&root_pem) {
            chain.push(root_pem.clone());
        }
        // The intermediates between the signing certificate and the root.
        let mut intermediates = Vec::new();
        for der in &chain_ders {
            if der.as_ref() == ca_der.as_ref() || der.as_ref() == root_der.as_ref() {
                continue;
            }
            let (_, x) = X509Certificate::from_der(der.as_ref())
                .map_err(|e| (CERT_CHAIN_FILE, format!("cannot parse certificate: {e}")))?;
            intermediates.push(x);
        }
        verify_chain_to_root(&ca_x509, &intermediates, &root_x509).map_err(|e| {
            (
                ROOT_CERT_FILE,
                format!("{CA_CERT_FILE} does not chain to this root: {e}"),
            )
        })?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| (CA_CERT_FILE, format!("not usable as issuer: {e}")))?;
        Ok(Authority {
            issuer,
            chain_pem: chain,
            root_pem,
            ca_not_after,
            root_not_after,
            source: Vec::new(),
        })
    }

    /// The trust root (PEM).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root_not_after(&self) -> SystemTime {
        self.root_not_after
    }

    pub fn ca_not_after(&self) -> SystemTime {
        self.ca_not_after
    }

    /// The file contents this authority came from.
    pub fn source(&self) -> &[u8] {
        &self.source
    }

    /// Checks `csr_pem` for `identity` (a SPIFFE URI) and signs it for `ttl` (clamped to the
    /// CA certificate's own expiry). Returns the chain, leaf first, root last.
    pub fn sign_workload_csr(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, IssueError> {
        let spki = check_csr(csr_pem, identity)?;
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.ca_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(|e| CsrError {
            identity: identity.to_string(),
            reason: format!("identity is not a valid URI: {e}"),
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        Ok(self.sign(params, &spki, identity)?)
    }

    /// A fresh serving certificate and key for the CA's own gRPC endpoint.
    pub fn issue_serving_cert(&self, names: &[String]) -> Result<ServingCert, SignError> {
        let subject = format!("serving certificate {names:?}");
        let fail = |reason: String| SignError {
            subject: subject.clone(),
            reason,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(format!("key generation: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "mesh-ca".into()),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| fail(format!("bad DNS name {n:?}: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        let now = SystemTime::now();
        let not_after = (now + SERVING_CERT_TTL).min(self.ca_not_after);
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let chain = self.sign(params, &key, &subject)?;
        let mut certs = Vec::new();
        for pem in &chain {
            certs.push(
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| fail(format!("re-reading own certificate: {e}")))?,
            );
        }
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| fail(format!("key encoding: {e}")))?;
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der)
            .map_err(|e| fail(format!("key not usable by rustls: {e}")))?;
        Ok(ServingCert {
            key: Arc::new(CertifiedKey::new(certs, signer)),
            not_before: now - BACKDATE,
            not_after,
        })
    }

    fn sign(
        &self,
        params: CertificateParams,
        public_key: &impl PublicKeyData,
        subject: &str,
    ) -> Result<Vec<String>, SignError> {
        // Checked at load too; a CA certificate can expire while loaded, and a
        // certificate that is expired when issued helps nobody.
        if self.ca_not_after <= SystemTime::now() {
            return Err(SignError {
                subject: subject.to_string(),
                reason: format!(
                    "the CA certificate {CA_CERT_FILE} expired at {}",
                    humantime::format_rfc3339_seconds(self.ca_not_after)
                ),
            });
        }
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| SignError {
                subject: subject.to_string(),
                reason: e.to_string(),
            })?;
        let mut out = Vec::with_capacity(self.chain_pem.len() + 1);
        out.push(leaf.pem());
        out.extend(self.chain_pem.iter().cloned());
        Ok(out)
    }
}

/// The CA's serving certificate.
#[derive(Clone)]
pub struct ServingCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl ServingCert {
    /// Half-way through its lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }
}

/// Verifies the CSR's signature and SANs against `identity`; returns its public key.
pub fn check_csr(csr_pem: &str, identity: &str) -> Result<SubjectPublicKeyInfo, CsrError> {
    let fail = |reason: String| CsrError {
        identity: identity.to_string(),
        reason,
    };
    let parsed = pem::parse(csr_pem.trim()).map_err(|e| fail(format!("not PEM: {e}")))?;
    if parsed.tag() != "CERTIFICATE REQUEST" && parsed.tag() != "NEW CERTIFICATE REQUEST" {
        return Err(fail(format!(
            "PEM block is {:?}, not CERTIFICATE REQUEST",
            parsed.tag()
        )));
    }
    let (_, csr) = X509CertificationRequest::from_der(parsed.contents())
        .map_err(|e| fail(format!("cannot parse: {e}")))?;
    csr.verify_signature()
        .map_err(|e| fail(format!("signature does not verify: {e}")))?;
    let mut sans: Vec<String> = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    sans.push(match name {
                        GeneralName::URI(u) => format!("URI:{u}"),
                        GeneralName::DNSName(d) => format!("DNS:{d}"),
                        GeneralName::IPAddress(_) => "IP:<address>".to_string(),
                        GeneralName::RFC822Name(m) => format!("email:{m}"),
                        other => format!("{other:?}"),
                    });
                }
            }
        }
    }
    let want = format!("URI:{identity}");
    if sans != [want.clone()] {
        return Err(fail(format!(
            "SANs {sans:?} must be exactly [{want}] (one URI SAN, the requested identity)"
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            if curve.as_deref() != Some(OID_P256) {
                return Err(fail(format!(
                    "ECDSA curve {curve:?} not accepted; P-256 required"
                )));
            }
        }
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => {}
        Ok(PublicKey::RSA(rsa)) => {
            return Err(fail(format!(
                "RSA key of {} bits; at least 2048 required",
                rsa.key_size()
            )));
        }
        Ok(_) => return Err(fail("key type not accepted (ECDSA P-256 or RSA)".into())),
        Err(e) => return Err(fail(format!("cannot parse public key: {e}"))),
    }
    SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| fail(format!("public key: {e}")))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

/// PEM with `\n` line endings (the `pem` crate defaults to `\r\n`).
fn pem_cert(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn to_system(t: i64) -> SystemTime {
    if t >= 0 {
        UNIX_EPOCH + Duration::from_secs(t as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Test material: a self-signed ECDSA P-256 root written in the chart's layout.
/// Public because integration tests (and the e2e harness) use it.
pub mod testing {
    use super::*;

    /// A root CA: `(cert_pem, key_pem)` (SEC1-free PKCS#8 key).
    pub fn generate_root(common_name: &str) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 keygen");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(365 * 24 * 3600)).into();
        let cert = params.self_signed(&key).expect("self-signed root");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem` as the chart's
    /// generated Secret does (all certificates the root).
    pub fn write_root_dir(dir: &Path, cert_pem: &str, key_pem: &str) {
        for (file, content) in [
            (CA_CERT_FILE, cert_pem),
            (CA_KEY_FILE, key_pem),
            (ROOT_CERT_FILE, cert_pem),
            (CERT_CHAIN_FILE, cert_pem),
        ] {
            std::fs::write(dir.join(file), content).expect("write CA file");
        }
    }
}

#[cfg(test)]
mod tests;
