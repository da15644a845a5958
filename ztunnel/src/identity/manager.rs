//! Certificate cache and rotation, one entry per identity.
//!
//! The first [`SecretManager::fetch_certificate`] for an identity starts a background task
//! (on the caller's runtime) that generates an ECDSA P-256 key, sends a CSR to the
//! [`CertificateProvider`], publishes the result and sleeps until half of the certificate's
//! lifetime has passed, then renews. Failures back off exponentially (from about 1 s, doubling,
//! ±20 % jitter so identities that failed together do not retry together, capped at 150 s)
//! while the current certificate stays in use until it expires. TLS configurations are built
//! per handshake from the current certificate, so rotation never touches open connections.
//! At most [`limiter::MAX_IN_FLIGHT`](super::limiter::MAX_IN_FLIGHT) requests are in flight;
//! the rest wait, a connection's first certificate before a prefetch before a renewal, as
//! upstream.
//!
//! Certificates are forgotten (no more renewals, gone from `/config_dump`) when their last
//! owner lets go ([`super::owners`]): in-pod workloads [`SecretManager::hold`] their
//! namespace/service account while they run (replicas share one); in node-wide mode the
//! identities of this node's workloads are claimed as a set on every state change
//! ([`SecretManager::claim_for_node`]). A certificate no owner keeps is also never renewed:
//! one fetched for a connection that raced with the last claim lapses at its refresh time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::certificate::CertDump;
use super::limiter::{Limiter, MAX_IN_FLIGHT, Priority, SharedPriority};
use super::owners::{Account, Owners, account_of};
use super::provider::{CertificateProvider, CertificateRequest};
use super::{Identity, WorkloadCertificate};

const BACKOFF_START: Duration = Duration::from_secs(1);
/// Each retry delay is the backoff times a random factor in `1 ± BACKOFF_JITTER` (upstream's).
const BACKOFF_JITTER: f64 = 0.2;
const BACKOFF_MAX: Duration = Duration::from_secs(150);
/// Never renew more often than this, whatever the certificate says.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// A certificate could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
#[error("certificate for {identity}: {reason}")]
pub struct FetchError {
    pub identity: Identity,
    pub reason: String,
}

#[derive(Clone)]
enum CertState {
    Pending,
    Ready(Arc<WorkloadCertificate>),
    /// No certificate yet and the last attempt failed.
    Failed(FetchError),
}

struct Entry {
    state: watch::Sender<CertState>,
    /// Priority of the first request (raised when a connection waits for a prefetch).
    priority: SharedPriority,
    task: Mutex<Option<AbortHandle>>,
}

/// One certificate per identity, fetched on demand and rotated at half-life.
pub struct SecretManager {
    provider: Arc<dyn CertificateProvider>,
    ttl: Duration,
    entries: Mutex<HashMap<Identity, Arc<Entry>>>,
    /// Bounds concurrent CSRs and orders the waiting ones.
    pub(super) limiter: Arc<Limiter>,
    /// Who keeps which certificate. Lock order: `owners`, then `entries`.
    owners: Mutex<Owners>,
    /// Handed to rotation tasks, which ask before each renewal whether anyone still owns it.
    me: Weak<SecretManager>,
}

/// A workload running as one namespace/service account (see [`SecretManager::hold`]).
/// Dropping the last one of an account forgets its certificates.
pub struct AccountHold {
    manager: Arc<SecretManager>,
    account: Account,
}

impl std::fmt::Debug for AccountHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccountHold({}/{})", self.account.0, self.account.1)
    }
}

impl Drop for AccountHold {
    fn drop(&mut self) {
        self.manager.release(&self.account);
    }
}

/// What `/config_dump` shows for one identity (upstream's `certificates` entries):
/// `state` is `Initializing`, `Available` or `Unavailable: <reason>`; `certChain` the
/// leaf and intermediates (a root the CA sent along is left out), `rootCerts` the trust
/// roots; `refreshAt` (ours) when the certificate will be renewed.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateDump {
    pub identity: String,
    pub state: String,
    pub cert_chain: Vec<CertDump>,
    pub root_certs: Vec<CertDump>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_at: Option<String>,
}

impl SecretManager {
    /// `ttl` is the requested certificate lifetime (`SECRET_TTL`).
    pub fn new(provider: Arc<dyn CertificateProvider>, ttl: Duration) -> Arc<Self> {
        Arc::new_cyclic(|me| SecretManager {
            provider,
            ttl,
            entries: Mutex::new(HashMap::new()),
            limiter: Limiter::new(MAX_IN_FLIGHT),
            owners: Mutex::new(Owners::default()),
            me: me.clone(),
        })
    }

    pub fn provider_name(&self) -> &str {
        self.provider.name()
    }

    /// The current certificate of `identity`, waiting for the first one if needed. Must be
    /// called inside a tokio runtime (the rotation task is spawned there).
    pub async fn fetch_certificate(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, FetchError> {
        let mut rx = self.entry(identity, Priority::RealTime).state.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, CertState::Pending))
            .await
            .map_err(|_| FetchError {
                identity: identity.clone(),
                reason: "certificate request abandoned: the identity was forgotten (no \
                         workload on this node has it) or the manager stopped"
                    .to_string(),
            })?
            .clone();
        match state {
            CertState::Ready(cert) if !cert.is_expired(SystemTime::now()) => Ok(cert),
            CertState::Ready(cert) => Err(FetchError {
                identity: identity.clone(),
                reason: format!(
                    "certificate {} expired at {} and renewal has not succeeded",
                    cert.serial(),
                    humantime::format_rfc3339_seconds(cert.not_after())
                ),
            }),
            CertState::Failed(e) => Err(e),
            CertState::Pending => unreachable!("wait_for returned a pending state"),
        }
    }

    /// The current certificate, if one has been issued (never waits).
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match &*entries.get(identity)?.state.borrow() {
            CertState::Ready(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Starts fetching in the background without waiting (e.g. when a workload is added).
    pub fn prefetch(&self, identity: &Identity) {
        self.entry(identity, Priority::Warmup);
    }

    /// Stops rotating `identity` and drops its certificate (workload removed).
    pub fn forget(&self, identity: &Identity) {
        let removed = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity);
        if let Some(entry) = removed
            && let Some(task) = entry.task.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            task.abort();
        }
    }

    /// Marks a workload running on this ztunnel as `namespace`/`service_account`. Its
    /// certificates (any trust domain) are kept and renewed while at least one hold of the
    /// account is alive; dropping the last one forgets those the node claim does not list.
    /// Replicas share an account, so each running workload holds its own.
    pub fn hold(self: &Arc<Self>, namespace: &str, service_account: &str) -> AccountHold {
        let account = (namespace.to_string(), service_account.to_string());
        self.owners().hold(account.clone());
        AccountHold {
            manager: self.clone(),
            account,
        }
    }

    /// How many running workloads hold `namespace`/`service_account`.
    pub fn holders(&self, namespace: &str, service_account: &str) -> usize {
        self.owners()
            .holders(&(namespace.to_string(), service_account.to_string()))
    }

    fn release(&self, account: &Account) {
        // Held across the forget, so a new hold or claim cannot race with it.
        let mut owners = self.owners();
        if !owners.release(account) {
            return;
        }
        let gone: Vec<Identity> = self
            .identities()
            .into_iter()
            .filter(|id| account_of(id) == *account && !owners.keeps(id))
            .collect();
        for identity in gone {
            self.forget(&identity);
            tracing::info!(
                %identity,
                "no workload on this node uses the identity any more: certificate dropped"
            );
        }
    }

    /// Node-wide mode: `identities` are those of the workloads on this node now (they replace
    /// the previous claim). Forgets every cached certificate no owner keeps any more (neither
    /// claimed nor held by an in-pod workload) and returns those identities, sorted.
    pub fn claim_for_node(&self, identities: HashSet<Identity>) -> Vec<Identity> {
        let mut owners = self.owners();
        owners.claim_for_node(identities);
        let mut gone: Vec<Identity> = self
            .identities()
            .into_iter()
            .filter(|id| owners.orphaned(id))
            .collect();
        gone.sort();
        for identity in &gone {
            self.forget(identity);
            tracing::info!(
                %identity,
                "no workload on this node has the identity any more: certificate dropped"
            );
        }
        gone
    }

    /// Before renewing: forgets `identity` (if `entry` is still its entry) when no owner
    /// keeps it. True when forgotten.
    fn drop_if_orphaned(&self, identity: &Identity, entry: &Arc<Entry>) -> bool {
        let owners = self.owners();
        if !owners.orphaned(identity) {
            return false;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.get(identity).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            entries.remove(identity);
        }
        tracing::info!(
            %identity,
            "certificate not renewed: no workload on this node has the identity any more"
        );
        true
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, Owners> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn identities(&self) -> Vec<Identity> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// State of every identity, sorted by identity; `roots` are the trust roots (DER).
    pub fn dump(&self, roots: &[CertificateDer<'_>]) -> Vec<CertificateDump> {
        let roots: Vec<CertDump> = roots
            .iter()
            .filter_map(|r| CertDump::from_der(r.as_ref()))
            .collect();
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<CertificateDump> = entries
            .iter()
            .map(|(id, entry)| {
                let mut d = CertificateDump {
                    identity: id.to_string(),
                    state: "Initializing".to_string(),
                    cert_chain: Vec::new(),
                    root_certs: Vec::new(),
                    refresh_at: None,
                };
                match &*entry.state.borrow() {
                    CertState::Pending => {}
                    CertState::Failed(e) => d.state = format!("Unavailable: {}", e.reason),
                    CertState::Ready(c) => {
                        d.state = if c.is_expired(SystemTime::now()) {
                            "Unavailable: certificate expired and not renewed yet".to_string()
                        } else {
                            "Available".to_string()
                        };
                        d.cert_chain = c
                            .chain_pem()
                            .iter()
                            .flat_map(|p| CertDump::from_pem_bundle(p))
                            .filter(|c| !c.self_signed)
                            .collect();
                        d.root_certs = roots.clone();
                        d.refresh_at =
                            Some(humantime::format_rfc3339_seconds(c.refresh_at()).to_string());
                    }
                }
                d
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn entry(&self, identity: &Identity, priority: Priority) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(identity) {
            if matches!(*e.state.borrow(), CertState::Pending) {
                e.priority.raise(priority);
            }
            return e.clone();
        }
        let (tx, _) = watch::channel(CertState::Pending);
        let entry = Arc::new(Entry {
            state: tx,
            priority: SharedPriority::new(priority),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(rotate(
            self.me.clone(),
            self.provider.clone(),
            self.limiter.clone(),
            identity.clone(),
            self.ttl,
            entry.clone(),
        ));
        *entry.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        entries.insert(identity.clone(), entry.clone());
        entry
    }
}

impl Drop for SecretManager {
    fn drop(&mut self) {
        let entries = self.entries.get_mut().unwrap_or_else(|e| e.into_inner());
        for entry in entries.values() {
            if let Some(task) = entry.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
    }
}

/// The rotation loop of one identity; ends before a renewal nobody owns.
async fn rotate(
    manager: Weak<SecretManager>,
    provider: Arc<dyn CertificateProvider>,
    limiter: Arc<Limiter>,
    identity: Identity,
    ttl: Duration,
    entry: Arc<Entry>,
) {
    let mut backoff = BACKOFF_START;
    let mut first = true;
    loop {
        let priority = if std::mem::take(&mut first) {
            entry.priority.clone()
        } else {
            match manager.upgrade() {
                Some(m) if !m.drop_if_orphaned(&identity, &entry) => {}
                _ => return,
            }
            SharedPriority::new(Priority::Background)
        };
        let permit = limiter.acquire(priority).await;
        let result = request_certificate(provider.as_ref(), &identity, ttl).await;
        drop(permit);
        match result {
            Ok(cert) => {
                backoff = BACKOFF_START;
                let refresh_at = cert.refresh_at();
                tracing::info!(
                    identity = %identity,
                    serial = cert.serial(),
                    expiration = %humantime::format_rfc3339_seconds(cert.not_after()),
                    refresh_at = %humantime::format_rfc3339_seconds(refresh_at),
                    provider = provider.name(),
                    "certificate issued"
                );
                entry.state.send_replace(CertState::Ready(cert));
                let wait = refresh_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .max(MIN_REFRESH);
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let delay = backoff
                    .mul_f64(rand::random_range(
                        1.0 - BACKOFF_JITTER..=1.0 + BACKOFF_JITTER,
                    ))
                    .min(BACKOFF_MAX);
                tracing::warn!(identity = %identity, error = %e, retry_in = ?delay, "certificate request failed");
                // A certificate once issued stays the state, expired or not: fetches then
                // say it expired and `/config_dump` still shows it (the CA error is in
                // the log line above). Only without one is the failure the state.
                let has_cert = matches!(&*entry.state.borrow(), CertState::Ready(_));
                if !has_cert {
                    entry.state.send_replace(CertState::Failed(e));
                }
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Generates a key and CSR for `identity` and asks the provider to sign it.
pub async fn request_certificate(
    provider: &dyn CertificateProvider,
    identity: &Identity,
    ttl: Duration,
) -> Result<Arc<WorkloadCertificate>, FetchError> {
    let fail = |reason: String| FetchError {
        identity: identity.clone(),
        reason,
    };
    let (key_pem, csr_pem) = generate_csr(identity).map_err(fail)?;
    let chain = provider
        .sign(CertificateRequest {
            identity: identity.clone(),
            csr_pem,
            ttl,
        })
        .await
        .map_err(|e| fail(e.to_string()))?;
    let cert = WorkloadCertificate::from_pem(identity, &key_pem, &chain)
        .map_err(|e| fail(e.to_string()))?;
    if cert.is_expired(SystemTime::now()) {
        return Err(fail(format!(
            "{} returned certificate {} that expired at {}",
            provider.name(),
            cert.serial(),
            humantime::format_rfc3339_seconds(cert.not_after())
        )));
    }
    Ok(Arc::new(cert))
}

/// A fresh ECDSA P-256 key (PKCS#8 PEM) and a CSR (PEM) whose only SAN is the identity URI.
pub fn generate_csr(identity: &Identity) -> Result<(String, String), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("key generation failed: {e}"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e| format!("identity is not a valid URI SAN: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("CSR encoding failed: {e}"))?;
    Ok((key.serialize_pem(), csr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::local_ca::LocalCa;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn local_ca(root: &str) -> Arc<LocalCa> {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/ca");
        Arc::new(
            LocalCa::from_files(
                &dir.join(format!("{root}-root.pem")),
                &dir.join(format!("{root}-root.key")),
            )
            .unwrap(),
        )
    }

    /// The issued workload certificate: ECDSA P-256 key, the SPIFFE URI as its only SAN,
    /// valid for `SECRET_TTL` (plus the CA's one-minute back-dating), renewed at half-life;
    /// the same for a CA with an RSA root.
    #[tokio::test]
    async fn issues_p256_spiffe_certificates_for_secret_ttl_renewed_at_half_life() {
        const P256: &str = "1.2.840.10045.3.1.7";
        const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
        let ttl = Duration::from_secs(5400);
        for root in ["ec", "rsa"] {
            let certs = SecretManager::new(local_ca(root), ttl);
            let id = Identity::new("cluster.local", "ns1", "sa1");
            let cert = certs.fetch_certificate(&id).await.unwrap();
            assert_eq!(cert.identity(), &id);
            let pem = &cert.chain_pem()[0];
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            let (_, x509) = X509Certificate::from_der(der.as_ref()).unwrap();
            let spki = &x509.tbs_certificate.subject_pki;
            assert_eq!(
                spki.algorithm.algorithm.to_id_string(),
                EC_PUBLIC_KEY,
                "{root}"
            );
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            assert_eq!(curve.as_deref(), Some(P256), "{root}");
            let info = super::super::certificate::LeafInfo::parse(&der).unwrap();
            assert_eq!(info.uri_sans, [id.to_string()], "{root}");
            assert_eq!(x509.subject().iter().count(), 0, "empty subject ({root})");
            let life = cert.not_after().duration_since(cert.not_before()).unwrap();
            assert!(
                life >= ttl && life <= ttl + Duration::from_secs(120),
                "{root}: lifetime {life:?} for SECRET_TTL {ttl:?}"
            );
            assert!(
                cert.not_after()
                    .duration_since(SystemTime::now())
                    .unwrap()
                    .abs_diff(ttl)
                    < Duration::from_secs(60),
                "{root}: expires SECRET_TTL from now"
            );
            assert_eq!(cert.refresh_at(), cert.not_before() + life / 2, "{root}");
            // Cached: the same certificate until renewal.
            let again = certs.fetch_certificate(&id).await.unwrap();
            assert_eq!(again.serial(), cert.serial());
            let dump = certs.dump(&[]);
            assert_eq!(dump.len(), 1);
            assert_eq!(dump[0].identity, id.to_string());
            assert_eq!(dump[0].state, "Available");
            assert!(dump[0].refresh_at.is_some());
            // The leaf first, in upstream's shape: decimal serial, RFC 3339 validity,
            // the PEM base64-encoded.
            let leaf = &dump[0].cert_chain[0];
            let serial =
                x509_parser::num_bigint::BigUint::parse_bytes(cert.serial().as_bytes(), 16)
                    .unwrap()
                    .to_string();
            assert_eq!(leaf.serial_number, serial, "{root}");
            assert_eq!(
                leaf.expiration_time,
                humantime::format_rfc3339_seconds(cert.not_after()).to_string()
            );
            assert_eq!(
                leaf.valid_from,
                humantime::format_rfc3339_seconds(cert.not_before()).to_string()
            );
            use base64::Engine;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(&leaf.pem)
                .unwrap();
            assert!(pem.starts_with(b"-----BEGIN CERTIFICATE-----\n"));
            assert_eq!(
                CertDump::from_pem_bundle(std::str::from_utf8(&pem).unwrap())[0],
                *leaf
            );
        }
    }

    /// A provider that counts what it signs, per identity.
    struct Counting {
        ca: Arc<LocalCa>,
        signed: Mutex<HashMap<Identity, usize>>,
    }

    impl Counting {
        fn count(&self, id: &Identity) -> usize {
            self.signed.lock().unwrap().get(id).copied().unwrap_or(0)
        }
    }

    impl CertificateProvider for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn sign(&self, request: CertificateRequest) -> super::super::provider::SignFuture<'_> {
            *self
                .signed
                .lock()
                .unwrap()
                .entry(request.identity.clone())
                .or_insert(0) += 1;
            self.ca.sign(request)
        }
    }

    /// Replicas share an account: the certificate is renewed while one still holds it, and
    /// forgotten (no renewal, not in the dump) once the last one is gone; other accounts
    /// are untouched.
    #[tokio::test]
    async fn last_holder_gone_forgets_the_identity() {
        let provider = Arc::new(Counting {
            ca: local_ca("ec"),
            signed: Mutex::new(HashMap::new()),
        });
        // Shorter than the CA's back-dating: renewed every MIN_REFRESH.
        let certs = SecretManager::new(provider.clone(), Duration::from_secs(2));
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let other = Identity::new("cluster.local", "ns1", "sa2");
        let replica_1 = certs.hold("ns1", "sa1");
        let replica_2 = certs.hold("ns1", "sa1");
        let _other = certs.hold("ns1", "sa2");
        assert_eq!(certs.holders("ns1", "sa1"), 2);
        certs.fetch_certificate(&id).await.unwrap();
        certs.fetch_certificate(&other).await.unwrap();
        let listed = |certs: &SecretManager, id: &Identity| {
            certs.dump(&[]).iter().any(|d| d.identity == id.to_string())
        };
        let wait = MIN_REFRESH + Duration::from_millis(700);

        drop(replica_1);
        let before = provider.count(&id);
        tokio::time::sleep(wait).await;
        assert!(
            provider.count(&id) > before,
            "still renewed for the replica"
        );
        assert!(listed(&certs, &id));

        drop(replica_2);
        assert_eq!(certs.holders("ns1", "sa1"), 0);
        assert!(!listed(&certs, &id), "forgotten at once");
        assert!(certs.current(&id).is_none());
        let after = provider.count(&id);
        let other_before = provider.count(&other);
        tokio::time::sleep(wait).await;
        assert_eq!(
            provider.count(&id),
            after,
            "no CSR after the last holder left"
        );
        assert!(!listed(&certs, &id));
        assert!(
            provider.count(&other) > other_before,
            "other account renewed"
        );
        assert!(listed(&certs, &other));
    }

    /// Node-wide claims and in-pod holds compose: a certificate goes when neither keeps it.
    /// An empty claim forgets the unclaimed identity at once (no more CSRs, not in the dump)
    /// but not the held one; dropping the last hold keeps an identity the node claims.
    #[tokio::test]
    async fn node_claim_and_holds_compose() {
        let provider = Arc::new(Counting {
            ca: local_ca("ec"),
            signed: Mutex::new(HashMap::new()),
        });
        let certs = SecretManager::new(provider.clone(), Duration::from_secs(2));
        let node_only = Identity::new("cluster.local", "ns1", "node-only");
        let held = Identity::new("cluster.local", "ns1", "held");
        let both = Identity::new("cluster.local", "ns1", "both");
        let hold = certs.hold("ns1", "held");
        let hold_both = certs.hold("ns1", "both");
        for id in [&node_only, &held, &both] {
            certs.fetch_certificate(id).await.unwrap();
        }
        let listed = |id: &Identity| certs.dump(&[]).iter().any(|d| d.identity == id.to_string());

        let gone = certs.claim_for_node(HashSet::from([node_only.clone(), both.clone()]));
        assert!(gone.is_empty(), "{gone:?}");
        drop(hold_both);
        assert!(listed(&both), "the node still claims it");

        let gone = certs.claim_for_node(HashSet::new());
        assert_eq!(gone, [both.clone(), node_only.clone()]);
        assert!(!listed(&node_only) && !listed(&both));
        assert!(listed(&held), "held by an in-pod workload");
        let counts = |ids: &[&Identity]| ids.iter().map(|i| provider.count(i)).collect::<Vec<_>>();
        let before = counts(&[&node_only, &both, &held]);
        tokio::time::sleep(MIN_REFRESH + Duration::from_millis(700)).await;
        let after = counts(&[&node_only, &both, &held]);
        assert_eq!(after[..2], before[..2], "no CSR for forgotten identities");
        assert!(after[2] > before[2], "the held identity is renewed");

        drop(hold);
        assert!(!listed(&held), "last owner gone");
    }

    /// A certificate fetched after the last claim that does not list it (a connection that
    /// raced with the state change) is not renewed: it is dropped at its refresh time.
    #[tokio::test]
    async fn unowned_certificate_lapses_at_refresh() {
        let provider = Arc::new(Counting {
            ca: local_ca("ec"),
            signed: Mutex::new(HashMap::new()),
        });
        let certs = SecretManager::new(provider.clone(), Duration::from_secs(2));
        let claimed = Identity::new("cluster.local", "ns1", "claimed");
        let straggler = Identity::new("cluster.local", "ns1", "gone");
        certs.claim_for_node(HashSet::from([claimed.clone()]));
        certs.fetch_certificate(&claimed).await.unwrap();
        certs.fetch_certificate(&straggler).await.unwrap();
        assert_eq!(provider.count(&straggler), 1);
        tokio::time::sleep(MIN_REFRESH + Duration::from_millis(700)).await;
        assert!(certs.current(&straggler).is_none());
        assert!(
            !certs
                .dump(&[])
                .iter()
                .any(|d| d.identity == straggler.to_string())
        );
        assert_eq!(provider.count(&straggler), 1, "never renewed");
        assert!(provider.count(&claimed) > 1, "the claimed one is");
    }
}
