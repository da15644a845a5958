//! Where a build of Istio's own ztunnel is, for the interop tests: the binary (built with
//! `--features testing`, which provides `FAKE_CA`) and its test CA (root certificate and
//! key in `src/tls/` of the checkout it was built from).
//!
//! `ISTIO_ZTUNNEL` (binary) and `ISTIO_ZTUNNEL_SRC` (checkout); defaults:
//! `target/istio-ztunnel/target/release/ztunnel` and `target/istio-ztunnel/build`, where
//! `bench/build-istio-ztunnel.sh` (`make istio-ztunnel`) puts them.
//!
//! Also what running it takes outside a cluster: its test CA instead of istiod
//! ([`FAKE_CA_ENV`]), its token file and CA root ([`write_credentials`]), and workload entries
//! its stricter local-config parser accepts ([`local_workload`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Environment for Istio's ztunnel without istiod: certificates from its built-in test CA,
/// no xDS, sockets marked 0x539 like ours (so the capture rules let its traffic through).
pub const FAKE_CA_ENV: [(&str, &str); 4] = [
    ("FAKE_CA", "true"),
    ("XDS_ADDRESS", ""),
    ("CA_ADDRESS", ""),
    ("PACKET_MARK", "1337"),
];

/// Writes what Istio's CA client reads, relative to its working directory `cwd`: the token
/// at `./var/run/secrets/tokens/istio-token`, and `root-cert.pem` (pass its path as
/// `CA_ROOT_CA`, returned).
pub fn write_credentials(cwd: &Path, token: &str, root_pem: &str) -> PathBuf {
    let tokens = cwd.join("var/run/secrets/tokens");
    std::fs::create_dir_all(&tokens).expect("token directory");
    std::fs::write(tokens.join("istio-token"), token).expect("token file");
    let root = cwd.join("root-cert.pem");
    std::fs::write(&root, root_pem).expect("root certificate file");
    root
}

/// A local-config `workloads` item Istio's parser accepts (it requires `services` and
/// defaults `trustDomain` to empty): HBONE, trust domain `cluster.local`, no services.
pub fn local_workload(
    uid: &str,
    name: &str,
    namespace: &str,
    service_account: &str,
    ip: Ipv4Addr,
    node: &str,
) -> String {
    format!(
        "- uid: {uid}\n  name: {name}\n  namespace: {namespace}\n  serviceAccount: {service_account}\n  \
         trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  \
         node: {node}\n  services: {{}}\n"
    )
}

pub struct IstioZtunnel {
    pub binary: PathBuf,
    /// Istio's test root certificate (PEM): what its `FAKE_CA` issues from.
    pub root_cert: PathBuf,
    /// The key of [`Self::root_cert`].
    pub root_key: PathBuf,
}

/// The build, or why there is none usable (for the skip message).
pub fn find() -> Result<IstioZtunnel, String> {
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/istio-ztunnel");
    let binary = std::env::var_os("ISTIO_ZTUNNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| work.join("target/release/ztunnel"));
    let src = std::env::var_os("ISTIO_ZTUNNEL_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| work.join("build"));
    if !binary.is_file() {
        return Err(format!(
            "no Istio ztunnel at {} (build one with `make istio-ztunnel`, or set ISTIO_ZTUNNEL)",
            binary.display()
        ));
    }
    let found = IstioZtunnel {
        binary,
        root_cert: src.join("src/tls/root-cert.pem"),
        root_key: src.join("src/tls/ca-key.pem"),
    };
    for f in [&found.root_cert, &found.root_key] {
        if !f.is_file() {
            return Err(format!(
                "no {} (ISTIO_ZTUNNEL_SRC must be the istio/ztunnel checkout the binary was built from)",
                f.display()
            ));
        }
    }
    Ok(found)
}

/// [`find`] for a test: the build, or `None` after printing why the test is skipped.
pub fn find_or_skip() -> Option<IstioZtunnel> {
    find().map_err(|why| eprintln!("skipped: {why}")).ok()
}

/// Panics unless Istio's ztunnel log (read by `read_log`) has, within 10 s, an outbound
/// and an inbound access line for a connection from `src` to `dst` (SPIFFE identities)
/// carried over HBONE to `hbone` (`<ip>:15008`). Waits: each side logs when it has
/// closed its half, so the client's line can come after the client saw its echo.
/// Blocking (use `block_in_place` from async tests).
pub fn assert_hbone_both_directions(
    read_log: impl Fn() -> String,
    src: &str,
    dst: &str,
    hbone: &str,
) {
    let has = |log: &str, direction: &str| {
        log.lines().any(|l| {
            l.contains("connection complete")
                && l.contains(&format!("direction=\"{direction}\""))
                && l.contains(src)
                && l.contains(dst)
                && l.contains(hbone)
        })
    };
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = read_log();
        let missing: Vec<&str> = ["outbound", "inbound"]
            .into_iter()
            .filter(|d| !has(&log, d))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "no {missing:?} access line {src} -> {dst} over HBONE to {hbone}:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
