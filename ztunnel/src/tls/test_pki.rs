//! Test PKI for the `tls` unit tests: the checked-in test roots and leaves they sign.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::TrustRoots;
use crate::identity::local_ca::LocalCa;
use crate::identity::manager::generate_csr;
use crate::identity::{Identity, WorkloadCertificate};

/// The test root `testdata/ca/<name>-root.{pem,key}` (`ec`, `rsa`, ...).
pub fn ca(name: &str) -> LocalCa {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/ca");
    LocalCa::from_files(
        &dir.join(format!("{name}-root.pem")),
        &dir.join(format!("{name}-root.key")),
    )
    .unwrap()
}

pub fn roots(ca: &LocalCa) -> TrustRoots {
    TrustRoots::from_der([ca.root_certificate().clone()], "test").unwrap()
}

/// A certificate for `id` from `ca`, valid in `valid`.
pub fn leaf(
    ca: &LocalCa,
    id: &Identity,
    valid: std::ops::Range<SystemTime>,
) -> WorkloadCertificate {
    let (key, csr) = generate_csr(id).unwrap();
    let chain = ca
        .sign_csr_with_validity(&csr, id, valid.start, valid.end)
        .unwrap();
    WorkloadCertificate::from_pem(id, &key, &chain).unwrap()
}

/// From a minute ago to an hour from now.
pub fn now_valid() -> std::ops::Range<SystemTime> {
    let now = SystemTime::now();
    now - Duration::from_secs(60)..now + Duration::from_secs(3600)
}
