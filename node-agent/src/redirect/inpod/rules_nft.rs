//! Pure generators for the in-pod capture rules and the host probe SNAT in
//! native nftables form (`NATIVE_NFTABLES=true`), as `nft -f` scripts.
//!
//! The same rules as [`super::rules`] (the letters M1, N2, ... refer to the
//! table in `shared/reference/redirection-inpod.md`), in upstream istio-cni's
//! nftables layout: one `inet` table per iptables table (`istio-ambient-nat`,
//! `istio-ambient-mangle`, `istio-ambient-raw`), each with base chains hooked
//! where iptables hooks (`prerouting`, `output`, priorities -100/-150/-300)
//! jumping into `istio-prerouting` / `istio-output`. One `inet` table serves
//! both families: IPv6 rules (`ip6 ...`) are added when IPv6 is on.
//!
//! A pod script is one atomic transaction that leaves the netns with exactly
//! the desired tables: each wanted table is declared, flushed and refilled,
//! each unwanted one (e.g. raw after DNS capture was turned off) is declared
//! and deleted (`add` is idempotent, so `delete` cannot fail on a missing
//! table). Applying it twice gives the same ruleset; other tables in the
//! netns are never touched.
//!
//! Host side: table `inet istio-ambient-nat` in the node netns holds the
//! probe sets (`istio-inpod-probes-v4` / `-v6`, elements commented with the
//! pod UID) and a `postrouting` chain SNATing probes to the probe address.
//! iptables mode matches probes with `-m owner --socket-exists` (a packet from
//! a local socket); nftables has no such match, and this rule uses
//! `meta skuid` over every valid UID, which matches exactly the packets that
//! carry a local socket with an owner, the same set. (Upstream's nft mode
//! matches only the kubelet's UID, found by a /proc scan.)

use std::fmt::Write as _;
use std::net::IpAddr;

use super::rules::{
    CONN_MARK, MARK_MASK, PORT_DNS, PORT_HBONE, PORT_INBOUND_PLAIN, PORT_OUTBOUND, PodRuleOptions,
    RuleConfig, ZTUNNEL_MARK,
};

pub const TABLE_NAT: &str = "istio-ambient-nat";
pub const TABLE_MANGLE: &str = "istio-ambient-mangle";
pub const TABLE_RAW: &str = "istio-ambient-raw";
/// Every table the pod rules own in a pod netns.
pub const POD_TABLES: [&str; 3] = [TABLE_NAT, TABLE_MANGLE, TABLE_RAW];
/// The host table (node netns): probe sets and the SNAT chain.
pub const HOST_TABLE: &str = TABLE_NAT;

const CHAIN_PRERT: &str = "istio-prerouting";
const CHAIN_OUTPUT: &str = "istio-output";
const HOST_CHAIN: &str = "postrouting";

/// Base chain declarations of one pod table: (name, type, hook, priority).
fn base_chains(table: &str) -> [(&'static str, &'static str, &'static str, i32); 2] {
    match table {
        TABLE_MANGLE => [
            ("prerouting", "filter", "prerouting", -150),
            ("output", "route", "output", -150),
        ],
        TABLE_RAW => [
            ("prerouting", "filter", "prerouting", -300),
            ("output", "filter", "output", -300),
        ],
        _ => [
            ("prerouting", "nat", "prerouting", -100),
            ("output", "nat", "output", -100),
        ],
    }
}

/// The address family prefix and loopback of a rule.
#[derive(Clone, Copy)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn ip(self) -> &'static str {
        match self {
            Fam::V4 => "ip",
            Fam::V6 => "ip6",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Fam::V4 => "127.0.0.1/32",
            Fam::V6 => "::1/128",
        }
    }
    fn probe(self, cfg: &RuleConfig) -> String {
        match self {
            Fam::V4 => cfg.probe_snat_v4.to_string(),
            Fam::V6 => cfg.probe_snat_v6.to_string(),
        }
    }
    fn set(self, cfg: &RuleConfig) -> &str {
        match self {
            Fam::V4 => &cfg.probe_ipset_v4,
            Fam::V6 => &cfg.probe_ipset_v6,
        }
    }
    fn set_type(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4_addr",
            Fam::V6 => "ipv6_addr",
        }
    }
}

fn families(ipv6: bool) -> &'static [Fam] {
    if ipv6 {
        &[Fam::V4, Fam::V6]
    } else {
        &[Fam::V4]
    }
}

/// An interface name as an nft string: iptables' trailing `+` wildcard is
/// nft's `*`. Names were validated by [`PodRuleOptions::from_annotations`].
fn ifname(name: &str) -> String {
    match name.strip_suffix('+') {
        Some(base) => format!("\"{base}*\""),
        None => format!("\"{name}\""),
    }
}

/// One table's chains and rules, before rendering.
struct Table {
    name: &'static str,
    prerouting: Vec<String>,
    output: Vec<String>,
}

/// The pod tables that the options want, in order mangle, nat, raw.
fn pod_tables(cfg: &RuleConfig, opts: &PodRuleOptions, ipv6: bool) -> Vec<Table> {
    let fams = families(ipv6);
    let not_mark = format!("meta mark & {MARK_MASK:#x} != {ZTUNNEL_MARK:#x}");
    let mangle = Table {
        name: TABLE_MANGLE,
        // M1
        prerouting: vec![format!(
            "meta mark & {MARK_MASK:#x} == {ZTUNNEL_MARK:#x} counter \
             ct mark set ct mark & {:#x} | {CONN_MARK:#x}",
            !MARK_MASK
        )],
        // M2
        output: vec![format!(
            "ct mark & {MARK_MASK:#x} == {CONN_MARK:#x} counter meta mark set ct mark"
        )],
    };

    let mut prert = Vec::new();
    for name in &opts.reroute_interfaces {
        // V1, V2
        let i = ifname(name);
        prert.push(format!(
            "iifname {i} meta l4proto tcp counter redirect to :{PORT_OUTBOUND}"
        ));
        prert.push(format!("iifname {i} meta l4proto tcp counter return"));
    }
    if !opts.bypass_inbound {
        for &f in fams {
            // N1
            prert.push(format!(
                "meta l4proto tcp {} saddr {} counter accept",
                f.ip(),
                f.probe(cfg)
            ));
        }
        for &f in fams {
            // N2
            prert.push(format!(
                "{} daddr != {} tcp dport != {PORT_HBONE} {not_mark} counter \
                 redirect to :{PORT_INBOUND_PLAIN}",
                f.ip(),
                f.loopback()
            ));
        }
    }
    let mut output = Vec::new();
    for &f in fams {
        // O1
        output.push(format!(
            "meta l4proto tcp {} daddr {} counter accept",
            f.ip(),
            f.probe(cfg)
        ));
    }
    if opts.dns_capture {
        // O2
        output.push(format!(
            "oifname != \"lo\" {not_mark} udp dport 53 counter redirect to :{PORT_DNS}"
        ));
        for &f in fams {
            // O3
            output.push(format!(
                "{} daddr != {} tcp dport 53 {not_mark} counter redirect to :{PORT_DNS}",
                f.ip(),
                f.loopback()
            ));
        }
    }
    // O4
    output.push(format!(
        "meta l4proto tcp meta mark & {MARK_MASK:#x} == {CONN_MARK:#x} counter accept"
    ));
    for &f in fams {
        // O5
        output.push(format!(
            "oifname \"lo\" {} daddr != {} counter accept",
            f.ip(),
            f.loopback()
        ));
    }
    for &f in fams {
        // O6
        output.push(format!(
            "meta l4proto tcp {} daddr != {} {not_mark} counter redirect to :{PORT_OUTBOUND}",
            f.ip(),
            f.loopback()
        ));
    }
    let nat = Table {
        name: TABLE_NAT,
        prerouting: prert,
        output,
    };
    let mut tables = vec![mangle, nat];
    if opts.dns_capture {
        tables.push(Table {
            name: TABLE_RAW,
            // R2
            prerouting: vec![format!(
                "udp sport 53 meta mark & {MARK_MASK:#x} != {ZTUNNEL_MARK:#x} counter ct zone set 1"
            )],
            // R1
            output: vec![format!(
                "udp dport 53 meta mark & {MARK_MASK:#x} == {ZTUNNEL_MARK:#x} counter ct zone set 1"
            )],
        });
    }
    tables
}

/// The `nft -f` script that brings a pod netns to the rules `opts` want.
pub fn pod_script(cfg: &RuleConfig, opts: &PodRuleOptions, ipv6: bool) -> String {
    let tables = pod_tables(cfg, opts, ipv6);
    let mut out = String::new();
    for t in &tables {
        let n = t.name;
        let _ = writeln!(out, "add table inet {n}");
        let _ = writeln!(out, "flush table inet {n}");
        for (chain, kind, hook, prio) in base_chains(n) {
            let _ = writeln!(
                out,
                "add chain inet {n} {chain} {{ type {kind} hook {hook} priority {prio} ; }}"
            );
        }
        let _ = writeln!(out, "add chain inet {n} {CHAIN_PRERT}");
        let _ = writeln!(out, "add chain inet {n} {CHAIN_OUTPUT}");
        let _ = writeln!(out, "add rule inet {n} prerouting jump {CHAIN_PRERT}");
        let _ = writeln!(out, "add rule inet {n} output jump {CHAIN_OUTPUT}");
        for r in &t.prerouting {
            let _ = writeln!(out, "add rule inet {n} {CHAIN_PRERT} {r}");
        }
        for r in &t.output {
            let _ = writeln!(out, "add rule inet {n} {CHAIN_OUTPUT} {r}");
        }
    }
    for n in POD_TABLES {
        if !tables.iter().any(|t| t.name == n) {
            push_delete_table(&mut out, n);
        }
    }
    out
}

/// The script that removes every pod table (missing ones included).
pub fn remove_pod_script() -> String {
    let mut out = String::new();
    for n in POD_TABLES {
        push_delete_table(&mut out, n);
    }
    out
}

fn push_delete_table(out: &mut String, name: &str) {
    let _ = writeln!(out, "add table inet {name}");
    let _ = writeln!(out, "delete table inet {name}");
}

/// The host script: the probe sets (kept with their elements) and the SNAT
/// chain (refilled). Sets of a family that is off are left alone.
pub fn host_script(cfg: &RuleConfig, ipv6: bool) -> String {
    let t = HOST_TABLE;
    let mut out = String::new();
    let _ = writeln!(out, "add table inet {t}");
    for &f in families(ipv6) {
        let _ = writeln!(
            out,
            "add set inet {t} {} {{ type {} ; comment \"IPs of pods in the ambient mesh, commented with the pod UID\" ; }}",
            f.set(cfg),
            f.set_type()
        );
    }
    let _ = writeln!(
        out,
        "add chain inet {t} {HOST_CHAIN} {{ type nat hook postrouting priority 100 ; }}"
    );
    let _ = writeln!(out, "flush chain inet {t} {HOST_CHAIN}");
    for &f in families(ipv6) {
        let _ = writeln!(
            out,
            "add rule inet {t} {HOST_CHAIN} meta l4proto tcp meta skuid 0-4294967294 \
             {ip} daddr @{set} counter snat {ip} to {probe}",
            ip = f.ip(),
            set = f.set(cfg),
            probe = f.probe(cfg)
        );
    }
    out
}

/// The script that removes the host table (sets and chain), present or not.
pub fn remove_host_script() -> String {
    let mut out = String::new();
    push_delete_table(&mut out, HOST_TABLE);
    out
}

fn fam_of(ip: &IpAddr) -> Fam {
    match ip {
        IpAddr::V4(_) => Fam::V4,
        IpAddr::V6(_) => Fam::V6,
    }
}

/// Adds `ips` to the probe sets, each commented with `comment` (a pod UID
/// already checked to need no quoting) if given. Sets named in
/// `present` only: an IP whose family has no set gets no probe SNAT.
pub fn add_elements_script(
    cfg: &RuleConfig,
    comment: Option<&str>,
    ips: &[IpAddr],
    present: &[String],
) -> String {
    let mut out = String::new();
    let comment = comment
        .map(|c| format!(" comment \"{c}\""))
        .unwrap_or_default();
    for ip in ips {
        let set = fam_of(ip).set(cfg);
        if present.iter().any(|p| p == set) {
            let _ = writeln!(
                out,
                "add element inet {HOST_TABLE} {set} {{ {ip}{comment} }}"
            );
        }
    }
    out
}

/// Removes `ips` from the probe sets; a missing element is fine (it is
/// added first, so the delete cannot fail in the transaction).
pub fn del_elements_script(cfg: &RuleConfig, ips: &[IpAddr], present: &[String]) -> String {
    let mut out = String::new();
    for ip in ips {
        let set = fam_of(ip).set(cfg);
        if present.iter().any(|p| p == set) {
            let _ = writeln!(out, "add element inet {HOST_TABLE} {set} {{ {ip} }}");
            let _ = writeln!(out, "delete element inet {HOST_TABLE} {set} {{ {ip} }}");
        }
    }
    out
}

/// One set of the host table with its members: (IP, comment = pod UID if
/// any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSet {
    pub name: String,
    pub members: Vec<(IpAddr, Option<String>)>,
}

/// The sets of the host table (`inet istio-ambient-nat`) with their
/// elements, from `nft -j list table inet istio-ambient-nat` (or any listing
/// that includes it; sets of other tables are left out).
pub fn parse_host_sets(json: &str) -> Result<Vec<HostSet>, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft JSON output: {e}"))?;
    let mut out = Vec::new();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let set = &item["set"];
        if set["table"] != HOST_TABLE || set["family"] != "inet" {
            continue;
        }
        let Some(name) = set["name"].as_str() else {
            continue;
        };
        let mut members = Vec::new();
        for e in set["elem"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let (val, comment) = match e {
                serde_json::Value::String(s) => (s.as_str(), None),
                other => (
                    other["elem"]["val"].as_str().unwrap_or_default(),
                    other["elem"]["comment"].as_str().map(str::to_string),
                ),
            };
            let ip = val
                .parse()
                .map_err(|_| format!("element {val:?} of set {name} is not an IP address"))?;
            members.push((ip, comment));
        }
        out.push(HostSet {
            name: name.to_string(),
            members,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::redirect::golden::assert_golden;

    fn opts(annotations: &[(&str, &str)], global_dns: bool) -> PodRuleOptions {
        let a: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PodRuleOptions::from_annotations(global_dns, &a).0
    }

    #[test]
    fn golden_pod_scripts() {
        use super::super::rules::{
            ANNOTATION_BYPASS_INBOUND as BYPASS, ANNOTATION_DNS_CAPTURE as DNS,
            ANNOTATION_REROUTE_VIRTUAL_INTERFACES as VIFS,
        };
        let cfg = RuleConfig::default();
        let cases: Vec<(&str, PodRuleOptions)> = vec![
            ("pod_default", opts(&[], false)),
            ("pod_dns_capture", opts(&[], true)),
            (
                "pod_dns_annotation_off_global_on",
                opts(&[(DNS, "false")], true),
            ),
            ("pod_bypass_inbound", opts(&[(BYPASS, "true")], false)),
            (
                "pod_virtual_interfaces",
                opts(&[(VIFS, "tap0, veth+")], false),
            ),
            (
                "pod_all_variants",
                opts(&[(BYPASS, "true"), (VIFS, "tap0")], true),
            ),
        ];
        for (name, o) in cases {
            for (ipv6, suffix) in [(false, "v4"), (true, "dual")] {
                assert_golden(
                    "inpod-nft",
                    &format!("{name}_{suffix}.nft"),
                    &pod_script(&cfg, &o, ipv6),
                );
            }
        }
        assert_golden("inpod-nft", "pod_remove.nft", &remove_pod_script());
    }

    #[test]
    fn golden_host_scripts() {
        let cfg = RuleConfig::default();
        assert_golden("inpod-nft", "host_v4.nft", &host_script(&cfg, false));
        assert_golden("inpod-nft", "host_dual.nft", &host_script(&cfg, true));
        assert_golden("inpod-nft", "host_remove.nft", &remove_host_script());
    }

    #[test]
    fn unwanted_tables_are_deleted_and_wanted_ones_refilled() {
        let cfg = RuleConfig::default();
        let s = pod_script(&cfg, &opts(&[], false), true);
        assert!(
            s.contains("add table inet istio-ambient-raw\ndelete table inet istio-ambient-raw\n")
        );
        assert!(s.contains("flush table inet istio-ambient-nat\n"));
        let s = pod_script(&cfg, &opts(&[], true), true);
        assert!(!s.contains("delete table"), "{s}");
    }

    #[test]
    fn ipv4_only_scripts_have_no_ipv6_rules() {
        let cfg = RuleConfig::default();
        let s = pod_script(&cfg, &opts(&[], true), false);
        assert!(!s.contains("ip6"), "{s}");
        assert!(!host_script(&cfg, false).contains("ip6"));
        assert!(host_script(&cfg, true).contains("ip6 daddr @istio-inpod-probes-v6"));
    }

    #[test]
    fn wildcard_interfaces_become_nft_wildcards() {
        assert_eq!(ifname("veth+"), "\"veth*\"");
        assert_eq!(ifname("tap0"), "\"tap0\"");
    }

    #[test]
    fn element_scripts_skip_families_without_a_set() {
        let cfg = RuleConfig::default();
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let present = vec![cfg.probe_ipset_v4.clone()];
        assert_eq!(
            add_elements_script(&cfg, Some("uid-1"), &ips, &present),
            "add element inet istio-ambient-nat istio-inpod-probes-v4 { 10.0.0.5 comment \"uid-1\" }\n"
        );
        assert_eq!(
            del_elements_script(&cfg, &ips, &present),
            "add element inet istio-ambient-nat istio-inpod-probes-v4 { 10.0.0.5 }\n\
             delete element inet istio-ambient-nat istio-inpod-probes-v4 { 10.0.0.5 }\n"
        );
        assert_eq!(add_elements_script(&cfg, None, &ips, &[]), "");
    }

    #[test]
    fn parses_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "istio-ambient-nat", "handle": 3}}, {"set": {"family": "inet", "name": "istio-inpod-probes-v4", "table": "istio-ambient-nat", "type": "ipv4_addr", "handle": 1, "elem": [{"elem": {"val": "10.0.0.5", "comment": "uid-1"}}, "10.0.0.6"]}}, {"set": {"family": "inet", "name": "istio-inpod-probes-v6", "table": "istio-ambient-nat", "type": "ipv6_addr", "handle": 2}}, {"set": {"family": "inet", "name": "other", "table": "firewall", "type": "ipv4_addr", "handle": 1, "elem": ["10.9.9.9"]}}]}"#;
        assert_eq!(
            parse_host_sets(json).unwrap(),
            vec![
                HostSet {
                    name: "istio-inpod-probes-v4".into(),
                    members: vec![
                        ("10.0.0.5".parse().unwrap(), Some("uid-1".to_string())),
                        ("10.0.0.6".parse().unwrap(), None)
                    ],
                },
                HostSet {
                    name: "istio-inpod-probes-v6".into(),
                    members: vec![],
                },
            ]
        );
        assert!(parse_host_sets("not json").is_err());
        let bad = r#"{"nftables": [{"set": {"family": "inet", "name": "s", "table": "istio-ambient-nat", "elem": ["nope"]}}]}"#;
        let e = parse_host_sets(bad).unwrap_err();
        assert!(e.contains("nope") && e.contains("set s"), "{e}");
    }
}
