//! What the mesh looks like: workloads, services, policies, fed by sources.
//!
//! Several sources (the local config file now, Kubernetes later) each own a set of objects
//! through a [`SourceHandle`]; the [`Store`] merges them into an immutable, indexed
//! [`Snapshot`] published atomically (`ArcSwap`). The data path only does
//! `store.snapshot()` (a reference count) and hash lookups, never takes a lock.
//!
//! Update API (control path):
//! ```ignore
//! let src = store.source("file");                 // or "kubernetes"
//! src.replace_all(workloads, services, policies); // full state of that source
//! src.upsert_workload(w); src.remove_workload(uid);
//! src.upsert_service(s); src.remove_service(&key);
//! src.upsert_policy(p);  src.remove_policy("ns/name");
//! let mut changes = store.subscribe();            // watch::Receiver<u64> (version)
//! ```

mod cidr;
pub mod file;
pub mod gateway;
mod index;
pub use index::Destination;
pub mod kube;
mod load_balance;
pub use load_balance::NoEndpoint;
mod target;
pub use target::HboneTarget;
pub mod on_demand;
mod service_guess;
pub mod workload;
pub mod xds;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::WorkloadInfo;
use crate::policy::PolicySet;
use crate::policy::model::Authorization;
pub use workload::{
    LoadBalancer, NamespacedHostname, NetworkAddress, NetworkCidr, PortMap, Protocol, Service,
    Visibility, WeightedWaypoint, Workload,
};

/// A service endpoint: a workload and its port mapping for that service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub ports: workload::PortMap,
}

/// Immutable merged view with indexes.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    workloads: HashMap<String, Arc<Workload>>,
    by_ip: HashMap<NetworkAddress, Arc<Workload>>,
    by_name: HashMap<(String, String), Vec<Arc<Workload>>>,
    services: HashMap<NamespacedHostname, Arc<Service>>,
    /// Services by VIP; several when namespaces reuse an address, sorted by namespace.
    by_vip: HashMap<NetworkAddress, Vec<Arc<Service>>>,
    /// Services by CIDR VIP: searched only when no host VIP matches.
    by_cidr: cidr::CidrIndex,
    /// Services by lower-case hostname (one per namespace defining it), sorted by namespace.
    by_host: HashMap<String, Vec<Arc<Service>>>,
    /// The networks of the workloads indexed by address, sorted (usually one: `""`).
    networks: Vec<String>,
    endpoints: HashMap<NamespacedHostname, Vec<Endpoint>>,
    policies: Arc<PolicySet>,
}

impl Snapshot {
    /// The workload owning `ip` on `network` (`""` = default network).
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&NetworkAddress::new(network, ip))
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service(&self, key: &NamespacedHostname) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The workload a proxy serves: matched by namespace, name and service account, among
    /// workloads on `node` (all nodes when `node` is `None`).
    pub fn find_workload(&self, info: &WorkloadInfo, node: Option<&str>) -> Option<&Arc<Workload>> {
        self.by_name
            .get(&(info.namespace.clone(), info.name.clone()))?
            .iter()
            .find(|w| {
                w.service_account == info.service_account
                    && node.is_none_or(|n| w.node.is_empty() || w.node == n)
            })
    }

    /// Endpoints of a service.
    pub fn endpoints(&self, key: &NamespacedHostname) -> &[Endpoint] {
        self.endpoints.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A healthy endpoint of `svc` for service port `port`, chosen at random weighted by
    /// its workload's `capacity` (capacity 0: never chosen), with the
    /// target port. `None` when the service has no healthy endpoint. When the service
    /// port's target is a name (target 0), only endpoints that resolved that name for
    /// this port qualify (as upstream: another workload of the service may not have it).
    pub fn pick_endpoint(&self, svc: &Service, port: u16) -> Option<(Arc<Workload>, u16)> {
        self.pick_endpoint_for(None, svc, port)
    }

    /// [`Self::pick_endpoint`] for a client `src`, following the service's
    /// [`LoadBalancer`] preferences as upstream: `Strict` keeps only endpoints that match
    /// `src` in every scope (none: no endpoint), `Failover` the best-matching ones.
    /// Without a known client the preferences are ignored.
    ///
    /// Only endpoints with an IP address: callers dial the workload's IP (an endpoint known
    /// only by hostname is for [`Self::select_endpoint`], whose caller resolves it).
    pub fn pick_endpoint_for(
        &self,
        src: Option<&Workload>,
        svc: &Service,
        port: u16,
    ) -> Option<(Arc<Workload>, u16)> {
        self.choose_endpoint(src, src.map(|w| w.network.as_str()), svc, port, false)
            .ok()
    }

    /// [`Self::pick_endpoint_for`], keeping only endpoints on `network` when given (the
    /// client's network: endpoints elsewhere are reached through their network's gateway,
    /// which is not implemented, and must never be dialled directly), and saying why no
    /// endpoint qualifies.
    ///
    /// As upstream, an endpoint without IP addresses but with a `hostname` (a ServiceEntry
    /// with `resolution: DNS`) qualifies: the caller resolves that name when it connects
    /// (`proxy::on_demand_dns`). An endpoint with neither is only kept when it is on
    /// another network behind a network gateway (then it is reported as such).
    pub fn select_endpoint(
        &self,
        src: Option<&Workload>,
        network: Option<&str>,
        svc: &Service,
        port: u16,
    ) -> Result<(Arc<Workload>, u16), NoEndpoint> {
        self.choose_endpoint(src, network, svc, port, true)
    }

    /// [`Self::select_endpoint`]; `by_hostname`: whether endpoints known only by hostname
    /// qualify.
    fn choose_endpoint(
        &self,
        src: Option<&Workload>,
        network: Option<&str>,
        svc: &Service,
        port: u16,
        by_hostname: bool,
    ) -> Result<(Arc<Workload>, u16), NoEndpoint> {
        let eps = self.endpoints(&svc.key());
        let named = svc.ports.get(&port) == Some(&0);
        let any_health = svc
            .load_balancer
            .as_ref()
            .is_some_and(|lb| lb.allows_unhealthy());
        let on_network = |w: &Workload| network.is_none_or(|n| w.network == n);
        // As upstream: an endpoint on another network is reached through its network's
        // gateway (double HBONE), so only one that names a gateway qualifies; it needs no
        // address of its own.
        let reachable = |w: &Workload| on_network(w) || w.network_gateway.is_some();
        let addressable = |w: &Workload| {
            !w.workload_ips.is_empty() || (by_hostname && !w.hostname.is_empty()) || !on_network(w)
        };
        let (mut healthy, stranded): (Vec<&Endpoint>, Vec<&Endpoint>) = eps
            .iter()
            .filter(|e| (any_health || e.workload.is_healthy()) && addressable(&e.workload))
            .filter(|e| !named || e.ports.get(&port).is_some_and(|t| *t != 0))
            .partition(|e| reachable(&e.workload));
        if healthy.is_empty() && !stranded.is_empty() {
            let mut networks: Vec<String> = stranded
                .iter()
                .map(|e| e.workload.network.clone())
                .collect();
            networks.sort();
            networks.dedup();
            return Err(NoEndpoint::OtherNetwork {
                service: svc.key(),
                local: network.unwrap_or_default().to_string(),
                networks: networks.join(", "),
            });
        }
        if let (Some(lb), Some(src)) = (&svc.load_balancer, src) {
            healthy = load_balance::prefer(lb, src, healthy);
        }
        if healthy.is_empty() {
            return Err(NoEndpoint::NoHealthy(svc.key()));
        }
        // As upstream: weighted by capacity; none when every candidate has capacity 0.
        let ep = load_balance::choose_by_capacity(&healthy, &mut rand::rng())
            .ok_or_else(|| NoEndpoint::NoCapacity(svc.key()))?;
        let target = match ep.ports.get(&port) {
            Some(&t) if t != 0 => t,
            _ => match svc.ports.get(&port) {
                Some(&t) if t != 0 => t,
                _ => port,
            },
        };
        Ok((ep.workload.clone(), target))
    }

    /// The networks workload addresses are indexed under (sorted, distinct).
    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.networks.iter().map(String::as_str)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// The scope-indexed authorization policies. A snapshot whose policies are those of the
    /// snapshot it replaced shares that snapshot's `Arc` (`Arc::ptr_eq`: unchanged).
    pub fn policies(&self) -> &Arc<PolicySet> {
        &self.policies
    }
}

#[derive(Default)]
struct SourceData {
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<NamespacedHostname, Arc<Service>>,
    policies: BTreeMap<String, Authorization>,
}

struct Inner {
    sources: BTreeMap<String, SourceData>,
    version: u64,
}

/// The merged state of every source.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    current: Arc<ArcSwap<Snapshot>>,
    changes: Arc<watch::Sender<u64>>,
    /// Set with `XDS_ON_DEMAND` ([`on_demand`]).
    on_demand: Arc<std::sync::OnceLock<on_demand::OnDemand>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("version", &self.snapshot().version)
            .finish()
    }
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(0);
        Store {
            inner: Arc::new(Mutex::new(Inner {
                sources: BTreeMap::new(),
                version: 0,
            })),
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            changes: Arc::new(tx),
            on_demand: Arc::default(),
        }
    }

    /// The current snapshot (lock-free; cheap).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Notified (with the new version) after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A handle through which the source `name` adds and removes its objects. Sources are
    /// merged in name order; on a conflict (same uid / service / policy key) the later
    /// source wins.
    pub fn source(&self, name: &str) -> SourceHandle {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sources
            .entry(name.to_string())
            .or_default();
        SourceHandle {
            store: self.clone(),
            name: name.to_string(),
        }
    }

    fn update(&self, source: &str, f: impl FnOnce(&mut SourceData)) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(inner.sources.entry(source.to_string()).or_default());
        inner.version += 1;
        let snapshot = build_snapshot(&inner.sources, inner.version, &self.current.load());
        self.current.store(Arc::new(snapshot));
        let version = inner.version;
        drop(inner);
        self.changes.send_replace(version);
    }
}

/// `prev`: the snapshot being replaced. Its policy set is kept (the same `Arc`) when the
/// policies did not change, so readers can tell a policy change by pointer.
fn build_snapshot(
    sources: &BTreeMap<String, SourceData>,
    version: u64,
    prev: &Snapshot,
) -> Snapshot {
    let mut workloads: HashMap<String, Arc<Workload>> = HashMap::new();
    let mut services: HashMap<NamespacedHostname, Arc<Service>> = HashMap::new();
    let mut policies: BTreeMap<String, Authorization> = BTreeMap::new();
    for data in sources.values() {
        workloads.extend(data.workloads.iter().map(|(k, v)| (k.clone(), v.clone())));
        services.extend(data.services.iter().map(|(k, v)| (k.clone(), v.clone())));
        policies.extend(data.policies.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let mut by_ip: HashMap<NetworkAddress, Arc<Workload>> = HashMap::new();
    let mut by_name: HashMap<(String, String), Vec<Arc<Workload>>> = HashMap::new();
    let mut endpoints: HashMap<NamespacedHostname, Vec<Endpoint>> = HashMap::new();
    let mut sorted: Vec<&Arc<Workload>> = workloads.values().collect();
    sorted.sort_by(|a, b| a.uid.cmp(&b.uid));
    for w in sorted {
        // Host-network pods share their node's IP: never look them up by address (upstream
        // ztunnel does the same); they stay reachable as service endpoints.
        let ips: &[IpAddr] = if w.network_mode == workload::NetworkMode::HostNetwork {
            &[]
        } else {
            &w.workload_ips
        };
        for ip in ips {
            let key = NetworkAddress::new(w.network.clone(), *ip);
            match by_ip.get(&key) {
                // Two workloads on one address: see `index::prefer_for_address`.
                Some(old) if !index::prefer_for_address(old, w) => {
                    tracing::warn!(ip = %ip, workload = %old.uid, other = %w.uid, "two workloads share an IP; keeping the first");
                }
                Some(old) => {
                    tracing::warn!(ip = %ip, workload = %w.uid, other = %old.uid, "two workloads share an IP; the pod, healthy, HBONE one wins");
                    by_ip.insert(key, w.clone());
                }
                None => {
                    by_ip.insert(key, w.clone());
                }
            }
        }
        by_name
            .entry((w.namespace.clone(), w.name.clone()))
            .or_default()
            .push(w.clone());
        for (svc, ports) in &w.services {
            let Some((ns, host)) = svc.split_once('/') else {
                tracing::warn!(workload = %w.uid, service = %svc, "service reference is not <namespace>/<hostname>; ignored");
                continue;
            };
            endpoints
                .entry(NamespacedHostname {
                    namespace: ns.to_string(),
                    hostname: host.to_string(),
                })
                .or_default()
                .push(Endpoint {
                    workload: w.clone(),
                    ports: ports.clone(),
                });
        }
    }
    let mut networks: Vec<String> = by_ip.keys().map(|a| a.network.clone()).collect();
    networks.sort();
    networks.dedup();
    let mut by_vip: HashMap<NetworkAddress, Vec<Arc<Service>>> = HashMap::new();
    let mut by_host: HashMap<String, Vec<Arc<Service>>> = HashMap::new();
    for s in services.values() {
        for vip in &s.vips {
            by_vip.entry(vip.clone()).or_default().push(s.clone());
        }
        by_host
            .entry(s.hostname.trim_end_matches('.').to_ascii_lowercase())
            .or_default()
            .push(s.clone());
    }
    let by_cidr = cidr::CidrIndex::new(services.values());
    for list in by_host.values_mut().chain(by_vip.values_mut()) {
        list.sort_by_key(|s| s.key());
    }
    let policies = if prev.policies.iter().eq(policies.values()) {
        prev.policies.clone()
    } else {
        Arc::new(PolicySet::new(policies.into_values().collect()))
    };
    Snapshot {
        version,
        workloads,
        by_ip,
        by_name,
        services,
        by_vip,
        by_cidr,
        by_host,
        networks,
        endpoints,
        policies,
    }
}

/// One source's write access to the store.
#[derive(Clone)]
pub struct SourceHandle {
    store: Store,
    name: String,
}

impl SourceHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces everything this source provides.
    pub fn replace_all(
        &self,
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) {
        self.store.update(&self.name, |d| {
            d.workloads = workloads
                .into_iter()
                .map(|w| (w.uid.clone(), Arc::new(w)))
                .collect();
            d.services = services
                .into_iter()
                .map(|s| (s.key(), Arc::new(s)))
                .collect();
            d.policies = policies.into_iter().map(|p| (p.key(), p)).collect();
        });
    }

    pub fn upsert_workload(&self, w: Workload) {
        self.store.update(&self.name, |d| {
            d.workloads.insert(w.uid.clone(), Arc::new(w));
        });
    }

    pub fn remove_workload(&self, uid: &str) {
        self.store.update(&self.name, |d| {
            d.workloads.remove(uid);
        });
    }

    pub fn upsert_service(&self, s: Service) {
        self.store.update(&self.name, |d| {
            d.services.insert(s.key(), Arc::new(s));
        });
    }

    pub fn remove_service(&self, key: &NamespacedHostname) {
        self.store.update(&self.name, |d| {
            d.services.remove(key);
        });
    }

    pub fn upsert_policy(&self, p: Authorization) {
        self.store.update(&self.name, |d| {
            d.policies.insert(p.key(), p);
        });
    }

    /// `key` is `"<namespace>/<name>"`.
    pub fn remove_policy(&self, key: &str) {
        self.store.update(&self.name, |d| {
            d.policies.remove(key);
        });
    }

    // Added for watch-driven sources (state::kube): many changes, one snapshot rebuild.
    /// Applies every change of `batch` at once (one new snapshot); removals first.
    pub fn apply(&self, batch: SourceBatch) {
        if batch.is_empty() {
            return;
        }
        self.store.update(&self.name, |d| {
            for uid in &batch.remove_workloads {
                d.workloads.remove(uid);
            }
            for key in &batch.remove_services {
                d.services.remove(key);
            }
            for key in &batch.remove_policies {
                d.policies.remove(key);
            }
            for w in batch.upsert_workloads {
                d.workloads.insert(w.uid.clone(), Arc::new(w));
            }
            for s in batch.upsert_services {
                d.services.insert(s.key(), Arc::new(s));
            }
            for p in batch.upsert_policies {
                d.policies.insert(p.key(), p);
            }
        });
    }
}

/// Changes applied together by [`SourceHandle::apply`].
#[derive(Debug, Default, Clone)]
pub struct SourceBatch {
    pub upsert_workloads: Vec<Workload>,
    /// Workload uids.
    pub remove_workloads: Vec<String>,
    pub upsert_services: Vec<Service>,
    pub remove_services: Vec<NamespacedHostname>,
    pub upsert_policies: Vec<Authorization>,
    /// `"<namespace>/<name>"`.
    pub remove_policies: Vec<String>,
}

impl SourceBatch {
    pub fn is_empty(&self) -> bool {
        self.upsert_workloads.is_empty()
            && self.remove_workloads.is_empty()
            && self.upsert_services.is_empty()
            && self.remove_services.is_empty()
            && self.upsert_policies.is_empty()
            && self.remove_policies.is_empty()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.upsert_workloads.len()
            + self.remove_workloads.len()
            + self.upsert_services.len()
            + self.remove_services.len()
            + self.upsert_policies.len()
            + self.remove_policies.len()
    }
}

#[cfg(test)]
mod tests;
