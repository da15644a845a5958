//! The node-in-a-box scenarios of issue 8 in in-pod mode (root): a
//! two-node simulated cluster per scenario with the real node agent,
//! ztunnel, built-in CA and CNI chain, run by kubelet-lite exactly as the
//! chart configures them, driven by real kubectl. The scenarios themselves
//! are in `scenarios_support` (shared with the GENEVE run in the VM).
//!
//! Run one: `cargo test -p e2e --test scenarios s4 -- --nocapture`
//! (needs `cargo build --bins` first; `E2E_RUST_LOG=debug` for component
//! debug logs, `NETSIM_KEEP=1` to keep the scratch directory with logs and
//! captures under /run/netsim).

mod scenarios_support;

use e2e::simcluster::{NODE_AGENT, RedirectMode, SimClusterConfig};
use scenarios_support::{Ctx, start, start_with};

fn run(tag: &str, f: impl FnOnce(&Ctx<'_>)) {
    let sim = start(tag, RedirectMode::Inpod);
    let ctx = Ctx::new(&sim, "demo");
    f(&ctx);
}

#[test]
fn s1_label_enrols_pods_and_traffic_becomes_mtls() {
    require_harness!();
    run("inpods1", |c| {
        scenarios_support::s1_label_enrols(c);
    });
}

#[test]
fn s2_unlabel_restores_plaintext_without_restarts() {
    require_harness!();
    run("inpods2", scenarios_support::s2_unlabel_restores_plaintext);
}

#[test]
fn s3_opted_out_pod_stays_out() {
    require_harness!();
    run("inpods3", scenarios_support::s3_opt_out_pod_stays_out);
}

#[test]
fn s4_authorization_policy_allows_one_service_account() {
    require_harness!();
    run("inpods4", scenarios_support::s4_policy_allows_one_account);
}

#[test]
fn s5_node_agent_restart_keeps_connections_and_enrols_late_pods() {
    require_harness!();
    run("inpods5", scenarios_support::s5_agent_restart);
}

#[test]
fn s6_ztunnel_restart_serves_new_connections_within_1s_of_ready() {
    require_harness!();
    run("inpods6", scenarios_support::s6_ztunnel_restart);
}

#[test]
fn s7_primary_cni_config_rewrite_is_repaired_and_new_pods_enrolled() {
    require_harness!();
    run("inpods7", scenarios_support::s7_cni_config_rewrite);
}

#[test]
fn s8_trust_bundle_update_reaches_ztunnel_without_restart() {
    require_harness!();
    run(
        "inpods8",
        scenarios_support::trust_bundle::s8_trust_bundle_update,
    );
}

#[test]
fn s9_ztunnel_learns_from_istiod_over_xds() {
    require_harness!();
    let mut cfg = SimClusterConfig::new("inpods9", RedirectMode::Inpod);
    cfg.istiod_xds = true;
    let sim = start_with(cfg);
    let ctx = Ctx::new(&sim, "demo");
    scenarios_support::istiod_xds::s9_istiod_xds(&ctx);
}

#[test]
fn s10_ztunnel_asks_istiod_on_demand() {
    require_harness!();
    let sim = start_with(scenarios_support::istiod_xds::on_demand_config(
        "inpods10",
        RedirectMode::Inpod,
    ));
    let ctx = Ctx::new(&sim, "demo");
    scenarios_support::istiod_xds::s10_istiod_on_demand(&ctx);
}

/// Native nftables (`ambient.nativeNftables`, NATIVE_NFTABLES=true): labelling
/// enrols with nft tables in each pod (no iptables rule anywhere) and the
/// probe set on the node, traffic becomes mTLS through ztunnel (scenario 1);
/// unlabelling removes the tables and set elements and restores plaintext
/// without restarts (scenario 2).
#[test]
fn s11_native_nftables_enrol_capture_and_unenrol() {
    require_harness!();
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: the nft binary is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let mut cfg = SimClusterConfig::new("inpods11", RedirectMode::Inpod);
    cfg.env_overrides.push((
        NODE_AGENT.to_string(),
        "NATIVE_NFTABLES".to_string(),
        "true".to_string(),
    ));
    let sim = start_with(cfg);
    let ctx = Ctx::new(&sim, "demo");
    let server = scenarios_support::s1_label_enrols(&ctx);
    for pod in ["client", "server"] {
        let traces = ctx.traces(pod);
        let nft: Vec<_> = traces.iter().filter(|l| l.contains("nft")).collect();
        assert!(
            nft.iter()
                .any(|l| l.contains("table inet istio-ambient-nat"))
                && nft
                    .iter()
                    .any(|l| l.contains("table inet istio-ambient-mangle"))
                && nft.iter().any(|l| l.contains("nft set element")),
            "{pod}: nft tables in the pod and its set element on the node: {traces:?}"
        );
        assert!(
            !traces
                .iter()
                .any(|l| l.contains("iptables") || l.contains("ipset")),
            "{pod}: no iptables rule or ipset entry with native nftables: {traces:?}"
        );
    }
    scenarios_support::unlabel_restores_plaintext(&ctx, server);
}
