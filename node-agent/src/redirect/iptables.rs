//! iptables plumbing shared by the redirection modes: backend detection, one
//! `iptables-restore --noflush --wait=30` batch per table and family, and
//! reading rules back with `iptables-save`.
//!
//! Everything here runs `iptables-*` processes, which inherit the network
//! namespace of the calling thread: call it from inside
//! [`super::netns::Netns::run`], never from an async runtime thread.
//!
//! Rule *generation* lives with each mode (`inpod`, `geneve`) as pure
//! functions with golden files; this module only applies and reads back.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use super::batch_input::{self, BatchFailure};

/// Which iptables implementation programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

/// Address family: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl Backend {
    fn variant(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// e.g. `iptables-nft-restore`.
    pub fn restore_command(self, family: Family) -> String {
        format!("{}-{}-restore", family.prefix(), self.variant())
    }

    /// e.g. `ip6tables-legacy-save`.
    pub fn save_command(self, family: Family) -> String {
        format!("{}-{}-save", family.prefix(), self.variant())
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.variant())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{command} gave up after {waited_secs}s waiting for the xtables lock \
         (/run/xtables.lock, held by another iptables user such as kube-proxy) \
         applying table {table}: {stderr}"
    )]
    LockTimeout {
        command: String,
        table: String,
        waited_secs: u64,
        stderr: String,
    },
    #[error("{command} failed ({status}) applying table {table}: {stderr}")]
    Restore {
        command: String,
        table: String,
        status: String,
        stderr: String,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Save {
        command: String,
        status: String,
        stderr: String,
    },
}

/// Chains that Kubernetes components create in the backend they use.
const KUBE_HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// Picks the backend the node's other components (kubelet, kube-proxy) use,
/// as upstream does: nft if `iptables-nft-save -t mangle` shows a Kubernetes
/// hint chain; else legacy if `iptables-legacy-save -t mangle` shows one;
/// else nft. Runs in the calling thread's netns.
pub fn detect_backend() -> Backend {
    for backend in [Backend::Nft, Backend::Legacy] {
        if let Ok(out) = save(backend, Family::V4, Some("mangle"))
            && KUBE_HINT_CHAINS.iter().any(|c| out.contains(c))
        {
            return backend;
        }
    }
    Backend::Nft
}

/// How long a restore waits for the xtables lock (`/run/xtables.lock`, which
/// the legacy backend takes per table and which every netns on the node
/// shares, since it is a file): kube-proxy and our own concurrent
/// enrolments hold it briefly. Upstream waits 30 s on the host too. Without
/// a bound, legacy `iptables-restore` either gives up at once (older
/// releases) or waits forever (1.8.8 and later); the nft backend accepts the
/// flag and ignores it.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Applies `input` (one or more `*table ... COMMIT` blocks) atomically per
/// table with `<family>-<backend>-restore --noflush`, waiting up to
/// [`LOCK_WAIT`] for the xtables lock. Chains declared with `:NAME - [0:0]`
/// are created or emptied first, so re-applying the same batch leaves the
/// same rules.
pub fn restore(backend: Backend, family: Family, input: &str) -> Result<(), IptablesError> {
    restore_waiting(backend, family, input, LOCK_WAIT)
}

/// [`restore`] with an explicit bound on the wait for the xtables lock
/// (whole seconds, at least one); giving up is [`IptablesError::LockTimeout`].
pub fn restore_waiting(
    backend: Backend,
    family: Family,
    input: &str,
    lock_wait: Duration,
) -> Result<(), IptablesError> {
    let command = backend.restore_command(family);
    let args = restore_args(lock_wait);
    let waited_secs = lock_wait.as_secs().max(1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match batch_input::apply(&command, &args, input) {
        Ok(()) => Ok(()),
        Err(BatchFailure::Spawn(source)) => Err(IptablesError::Spawn { command, source }),
        Err(BatchFailure::Refused { status, stderr }) => {
            let table = tables_in(input).join(",");
            Err(if is_lock_timeout(&stderr) {
                IptablesError::LockTimeout {
                    command,
                    table,
                    waited_secs,
                    stderr,
                }
            } else {
                IptablesError::Restore {
                    command,
                    table,
                    status,
                    stderr,
                }
            })
        }
    }
}

/// `--noflush --wait=<secs>` (at least one second: `--wait=0` is not a
/// bound every release reads alike).
fn restore_args(lock_wait: Duration) -> [String; 2] {
    [
        "--noflush".to_string(),
        format!("--wait={}", lock_wait.as_secs().max(1)),
    ]
}

/// Legacy iptables' message when the lock stays busy ("Another app is
/// currently holding the xtables lock. Stopped waiting after 1s.").
fn is_lock_timeout(stderr: &str) -> bool {
    stderr.contains("holding the xtables lock") || stderr.contains("Can't lock /run/xtables.lock")
}

/// `<family>-<backend>-save [-t table]` output.
pub fn save(
    backend: Backend,
    family: Family,
    table: Option<&str>,
) -> Result<String, IptablesError> {
    let command = backend.save_command(family);
    let mut cmd = Command::new(&command);
    if let Some(t) = table {
        cmd.args(["-t", t]);
    }
    let out = cmd.output().map_err(|source| IptablesError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(IptablesError::Save {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tables_in(input: &str) -> Vec<String> {
    input
        .lines()
        .filter_map(|l| l.strip_prefix('*'))
        .map(|t| t.trim().to_string())
        .collect()
}

/// `iptables-save` output parsed into tables → chains → rules, with the
/// comments and counters dropped. Rules keep their `-A CHAIN` prefix removed,
/// in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: BTreeMap<String, Table>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    /// Chain name → rules (the text after `-A <chain> `), in order.
    pub chains: BTreeMap<String, Vec<String>>,
}

impl Ruleset {
    pub fn parse(save_output: &str) -> Self {
        let mut rs = Ruleset::default();
        let mut current: Option<String> = None;
        for line in save_output.lines() {
            let line = line.trim_end();
            if line.starts_with('#') || line.is_empty() || line == "COMMIT" {
                continue;
            }
            if let Some(t) = line.strip_prefix('*') {
                current = Some(t.to_string());
                rs.tables.entry(t.to_string()).or_default();
                continue;
            }
            let Some(table) = current.as_ref().and_then(|t| rs.tables.get_mut(t)) else {
                continue;
            };
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    table.chains.entry(name.to_string()).or_default();
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                table
                    .chains
                    .entry(chain.to_string())
                    .or_default()
                    .push(rule.to_string());
            }
        }
        rs
    }

    pub fn chain(&self, table: &str, chain: &str) -> Option<&[String]> {
        self.tables.get(table)?.chains.get(chain).map(Vec::as_slice)
    }

    pub fn has_chain(&self, table: &str, chain: &str) -> bool {
        self.chain(table, chain).is_some()
    }

    /// True when `chain` in `table` holds exactly `rule` (as `iptables-save`
    /// prints it, without `-A <chain>`).
    pub fn has_rule(&self, table: &str, chain: &str, rule: &str) -> bool {
        self.chain(table, chain)
            .is_some_and(|rules| rules.iter().any(|r| r == rule))
    }

    /// Every chain, in any table, whose name starts with `prefix`.
    pub fn chains_with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.tables.iter().flat_map(move |(t, tab)| {
            tab.chains
                .keys()
                .filter(move |c| c.starts_with(prefix))
                .map(move |c| (t.as_str(), c.as_str()))
        })
    }

    /// Every rule, in any table and chain, that mentions `needle`.
    pub fn rules_mentioning<'a>(
        &'a self,
        needle: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str, &'a str)> {
        self.tables.iter().flat_map(move |(t, tab)| {
            tab.chains.iter().flat_map(move |(c, rules)| {
                rules
                    .iter()
                    .filter(move |r| r.contains(needle))
                    .map(move |r| (t.as_str(), c.as_str(), r.as_str()))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
COMMIT
";

    #[test]
    fn parses_save_output() {
        let rs = Ruleset::parse(SAVE);
        assert!(rs.has_chain("nat", "ISTIO_OUTPUT"));
        assert!(rs.has_chain("mangle", "PREROUTING"));
        assert!(!rs.has_chain("mangle", "ISTIO_OUTPUT"));
        assert!(rs.has_rule("nat", "OUTPUT", "-j ISTIO_OUTPUT"));
        assert_eq!(rs.chain("nat", "ISTIO_OUTPUT").unwrap().len(), 2);
        assert_eq!(rs.chains_with_prefix("ISTIO_").count(), 1);
        assert_eq!(rs.rules_mentioning("ISTIO_OUTPUT").count(), 1);
        assert_eq!(rs.rules_mentioning("0x539").count(), 1);
    }

    #[test]
    fn command_names() {
        assert_eq!(
            Backend::Nft.restore_command(Family::V4),
            "iptables-nft-restore"
        );
        assert_eq!(
            Backend::Legacy.save_command(Family::V6),
            "ip6tables-legacy-save"
        );
    }

    #[test]
    fn lock_timeout_is_recognised_and_names_the_table() {
        let stderr = "Can't lock /run/xtables.lock: Resource temporarily unavailable\n\
                      Another app is currently holding the xtables lock. Stopped waiting after 1s.";
        assert!(is_lock_timeout(stderr));
        assert!(!is_lock_timeout("iptables-restore: line 3 failed"));
        let e = IptablesError::LockTimeout {
            command: "iptables-legacy-restore".into(),
            table: "nat,mangle".into(),
            waited_secs: 30,
            stderr: stderr.into(),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("30s") && msg.contains("xtables lock") && msg.contains("table nat,mangle"),
            "{msg}"
        );
    }

    /// The restore tool is asked to wait, boundedly, for the lock, in the
    /// spelling both backends accept (`iptables-nft-restore` ignores it).
    #[test]
    fn restore_asks_for_a_bounded_lock_wait() {
        assert_eq!(restore_args(LOCK_WAIT), ["--noflush", "--wait=30"]);
        assert_eq!(
            restore_args(Duration::from_millis(10)),
            ["--noflush", "--wait=1"]
        );
    }

    #[test]
    fn tables_named_in_batch() {
        assert_eq!(
            tables_in("*nat\nCOMMIT\n*mangle\nCOMMIT\n"),
            vec!["nat", "mangle"]
        );
    }
}
