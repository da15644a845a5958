//! iptables rules of the ztunnel pod's namespace (pure generators).
//!
//! As upstream: mangle `PREROUTING` and nat `OUTPUT` of the ztunnel pod are
//! flushed, then mangle `PREROUTING` gets the TPROXY rules for the tunnel
//! devices and the return-path mark for replies to connections ztunnel made
//! with a pod's source address.

use std::net::Ipv4Addr;

use super::batch::{ChainRules, TableBatch};
use super::constants::*;
use crate::redirect::iptables::Ruleset;

/// Values the ztunnel netns rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelRuleParams {
    pub ztunnel_ip: Ipv4Addr,
    /// The pod's own interface (`eth0`).
    pub pod_iface: String,
}

fn tproxy(port: u16) -> String {
    format!(
        "-j TPROXY --on-port {port} --on-ip 127.0.0.1 --tproxy-mark {MARK_TPROXY:#x}/{ZTUNNEL_MARK_MASK:#x}"
    )
}

/// The rules of mangle `PREROUTING` in the ztunnel netns, in order.
pub fn ztunnel_chains(p: &ZtunnelRuleParams) -> Vec<ChainRules> {
    vec![
        ChainRules {
            table: "mangle",
            chain: "PREROUTING".into(),
            rules: vec![
                format!(
                    "-i {ZTUNNEL_INBOUND_LINK} -p tcp -m tcp --dport {PORT_INBOUND_HBONE} {}",
                    tproxy(PORT_INBOUND_HBONE)
                ),
                format!(
                    "-i {ZTUNNEL_OUTBOUND_LINK} -p tcp {}",
                    tproxy(PORT_OUTBOUND)
                ),
                format!(
                    "-i {ZTUNNEL_INBOUND_LINK} -p tcp {}",
                    tproxy(PORT_INBOUND_PLAIN)
                ),
                format!(
                    "! -d {}/32 -i {} -p tcp -j MARK --set-xmark {MARK_ORG_SRC_RET:#x}/{ZTUNNEL_MARK_MASK:#x}",
                    p.ztunnel_ip, p.pod_iface
                ),
            ],
        },
        ChainRules {
            table: "nat",
            chain: "OUTPUT".into(),
            rules: vec![],
        },
    ]
}

/// Flush-and-fill batches for the ztunnel netns (idempotent).
pub fn ztunnel_apply_batches(p: &ZtunnelRuleParams) -> Vec<TableBatch> {
    ztunnel_chains(p)
        .into_iter()
        .map(|c| {
            let mut b = TableBatch::new(c.table);
            b.line(format!("-F {}", c.chain));
            for r in &c.rules {
                b.line(format!("-A {} {r}", c.chain));
            }
            b
        })
        .collect()
}

/// Batches deleting our rules found in `current` (only those: whatever
/// else is in the pod's chains stays).
pub fn ztunnel_cleanup_batches(p: &ZtunnelRuleParams, current: &Ruleset) -> Vec<TableBatch> {
    ztunnel_chains(p)
        .into_iter()
        .filter_map(|c| {
            let existing = current.chain(c.table, &c.chain)?;
            let mut b = TableBatch::new(c.table);
            for r in c.rules.iter().filter(|r| existing.contains(r)) {
                b.line(format!("-D {} {r}", c.chain));
            }
            (!b.is_empty()).then_some(b)
        })
        .collect()
}

/// Differences between `current` and the wanted ztunnel netns rules.
pub fn ztunnel_rules_drift(p: &ZtunnelRuleParams, current: &Ruleset) -> Vec<String> {
    ztunnel_chains(p)
        .into_iter()
        .filter_map(|c| {
            let have = current.chain(c.table, &c.chain).unwrap_or_default();
            (have != c.rules.as_slice()).then(|| {
                format!(
                    "{} {} holds {:?}, want {:?}",
                    c.table, c.chain, have, c.rules
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::batch::render;
    use super::super::golden::assert_golden;
    use super::*;

    fn params() -> ZtunnelRuleParams {
        ZtunnelRuleParams {
            ztunnel_ip: Ipv4Addr::new(10, 244, 1, 5),
            pod_iface: "eth0".into(),
        }
    }

    #[test]
    fn golden_ztunnel_rules() {
        assert_golden(
            "ztunnel-rules.txt",
            &render(&ztunnel_apply_batches(&params())),
        );
    }

    #[test]
    fn cleanup_deletes_only_our_rules() {
        let p = params();
        let mut save = String::from("*mangle\n:PREROUTING ACCEPT [0:0]\n");
        for r in &ztunnel_chains(&p)[0].rules {
            save.push_str(&format!("-A PREROUTING {r}\n"));
        }
        save.push_str("-A PREROUTING -j OTHER\nCOMMIT\n*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n");
        let rs = Ruleset::parse(&save);
        assert!(
            ztunnel_rules_drift(&p, &rs).len() == 1,
            "the extra rule is drift"
        );
        let batches = ztunnel_cleanup_batches(&p, &rs);
        assert_eq!(batches.len(), 1);
        let text = render(&batches);
        assert_eq!(text.matches("-D PREROUTING").count(), 4);
        assert!(!text.contains("OTHER"));
        assert!(
            ztunnel_cleanup_batches(
                &p,
                &Ruleset::parse("*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")
            )
            .is_empty()
        );
    }
}
