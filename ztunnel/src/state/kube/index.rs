//! Discovery's own view of the cluster: compact facts per object, the reverse
//! indexes that say which workloads an object affects, and the set of workloads,
//! services and policies to recompute. [`DiscoveryIndex::flush`] turns what changed
//! since the last flush into one [`SourceBatch`].
//!
//! An event whose facts equal the previous ones marks nothing (pod status churn,
//! resourceVersion bumps and the like cost a comparison, not a snapshot rebuild).
//! A re-list (watcher `Init` … `InitDone`, e.g. after `410 Gone`) is buffered and
//! then diffed against the current objects: objects not listed again are deleted,
//! unchanged ones mark nothing.
//!
//! Nodes matter only for their topology labels: a node whose locality changes (or
//! that appears after its pods) marks the pods on it.

use std::collections::{BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::Node;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

use super::convert::{
    ConvertSettings, ObjectKey, PodFacts, ServiceFacts, SliceFacts, USE_WAYPOINT_LABEL,
    endpoint_ports, node_locality, slice_workloads, to_workload, workload_uid,
};
use super::peer_authn::{Affected, PeerAuthIndex};
use crate::policy::kube::peer_authn::PeerAuthentication;
use crate::policy::kube::{AuthorizationPolicy, ConvertOptions, convert, selector_matches};
use crate::policy::model::Authorization;
use crate::state::workload::Locality;
use crate::state::{NamespacedHostname, SourceBatch};

/// A policy as discovery keeps it.
#[derive(Debug, Clone, PartialEq)]
struct PolicyEntry {
    object: AuthorizationPolicy,
    converted: Option<Authorization>,
    has_selector: bool,
}

/// Objects of one kind plus the buffer of an ongoing re-list.
#[derive(Debug)]
struct Kind<T> {
    objects: HashMap<ObjectKey, T>,
    relist: Option<HashMap<ObjectKey, T>>,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Kind {
            objects: HashMap::new(),
            relist: None,
        }
    }
}

/// The cluster as discovery sees it.
#[derive(Debug)]
pub struct DiscoveryIndex {
    settings: ConvertSettings,
    policy_options: ConvertOptions,
    pods: Kind<PodFacts>,
    services: Kind<ServiceFacts>,
    slices: Kind<SliceFacts>,
    policies: Kind<PolicyEntry>,
    peer_authns: PeerAuthIndex,
    /// Node (key `("", name)`) → its locality (default: no topology labels).
    nodes: Kind<Locality>,
    /// Node name → the pods on it.
    node_pods: HashMap<String, BTreeSet<ObjectKey>>,
    /// Pod → slices that reference it.
    pod_slices: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Service → its slices.
    service_slices: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Namespace → pod names (selector re-evaluation).
    ns_pods: HashMap<String, BTreeSet<String>>,
    /// Namespace → names of its policies that have a selector.
    ns_selector_policies: HashMap<String, BTreeSet<String>>,
    dirty_pods: HashSet<ObjectKey>,
    dirty_services: HashSet<ObjectKey>,
    dirty_policies: HashSet<ObjectKey>,
    /// Slices whose non-pod endpoints must be recomputed.
    dirty_slices: HashSet<ObjectKey>,
    /// What this source has in the store (to emit removals).
    emitted_workloads: HashSet<ObjectKey>,
    /// Slice → uids of the workloads of its non-pod endpoints.
    emitted_slice_workloads: HashMap<ObjectKey, Vec<String>>,
    emitted_services: HashMap<ObjectKey, NamespacedHostname>,
    emitted_policies: HashSet<ObjectKey>,
}

fn key_of(meta: &kube::api::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl DiscoveryIndex {
    pub fn new(settings: ConvertSettings, policy_options: ConvertOptions) -> Self {
        DiscoveryIndex {
            settings,
            peer_authns: PeerAuthIndex::new(policy_options.clone()),
            policy_options,
            pods: Kind::default(),
            services: Kind::default(),
            slices: Kind::default(),
            policies: Kind::default(),
            nodes: Kind::default(),
            node_pods: HashMap::new(),
            pod_slices: HashMap::new(),
            service_slices: HashMap::new(),
            ns_pods: HashMap::new(),
            ns_selector_policies: HashMap::new(),
            dirty_pods: HashSet::new(),
            dirty_services: HashSet::new(),
            dirty_policies: HashSet::new(),
            dirty_slices: HashSet::new(),
            emitted_workloads: HashSet::new(),
            emitted_slice_workloads: HashMap::new(),
            emitted_services: HashMap::new(),
            emitted_policies: HashSet::new(),
        }
    }

    /// Counts of indexed objects: pods, services, slices, policies.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.pods.objects.len(),
            self.services.objects.len(),
            self.slices.objects.len(),
            self.policies.objects.len(),
        )
    }

    /// Number of PeerAuthentication objects.
    pub fn peer_authentication_count(&self) -> usize {
        self.peer_authns.count()
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.objects.len()
    }

    // ---- pods ----

    pub fn pod_event(&mut self, event: Event<k8s_openapi::api::core::v1::Pod>) {
        match event {
            Event::Apply(p) => self.set_pod(key_of(&p.metadata), Some(PodFacts::from_pod(&p))),
            Event::Delete(p) => self.set_pod(key_of(&p.metadata), None),
            Event::Init => self.pods.relist = Some(HashMap::new()),
            Event::InitApply(p) => {
                self.pods
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(&p.metadata), PodFacts::from_pod(&p));
            }
            Event::InitDone => {
                let fresh = self.pods.relist.take().unwrap_or_default();
                for (k, f) in relist_diff(&self.pods.objects, fresh) {
                    self.set_pod(k, f);
                }
            }
        }
    }

    fn set_pod(&mut self, key: ObjectKey, facts: Option<PodFacts>) {
        let old = self.pods.objects.get(&key);
        if old == facts.as_ref() {
            return;
        }
        let waypoint =
            |f: Option<&PodFacts>| f.and_then(|f| f.labels.get(USE_WAYPOINT_LABEL).cloned());
        if let Some(w) = waypoint(facts.as_ref())
            && waypoint(old) != Some(w.clone())
        {
            warn_waypoint("pod", &key, &w);
        }
        let old_node = old.map(|o| o.node.clone()).filter(|n| !n.is_empty());
        let new_node = facts
            .as_ref()
            .map(|f| f.node.clone())
            .filter(|n| !n.is_empty());
        if old_node != new_node {
            if let Some(n) = old_node
                && let Some(pods) = self.node_pods.get_mut(&n)
            {
                pods.remove(&key);
                if pods.is_empty() {
                    self.node_pods.remove(&n);
                }
            }
            if let Some(n) = new_node {
                self.node_pods.entry(n).or_default().insert(key.clone());
            }
        }
        match facts {
            Some(f) => {
                self.ns_pods
                    .entry(key.0.clone())
                    .or_default()
                    .insert(key.1.clone());
                self.pods.objects.insert(key.clone(), f);
            }
            None => {
                self.pods.objects.remove(&key);
                if let Some(names) = self.ns_pods.get_mut(&key.0) {
                    names.remove(&key.1);
                    if names.is_empty() {
                        self.ns_pods.remove(&key.0);
                    }
                }
            }
        }
        self.dirty_pods.insert(key);
    }

    // ---- nodes ----

    pub fn node_event(&mut self, event: Event<PartialObjectMeta<Node>>) {
        let locality = |n: &PartialObjectMeta<Node>| {
            node_locality(n.metadata.labels.as_ref()).unwrap_or_default()
        };
        match event {
            Event::Apply(n) => self.set_node(key_of(&n.metadata), Some(locality(&n))),
            Event::Delete(n) => self.set_node(key_of(&n.metadata), None),
            Event::Init => self.nodes.relist = Some(HashMap::new()),
            Event::InitApply(n) => {
                self.nodes
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(&n.metadata), locality(&n));
            }
            Event::InitDone => {
                let fresh = self.nodes.relist.take().unwrap_or_default();
                for (k, f) in relist_diff(&self.nodes.objects, fresh) {
                    self.set_node(k, f);
                }
            }
        }
    }

    fn set_node(&mut self, key: ObjectKey, locality: Option<Locality>) {
        let old = self.nodes.objects.get(&key);
        // A node without topology labels and an unknown node give the same locality.
        if old.cloned().unwrap_or_default() != locality.clone().unwrap_or_default()
            && let Some(pods) = self.node_pods.get(&key.1)
        {
            self.dirty_pods.extend(pods.iter().cloned());
        }
        match locality {
            Some(l) => self.nodes.objects.insert(key, l),
            None => self.nodes.objects.remove(&key),
        };
    }

    fn locality_of(&self, pod: &PodFacts) -> Locality {
        self.nodes
            .objects
            .get(&(String::new(), pod.node.clone()))
            .cloned()
            .unwrap_or_default()
    }

    // ---- services ----

    pub fn service_event(&mut self, event: Event<k8s_openapi::api::core::v1::Service>) {
        match event {
            Event::Apply(s) => {
                self.set_service(key_of(&s.metadata), Some(ServiceFacts::from_service(&s)))
            }
            Event::Delete(s) => self.set_service(key_of(&s.metadata), None),
            Event::Init => self.services.relist = Some(HashMap::new()),
            Event::InitApply(s) => {
                self.services
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(&s.metadata), ServiceFacts::from_service(&s));
            }
            Event::InitDone => {
                let fresh = self.services.relist.take().unwrap_or_default();
                for (k, f) in relist_diff(&self.services.objects, fresh) {
                    self.set_service(k, f);
                }
            }
        }
    }

    fn set_service(&mut self, key: ObjectKey, facts: Option<ServiceFacts>) {
        let old = self.services.objects.get(&key);
        if old == facts.as_ref() {
            return;
        }
        if let Some(w) = facts.as_ref().and_then(|f| f.use_waypoint.as_ref())
            && old.and_then(|o| o.use_waypoint.as_ref()) != Some(w)
        {
            warn_waypoint("service", &key, w);
        }
        // Port names or targets may have changed: every endpoint's port map too.
        let ports_changed = old.map(|o| &o.ports) != facts.as_ref().map(|f| &f.ports)
            || old.map(|o| o.external_name) != facts.as_ref().map(|f| f.external_name);
        match facts {
            Some(f) => self.services.objects.insert(key.clone(), f),
            None => self.services.objects.remove(&key),
        };
        if ports_changed {
            self.mark_service_pods(&key);
        }
        // Non-pod endpoints exist only while their Service does, with its ports.
        if let Some(slices) = self.service_slices.get(&key) {
            self.dirty_slices.extend(slices.iter().cloned());
        }
        self.dirty_services.insert(key);
    }

    fn mark_service_pods(&mut self, service: &ObjectKey) {
        let Some(slices) = self.service_slices.get(service) else {
            return;
        };
        for slice in slices {
            if let Some(s) = self.slices.objects.get(slice) {
                self.dirty_pods.extend(s.pods.iter().cloned());
            }
        }
    }

    // ---- endpoint slices ----

    pub fn slice_event(&mut self, event: Event<k8s_openapi::api::discovery::v1::EndpointSlice>) {
        match event {
            Event::Apply(s) => {
                self.set_slice(key_of(&s.metadata), Some(SliceFacts::from_slice(&s)))
            }
            Event::Delete(s) => self.set_slice(key_of(&s.metadata), None),
            Event::Init => self.slices.relist = Some(HashMap::new()),
            Event::InitApply(s) => {
                self.slices
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(&s.metadata), SliceFacts::from_slice(&s));
            }
            Event::InitDone => {
                let fresh = self.slices.relist.take().unwrap_or_default();
                for (k, f) in relist_diff(&self.slices.objects, fresh) {
                    self.set_slice(k, f);
                }
            }
        }
    }

    fn set_slice(&mut self, key: ObjectKey, facts: Option<SliceFacts>) {
        if self.slices.objects.get(&key) == facts.as_ref() {
            return;
        }
        self.dirty_slices.insert(key.clone());
        if let Some(old) = self.slices.objects.remove(&key) {
            for pod in &old.pods {
                if let Some(set) = self.pod_slices.get_mut(pod) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.pod_slices.remove(pod);
                    }
                }
                self.dirty_pods.insert(pod.clone());
            }
            if let Some(svc) = old.service_key()
                && let Some(set) = self.service_slices.get_mut(&svc)
            {
                set.remove(&key);
                if set.is_empty() {
                    self.service_slices.remove(&svc);
                }
            }
        }
        if let Some(new) = facts {
            for pod in &new.pods {
                self.pod_slices
                    .entry(pod.clone())
                    .or_default()
                    .insert(key.clone());
                self.dirty_pods.insert(pod.clone());
            }
            if let Some(svc) = new.service_key() {
                self.service_slices
                    .entry(svc)
                    .or_default()
                    .insert(key.clone());
            }
            self.slices.objects.insert(key, new);
        }
    }

    // ---- authorization policies ----

    pub fn policy_event(&mut self, event: Event<AuthorizationPolicy>) {
        match event {
            Event::Apply(p) => {
                let key = key_of(&p.metadata);
                let entry = self.policy_entry(&key, p);
                self.set_policy(key, Some(entry));
            }
            Event::Delete(p) => self.set_policy(key_of(&p.metadata), None),
            Event::Init => self.policies.relist = Some(HashMap::new()),
            Event::InitApply(p) => {
                let key = key_of(&p.metadata);
                let entry = self.policy_entry(&key, p);
                self.policies
                    .relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key, entry);
            }
            Event::InitDone => {
                let fresh = self.policies.relist.take().unwrap_or_default();
                for (k, f) in relist_diff(&self.policies.objects, fresh) {
                    self.set_policy(k, f);
                }
            }
        }
    }

    /// The CRD does not exist: there are no policies (any we had are gone).
    pub fn policies_absent(&mut self) {
        self.policies.relist = None;
        let keys: Vec<ObjectKey> = self.policies.objects.keys().cloned().collect();
        for k in keys {
            self.set_policy(k, None);
        }
    }

    fn policy_entry(&self, key: &ObjectKey, mut object: AuthorizationPolicy) -> PolicyEntry {
        // Only spec and the fields conversion reads matter for change detection.
        object.metadata.resource_version = None;
        object.metadata.managed_fields = None;
        object.metadata.generation = None;
        let has_selector = object.spec.selector.is_some()
            && object.spec.target_ref.is_none()
            && object.spec.target_refs.is_empty();
        let converted = match convert(&object, &self.policy_options) {
            Ok(c) => {
                if let Some(old) = self.policies.objects.get(key)
                    && old.object == object
                {
                    // Unchanged: warnings were logged already.
                } else {
                    for w in &c.warnings {
                        tracing::warn!(policy = %format!("{}/{}", key.0, key.1), "AuthorizationPolicy: {w}");
                    }
                }
                c.authorization
            }
            Err(e) => {
                tracing::warn!(policy = %format!("{}/{}", key.0, key.1), error = %e, "AuthorizationPolicy ignored");
                None
            }
        };
        PolicyEntry {
            object,
            converted,
            has_selector,
        }
    }

    fn set_policy(&mut self, key: ObjectKey, entry: Option<PolicyEntry>) {
        let old = self.policies.objects.get(&key);
        if old == entry.as_ref() {
            return;
        }
        // Binding depends on the selector and on whether the policy is enforced at all
        // (a CUSTOM policy turned DENY must be bound to the pods it selects).
        let old_selector = old.map(|o| {
            (
                o.has_selector,
                o.object.spec.selector.clone(),
                o.converted.is_some(),
            )
        });
        let new_selector = entry.as_ref().map(|e| {
            (
                e.has_selector,
                e.object.spec.selector.clone(),
                e.converted.is_some(),
            )
        });
        let rebind = (old_selector.as_ref().is_some_and(|s| s.0)
            || new_selector.as_ref().is_some_and(|s| s.0))
            && old_selector != new_selector;
        match entry {
            Some(e) => {
                let names = self.ns_selector_policies.entry(key.0.clone()).or_default();
                if e.has_selector {
                    names.insert(key.1.clone());
                } else {
                    names.remove(&key.1);
                }
                self.policies.objects.insert(key.clone(), e);
            }
            None => {
                if let Some(names) = self.ns_selector_policies.get_mut(&key.0) {
                    names.remove(&key.1);
                }
                self.policies.objects.remove(&key);
            }
        }
        if rebind {
            if key.0 == self.policy_options.root_namespace {
                self.dirty_pods.extend(self.pods.objects.keys().cloned());
            } else if let Some(names) = self.ns_pods.get(&key.0) {
                self.dirty_pods
                    .extend(names.iter().map(|n| (key.0.clone(), n.clone())));
            }
        }
        self.dirty_policies.insert(key);
    }

    // ---- peer authentications ----

    pub fn peer_authn_event(&mut self, event: Event<PeerAuthentication>) {
        let affected = self.peer_authns.event(event);
        self.rebind(affected);
    }

    /// The PeerAuthentication CRD does not exist: there are none.
    pub fn peer_authns_absent(&mut self) {
        let affected = self.peer_authns.absent();
        self.rebind(affected);
    }

    fn rebind(&mut self, affected: Vec<Affected>) {
        for a in affected {
            match a {
                Affected::All => {
                    self.dirty_pods.extend(self.pods.objects.keys().cloned());
                    return;
                }
                Affected::Namespace(ns) => {
                    if let Some(names) = self.ns_pods.get(&ns) {
                        self.dirty_pods
                            .extend(names.iter().map(|n| (ns.clone(), n.clone())));
                    }
                }
            }
        }
    }

    /// `"<ns>/<name>"` of the selector policies that select `pod`, then the
    /// keys PeerAuthentication adds (as upstream: AuthorizationPolicies sorted,
    /// then the PeerAuthentication ones).
    fn bound_policies(&self, pod: &PodFacts) -> Vec<String> {
        let mut out = Vec::new();
        let root = &self.policy_options.root_namespace;
        let mut namespaces = vec![&pod.namespace];
        if root != &pod.namespace {
            namespaces.push(root);
        }
        for ns in namespaces {
            for name in self.ns_selector_policies.get(ns).into_iter().flatten() {
                let Some(entry) = self.policies.objects.get(&(ns.clone(), name.clone())) else {
                    continue;
                };
                if entry.converted.is_some()
                    && selector_matches(
                        &entry.object,
                        &self.policy_options,
                        &pod.namespace,
                        &pod.labels,
                    )
                {
                    out.push(format!("{ns}/{name}"));
                }
            }
        }
        out.sort();
        out.extend(self.peer_authns.workload_keys(&pod.namespace, &pod.labels));
        out
    }

    /// The membership map of `pod`: `"<ns>/<hostname>"` → service port → target port.
    fn memberships(
        &self,
        key: &ObjectKey,
        pod: &PodFacts,
    ) -> HashMap<String, crate::state::PortMap> {
        let mut out: HashMap<String, crate::state::PortMap> = HashMap::new();
        for slice_key in self.pod_slices.get(key).into_iter().flatten() {
            let Some(slice) = self.slices.objects.get(slice_key) else {
                continue;
            };
            let Some(svc) = slice
                .service_key()
                .and_then(|k| self.services.objects.get(&k))
            else {
                continue;
            };
            if svc.external_name {
                continue;
            }
            let name = format!(
                "{}/{}",
                svc.namespace,
                svc.hostname(&self.settings.cluster_domain)
            );
            out.entry(name)
                .or_default()
                .extend(endpoint_ports(svc, slice, pod));
        }
        out
    }

    /// What changed since the last flush, as store changes.
    pub fn flush(&mut self) -> SourceBatch {
        let mut batch = SourceBatch::default();
        let dirty_pods: Vec<ObjectKey> = self.dirty_pods.drain().collect();
        for key in dirty_pods {
            match self.pods.objects.get(&key).filter(|p| p.is_workload()) {
                Some(pod) => {
                    let services = self.memberships(&key, pod);
                    let policies = self.bound_policies(pod);
                    let locality = self.locality_of(pod);
                    batch.upsert_workloads.push(to_workload(
                        pod,
                        &self.settings,
                        services,
                        policies,
                        locality,
                    ));
                    self.emitted_workloads.insert(key);
                }
                None => {
                    if self.emitted_workloads.remove(&key) {
                        batch.remove_workloads.push(workload_uid(
                            &self.settings.cluster_id,
                            &key.0,
                            &key.1,
                        ));
                    }
                }
            }
        }
        let dirty_slices: Vec<ObjectKey> = self.dirty_slices.drain().collect();
        for key in dirty_slices {
            let workloads = self
                .slices
                .objects
                .get(&key)
                .and_then(|slice| {
                    let svc = self.services.objects.get(&slice.service_key()?)?;
                    (!svc.external_name).then(|| slice_workloads(svc, slice, &self.settings))
                })
                .unwrap_or_default();
            let uids: Vec<String> = workloads.iter().map(|w| w.uid.clone()).collect();
            for old in self
                .emitted_slice_workloads
                .remove(&key)
                .unwrap_or_default()
            {
                if !uids.contains(&old) {
                    batch.remove_workloads.push(old);
                }
            }
            if !uids.is_empty() {
                self.emitted_slice_workloads.insert(key, uids);
            }
            batch.upsert_workloads.extend(workloads);
        }
        let dirty_services: Vec<ObjectKey> = self.dirty_services.drain().collect();
        for key in dirty_services {
            let current = self.services.objects.get(&key).filter(|s| !s.external_name);
            let new = current.map(|s| s.to_service(&self.settings));
            if let Some(old) = self.emitted_services.get(&key)
                && new.as_ref().is_none_or(|n| &n.key() != old)
            {
                batch.remove_services.push(old.clone());
                self.emitted_services.remove(&key);
            }
            if let Some(s) = new {
                self.emitted_services.insert(key, s.key());
                batch.upsert_services.push(s);
            }
        }
        let dirty_policies: Vec<ObjectKey> = self.dirty_policies.drain().collect();
        for key in dirty_policies {
            match self
                .policies
                .objects
                .get(&key)
                .and_then(|e| e.converted.clone())
            {
                Some(a) => {
                    self.emitted_policies.insert(key);
                    batch.upsert_policies.push(a);
                }
                None => {
                    if self.emitted_policies.remove(&key) {
                        batch.remove_policies.push(format!("{}/{}", key.0, key.1));
                    }
                }
            }
        }
        self.peer_authns.flush(&mut batch);
        batch
    }
}

fn warn_waypoint(kind: &str, key: &ObjectKey, waypoint: &str) {
    tracing::warn!(
        kind,
        object = %format!("{}/{}", key.0, key.1),
        waypoint,
        "{USE_WAYPOINT_LABEL} is not resolved by Kubernetes discovery: traffic goes directly \
         to the endpoints and the waypoint's policies are not enforced"
    );
}

/// After a re-list: `Some(facts)` for every listed object, `None` for every object
/// that was not listed again. Unchanged objects are filtered by the setters.
fn relist_diff<T>(
    current: &HashMap<ObjectKey, T>,
    fresh: HashMap<ObjectKey, T>,
) -> Vec<(ObjectKey, Option<T>)> {
    let mut out: Vec<(ObjectKey, Option<T>)> = current
        .keys()
        .filter(|k| !fresh.contains_key(*k))
        .map(|k| (k.clone(), None))
        .collect();
    out.extend(fresh.into_iter().map(|(k, v)| (k, Some(v))));
    out
}
