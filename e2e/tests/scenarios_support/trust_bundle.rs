//! Scenario 8 (in-pod run): the mesh trust bundle changes while the mesh
//! runs, the way a CA root rotation starts: `kubectl patch` of the
//! `istio-ca-root-cert` ConfigMap; the kubelet's volume sync rewrites
//! ztunnel's `ROOT_CA_PATH`, and every ztunnel reloads its roots without a
//! restart. An unusable bundle is refused and the roots in force stay.

use std::time::Duration;

use e2e::simcluster::{SYSTEM_NAMESPACE, ZTUNNEL, component_pod_name};

use super::{Ctx, SECOND, enrolled_client_server};

/// The chart's trust-bundle ConfigMap (`ROOT_CA_PATH` of ztunnel).
const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
const ROOT_KEY: &str = "root-cert.pem";

fn set_bundle(ctx: &Ctx<'_>, pem: &str) {
    let patch = serde_json::json!({"data": {ROOT_KEY: pem}}).to_string();
    ctx.sim
        .kubectl(&[
            "patch",
            "configmap",
            ROOT_CONFIGMAP,
            "-n",
            SYSTEM_NAMESPACE,
            "--type",
            "merge",
            "-p",
            &patch,
        ])
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
}

/// Waits until every ztunnel has logged `needle` more often than `before`
/// (per node) says.
fn wait_logged(ctx: &Ctx<'_>, what: &str, needle: &str, before: &[usize], max: Duration) {
    ctx.wait(what, max, || {
        (1..=2)
            .all(|i| count(ctx, i, needle) > before[i - 1])
            .then_some(())
    });
}

fn count(ctx: &Ctx<'_>, node: usize, needle: &str) -> usize {
    ctx.sim
        .component_log(ZTUNNEL, &ctx.node(node))
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn counts(ctx: &Ctx<'_>, needle: &str) -> Vec<usize> {
    (1..=2).map(|i| count(ctx, i, needle)).collect()
}

fn restarts(ctx: &Ctx<'_>) -> Vec<u32> {
    (1..=2)
        .map(|i| {
            let pod = component_pod_name(ZTUNNEL, &ctx.node(i));
            ctx.sim
                .pod_info(SYSTEM_NAMESPACE, &pod)
                .and_then(|(_, p)| p.containers.values().next().map(|c| c.restarts))
                .unwrap_or(u32::MAX)
        })
        .collect()
}

pub fn s8_trust_bundle_update(ctx: &Ctx<'_>) {
    let server = enrolled_client_server(ctx);
    ctx.wait_mtls("client", server, "server", "s8-before");
    let restarts_before = restarts(ctx);
    let jsonpath = format!("jsonpath={{.data.{}}}", ROOT_KEY.replace('.', "\\."));
    let current = ctx
        .sim
        .kubectl(&[
            "get",
            "configmap",
            ROOT_CONFIGMAP,
            "-n",
            SYSTEM_NAMESPACE,
            "-o",
            &jsonpath,
        ])
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    if !current.contains("BEGIN CERTIFICATE") {
        ctx.fail(&format!(
            "{ROOT_CONFIGMAP} holds no certificate: {current:?}"
        ));
    }

    // The next root joins the bundle.
    let reloaded = "trust roots reloaded";
    let before = counts(ctx, reloaded);
    let (next_root, _key) = node_agent::ca::authority::testing::generate_root("s8 next root");
    set_bundle(ctx, &format!("{}\n{next_root}", current.trim_end()));
    wait_logged(
        ctx,
        "both ztunnels to load two roots",
        reloaded,
        &before,
        15 * SECOND,
    );
    for i in 1..=2 {
        let log = ctx.sim.component_log(ZTUNNEL, &ctx.node(i));
        if !log
            .lines()
            .any(|l| l.contains(reloaded) && l.contains("roots=2"))
        {
            ctx.fail(&format!(
                "ztunnel on {} did not report two roots",
                ctx.node(i)
            ));
        }
    }
    ctx.assert_mtls("client", server, "server", "s8-two-roots");

    // An unusable bundle is refused; the roots in force stay.
    let refused = "trust roots file changed but is unusable";
    let before = counts(ctx, refused);
    set_bundle(ctx, "not a certificate\n");
    wait_logged(
        ctx,
        "both ztunnels to refuse the bad bundle",
        refused,
        &before,
        15 * SECOND,
    );
    ctx.assert_mtls("client", server, "server", "s8-bad-bundle");

    // Back to the original bundle.
    let before = counts(ctx, reloaded);
    set_bundle(ctx, &current);
    wait_logged(
        ctx,
        "both ztunnels to reload the original",
        reloaded,
        &before,
        15 * SECOND,
    );
    ctx.assert_mtls("client", server, "server", "s8-after");
    if restarts(ctx) != restarts_before {
        ctx.fail(&format!(
            "ztunnel restarted during the bundle updates: {restarts_before:?} -> {:?}",
            restarts(ctx)
        ));
    }
}
