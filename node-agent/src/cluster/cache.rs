//! The informer cache: namespaces and this node's pods, as [`NamespaceInfo`]
//! and [`PodInfo`] extracts, fed by watcher events (see `watch`) and by the
//! CNI ADD path's API lookups. Every update returns the [`Change`]s the
//! control loop must look at.
//!
//! Locking: one `std::sync::RwLock`, held only for map operations (never
//! across an await).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::pod::{NamespaceInfo, PodInfo, ZTUNNEL_APP, active_ztunnel};

/// How long a deleted pod's UID is remembered, so a late API lookup cannot
/// bring it back.
const TOMBSTONE_TTL: Duration = Duration::from_secs(300);

/// Something the control loop must re-evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// The pod with this UID was added, changed or deleted.
    Pod(String),
    /// This namespace's labels changed (or it appeared/disappeared).
    Namespace(String),
    /// A ztunnel pod in the agent's namespace changed (GENEVE mode).
    Ztunnel,
}

#[derive(Default)]
struct State {
    namespaces: HashMap<String, NamespaceInfo>,
    pods: HashMap<String, PodInfo>,
    /// (namespace, name) → UID.
    by_name: HashMap<(String, String), String>,
    tombstones: HashMap<String, Instant>,
    /// Objects listed since the last `Init` (re-list in progress).
    pod_buffer: Option<HashMap<String, PodInfo>>,
    /// UIDs inserted from an API read while a list was in progress: the
    /// list may predate them (created after its snapshot; the watch that
    /// follows delivers them) or postdate them (deleted before it).
    api_inserted_in_list: HashSet<String>,
    /// Pods a finished list did not contain but an API read during it did:
    /// kept, to be confirmed by a fresh GET ([`ClusterCache::take_unconfirmed`]).
    unconfirmed: Vec<PodInfo>,
    ns_buffer: Option<HashMap<String, NamespaceInfo>>,
}

/// Cache of namespaces and this node's pods.
pub struct ClusterCache {
    state: RwLock<State>,
    /// The agent's namespace (where ztunnel pods live).
    agent_namespace: String,
    pods_synced: watch::Sender<bool>,
    namespaces_synced: watch::Sender<bool>,
}

impl ClusterCache {
    pub fn new(agent_namespace: impl Into<String>) -> Self {
        Self {
            state: RwLock::new(State::default()),
            agent_namespace: agent_namespace.into(),
            pods_synced: watch::channel(false).0,
            namespaces_synced: watch::channel(false).0,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn is_ztunnel(&self, p: &PodInfo) -> bool {
        p.namespace == self.agent_namespace && p.app_label.as_deref() == Some(ZTUNNEL_APP)
    }

    /// True once both watchers have listed everything once.
    pub fn is_synced(&self) -> bool {
        *self.pods_synced.borrow() && *self.namespaces_synced.borrow()
    }

    /// Resolves when [`ClusterCache::is_synced`].
    pub async fn wait_synced(&self) {
        let mut p = self.pods_synced.subscribe();
        let mut n = self.namespaces_synced.subscribe();
        let _ = p.wait_for(|s| *s).await;
        let _ = n.wait_for(|s| *s).await;
    }

    // ---- pods -------------------------------------------------------------

    /// A watcher `Apply`: insert or update.
    pub fn apply_pod(&self, pod: PodInfo) -> Vec<Change> {
        let mut st = self.write();
        if let Some(buf) = st.pod_buffer.as_mut() {
            // A re-list is in progress; the event stream is restarted, so
            // this is not expected, but keep it consistent.
            buf.insert(pod.uid.clone(), pod.clone());
        }
        self.upsert(&mut st, pod)
    }

    fn upsert(&self, st: &mut State, pod: PodInfo) -> Vec<Change> {
        let uid = pod.uid.clone();
        let old = st.pods.get(&uid);
        if old == Some(&pod) {
            return Vec::new();
        }
        let mut changes = vec![Change::Pod(uid.clone())];
        if self.is_ztunnel(&pod) || old.is_some_and(|o| self.is_ztunnel(o)) {
            changes.push(Change::Ztunnel);
        }
        st.by_name
            .insert((pod.namespace.clone(), pod.name.clone()), uid.clone());
        st.pods.insert(uid, pod);
        changes
    }

    /// A watcher `Delete`.
    pub fn delete_pod(&self, uid: &str) -> Vec<Change> {
        let mut st = self.write();
        self.remove(&mut st, uid)
    }

    fn remove(&self, st: &mut State, uid: &str) -> Vec<Change> {
        let now = Instant::now();
        st.tombstones
            .retain(|_, t| now.duration_since(*t) < TOMBSTONE_TTL);
        st.tombstones.insert(uid.to_string(), now);
        let Some(old) = st.pods.remove(uid) else {
            return vec![Change::Pod(uid.to_string())];
        };
        let key = (old.namespace.clone(), old.name.clone());
        if st.by_name.get(&key).map(String::as_str) == Some(uid) {
            st.by_name.remove(&key);
        }
        let mut changes = vec![Change::Pod(uid.to_string())];
        if self.is_ztunnel(&old) {
            changes.push(Change::Ztunnel);
        }
        changes
    }

    /// A watcher `Init`: a (re-)list begins.
    pub fn pods_init(&self) {
        let mut st = self.write();
        st.pod_buffer = Some(HashMap::new());
        st.api_inserted_in_list.clear();
    }

    /// A watcher `InitApply`.
    pub fn pods_init_apply(&self, pod: PodInfo) {
        let mut st = self.write();
        st.pod_buffer
            .get_or_insert_with(HashMap::new)
            .insert(pod.uid.clone(), pod);
    }

    /// A watcher `InitDone`: the listed set replaces the cache; pods not
    /// listed are deleted.
    pub fn pods_init_done(&self) -> Vec<Change> {
        let mut changes = Vec::new();
        {
            let mut st = self.write();
            let listed = st.pod_buffer.take().unwrap_or_default();
            let inserted = std::mem::take(&mut st.api_inserted_in_list);
            let (late, gone): (Vec<String>, Vec<String>) = st
                .pods
                .keys()
                .filter(|u| !listed.contains_key(*u))
                .cloned()
                .partition(|u| inserted.contains(u));
            let late: Vec<PodInfo> = late
                .iter()
                .filter_map(|u| st.pods.get(u).cloned())
                .collect();
            st.unconfirmed.extend(late);
            for uid in gone {
                changes.extend(self.remove(&mut st, &uid));
            }
            for (_, pod) in listed {
                changes.extend(self.upsert(&mut st, pod));
            }
        }
        self.pods_synced.send_replace(true);
        dedup(changes)
    }

    /// Inserts a pod read from the API (CNI ADD before the watcher saw it).
    /// Ignored when the watcher already knows it or deleted it.
    pub fn insert_from_api(&self, pod: PodInfo) -> Vec<Change> {
        let mut st = self.write();
        if st.pods.contains_key(&pod.uid) || st.tombstones.contains_key(&pod.uid) {
            return Vec::new();
        }
        if st.pod_buffer.is_some() {
            st.api_inserted_in_list.insert(pod.uid.clone());
        }
        self.upsert(&mut st, pod)
    }

    /// Pods kept by the last list although it did not contain them (read
    /// from the API while it ran); the caller GETs each and deletes the
    /// ones that are gone ([`ClusterCache::delete_pod`]).
    pub fn take_unconfirmed(&self) -> Vec<PodInfo> {
        std::mem::take(&mut self.write().unconfirmed)
    }

    /// Records the redirection annotation the agent just wrote (the watch
    /// event confirming it follows).
    pub fn set_redirection(&self, uid: &str, value: Option<&str>) {
        if let Some(p) = self.write().pods.get_mut(uid) {
            p.redirection = value.map(str::to_string);
        }
    }

    pub fn pod(&self, uid: &str) -> Option<PodInfo> {
        self.read().pods.get(uid).cloned()
    }

    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        let st = self.read();
        let uid = st.by_name.get(&(namespace.to_string(), name.to_string()))?;
        st.pods.get(uid).cloned()
    }

    /// UIDs of every cached pod.
    pub fn pod_uids(&self) -> Vec<String> {
        self.read().pods.keys().cloned().collect()
    }

    /// Every cached pod.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.read().pods.values().cloned().collect()
    }

    pub fn pod_count(&self) -> usize {
        self.read().pods.len()
    }

    /// UIDs of the cached pods in `namespace`.
    pub fn pods_in_namespace(&self, namespace: &str) -> Vec<String> {
        self.read()
            .pods
            .values()
            .filter(|p| p.namespace == namespace)
            .map(|p| p.uid.clone())
            .collect()
    }

    /// The active ztunnel pod (GENEVE mode), see [`active_ztunnel`].
    pub fn active_ztunnel(&self) -> Option<PodInfo> {
        active_ztunnel(self.read().pods.values(), &self.agent_namespace).cloned()
    }

    // ---- namespaces -------------------------------------------------------

    pub fn apply_namespace(&self, ns: NamespaceInfo) -> Vec<Change> {
        let mut st = self.write();
        if let Some(buf) = st.ns_buffer.as_mut() {
            buf.insert(ns.name.clone(), ns.clone());
        }
        Self::upsert_ns(&mut st, ns)
    }

    fn upsert_ns(st: &mut State, ns: NamespaceInfo) -> Vec<Change> {
        if st.namespaces.get(&ns.name) == Some(&ns) {
            return Vec::new();
        }
        let name = ns.name.clone();
        st.namespaces.insert(name.clone(), ns);
        vec![Change::Namespace(name)]
    }

    pub fn delete_namespace(&self, name: &str) -> Vec<Change> {
        match self.write().namespaces.remove(name) {
            Some(_) => vec![Change::Namespace(name.to_string())],
            None => Vec::new(),
        }
    }

    pub fn namespaces_init(&self) {
        self.write().ns_buffer = Some(HashMap::new());
    }

    pub fn namespaces_init_apply(&self, ns: NamespaceInfo) {
        let mut st = self.write();
        st.ns_buffer
            .get_or_insert_with(HashMap::new)
            .insert(ns.name.clone(), ns);
    }

    pub fn namespaces_init_done(&self) -> Vec<Change> {
        let mut changes = Vec::new();
        {
            let mut st = self.write();
            let listed = st.ns_buffer.take().unwrap_or_default();
            let gone: Vec<String> = st
                .namespaces
                .keys()
                .filter(|n| !listed.contains_key(*n))
                .cloned()
                .collect();
            for name in gone {
                st.namespaces.remove(&name);
                changes.push(Change::Namespace(name));
            }
            for (_, ns) in listed {
                changes.extend(Self::upsert_ns(&mut st, ns));
            }
        }
        self.namespaces_synced.send_replace(true);
        changes
    }

    /// Inserts a namespace read from the API when the watcher has not
    /// delivered it yet.
    pub fn insert_namespace_from_api(&self, ns: NamespaceInfo) -> Vec<Change> {
        let mut st = self.write();
        if st.namespaces.contains_key(&ns.name) {
            return Vec::new();
        }
        Self::upsert_ns(&mut st, ns)
    }

    /// The namespace's labels when it is known; `None` when it is not.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.read().namespaces.get(name).map(|n| n.labels.clone())
    }
}

fn dedup(changes: Vec<Change>) -> Vec<Change> {
    let mut seen = HashSet::new();
    changes
        .into_iter()
        .filter(|c| seen.insert(c.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::pod::PodPhase;

    fn pod(uid: &str, ns: &str, name: &str) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: ns.into(),
            name: name.into(),
            phase: PodPhase::Running,
            ..Default::default()
        }
    }

    fn ns(name: &str, mode: Option<&str>) -> NamespaceInfo {
        match mode {
            Some(m) => NamespaceInfo::new(name, &[("istio.io/dataplane-mode", m)]),
            None => NamespaceInfo::new(name, &[]),
        }
    }

    #[test]
    fn pod_updates_report_only_real_changes() {
        let c = ClusterCache::new("istio-system");
        assert_eq!(
            c.apply_pod(pod("u1", "demo", "a")),
            vec![Change::Pod("u1".into())]
        );
        assert!(c.apply_pod(pod("u1", "demo", "a")).is_empty(), "no change");
        let mut p = pod("u1", "demo", "a");
        p.set_label("istio.io/dataplane-mode", Some("none"));
        assert_eq!(c.apply_pod(p.clone()), vec![Change::Pod("u1".into())]);
        // Any label counts: the selectors may look at it.
        p.set_label("mesh", Some("on"));
        assert_eq!(c.apply_pod(p), vec![Change::Pod("u1".into())]);
        assert_eq!(c.pod_by_name("demo", "a").unwrap().uid, "u1");
        assert_eq!(c.pods_in_namespace("demo"), vec!["u1".to_string()]);
        assert_eq!(c.delete_pod("u1"), vec![Change::Pod("u1".into())]);
        assert!(c.pod("u1").is_none() && c.pod_by_name("demo", "a").is_none());
    }

    #[test]
    fn deleted_pods_cannot_come_back_from_a_late_api_read() {
        let c = ClusterCache::new("istio-system");
        c.apply_pod(pod("u1", "demo", "a"));
        c.delete_pod("u1");
        assert!(c.insert_from_api(pod("u1", "demo", "a")).is_empty());
        assert!(c.pod("u1").is_none());
        // unknown pods are taken; known ones are not overwritten
        assert_eq!(c.insert_from_api(pod("u2", "demo", "b")).len(), 1);
        let mut newer = pod("u2", "demo", "b");
        newer.ips = vec!["10.0.0.1".parse().unwrap()];
        c.apply_pod(newer.clone());
        assert!(c.insert_from_api(pod("u2", "demo", "b")).is_empty());
        assert_eq!(c.pod("u2").unwrap(), newer);
    }

    #[test]
    fn relist_replaces_and_reports_deletions() {
        let c = ClusterCache::new("istio-system");
        assert!(!c.is_synced());
        c.pods_init();
        c.pods_init_apply(pod("u1", "demo", "a"));
        c.pods_init_apply(pod("u2", "demo", "b"));
        let ch = c.pods_init_done();
        assert_eq!(ch.len(), 2);
        c.namespaces_init();
        c.namespaces_init_apply(ns("demo", None));
        c.namespaces_init_done();
        assert!(c.is_synced());
        // re-list without u1: it is reported deleted
        c.pods_init();
        c.pods_init_apply(pod("u2", "demo", "b"));
        let ch = c.pods_init_done();
        assert_eq!(ch, vec![Change::Pod("u1".into())]);
        assert_eq!(c.pod_count(), 1);
    }

    #[test]
    fn a_pod_read_from_the_api_during_a_relist_is_kept_until_confirmed() {
        let c = ClusterCache::new("istio-system");
        c.pods_init();
        c.pods_init_apply(pod("u1", "demo", "a"));
        c.pods_init_done();
        // Re-list: its snapshot predates pod u2, which a CNI ADD reads
        // from the API meanwhile; u1 is really gone.
        c.pods_init();
        assert_eq!(
            c.insert_from_api(pod("u2", "demo", "b")),
            vec![Change::Pod("u2".into())]
        );
        let ch = c.pods_init_done();
        assert_eq!(
            ch,
            vec![Change::Pod("u1".into())],
            "only u1 is reported gone"
        );
        assert!(c.pod("u2").is_some(), "u2 kept");
        let unconfirmed = c.take_unconfirmed();
        assert_eq!(unconfirmed.len(), 1);
        assert_eq!(unconfirmed[0].uid, "u2");
        assert!(c.take_unconfirmed().is_empty(), "handed out once");
        // Outside a list, API reads are not marked; the next re-list
        // without u2 deletes it.
        c.pods_init();
        assert!(c.pods_init_done().contains(&Change::Pod("u2".into())));
        assert!(c.take_unconfirmed().is_empty());
    }

    #[test]
    fn namespaces_and_ztunnel_changes() {
        let c = ClusterCache::new("istio-system");
        assert_eq!(c.namespace_labels("demo"), None);
        assert_eq!(
            c.apply_namespace(ns("demo", None)),
            vec![Change::Namespace("demo".into())]
        );
        assert_eq!(c.namespace_labels("demo"), Some(BTreeMap::new()));
        assert!(c.apply_namespace(ns("demo", None)).is_empty());
        c.apply_namespace(ns("demo", Some("ambient")));
        assert_eq!(
            c.namespace_labels("demo").unwrap()["istio.io/dataplane-mode"],
            "ambient"
        );
        // Any label change is a change (the selectors may look at it).
        assert_eq!(
            c.apply_namespace(NamespaceInfo::new(
                "demo",
                &[("istio.io/dataplane-mode", "ambient"), ("team", "a")]
            )),
            vec![Change::Namespace("demo".into())]
        );
        assert_eq!(c.delete_namespace("demo").len(), 1);

        let mut zt = pod("z1", "istio-system", "ztunnel-x");
        zt.app_label = Some("ztunnel".into());
        zt.ready = true;
        zt.ips = vec!["10.244.1.3".parse().unwrap()];
        let ch = c.apply_pod(zt);
        assert!(ch.contains(&Change::Ztunnel), "{ch:?}");
        assert_eq!(c.active_ztunnel().unwrap().uid, "z1");
        assert!(c.delete_pod("z1").contains(&Change::Ztunnel));
        assert!(c.active_ztunnel().is_none());
    }
}
