//! Host side of in-pod mode: the kubelet-probe SNAT rule (nat `ISTIO_POSTRT`,
//! hooked first in POSTROUTING) and the ipsets of enrolled pod IPs it matches
//! (`istio-inpod-probes-v4` / `-v6`).
//!
//! ipset is driven through `ipset restore -exist` batches (no netlink crate
//! for it is worth the dependency); like iptables, the command acts on the
//! calling thread's netns, so every `_here` function must run inside
//! [`crate::redirect::netns::Netns::run`] for the host netns.
//!
//! Entries carry the pod UID as their ipset comment, so a start-up reconcile
//! can tell which pod an IP belongs to.
//!
//! With native nftables the same state lives in the host table
//! `inet istio-ambient-nat` (sets and chain, [`super::rules_nft`]);
//! [`HostProbe`] dispatches between the two.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use crate::redirect::batch_input::{self, BatchFailure};
use crate::redirect::iptables::{Backend, Family};
use crate::redirect::nftables::{self, NftError};

use super::apply::{ApplyError, RuleEngine, sync_family_here};
use super::rules::{self, RuleConfig};
use super::rules_nft;

/// A probe set (ipset, or nft set with native nftables) could not be read
/// or changed.
#[derive(Debug, thiserror::Error)]
pub enum IpsetError {
    #[error("cannot run ipset {action}: {source}")]
    Spawn {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ipset {action} on {set} failed ({status}): {stderr}")]
    Failed {
        action: &'static str,
        set: String,
        status: String,
        stderr: String,
    },
    #[error(
        "probe sets {set} in nft table inet {}: {source}",
        rules_nft::HOST_TABLE
    )]
    Nft {
        set: String,
        #[source]
        source: NftError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Rules(Box<ApplyError>),
    #[error(transparent)]
    Ipset(#[from] IpsetError),
}

impl From<ApplyError> for HostError {
    fn from(e: ApplyError) -> Self {
        HostError::Rules(Box::new(e))
    }
}

/// The host half of in-pod mode with its rule engine: the probe SNAT and
/// the sets of enrolled pod IPs. Every `_here` method runs `iptables`,
/// `ipset` or `nft` in the calling thread's netns (the host's).
#[derive(Debug, Clone)]
pub struct HostProbe {
    pub engine: RuleEngine,
    pub rules: RuleConfig,
}

impl HostProbe {
    /// Creates the sets if missing and brings the SNAT rules to their
    /// desired state.
    pub fn ensure_here(&self, ipv6: bool, label: &Path) -> Result<(), HostError> {
        match self.engine {
            RuleEngine::Iptables(backend) => ensure_host_here(backend, &self.rules, ipv6, label),
            RuleEngine::Nftables => self
                .nft(&rules_nft::host_script(&self.rules, ipv6))
                .map_err(HostError::from),
        }
    }

    /// Removes the SNAT rules and the sets.
    pub fn remove_here(&self, label: &Path) -> Result<(), HostError> {
        match self.engine {
            RuleEngine::Iptables(backend) => remove_host_here(backend, &self.rules, label),
            RuleEngine::Nftables => self
                .nft(&rules_nft::remove_host_script())
                .map_err(HostError::from),
        }
    }

    /// Adds `ips` to the probe sets, commented with `uid`; an IP whose
    /// family has no set gets no probe SNAT.
    pub fn add_ips_here(&self, uid: &str, ips: &[IpAddr]) -> Result<(), IpsetError> {
        match self.engine {
            RuleEngine::Iptables(_) => add_ips_here(&self.rules, uid, ips),
            RuleEngine::Nftables => self.nft(&rules_nft::add_elements_script(
                &self.rules,
                safe_comment(uid),
                ips,
                &self.nft_sets()?,
            )),
        }
    }

    /// Removes `ips` from the probe sets whoever they belong to.
    pub fn del_ips_here(&self, ips: &[IpAddr]) -> Result<(), IpsetError> {
        match self.engine {
            RuleEngine::Iptables(_) => del_ips_here(&self.rules, ips),
            RuleEngine::Nftables => self.nft(&rules_nft::del_elements_script(
                &self.rules,
                ips,
                &self.nft_sets()?,
            )),
        }
    }

    /// Removes pod `uid`'s entries among `ips` (see [`del_pod_ips_here`]).
    pub fn del_pod_ips_here(&self, uid: &str, ips: &[IpAddr]) -> Result<(), IpsetError> {
        match self.engine {
            RuleEngine::Iptables(_) => del_pod_ips_here(&self.rules, uid, ips),
            RuleEngine::Nftables => {
                // One listing gives both the members and which sets exist.
                let sets = self.nft_host_sets()?;
                let members: Vec<_> = sets.iter().flat_map(|s| s.members.clone()).collect();
                let names: Vec<String> = sets.into_iter().map(|s| s.name).collect();
                self.nft(&rules_nft::del_elements_script(
                    &self.rules,
                    &pod_entries(&members, uid, ips),
                    &names,
                ))
            }
        }
    }

    /// Members of the probe sets: (IP, comment = pod UID if any).
    pub fn members_here(&self) -> Result<Vec<(IpAddr, Option<String>)>, IpsetError> {
        match self.engine {
            RuleEngine::Iptables(_) => members_here(&self.rules),
            RuleEngine::Nftables => Ok(self
                .nft_host_sets()?
                .into_iter()
                .flat_map(|s| s.members)
                .collect()),
        }
    }

    /// Our probe sets that exist in the host table.
    fn nft_sets(&self) -> Result<Vec<String>, IpsetError> {
        Ok(self.nft_host_sets()?.into_iter().map(|s| s.name).collect())
    }

    /// Our probe sets in the host table with their members: one `nft`
    /// listing of that table only (none when it does not exist).
    fn nft_host_sets(&self) -> Result<Vec<rules_nft::HostSet>, IpsetError> {
        let what = format!("table inet {}", rules_nft::HOST_TABLE);
        let json = nftables::query(
            &["-j", "list", "table", "inet", rules_nft::HOST_TABLE],
            &what,
        )
        .map_err(|source| self.nft_error(source))?;
        let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
            return Ok(Vec::new());
        };
        let sets = rules_nft::parse_host_sets(&json)
            .map_err(|reason| self.nft_error(NftError::Output { what, reason }))?;
        Ok(sets
            .into_iter()
            .filter(|s| s.name == self.rules.probe_ipset_v4 || s.name == self.rules.probe_ipset_v6)
            .collect())
    }

    fn nft(&self, script: &str) -> Result<(), IpsetError> {
        if script.trim().is_empty() {
            // Nothing to change (e.g. no set of that family): no process.
            return Ok(());
        }
        nftables::apply(
            script,
            &format!("host probe SNAT (table inet {})", rules_nft::HOST_TABLE),
        )
        .map_err(|source| self.nft_error(source))
    }

    fn nft_error(&self, source: NftError) -> IpsetError {
        IpsetError::Nft {
            set: both_sets(&self.rules),
            source,
        }
    }
}

/// The rule engine other than `engine` when the node (the calling thread's
/// netns) still has its host state, left from before `NATIVE_NFTABLES` was
/// switched: our nft host table, or our iptables chain or probe ipsets
/// (`backend`: the configured iptables backend, else detected). `None` when
/// there is none, or the other engine's tools are missing (then nothing of it
/// can be there to remove).
pub fn leftover_engine_here(
    engine: RuleEngine,
    backend: Option<Backend>,
    cfg: &RuleConfig,
) -> Option<RuleEngine> {
    match engine {
        RuleEngine::Iptables(_) => nftables::list_table(rules_nft::HOST_TABLE)
            .ok()
            .flatten()
            .map(|_| RuleEngine::Nftables),
        RuleEngine::Nftables => {
            let backend = backend.unwrap_or_else(crate::redirect::iptables::detect_backend);
            let chain = [Family::V4, Family::V6].into_iter().any(|family| {
                crate::redirect::iptables::save(backend, family, Some("nat"))
                    .is_ok_and(|out| out.contains(rules::CHAIN_POSTRT))
            });
            let sets = [&cfg.probe_ipset_v4, &cfg.probe_ipset_v6]
                .into_iter()
                .any(|set| set_exists(set).unwrap_or(false));
            (chain || sets).then_some(RuleEngine::Iptables(backend))
        }
    }
}

fn family_of(ip: &IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn ipset_family(f: Family) -> &'static str {
    match f {
        Family::V4 => "inet",
        Family::V6 => "inet6",
    }
}

/// A comment ipset accepts without quoting trouble (pod UIDs are UUIDs).
fn safe_comment(uid: &str) -> Option<&str> {
    (!uid.is_empty()
        && uid.len() <= 255
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
    .then_some(uid)
}

fn ipset_restore(action: &'static str, set: &str, input: &str) -> Result<(), IpsetError> {
    batch_input::apply("ipset", &["restore", "-exist"], input).map_err(|e| match e {
        BatchFailure::Spawn(source) => IpsetError::Spawn { action, source },
        BatchFailure::Refused { status, stderr } => IpsetError::Failed {
            action,
            set: set.to_string(),
            status,
            stderr,
        },
    })
}

fn both_sets(cfg: &RuleConfig) -> String {
    format!("{}/{}", cfg.probe_ipset_v4, cfg.probe_ipset_v6)
}

/// Creates the probe ipset(s) if missing and brings the SNAT rules to their
/// desired state.
pub fn ensure_host_here(
    backend: Backend,
    cfg: &RuleConfig,
    ipv6: bool,
    label: &Path,
) -> Result<(), HostError> {
    let families: &[Family] = if ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &family in families {
        let set = cfg.probe_ipset(family);
        ipset_restore(
            "create",
            set,
            &format!(
                "create {set} hash:ip family {} comment\n",
                ipset_family(family)
            ),
        )?;
        sync_family_here(
            backend,
            family,
            &rules::host_rules(cfg, family),
            rules::HOST_OWNERSHIP,
            label,
        )?;
    }
    Ok(())
}

/// Removes the SNAT rules (both families) and destroys the ipsets.
pub fn remove_host_here(backend: Backend, cfg: &RuleConfig, label: &Path) -> Result<(), HostError> {
    for family in [Family::V4, Family::V6] {
        sync_family_here(backend, family, &[], rules::HOST_OWNERSHIP, label)?;
        let set = cfg.probe_ipset(family);
        if set_exists(set)? {
            ipset_restore("destroy", set, &format!("destroy {set}\n"))?;
        }
    }
    Ok(())
}

fn set_exists(set: &str) -> Result<bool, IpsetError> {
    let out = Command::new("ipset")
        .args(["list", "-n"])
        .output()
        .map_err(|source| IpsetError::Spawn {
            action: "list",
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == set))
}

/// Adds `ips` to the probe sets, commented with `uid`. Sets of a family not
/// enabled (no set) are skipped: the IP simply gets no probe SNAT.
pub fn add_ips_here(cfg: &RuleConfig, uid: &str, ips: &[IpAddr]) -> Result<(), IpsetError> {
    let mut input = String::new();
    let comment = safe_comment(uid)
        .map(|c| format!(" comment \"{c}\""))
        .unwrap_or_default();
    for ip in ips {
        let set = cfg.probe_ipset(family_of(ip));
        if !set_exists(set)? {
            continue;
        }
        input.push_str(&format!("add {set} {ip}{comment}\n"));
    }
    if input.is_empty() {
        return Ok(());
    }
    ipset_restore("add", &both_sets(cfg), &input)
}

/// Removes `ips` from the probe sets whoever they belong to (missing
/// entries are fine): for pruning IPs no enrolled pod has.
pub fn del_ips_here(cfg: &RuleConfig, ips: &[IpAddr]) -> Result<(), IpsetError> {
    let mut input = String::new();
    for ip in ips {
        let set = cfg.probe_ipset(family_of(ip));
        if !set_exists(set)? {
            continue;
        }
        input.push_str(&format!("del {set} {ip}\n"));
    }
    if input.is_empty() {
        return Ok(());
    }
    ipset_restore("del", &both_sets(cfg), &input)
}

/// Removes pod `uid`'s entries among `ips`: only those whose comment is that
/// UID. After IP reuse the entry belongs to the newer pod, and a late
/// unenrol of the old one must leave it alone. Reading and deleting are two
/// steps: the caller serialises every probe-ipset change.
pub fn del_pod_ips_here(cfg: &RuleConfig, uid: &str, ips: &[IpAddr]) -> Result<(), IpsetError> {
    let ours = pod_entries(&members_here(cfg)?, uid, ips);
    del_ips_here(cfg, &ours)
}

/// The IPs among `ips` that `members` holds for pod `uid` (entries written
/// without a comment, for a UID unfit for one, match such a UID only).
fn pod_entries(members: &[(IpAddr, Option<String>)], uid: &str, ips: &[IpAddr]) -> Vec<IpAddr> {
    let want = safe_comment(uid);
    members
        .iter()
        .filter(|(ip, comment)| ips.contains(ip) && comment.as_deref() == want)
        .map(|(ip, _)| *ip)
        .collect()
}

/// Members of the probe sets: (IP, comment = pod UID if any).
pub fn members_here(cfg: &RuleConfig) -> Result<Vec<(IpAddr, Option<String>)>, IpsetError> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let set = cfg.probe_ipset(family);
        if !set_exists(set)? {
            continue;
        }
        let res = Command::new("ipset")
            .args(["save", set])
            .output()
            .map_err(|source| IpsetError::Spawn {
                action: "save",
                source,
            })?;
        if !res.status.success() {
            return Err(IpsetError::Failed {
                action: "save",
                set: set.to_string(),
                status: res.status.to_string(),
                stderr: String::from_utf8_lossy(&res.stderr).trim().to_string(),
            });
        }
        out.extend(parse_members(&String::from_utf8_lossy(&res.stdout)));
    }
    Ok(out)
}

fn parse_members(save: &str) -> Vec<(IpAddr, Option<String>)> {
    save.lines()
        .filter_map(|l| l.strip_prefix("add "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let _set = words.next()?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            let comment = rest
                .split_once(" comment \"")
                .and_then(|(_, c)| c.split_once('"'))
                .map(|(c, _)| c.to_string());
            Some((ip, comment))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipset_save() {
        let save = "create s hash:ip family inet hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x1\n\
                    add s 10.0.0.5 comment \"abc-123\"\n\
                    add s 10.0.0.6\n";
        let m = parse_members(save);
        assert_eq!(
            m,
            vec![
                ("10.0.0.5".parse().unwrap(), Some("abc-123".to_string())),
                ("10.0.0.6".parse().unwrap(), None)
            ]
        );
    }

    #[test]
    fn pod_entries_match_ip_and_uid() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let members = vec![
            (ip("10.9.0.1"), Some("uid-b".to_string())),
            (ip("10.9.0.2"), Some("uid-a".to_string())),
            (ip("10.9.0.3"), None),
        ];
        let all = [ip("10.9.0.1"), ip("10.9.0.2"), ip("10.9.0.3")];
        assert_eq!(pod_entries(&members, "uid-a", &all), vec![ip("10.9.0.2")]);
        assert_eq!(pod_entries(&members, "uid-b", &all), vec![ip("10.9.0.1")]);
        assert!(pod_entries(&members, "uid-a", &[ip("10.9.0.1")]).is_empty());
        // a UID unfit for a comment was written without one
        assert_eq!(pod_entries(&members, "a\"b", &all), vec![ip("10.9.0.3")]);
    }

    #[test]
    fn comments_are_restricted() {
        assert_eq!(safe_comment("0b1c-22"), Some("0b1c-22"));
        assert_eq!(safe_comment("a\"b"), None);
        assert_eq!(safe_comment(""), None);
    }
}
