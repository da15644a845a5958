//! Applying and removing the in-pod redirection in one pod netns: the rules,
//! either iptables ([`super::rules`]: one `iptables-restore --noflush` run per
//! family, each table its own atomic `COMMIT` block, only the tables that
//! change) or native nftables ([`super::rules_nft`]: one `nft -f` transaction
//! for all tables), and the policy routing of [`super::routing`].
//!
//! Everything here is idempotent: applying twice changes nothing the second
//! time (with iptables no restore is even run; the nft transaction rewrites
//! our tables to the same content), and removal deletes exactly what apply
//! added (our chains or tables, the jumps into them, our rule and route),
//! leaving every other rule in the netns alone.
//!
//! This is also the API for tests that need capture rules in a netns (e.g.
//! dedicated-mode ztunnel tests): [`apply_pod`] / [`remove_pod`].

use std::path::PathBuf;

use crate::redirect::iptables::{self, Backend, Family, IptablesError, Ruleset};
use crate::redirect::netns::{Netns, NetnsError};
use crate::redirect::nftables::{self, NftError};

use super::routing::{self, RoutingError, RoutingState};
use super::rules::{self, Ownership, PodRuleOptions, RuleConfig, TableRules};
use super::rules_nft;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("netns {netns}: reading {family:?} rules: {source}")]
    Read {
        netns: PathBuf,
        family: Family,
        #[source]
        source: IptablesError,
    },
    #[error("netns {netns}: writing {family:?} rules: {source}")]
    Write {
        netns: PathBuf,
        family: Family,
        #[source]
        source: IptablesError,
    },
    #[error("netns {netns}: nftables: {source}")]
    Nft {
        netns: PathBuf,
        #[source]
        source: NftError,
    },
    #[error("netns {netns}: policy routing: {source}")]
    Routing {
        netns: PathBuf,
        #[source]
        source: RoutingError,
    },
}

/// What programs the capture rules, in pod netns and on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleEngine {
    /// iptables with the node's backend (detected in the host netns).
    Iptables(Backend),
    /// Native nftables (`NATIVE_NFTABLES=true`).
    Nftables,
}

impl From<Backend> for RuleEngine {
    fn from(b: Backend) -> Self {
        RuleEngine::Iptables(b)
    }
}

impl std::fmt::Display for RuleEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleEngine::Iptables(b) => write!(f, "iptables ({b})"),
            RuleEngine::Nftables => f.write_str("nftables"),
        }
    }
}

/// How to program a pod netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetConfig {
    pub engine: RuleEngine,
    /// Also program IPv6 (`AMBIENT_IPV6`).
    pub ipv6: bool,
    pub rules: RuleConfig,
}

impl PodNetConfig {
    fn families(&self) -> &'static [Family] {
        if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }
}

/// Brings the calling thread's netns to `desired` for what `owned` covers,
/// for one family. Returns true when something had to change.
pub fn sync_family_here(
    backend: Backend,
    family: Family,
    desired: &[TableRules],
    owned: Ownership,
    netns: &std::path::Path,
) -> Result<bool, ApplyError> {
    let saved = iptables::save(backend, family, None).map_err(|source| ApplyError::Read {
        netns: netns.to_path_buf(),
        family,
        source,
    })?;
    let batch = rules::sync_batch(desired, owned, &Ruleset::parse(&saved));
    if batch.is_empty() {
        return Ok(false);
    }
    tracing::debug!(netns = %netns.display(), ?family, %batch, "iptables-restore");
    iptables::restore(backend, family, &batch).map_err(|source| ApplyError::Write {
        netns: netns.to_path_buf(),
        family,
        source,
    })?;
    Ok(true)
}

/// Applies the pod rules and policy routing in the calling thread's netns.
/// `label` names the netns in errors.
pub fn apply_pod_here(
    cfg: &PodNetConfig,
    opts: &PodRuleOptions,
    label: &std::path::Path,
) -> Result<(), ApplyError> {
    match cfg.engine {
        RuleEngine::Iptables(backend) => {
            for &family in cfg.families() {
                let want = rules::pod_rules(&cfg.rules, opts, family);
                sync_family_here(backend, family, &want, rules::POD_OWNERSHIP, label)?;
            }
        }
        RuleEngine::Nftables => {
            let script = rules_nft::pod_script(&cfg.rules, opts, cfg.ipv6);
            tracing::debug!(netns = %label.display(), %script, "nft -f");
            nft_here(&script, label)?;
        }
    }
    routing::ensure_here(cfg.ipv6).map_err(|source| ApplyError::Routing {
        netns: label.to_path_buf(),
        source,
    })
}

fn nft_here(script: &str, label: &std::path::Path) -> Result<(), ApplyError> {
    nftables::apply(script, &format!("pod rules in netns {}", label.display())).map_err(|source| {
        ApplyError::Nft {
            netns: label.to_path_buf(),
            source,
        }
    })
}

/// Removes the pod rules of `engine` only (both families), not the policy
/// routing both engines share: also for clearing what the other engine left
/// after `NATIVE_NFTABLES` was switched with pods enrolled.
pub fn remove_rules_here(
    engine: impl Into<RuleEngine>,
    label: &std::path::Path,
) -> Result<(), ApplyError> {
    match engine.into() {
        RuleEngine::Iptables(backend) => {
            for family in [Family::V4, Family::V6] {
                sync_family_here(backend, family, &[], rules::POD_OWNERSHIP, label)?;
            }
            Ok(())
        }
        RuleEngine::Nftables => nft_here(&rules_nft::remove_pod_script(), label),
    }
}

/// Removes the pod rules (both families, whatever `cfg.ipv6` says, so a
/// changed setting leaves nothing behind) and our policy routing.
pub fn remove_pod_here(
    engine: impl Into<RuleEngine>,
    label: &std::path::Path,
) -> Result<(), ApplyError> {
    remove_rules_here(engine, label)?;
    routing::remove_here().map_err(|source| ApplyError::Routing {
        netns: label.to_path_buf(),
        source,
    })
}

/// Applies the in-pod redirection in `netns` (on a dedicated thread).
pub async fn apply_pod(
    netns: &Netns,
    cfg: &PodNetConfig,
    opts: &PodRuleOptions,
) -> Result<(), ApplyError> {
    let (cfg, opts, label) = (cfg.clone(), opts.clone(), netns.path().to_path_buf());
    netns
        .run_async(move || apply_pod_here(&cfg, &opts, &label))
        .await?
}

/// Removes the in-pod redirection from `netns` (on a dedicated thread).
pub async fn remove_pod(netns: &Netns, engine: impl Into<RuleEngine>) -> Result<(), ApplyError> {
    let (engine, label) = (engine.into(), netns.path().to_path_buf());
    netns
        .run_async(move || remove_pod_here(engine, &label))
        .await?
}

/// [`remove_rules_here`] in `netns` (on a dedicated thread).
pub async fn remove_rules(netns: &Netns, engine: RuleEngine) -> Result<(), ApplyError> {
    let label = netns.path().to_path_buf();
    netns
        .run_async(move || remove_rules_here(engine, &label))
        .await?
}

/// Our nftables tables in `netns` as `nft -s list table` prints them (absent
/// tables left out), plus the routing state. For tests and diagnostics.
pub fn inspect_pod_nft(netns: &Netns) -> Result<(Vec<String>, RoutingState), ApplyError> {
    let label = netns.path().to_path_buf();
    netns.run(move || {
        let mut tables = Vec::new();
        for name in rules_nft::POD_TABLES {
            let listed = nftables::list_table(name).map_err(|source| ApplyError::Nft {
                netns: label.clone(),
                source,
            })?;
            tables.extend(listed);
        }
        let routing = routing::inspect_here().map_err(|source| ApplyError::Routing {
            netns: label.clone(),
            source,
        })?;
        Ok((tables, routing))
    })?
}

/// Our rules and routing objects as present in `netns`: per family the
/// [`rules::owned_view`] of `iptables-save`, plus the routing state. For
/// tests and diagnostics.
pub fn inspect_pod(
    netns: &Netns,
    backend: Backend,
) -> Result<(Vec<(Family, OwnedView)>, RoutingState), ApplyError> {
    let label = netns.path().to_path_buf();
    netns.run(move || {
        let mut views = Vec::new();
        for family in [Family::V4, Family::V6] {
            let saved =
                iptables::save(backend, family, None).map_err(|source| ApplyError::Read {
                    netns: label.clone(),
                    family,
                    source,
                })?;
            views.push((
                family,
                rules::owned_view(&Ruleset::parse(&saved), rules::POD_OWNERSHIP),
            ));
        }
        let routing = routing::inspect_here().map_err(|source| ApplyError::Routing {
            netns: label.clone(),
            source,
        })?;
        Ok((views, routing))
    })?
}

/// See [`rules::owned_view`].
pub type OwnedView = std::collections::BTreeMap<(String, String), Vec<String>>;
