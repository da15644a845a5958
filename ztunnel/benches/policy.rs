//! Policy evaluation benchmark: 10,000 policies over 1,000 namespaces.
//!
//! `cargo bench -p ztunnel --bench policy`. A plain timing loop (no
//! criterion, to keep compile cost low): each scenario runs for a fixed
//! number of iterations, five times; the median ns/evaluation is printed.
//! A counting allocator checks that evaluation allocates nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ztunnel::policy::matching::{Peer, policy_matches};
use ztunnel::policy::model::{
    Action, Authorization, IpBlock, Match, Scope, ServiceAccountMatch, StringMatch,
};
use ztunnel::policy::{Decision, PeerIdentity, PolicySet, Request};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NAMESPACES: usize = 1_000;
const GLOBAL_POLICIES: usize = 10;
/// Per namespace: 2 DENY + 3 ALLOW namespace-scoped, 5 selector-scoped.
const PER_NAMESPACE: usize = 10;

fn exact(s: String) -> StringMatch {
    StringMatch::Exact(s)
}

fn policy(ns: &str, name: String, scope: Scope, action: Action, m: Vec<Match>) -> Authorization {
    Authorization {
        name,
        namespace: ns.to_owned(),
        scope,
        action,
        rules: vec![vec![m]],
        dry_run: false,
    }
}

/// 10,000 policies: 10 global DENY, then per namespace `ns-<i>`: DENY on
/// ports, DENY on CIDRs, ALLOW from 3 client namespaces each (with a port
/// condition), and 5 selector-bound ALLOW policies by principal and SA.
fn policies() -> Vec<Authorization> {
    let mut out = Vec::with_capacity(GLOBAL_POLICIES + NAMESPACES * PER_NAMESPACE);
    for g in 0..GLOBAL_POLICIES {
        out.push(policy(
            "istio-system",
            format!("global-deny-{g}"),
            Scope::Global,
            Action::Deny,
            vec![Match {
                source_ips: vec![format!("100.{g}.0.0/16").parse::<IpBlock>().unwrap()],
                destination_ports: vec![6000 + g as u16],
                ..Default::default()
            }],
        ));
    }
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        out.push(policy(
            &ns,
            "deny-ports".into(),
            Scope::Namespace,
            Action::Deny,
            vec![Match {
                destination_ports: vec![9999, 9998, 9997],
                ..Default::default()
            }],
        ));
        out.push(policy(
            &ns,
            "deny-cidr".into(),
            Scope::Namespace,
            Action::Deny,
            vec![Match {
                source_ips: vec![
                    "172.16.0.0/12".parse().unwrap(),
                    "fd00::/8".parse().unwrap(),
                ],
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            }],
        ));
        for a in 0..3 {
            out.push(policy(
                &ns,
                format!("allow-from-{a}"),
                Scope::Namespace,
                Action::Allow,
                vec![Match {
                    namespaces: vec![
                        exact(format!("client-{n}-{a}")),
                        exact(format!("other-{a}")),
                    ],
                    not_destination_ports: vec![15000],
                    ..Default::default()
                }],
            ));
        }
        for s in 0..5 {
            out.push(policy(
                &ns,
                format!("sel-{s}"),
                Scope::WorkloadSelector,
                Action::Allow,
                vec![
                    Match {
                        principals: vec![StringMatch::Suffix(format!("/ns/{ns}/sa/svc-{s}"))],
                        ..Default::default()
                    },
                    Match {
                        service_accounts: vec![ServiceAccountMatch {
                            namespace: "ops".into(),
                            service_account: format!("admin-{s}"),
                        }],
                        ..Default::default()
                    },
                ],
            ));
        }
    }
    out
}

struct Scenario {
    name: &'static str,
    ns: &'static str,
    refs: Vec<String>,
    id: Option<&'static str>,
    src: IpAddr,
    port: u16,
    want: fn(&Decision) -> bool,
}

/// Median ns per call over five runs of `iters` calls (no allocation here,
/// so the allocation counter only sees `f`).
fn time(iters: u32, mut f: impl FnMut()) -> f64 {
    let mut runs = [0f64; 5];
    for run in &mut runs {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        *run = start.elapsed().as_nanos() as f64 / f64::from(iters);
    }
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[2]
}

fn main() {
    let pols = policies();
    let count = pols.len();
    let start = Instant::now();
    let set = PolicySet::new(pols.clone());
    let build = start.elapsed();
    assert_eq!(set.len(), count);

    let src4: IpAddr = "10.0.0.1".parse().unwrap();
    let dst: IpAddr = "10.0.1.1".parse().unwrap();
    let refs: Vec<String> = (0..5).map(|s| format!("ns-500/sel-{s}")).collect();
    let scenarios = vec![
        Scenario {
            name: "allow: namespace ALLOW matches (ns-500, 5 bound selector policies)",
            ns: "ns-500",
            refs: refs.clone(),
            id: Some("spiffe://cluster.local/ns/client-500-2/sa/default"),
            src: src4,
            port: 8080,
            want: Decision::is_allow,
        },
        Scenario {
            name: "allow: bound selector policy matches by principal suffix",
            ns: "ns-500",
            refs: refs.clone(),
            id: Some("spiffe://cluster.local/ns/ns-500/sa/svc-4"),
            src: src4,
            port: 8080,
            want: Decision::is_allow,
        },
        Scenario {
            name: "deny: namespace DENY on port",
            ns: "ns-500",
            refs: refs.clone(),
            id: Some("spiffe://cluster.local/ns/client-500-0/sa/default"),
            src: src4,
            port: 9997,
            want: |d| !d.is_allow(),
        },
        Scenario {
            name: "deny: no ALLOW matches (every applicable policy evaluated)",
            ns: "ns-500",
            refs: refs.clone(),
            id: Some("spiffe://cluster.local/ns/stranger/sa/default"),
            src: src4,
            port: 8080,
            want: |d| !d.is_allow(),
        },
        Scenario {
            name: "deny: plaintext (no identity)",
            ns: "ns-500",
            refs: vec![],
            id: None,
            src: "172.20.0.1".parse().unwrap(),
            port: 8080,
            want: |d| !d.is_allow(),
        },
        Scenario {
            name: "allow: namespace without policies (globals only)",
            ns: "no-policies",
            refs: vec![],
            id: Some("spiffe://cluster.local/ns/a/sa/b"),
            src: src4,
            port: 8080,
            want: Decision::is_allow,
        },
    ];

    println!(
        "policy evaluation: {count} policies ({GLOBAL_POLICIES} global, {NAMESPACES} namespaces x {PER_NAMESPACE}); \
         PolicySet::new took {:.1} ms",
        build.as_secs_f64() * 1e3
    );
    let iters = 1_000_000;
    for sc in &scenarios {
        let req = Request {
            dst_workload_namespace: sc.ns,
            dst_workload_policy_refs: &sc.refs,
            src_identity: sc.id.map(|id| PeerIdentity::from_spiffe(id).unwrap()),
            src_ip: Some(sc.src),
            dst_ip: dst,
            dst_port: sc.port,
        };
        let d = set.evaluate(&req);
        assert!((sc.want)(&d), "{}: unexpected decision {d}", sc.name);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let ns = time(iters, || {
            black_box(set.evaluate(black_box(&req)));
        });
        let allocs = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(allocs, 0, "{}: evaluation allocated", sc.name);
        println!("  {ns:>8.1} ns/eval  {:<70} -> {d}", sc.name);
    }

    // For scale: what a linear scan over every policy costs (no index).
    let peer = Peer::new(
        PeerIdentity::from_spiffe("spiffe://cluster.local/ns/stranger/sa/default"),
        Some(src4),
        dst,
        8080,
    );
    let ns = time(200, || {
        black_box(
            pols.iter()
                .filter(|p| policy_matches(p, black_box(&peer)))
                .count(),
        );
    });
    println!("  {ns:>8.1} ns/eval  linear scan of all {count} policies (no index), for comparison");
    println!("  allocations during evaluation: 0 (checked)");
}
