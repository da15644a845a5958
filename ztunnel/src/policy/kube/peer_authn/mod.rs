//! Kubernetes `security.istio.io/v1` `PeerAuthentication` objects and their
//! conversion into L4 authorization policies, the way istiod does it for
//! ambient ztunnels (done locally).
//!
//! In ambient mode every connection between meshed workloads is HBONE (mutual
//! TLS), so a PeerAuthentication only decides whether *plaintext* (a source
//! outside the mesh, arriving on 15006) is accepted. Modes: `STRICT` refuses
//! plaintext; `PERMISSIVE` accepts it; `DISABLE` cannot turn mTLS off in
//! ambient and means the same as `PERMISSIVE`; `UNSET` (or no `mtls`) inherits
//! the parent scope's mode, and a mesh without any mode is permissive.
//!
//! Scopes and precedence (for one workload): the mesh-wide policy (root
//! namespace, no selector), the namespace-wide policy (its namespace, no
//! selector), then the workload policy (its namespace, a selector matching its
//! labels); a lower scope's mode other than `UNSET` overrides the one above.
//! When several policies compete for one scope the oldest
//! (`metadata.creationTimestamp`) wins; equal timestamps are broken by name
//! (ours: upstream keeps whichever it saw first). A selector policy in the root
//! namespace is not used (as upstream's ambient conversion). `portLevelMtls`
//! (workload policies only) overrides the mode per workload port.
//!
//! What reaches the store, with upstream's names:
//! - `<root>/istio_converted_static_strict`: a DENY policy matching every
//!   connection without a peer identity. Present whenever at least one
//!   PeerAuthentication exists; scope WorkloadSelector, so it applies only to
//!   the workloads that reference it — those whose effective mode is STRICT
//!   with no per-port exception ([`workload_policy_keys`]).
//! - `<ns>/converted_peer_authentication_<name>`: a workload policy with
//!   `portLevelMtls` that changes something (a STRICT port under a
//!   non-strict mode, or a PERMISSIVE/DISABLE port under a strict one),
//!   converted by [`convert`] into one DENY policy that already contains the
//!   inherited strictness (a DENY cannot be excepted by another policy, so the
//!   static policy is then not referenced).
//!
//! Upstream's code (`convertPeerAuthentication`, ambient `authorization.go`)
//! decides from the namespace policy's mode alone in two places where its own
//! comments say the inherited (effective) parent mode is meant: a namespace
//! policy with mode `UNSET` under a STRICT mesh policy, and a STRICT port under
//! a PERMISSIVE workload policy with a STRICT mesh policy. There upstream
//! emits no converted policy but still references it, which accepts plaintext
//! the objects ask to refuse. We use the inherited mode (fail closed).
//! Where upstream is stricter we follow it: under a workload mode `UNSET`
//! that inherits STRICT, a `DISABLE` port is an exception only alongside a
//! `PERMISSIVE` one (alone, the static STRICT policy is referenced).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{ConvertOptions, WorkloadSelector, istio_security_resource, nullable};
use crate::policy::model::{Action, Authorization, Match, Rule, Scope, StringMatch};

/// Name of the static STRICT policy (underscores: never a Kubernetes name).
pub const STATIC_STRICT_POLICY_NAME: &str = "istio_converted_static_strict";
/// Prefix of a converted workload PeerAuthentication's policy name.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// `security.istio.io/v1` `PeerAuthentication` (unknown spec fields are kept
/// so they can be reported).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: PeerAuthenticationSpec,
}

istio_security_resource!(
    PeerAuthentication,
    "PeerAuthentication",
    "peerauthentications"
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Workload port (a JSON object key, so a string) → mode.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MutualTls {
    #[serde(default, deserialize_with = "nullable")]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MtlsMode {
    #[default]
    #[serde(rename = "UNSET")]
    Unset,
    #[serde(rename = "DISABLE")]
    Disable,
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    #[serde(rename = "STRICT")]
    Strict,
    /// Read as `UNSET` (inherit), with a warning.
    #[serde(other)]
    Unknown,
}

impl MtlsMode {
    /// `Unknown` counts as `Unset`.
    fn normalized(self) -> MtlsMode {
        match self {
            MtlsMode::Unknown => MtlsMode::Unset,
            m => m,
        }
    }

    fn is_strict(self) -> bool {
        self == MtlsMode::Strict
    }

    fn is_unset(self) -> bool {
        self.normalized() == MtlsMode::Unset
    }

    /// PERMISSIVE or DISABLE (the same in ambient).
    fn accepts_plaintext(self) -> bool {
        matches!(self, MtlsMode::Permissive | MtlsMode::Disable)
    }
}

/// The scope a PeerAuthentication has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Root namespace, no selector.
    Mesh,
    /// Another namespace, no selector.
    Namespace,
    /// Not the root namespace, a non-empty selector.
    Workload,
    /// Root namespace with a selector: not used in ambient.
    Unused,
}

impl PeerAuthentication {
    /// The top-level mode (`UNSET` when absent).
    pub fn mode(&self) -> MtlsMode {
        self.spec
            .mtls
            .as_ref()
            .map_or(MtlsMode::Unset, |m| m.mode.normalized())
    }

    fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// `"<namespace>/<name>"` of the object.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// A selector with at least one label: a workload policy. An empty
    /// selector selects like none (upstream).
    fn has_labels(&self) -> bool {
        self.spec
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
    }

    pub fn level(&self, options: &ConvertOptions) -> Level {
        let root = self.namespace() == options.root_namespace;
        match (self.has_labels(), root) {
            (false, true) => Level::Mesh,
            (false, false) => Level::Namespace,
            (true, false) => Level::Workload,
            (true, true) => Level::Unused,
        }
    }

    /// `portLevelMtls` with parsed ports, in port order; entries whose key is
    /// not a port (1–65535) are left out ([`warnings`] reports them).
    pub fn port_modes(&self) -> BTreeMap<u16, MtlsMode> {
        self.spec
            .port_level_mtls
            .iter()
            .filter_map(|(k, v)| parse_port(k).map(|p| (p, v.mode.normalized())))
            .collect()
    }

    /// Whether this object is a candidate for a workload's scope: upstream
    /// considers the root namespace's policies without a selector, and the
    /// workload namespace's policies without a selector or with a selector
    /// matching its labels.
    pub fn applies_to(
        &self,
        options: &ConvertOptions,
        workload_namespace: &str,
        workload_labels: &BTreeMap<String, String>,
    ) -> bool {
        let ns = self.namespace();
        let selector = self.spec.selector.as_ref();
        if ns == options.root_namespace && selector.is_none() {
            return true;
        }
        if ns != workload_namespace {
            return false;
        }
        selector.is_none_or(|s| {
            s.match_labels
                .iter()
                .all(|(k, v)| workload_labels.get(k) == Some(v))
        })
    }

    /// `"<ns>/converted_peer_authentication_<name>"`.
    pub fn converted_key(&self) -> String {
        format!("{}/{CONVERTED_PREFIX}{}", self.namespace(), self.name())
    }
}

fn parse_port(key: &str) -> Option<u16> {
    key.trim().parse::<u16>().ok().filter(|p| *p != 0)
}

/// Oldest first; equal timestamps by namespace and name (deterministic).
fn age_order(a: &PeerAuthentication, b: &PeerAuthentication) -> Ordering {
    a.metadata
        .creation_timestamp
        .cmp(&b.metadata.creation_timestamp)
        .then_with(|| a.namespace().cmp(b.namespace()))
        .then_with(|| a.name().cmp(b.name()))
}

/// The oldest of `candidates` (the one that wins a scope).
pub fn oldest<'a>(
    candidates: impl IntoIterator<Item = &'a PeerAuthentication>,
) -> Option<&'a PeerAuthentication> {
    candidates.into_iter().min_by(|a, b| age_order(a, b))
}

/// Notes on what in the object is not used as written; log them once per
/// object (they do not name it).
pub fn warnings(pa: &PeerAuthentication, options: &ConvertOptions) -> Vec<String> {
    let mut out = Vec::new();
    for key in pa.spec.other.keys() {
        out.push(format!("unknown field spec.{key} ignored"));
    }
    if pa
        .spec
        .mtls
        .as_ref()
        .is_some_and(|m| m.mode == MtlsMode::Unknown)
    {
        out.push("unknown spec.mtls.mode; read as UNSET (inherited)".to_owned());
    }
    for (port, m) in &pa.spec.port_level_mtls {
        if parse_port(port).is_none() {
            out.push(format!(
                "spec.portLevelMtls key {port:?} is not a port (1-65535); entry ignored"
            ));
        }
        if m.mode == MtlsMode::Unknown {
            out.push(format!(
                "unknown spec.portLevelMtls[{port}].mode; read as UNSET (inherited)"
            ));
        }
    }
    match pa.level(options) {
        Level::Unused => out.push(format!(
            "a selector in the root namespace {:?} is not used by ambient ztunnels \
             (as upstream); the policy has no effect",
            options.root_namespace
        )),
        Level::Mesh | Level::Namespace if !pa.spec.port_level_mtls.is_empty() => {
            out.push("spec.portLevelMtls needs a selector (a workload policy); ignored".to_owned())
        }
        _ => {}
    }
    if pa.mode() == MtlsMode::Disable || pa.port_modes().values().any(|m| *m == MtlsMode::Disable) {
        out.push(
            "mode DISABLE cannot turn mutual TLS off in ambient mode; \
             it accepts plaintext like PERMISSIVE"
                .to_owned(),
        );
    }
    out
}

/// The match "no peer identity" (plaintext).
fn unauthenticated() -> Match {
    Match {
        not_principals: vec![StringMatch::Presence],
        ..Default::default()
    }
}

/// The static STRICT policy (`<root>/istio_converted_static_strict`).
pub fn static_strict_policy(options: &ConvertOptions) -> Authorization {
    Authorization {
        name: STATIC_STRICT_POLICY_NAME.to_owned(),
        namespace: options.root_namespace.clone(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules: vec![vec![vec![unauthenticated()]]],
        dry_run: false,
    }
}

/// Whether the mode a workload inherits from the namespace and mesh scopes is
/// STRICT (a namespace mode other than `UNSET` overrides the mesh's).
fn inherited_strict(
    namespace_policy: Option<&PeerAuthentication>,
    mesh_policy: Option<&PeerAuthentication>,
) -> bool {
    match namespace_policy.map(PeerAuthentication::mode) {
        Some(m) if !m.is_unset() => m.is_strict(),
        _ => mesh_policy.is_some_and(|m| m.mode().is_strict()),
    }
}

/// Converts a workload policy with `portLevelMtls` into its DENY policy,
/// given the namespace-wide and mesh-wide policies in force (the oldest of
/// each, see [`oldest`]). `None` when the object needs no policy of its own:
/// not a workload policy, no usable `portLevelMtls`, or the ports change
/// nothing (the static STRICT policy, or none, covers it).
pub fn convert(
    pa: &PeerAuthentication,
    namespace_policy: Option<&PeerAuthentication>,
    mesh_policy: Option<&PeerAuthentication>,
    options: &ConvertOptions,
) -> Option<Authorization> {
    if pa.level(options) != Level::Workload || pa.spec.port_level_mtls.is_empty() {
        return None;
    }
    let mode = pa.mode();
    let parent_strict = inherited_strict(namespace_policy, mesh_policy);
    // Strict for the ports not listed.
    let strict = mode.is_strict() || (mode.is_unset() && parent_strict);

    // One rule: "unauthenticated AND not one of the excepted ports".
    let mut base: Rule = Vec::new();
    if mode.is_strict() {
        base.push(vec![unauthenticated()]);
    }
    // One rule per STRICT port: "unauthenticated AND this port".
    let mut port_rules: Vec<Rule> = Vec::new();
    let mut excepted = false;
    for (port, port_mode) in pa.port_modes() {
        if port_mode.is_strict() {
            if !strict {
                port_rules.push(vec![vec![Match {
                    destination_ports: vec![port],
                    ..unauthenticated()
                }]]);
            }
        } else if port_mode.accepts_plaintext() && strict {
            excepted = true;
            base.push(vec![Match {
                not_destination_ports: vec![port],
                ..Default::default()
            }]);
        }
        // UNSET port: inherits the workload's mode, nothing to add.
    }
    if mode.is_strict() && !excepted {
        // Every port strict: the static STRICT policy does it.
        return None;
    }
    if excepted && !mode.is_strict() {
        // Inherited strictness merged in (the static policy is not referenced).
        base.push(vec![unauthenticated()]);
    }
    let mut rules = port_rules;
    if excepted {
        rules.push(base);
    }
    if rules.is_empty() {
        return None;
    }
    Some(Authorization {
        name: format!("{CONVERTED_PREFIX}{}", pa.name()),
        namespace: pa.namespace().to_owned(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules,
        dry_run: false,
    })
}

/// Every policy `all` (every PeerAuthentication in the cluster) produces:
/// the static STRICT policy when there is at least one object (upstream
/// sends it then), and the converted form of each workload policy that needs
/// one. Sorted by key.
pub fn policies(all: &[&PeerAuthentication], options: &ConvertOptions) -> Vec<Authorization> {
    if all.is_empty() {
        return Vec::new();
    }
    let of_level = |level: Level| {
        all.iter()
            .copied()
            .filter(move |p| p.level(options) == level)
    };
    let mesh = oldest(of_level(Level::Mesh));
    let mut namespace: BTreeMap<&str, &PeerAuthentication> = BTreeMap::new();
    for p in of_level(Level::Namespace) {
        let slot = namespace.entry(p.namespace()).or_insert(p);
        if age_order(p, slot) == Ordering::Less {
            *slot = p;
        }
    }
    let mut out = vec![static_strict_policy(options)];
    out.extend(
        of_level(Level::Workload)
            .filter_map(|p| convert(p, namespace.get(p.namespace()).copied(), mesh, options)),
    );
    out.sort_by_key(Authorization::key);
    out
}

/// The policy keys a workload references because of PeerAuthentication:
/// `applicable` are the objects for which [`PeerAuthentication::applies_to`]
/// holds. Yields the static STRICT policy's key when the workload's
/// effective mode is STRICT without per-port exceptions, and the winning
/// workload policy's converted key when its `portLevelMtls` matters (that
/// policy carries any inherited strictness itself).
pub fn workload_policy_keys(
    applicable: &[&PeerAuthentication],
    options: &ConvertOptions,
) -> Vec<String> {
    let of_level = |level: Level| {
        oldest(
            applicable
                .iter()
                .copied()
                .filter(move |p| p.level(options) == level),
        )
    };
    let mesh = of_level(Level::Mesh);
    let namespace = of_level(Level::Namespace);
    let workload = of_level(Level::Workload);

    let mut strict = inherited_strict(namespace, mesh);
    let mut converted = None;
    if let Some(w) = workload {
        let mode = w.mode();
        if !mode.is_unset() {
            strict = mode.is_strict();
        }
        let ports = w.port_modes();
        let has = |f: fn(MtlsMode) -> bool| ports.values().any(|m| f(*m));
        // The converted policy matters when a port differs from the mode the
        // unlisted ports get. Under an inherited STRICT (workload mode UNSET)
        // only a PERMISSIVE port counts, as upstream: a DISABLE port alone
        // stays strict there.
        let port_differs = match (strict, mode.is_unset()) {
            (true, false) => has(MtlsMode::accepts_plaintext),
            (true, true) => has(|m| m == MtlsMode::Permissive),
            (false, _) => has(MtlsMode::is_strict),
        };
        if port_differs {
            converted = Some(w.converted_key());
            // Its converted form contains the strictness of the other ports.
            strict = false;
        }
    }
    let mut keys = Vec::with_capacity(2);
    if strict {
        keys.push(format!(
            "{}/{STATIC_STRICT_POLICY_NAME}",
            options.root_namespace
        ));
    }
    keys.extend(converted);
    keys.sort();
    keys
}

#[cfg(test)]
mod tests;
