//! Serde types of the local-config `policies` entries (upstream ztunnel's
//! `LOCAL_XDS_PATH` schema, see `shared/reference/local-config.md`).
//!
//! Keys are camelCase and unknown keys are rejected. String matches are YAML
//! tagged values (`!Exact x`, `!Prefix x`, `!Suffix x`, `!Presence`); the map
//! form (`Exact: x`) is rejected as upstream does. Everything serializes (JSON
//! for `/config_dump`, YAML round-trips to the tagged form).
//!
//! Matching semantics (used by `policy::evaluate`):
//! - a policy matches when ANY of its rules matches; no rules: never matches;
//! - a rule matches when ALL of its clauses match; no clauses: always matches;
//! - a clause matches when ANY of its matches matches; no matches: matches;
//! - a match matches when every non-empty field is satisfied (positive list:
//!   any entry matches; `not*` list: no entry matches). A match with every
//!   field empty never matches (upstream ztunnel behaviour).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::de::{self, EnumAccess, MapAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One L4 authorization policy (a `policies` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// OR over rules; a rule is AND over clauses; a clause is OR over matches.
    /// Absent or empty: the policy matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Evaluate and log, never enforce.
    #[serde(default)]
    pub dry_run: bool,
}

/// AND over clauses. An empty rule matches every connection.
pub type Rule = Vec<Clause>;
/// OR over matches. An empty clause matches every connection.
pub type Clause = Vec<Match>;

impl Authorization {
    /// `"<namespace>/<name>"`, the key workloads use in `authorizationPolicies`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Every workload (policies of the root namespace without a selector).
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// Workloads listing `"<ns>/<name>"` in their `authorizationPolicies`.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Ours (upstream ztunnel has no AUDIT): a match is logged, the decision
    /// is unaffected.
    Audit,
}

/// A set of conditions on one connection; every non-empty field must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// Source identity's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// Source identity's namespace and service account, exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source identity without `spiffe://`: `<td>/ns/<ns>/sa/<sa>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// True when no field is set (such a match never matches).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}

/// `{namespace, serviceAccount}`, compared exactly with the source identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// A string condition. YAML: `!Exact x`, `!Prefix x`, `!Suffix x`, `!Presence`
/// (also the untagged word `Presence`, which is how serde writes it back).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Istio's policy-language wildcard form: `*` = presence, `*x` = suffix,
    /// `x*` = prefix, anything else exact (a `*` elsewhere is literal).
    pub fn from_istio_pattern(pattern: &str) -> StringMatch {
        if pattern == "*" {
            StringMatch::Presence
        } else if let Some(rest) = pattern.strip_prefix('*') {
            StringMatch::Suffix(rest.to_owned())
        } else if let Some(rest) = pattern.strip_suffix('*') {
            StringMatch::Prefix(rest.to_owned())
        } else {
            StringMatch::Exact(pattern.to_owned())
        }
    }

    /// Whether `value` satisfies the condition. An empty value only satisfies
    /// `Exact("")`/`Prefix("")`/`Suffix("")`; callers pass `None` (no value)
    /// separately so that absence never matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(x) => value == x,
            StringMatch::Prefix(x) => value.starts_with(x.as_str()),
            StringMatch::Suffix(x) => value.ends_with(x.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

#[derive(Deserialize)]
enum StringMatchTag {
    Exact,
    Prefix,
    Suffix,
    Presence,
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StringMatchVisitor;

        impl<'de> Visitor<'de> for StringMatchVisitor {
            type Value = StringMatch;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a tagged string match: !Exact x, !Prefix x, !Suffix x or !Presence")
            }

            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<StringMatch, A::Error> {
                let (tag, variant) = data.variant::<StringMatchTag>()?;
                Ok(match tag {
                    StringMatchTag::Exact => StringMatch::Exact(variant.newtype_variant()?),
                    StringMatchTag::Prefix => StringMatch::Prefix(variant.newtype_variant()?),
                    StringMatchTag::Suffix => StringMatch::Suffix(variant.newtype_variant()?),
                    StringMatchTag::Presence => {
                        variant.unit_variant()?;
                        StringMatch::Presence
                    }
                })
            }

            /// The unit variant serialized without a tag (`Presence`).
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringMatch, E> {
                if v == "Presence" {
                    Ok(StringMatch::Presence)
                } else {
                    Err(de::Error::invalid_value(de::Unexpected::Str(v), &self))
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<StringMatch, A::Error> {
                Err(de::Error::custom(
                    "string match in map form (`Exact: x`) is not accepted; \
                     write it as a YAML tag: `!Exact x`, `!Prefix x`, `!Suffix x` or `!Presence`",
                ))
            }
        }

        // `deserialize_any` so that YAML tags arrive as enums and the untagged
        // map form arrives as a map (rejected above).
        deserializer.deserialize_any(StringMatchVisitor)
    }
}

/// A CIDR block. Accepts `10.0.0.0/8` or a bare address (`/32`, `/128`);
/// serializes as CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock(pub IpNet);

impl IpBlock {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        // Compare in the block's family; an IPv4-mapped IPv6 peer address is
        // compared as IPv4 (dual-stack sockets report 4-in-6 addresses).
        match (self.0, ip) {
            (IpNet::V4(net), IpAddr::V6(v6)) => {
                v6.to_ipv4_mapped().is_some_and(|v4| net.contains(&v4))
            }
            (net, ip) => net.contains(ip),
        }
    }
}

/// A value that is neither an IP address nor a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IP block {value:?}: expected an address or CIDR such as 10.0.0.0/8")]
pub struct IpBlockParseError {
    pub value: String,
}

impl FromStr for IpBlock {
    type Err = IpBlockParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let err = || IpBlockParseError {
            value: s.to_owned(),
        };
        if s.contains('/') {
            s.parse::<IpNet>().map(IpBlock).map_err(|_| err())
        } else {
            s.parse::<IpAddr>()
                .map(|ip| IpBlock(IpNet::from(ip)))
                .map_err(|_| err())
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Vec<Authorization>, serde_yaml_ng::Error> {
        serde_yaml_ng::from_str(yaml)
    }

    const FULL: &str = r#"
- name: allow-x
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: true
  rules:
  - - - namespaces: [!Exact x, !Prefix pre-]
        notNamespaces: [!Suffix -bad]
        serviceAccounts: [{namespace: x, serviceAccount: client}]
        notServiceAccounts: [{namespace: x, serviceAccount: evil}]
        principals:
        - !Exact cluster.local/ns/x/sa/client
        - !Presence
        notPrincipals: [!Prefix cluster.local/ns/y/]
        sourceIps: [10.0.0.0/8, 192.168.1.1]
        notSourceIps: ["fd00::/8"]
        destinationIps: ["::1"]
        notDestinationIps: [172.16.0.0/12]
        destinationPorts: [80, 8080]
        notDestinationPorts: [9999]
    - - destinationPorts: [443]
"#;

    #[test]
    fn parses_every_field() {
        let pols = parse(FULL).unwrap();
        assert_eq!(pols.len(), 1);
        let p = &pols[0];
        assert_eq!(p.key(), "default/allow-x");
        assert_eq!(p.scope, Scope::WorkloadSelector);
        assert_eq!(p.action, Action::Allow);
        assert!(p.dry_run);
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].len(), 2);
        let m = &p.rules[0][0][0];
        assert_eq!(
            m.namespaces,
            vec![
                StringMatch::Exact("x".into()),
                StringMatch::Prefix("pre-".into())
            ]
        );
        assert_eq!(m.not_namespaces, vec![StringMatch::Suffix("-bad".into())]);
        assert_eq!(m.service_accounts[0].service_account, "client");
        assert_eq!(m.not_service_accounts[0].service_account, "evil");
        assert_eq!(m.principals[1], StringMatch::Presence);
        assert_eq!(
            m.not_principals,
            vec![StringMatch::Prefix("cluster.local/ns/y/".into())]
        );
        assert_eq!(m.source_ips[1].to_string(), "192.168.1.1/32");
        assert_eq!(m.not_source_ips[0].to_string(), "fd00::/8");
        assert_eq!(m.destination_ips[0].to_string(), "::1/128");
        assert_eq!(m.not_destination_ips[0].to_string(), "172.16.0.0/12");
        assert_eq!(m.destination_ports, vec![80, 8080]);
        assert_eq!(m.not_destination_ports, vec![9999]);
        assert_eq!(p.rules[0][1][0].destination_ports, vec![443]);
    }

    #[test]
    fn yaml_round_trip_keeps_tags() {
        let pols = parse(FULL).unwrap();
        let out = serde_yaml_ng::to_string(&pols).unwrap();
        assert!(out.contains("!Exact x"), "{out}");
        // Serde writes the unit variant untagged; both forms parse.
        assert!(out.contains("- Presence"), "{out}");
        assert!(out.contains("dryRun: true"), "{out}");
        assert_eq!(parse(&out).unwrap(), pols);
    }

    #[test]
    fn json_serialization_for_config_dump() {
        let pols = parse(FULL).unwrap();
        let v = serde_json::to_value(&pols[0]).unwrap();
        assert_eq!(v["scope"], "WorkloadSelector");
        assert_eq!(v["dryRun"], true);
        let m = &v["rules"][0][0][0];
        assert_eq!(m["namespaces"][0]["Exact"], "x");
        assert_eq!(m["principals"][1], "Presence");
        assert_eq!(m["sourceIps"][1], "192.168.1.1/32");
        assert_eq!(m["notDestinationPorts"][0], 9999);
        // Empty fields are omitted.
        assert!(v["rules"][0][1][0].get("namespaces").is_none());
    }

    #[test]
    fn defaults_for_optional_keys() {
        let p = parse("- {name: a, namespace: b, scope: Global, action: Deny}").unwrap();
        assert!(p[0].rules.is_empty());
        assert!(!p[0].dry_run);
        let p = parse("- {name: a, namespace: b, scope: Namespace, action: Audit, rules: [[]]}")
            .unwrap();
        assert_eq!(p[0].action, Action::Audit);
        assert_eq!(p[0].rules, vec![Vec::<Clause>::new()]);
    }

    #[test]
    fn rejects_invalid_input() {
        let cases: &[(&str, &str)] = &[
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, extra: 1}",
                "unknown field `extra`",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{bogus: []}]]]}",
                "unknown field `bogus`",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{namespaces: [{Exact: x}]}]]]}",
                "map form",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{namespaces: [x]}]]]}",
                "tagged string match",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{namespaces: [!Glob x]}]]]}",
                "unknown variant `Glob`",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{sourceIps: [10.0.0.0/33]}]]]}",
                "invalid IP block",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{destinationPorts: [70000]}]]]}",
                "70000",
            ),
            (
                "- {name: a, namespace: b, scope: Cluster, action: Allow}",
                "Cluster",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: ALLOW}",
                "ALLOW",
            ),
            (
                "- {namespace: b, scope: Global, action: Allow}",
                "missing field `name`",
            ),
            (
                "- {name: a, namespace: b, scope: Global, action: Allow, rules: [[[{serviceAccounts: [{namespace: x}]}]]]}",
                "serviceAccount",
            ),
        ];
        for (yaml, want) in cases {
            let err = parse(yaml).expect_err(yaml).to_string();
            assert!(err.contains(want), "{yaml}: error {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn ip_block_parsing_and_containment() {
        let b: IpBlock = "10.1.0.0/16".parse().unwrap();
        assert!(b.contains(&"10.1.2.3".parse().unwrap()));
        assert!(!b.contains(&"10.2.0.1".parse().unwrap()));
        assert!(b.contains(&"::ffff:10.1.2.3".parse().unwrap()));
        let b: IpBlock = "10.1.2.3".parse().unwrap();
        assert_eq!(b.to_string(), "10.1.2.3/32");
        assert!(b.contains(&"10.1.2.3".parse().unwrap()));
        assert!(!b.contains(&"10.1.2.4".parse().unwrap()));
        let b: IpBlock = "2001:db8::1".parse().unwrap();
        assert_eq!(b.to_string(), "2001:db8::1/128");
        let b: IpBlock = "2001:db8::/32".parse().unwrap();
        assert!(b.contains(&"2001:db8:1::5".parse().unwrap()));
        assert!(!b.contains(&"10.1.2.3".parse().unwrap()));
        for bad in ["", "10.0.0.0/40", "abc", "10.0.0/8", "1.2.3.4/"] {
            assert!(bad.parse::<IpBlock>().is_err(), "{bad}");
        }
    }

    #[test]
    fn istio_wildcards() {
        let cases = [
            ("*", StringMatch::Presence),
            ("*/sa/admin", StringMatch::Suffix("/sa/admin".into())),
            (
                "cluster.local/ns/x/*",
                StringMatch::Prefix("cluster.local/ns/x/".into()),
            ),
            ("a", StringMatch::Exact("a".into())),
            // A leading `*` wins; the trailing one is literal (Istio).
            ("*/ns/foo/sa/*", StringMatch::Suffix("/ns/foo/sa/*".into())),
        ];
        for (pattern, want) in cases {
            assert_eq!(StringMatch::from_istio_pattern(pattern), want, "{pattern}");
        }
        assert!(StringMatch::Presence.matches("x"));
        assert!(!StringMatch::Presence.matches(""));
        assert!(StringMatch::Prefix("ab".into()).matches("abc"));
        assert!(!StringMatch::Suffix("bc".into()).matches("bcd"));
        assert!(!StringMatch::Exact("a".into()).matches("ab"));
    }
}
