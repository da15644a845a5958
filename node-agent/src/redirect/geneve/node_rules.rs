//! iptables rules of the node namespace (pure generators).
//!
//! Our rules live in `ztunnel-<HOOK>` chains, each jumped to from position 1
//! of the built-in chain of the same name. Rules are written exactly as
//! `iptables-save` prints them, so what is read back can be compared to what
//! was generated line for line.

use std::net::Ipv4Addr;

use super::batch::{ChainRules, TableBatch};
use super::constants::*;
use crate::redirect::iptables::Ruleset;

/// Values the node rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRuleParams {
    /// Host side of the ztunnel pod's veth (`$VETH`).
    pub ztunnel_veth: String,
    pub ztunnel_ip: Ipv4Addr,
    /// `$HOST_IP`: source of kubelet probes.
    pub host_ip: Ipv4Addr,
    pub geneve_port: u16,
    /// DNS capture (DNAT of pods' UDP/53 to ztunnel:15053).
    pub dns_capture: bool,
}

/// (table, built-in chain) pairs that get a `-j ztunnel-<chain>` hook, in
/// the order they are applied.
pub const HOOKS: [(&str, &str); 8] = [
    ("mangle", "PREROUTING"),
    ("mangle", "POSTROUTING"),
    ("mangle", "OUTPUT"),
    ("mangle", "INPUT"),
    ("mangle", "FORWARD"),
    ("nat", "PREROUTING"),
    ("nat", "POSTROUTING"),
    ("filter", "FORWARD"),
];

/// Tables we touch, in batch order.
pub const TABLES: [&str; 3] = ["mangle", "nat", "filter"];

pub fn chain_name(builtin: &str) -> String {
    format!("{CHAIN_PREFIX}{builtin}")
}

fn set_mark(mark: u32) -> String {
    format!("-j MARK --set-xmark {mark:#x}/{mark:#x}")
}

fn has_mark(mark: u32) -> String {
    format!("-m mark --mark {mark:#x}/{mark:#x}")
}

fn save_connmark(mark: u32) -> String {
    format!(
        "{} -j CONNMARK --save-mark --nfmask {mark:#x} --ctmask {mark:#x}",
        has_mark(mark)
    )
}

/// Every `ztunnel-*` chain with its rules (empty chains included).
pub fn node_chains(p: &NodeRuleParams) -> Vec<ChainRules> {
    let veth = &p.ztunnel_veth;
    let zt = p.ztunnel_ip;
    let skip_return = format!("{} -j RETURN", has_mark(MARK_SKIP));
    let prerouting = vec![
        format!("-i {NODE_INBOUND_LINK} {}", set_mark(MARK_SKIP)),
        format!("-i {NODE_INBOUND_LINK} -j RETURN"),
        format!("-i {NODE_OUTBOUND_LINK} {}", set_mark(MARK_SKIP)),
        format!("-i {NODE_OUTBOUND_LINK} -j RETURN"),
        format!("-p udp -m udp --dport {} -j RETURN", p.geneve_port),
        format!(
            "-m connmark --mark {MARK_CONN_SKIP:#x}/{MARK_CONN_SKIP:#x} {}",
            set_mark(MARK_SKIP)
        ),
        skip_return.clone(),
        format!(
            "! -i {veth} -m connmark --mark {MARK_PROXY:#x}/{MARK_PROXY:#x} {}",
            set_mark(MARK_PROXY_RET)
        ),
        format!("{} -j RETURN", has_mark(MARK_PROXY_RET)),
        format!("! -s {zt}/32 -i {veth} {}", set_mark(MARK_PROXY)),
        skip_return.clone(),
        format!("-i {veth} {}", set_mark(MARK_CONN_SKIP)),
        format!("-p udp {}", set_mark(MARK_CONN_SKIP)),
        skip_return,
        format!(
            "-p tcp -m set --match-set {IPSET_NAME} src {}",
            set_mark(MARK_OUTBOUND)
        ),
    ];
    let save_marks = vec![save_connmark(MARK_CONN_SKIP), save_connmark(MARK_PROXY)];
    let output = vec![format!(
        "-s {}/32 -p tcp -m owner --socket-exists -m set --match-set {IPSET_NAME} dst -j MARK --set-xmark {MARK_CONN_SKIP:#x}/0xffffffff",
        p.host_ip
    )];
    let accept_outbound = format!("{} -j ACCEPT", has_mark(MARK_OUTBOUND));
    let mut nat_prerouting = vec![accept_outbound.clone()];
    if p.dns_capture {
        nat_prerouting.push(format!(
            "-p udp -m set --match-set {IPSET_NAME} src -m udp --dport 53 -j DNAT --to-destination {zt}:{PORT_DNS}"
        ));
    }
    let chain = |table, builtin: &str, rules: Vec<String>| ChainRules {
        table,
        chain: chain_name(builtin),
        rules,
    };
    vec![
        chain("mangle", "PREROUTING", prerouting),
        chain("mangle", "POSTROUTING", vec![]),
        chain("mangle", "OUTPUT", output),
        chain("mangle", "INPUT", save_marks.clone()),
        chain("mangle", "FORWARD", save_marks),
        chain("nat", "PREROUTING", nat_prerouting),
        chain("nat", "POSTROUTING", vec![accept_outbound.clone()]),
        chain("filter", "FORWARD", vec![accept_outbound]),
    ]
}

/// The hook rule as `iptables-save` prints it (without `-A <builtin>`).
fn hook_rule(builtin: &str) -> String {
    format!("-j {}", chain_name(builtin))
}

/// Batches that make the node's rules exactly [`node_chains`], given what is
/// there now (`current`, from `iptables-save`). Our chains are declared (so
/// created or emptied) and refilled; a hook is (re)inserted at position 1
/// unless it already is the first rule and the only jump to our chain.
/// Applying the result twice leaves the same rules.
pub fn node_apply_batches(p: &NodeRuleParams, current: &Ruleset) -> Vec<TableBatch> {
    let chains = node_chains(p);
    TABLES
        .iter()
        .map(|&table| {
            let mut b = TableBatch::new(table);
            for c in chains.iter().filter(|c| c.table == table) {
                b.line(format!(":{} - [0:0]", c.chain));
            }
            for &(t, builtin) in HOOKS.iter().filter(|(t, _)| *t == table) {
                let hook = hook_rule(builtin);
                let existing = current.chain(t, builtin).unwrap_or_default();
                let count = existing.iter().filter(|r| **r == hook).count();
                if count == 1 && existing.first() == Some(&hook) {
                    continue;
                }
                for _ in 0..count {
                    b.line(format!("-D {builtin} {hook}"));
                }
                b.line(format!("-I {builtin} 1 {hook}"));
            }
            for c in chains.iter().filter(|c| c.table == table) {
                for r in &c.rules {
                    b.line(format!("-A {} {r}", c.chain));
                }
            }
            b
        })
        .collect()
}

/// Batches that remove every `ztunnel-*` chain found in `current` and every
/// plain jump to one of them. Empty when there is nothing to remove.
pub fn node_cleanup_batches(current: &Ruleset) -> Vec<TableBatch> {
    let mut out = Vec::new();
    for (table, tab) in &current.tables {
        let Some(table) = TABLES.iter().find(|t| **t == table.as_str()) else {
            continue;
        };
        let ours: Vec<&String> = tab
            .chains
            .keys()
            .filter(|c| c.starts_with(CHAIN_PREFIX))
            .collect();
        if ours.is_empty() {
            continue;
        }
        let mut b = TableBatch::new(table);
        for (chain, rules) in &tab.chains {
            for r in rules {
                if ours.iter().any(|o| *r == format!("-j {o}")) {
                    b.line(format!("-D {chain} {r}"));
                }
            }
        }
        for o in &ours {
            b.line(format!("-F {o}"));
        }
        for o in &ours {
            b.line(format!("-X {o}"));
        }
        out.push(b);
    }
    out
}

/// Differences between `current` and the wanted node rules, one line each;
/// empty when everything is in place.
pub fn node_rules_drift(p: &NodeRuleParams, current: &Ruleset) -> Vec<String> {
    let mut out = Vec::new();
    for c in node_chains(p) {
        match current.chain(c.table, &c.chain) {
            None => out.push(format!("{} chain {} missing", c.table, c.chain)),
            Some(rules) if rules != c.rules.as_slice() => out.push(format!(
                "{} chain {} holds {:?}, want {:?}",
                c.table, c.chain, rules, c.rules
            )),
            Some(_) => {}
        }
    }
    for (table, builtin) in HOOKS {
        let hook = hook_rule(builtin);
        let rules = current.chain(table, builtin).unwrap_or_default();
        if rules.first() != Some(&hook) || rules.iter().filter(|r| **r == hook).count() != 1 {
            out.push(format!(
                "{table} {builtin}: hook to {} not first and unique",
                chain_name(builtin)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::batch::render;
    use super::super::golden::assert_golden;
    use super::*;

    fn params(dns: bool) -> NodeRuleParams {
        NodeRuleParams {
            ztunnel_veth: "veth9a8b7c6d".into(),
            ztunnel_ip: Ipv4Addr::new(10, 244, 1, 5),
            host_ip: Ipv4Addr::new(10, 244, 1, 1),
            geneve_port: 6081,
            dns_capture: dns,
        }
    }

    /// What `iptables-save` shows on a fresh node after the batches.
    fn simulate(current: &Ruleset, batches: &[TableBatch]) -> Ruleset {
        let mut rs = current.clone();
        for b in batches {
            let tab = rs.tables.entry(b.table.to_string()).or_default();
            for l in b.text().lines() {
                if let Some(decl) = l.strip_prefix(':') {
                    let name = decl.split_whitespace().next().unwrap().to_string();
                    tab.chains.insert(name, vec![]);
                } else if let Some(rest) = l.strip_prefix("-A ") {
                    let (c, r) = rest.split_once(' ').unwrap();
                    tab.chains.entry(c.into()).or_default().push(r.into());
                } else if let Some(rest) = l.strip_prefix("-I ") {
                    let (c, rest) = rest.split_once(' ').unwrap();
                    let (_pos, r) = rest.split_once(' ').unwrap();
                    tab.chains.entry(c.into()).or_default().insert(0, r.into());
                } else if let Some(rest) = l.strip_prefix("-D ") {
                    let (c, r) = rest.split_once(' ').unwrap();
                    let rules = tab.chains.get_mut(c).unwrap();
                    let i = rules.iter().position(|x| x == r).unwrap();
                    rules.remove(i);
                } else if let Some(c) = l.strip_prefix("-F ") {
                    tab.chains.get_mut(c).unwrap().clear();
                } else if let Some(c) = l.strip_prefix("-X ") {
                    tab.chains.remove(c);
                }
            }
        }
        rs
    }

    const FRESH: &str = "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

    #[test]
    fn golden_node_rules() {
        let fresh = Ruleset::parse(FRESH);
        assert_golden(
            "node-rules.txt",
            &render(&node_apply_batches(&params(false), &fresh)),
        );
        assert_golden(
            "node-rules-dns-capture.txt",
            &render(&node_apply_batches(&params(true), &fresh)),
        );
    }

    #[test]
    fn applying_twice_converges_and_hooks_come_first() {
        let p = params(false);
        let fresh = Ruleset::parse(FRESH);
        let once = simulate(&fresh, &node_apply_batches(&p, &fresh));
        assert!(
            node_rules_drift(&p, &once).is_empty(),
            "{:?}",
            node_rules_drift(&p, &once)
        );
        assert_eq!(
            once.chain("nat", "PREROUTING").unwrap(),
            ["-j ztunnel-PREROUTING", "-j KUBE-SERVICES"]
        );
        let twice = simulate(&once, &node_apply_batches(&p, &once));
        assert_eq!(once, twice);
        // nothing to fix: no hook lines in the second batch
        assert!(!render(&node_apply_batches(&p, &once)).contains("-I "));
    }

    #[test]
    fn displaced_or_duplicate_hooks_are_repaired() {
        let p = params(false);
        let fresh = Ruleset::parse(FRESH);
        let mut rs = simulate(&fresh, &node_apply_batches(&p, &fresh));
        let pre = rs
            .tables
            .get_mut("nat")
            .unwrap()
            .chains
            .get_mut("PREROUTING")
            .unwrap();
        pre.insert(0, "-j KUBE-FIRST".into()); // someone inserted ahead of us
        pre.push("-j ztunnel-PREROUTING".into()); // and a duplicate
        assert!(!node_rules_drift(&p, &rs).is_empty());
        let fixed = simulate(&rs, &node_apply_batches(&p, &rs));
        assert!(node_rules_drift(&p, &fixed).is_empty());
        assert_eq!(
            fixed.chain("nat", "PREROUTING").unwrap(),
            ["-j ztunnel-PREROUTING", "-j KUBE-FIRST", "-j KUBE-SERVICES"]
        );
    }

    #[test]
    fn changed_parameters_show_as_drift_and_are_replaced() {
        let fresh = Ruleset::parse(FRESH);
        let old = simulate(&fresh, &node_apply_batches(&params(false), &fresh));
        let mut p = params(false);
        p.ztunnel_ip = Ipv4Addr::new(10, 244, 1, 77);
        p.geneve_port = 6082;
        let drift = node_rules_drift(&p, &old);
        assert_eq!(drift.len(), 1, "{drift:?}");
        let new = simulate(&old, &node_apply_batches(&p, &old));
        assert!(node_rules_drift(&p, &new).is_empty());
        assert_eq!(new.rules_mentioning("10.244.1.5").count(), 0);
    }

    #[test]
    fn cleanup_removes_every_chain_and_hook_and_leaves_others() {
        let fresh = Ruleset::parse(FRESH);
        let rs = simulate(&fresh, &node_apply_batches(&params(true), &fresh));
        let batches = node_cleanup_batches(&rs);
        assert_golden("node-cleanup.txt", &render(&batches));
        let clean = simulate(&rs, &batches);
        assert_eq!(clean, fresh);
        assert!(node_cleanup_batches(&clean).is_empty());
    }
}
