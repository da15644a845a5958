//! The immutable, scope-indexed set of policies the evaluator reads.
//!
//! Built once from the state sources' `Vec<Authorization>` and replaced
//! wholesale on updates, so evaluation never locks. Policies are indexed so a
//! connection only looks at the ones that can apply to its destination:
//! Global ones, the destination namespace's Namespace-scoped ones, and the
//! ones the destination workload references by `"<ns>/<name>"`.

use std::collections::HashMap;
use std::sync::Arc;

use super::model::{Action, Authorization, Scope};

/// Hash maps keyed by policy keys and namespace names (fast hasher; the keys
/// come from configuration, and the seed is still random per process).
pub(super) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One policy plus what evaluation needs precomputed.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) key: Arc<str>,
    pub(super) kind: Kind,
    pub(super) policy: Authorization,
}

impl Entry {
    fn new(policy: Authorization) -> Entry {
        let kind = if policy.dry_run || policy.action == Action::Audit {
            Kind::Observe
        } else if policy.action == Action::Deny {
            Kind::Deny
        } else {
            Kind::Allow
        };
        Entry {
            key: Arc::from(policy.key()),
            kind,
            policy,
        }
    }
}

/// How a policy takes part in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Enforced DENY.
    Deny,
    /// Enforced ALLOW.
    Allow,
    /// Dry-run (any action) or AUDIT: evaluated for logs only.
    Observe,
}

/// The policies of one scope bucket, split by how they are used.
#[derive(Debug, Default)]
pub(super) struct Bucket {
    /// Enforced DENY policies.
    pub(super) deny: Vec<Arc<Entry>>,
    /// Enforced ALLOW policies.
    pub(super) allow: Vec<Arc<Entry>>,
    /// Dry-run policies (any action) and AUDIT policies: evaluated for logs.
    pub(super) observe: Vec<Arc<Entry>>,
}

impl Bucket {
    fn push(&mut self, entry: Arc<Entry>) {
        match entry.kind {
            Kind::Deny => self.deny.push(entry),
            Kind::Allow => self.allow.push(entry),
            Kind::Observe => self.observe.push(entry),
        }
    }

    pub(super) fn list(&self, kind: Kind) -> &[Arc<Entry>] {
        match kind {
            Kind::Deny => &self.deny,
            Kind::Allow => &self.allow,
            Kind::Observe => &self.observe,
        }
    }

    fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.observe.is_empty()
    }
}

/// Scope-indexed policies. Cheap to share (`Arc<PolicySet>`); immutable.
#[derive(Debug, Default)]
pub struct PolicySet {
    /// Every policy by key, in input order (last duplicate wins).
    pub(super) by_key: Map<Arc<str>, Arc<Entry>>,
    order: Vec<Arc<str>>,
    pub(super) global: Bucket,
    pub(super) by_namespace: Map<Box<str>, Bucket>,
    /// Number of dry-run and AUDIT policies (none: skip the logging pass).
    pub(super) observers: usize,
}

impl PolicySet {
    /// Index `policies`. A later policy with the same `"<ns>/<name>"`
    /// replaces an earlier one (logged).
    pub fn new(policies: Vec<Authorization>) -> PolicySet {
        let mut by_key: Map<Arc<str>, Arc<Entry>> =
            Map::with_capacity_and_hasher(policies.len(), Default::default());
        let mut order = Vec::with_capacity(policies.len());
        for policy in policies {
            let entry = Arc::new(Entry::new(policy));
            let key = entry.key.clone();
            if by_key.insert(key.clone(), entry).is_some() {
                tracing::warn!(policy = %key, "duplicate authorization policy; the last one wins");
            } else {
                order.push(key);
            }
        }
        let mut global = Bucket::default();
        let mut by_namespace: Map<Box<str>, Bucket> = Map::default();
        for key in &order {
            let entry = &by_key[key];
            match entry.policy.scope {
                Scope::Global => global.push(entry.clone()),
                Scope::Namespace => by_namespace
                    .entry(entry.policy.namespace.as_str().into())
                    .or_default()
                    .push(entry.clone()),
                Scope::WorkloadSelector => {}
            }
        }
        by_namespace.retain(|_, b| !b.is_empty());
        let observers = by_key.values().filter(|e| e.kind == Kind::Observe).count();
        PolicySet {
            by_key,
            order,
            global,
            by_namespace,
            observers,
        }
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// A policy by `"<namespace>/<name>"`.
    pub fn get(&self, key: &str) -> Option<&Authorization> {
        self.by_key.get(key).map(|e| &e.policy)
    }

    /// All policies in input order (for `/config_dump`).
    pub fn iter(&self) -> impl Iterator<Item = &Authorization> + '_ {
        self.order.iter().map(|k| &self.by_key[k].policy)
    }

    /// Whether the policy `entry` already applies to a workload of
    /// `namespace` through its scope (so a reference by key must not make it
    /// count twice).
    pub(super) fn applies_by_scope(entry: &Entry, namespace: &str) -> bool {
        match entry.policy.scope {
            Scope::Global => true,
            Scope::Namespace => entry.policy.namespace == namespace,
            Scope::WorkloadSelector => false,
        }
    }
}

impl serde::Serialize for PolicySet {
    /// A list of the policies, as in the local config file.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(ns: &str, name: &str, scope: Scope, action: Action, dry_run: bool) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope,
            action,
            rules: vec![],
            dry_run,
        }
    }

    #[test]
    fn indexes_by_scope_and_kind() {
        let set = PolicySet::new(vec![
            pol("root", "g-deny", Scope::Global, Action::Deny, false),
            pol("root", "g-allow", Scope::Global, Action::Allow, false),
            pol("root", "g-dry", Scope::Global, Action::Deny, true),
            pol("a", "ns-allow", Scope::Namespace, Action::Allow, false),
            pol("a", "ns-audit", Scope::Namespace, Action::Audit, false),
            pol("b", "sel", Scope::WorkloadSelector, Action::Allow, false),
        ]);
        assert_eq!(set.len(), 6);
        assert_eq!(set.global.deny.len(), 1);
        assert_eq!(set.global.allow.len(), 1);
        assert_eq!(set.global.observe.len(), 1);
        let a = &set.by_namespace["a"];
        assert_eq!((a.deny.len(), a.allow.len(), a.observe.len()), (0, 1, 1));
        assert!(!set.by_namespace.contains_key("b"));
        assert_eq!(set.get("b/sel").unwrap().name, "sel");
        assert!(set.get("b/missing").is_none());
        let keys: Vec<String> = set.iter().map(|p| p.key()).collect();
        assert_eq!(keys[0], "root/g-deny");
        assert_eq!(keys[5], "b/sel");
    }

    #[test]
    fn duplicate_key_last_wins() {
        let set = PolicySet::new(vec![
            pol("a", "p", Scope::Namespace, Action::Allow, false),
            pol("a", "p", Scope::Namespace, Action::Deny, false),
        ]);
        assert_eq!(set.len(), 1);
        assert_eq!(set.get("a/p").unwrap().action, Action::Deny);
        let a = &set.by_namespace["a"];
        assert_eq!((a.deny.len(), a.allow.len()), (1, 0));
    }

    #[test]
    fn serializes_as_policy_list() {
        let set = PolicySet::new(vec![pol("a", "p", Scope::Namespace, Action::Allow, false)]);
        let v = serde_json::to_value(&set).unwrap();
        assert_eq!(v[0]["name"], "p");
        assert_eq!(v[0]["scope"], "Namespace");
    }
}
