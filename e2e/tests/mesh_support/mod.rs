//! Test-only pieces shared by the mesh end-to-end tests (they use ztunnel's library, a
//! dev-dependency, so they live here rather than in `e2e/src`).
#![allow(dead_code)]

pub mod hbone_client;
pub mod waypoint;

use std::sync::Arc;

use ztunnel::identity::local_ca::LocalCa;

/// The test CA every mesh pod's ztunnel uses (`CA_ROOT_CERT`/`CA_ROOT_KEY`).
pub fn test_ca() -> Arc<LocalCa> {
    Arc::new(
        LocalCa::from_files(
            &e2e::dedicated_mesh::ca_file("ec-root.pem"),
            &e2e::dedicated_mesh::ca_file("ec-root.key"),
        )
        .expect("test CA"),
    )
}
