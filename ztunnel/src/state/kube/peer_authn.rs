//! Discovery's PeerAuthentication objects: kept (stripped of what never
//! changes a decision), turned into store policies
//! ([`crate::policy::kube::peer_authn::policies`]) and into the keys each
//! workload references ([`PeerAuthIndex::workload_keys`]).
//!
//! PeerAuthentications are few and change rarely: any change recomputes every
//! derived policy (diffed against what the store has), and marks the pods of
//! the object's namespace — of every namespace for the root namespace — for
//! re-binding.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::runtime::watcher::Event;

use super::convert::ObjectKey;
use crate::policy::kube::ConvertOptions;
use crate::policy::kube::peer_authn::{self, PeerAuthentication};
use crate::policy::model::Authorization;
use crate::state::SourceBatch;

/// Whose pods a change re-binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affected {
    /// The pods of this namespace.
    Namespace(String),
    /// Every pod (a root-namespace object).
    All,
}

#[derive(Debug)]
pub struct PeerAuthIndex {
    options: ConvertOptions,
    objects: HashMap<ObjectKey, PeerAuthentication>,
    relist: Option<HashMap<ObjectKey, PeerAuthentication>>,
    /// Namespace → names of its objects.
    by_namespace: HashMap<String, BTreeSet<String>>,
    /// Derived policies the store has, by key.
    emitted: BTreeMap<String, Authorization>,
    /// An object changed since the last flush.
    changed: bool,
}

impl PeerAuthIndex {
    pub fn new(options: ConvertOptions) -> Self {
        PeerAuthIndex {
            options,
            objects: HashMap::new(),
            relist: None,
            by_namespace: HashMap::new(),
            emitted: BTreeMap::new(),
            changed: false,
        }
    }

    /// Number of objects.
    pub fn count(&self) -> usize {
        self.objects.len()
    }

    /// Applies a watch event; returns whose pods must be re-bound.
    pub fn event(&mut self, event: Event<PeerAuthentication>) -> Vec<Affected> {
        match event {
            Event::Apply(p) => {
                let key = key_of(&p);
                self.set(key, Some(strip(p))).into_iter().collect()
            }
            Event::Delete(p) => self.set(key_of(&p), None).into_iter().collect(),
            Event::Init => {
                self.relist = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(p) => {
                self.relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(&p), strip(p));
                Vec::new()
            }
            Event::InitDone => {
                let mut fresh = self.relist.take().unwrap_or_default();
                let mut keys: Vec<ObjectKey> = self.objects.keys().cloned().collect();
                keys.extend(fresh.keys().cloned());
                keys.sort();
                keys.dedup();
                keys.into_iter()
                    .filter_map(|k| {
                        let new = fresh.remove(&k);
                        self.set(k, new)
                    })
                    .collect()
            }
        }
    }

    /// The CRD does not exist: there are none (any we had are gone).
    pub fn absent(&mut self) -> Vec<Affected> {
        self.relist = None;
        let keys: Vec<ObjectKey> = self.objects.keys().cloned().collect();
        keys.into_iter().filter_map(|k| self.set(k, None)).collect()
    }

    fn set(&mut self, key: ObjectKey, object: Option<PeerAuthentication>) -> Option<Affected> {
        if self.objects.get(&key) == object.as_ref() {
            return None;
        }
        let name = format!("{}/{}", key.0, key.1);
        match object {
            Some(p) => {
                for w in peer_authn::warnings(&p, &self.options) {
                    tracing::warn!(peer_authentication = %name, "PeerAuthentication: {w}");
                }
                self.by_namespace
                    .entry(key.0.clone())
                    .or_default()
                    .insert(key.1.clone());
                self.objects.insert(key.clone(), p);
            }
            None => {
                if let Some(names) = self.by_namespace.get_mut(&key.0) {
                    names.remove(&key.1);
                    if names.is_empty() {
                        self.by_namespace.remove(&key.0);
                    }
                }
                self.objects.remove(&key);
            }
        }
        self.changed = true;
        Some(if key.0 == self.options.root_namespace {
            Affected::All
        } else {
            Affected::Namespace(key.0)
        })
    }

    fn in_namespace<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a PeerAuthentication> {
        self.by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(move |n| self.objects.get(&(ns.to_owned(), n.clone())))
    }

    /// The policy keys a workload references because of PeerAuthentication.
    pub fn workload_keys(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let mut applicable: Vec<&PeerAuthentication> = self
            .in_namespace(namespace)
            .filter(|p| p.applies_to(&self.options, namespace, labels))
            .collect();
        if namespace != self.options.root_namespace {
            applicable.extend(
                self.in_namespace(&self.options.root_namespace)
                    .filter(|p| p.applies_to(&self.options, namespace, labels)),
            );
        }
        peer_authn::workload_policy_keys(&applicable, &self.options)
    }

    /// Adds the derived policies that changed since the last flush.
    pub fn flush(&mut self, batch: &mut SourceBatch) {
        if !std::mem::take(&mut self.changed) {
            return;
        }
        let all: Vec<&PeerAuthentication> = self.objects.values().collect();
        let desired: BTreeMap<String, Authorization> = peer_authn::policies(&all, &self.options)
            .into_iter()
            .map(|a| (a.key(), a))
            .collect();
        for key in self.emitted.keys() {
            if !desired.contains_key(key) {
                batch.remove_policies.push(key.clone());
            }
        }
        for (key, policy) in &desired {
            if self.emitted.get(key) != Some(policy) {
                batch.upsert_policies.push(policy.clone());
            }
        }
        self.emitted = desired;
    }
}

fn key_of(p: &PeerAuthentication) -> ObjectKey {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

/// Only spec, the name and the creation time matter.
fn strip(mut p: PeerAuthentication) -> PeerAuthentication {
    let m = &mut p.metadata;
    m.resource_version = None;
    m.managed_fields = None;
    m.generation = None;
    m.annotations = None;
    m.labels = None;
    m.uid = None;
    p
}
