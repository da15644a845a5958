//! A workload certificate: private key, chain, parsed identity and validity.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::Identity;

/// Errors building or parsing a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("certificate for {identity}: {reason}")]
    Invalid { identity: String, reason: String },
    #[error("certificate for {identity}: private key not usable: {source}")]
    Key {
        identity: String,
        #[source]
        source: rustls::Error,
    },
}

/// A leaf certificate with its chain and key, ready for rustls.
pub struct WorkloadCertificate {
    identity: Identity,
    certified_key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    chain_pem: Vec<String>,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl WorkloadCertificate {
    /// Builds a certificate from a PKCS#8/SEC1 PEM key and a PEM chain (leaf first).
    ///
    /// The leaf must carry `identity` as a URI SAN.
    pub fn from_pem(
        identity: &Identity,
        key_pem: &str,
        chain_pem: &[String],
    ) -> Result<Self, CertificateError> {
        let invalid = |reason: String| CertificateError::Invalid {
            identity: identity.to_string(),
            reason,
        };
        let mut chain: Vec<CertificateDer<'static>> = Vec::new();
        for pem in chain_pem {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(der.map_err(|e| invalid(format!("bad PEM in chain: {e}")))?);
            }
        }
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("empty certificate chain".to_string()))?;
        let info = LeafInfo::parse(leaf).map_err(invalid)?;
        if !info.uri_sans.iter().any(|u| u == &identity.to_string()) {
            return Err(invalid(format!(
                "leaf URI SANs {:?} do not include the identity",
                info.uri_sans
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid(format!("bad private key PEM: {e}")))?;
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| {
            CertificateError::Key {
                identity: identity.to_string(),
                source: e,
            }
        })?;
        let certified_key = Arc::new(CertifiedKey::new(chain, signer));
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            certified_key,
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
            chain_pem: chain_pem.to_vec(),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Chain and signing key for rustls resolvers.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified_key
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Serial number in hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The chain as received from the provider.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// When this certificate should be renewed: half-way through its lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }
}

/// One certificate as `/config_dump` shows it (upstream's shape, read by `istioctl
/// ztunnel-config certificates`): the PEM text base64-encoded, the serial number in
/// decimal, validity in RFC 3339 (seconds, UTC).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    pub pem: String,
    pub serial_number: String,
    pub valid_from: String,
    pub expiration_time: String,
    /// Issuer = subject: a root (upstream lists roots apart from the chain).
    #[serde(skip)]
    pub self_signed: bool,
}

impl CertDump {
    /// From a DER certificate; `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<CertDump> {
        use base64::Engine;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.encode(der).as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).ok()?);
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        let time = |t: i64| {
            let t = UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        };
        Some(CertDump {
            pem: b64.encode(pem),
            serial_number: cert.tbs_certificate.serial.to_string(),
            valid_from: time(cert.validity().not_before.timestamp()),
            expiration_time: time(cert.validity().not_after.timestamp()),
            self_signed: cert.subject() == cert.issuer(),
        })
    }

    /// Every certificate of a PEM bundle, in order (unparsable ones left out).
    pub fn from_pem_bundle(pem: &str) -> Vec<CertDump> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .filter_map(|c| c.ok())
            .filter_map(|c| CertDump::from_der(c.as_ref()))
            .collect()
    }
}

/// Facts read from a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub uri_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl LeafInfo {
    /// Parses a DER certificate; the error is a human-readable reason.
    pub fn parse(der: &CertificateDer<'_>) -> Result<LeafInfo, String> {
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| format!("cannot parse certificate: {e}"))?;
        let mut uri_sans = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uri_sans.push((*uri).to_string());
                    }
                }
            }
        }
        let to_system = |t: i64| {
            if t >= 0 {
                UNIX_EPOCH + Duration::from_secs(t as u64)
            } else {
                UNIX_EPOCH
            }
        };
        Ok(LeafInfo {
            uri_sans,
            not_before: to_system(cert.validity().not_before.timestamp()),
            not_after: to_system(cert.validity().not_after.timestamp()),
            serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
        })
    }
}

/// The SPIFFE identities among a certificate's URI SANs (non-Istio-shaped URIs are skipped).
pub fn identities_of(der: &CertificateDer<'_>) -> Result<Vec<Identity>, String> {
    let info = LeafInfo::parse(der)?;
    Ok(info
        .uri_sans
        .iter()
        .filter_map(|u| u.parse::<Identity>().ok())
        .collect())
}
