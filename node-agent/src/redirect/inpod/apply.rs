//! Applying and removing the in-pod redirection in one pod netns: the
//! iptables rules of [`super::rules`] (one `iptables-restore --noflush` run per
//! family, each table its own atomic `COMMIT` block, only the tables that
//! change) and the policy routing of [`super::routing`].
//!
//! Everything here is idempotent: applying twice changes nothing the second
//! time (no restore is even run), and removal deletes exactly what apply
//! added (our chains, the jumps into them, our rule and route), leaving every
//! other rule in the netns alone.
//!
//! This is also the API for tests that need capture rules in a netns (e.g.
//! dedicated-mode ztunnel tests): [`apply_pod`] / [`remove_pod`].

use std::path::PathBuf;

use crate::redirect::iptables::{self, Backend, Family, IptablesError, Ruleset};
use crate::redirect::netns::{Netns, NetnsError};

use super::routing::{self, RoutingError, RoutingState};
use super::rules::{self, Ownership, PodRuleOptions, RuleConfig, TableRules};

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
    #[error("netns {netns}: policy routing: {source}")]
    Routing {
        netns: PathBuf,
        #[source]
        source: RoutingError,
    },
}

/// How to program a pod netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetConfig {
    /// The node's iptables backend (detected in the host netns).
    pub backend: Backend,
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
    for &family in cfg.families() {
        let want = rules::pod_rules(&cfg.rules, opts, family);
        sync_family_here(cfg.backend, family, &want, rules::POD_OWNERSHIP, label)?;
    }
    routing::ensure_here(cfg.ipv6).map_err(|source| ApplyError::Routing {
        netns: label.to_path_buf(),
        source,
    })
}

/// Removes the pod rules (both families, whatever `cfg.ipv6` says, so a
/// changed setting leaves nothing behind) and our policy routing.
pub fn remove_pod_here(backend: Backend, label: &std::path::Path) -> Result<(), ApplyError> {
    for family in [Family::V4, Family::V6] {
        sync_family_here(backend, family, &[], rules::POD_OWNERSHIP, label)?;
    }
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
pub async fn remove_pod(netns: &Netns, backend: Backend) -> Result<(), ApplyError> {
    let label = netns.path().to_path_buf();
    netns
        .run_async(move || remove_pod_here(backend, &label))
        .await?
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
