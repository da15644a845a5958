//! Kubernetes `security.istio.io/v1` `AuthorizationPolicy` objects and their
//! conversion into the L4 model (what istiod sends ztunnel, done locally).
//!
//! Scope: a policy with `targetRef(s)` is for waypoints (not converted); no
//! `selector` in the root namespace → Global; no `selector` elsewhere →
//! Namespace; a `selector` → WorkloadSelector (bind it to workloads with
//! [`selector_matches`]).
//!
//! Actions: ALLOW, DENY, AUDIT (ours; upstream ztunnel ignores AUDIT policies)
//! are converted; CUSTOM is not supported at L4 (not converted, warning).
//! `istio.io/dry-run: "true"` sets `dryRun`.
//!
//! A rule becomes: one clause for `from` (OR over sources), one for `to` (OR
//! over operations), one per `when` condition. Conditions ztunnel cannot
//! enforce at L4 — HTTP attributes (`hosts`, `methods`, `paths`, their
//! `not*`, `requestPrincipals`, `remoteIpBlocks`, non-L4 `when` keys), fields
//! this code does not know, and values that do not parse (a port `http`, a
//! CIDR `10.0.0.0/33`) — are handled the way Istio describes, always failing
//! closed:
//! - in an ALLOW policy the whole rule is omitted (it matches nothing);
//! - in a DENY (or AUDIT) policy the unenforceable conditions are dropped and
//!   the rest of the rule kept, so the rule matches more connections; a
//!   source/operation/condition left without any condition matches
//!   everything. Upstream istiod+ztunnel differ here: a DENY rule whose only
//!   conditions are HTTP ones arrives as an empty match that never matches,
//!   so the policy does nothing (istio/istio#61126); we deny instead, as the
//!   upstream status message ("enforced without the HTTP rules ... more
//!   restrictive") and sidecar mode do.
//!
//! Each case produces a warning; the caller logs them once per policy.
//!
//! [`peer_authn`]: `PeerAuthentication` objects, converted into DENY policies
//! with upstream's names (the static STRICT policy, converted per-port
//! workload policies) and the keys each workload references.

pub mod peer_authn;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer, Serialize};

use super::model::{
    Action, Authorization, Clause, IpBlock, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};

/// Istio's default root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Annotation that makes a policy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `security.istio.io/v1` `AuthorizationPolicy` (the fields ztunnel needs;
/// unknown spec fields are kept so they can be reported, never ignored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: AuthorizationPolicySpec,
}

/// `kube::Resource` for a namespaced `security.istio.io/v1` kind whose struct has a
/// `metadata: ObjectMeta` field (AuthorizationPolicy, PeerAuthentication).
macro_rules! istio_security_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl ::kube::Resource for $ty {
            type DynamicType = ();
            type Scope = ::kube::core::NamespaceResourceScope;

            fn kind(_: &()) -> ::std::borrow::Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> ::std::borrow::Cow<'_, str> {
                "security.istio.io".into()
            }
            fn version(_: &()) -> ::std::borrow::Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> ::std::borrow::Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use istio_security_resource;

istio_security_resource!(
    AuthorizationPolicy,
    "AuthorizationPolicy",
    "authorizationpolicies"
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default, deserialize_with = "nullable")]
    pub action: KubeAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    /// `None` and `[]` both mean "no rules" (ALLOW: matches nothing).
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<KubeRule>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KubeAction {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    #[serde(rename = "AUDIT")]
    Audit,
    #[serde(rename = "CUSTOM")]
    Custom,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeRule {
    #[serde(default, deserialize_with = "nullable")]
    pub from: Vec<RuleFrom>,
    #[serde(default, deserialize_with = "nullable")]
    pub to: Vec<RuleTo>,
    #[serde(default, deserialize_with = "nullable")]
    pub when: Vec<Condition>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, deserialize_with = "nullable")]
    pub principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ports: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_paths: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<String>,
}

/// `null` reads as the default (Kubernetes clients send explicit nulls).
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Conversion settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Policies here without a selector are Global (mesh-wide).
    pub root_namespace: String,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
        }
    }
}

/// The result of converting one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// `None` when ztunnel does not enforce the policy (it targets a
    /// waypoint, or its action is CUSTOM/unknown).
    pub authorization: Option<Authorization>,
    /// Human-readable notes on what could not be enforced as written; log
    /// them once per policy (they do not name the policy).
    pub warnings: Vec<String>,
}

/// An object that cannot be converted at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("AuthorizationPolicy without metadata.name (namespace {namespace:?})")]
    MissingName { namespace: Option<String> },
    #[error("AuthorizationPolicy {name:?} without metadata.namespace")]
    MissingNamespace { name: String },
}

/// Convert one Kubernetes object into the L4 model.
pub fn convert(
    policy: &AuthorizationPolicy,
    options: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    let meta = &policy.metadata;
    let name = meta.name.clone().ok_or_else(|| ConvertError::MissingName {
        namespace: meta.namespace.clone(),
    })?;
    let namespace = meta
        .namespace
        .clone()
        .ok_or_else(|| ConvertError::MissingNamespace { name: name.clone() })?;
    let spec = &policy.spec;
    let mut warnings = Vec::new();

    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        // Waypoint policy: not for ztunnel (upstream sends nothing either). Said out loud:
        // without a waypoint in the path (this ztunnel does not discover waypoints from
        // Kubernetes), nothing enforces it.
        warnings.push(
            "targetRef(s) make this a waypoint policy: ztunnel does not enforce it, and              nothing does unless a waypoint proxy serves the target"
                .to_owned(),
        );
        return Ok(Converted {
            authorization: None,
            warnings,
        });
    }
    let action = match spec.action {
        KubeAction::Allow => Action::Allow,
        KubeAction::Deny => Action::Deny,
        KubeAction::Audit => Action::Audit,
        KubeAction::Custom => {
            warnings.push(
                "action CUSTOM (external authorization) is not supported by ztunnel at L4; \
                 the policy is ignored"
                    .to_owned(),
            );
            return Ok(Converted {
                authorization: None,
                warnings,
            });
        }
        KubeAction::Unknown => {
            warnings.push("unknown action; the policy is ignored".to_owned());
            return Ok(Converted {
                authorization: None,
                warnings,
            });
        }
    };
    for key in spec.other.keys() {
        warnings.push(format!("unknown field spec.{key} ignored"));
    }
    let scope = match (&spec.selector, namespace == options.root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    let dry_run = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| parse_bool(v));

    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, rule) in spec.rules.iter().enumerate() {
        let mut conv = RuleConverter::new(&namespace);
        let converted = conv.rule(rule);
        warnings.extend(conv.notes.into_iter().map(|n| format!("rules[{i}]: {n}")));
        if conv.unenforceable.is_empty() {
            rules.push(converted);
            continue;
        }
        let what = conv.unenforceable.join(", ");
        if action == Action::Allow {
            warnings.push(format!(
                "rules[{i}]: ztunnel cannot enforce {what} at L4 (use a waypoint for HTTP rules); \
                 in an ALLOW policy the rule is omitted and matches nothing, \
                 which is more restrictive than requested"
            ));
        } else {
            warnings.push(format!(
                "rules[{i}]: ztunnel cannot enforce {what} at L4 (use a waypoint for HTTP rules); \
                 the rule is enforced without those conditions and matches more connections, \
                 which is more restrictive than requested"
            ));
            rules.push(converted);
        }
    }

    Ok(Converted {
        authorization: Some(Authorization {
            name,
            namespace,
            scope,
            action,
            rules,
            dry_run,
        }),
        warnings,
    })
}

/// Whether a WorkloadSelector policy selects a workload. A selector matches
/// workloads of the policy's namespace, and of every namespace when the
/// policy lives in the root namespace (Istio). Policies without a selector
/// (they apply by scope) and waypoint policies (`targetRefs`) select nothing.
pub fn selector_matches(
    policy: &AuthorizationPolicy,
    options: &ConvertOptions,
    workload_namespace: &str,
    workload_labels: &BTreeMap<String, String>,
) -> bool {
    let spec = &policy.spec;
    let Some(selector) = &spec.selector else {
        return false;
    };
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return false;
    }
    let Some(ns) = policy.metadata.namespace.as_deref() else {
        return false;
    };
    if ns != workload_namespace && ns != options.root_namespace {
        return false;
    }
    selector
        .match_labels
        .iter()
        .all(|(k, v)| workload_labels.get(k) == Some(v))
}

/// Go's `strconv.ParseBool` truthy values (how Istio reads the annotation).
fn parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

/// The `when` keys ztunnel can enforce.
const L4_WHEN_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Converts one rule, recording what cannot be enforced.
struct RuleConverter<'a> {
    namespace: &'a str,
    /// Paths of conditions that cannot be enforced (e.g. `to[0].operation.methods`).
    unenforceable: Vec<String>,
    /// Other notes (literal wildcards, `spiffe://` principals).
    notes: Vec<String>,
}

impl<'a> RuleConverter<'a> {
    fn new(namespace: &'a str) -> Self {
        RuleConverter {
            namespace,
            unenforceable: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn rule(&mut self, rule: &KubeRule) -> Rule {
        for key in rule.other.keys() {
            self.unenforceable.push(format!("unknown field {key}"));
        }
        let mut clauses: Rule = Vec::new();
        if !rule.to.is_empty() {
            let entries: Vec<Option<Match>> = rule
                .to
                .iter()
                .enumerate()
                .map(|(i, to)| self.operation(&format!("to[{i}].operation"), to.operation.as_ref()))
                .collect();
            self.push_clause(&mut clauses, entries);
        }
        if !rule.from.is_empty() {
            let entries: Vec<Option<Match>> = rule
                .from
                .iter()
                .enumerate()
                .map(|(i, from)| self.source(&format!("from[{i}].source"), from.source.as_ref()))
                .collect();
            self.push_clause(&mut clauses, entries);
        }
        for (i, when) in rule.when.iter().enumerate() {
            let entry = self.condition(&format!("when[{i}]"), when);
            self.push_clause(&mut clauses, vec![entry]);
        }
        clauses
    }

    /// `None` entries are unconstrained after dropping what cannot be
    /// enforced: they match everything, so the whole clause does and is left
    /// out (an absent clause is neutral in the AND).
    fn push_clause(&self, clauses: &mut Rule, entries: Vec<Option<Match>>) {
        let clause: Option<Clause> = entries.into_iter().collect();
        if let Some(clause) = clause {
            clauses.push(clause);
        }
    }

    /// A match, or `None` when nothing enforceable is left. An entry that
    /// had no condition at all to begin with (Istio's validation rejects
    /// those) is itself recorded as unenforceable.
    fn non_empty(&mut self, path: &str, before: usize, m: Match) -> Option<Match> {
        if !m.is_empty() {
            return Some(m);
        }
        if self.unenforceable.len() == before {
            self.unenforceable.push(format!("{path} (empty)"));
        }
        None
    }

    fn unenforceable_if_set(&mut self, path: &str, field: &str, values: &[String]) {
        if !values.is_empty() {
            self.unenforceable.push(format!("{path}.{field}"));
        }
    }

    fn operation(&mut self, path: &str, op: Option<&Operation>) -> Option<Match> {
        let Some(op) = op else {
            self.unenforceable.push(format!("{path} (missing)"));
            return None;
        };
        let before = self.unenforceable.len();
        for (field, values) in [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ] {
            self.unenforceable_if_set(path, field, values);
        }
        for key in op.other.keys() {
            self.unenforceable
                .push(format!("{path}.{key} (unknown field)"));
        }
        let m = Match {
            destination_ports: self.ports(path, "ports", &op.ports),
            not_destination_ports: self.ports(path, "notPorts", &op.not_ports),
            ..Default::default()
        };
        self.non_empty(path, before, m)
    }

    fn source(&mut self, path: &str, src: Option<&Source>) -> Option<Match> {
        let Some(src) = src else {
            self.unenforceable.push(format!("{path} (missing)"));
            return None;
        };
        let before = self.unenforceable.len();
        for (field, values) in [
            ("requestPrincipals", &src.request_principals),
            ("notRequestPrincipals", &src.not_request_principals),
            ("remoteIpBlocks", &src.remote_ip_blocks),
            ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
        ] {
            self.unenforceable_if_set(path, field, values);
        }
        for key in src.other.keys() {
            self.unenforceable
                .push(format!("{path}.{key} (unknown field)"));
        }
        let m = Match {
            namespaces: self.strings(path, "namespaces", &src.namespaces),
            not_namespaces: self.strings(path, "notNamespaces", &src.not_namespaces),
            service_accounts: self.service_accounts(&src.service_accounts),
            not_service_accounts: self.service_accounts(&src.not_service_accounts),
            principals: self.principals(path, "principals", &src.principals),
            not_principals: self.principals(path, "notPrincipals", &src.not_principals),
            source_ips: self.ip_blocks(path, "ipBlocks", &src.ip_blocks),
            not_source_ips: self.ip_blocks(path, "notIpBlocks", &src.not_ip_blocks),
            ..Default::default()
        };
        self.non_empty(path, before, m)
    }

    fn condition(&mut self, path: &str, when: &Condition) -> Option<Match> {
        let key = when.key.as_str();
        if !L4_WHEN_KEYS.contains(&key) {
            self.unenforceable
                .push(format!("{path} key {key:?} (not an L4 attribute)"));
            return None;
        }
        let path = format!("{path}[{key}]");
        let before = self.unenforceable.len();
        let (pos, neg) = (&when.values, &when.not_values);
        let mut m = Match::default();
        match key {
            "source.ip" => {
                m.source_ips = self.ip_blocks(&path, "values", pos);
                m.not_source_ips = self.ip_blocks(&path, "notValues", neg);
            }
            "destination.ip" => {
                m.destination_ips = self.ip_blocks(&path, "values", pos);
                m.not_destination_ips = self.ip_blocks(&path, "notValues", neg);
            }
            "destination.port" => {
                m.destination_ports = self.ports(&path, "values", pos);
                m.not_destination_ports = self.ports(&path, "notValues", neg);
            }
            "source.namespace" => {
                m.namespaces = self.strings(&path, "values", pos);
                m.not_namespaces = self.strings(&path, "notValues", neg);
            }
            _ => {
                m.principals = self.principals(&path, "values", pos);
                m.not_principals = self.principals(&path, "notValues", neg);
            }
        }
        self.non_empty(&path, before, m)
    }

    fn strings(&mut self, path: &str, field: &str, values: &[String]) -> Vec<StringMatch> {
        values
            .iter()
            .map(|v| {
                let body = v
                    .strip_prefix('*')
                    .or_else(|| v.strip_suffix('*'))
                    .unwrap_or(v);
                if v != "*" && body.contains('*') {
                    self.notes.push(format!(
                        "{path}.{field} value {v:?}: Istio supports a single leading or \
                         trailing `*`; the other `*` match literally"
                    ));
                }
                StringMatch::from_istio_pattern(v)
            })
            .collect()
    }

    fn principals(&mut self, path: &str, field: &str, values: &[String]) -> Vec<StringMatch> {
        for v in values {
            if v.starts_with("spiffe://") {
                self.notes.push(format!(
                    "{path}.{field} value {v:?}: principals are written without `spiffe://`; \
                     this value never matches"
                ));
            }
        }
        self.strings(path, field, values)
    }

    fn service_accounts(&self, values: &[String]) -> Vec<ServiceAccountMatch> {
        values
            .iter()
            .map(|v| match v.split_once('/') {
                Some((ns, sa)) => ServiceAccountMatch {
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                },
                None => ServiceAccountMatch {
                    namespace: self.namespace.to_owned(),
                    service_account: v.clone(),
                },
            })
            .collect()
    }

    /// Parsed ports; an invalid value makes the whole field unenforceable
    /// (dropped: DENY matches more, ALLOW omits the rule).
    fn ports(&mut self, path: &str, field: &str, values: &[String]) -> Vec<u16> {
        let parsed: Result<Vec<u16>, &String> = values
            .iter()
            .map(|v| v.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or(v))
            .collect();
        match parsed {
            Ok(p) => p,
            Err(bad) => {
                self.unenforceable
                    .push(format!("{path}.{field} (invalid port {bad:?})"));
                Vec::new()
            }
        }
    }

    fn ip_blocks(&mut self, path: &str, field: &str, values: &[String]) -> Vec<IpBlock> {
        let parsed: Result<Vec<IpBlock>, &String> = values
            .iter()
            .map(|v| v.parse::<IpBlock>().map_err(|_| v))
            .collect();
        match parsed {
            Ok(p) => p,
            Err(bad) => {
                self.unenforceable
                    .push(format!("{path}.{field} (invalid IP block {bad:?})"));
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests;
