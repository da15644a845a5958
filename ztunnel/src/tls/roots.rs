//! The trust bundle: the root certificates a peer's chain must lead to.
//!
//! [`TrustRoots`] is a shared handle: every clone sees a reload, and the verifiers read the
//! current roots at each handshake. [`watch_file`] keeps it equal to a
//! PEM file (`ROOT_CA_PATH`, mounted from the `istio-ca-root-cert` ConfigMap), so a root
//! rotation (old + new roots in the bundle, then the CA signs with the new root, then the old
//! root leaves the bundle) reaches new handshakes without a restart; established connections
//! keep their session.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::TlsError;
use super::crl::RevocationLists;
use crate::file_watch::{self, FileWatcher, WatchError};

/// The certificates a peer's chain must lead to (shared; see the module docs), and the
/// revocation lists its certificates are checked against (`CRL_PATH`, when set).
#[derive(Clone, Debug)]
pub struct TrustRoots {
    current: Arc<RwLock<RootSet>>,
    revocation: Option<RevocationLists>,
}

/// One consistent set: the verifier's store and the certificates it was built from
/// (for `/config_dump`).
#[derive(Clone, Debug)]
struct RootSet {
    store: Arc<RootCertStore>,
    certs: Arc<[CertificateDer<'static>]>,
}

impl TrustRoots {
    fn new(set: RootSet) -> Self {
        TrustRoots {
            current: Arc::new(RwLock::new(set)),
            revocation: None,
        }
    }

    /// These roots with `lists` checked at every handshake (and for established
    /// connections at every reload of the lists). Clones made before do not see them.
    pub fn with_revocation(mut self, lists: RevocationLists) -> Self {
        self.revocation = Some(lists);
        self
    }

    /// The revocation lists, when `CRL_PATH` is set.
    pub fn revocation(&self) -> Option<&RevocationLists> {
        self.revocation.as_ref()
    }

    /// Roots from DER certificates; `source_name` names the origin (file) in errors.
    pub fn from_der(
        certs: impl IntoIterator<Item = CertificateDer<'static>>,
        source_name: &str,
    ) -> Result<Self, TlsError> {
        Ok(Self::new(store_of(certs, source_name)?))
    }

    /// Roots from PEM text (one or more certificates).
    pub fn from_pem(pem: &str, source_name: &str) -> Result<Self, TlsError> {
        Ok(Self::new(parse_pem(pem, source_name)?))
    }

    fn current(&self) -> RootSet {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The roots now (a snapshot: a handshake verifies against one consistent set).
    pub fn store(&self) -> Arc<RootCertStore> {
        self.current().store
    }

    /// The root certificates now (DER).
    pub fn certificates(&self) -> Arc<[CertificateDer<'static>]> {
        self.current().certs
    }

    /// Makes `set` the roots of this handle and all its clones.
    fn set(&self, set: RootSet) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = set;
    }

    pub fn len(&self) -> usize {
        self.store().len()
    }

    pub fn is_empty(&self) -> bool {
        self.store().is_empty()
    }
}

fn store_of(
    certs: impl IntoIterator<Item = CertificateDer<'static>>,
    source_name: &str,
) -> Result<RootSet, TlsError> {
    let certs: Vec<CertificateDer<'static>> = certs.into_iter().collect();
    let mut store = RootCertStore::empty();
    for c in &certs {
        store.add(c.clone()).map_err(|e| TlsError::Roots {
            source_name: source_name.to_string(),
            reason: format!("unusable root certificate: {e}"),
        })?;
    }
    if store.is_empty() {
        return Err(TlsError::Roots {
            source_name: source_name.to_string(),
            reason: "no certificate".to_string(),
        });
    }
    Ok(RootSet {
        store: Arc::new(store),
        certs: certs.into(),
    })
}

fn parse_pem(pem: &str, source_name: &str) -> Result<RootSet, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Roots {
        source_name: source_name.to_string(),
        reason: format!("bad PEM: {e}"),
    })?;
    store_of(certs, source_name)
}

/// Reads the roots once from the PEM file at `path` (its text is returned too);
/// `source_name` names the file in errors (e.g. `CA_ROOT_CERT /etc/ca/root.pem`).
pub fn load_file(path: &Path, source_name: &str) -> Result<(TrustRoots, String), TlsError> {
    let pem = std::fs::read_to_string(path).map_err(|e| TlsError::Roots {
        source_name: source_name.to_string(),
        reason: format!("cannot read: {e}"),
    })?;
    Ok((TrustRoots::from_pem(&pem, source_name)?, pem))
}

/// Loads the roots from the PEM file at `path` and keeps them equal to it: a changed file
/// that parses replaces the roots (logged with the new count); one that does not is logged
/// and the previous roots stay. `source_name` names the file in logs and errors (e.g.
/// `ROOT_CA_PATH /var/run/secrets/istio/root-cert.pem`).
pub fn watch_file(path: &Path, source_name: &str) -> Result<(TrustRoots, FileWatcher), TlsError> {
    let (roots, pem) = load_file(path, source_name)?;
    let shared = roots.clone();
    let name = source_name.to_string();
    let watcher = file_watch::watch(path, pem, move |text| match parse_pem(text, &name) {
        Ok(set) => {
            let count = set.store.len();
            shared.set(set);
            tracing::info!(roots = count, file = %name, "trust roots reloaded; new handshakes use them");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "trust roots file changed but is unusable; keeping the previous roots");
            false
        }
    })
    .map_err(|WatchError { reason, .. }| TlsError::Roots {
        source_name: source_name.to_string(),
        reason: format!("cannot watch: {reason}"),
    })?;
    Ok((roots, watcher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn root_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_reload_reaches_every_clone_and_snapshots_stay_consistent() {
        let roots = TrustRoots::from_pem(&root_pem("a"), "a").unwrap();
        let clone = roots.clone();
        let before = clone.store();
        let two = format!("{}{}", root_pem("b"), root_pem("c"));
        roots.set(parse_pem(&two, "b+c").unwrap());
        assert_eq!(clone.len(), 2);
        assert_eq!(before.len(), 1, "a snapshot taken before is unchanged");
    }

    #[test]
    fn watched_file_reloads_and_keeps_previous_roots_on_a_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root-cert.pem");
        std::fs::write(&path, root_pem("a")).unwrap();
        let (roots, _w) = watch_file(&path, "ROOT_CA_PATH test").unwrap();
        assert_eq!(roots.len(), 1);
        let wait_len = |n: usize| {
            (0..250).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                roots.len() == n
            })
        };
        std::fs::write(&path, format!("{}{}", root_pem("a"), root_pem("b"))).unwrap();
        assert!(wait_len(2), "reload after a change");
        std::fs::write(&path, "not a certificate").unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(roots.len(), 2, "bad edit ignored");
        std::fs::write(&path, root_pem("c")).unwrap();
        assert!(wait_len(1), "reload after the bad edit was fixed");
    }

    #[test]
    fn unreadable_or_empty_bundle_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = watch_file(&missing, "ROOT_CA_PATH /x/missing.pem")
            .err()
            .unwrap();
        assert!(e.to_string().contains("ROOT_CA_PATH /x/missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = watch_file(&empty, "ROOT_CA_PATH empty").err().unwrap();
        assert!(e.to_string().contains("no certificate"), "{e}");
    }
}
