//! Pure generators for the in-pod capture rules (inside each pod's netns) and
//! the host probe-SNAT rule, for IPv4 and IPv6.
//!
//! Rules are written exactly as `iptables-save` prints them back (so a
//! read-back compares equal without guessing at normalisations): both the nft
//! and the legacy backend print the same text for these rules.
//!
//! Values (marks, ports, chain names) follow Istio's in-pod mode, see
//! `shared/reference/redirection-inpod.md`; the rule letters in comments
//! (M1, N2, ...) refer to the table there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::redirect::iptables::{Family, Ruleset};

/// Pod chains hooked from PREROUTING / OUTPUT.
pub const CHAIN_PRERT: &str = "ISTIO_PRERT";
pub const CHAIN_OUTPUT: &str = "ISTIO_OUTPUT";
/// Host chain hooked from nat POSTROUTING.
pub const CHAIN_POSTRT: &str = "ISTIO_POSTRT";

/// ztunnel's `SO_MARK` (`PACKET_MARK` = 1337).
pub const ZTUNNEL_MARK: u32 = 0x539;
/// Connection mark of ztunnel's inbound upstream connections.
pub const CONN_MARK: u32 = 0x111;
pub const MARK_MASK: u32 = 0xfff;

pub const PORT_OUTBOUND: u16 = 15001;
pub const PORT_INBOUND_PLAIN: u16 = 15006;
pub const PORT_HBONE: u16 = 15008;
pub const PORT_DNS: u16 = 15053;

pub const DEFAULT_PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
pub const DEFAULT_PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);
pub const DEFAULT_PROBE_IPSET_V4: &str = "istio-inpod-probes-v4";
pub const DEFAULT_PROBE_IPSET_V6: &str = "istio-inpod-probes-v6";

/// Pod annotations that change the rules.
pub const ANNOTATION_DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
pub const ANNOTATION_BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";
pub const ANNOTATION_REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

/// Node-wide settings of the rule generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    /// Source the host SNATs kubelet probes to (`HOST_PROBE_SNAT_IP`).
    pub probe_snat_v4: Ipv4Addr,
    /// `HOST_PROBE_SNAT_IPV6`.
    pub probe_snat_v6: Ipv6Addr,
    /// Host ipsets holding enrolled pod IPs.
    pub probe_ipset_v4: String,
    pub probe_ipset_v6: String,
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self {
            probe_snat_v4: DEFAULT_PROBE_SNAT_V4,
            probe_snat_v6: DEFAULT_PROBE_SNAT_V6,
            probe_ipset_v4: DEFAULT_PROBE_IPSET_V4.into(),
            probe_ipset_v6: DEFAULT_PROBE_IPSET_V6.into(),
        }
    }
}

impl RuleConfig {
    fn probe_snat(&self, family: Family) -> String {
        match family {
            Family::V4 => self.probe_snat_v4.to_string(),
            Family::V6 => self.probe_snat_v6.to_string(),
        }
    }

    pub fn probe_ipset(&self, family: Family) -> &str {
        match family {
            Family::V4 => &self.probe_ipset_v4,
            Family::V6 => &self.probe_ipset_v6,
        }
    }
}

/// Per-pod rule variant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodRuleOptions {
    /// DNS capture (raw table, UDP/TCP 53 → 15053).
    pub dns_capture: bool,
    /// `ambient.istio.io/bypass-inbound-capture: "true"`: no inbound capture.
    pub bypass_inbound: bool,
    /// `istio.io/reroute-virtual-interfaces`: TCP arriving on these
    /// interfaces is treated as outbound.
    pub reroute_interfaces: Vec<String>,
}

/// An annotation value that was ignored (logged as a warning by the
/// caller; enrolment goes on, as upstream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsWarning {
    #[error(
        "annotation {annotation}: {value:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False); ignored, using the default"
    )]
    NotBool {
        annotation: &'static str,
        value: String,
    },
    #[error(
        "annotation {annotation}: {name:?} is not a valid interface name (optionally with a trailing '+' wildcard); ignored"
    )]
    BadInterface {
        annotation: &'static str,
        name: String,
    },
}

impl PodRuleOptions {
    /// Derives the variant from the node's DNS setting (`AMBIENT_DNS_CAPTURE`)
    /// and the pod's annotations. As upstream, a value that cannot be used
    /// does not fail the pod: a non-boolean is treated as absent (the
    /// default) and an invalid interface name is dropped; each is returned
    /// for the caller to log.
    pub fn from_annotations(
        global_dns_capture: bool,
        annotations: &BTreeMap<String, String>,
    ) -> (Self, Vec<OptionsWarning>) {
        let mut warnings = Vec::new();
        let mut flag = |annotation: &'static str, default: bool| {
            let Some(v) = annotations.get(annotation) else {
                return default;
            };
            parse_bool(v).unwrap_or_else(|| {
                warnings.push(OptionsWarning::NotBool {
                    annotation,
                    value: v.clone(),
                });
                default
            })
        };
        let dns_capture = flag(ANNOTATION_DNS_CAPTURE, global_dns_capture);
        let bypass_inbound = flag(ANNOTATION_BYPASS_INBOUND, false);
        let mut reroute_interfaces: Vec<String> = Vec::new();
        if let Some(list) = annotations.get(ANNOTATION_REROUTE_VIRTUAL_INTERFACES) {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !valid_interface_name(name) {
                    warnings.push(OptionsWarning::BadInterface {
                        annotation: ANNOTATION_REROUTE_VIRTUAL_INTERFACES,
                        name: name.into(),
                    });
                } else if !reroute_interfaces.iter().any(|n| n == name) {
                    reroute_interfaces.push(name.to_string());
                }
            }
        }
        let opts = Self {
            dns_capture,
            bypass_inbound,
            reroute_interfaces,
        };
        (opts, warnings)
    }
}

/// Go's `strconv.ParseBool`, which upstream uses for these annotations.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Linux interface names (1..=15 bytes, no '/', whitespace or ':'),
/// optionally ending with iptables' '+' wildcard (a prefix match, e.g.
/// `tap+`). A lone `+` (every interface) and `!` are refused so a name can
/// never turn all inbound traffic into outbound, or invert a match.
fn valid_interface_name(name: &str) -> bool {
    let base = name.strip_suffix('+').unwrap_or(name);
    !base.is_empty()
        && name.len() <= 15
        && base != "."
        && base != ".."
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// A jump from a built-in chain into one of our chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub builtin: &'static str,
    pub target: &'static str,
    /// Inserted at position 1 (`-I`) instead of appended (`-A`).
    pub first: bool,
}

impl Hook {
    const fn append(builtin: &'static str, target: &'static str) -> Self {
        Self {
            builtin,
            target,
            first: false,
        }
    }

    /// The rule as `iptables-save` prints it (without `-A <builtin>`).
    pub fn rule(&self) -> String {
        format!("-j {}", self.target)
    }
}

/// What we want in one table: our chains with their rules, and the hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    /// (chain, rules in order, each without `-A <chain>`).
    pub chains: Vec<(&'static str, Vec<String>)>,
    pub hooks: Vec<Hook>,
}

/// The set of tables/chains a rule owner manages: everything else in the
/// netns is left alone.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    pub tables: &'static [&'static str],
    pub chains: &'static [&'static str],
}

/// What the pod rules own in a pod netns.
pub const POD_OWNERSHIP: Ownership = Ownership {
    tables: &["mangle", "nat", "raw"],
    chains: &[CHAIN_PRERT, CHAIN_OUTPUT],
};

/// What the probe-SNAT rules own in the host netns.
pub const HOST_OWNERSHIP: Ownership = Ownership {
    tables: &["nat"],
    chains: &[CHAIN_POSTRT],
};

fn loopback(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.1/32",
        Family::V6 => "::1/128",
    }
}

fn host_prefix(family: Family) -> &'static str {
    match family {
        Family::V4 => "/32",
        Family::V6 => "/128",
    }
}

/// The rules for a pod netns, in table order mangle, nat, raw.
pub fn pod_rules(cfg: &RuleConfig, opts: &PodRuleOptions, family: Family) -> Vec<TableRules> {
    let mark = format!("{ZTUNNEL_MARK:#x}/{MARK_MASK:#x}");
    let cmark = format!("{CONN_MARK:#x}/{MARK_MASK:#x}");
    let lo = loopback(family);
    let probe = format!("{}{}", cfg.probe_snat(family), host_prefix(family));

    let mangle = TableRules {
        table: "mangle",
        chains: vec![
            (
                CHAIN_PRERT,
                // M1
                vec![format!(
                    "-m mark --mark {mark} -j CONNMARK --set-xmark {cmark}"
                )],
            ),
            (
                CHAIN_OUTPUT,
                // M2
                vec![format!(
                    "-m connmark --mark {cmark} -j CONNMARK --restore-mark \
                     --nfmask 0xffffffff --ctmask 0xffffffff"
                )],
            ),
        ],
        hooks: vec![
            Hook::append("PREROUTING", CHAIN_PRERT),
            Hook::append("OUTPUT", CHAIN_OUTPUT),
        ],
    };

    let mut prert = Vec::new();
    for ifname in &opts.reroute_interfaces {
        // V1, V2
        prert.push(format!(
            "-i {ifname} -p tcp -j REDIRECT --to-ports {PORT_OUTBOUND}"
        ));
        prert.push(format!("-i {ifname} -p tcp -j RETURN"));
    }
    if !opts.bypass_inbound {
        // N1, N2
        prert.push(format!("-s {probe} -p tcp -m tcp -j ACCEPT"));
        prert.push(format!(
            "! -d {lo} -p tcp -m tcp ! --dport {PORT_HBONE} -m mark ! --mark {mark} \
             -j REDIRECT --to-ports {PORT_INBOUND_PLAIN}"
        ));
    }
    let mut output = vec![format!("-d {probe} -p tcp -m tcp -j ACCEPT")]; // O1
    if opts.dns_capture {
        // O2, O3
        output.push(format!(
            "! -o lo -p udp -m mark ! --mark {mark} -m udp --dport 53 \
             -j REDIRECT --to-ports {PORT_DNS}"
        ));
        output.push(format!(
            "! -d {lo} -p tcp -m tcp --dport 53 -m mark ! --mark {mark} \
             -j REDIRECT --to-ports {PORT_DNS}"
        ));
    }
    output.push(format!("-p tcp -m mark --mark {cmark} -j ACCEPT")); // O4
    output.push(format!("! -d {lo} -o lo -j ACCEPT")); // O5
    output.push(format!(
        "! -d {lo} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {PORT_OUTBOUND}"
    )); // O6

    let nat = TableRules {
        table: "nat",
        chains: vec![(CHAIN_PRERT, prert), (CHAIN_OUTPUT, output)],
        hooks: vec![
            Hook::append("PREROUTING", CHAIN_PRERT),
            Hook::append("OUTPUT", CHAIN_OUTPUT),
        ],
    };

    let mut tables = vec![mangle, nat];
    if opts.dns_capture {
        tables.push(TableRules {
            table: "raw",
            chains: vec![
                (
                    // R2
                    CHAIN_PRERT,
                    vec![format!(
                        "-p udp -m mark ! --mark {mark} -m udp --sport 53 -j CT --zone 1"
                    )],
                ),
                (
                    // R1
                    CHAIN_OUTPUT,
                    vec![format!(
                        "-p udp -m mark --mark {mark} -m udp --dport 53 -j CT --zone 1"
                    )],
                ),
            ],
            hooks: vec![
                Hook::append("PREROUTING", CHAIN_PRERT),
                Hook::append("OUTPUT", CHAIN_OUTPUT),
            ],
        });
    }
    tables
}

/// The host (node netns) probe-SNAT rules.
pub fn host_rules(cfg: &RuleConfig, family: Family) -> Vec<TableRules> {
    vec![TableRules {
        table: "nat",
        chains: vec![(
            CHAIN_POSTRT,
            vec![format!(
                "-p tcp -m owner --socket-exists -m set --match-set {} dst -j SNAT --to-source {}",
                cfg.probe_ipset(family),
                cfg.probe_snat(family)
            )],
        )],
        hooks: vec![Hook {
            builtin: "POSTROUTING",
            target: CHAIN_POSTRT,
            first: true,
        }],
    }]
}

/// The `iptables-restore --noflush` input that turns `existing` (the netns'
/// current rules) into `desired` for everything `owned`, and touches nothing
/// else:
/// - a chain whose rules differ is redeclared (emptied) and refilled, a
///   chain that already matches is not mentioned;
/// - a hook is added only when absent (duplicates are removed);
/// - owned chains that are not desired (e.g. the raw table after DNS capture
///   was turned off) lose their hooks and are deleted.
///
/// Empty output means nothing needs to change. `remove` is `sync` with an
/// empty `desired`.
pub fn sync_batch(desired: &[TableRules], owned: Ownership, existing: &Ruleset) -> String {
    let mut out = String::new();
    for &table in owned.tables {
        let want = desired.iter().find(|t| t.table == table);
        let have = existing.tables.get(table);
        let mut decls: Vec<String> = Vec::new();
        let mut lines: Vec<String> = Vec::new();
        let mut hooks_kept: Vec<Hook> = Vec::new();

        if let Some(want) = want {
            for (chain, rules) in &want.chains {
                let current = have.and_then(|t| t.chains.get(*chain));
                if current != Some(rules) {
                    decls.push(format!(":{chain} - [0:0]"));
                    lines.extend(rules.iter().map(|r| format!("-A {chain} {r}")));
                }
            }
            for hook in &want.hooks {
                let n = count_rule(have, hook.builtin, &hook.rule());
                if n == 0 {
                    lines.push(if hook.first {
                        format!("-I {} 1 {}", hook.builtin, hook.rule())
                    } else {
                        format!("-A {} {}", hook.builtin, hook.rule())
                    });
                }
                for _ in 1..n.max(1) {
                    lines.push(format!("-D {} {}", hook.builtin, hook.rule()));
                }
                hooks_kept.push(*hook);
            }
        }

        // Owned chains present but not wanted in this table: unhook, delete.
        if let Some(have) = have {
            for &chain in owned.chains {
                let wanted = want.is_some_and(|w| w.chains.iter().any(|(c, _)| *c == chain));
                if wanted || !have.chains.contains_key(chain) {
                    continue;
                }
                let jump = format!("-j {chain}");
                for (builtin, rules) in &have.chains {
                    if owned.chains.contains(&builtin.as_str()) {
                        continue;
                    }
                    if hooks_kept
                        .iter()
                        .any(|h| h.builtin == builtin && h.target == chain)
                    {
                        continue;
                    }
                    for rule in rules.iter().filter(|r| **r == jump) {
                        lines.push(format!("-D {builtin} {rule}"));
                    }
                }
                lines.push(format!("-F {chain}"));
                lines.push(format!("-X {chain}"));
            }
        }

        if !decls.is_empty() || !lines.is_empty() {
            let _ = writeln!(out, "*{table}");
            for l in decls.into_iter().chain(lines) {
                let _ = writeln!(out, "{l}");
            }
            let _ = writeln!(out, "COMMIT");
        }
    }
    out
}

fn count_rule(table: Option<&crate::redirect::iptables::Table>, chain: &str, rule: &str) -> usize {
    table
        .and_then(|t| t.chains.get(chain))
        .map(|rules| rules.iter().filter(|r| *r == rule).count())
        .unwrap_or(0)
}

/// The batch applied to a netns that has none of our rules: what the golden
/// files hold.
pub fn fresh_batch(desired: &[TableRules], owned: Ownership) -> String {
    sync_batch(desired, owned, &Ruleset::default())
}

/// The part of a netns' rules that `owned` is responsible for: owned chains
/// and the jumps into them from other chains. Used to compare a read-back
/// with a golden, and to check that removal left nothing behind.
pub fn owned_view(rules: &Ruleset, owned: Ownership) -> BTreeMap<(String, String), Vec<String>> {
    let mut view = BTreeMap::new();
    for &table in owned.tables {
        let Some(t) = rules.tables.get(table) else {
            continue;
        };
        for (chain, chain_rules) in &t.chains {
            if owned.chains.contains(&chain.as_str()) {
                view.insert((table.to_string(), chain.clone()), chain_rules.clone());
            } else {
                let jumps: Vec<String> = chain_rules
                    .iter()
                    .filter(|r| owned.chains.iter().any(|c| r.contains(&format!("-j {c}"))))
                    .cloned()
                    .collect();
                if !jumps.is_empty() {
                    view.insert((table.to_string(), chain.clone()), jumps);
                }
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dns: bool, bypass: bool, ifs: &[&str]) -> PodRuleOptions {
        PodRuleOptions {
            dns_capture: dns,
            bypass_inbound: bypass,
            reroute_interfaces: ifs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(global_dns: bool, pairs: &[(&str, &str)]) -> PodRuleOptions {
        let (o, warnings) = PodRuleOptions::from_annotations(global_dns, &ann(pairs));
        assert_eq!(warnings, vec![], "{pairs:?}");
        o
    }

    #[test]
    fn options_from_annotations() {
        assert_eq!(parse(false, &[]), opts(false, false, &[]));
        assert!(parse(true, &[]).dns_capture);
        // per-pod override both ways
        assert!(parse(false, &[(ANNOTATION_DNS_CAPTURE, "true")]).dns_capture);
        assert!(!parse(true, &[(ANNOTATION_DNS_CAPTURE, "False")]).dns_capture);
        let o = parse(
            false,
            &[
                (ANNOTATION_BYPASS_INBOUND, "true"),
                (ANNOTATION_REROUTE_VIRTUAL_INTERFACES, "eth1, tun0,,eth1"),
            ],
        );
        assert_eq!(o, opts(false, true, &["eth1", "tun0"]));
    }

    /// Every spelling Go's `strconv.ParseBool` accepts (upstream parses these
    /// annotations with it).
    #[test]
    fn boolean_annotations_accept_go_parsebool_values() {
        for (v, want) in [
            ("1", true),
            ("t", true),
            ("T", true),
            ("TRUE", true),
            ("true", true),
            ("True", true),
            ("0", false),
            ("f", false),
            ("F", false),
            ("FALSE", false),
            ("false", false),
            ("False", false),
        ] {
            assert_eq!(
                parse(!want, &[(ANNOTATION_DNS_CAPTURE, v)]).dns_capture,
                want,
                "{v}"
            );
            let o = parse(false, &[(ANNOTATION_BYPASS_INBOUND, v)]);
            assert_eq!(o.bypass_inbound, want, "{v}");
        }
    }

    /// Anything else is ignored with a warning naming the annotation: the
    /// default applies and the pod is still enrolled.
    #[test]
    fn other_boolean_values_fall_back_to_the_default_with_a_warning() {
        for v in ["yes", "enabled", "tRUE", " true", "", "2"] {
            for global in [false, true] {
                let (o, w) = PodRuleOptions::from_annotations(
                    global,
                    &ann(&[(ANNOTATION_DNS_CAPTURE, v), (ANNOTATION_BYPASS_INBOUND, v)]),
                );
                assert_eq!(o, opts(global, false, &[]), "{v:?}");
                assert_eq!(w.len(), 2, "{v:?}: {w:?}");
                assert!(
                    w[0].to_string().contains(ANNOTATION_DNS_CAPTURE),
                    "{}",
                    w[0]
                );
                assert!(
                    w[1].to_string().contains(ANNOTATION_BYPASS_INBOUND),
                    "{}",
                    w[1]
                );
            }
        }
    }

    /// iptables' trailing `+` wildcard is allowed; invalid names are dropped
    /// with a warning, the valid ones kept.
    #[test]
    fn interface_wildcards_are_allowed_and_bad_names_dropped() {
        let o = parse(
            false,
            &[(ANNOTATION_REROUTE_VIRTUAL_INTERFACES, "tap+, eth0,eth+")],
        );
        assert_eq!(o.reroute_interfaces, vec!["tap+", "eth0", "eth+"]);
        for bad in [
            "+",
            "e+th",
            "eth++",
            "a b",
            "!eth0",
            "averyveryverylongname",
            "x/y",
            "..",
            "..+",
        ] {
            let (o, w) = PodRuleOptions::from_annotations(
                false,
                &ann(&[(
                    ANNOTATION_REROUTE_VIRTUAL_INTERFACES,
                    &format!("tun0,{bad}"),
                )]),
            );
            assert_eq!(o.reroute_interfaces, vec!["tun0"], "{bad:?}");
            assert_eq!(w.len(), 1, "{bad:?}");
            assert!(
                w[0].to_string()
                    .contains(ANNOTATION_REROUTE_VIRTUAL_INTERFACES),
                "{}",
                w[0]
            );
        }
        let rules = pod_rules(&RuleConfig::default(), &o_ifs(&["tap+"]), Family::V4);
        assert_eq!(
            rules[1].chains[0].1[0],
            "-i tap+ -p tcp -j REDIRECT --to-ports 15001"
        );
    }

    fn o_ifs(ifs: &[&str]) -> PodRuleOptions {
        opts(false, false, ifs)
    }

    #[test]
    fn ipv6_rules_use_ipv6_addresses_only() {
        let cfg = RuleConfig::default();
        let batch = fresh_batch(
            &pod_rules(&cfg, &opts(true, false, &[]), Family::V6),
            POD_OWNERSHIP,
        );
        assert!(!batch.contains("127.0.0.1"));
        assert!(!batch.contains("169.254"));
        assert!(batch.contains("::1/128"));
        assert!(batch.contains("fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128"));
    }

    #[test]
    fn variants_differ_as_documented() {
        let cfg = RuleConfig::default();
        let base = pod_rules(&cfg, &opts(false, false, &[]), Family::V4);
        assert_eq!(base.len(), 2, "no raw table without DNS capture");
        let dns = pod_rules(&cfg, &opts(true, false, &[]), Family::V4);
        assert_eq!(dns[2].table, "raw");
        assert_eq!(dns[1].chains[1].1.len(), base[1].chains[1].1.len() + 2);
        let bypass = pod_rules(&cfg, &opts(false, true, &[]), Family::V4);
        assert!(bypass[1].chains[0].1.is_empty(), "no inbound capture");
        let vif = pod_rules(&cfg, &opts(false, false, &["eth9"]), Family::V4);
        assert!(vif[1].chains[0].1[0].starts_with("-i eth9 "));
        assert!(vif[1].chains[0].1[1].ends_with("-j RETURN"));
    }

    #[test]
    fn sync_against_itself_is_empty_and_remove_deletes_only_ours() {
        let cfg = RuleConfig::default();
        let want = pod_rules(&cfg, &opts(true, false, &[]), Family::V4);
        let fresh = fresh_batch(&want, POD_OWNERSHIP);
        // Simulate the netns after applying, plus a foreign rule and chain.
        let mut saved = fresh.replace("-I POSTROUTING 1", "-A POSTROUTING");
        saved = saved.replacen(
            "*nat\n",
            "*nat\n:FOREIGN - [0:0]\n-A OUTPUT -j FOREIGN\n-A FOREIGN -j RETURN\n",
            1,
        );
        let existing = Ruleset::parse(&saved);
        assert_eq!(sync_batch(&want, POD_OWNERSHIP, &existing), "");

        let rm = sync_batch(&[], POD_OWNERSHIP, &existing);
        assert!(rm.contains("-D PREROUTING -j ISTIO_PRERT"));
        assert!(rm.contains("-X ISTIO_OUTPUT"));
        assert!(!rm.contains("FOREIGN"));
        assert_eq!(rm.matches("COMMIT").count(), 3);

        // DNS capture turned off: raw chains go, others untouched.
        let less = pod_rules(&cfg, &opts(false, false, &[]), Family::V4);
        let b = sync_batch(&less, POD_OWNERSHIP, &existing);
        assert!(b.contains("*raw\n-D PREROUTING -j ISTIO_PRERT"), "{b}");
        assert!(!b.contains("*mangle"), "{b}");
        assert!(b.contains("*nat\n:ISTIO_OUTPUT - [0:0]"), "{b}");
    }

    #[test]
    fn duplicate_hooks_are_reduced_to_one() {
        let cfg = RuleConfig::default();
        let want = host_rules(&cfg, Family::V4);
        let saved = format!(
            "*nat\n:ISTIO_POSTRT - [0:0]\n-A POSTROUTING -j ISTIO_POSTRT\n-A POSTROUTING -j ISTIO_POSTRT\n-A ISTIO_POSTRT {}\nCOMMIT\n",
            want[0].chains[0].1[0]
        );
        let b = sync_batch(&want, HOST_OWNERSHIP, &Ruleset::parse(&saved));
        assert_eq!(b, "*nat\n-D POSTROUTING -j ISTIO_POSTRT\nCOMMIT\n");
    }
}
