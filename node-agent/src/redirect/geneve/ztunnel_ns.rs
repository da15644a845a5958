//! Kernel work in the ztunnel pod's namespace: `pistioin`/`pistioout`,
//! sysctls, TPROXY rules, rules 20000/20003 and tables 100–102.

use super::GeneveError;
use super::constants::*;
use super::node::{
    RuleOwnership, Topology, ensure_links, restore_batches, save_tables, sync_routes, sync_rules,
};
use super::routing::{ZTUNNEL_RULE_PRIORITIES, ztunnel_routes, ztunnel_rules};
use super::sysctl::{self, SysctlRoot};
use super::ztunnel_rules::{ZtunnelRuleParams, ztunnel_apply_batches, ztunnel_cleanup_batches};
use crate::redirect::iptables::Backend;
use crate::redirect::netlink::Netlink;
use crate::redirect::netns::Netns;

/// Tables the ztunnel netns rules live in.
const TABLES: [&str; 2] = ["mangle", "nat"];

/// Builds (or refreshes) the ztunnel side against `topo`.
pub async fn build_ztunnel(
    ns: &Netns,
    nl: &Netlink,
    topo: &Topology,
    backend: Backend,
    sysctls: &SysctlRoot,
) -> Result<(), GeneveError> {
    ensure_links(nl, &topo.ztunnel_links()).await?;
    // The ztunnel pod's settings die with it: nothing to restore.
    let sysctls = sysctls.without_journal();
    let label = nl.netns().to_string();
    let iface = topo.ztunnel.iface.clone();
    let params = topo.ztunnel_rule_params();
    ns.run_async(move || -> Result<(), GeneveError> {
        sysctls
            .apply(&sysctl::ztunnel_settings(&iface))
            .map_err(|source| GeneveError::Sysctl {
                netns: label.clone(),
                source,
            })?;
        restore_batches(backend, &ztunnel_apply_batches(&params)).map_err(|source| {
            GeneveError::Iptables {
                netns: label.clone(),
                source,
            }
        })
    })
    .await??;
    sync_routes(
        nl,
        &[TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY],
        &ztunnel_routes(topo.host_ip, &topo.ztunnel.iface),
        |_| false,
    )
    .await?;
    sync_rules(
        nl,
        ZTUNNEL_RULE_PRIORITIES,
        &ztunnel_rules(),
        RuleOwnership::WholeRange,
    )
    .await?;
    Ok(())
}

/// Removes what [`build_ztunnel`] made: our TPROXY/mark rules (others in the
/// pod's chains stay), rules 20000–20003, tables 100–102 and the tunnels.
pub async fn teardown_ztunnel(
    ns: &Netns,
    nl: &Netlink,
    params: &ZtunnelRuleParams,
    backend: Backend,
) -> Result<(), GeneveError> {
    let label = nl.netns().to_string();
    let params = params.clone();
    ns.run_async(move || -> Result<(), GeneveError> {
        let ipt = |source| GeneveError::Iptables {
            netns: label.clone(),
            source,
        };
        let current = save_tables(backend, &TABLES).map_err(ipt)?;
        restore_batches(backend, &ztunnel_cleanup_batches(&params, &current)).map_err(ipt)
    })
    .await??;
    nl.delete_rules_in(ZTUNNEL_RULE_PRIORITIES).await?;
    for t in [TABLE_INBOUND, TABLE_OUTBOUND, TABLE_PROXY] {
        nl.flush_table(t).await?;
    }
    for name in [ZTUNNEL_INBOUND_LINK, ZTUNNEL_OUTBOUND_LINK] {
        nl.delete_link(name).await?;
    }
    Ok(())
}
