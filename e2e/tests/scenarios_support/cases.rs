//! The seven scenarios (s1–s7) and the pod layouts they start from.

use super::*;
use hickory_proto::rr::RecordType;

/// Client on node1 (sa `client`), server on node2 (sa `server`); returns
/// the server IP.
pub fn client_server(ctx: &Ctx<'_>) -> IpAddr {
    let server = ctx.run("server", 2, "server", &[]);
    ctx.run("client", 1, "client", &[]);
    server
}

/// [`client_server`] in an ambient namespace: both enrolled; returns the
/// server IP.
pub fn enrolled_client_server(ctx: &Ctx<'_>) -> IpAddr {
    let server = client_server(ctx);
    ctx.label_ambient();
    ctx.wait_enrolled("client", 5 * SECOND);
    ctx.wait_enrolled("server", 5 * SECOND);
    server
}

/// Scenario 1: labelling the namespace with kubectl enrols every pod within
/// 1 s; new cross-node connections are TLS on 15008 only; both ztunnels'
/// access logs name both SPIFFE identities; the client's DNS lookups of a
/// Service are answered by its ztunnel. Returns the server IP.
pub fn s1_label_enrols(ctx: &Ctx<'_>) -> IpAddr {
    let server = client_server(ctx);
    ctx.assert_plaintext("client", server, "server", "s1-before-label");
    assert_eq!(ctx.annotation("client"), None);

    ctx.label_ambient();
    let labelled = Instant::now();
    ctx.wait("client and server annotated enabled", SECOND, || {
        (ctx.annotation("client").as_deref() == Some("enabled")
            && ctx.annotation("server").as_deref() == Some("enabled"))
        .then_some(())
    });
    eprintln!(
        "[{}] label -> all pods annotated in {:?}",
        ctx.ns,
        labelled.elapsed()
    );
    for p in ["client", "server"] {
        ctx.wait_enrolled(p, 5 * SECOND);
    }
    ctx.assert_mtls("client", server, "server", "s1-after-label");
    let n1 = ctx.node(1);
    let n2 = ctx.node(2);
    let out = ctx.access_log_line(&n1, "client", "server");
    let inb = ctx.access_log_line(&n2, "client", "server");
    eprintln!(
        "[{}] {n1} ztunnel: {out}\n[{}] {n2} ztunnel: {inb}",
        ctx.ns, ctx.ns
    );
    // Metrics of the destination ztunnel name the source principal, and both sides'
    // localities (Kubernetes discovery reads the nodes' topology labels).
    let metrics = ctx
        .sim
        .ztunnel_metrics(&n2)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    let want = [
        format!("source_principal=\"{}\"", ctx.spiffe("client")),
        format!("source_zone=\"{}\"", e2e::kubelet::node_zone(&n1)),
        format!("destination_zone=\"{}\"", e2e::kubelet::node_zone(&n2)),
        format!("destination_region=\"{}\"", e2e::kubelet::NODE_REGION),
    ];
    if !metrics.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total") && want.iter().all(|w| l.contains(w))
    }) {
        ctx.fail(&format!(
            "no istio_tcp_connections_opened_total with {want:?} on {n2}"
        ));
    }
    assert_dns_answered_by_ztunnel(ctx);
    server
}

/// The chart captures enrolled pods' DNS by default: a Service applied with kubectl is
/// answered by the client's ztunnel (its short name, for the pod's namespace), with the
/// ClusterIP, authoritative.
fn assert_dns_answered_by_ztunnel(ctx: &Ctx<'_>) {
    const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 201, 7);
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: server\n  namespace: {ns}\nspec:\n  \
         clusterIP: {VIP}\n  selector:\n    app: server\n  ports:\n  - port: 80\n    targetPort: {PORT}\n",
        ns = ctx.ns
    );
    ctx.sim
        .kubectl_apply(&svc)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    let netns = ctx
        .sim
        .pod_netns(&ctx.ns, "client")
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    // Any address: port 53 is captured before routing matters.
    let cluster_dns = SocketAddr::from(([10, 96, 0, 10], 53));
    let start = Instant::now();
    ctx.wait(
        "the Service answered by the client's ztunnel",
        10 * SECOND,
        || {
            let m = e2e::dns_probe::udp_query(&netns, cluster_dns, "server", RecordType::A);
            (m.metadata.authoritative && e2e::dns_probe::a_records(&m) == [VIP]).then_some(())
        },
    );
    eprintln!(
        "[{}] DNS: 'server' answered by ztunnel with {VIP} {:?} after kubectl apply",
        ctx.ns,
        start.elapsed()
    );
}

/// Scenario 2: removing the label restores plaintext, restarts no pod and
/// leaves no redirection state behind.
pub fn s2_unlabel_restores_plaintext(ctx: &Ctx<'_>) {
    let server = s1_label_enrols(ctx);
    unlabel_restores_plaintext(ctx, server);
}

/// The second half of scenario 2, after [`s1_label_enrols`] returned
/// `server`.
pub fn unlabel_restores_plaintext(ctx: &Ctx<'_>, server: IpAddr) {
    let before: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.process(p))
        .collect();
    let netns: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.sim.pod_info(&ctx.ns, p).unwrap().1.netns)
        .collect();

    ctx.unlabel();
    ctx.wait(
        "annotations removed and no redirection left",
        5 * SECOND,
        || {
            ["client", "server"]
                .iter()
                .all(|p| ctx.annotation(p).is_none() && ctx.traces(p).is_empty())
                .then_some(())
        },
    );
    ctx.assert_plaintext("client", server, "server", "s2-after-unlabel");
    let after: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.process(p))
        .collect();
    let netns_after: Vec<_> = ["client", "server"]
        .iter()
        .map(|p| ctx.sim.pod_info(&ctx.ns, p).unwrap().1.netns)
        .collect();
    if before != after || netns != netns_after || after.iter().any(|(_, r)| *r != 0) {
        ctx.fail(&format!(
            "pods restarted: before {before:?} {netns:?}, after {after:?} {netns_after:?}"
        ));
    }
}

/// Scenario 3: a pod labelled `istio.io/dataplane-mode=none` in an ambient
/// namespace (created before and after the label) stays out: never
/// annotated, no redirection, its traffic plaintext; its enrolled
/// neighbour's traffic is mTLS.
pub fn s3_opt_out_pod_stays_out(ctx: &Ctx<'_>) {
    let server = client_server(ctx);
    ctx.run(
        "optout-early",
        1,
        "client",
        &[("istio.io/dataplane-mode", "none")],
    );
    ctx.label_ambient();
    ctx.wait_enrolled("client", 5 * SECOND);
    ctx.wait_enrolled("server", 5 * SECOND);
    ctx.run(
        "optout-late",
        1,
        "client",
        &[("istio.io/dataplane-mode", "none")],
    );
    // Give the agent time to (wrongly) act.
    std::thread::sleep(t(SECOND / 2));
    for p in ["optout-early", "optout-late"] {
        if ctx.annotation(p).is_some() || !ctx.traces(p).is_empty() {
            ctx.fail(&format!(
                "{p} was enrolled: annotation {:?}, state {:?}",
                ctx.annotation(p),
                ctx.traces(p)
            ));
        }
        ctx.assert_plaintext(p, server, "server", &format!("s3-{p}"));
    }
    ctx.assert_mtls("client", server, "server", "s3-enrolled");
}

/// Scenario 4: an AuthorizationPolicy applied with kubectl allows only
/// service account `client-a`: `client-b` is refused, `client-a` works.
pub fn s4_policy_allows_one_account(ctx: &Ctx<'_>) {
    let server = ctx.run("server", 2, "server", &[]);
    ctx.run("client-a", 1, "client-a", &[]);
    ctx.run("client-b", 1, "client-b", &[]);
    ctx.label_ambient();
    for p in ["server", "client-a", "client-b"] {
        ctx.wait_enrolled(p, 5 * SECOND);
    }
    ctx.expect_reply("client-b", server, "server", "s4-before-policy");

    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-client-a\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/{ns}/sa/client-a\"]\n",
        ns = ctx.ns
    );
    let out = ctx
        .sim
        .kubectl_apply(&policy)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    eprintln!("[{}] {}", ctx.ns, out.trim());
    let applied = Instant::now();
    ctx.wait("client-b refused", 10 * SECOND, || {
        ctx.request("client-b", server, "s4-probe")
            .is_err()
            .then_some(())
    });
    eprintln!(
        "[{}] policy enforced {:?} after kubectl apply",
        ctx.ns,
        applied.elapsed()
    );
    for i in 0..3 {
        ctx.assert_mtls("client-a", server, "server", &format!("s4-allowed-{i}"));
        if let Ok(r) = ctx.request("client-b", server, &format!("s4-denied-{i}")) {
            ctx.fail(&format!("client-b got through the policy: {r:?}"));
        }
    }
    // The denial is visible at the destination.
    let n2 = ctx.node(2);
    ctx.wait("denial in the server-side access log", 5 * SECOND, || {
        ctx.sim
            .component_log(ZTUNNEL, &n2)
            .lines()
            .any(|l| l.contains(&ctx.spiffe("client-b")) && l.contains("error"))
            .then_some(())
    });
    ctx.sim
        .kubectl(&[
            "delete",
            "authorizationpolicy",
            "only-client-a",
            "-n",
            &ctx.ns,
        ])
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    ctx.wait("client-b allowed again", 10 * SECOND, || {
        ctx.request("client-b", server, "s4-after-delete").ok()
    });
}

/// Scenario 5: the node agent killed while traffic flows: the established
/// connection keeps working; a pod created while the agent is down is not
/// started unredirected (its sandbox fails closed) and is enrolled once
/// the agent is back.
pub fn s5_agent_restart(ctx: &Ctx<'_>) {
    let server = enrolled_client_server(ctx);
    ctx.wait_mtls("client", server, "server", "s5-before-stream");
    eprintln!(
        "[{}] client -> server is HBONE; starting the stream",
        ctx.ns
    );
    let stream = Stream::start(ctx, "client", server, Duration::from_millis(50));
    let n1 = ctx.node(1);
    ctx.sim
        .kill_component(NODE_AGENT, &n1, Signal::SIGKILL, true)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    let killed_at = Instant::now();
    ctx.wait("node agent down", 5 * SECOND, || {
        let p = ctx
            .sim
            .pod_info(
                e2e::simcluster::SYSTEM_NAMESPACE,
                &e2e::simcluster::component_pod_name(NODE_AGENT, &n1),
            )?
            .1;
        (!p.containers.values().next()?.running).then_some(())
    });
    // A pod created while the agent is down.
    let late = WorkloadSpec::server(&ctx.ns, "late", &n1, "client");
    ctx.sim
        .create_workload(&late)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    let started_unredirected = |p: &e2e::kubelet::PodInfo| {
        if p.containers.values().any(|c| c.pid.is_some()) {
            ctx.fail(&format!(
                "late pod started while the agent was down; CNI ADD said:\n{}\n{p:?}",
                p.cni_log
            ));
        }
    };
    ctx.wait("late pod's sandbox refused", 10 * SECOND, || {
        let (_, p) = ctx.sim.pod_info(&ctx.ns, "late")?;
        started_unredirected(&p);
        (p.sandbox_failures >= 2).then_some(())
    });
    let refused = ctx.sim.pod_info(&ctx.ns, "late").unwrap().1;
    started_unredirected(&refused);
    eprintln!(
        "[{}] late pod refused {} times; last: {}",
        ctx.ns,
        refused.sandbox_failures,
        refused.last_error.as_deref().unwrap_or("-")
    );
    // The stream must keep making progress with the agent down. Progress is
    // awaited (not sampled over a fixed window) so a loaded CI machine that
    // delays one request does not read as a stall; an error always fails.
    let during = stream.ok();
    ctx.wait(
        "the established connection progressing while the agent is down",
        5 * SECOND,
        || {
            if stream.failed.load(Ordering::Relaxed) > 0 {
                ctx.fail("the established connection failed while the agent was down");
            }
            (stream.ok() > during).then_some(())
        },
    );
    ctx.sim
        .release_component(NODE_AGENT, &n1)
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    ctx.wait_pod_ready(
        e2e::simcluster::SYSTEM_NAMESPACE,
        &e2e::simcluster::component_pod_name(NODE_AGENT, &n1),
        30 * SECOND,
    );
    eprintln!("[{}] agent down for {:?}", ctx.ns, killed_at.elapsed());
    ctx.wait_pod_ready(&ctx.ns, "late", 30 * SECOND);
    ctx.wait_enrolled("late", 5 * SECOND);
    if let Some((_, p)) = ctx.sim.pod_info(&ctx.ns, "late") {
        eprintln!("[{}] late pod's CNI ADD: {}", ctx.ns, p.cni_log.trim_end());
    }
    ctx.assert_mtls("late", server, "server", "s5-late-pod");
    let before_end = stream.ok();
    ctx.wait(
        "the established connection progressing after the restart",
        5 * SECOND,
        || (stream.ok() > before_end || stream.failed.load(Ordering::Relaxed) > 0).then_some(()),
    );
    let (ok, errors) = stream.finish();
    if !errors.is_empty() || ok <= before_end {
        ctx.fail(&format!(
            "established connection broke across the agent restart: {ok} ok, errors {errors:?}"
        ));
    }
    eprintln!(
        "[{}] established connection: {ok} requests, no error",
        ctx.ns
    );
}

/// Scenario 6: ztunnel killed (on the client's node, then the server's)
/// and restarted by the kubelet: new connections work within 1 s of its
/// readiness, and nothing leaks in plaintext meanwhile.
pub fn s6_ztunnel_restart(ctx: &Ctx<'_>) {
    let server = enrolled_client_server(ctx);
    ctx.expect_reply("client", server, "server", "s6-before");
    for node in [ctx.node(1), ctx.node(2)] {
        let pod = e2e::simcluster::component_pod_name(ZTUNNEL, &node);
        let restarts = |ctx: &Ctx<'_>| {
            ctx.sim
                .pod_info(e2e::simcluster::SYSTEM_NAMESPACE, &pod)
                .and_then(|(_, p)| {
                    p.containers
                        .values()
                        .next()
                        .map(|c| (c.restarts, c.running))
                })
        };
        let (r0, _) = restarts(ctx).unwrap();
        let marker = format!("s6-{node}");
        let ((ready_to_ok, attempts), cap) = ctx.captured(&format!("zt-restart-{node}"), || {
            ctx.sim
                .kill_component(ZTUNNEL, &node, Signal::SIGKILL, false)
                .unwrap_or_else(|e| ctx.fail(&e.to_string()));
            ctx.wait("ztunnel restarted by the kubelet", 10 * SECOND, || {
                restarts(ctx).filter(|(r, run)| *r > r0 && *run).map(|_| ())
            });
            let ready_at = ctx.wait("restarted ztunnel ready", 30 * SECOND, || {
                ctx.sim.ztunnel_ready(&node).then(Instant::now)
            });
            let mut attempts = 0;
            let ok_at = ctx.wait(
                "a new connection through the restarted ztunnel",
                10 * SECOND,
                || {
                    attempts += 1;
                    ctx.request("client", server, &marker)
                        .ok()
                        .map(|_| Instant::now())
                },
            );
            (ok_at.saturating_duration_since(ready_at), attempts)
        });
        eprintln!(
            "[{}] ztunnel on {node} restarted: new connection {ready_to_ok:?} after readiness ({attempts} attempts)",
            ctx.ns
        );
        if ready_to_ok > t(SECOND) {
            ctx.fail(&format!(
                "new connections took {ready_to_ok:?} after ztunnel {node} was ready"
            ));
        }
        if cap.contains(marker.as_bytes()) {
            ctx.fail(&format!(
                "plaintext {marker:?} on the underlay while ztunnel {node} restarted"
            ));
        }
        ctx.assert_mtls("client", server, "server", &format!("s6-after-{node}"));
    }
}

/// Scenario 7: the primary CNI config rewritten without our entry (as a
/// primary CNI does at reboot): the agent repairs it, and pods created
/// right after the rewrite and right after the repair are enrolled.
pub fn s7_cni_config_rewrite(ctx: &Ctx<'_>) {
    let server = ctx.run("server", 2, "server", &[]);
    ctx.label_ambient();
    ctx.wait_enrolled("server", 5 * SECOND);
    let n1 = ctx.node(1);
    let path = ctx.sim.primary_cni_config_path(&n1);
    let chained = || {
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| {
                v["plugins"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["type"] == "istio-cni"))
            })
    };
    if !chained() {
        ctx.fail(&format!(
            "{} is not chained before the test",
            path.display()
        ));
    }
    let node = ctx.sim.net().node_named(&n1).unwrap();
    let (_, original) = ctx.sim.primary_cni_config(node);
    SimCluster::write_atomically(&path, &serde_json::to_vec_pretty(&original).unwrap())
        .unwrap_or_else(|e| ctx.fail(&format!("rewrite {}: {e}", path.display())));
    let rewritten = Instant::now();
    // Right after the rewrite, before looking at the repair.
    ctx.sim
        .create_workload(&WorkloadSpec::server(
            &ctx.ns,
            "after-rewrite",
            &n1,
            "client",
        ))
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    ctx.wait("config repaired", 10 * SECOND, || chained().then_some(()));
    eprintln!(
        "[{}] primary CNI config repaired {:?} after the rewrite",
        ctx.ns,
        rewritten.elapsed()
    );
    ctx.sim
        .create_workload(&WorkloadSpec::server(
            &ctx.ns,
            "after-repair",
            &n1,
            "client",
        ))
        .unwrap_or_else(|e| ctx.fail(&e.to_string()));
    for p in ["after-rewrite", "after-repair"] {
        ctx.wait_pod_ready(&ctx.ns, p, 30 * SECOND);
        ctx.wait_enrolled(p, 5 * SECOND);
        ctx.assert_mtls(p, server, "server", &format!("s7-{p}"));
    }
}
