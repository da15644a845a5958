//! Reading back what GENEVE redirection has in each namespace: to compare
//! with what it should be ([`NodeInventory::drift`]) and to prove a clean-up
//! left nothing ([`NodeInventory::leftovers`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::GeneveError;
use super::constants::*;
use super::ipset;
use super::node::{Topology, is_pod_route, save_tables};
use super::node_rules::{TABLES, node_rules_drift};
use super::routing::{
    NODE_RULE_PRIORITIES, ZTUNNEL_RULE_PRIORITIES, is_node_rule, node_base_routes, node_rules,
    ztunnel_routes, ztunnel_rules,
};
use super::state::hold_route;
use super::ztunnel_rules::{ZtunnelRuleParams, ztunnel_chains, ztunnel_rules_drift};
use crate::redirect::iptables::{Backend, Ruleset};
use crate::redirect::netlink::{GeneveLink, Link, Netlink, Route, Rule};
use crate::redirect::netns::Netns;

/// GENEVE state of one namespace, as read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Our tunnel devices that exist.
    pub links: Vec<Link>,
    /// Their IPv4 addresses.
    pub addresses: BTreeMap<String, Vec<Ipv4Net>>,
    /// Priorities of every rule in our range (also ones we cannot parse).
    pub rule_priorities: Vec<u32>,
    /// The rules in our range that [`crate::redirect::netlink::parse_rule`] reads.
    pub rules: Vec<Rule>,
    /// Routes of tables 100–102 (devices named).
    pub routes: BTreeMap<u32, Vec<Route>>,
    /// Route counts of tables 100–102, including ones we cannot parse.
    pub route_counts: BTreeMap<u32, usize>,
    /// `iptables-save` of the tables we touch.
    pub iptables: Ruleset,
    /// ipset entries (node only; `None` when the set does not exist).
    pub ipset: Option<BTreeMap<Ipv4Addr, String>>,
}

async fn read_netlink(
    nl: &Netlink,
    link_names: &[&str],
    priorities: std::ops::RangeInclusive<u32>,
    inv: &mut Inventory,
) -> Result<(), GeneveError> {
    for name in link_names {
        if let Some(l) = nl.link(name).await? {
            inv.addresses
                .insert(l.name.clone(), nl.addresses(name).await?);
            inv.links.push(l);
        }
    }
    inv.rule_priorities = nl
        .rule_priorities()
        .await?
        .into_iter()
        .filter(|p| priorities.contains(p))
        .collect();
    inv.rules = nl
        .rules()
        .await?
        .into_iter()
        .filter(|r| priorities.contains(&r.priority))
        .collect();
    for t in [TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY] {
        inv.routes.insert(t, nl.routes(t).await?);
        inv.route_counts.insert(t, nl.route_count(t).await?);
    }
    Ok(())
}

/// Reads the node namespace.
pub async fn inspect_node(
    ns: &Netns,
    nl: &Netlink,
    backend: Backend,
) -> Result<Inventory, GeneveError> {
    let mut inv = Inventory::default();
    read_netlink(
        nl,
        &[NODE_INBOUND_LINK, NODE_OUTBOUND_LINK],
        NODE_RULE_PRIORITIES,
        &mut inv,
    )
    .await?;
    // Other software's rules may share the priorities (see `is_node_rule`).
    inv.rules.retain(is_node_rule);
    inv.rule_priorities = inv.rules.iter().map(|r| r.priority).collect();
    let label = nl.netns().to_string();
    let (iptables, set) = ns
        .run_async(move || -> Result<_, GeneveError> {
            let rs = save_tables(backend, &TABLES).map_err(|source| GeneveError::Iptables {
                netns: label.clone(),
                source,
            })?;
            let set = ipset::list().map_err(|source| GeneveError::Ipset {
                netns: label.clone(),
                source,
            })?;
            Ok((rs, set))
        })
        .await??;
    inv.iptables = iptables;
    inv.ipset = set;
    Ok(inv)
}

/// Reads the ztunnel pod's namespace.
pub async fn inspect_ztunnel(
    ns: &Netns,
    nl: &Netlink,
    backend: Backend,
) -> Result<Inventory, GeneveError> {
    let mut inv = Inventory::default();
    read_netlink(
        nl,
        &[ZTUNNEL_INBOUND_LINK, ZTUNNEL_OUTBOUND_LINK],
        ZTUNNEL_RULE_PRIORITIES,
        &mut inv,
    )
    .await?;
    let label = nl.netns().to_string();
    inv.iptables = ns
        .run_async(move || {
            save_tables(backend, &["mangle", "nat"]).map_err(|source| GeneveError::Iptables {
                netns: label,
                source,
            })
        })
        .await??;
    Ok(inv)
}

fn link_drift(inv: &Inventory, wanted: &[(GeneveLink, Ipv4Addr)], out: &mut Vec<String>) {
    for (spec, addr) in wanted {
        match inv.links.iter().find(|l| l.name == spec.name) {
            None => out.push(format!("link {} missing", spec.name)),
            Some(l) => {
                let g = l.geneve.clone().unwrap_or_default();
                if l.kind.as_deref() != Some("geneve")
                    || g.vni != spec.vni
                    || g.remote != Some(spec.remote)
                    || g.dst_port != spec.dst_port
                {
                    out.push(format!("link {} is {l:?}, want {spec:?}", spec.name));
                }
                if !l.up {
                    out.push(format!("link {} is down", spec.name));
                }
                let addrs = inv.addresses.get(&spec.name).cloned().unwrap_or_default();
                if addrs != [net(*addr)] {
                    out.push(format!(
                        "link {} has addresses {addrs:?}, want {}",
                        spec.name,
                        net(*addr)
                    ));
                }
            }
        }
    }
}

fn rule_drift(inv: &Inventory, wanted: &[Rule], out: &mut Vec<String>) {
    let mut have = inv.rules.clone();
    have.sort();
    let mut want = wanted.to_vec();
    want.sort();
    if have != want || inv.rule_priorities.len() != want.len() {
        out.push(format!(
            "rules are {have:?} (priorities {:?}), want {want:?}",
            inv.rule_priorities
        ));
    }
}

fn route_drift(inv: &Inventory, wanted: &[Route], out: &mut Vec<String>) {
    for t in [TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY] {
        let have = inv.routes.get(&t).cloned().unwrap_or_default();
        let mut want: Vec<Route> = wanted.iter().filter(|r| r.table == t).cloned().collect();
        want.sort();
        if have != want || inv.route_counts.get(&t).copied().unwrap_or(0) != want.len() {
            out.push(format!("table {t} holds {have:?}, want {want:?}"));
        }
    }
}

impl Inventory {
    /// Differences from a node built for `topo` with `pods` (IP → UID)
    /// enrolled; empty when everything is exactly in place.
    pub fn node_drift(&self, topo: &Topology, pods: &BTreeMap<Ipv4Addr, String>) -> Vec<String> {
        self.node_drift_with(topo, pods, false)
    }

    /// Differences from a held node (no ztunnel; see
    /// [`super::state::ZtunnelChange::Hold`]) last built for `topo`, with
    /// `pods` enrolled: as [`Self::node_drift`], except that the routes of
    /// tables 101/102 are the held ([`hold_route`]) ones.
    pub fn held_drift(&self, topo: &Topology, pods: &BTreeMap<Ipv4Addr, String>) -> Vec<String> {
        self.node_drift_with(topo, pods, true)
    }

    fn node_drift_with(
        &self,
        topo: &Topology,
        pods: &BTreeMap<Ipv4Addr, String>,
        held: bool,
    ) -> Vec<String> {
        let mut out = Vec::new();
        link_drift(self, &topo.node_links(), &mut out);
        rule_drift(self, &node_rules(), &mut out);
        let mut routes: Vec<Route> = node_base_routes(topo.ztunnel.ip, &topo.ztunnel_veth)
            .into_iter()
            .map(|r| if held { hold_route(&r).unwrap_or(r) } else { r })
            .collect();
        routes.extend(
            pods.keys()
                .map(|ip| super::routing::pod_route(*ip, topo.host_ip)),
        );
        route_drift(self, &routes, &mut out);
        out.extend(node_rules_drift(&topo.node_rule_params(), &self.iptables));
        match &self.ipset {
            None => out.push(format!("ipset {IPSET_NAME} missing")),
            Some(set) if set != pods => out.push(format!("ipset holds {set:?}, want {pods:?}")),
            Some(_) => {}
        }
        out
    }

    /// Differences from a ztunnel namespace built for `topo`.
    pub fn ztunnel_drift(&self, topo: &Topology) -> Vec<String> {
        let mut out = Vec::new();
        link_drift(self, &topo.ztunnel_links(), &mut out);
        rule_drift(self, &ztunnel_rules(), &mut out);
        route_drift(
            self,
            &ztunnel_routes(topo.host_ip, &topo.ztunnel.iface),
            &mut out,
        );
        out.extend(ztunnel_rules_drift(
            &topo.ztunnel_rule_params(),
            &self.iptables,
        ));
        out
    }

    /// Everything of ours still present in a node namespace; empty after a
    /// full clean-up.
    pub fn node_leftovers(&self) -> Vec<String> {
        let mut out = self.common_leftovers();
        for (table, chain) in self.iptables.chains_with_prefix(CHAIN_PREFIX) {
            out.push(format!("chain {table}/{chain}"));
        }
        for (table, chain, rule) in self.iptables.rules_mentioning(CHAIN_PREFIX) {
            out.push(format!("rule {table}/{chain}: {rule}"));
        }
        if self.ipset.is_some() {
            out.push(format!("ipset {IPSET_NAME}"));
        }
        out
    }

    /// Everything of ours still present in a ztunnel namespace (`params`:
    /// what its rules were built with).
    pub fn ztunnel_leftovers(&self, params: &ZtunnelRuleParams) -> Vec<String> {
        let mut out = self.common_leftovers();
        for c in ztunnel_chains(params) {
            for r in &c.rules {
                if self.iptables.has_rule(c.table, &c.chain, r) {
                    out.push(format!("rule {}/{}: {r}", c.table, c.chain));
                }
            }
        }
        out
    }

    fn common_leftovers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .links
            .iter()
            .map(|l| format!("link {}", l.name))
            .collect();
        out.extend(
            self.rule_priorities
                .iter()
                .map(|p| format!("rule priority {p}")),
        );
        for (t, n) in &self.route_counts {
            if *n > 0 {
                out.push(format!("{n} routes in table {t}"));
            }
        }
        out
    }

    /// Per-pod routes present (destination IPs).
    pub fn pod_route_ips(&self) -> Vec<Ipv4Addr> {
        self.routes
            .get(&TABLE_INBOUND)
            .into_iter()
            .flatten()
            .filter(|r| is_pod_route(r))
            .map(|r| r.dst.addr())
            .collect()
    }
}
