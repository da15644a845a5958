//! Kernel work in the node namespace: tunnels, sysctls, ipset, iptables,
//! routes and rules, per-pod entries, and tear-down.

use std::net::Ipv4Addr;

use tracing::{debug, warn};

use super::GeneveError;
use super::constants::*;
use super::ipset;
use super::node_rules::{NodeRuleParams, node_apply_batches, node_cleanup_batches};
use super::port::{Wanted, choose_dst_port};
use super::routing::{NODE_RULE_PRIORITIES, is_node_rule, node_base_routes, node_rules};
use super::state::{ZtunnelPod, hold_route, is_any_pod_route};
use super::sysctl::{self, SysctlRoot};
use super::ztunnel_rules::ZtunnelRuleParams;
use crate::redirect::iptables::{self, Backend, Family, Ruleset};
use crate::redirect::netlink::{GeneveLink, Link, Netlink, Route, RouteKind, Rule};
use crate::redirect::netns::Netns;

/// Everything resolved for one build against one ztunnel pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub ztunnel: ZtunnelPod,
    /// Node device toward the ztunnel pod (`$VETH`).
    pub ztunnel_veth: String,
    /// Node address the ztunnel pod sees the tunnels come from (remote of
    /// `pistioin`/`pistioout`).
    pub tunnel_remote: Ipv4Addr,
    /// `$HOST_IP`: source of the per-pod routes and of kubelet probes.
    pub host_ip: Ipv4Addr,
    pub geneve_port: u16,
    pub dns_capture: bool,
}

impl Topology {
    pub fn node_rule_params(&self) -> NodeRuleParams {
        NodeRuleParams {
            ztunnel_veth: self.ztunnel_veth.clone(),
            ztunnel_ip: self.ztunnel.ip,
            host_ip: self.host_ip,
            geneve_port: self.geneve_port,
            dns_capture: self.dns_capture,
        }
    }

    pub fn ztunnel_rule_params(&self) -> ZtunnelRuleParams {
        ZtunnelRuleParams {
            ztunnel_ip: self.ztunnel.ip,
            pod_iface: self.ztunnel.iface.clone(),
        }
    }

    /// `istioin`, `istioout`.
    pub fn node_links(&self) -> [(GeneveLink, Ipv4Addr); 2] {
        let link = |name: &str, vni, mac| GeneveLink {
            name: name.into(),
            vni,
            remote: self.ztunnel.ip,
            dst_port: self.geneve_port,
            mac,
        };
        [
            (
                link(NODE_INBOUND_LINK, INBOUND_VNI, NODE_INBOUND_MAC),
                NODE_INBOUND_ADDR,
            ),
            (
                link(NODE_OUTBOUND_LINK, OUTBOUND_VNI, NODE_OUTBOUND_MAC),
                NODE_OUTBOUND_ADDR,
            ),
        ]
    }

    /// `pistioin`, `pistioout`.
    pub fn ztunnel_links(&self) -> [(GeneveLink, Ipv4Addr); 2] {
        let link = |name: &str, vni, mac| GeneveLink {
            name: name.into(),
            vni,
            remote: self.tunnel_remote,
            dst_port: self.geneve_port,
            mac,
        };
        [
            (
                link(ZTUNNEL_INBOUND_LINK, INBOUND_VNI, ZTUNNEL_INBOUND_MAC),
                ZTUNNEL_INBOUND_ADDR,
            ),
            (
                link(ZTUNNEL_OUTBOUND_LINK, OUTBOUND_VNI, ZTUNNEL_OUTBOUND_MAC),
                ZTUNNEL_OUTBOUND_ADDR,
            ),
        ]
    }
}

const NODE_LINKS: [&str; 2] = [NODE_INBOUND_LINK, NODE_OUTBOUND_LINK];
const ZTUNNEL_LINKS: [&str; 2] = [ZTUNNEL_INBOUND_LINK, ZTUNNEL_OUTBOUND_LINK];

fn others(links: Vec<Link>, ours: &[&str]) -> Vec<Link> {
    links
        .into_iter()
        .filter(|l| !ours.contains(&l.name.as_str()))
        .collect()
}

/// Works out the ztunnel veth, the tunnel remote, `$HOST_IP` and the GENEVE
/// port for `zt`.
pub async fn resolve(
    node: &Netlink,
    ztunnel: &Netlink,
    zt: &ZtunnelPod,
    host_ip: Option<Ipv4Addr>,
    dns_capture: bool,
) -> Result<Topology, GeneveError> {
    // Marked like a skipped packet, the lookup uses the main table only.
    let lookup = node.route_get(zt.ip, Some(MARK_SKIP)).await?;
    let dev = node.link(&lookup.dev).await?.unwrap_or_default();
    let kind = dev.kind.clone().unwrap_or_default();
    if lookup.gateway.is_some() || kind == "bridge" || NODE_LINKS.contains(&lookup.dev.as_str()) {
        return Err(GeneveError::ZtunnelDevice {
            ip: zt.ip,
            dev: lookup.dev,
            kind: if lookup.gateway.is_some() {
                "via a gateway".into()
            } else {
                kind
            },
            netns: node.netns().to_string(),
        });
    }
    let tunnel_remote = lookup.src.ok_or_else(|| GeneveError::NoSource {
        ip: zt.ip,
        netns: node.netns().to_string(),
    })?;
    let node_links = others(node.links().await?, &NODE_LINKS);
    let zt_links = others(ztunnel.links().await?, &ZTUNNEL_LINKS);
    let wanted = [
        Wanted {
            existing: &node_links,
            vni: INBOUND_VNI,
            remote: zt.ip,
        },
        Wanted {
            existing: &node_links,
            vni: OUTBOUND_VNI,
            remote: zt.ip,
        },
        Wanted {
            existing: &zt_links,
            vni: INBOUND_VNI,
            remote: tunnel_remote,
        },
        Wanted {
            existing: &zt_links,
            vni: OUTBOUND_VNI,
            remote: tunnel_remote,
        },
    ];
    let geneve_port = choose_dst_port(&wanted).ok_or(GeneveError::NoPort { ip: zt.ip })?;
    Ok(Topology {
        ztunnel: zt.clone(),
        ztunnel_veth: lookup.dev,
        tunnel_remote,
        host_ip: host_ip.unwrap_or(tunnel_remote),
        geneve_port,
        dns_capture,
    })
}

/// Creates the tunnel devices of one side, keeping any that already match
/// (no traffic interruption on a refresh), and their /30 addresses.
pub(super) async fn ensure_links(
    nl: &Netlink,
    links: &[(GeneveLink, Ipv4Addr)],
) -> Result<(), GeneveError> {
    for (spec, addr) in links {
        let current = nl.link(&spec.name).await?;
        let matches = current.as_ref().is_some_and(|l| {
            l.geneve.as_ref().is_some_and(|g| {
                g.vni == spec.vni && g.remote == Some(spec.remote) && g.dst_port == spec.dst_port
            })
        });
        if matches {
            // A device from before fixed MACs keeps its tunnel (and the pod
            // routes through it); only its address changes.
            if current.as_ref().is_some_and(|l| l.mac != Some(spec.mac)) {
                nl.set_mac(&spec.name, spec.mac).await?;
            }
            nl.set_up(&spec.name).await?;
        } else {
            if current.is_some() {
                debug!(link = %spec.name, netns = nl.netns(), "replacing tunnel device");
                nl.delete_link(&spec.name).await?;
            }
            nl.add_geneve(spec).await?;
        }
        nl.add_address(&spec.name, net(*addr)).await?;
    }
    Ok(())
}

/// Makes the routes of `tables` exactly `wanted`, leaving alone routes for
/// which `keep` is true (e.g. per-pod routes). Wanted routes are added
/// first, each replacing any route with its table and destination in place
/// (a held `unreachable` default becomes the tunnel default without a
/// moment where the destination falls through to the main table); what is
/// left over is deleted after.
pub(super) async fn sync_routes(
    nl: &Netlink,
    tables: &[u32],
    wanted: &[Route],
    keep: impl Fn(&Route) -> bool,
) -> Result<(), GeneveError> {
    for r in wanted {
        nl.replace_route(r).await?;
    }
    for t in tables {
        for r in nl.routes(*t).await? {
            if !wanted.contains(&r) && !keep(&r) {
                nl.delete_route(&r).await?;
            }
        }
    }
    Ok(())
}

/// Which policy rules in a priority range belong to us.
#[derive(Clone, Copy)]
pub(super) enum RuleOwnership {
    /// Every rule in the range (the ztunnel pod's netns: nothing else there).
    WholeRange,
    /// Only rules this predicate accepts (the node: other software shares it).
    Matching(fn(&Rule) -> bool),
}

/// Makes our rules with priorities in `range` exactly `wanted` (one copy
/// each), leaving rules that are not ours alone.
pub(super) async fn sync_rules(
    nl: &Netlink,
    range: std::ops::RangeInclusive<u32>,
    wanted: &[Rule],
    ownership: RuleOwnership,
) -> Result<(), GeneveError> {
    let have = nl.rules().await?;
    let duplicated = wanted
        .iter()
        .any(|w| have.iter().filter(|r| *r == w).count() > 1);
    match ownership {
        RuleOwnership::WholeRange => {
            let stray = nl
                .rule_priorities()
                .await?
                .into_iter()
                .filter(|p| range.contains(p))
                .count()
                > have.iter().filter(|r| range.contains(&r.priority)).count();
            let unwanted = have
                .iter()
                .any(|r| range.contains(&r.priority) && !wanted.contains(r));
            if stray || unwanted || duplicated {
                nl.delete_rules_in(range).await?;
            }
        }
        RuleOwnership::Matching(ours) => {
            let unwanted = have
                .iter()
                .any(|r| range.contains(&r.priority) && ours(r) && !wanted.contains(r));
            if unwanted || duplicated {
                nl.delete_rules_where(|r| {
                    range.contains(&r.priority) && (ours(r) || wanted.contains(r))
                })
                .await?;
            }
        }
    }
    for r in wanted {
        nl.add_rule(r).await?;
    }
    Ok(())
}

/// Applies `batches` (skipping empty ones) with `backend` in the calling
/// thread's namespace: one `iptables-restore --noflush` process for all of
/// them (each table is still committed atomically on its own).
pub(super) fn restore_batches(
    backend: Backend,
    batches: &[super::batch::TableBatch],
) -> Result<(), iptables::IptablesError> {
    let input: String = batches
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| b.text())
        .collect();
    if input.is_empty() {
        return Ok(());
    }
    iptables::restore(backend, Family::V4, &input)
}

/// `iptables-save` (one process), parsed, keeping only `tables`, in the
/// calling thread's namespace.
pub(super) fn save_tables(
    backend: Backend,
    tables: &[&str],
) -> Result<Ruleset, iptables::IptablesError> {
    let mut rs = Ruleset::parse(&iptables::save(backend, Family::V4, None)?);
    rs.tables.retain(|t, _| tables.contains(&t.as_str()));
    Ok(rs)
}

/// Builds (or refreshes) the node side against `topo`.
pub async fn build_node(
    ns: &Netns,
    nl: &Netlink,
    topo: &Topology,
    backend: Backend,
    sysctls: &SysctlRoot,
) -> Result<(), GeneveError> {
    let sysctls = sysctls.clone();
    let label = nl.netns().to_string();
    let t = std::time::Instant::now();
    ensure_links(nl, &topo.node_links()).await?;
    debug!(elapsed = ?t.elapsed(), "node tunnels ready");

    let veth = topo.ztunnel_veth.clone();
    let l = label.clone();
    ns.run_async(move || -> Result<(), GeneveError> {
        let ifaces = sysctls
            .interfaces()
            .map_err(|source| GeneveError::Interfaces {
                netns: l.clone(),
                source,
            })?;
        sysctls
            .apply(&sysctl::node_settings(&veth, &ifaces))
            .map_err(|source| GeneveError::Sysctl {
                netns: l.clone(),
                source,
            })
    })
    .await??;
    debug!(elapsed = ?t.elapsed(), "node sysctls set");

    let params = topo.node_rule_params();
    let l = label.clone();
    ns.run_async(move || -> Result<(), GeneveError> {
        ipset::restore(&ipset::create_line()).map_err(|source| GeneveError::Ipset {
            netns: l.clone(),
            source,
        })?;
        let ipt = |source| GeneveError::Iptables {
            netns: l.clone(),
            source,
        };
        let current = save_tables(backend, &super::node_rules::TABLES).map_err(ipt)?;
        restore_batches(backend, &node_apply_batches(&params, &current)).map_err(ipt)
    })
    .await??;
    debug!(elapsed = ?t.elapsed(), "node ipset and iptables applied");

    let base = node_base_routes(topo.ztunnel.ip, &topo.ztunnel_veth);
    // Per-pod routes (held ones too) are the caller's: it replaces them next.
    sync_routes(
        nl,
        &[TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY],
        &base,
        is_any_pod_route,
    )
    .await?;
    sync_rules(
        nl,
        NODE_RULE_PRIORITIES,
        &node_rules(),
        RuleOwnership::Matching(is_node_rule),
    )
    .await?;
    debug!(elapsed = ?t.elapsed(), "node routes and rules applied");
    Ok(())
}

/// A per-pod route of table 100 (through `istioin`).
pub fn is_pod_route(r: &Route) -> bool {
    r.table == TABLE_INBOUND
        && r.dev == NODE_INBOUND_LINK
        && r.via == Some(ZTUNNEL_INBOUND_ADDR)
        && r.dst.prefix_len() == 32
}

/// Holds the node (no ztunnel): every route of tables 101–102 becomes
/// `unreachable`, in place ([`hold_route`]; table 100 is kept). Captured
/// outbound (table 101) and original-source replies (table 102) are
/// refused with "host unreachable". Idempotent.
pub async fn hold_routes(nl: &Netlink) -> Result<(), GeneveError> {
    for t in [TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY] {
        for r in nl.routes(t).await? {
            if let Some(h) = hold_route(&r) {
                nl.replace_route(&h).await?;
            }
        }
    }
    Ok(())
}

/// Whether the node's tunnel devices are those `topo` wants (a build keeps
/// them, and with them the per-pod routes through `istioin`).
pub async fn node_tunnels_match(nl: &Netlink, topo: &Topology) -> Result<bool, GeneveError> {
    for (spec, _) in topo.node_links() {
        let ok = nl.link(&spec.name).await?.is_some_and(|l| {
            l.geneve.as_ref().is_some_and(|g| {
                g.vni == spec.vni && g.remote == Some(spec.remote) && g.dst_port == spec.dst_port
            })
        });
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `$HOST_IP` as the per-pod routes of table 100 have it (their source),
/// when `istioin` exists and some pod route does.
pub async fn pod_route_source(nl: &Netlink) -> Result<Option<Ipv4Addr>, GeneveError> {
    if nl.link(NODE_INBOUND_LINK).await?.is_none() {
        return Ok(None);
    }
    Ok(nl
        .routes(TABLE_INBOUND)
        .await?
        .iter()
        .filter(|r| is_pod_route(r))
        .find_map(|r| r.src))
}

/// Whether the node has an earlier capture (our policy rules).
pub async fn has_capture(nl: &Netlink) -> Result<bool, GeneveError> {
    Ok(nl.rules().await?.iter().any(is_node_rule))
}

/// Removes the node side: hooks and chains, our rules at 100–103, tables 100–102,
/// the tunnels, and the ipset when `destroy_ipset`.
pub async fn teardown_node(
    ns: &Netns,
    nl: &Netlink,
    backend: Backend,
    destroy_ipset: bool,
) -> Result<(), GeneveError> {
    let label = nl.netns().to_string();
    ns.run_async(move || -> Result<(), GeneveError> {
        let ipt = |source| GeneveError::Iptables {
            netns: label.clone(),
            source,
        };
        let current = save_tables(backend, &super::node_rules::TABLES).map_err(ipt)?;
        restore_batches(backend, &node_cleanup_batches(&current)).map_err(ipt)?;
        if destroy_ipset {
            ipset::restore(&ipset::destroy_line()).map_err(|source| GeneveError::Ipset {
                netns: label.clone(),
                source,
            })?;
        }
        Ok(())
    })
    .await??;
    nl.delete_rules_where(is_node_rule).await?;
    for t in [TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY] {
        nl.flush_table(t).await?;
    }
    for name in NODE_LINKS {
        nl.delete_link(name).await?;
    }
    Ok(())
}

/// Runs ipset `batch` (one or more lines) in the node namespace.
pub async fn ipset_batch(ns: &Netns, label: &str, batch: String) -> Result<(), GeneveError> {
    let label = label.to_string();
    ns.run_async(move || {
        ipset::restore(&batch).map_err(|source| GeneveError::Ipset {
            netns: label,
            source,
        })
    })
    .await?
}

/// ipset entries (IP → UID comment), `None` if the set is missing.
pub async fn ipset_entries(
    ns: &Netns,
    label: &str,
) -> Result<Option<std::collections::BTreeMap<Ipv4Addr, String>>, GeneveError> {
    let label = label.to_string();
    ns.run_async(move || {
        ipset::list().map_err(|source| GeneveError::Ipset {
            netns: label,
            source,
        })
    })
    .await?
}

/// Per-pod enrolment: ipset entry, then the pod's table-100 route when
/// `route` is given (through `istioin`, or `unreachable` while held) and,
/// for a tunnel route, `rp_filter=0` on the pod's host device (failure only
/// logged).
///
/// `new_pod`: the pod was not enrolled before; if its route cannot be added,
/// its new ipset entry is removed again, so a failed enrolment leaves no
/// half capture (outbound captured, inbound not).
pub async fn add_pod(
    ns: &Netns,
    nl: &Netlink,
    route: Option<Route>,
    ip: Ipv4Addr,
    uid: &str,
    sysctls: &SysctlRoot,
    new_pod: bool,
) -> Result<(), GeneveError> {
    let line = ipset::add_line(ip, uid).map_err(|source| GeneveError::Ipset {
        netns: nl.netns().to_string(),
        source,
    })?;
    ipset_batch(ns, nl.netns(), ipset::create_line() + &line).await?;
    let Some(route) = route else {
        return Ok(());
    };
    if let Err(e) = nl.replace_route(&route).await {
        if new_pod && let Err(undo) = ipset_batch(ns, nl.netns(), ipset::del_line(ip)).await {
            warn!(pod_ip = %ip, uid, error = %undo, "cannot remove the ipset entry of a pod whose route failed");
        }
        return Err(e.into());
    }
    if route.kind == RouteKind::Unicast
        && let Err(e) = pod_rp_filter(ns, nl, ip, sysctls).await
    {
        warn!(pod_ip = %ip, uid, error = %e, "cannot set rp_filter on the pod's host device");
    }
    Ok(())
}

/// `rp_filter=0` on the node device that leads to pod `ip`.
pub async fn pod_rp_filter(
    ns: &Netns,
    nl: &Netlink,
    ip: Ipv4Addr,
    sysctls: &SysctlRoot,
) -> Result<(), GeneveError> {
    let dev = nl.route_get(ip, Some(MARK_SKIP)).await?.dev;
    if NODE_LINKS.contains(&dev.as_str()) {
        return Ok(());
    }
    let label = nl.netns().to_string();
    let sysctls = sysctls.clone();
    ns.run_async(move || {
        sysctls
            .apply(&sysctl::pod_settings(&dev))
            .map_err(|source| GeneveError::Sysctl {
                netns: label,
                source,
            })
    })
    .await?
}

/// Per-pod removal: ipset entry and every table-100 `/32` route to `ip`
/// (through `istioin` or held).
pub async fn remove_pod(ns: &Netns, nl: &Netlink, ip: Ipv4Addr) -> Result<(), GeneveError> {
    ipset_batch(ns, nl.netns(), ipset::del_line(ip)).await?;
    for r in nl.routes(TABLE_INBOUND).await? {
        if is_any_pod_route(&r) && r.dst.addr() == ip {
            nl.delete_route(&r).await?;
        }
    }
    Ok(())
}
