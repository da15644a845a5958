//! Policy-routing rules and routes of both namespaces (pure).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::constants::*;
use crate::redirect::netlink::{Route, RouteKind, Rule, RuleTarget};

fn host32(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 32).expect("/32")
}

const DEFAULT: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0);

fn link_route(table: u32, dst: Ipv4Net, dev: &str) -> Route {
    Route {
        table,
        dst,
        kind: RouteKind::Unicast,
        dev: dev.to_string(),
        via: None,
        src: None,
        scope_link: true,
        onlink: false,
    }
}

fn via_route(table: u32, dst: Ipv4Net, via: Ipv4Addr, dev: &str) -> Route {
    Route {
        table,
        dst,
        kind: RouteKind::Unicast,
        dev: dev.to_string(),
        via: Some(via),
        src: None,
        scope_link: false,
        onlink: false,
    }
}

/// Node rules, priorities 100–103.
pub fn node_rules() -> Vec<Rule> {
    vec![
        Rule {
            priority: PRIO_SKIP,
            fwmark: Some((MARK_SKIP, MARK_SKIP)),
            target: RuleTarget::Goto(PRIO_MAIN),
        },
        Rule {
            priority: PRIO_OUTBOUND,
            fwmark: Some((MARK_OUTBOUND, MARK_OUTBOUND)),
            target: RuleTarget::Table(TABLE_OUTBOUND),
        },
        Rule {
            priority: PRIO_PROXY_RET,
            fwmark: Some((MARK_PROXY_RET, MARK_PROXY_RET)),
            target: RuleTarget::Table(TABLE_PROXY),
        },
        Rule {
            priority: PRIO_INBOUND,
            fwmark: None,
            target: RuleTarget::Table(TABLE_INBOUND),
        },
    ]
}

/// Node routes that do not depend on enrolled pods (tables 100–102).
pub fn node_base_routes(ztunnel_ip: Ipv4Addr, ztunnel_veth: &str) -> Vec<Route> {
    let zt = host32(ztunnel_ip);
    let mut proxy_default = via_route(TABLE_PROXY, DEFAULT, ztunnel_ip, ztunnel_veth);
    proxy_default.onlink = true;
    let mut v = vec![
        link_route(TABLE_INBOUND, zt, ztunnel_veth),
        link_route(TABLE_OUTBOUND, zt, ztunnel_veth),
        via_route(
            TABLE_OUTBOUND,
            DEFAULT,
            ZTUNNEL_OUTBOUND_ADDR,
            NODE_OUTBOUND_LINK,
        ),
        link_route(TABLE_PROXY, zt, ztunnel_veth),
        proxy_default,
    ];
    v.sort();
    v
}

/// The per-pod route: traffic for an enrolled pod goes into `istioin`.
pub fn pod_route(pod_ip: Ipv4Addr, host_ip: Ipv4Addr) -> Route {
    let mut r = via_route(
        TABLE_INBOUND,
        host32(pod_ip),
        ZTUNNEL_INBOUND_ADDR,
        NODE_INBOUND_LINK,
    );
    r.src = Some(host_ip);
    r
}

/// `unreachable <dst> table <table>`.
pub fn unreachable_route(table: u32, dst: Ipv4Net) -> Route {
    Route {
        table,
        dst,
        kind: RouteKind::Unreachable,
        dev: String::new(),
        via: None,
        src: None,
        scope_link: false,
        onlink: false,
    }
}

/// A pod's route while held without tunnels: its inbound traffic is
/// refused.
pub fn held_pod_route(pod_ip: Ipv4Addr) -> Route {
    unreachable_route(TABLE_INBOUND, host32(pod_ip))
}

/// ztunnel netns rules, priorities 20000 and 20003.
pub fn ztunnel_rules() -> Vec<Rule> {
    vec![
        Rule {
            priority: PRIO_TPROXY,
            fwmark: Some((MARK_TPROXY, ZTUNNEL_MARK_MASK)),
            target: RuleTarget::Table(TABLE_INBOUND),
        },
        Rule {
            priority: PRIO_ORG_SRC_RET,
            fwmark: Some((MARK_ORG_SRC_RET, ZTUNNEL_MARK_MASK)),
            target: RuleTarget::Table(TABLE_INBOUND),
        },
    ]
}

/// Range of ztunnel netns rule priorities removed on cleanup.
pub const ZTUNNEL_RULE_PRIORITIES: std::ops::RangeInclusive<u32> = PRIO_TPROXY..=PRIO_ORG_SRC_RET;
/// Range of the node rules' priorities. Other software uses these too (Cilium
/// moves the kernel's `lookup local` rule to 100), so on the node only rules
/// of our shape ([`is_node_rule`]) are ever removed, never a whole range.
pub const NODE_RULE_PRIORITIES: std::ops::RangeInclusive<u32> = PRIO_SKIP..=PRIO_INBOUND;

/// Whether `r` is one of ours on the node (this version's or an earlier one's):
/// a priority in [`NODE_RULE_PRIORITIES`] that looks up one of our tables or
/// jumps to the main rule.
pub fn is_node_rule(r: &Rule) -> bool {
    NODE_RULE_PRIORITIES.contains(&r.priority)
        && match r.target {
            RuleTarget::Table(t) => [TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY].contains(&t),
            RuleTarget::Goto(p) => p == PRIO_MAIN,
        }
}

/// ztunnel netns routes (tables 100–102).
pub fn ztunnel_routes(host_ip: Ipv4Addr, pod_iface: &str) -> Vec<Route> {
    let mut local = link_route(TABLE_INBOUND, DEFAULT, "lo");
    local.kind = RouteKind::Local;
    local.scope_link = false;
    let mut v = vec![
        local,
        via_route(
            TABLE_OUTBOUND,
            DEFAULT,
            NODE_OUTBOUND_ADDR,
            ZTUNNEL_OUTBOUND_LINK,
        ),
        link_route(TABLE_OUTBOUND, host32(host_ip), pod_iface),
        via_route(
            TABLE_PROXY,
            DEFAULT,
            NODE_INBOUND_ADDR,
            ZTUNNEL_INBOUND_LINK,
        ),
        link_route(TABLE_PROXY, host32(host_ip), pod_iface),
    ];
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::super::golden::assert_golden;
    use super::*;

    fn listing(rules: &[Rule], routes: &[Route]) -> String {
        let mut s = String::new();
        for r in rules {
            s.push_str(&format!("rule {r}\n"));
        }
        for r in routes {
            s.push_str(&format!("route {r}\n"));
        }
        s
    }

    #[test]
    fn golden_routing() {
        let zt = Ipv4Addr::new(10, 244, 1, 5);
        let host = Ipv4Addr::new(10, 244, 1, 1);
        let mut node = node_base_routes(zt, "veth9a8b7c6d");
        node.push(pod_route(Ipv4Addr::new(10, 244, 1, 20), host));
        assert_golden("node-routing.txt", &listing(&node_rules(), &node));
        assert_golden(
            "ztunnel-routing.txt",
            &listing(&ztunnel_rules(), &ztunnel_routes(host, "eth0")),
        );
    }

    #[test]
    fn priorities_are_inside_the_cleanup_ranges() {
        assert!(
            node_rules()
                .iter()
                .all(|r| NODE_RULE_PRIORITIES.contains(&r.priority))
        );
        assert!(
            ztunnel_rules()
                .iter()
                .all(|r| ZTUNNEL_RULE_PRIORITIES.contains(&r.priority))
        );
    }
}
