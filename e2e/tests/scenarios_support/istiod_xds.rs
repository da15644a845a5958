//! Scenario 9 (in-pod run): ztunnel configured as with the chart's
//! `xdsAddress`, learning workloads and policies from istiod over xDS (the
//! double, played by the test) instead of the Kubernetes API. The node agent
//! enrols pods over the CNI chain and ZDS as always; ztunnel adopts each pod
//! once "istiod" sends its workload, carries traffic over HBONE with both
//! identities, and enforces a policy istiod pushes.

use mesh_proto::workload as wl;

use e2e::simcluster::{NODE_AGENT, RedirectMode, SimClusterConfig, ZTUNNEL};

use super::{Ctx, SECOND, client_server};

/// What istiod sends for an enrolled pod.
fn push_workload(ctx: &Ctx<'_>, pod: &str, sa: &str) {
    let xds = ctx.sim.xds().expect("cluster started with istiod_xds");
    let (node, info) = ctx
        .sim
        .pod_info(&ctx.ns, pod)
        .unwrap_or_else(|| ctx.fail(&format!("no pod {pod}")));
    let ip = match info.ip {
        Some(std::net::IpAddr::V4(ip)) => ip.octets().to_vec(),
        Some(std::net::IpAddr::V6(ip)) => ip.octets().to_vec(),
        None => ctx.fail(&format!("{pod} has no IP")),
    };
    xds.set_workload(wl::Workload {
        uid: format!("Kubernetes//v1/Pod/{}/{pod}", ctx.ns),
        name: pod.into(),
        namespace: ctx.ns.clone(),
        addresses: vec![ip],
        service_account: sa.into(),
        trust_domain: "cluster.local".into(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        node,
        workload_name: pod.into(),
        canonical_name: pod.into(),
        cluster_id: "Kubernetes".into(),
        ..Default::default()
    });
}

pub fn s9_istiod_xds(ctx: &Ctx<'_>) {
    let server = client_server(ctx);
    ctx.label_ambient();
    ctx.wait("client and server annotated enabled", 5 * SECOND, || {
        (ctx.annotation("client").as_deref() == Some("enabled")
            && ctx.annotation("server").as_deref() == Some("enabled"))
        .then_some(())
    });
    // istiod's part: the enrolled pods become HBONE workloads.
    push_workload(ctx, "client", "client");
    push_workload(ctx, "server", "server");
    for p in ["client", "server"] {
        ctx.wait_enrolled(p, 5 * SECOND);
    }
    ctx.assert_mtls("client", server, "server", "s9-xds");
    let n1 = ctx.node(1);
    let n2 = ctx.node(2);
    let out = ctx.access_log_line(&n1, "client", "server");
    let inb = ctx.access_log_line(&n2, "client", "server");
    eprintln!("[{}] {n1}: {out}\n[{}] {n2}: {inb}", ctx.ns, ctx.ns);

    // A DENY policy from istiod for the client's identity: the server's ztunnel
    // refuses it (the client sees its connection closed).
    let xds = ctx.sim.xds().expect("xDS double");
    xds.set_authorization(e2e::xds_server::deny_principal(
        &ctx.ns,
        "deny-client",
        &format!("cluster.local/ns/{}/sa/client", ctx.ns),
    ));
    ctx.wait(
        "the pushed DENY policy refuses the client",
        10 * SECOND,
        || {
            ctx.request("client", server, "s9-probe")
                .is_err()
                .then_some(())
        },
    );
    ctx.wait(
        "the refusal in the server-side log, naming the policy",
        5 * SECOND,
        || {
            ctx.sim
                .component_log(ZTUNNEL, &n2)
                .lines()
                .any(|l| l.contains(&ctx.spiffe("client")) && l.contains("deny-client"))
                .then_some(())
        },
    );
    xds.remove_authorization(&format!("{}/deny-client", ctx.ns));
    ctx.wait(
        "allowed again after the policy's removal",
        10 * SECOND,
        || {
            ctx.request("client", server, "s9-after")
                .is_ok()
                .then_some(())
        },
    );
    ctx.assert_mtls("client", server, "server", "s9-after-removal");
}

/// A cluster whose ztunnels learn from the istiod double on demand: what the chart's
/// `xdsAddress` + `xdsOnDemand=true` (with `ambient.dnsCapture=false`) set.
pub fn on_demand_config(tag: &str, mode: RedirectMode) -> SimClusterConfig {
    let mut cfg = SimClusterConfig::new(tag, mode);
    cfg.istiod_xds = true;
    for (w, k, v) in [
        (ZTUNNEL, "XDS_ON_DEMAND", "true"),
        (ZTUNNEL, "ISTIO_META_DNS_CAPTURE", "false"),
        (NODE_AGENT, "AMBIENT_DNS_CAPTURE", "false"),
    ] {
        cfg.env_overrides.push((w.into(), k.into(), v.into()));
    }
    cfg
}

pub fn s10_istiod_on_demand(ctx: &Ctx<'_>) {
    let server = client_server(ctx);
    ctx.label_ambient();
    push_workload(ctx, "client", "client");
    push_workload(ctx, "server", "server");
    for p in ["client", "server"] {
        ctx.wait_enrolled(p, 5 * SECOND);
    }
    let xds = ctx.sim.xds().expect("xDS double");
    let server_ip = ctx
        .sim
        .pod_info(&ctx.ns, "server")
        .and_then(|(_, i)| i.ip)
        .unwrap_or_else(|| ctx.fail("server has no IP"));
    let key = format!("/{server_ip}");
    if xds.demanded().contains(&key) {
        ctx.fail(&format!(
            "{key} asked for before any traffic: {:?}",
            xds.demanded()
        ));
    }
    ctx.assert_mtls("client", server, "server", "s10-on-demand");
    // The client's ztunnel asked for the destination, the server's for its target.
    let asked = xds.demanded().iter().filter(|n| **n == key).count();
    if asked < 2 {
        ctx.fail(&format!(
            "both ztunnels should have asked for {key}: {:?}",
            xds.demanded()
        ));
    }
    // The client's own workload was asked for by its address: the access line names it.
    let n1 = ctx.node(1);
    let line = ctx.access_log_line(&n1, "client", "server");
    eprintln!("[{}] {n1}: {line}", ctx.ns);
    if !line.contains("src.workload=\"client\"") {
        ctx.fail(&format!(
            "the source workload is not in the access line: {line}"
        ));
    }
}
