//! Certificate revocation lists (`CRL_PATH`), as upstream's ztunnel.
//!
//! With a CRL file configured, a peer certificate (leaf or intermediate) that a list names
//! as revoked is refused at the handshake, in both directions, and an established HBONE
//! connection whose peer chain a reloaded list revokes is torn down (a security event:
//! logged at WARN naming the peer, counted in `istio_crl_policy_rejections_total`).
//!
//! - The file holds zero or more PEM `X509 CRL` blocks (Istio's plugged-in CA publishes
//!   `ca-crl.pem`), or one DER list; an empty file or PEM without CRL blocks revokes
//!   nothing.
//! - It is followed while running ([`RevocationLists::watch_file`]): a change that parses
//!   replaces the lists; one that does not is logged and the previous lists stay. A file
//!   that does not exist yet (mounted later) starts as "no revocations" with a warning.
//! - Certificates whose issuer publishes no list pass (webpki's `UnknownStatusPolicy::Allow`),
//!   and a list past its `nextUpdate` still counts (`ExpirationPolicy::Ignore`), as upstream.
//! - An established connection is checked again against each new set at the time it was
//!   established, so its certificate expiring later never reads as a revocation.

use std::path::Path;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use tokio::sync::watch;
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::file_watch::{self, FileWatcher};

#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("revocation lists {path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("revocation lists {path}: {reason}")]
    Parse { path: String, reason: String },
}

/// One parsed set of lists (possibly empty).
#[derive(Debug, Default)]
pub struct CrlSet {
    lists: Vec<CertRevocationList<'static>>,
}

impl CrlSet {
    /// Parses a CRL file: PEM (zero or more `X509 CRL` blocks, other blocks ignored) or
    /// one DER list; empty = no lists. `path` names the file in errors.
    pub fn from_bytes(data: &[u8], path: &str) -> Result<Self, CrlError> {
        if data.trim_ascii().is_empty() {
            return Ok(CrlSet::default());
        }
        match std::str::from_utf8(data) {
            Ok(text) if text.contains("-----BEGIN") => Self::from_pem(text, path),
            _ => {
                let owned =
                    OwnedCertRevocationList::from_der(data).map_err(|e| CrlError::Parse {
                        path: path.to_string(),
                        reason: format!("neither PEM nor a DER CRL: {e}"),
                    })?;
                Ok(CrlSet {
                    lists: vec![CertRevocationList::Owned(owned)],
                })
            }
        }
    }

    /// Parses PEM text holding zero or more `X509 CRL` blocks (other blocks are ignored);
    /// `path` names the file in errors.
    pub fn from_pem(text: &str, path: &str) -> Result<Self, CrlError> {
        let bad = |reason: String| CrlError::Parse {
            path: path.to_string(),
            reason,
        };
        if !text.trim().is_empty() && !text.contains("-----BEGIN") {
            return Err(bad("not PEM (expected X509 CRL blocks)".into()));
        }
        let mut lists = Vec::new();
        for (n, der) in CertificateRevocationListDer::pem_slice_iter(text.as_bytes()).enumerate() {
            let der = der.map_err(|e| bad(format!("bad PEM: {e}")))?;
            let owned = OwnedCertRevocationList::from_der(der.as_ref())
                .map_err(|e| bad(format!("CRL {}: not a valid CRL: {e}", n + 1)))?;
            lists.push(CertRevocationList::Owned(owned));
        }
        Ok(CrlSet { lists })
    }

    pub fn len(&self) -> usize {
        self.lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// Verifies `end_entity` (with `intermediates`) to `roots` at `now` for `usage`, checking
    /// every certificate of the path against these lists. `Err(CertRevoked)` means revoked;
    /// an empty set checks nothing (Ok).
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        roots: &RootCertStore,
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<(), webpki::Error> {
        let refs: Vec<&CertRevocationList<'_>> = self.lists.iter().collect();
        let Ok(options) = RevocationOptionsBuilder::new(&refs) else {
            return Ok(()); // no lists
        };
        let options = options
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Ignore)
            .build();
        let algs = super::crypto_provider()
            .signature_verification_algorithms
            .all;
        EndEntityCert::try_from(end_entity)?
            .verify_for_usage(
                algs,
                &roots.roots,
                intermediates,
                now,
                usage,
                Some(options),
                None,
            )
            .map(|_| ())
    }
}

/// The current lists, shared: every clone sees a reload, and established connections
/// subscribe to reloads ([`Self::watch_connection`]).
#[derive(Clone, Debug)]
pub struct RevocationLists {
    current: Arc<watch::Sender<Arc<CrlSet>>>,
}

impl RevocationLists {
    pub fn new(set: CrlSet) -> Self {
        RevocationLists {
            current: Arc::new(watch::Sender::new(Arc::new(set))),
        }
    }

    /// The lists now.
    pub fn current(&self) -> Arc<CrlSet> {
        self.current.borrow().clone()
    }

    /// Makes `set` current for every clone and re-checks established connections.
    pub fn replace(&self, set: CrlSet) {
        self.current.send_replace(Arc::new(set));
    }

    /// Reads the lists once. A missing file is no revocations (warned: it may be mounted
    /// later); an unreadable or malformed one is an error naming it. Returns the text too.
    pub fn load_file(path: &Path) -> Result<(Self, Vec<u8>), CrlError> {
        let name = path.display().to_string();
        let data = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %name, "CRL_PATH file does not exist (yet): no certificate is revoked until it appears");
                Vec::new()
            }
            Err(source) => return Err(CrlError::Read { path: name, source }),
        };
        let set = CrlSet::from_bytes(&data, &name)?;
        tracing::info!(path = %name, lists = set.len(), "certificate revocation lists loaded");
        Ok((Self::new(set), data))
    }

    /// [`Self::load_file`], then follows the file while the returned watcher lives.
    pub fn watch_file(path: &Path) -> Result<(Self, FileWatcher), CrlError> {
        let (lists, data) = Self::load_file(path)?;
        let shared = lists.clone();
        let name = path.display().to_string();
        let watcher = file_watch::watch_bytes(path, data, move |data| {
            match CrlSet::from_bytes(data, &name) {
                Ok(set) => {
                    tracing::info!(path = %name, lists = set.len(), "certificate revocation lists reloaded; established connections are checked again");
                    shared.replace(set);
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "revocation lists changed but are unusable; keeping the previous lists");
                    false
                }
            }
        })
        .map_err(|e| CrlError::Parse {
            path: path.display().to_string(),
            reason: e.reason,
        })?;
        Ok((lists, watcher))
    }

    /// A watch over one established connection: its peer's chain (`peer_certs`, leaf first)
    /// as verified against `roots` for `usage`. `peer` names the peer in the log line,
    /// `rejections` counts a revocation. None without a peer chain.
    pub fn watch_connection(
        &self,
        peer_certs: Option<&[CertificateDer<'_>]>,
        roots: Arc<RootCertStore>,
        usage: KeyUsage,
        peer: String,
        rejections: Counter,
    ) -> Option<RevocationWatch> {
        let chain: Vec<CertificateDer<'static>> =
            peer_certs?.iter().map(|c| c.clone().into_owned()).collect();
        if chain.is_empty() {
            return None;
        }
        let mut rx = self.current.subscribe();
        rx.mark_unchanged();
        Some(RevocationWatch {
            chain,
            roots,
            usage,
            established: UnixTime::now(),
            rx,
            peer,
            rejections,
        })
    }
}

/// One established connection's peer chain, checked again at every reload of the lists.
pub struct RevocationWatch {
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    usage: KeyUsage,
    established: UnixTime,
    rx: watch::Receiver<Arc<CrlSet>>,
    peer: String,
    rejections: Counter,
}

impl RevocationWatch {
    /// Resolves when a reloaded set revokes a certificate of the peer's chain (after
    /// logging it and counting it); never otherwise.
    pub async fn revoked(mut self) {
        loop {
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            let set = self.rx.borrow_and_update().clone();
            let (leaf, intermediates) = self.chain.split_first().expect("non-empty chain");
            let r = set.check(
                leaf,
                intermediates,
                &self.roots,
                self.established,
                self.usage,
            );
            if matches!(r, Err(webpki::Error::CertRevoked)) {
                self.rejections.inc();
                tracing::warn!(peer = %self.peer, "closing HBONE connection: the peer's certificate was revoked (CRL_PATH)");
                return;
            }
        }
    }
}

/// Whether a failed handshake's error is our verifier finding the peer's certificate
/// revoked.
pub fn is_revoked(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            )
        })
}

/// Resolves when `watch` (if any) reports its connection's peer revoked.
pub async fn until_revoked(watch: Option<RevocationWatch>) {
    match watch {
        Some(w) => w.revoked().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::identity::local_ca::LocalCa;
    use crate::tls::test_pki::{ca, leaf, now_valid};
    use std::time::Duration;

    /// A leaf for `id` from `ca`: its DER and its serial (hex).
    fn leaf_chain(ca: &LocalCa, id: &Identity) -> (CertificateDer<'static>, String) {
        let cert = leaf(ca, id, now_valid());
        (
            cert.certified_key().cert[0].clone(),
            cert.serial().to_string(),
        )
    }

    fn store(ca: &LocalCa) -> RootCertStore {
        let mut s = RootCertStore::empty();
        s.add(ca.root_certificate().clone()).unwrap();
        s
    }

    #[test]
    fn empty_text_and_pem_without_crls_revoke_nothing() {
        assert!(CrlSet::from_pem("", "f").unwrap().is_empty());
        let root = ca("ec");
        assert!(CrlSet::from_pem(root.root_pem(), "f").unwrap().is_empty());
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let e = CrlSet::from_pem("hello", "/etc/crl.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/crl.pem") && e.contains("not PEM"), "{e}");
        let e = CrlSet::from_pem(
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
            "/etc/crl.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/etc/crl.pem") && e.contains("CRL 1"), "{e}");
    }

    #[test]
    fn a_listed_serial_is_revoked_and_others_pass() {
        let root = ca("ec");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let (a_der, a_serial) = leaf_chain(&root, &a);
        let (b_der, _) = leaf_chain(&root, &b);
        let pem = root.revocation_list_pem(&[&a_serial]).unwrap();
        let set = CrlSet::from_pem(&pem, "f").unwrap();
        assert_eq!(set.len(), 1);
        let roots = store(&root);
        let now = UnixTime::now();
        assert_eq!(
            set.check(&a_der, &[], &roots, now, KeyUsage::client_auth()),
            Err(webpki::Error::CertRevoked)
        );
        assert_eq!(
            set.check(&b_der, &[], &roots, now, KeyUsage::client_auth()),
            Ok(())
        );
        // Two lists in one file (one from another CA): both load, the result is the same.
        let other = ca("rsa");
        let both = format!("{pem}{}", other.revocation_list_pem(&[]).unwrap());
        let set = CrlSet::from_pem(&both, "f").unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(
            set.check(&a_der, &[], &roots, now, KeyUsage::client_auth()),
            Err(webpki::Error::CertRevoked)
        );
        assert_eq!(
            CrlSet::default().check(&a_der, &[], &roots, now, KeyUsage::client_auth()),
            Ok(())
        );
    }

    /// One DER list (upstream reads those too), and garbage that is neither.
    #[test]
    fn a_der_list_loads_and_garbage_is_refused() {
        let root = ca("ec");
        let (a_der, a_serial) = leaf_chain(&root, &Identity::new("cluster.local", "ns", "a"));
        let pem = root.revocation_list_pem(&[&a_serial]).unwrap();
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        let set = CrlSet::from_bytes(der.as_ref(), "f").unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(
            set.check(
                &a_der,
                &[],
                &store(&root),
                UnixTime::now(),
                KeyUsage::client_auth()
            ),
            Err(webpki::Error::CertRevoked)
        );
        assert_eq!(CrlSet::from_bytes(pem.as_bytes(), "f").unwrap().len(), 1);
        assert!(CrlSet::from_bytes(b" \n", "f").unwrap().is_empty());
        let e = CrlSet::from_bytes(&[0x30, 0x03, 0x01, 0x02], "/etc/crl.der")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/crl.der") && e.contains("neither PEM nor a DER CRL"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_established_connection_is_told_only_when_its_peer_is_revoked() {
        let root = ca("ec");
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let (a_der, a_serial) = leaf_chain(&root, &a);
        let (_, b_serial) = leaf_chain(&root, &b);
        let lists = RevocationLists::new(CrlSet::default());
        let counter = Counter::default();
        let w = lists
            .watch_connection(
                Some(std::slice::from_ref(&a_der)),
                Arc::new(store(&root)),
                KeyUsage::client_auth(),
                a.to_string(),
                counter.clone(),
            )
            .unwrap();
        let task = tokio::spawn(w.revoked());
        // A reload that revokes someone else: the connection stays.
        lists.replace(
            CrlSet::from_pem(&root.revocation_list_pem(&[&b_serial]).unwrap(), "f").unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        assert_eq!(counter.get(), 0);
        // One that revokes its peer: told, counted.
        lists.replace(
            CrlSet::from_pem(&root.revocation_list_pem(&[&a_serial]).unwrap(), "f").unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(counter.get(), 1);
    }

    #[test]
    fn watched_file_reloads_and_keeps_previous_lists_on_a_bad_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca-crl.pem");
        // Missing at start: no revocations.
        let (lists, _w) = RevocationLists::watch_file(&path).unwrap();
        assert!(lists.current().is_empty());
        let root = ca("ec");
        let pem = root.revocation_list_pem(&["0102"]).unwrap();
        std::fs::write(&path, &pem).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lists.current().is_empty() {
            assert!(std::time::Instant::now() < deadline, "reload not seen");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(&path, "garbage").unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            lists.current().len(),
            1,
            "a bad edit keeps the previous lists"
        );
        // Malformed at start: an error naming the file.
        let e = RevocationLists::load_file(&path).unwrap_err().to_string();
        assert!(e.contains("ca-crl.pem"), "{e}");
    }
}
