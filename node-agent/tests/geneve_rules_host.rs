//! The GENEVE node and ztunnel-netns rules applied to this machine's kernel (no GENEVE
//! device needed): iptables batches with both backends, read back line for line, applied
//! twice, displaced hooks repaired, cleaned up to nothing; the ipset batches; the policy
//! rules and routes through rtnetlink (veth devices stand in for the tunnels).
//! The whole GENEVE path runs in `geneve_redirect.rs` (VM).

use std::net::Ipv4Addr;

use node_agent::redirect::geneve::constants::{NODE_INBOUND_LINK, NODE_OUTBOUND_LINK};
use node_agent::redirect::geneve::node_rules::{
    NodeRuleParams, TABLES, node_apply_batches, node_cleanup_batches, node_rules_drift,
};
use node_agent::redirect::geneve::routing::{
    NODE_RULE_PRIORITIES, node_base_routes, node_rules, pod_route,
};
use node_agent::redirect::geneve::ztunnel_rules::{
    ZtunnelRuleParams, ztunnel_apply_batches, ztunnel_cleanup_batches, ztunnel_rules_drift,
};
use node_agent::redirect::geneve::{TableBatch, ipset, render};
use node_agent::redirect::iptables::{self, Backend, Family, Ruleset};
use node_agent::redirect::netlink::Netlink;
use node_agent::redirect::netns::Netns;

fn root() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create network namespaces");
        return false;
    }
    true
}

/// A throw-away anonymous netns (gone when the handle drops).
fn netns() -> Netns {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        Netns::current().unwrap()
    })
    .join()
    .unwrap()
}

fn save(ns: &Netns, backend: Backend) -> Ruleset {
    let text = ns
        .run(move || iptables::save(backend, Family::V4, None).unwrap())
        .unwrap();
    let mut rs = Ruleset::parse(&text);
    rs.tables.retain(|t, _| TABLES.contains(&t.as_str()));
    rs
}

fn apply(ns: &Netns, backend: Backend, batches: Vec<TableBatch>) {
    let text = render(&batches);
    ns.run(move || iptables::restore(backend, Family::V4, &text))
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
}

fn params() -> NodeRuleParams {
    NodeRuleParams {
        ztunnel_veth: "vethzt".into(),
        ztunnel_ip: Ipv4Addr::new(10, 244, 1, 5),
        host_ip: Ipv4Addr::new(10, 244, 1, 1),
        geneve_port: 6081,
        dns_capture: true,
    }
}

fn node_rules_round_trip(backend: Backend) {
    let ns = netns();
    // Something of "kube-proxy" already there, which must stay behind our hooks.
    apply(
        &ns,
        backend,
        vec![{
            let mut b = TableBatch::new("nat");
            b.line(":KUBE-SERVICES - [0:0]");
            b.line("-A PREROUTING -j KUBE-SERVICES");
            b
        }],
    );
    // the ipset must exist before rules can reference it
    ns.run(|| ipset::restore(&ipset::create_line()).unwrap())
        .unwrap();
    let before = save(&ns, backend);
    let p = params();
    apply(&ns, backend, node_apply_batches(&p, &before));
    let once = save(&ns, backend);
    assert!(
        node_rules_drift(&p, &once).is_empty(),
        "{backend}: {:#?}",
        node_rules_drift(&p, &once)
    );
    assert_eq!(
        once.chain("nat", "PREROUTING").unwrap()[..2],
        ["-j ztunnel-PREROUTING", "-j KUBE-SERVICES"]
    );
    // Applying again changes nothing.
    apply(&ns, backend, node_apply_batches(&p, &once));
    assert_eq!(
        save(&ns, backend),
        once,
        "{backend}: second apply changed rules"
    );
    // Someone jumps ahead of us: repaired.
    apply(
        &ns,
        backend,
        vec![{
            let mut b = TableBatch::new("mangle");
            b.line(":OTHER - [0:0]");
            b.line("-I PREROUTING 1 -j OTHER");
            b
        }],
    );
    let displaced = save(&ns, backend);
    assert!(!node_rules_drift(&p, &displaced).is_empty());
    apply(&ns, backend, node_apply_batches(&p, &displaced));
    assert!(node_rules_drift(&p, &save(&ns, backend)).is_empty());
    // Clean-up removes ours and only ours.
    let current = save(&ns, backend);
    apply(&ns, backend, node_cleanup_batches(&current));
    let clean = save(&ns, backend);
    assert_eq!(clean.chains_with_prefix("ztunnel-").count(), 0, "{clean:?}");
    assert_eq!(clean.rules_mentioning("ztunnel-").count(), 0);
    assert!(clean.has_rule("nat", "PREROUTING", "-j KUBE-SERVICES"));
    assert!(clean.has_rule("mangle", "PREROUTING", "-j OTHER"));
    assert!(node_cleanup_batches(&clean).is_empty());
}

#[test]
fn node_rules_nft() {
    if root() {
        node_rules_round_trip(Backend::Nft);
    }
}

#[test]
fn node_rules_legacy() {
    if root() {
        node_rules_round_trip(Backend::Legacy);
    }
}

#[test]
fn ztunnel_netns_rules() {
    if !root() {
        return;
    }
    let ns = netns();
    let p = ZtunnelRuleParams {
        ztunnel_ip: Ipv4Addr::new(10, 244, 1, 5),
        pod_iface: "eth0".into(),
    };
    apply(&ns, Backend::Nft, ztunnel_apply_batches(&p));
    apply(&ns, Backend::Nft, ztunnel_apply_batches(&p));
    let rs = save(&ns, Backend::Nft);
    assert!(
        ztunnel_rules_drift(&p, &rs).is_empty(),
        "{:?}",
        ztunnel_rules_drift(&p, &rs)
    );
    apply(&ns, Backend::Nft, ztunnel_cleanup_batches(&p, &rs));
    let rs = save(&ns, Backend::Nft);
    assert!(
        rs.chain("mangle", "PREROUTING")
            .unwrap_or_default()
            .is_empty()
    );
}

#[test]
fn ipset_entries_follow_the_batches() {
    if !root() {
        return;
    }
    let ns = netns();
    let ip = Ipv4Addr::new(10, 244, 1, 9);
    let listed = ns
        .run(move || {
            assert_eq!(ipset::list().unwrap(), None, "no set in a fresh netns");
            let add = ipset::create_line() + &ipset::add_line(ip, "uid-1").unwrap();
            ipset::restore(&add).unwrap();
            ipset::restore(&add).unwrap(); // idempotent
            let first = ipset::list().unwrap().unwrap();
            // same IP, new pod: the comment follows
            ipset::restore(&ipset::add_line(ip, "uid-2").unwrap()).unwrap();
            let second = ipset::list().unwrap().unwrap();
            ipset::restore(&(ipset::del_line(ip) + &ipset::del_line(ip))).unwrap();
            let third = ipset::list().unwrap().unwrap();
            ipset::restore(&(ipset::destroy_line() + &ipset::destroy_line())).unwrap();
            (first, second, third, ipset::list().unwrap())
        })
        .unwrap();
    assert_eq!(listed.0.get(&ip).map(String::as_str), Some("uid-1"));
    assert_eq!(listed.1.get(&ip).map(String::as_str), Some("uid-2"));
    assert!(listed.2.is_empty());
    assert_eq!(listed.3, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_rules_and_routes() {
    if !root() {
        return;
    }
    let ns = netns();
    let nl = Netlink::connect(&ns).await.unwrap();
    // veth devices in place of the tunnels and the ztunnel veth (no dummy module here).
    ns.run(|| {
        for (name, addr) in [
            (NODE_INBOUND_LINK, "192.168.126.1/30"),
            (NODE_OUTBOUND_LINK, "192.168.127.1/30"),
            ("vethzt", "10.244.1.1/32"),
        ] {
            let peer = format!("{name}-p");
            for args in [
                vec!["link", "add", name, "type", "veth", "peer", "name", &peer],
                vec!["addr", "add", addr, "dev", name],
                vec!["link", "set", name, "up"],
                vec!["link", "set", &peer, "up"],
            ] {
                let out = std::process::Command::new("ip")
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    })
    .unwrap();
    let zt = Ipv4Addr::new(10, 244, 1, 5);
    let host = Ipv4Addr::new(10, 244, 1, 1);
    for r in node_rules() {
        nl.add_rule(&r).await.unwrap();
        nl.add_rule(&r).await.unwrap(); // no duplicate
    }
    let mut have: Vec<_> = nl
        .rules()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| NODE_RULE_PRIORITIES.contains(&r.priority))
        .collect();
    have.sort();
    assert_eq!(have, node_rules());
    let mut want = node_base_routes(zt, "vethzt");
    want.push(pod_route(Ipv4Addr::new(10, 244, 1, 20), host));
    for r in &want {
        nl.replace_route(r).await.unwrap();
        nl.replace_route(r).await.unwrap();
    }
    let mut got = Vec::new();
    for t in [100, 101, 102] {
        got.extend(nl.routes(t).await.unwrap());
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // The kernel's own answer for a pod: through istioin, from $HOST_IP.
    let l = nl
        .route_get(Ipv4Addr::new(10, 244, 1, 20), None)
        .await
        .unwrap();
    assert_eq!(l.dev, NODE_INBOUND_LINK);
    assert_eq!(l.src, Some(host));
    // ...and with the skip mark, the main table (no route there: unreachable).
    assert!(
        nl.route_get(Ipv4Addr::new(10, 244, 1, 20), Some(0x200))
            .await
            .is_err()
    );
    // Clean-up helpers.
    assert_eq!(nl.delete_rules_in(NODE_RULE_PRIORITIES).await.unwrap(), 4);
    for t in [100, 101, 102] {
        nl.flush_table(t).await.unwrap();
        assert_eq!(nl.route_count(t).await.unwrap(), 0);
    }
    assert!(nl.delete_link(NODE_INBOUND_LINK).await.unwrap());
    assert!(!nl.delete_link(NODE_INBOUND_LINK).await.unwrap());
}

/// Other software's policy rules at our priorities (Cilium moves the kernel's
/// `lookup local` rule to 100) are not ours: they do not count as an earlier
/// capture and the clean-up leaves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rules_at_our_priorities_are_left_alone() {
    if !root() {
        return;
    }
    use node_agent::redirect::geneve::node::{has_capture, teardown_node};
    use node_agent::redirect::geneve::routing::is_node_rule;
    use node_agent::redirect::netlink::{Rule, RuleTarget};
    let ns = netns();
    let nl = Netlink::connect(&ns).await.unwrap();
    let foreign = [
        Rule {
            priority: 100,
            fwmark: None,
            target: RuleTarget::Table(255),
        },
        Rule {
            priority: 102,
            fwmark: Some((0x800, 0x800)),
            target: RuleTarget::Table(2004),
        },
    ];
    for r in &foreign {
        assert!(!is_node_rule(r), "{r}");
        nl.add_rule(r).await.unwrap();
    }
    assert!(
        !has_capture(&nl).await.unwrap(),
        "foreign rules are no capture"
    );
    for r in node_rules() {
        nl.add_rule(&r).await.unwrap();
    }
    assert!(has_capture(&nl).await.unwrap());
    teardown_node(&ns, &nl, Backend::Nft, false).await.unwrap();
    let left: Vec<Rule> = nl
        .rules()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| NODE_RULE_PRIORITIES.contains(&r.priority))
        .collect();
    assert_eq!(left, foreign.to_vec(), "only ours removed");
    assert!(!has_capture(&nl).await.unwrap());
}

/// A new pod whose route cannot be added (no `istioin`, e.g. the node is being
/// rebuilt) keeps no ipset entry: no half capture (outbound only) is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_whose_route_fails_leaves_no_ipset_entry() {
    if !root() {
        return;
    }
    use node_agent::redirect::geneve::SysctlRoot;
    use node_agent::redirect::geneve::node::add_pod;
    let ns = netns();
    let nl = Netlink::connect(&ns).await.unwrap();
    let ip = Ipv4Addr::new(10, 244, 1, 20);
    let route = pod_route(ip, Ipv4Addr::new(10, 244, 1, 1)); // through istioin: missing
    let err = add_pod(
        &ns,
        &nl,
        Some(route.clone()),
        ip,
        "uid-1",
        &SysctlRoot::default(),
        true,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("istioin"), "{err}");
    let set = ns
        .run(|| ipset::list().unwrap())
        .unwrap()
        .unwrap_or_default();
    assert!(set.is_empty(), "entry rolled back: {set:?}");
    // A pod that was enrolled already keeps its entry (its capture stays whole
    // until it is removed on purpose).
    add_pod(&ns, &nl, None, ip, "uid-1", &SysctlRoot::default(), false)
        .await
        .unwrap();
    assert!(
        add_pod(
            &ns,
            &nl,
            Some(route),
            ip,
            "uid-1",
            &SysctlRoot::default(),
            false
        )
        .await
        .is_err()
    );
    let set = ns
        .run(|| ipset::list().unwrap())
        .unwrap()
        .unwrap_or_default();
    assert_eq!(set.get(&ip).map(String::as_str), Some("uid-1"));
    ns.run(|| ipset::restore(&ipset::destroy_line()).unwrap())
        .unwrap();
}
