//! Control-loop decisions with fakes for the redirector and the API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::cni_event::{CmdAddEvent, Enrolment, PodIp};

use super::pod_netns::{NetnsPaths, NetnsResolver};
use super::{ReconcileConfig, Reconciler};
use crate::cluster::api::{ApiError, ClusterApi};
use crate::cluster::cache::ClusterCache;
use crate::cluster::enablement::{DATAPLANE_MODE_LABEL, EnablementConfig, EnablementSelectors};
use crate::cluster::pod::{NamespaceInfo, PodInfo, PodPhase};
use crate::metrics::AgentMetrics;
use crate::plugin_events::CmdAddRefusal;
use crate::redirect::{PodRedirect, ReconcileReport, RedirectError, Redirector};

/// Records calls; enrol is retryable while `ztunnel` is false; checks that
/// no two operations overlap on one pod.
#[derive(Default)]
pub(super) struct FakeRedirector {
    pub(super) calls: Mutex<Vec<(&'static str, PodRedirect)>>,
    /// UIDs whose enrol fails for good.
    pub(super) fatal: Mutex<std::collections::HashSet<String>>,
    pub(super) ztunnel: AtomicBool,
    delay: Mutex<Duration>,
    inflight: Mutex<HashMap<String, usize>>,
    overlaps: AtomicUsize,
    pub(super) reconciled: Mutex<Vec<String>>,
    /// UID → how many more unenrols of it fail.
    unenrol_failures: Mutex<HashMap<String, usize>>,
    /// UID → the start-up reconcile fails it (retryable or not).
    pub(super) reconcile_failures: Mutex<HashMap<String, bool>>,
}

impl FakeRedirector {
    pub(super) fn calls(&self, op: &str) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, p)| p.uid.clone())
            .collect()
    }

    pub(super) fn last(&self, op: &str, uid: &str) -> Option<PodRedirect> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(o, p)| *o == op && p.uid == uid)
            .map(|(_, p)| p.clone())
    }

    async fn op(&self, op: &'static str, pod: &PodRedirect) -> Result<(), RedirectError> {
        {
            let mut f = self.inflight.lock().unwrap();
            let n = f.entry(pod.uid.clone()).or_default();
            *n += 1;
            if *n > 1 {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
        }
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.calls.lock().unwrap().push((op, pod.clone()));
        *self.inflight.lock().unwrap().get_mut(&pod.uid).unwrap() -= 1;
        if op == "sync_ips" {
            return match self.fatal.lock().unwrap().contains(&pod.uid) {
                true => Err(RedirectError::new(pod, "probe ipset", true, "boom")),
                false => Ok(()),
            };
        }
        if op == "unenrol" {
            if let Some(n) = self.unenrol_failures.lock().unwrap().get_mut(&pod.uid)
                && *n > 0
            {
                *n -= 1;
                return Err(RedirectError::new(
                    pod,
                    "removing the pod's capture",
                    false,
                    "boom",
                ));
            }
            return Ok(());
        }
        match self.fatal.lock().unwrap().contains(&pod.uid) {
            true => Err(RedirectError::new(pod, "applying pod rules", false, "boom")),
            false if !self.ztunnel.load(Ordering::SeqCst) => Err(RedirectError::new(
                pod,
                "handing the pod to ztunnel",
                true,
                "no ztunnel connected",
            )),
            false => Ok(()),
        }
    }
}

impl Redirector for FakeRedirector {
    fn mode(&self) -> &'static str {
        "fake"
    }
    fn enrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.op("enrol", pod))
    }
    fn unenrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.op("unenrol", pod))
    }
    fn sync_ips<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.op("sync_ips", pod))
    }
    fn reconcile<'a>(&'a self, enrolled: &'a [PodRedirect]) -> BoxFuture<'a, ReconcileReport> {
        Box::pin(async move {
            *self.reconciled.lock().unwrap() = enrolled.iter().map(|p| p.uid.clone()).collect();
            let failing = self.reconcile_failures.lock().unwrap().clone();
            let mut report = ReconcileReport::default();
            for p in enrolled {
                match failing.get(&p.uid) {
                    Some(&retryable) => report.failed.push(RedirectError::new(
                        p,
                        "re-applying pod rules",
                        retryable,
                        "boom",
                    )),
                    None => report.enrolled.push(p.uid.clone()),
                }
            }
            report
        })
    }
    fn cleanup_all(&self) -> BoxFuture<'_, Result<(), RedirectError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Pods and namespaces for GET; records annotation patches.
#[derive(Default)]
pub(super) struct FakeApi {
    pods: Mutex<HashMap<(String, String), PodInfo>>,
    namespaces: Mutex<HashMap<String, NamespaceInfo>>,
    patches: Mutex<Vec<(String, Option<String>)>>,
    gets: AtomicUsize,
}

impl FakeApi {
    pub(super) fn annotation_of(&self, key: &str) -> Option<Option<String>> {
        self.patches
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

impl ClusterApi for FakeApi {
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, ApiError>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let p = self
            .pods
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        Box::pin(async move { Ok(p) })
    }
    fn get_namespace<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>> {
        let n = self.namespaces.lock().unwrap().get(name).cloned();
        Box::pin(async move { Ok(n) })
    }
    fn set_redirection<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        self.patches
            .lock()
            .unwrap()
            .push((format!("{namespace}/{name}"), value.map(String::from)));
        Box::pin(async { Ok(()) })
    }
    fn daemonset_exists<'a>(
        &'a self,
        _namespace: &'a str,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(async { Ok(true) })
    }
}

pub(super) struct Harness {
    pub(super) r: Arc<Reconciler>,
    pub(super) cache: Arc<ClusterCache>,
    pub(super) redir: Arc<FakeRedirector>,
    pub(super) api: Arc<FakeApi>,
    _run: tempfile::TempDir,
    proc_dir: tempfile::TempDir,
}

pub(super) fn running(uid: &str, ns: &str, name: &str, ip: &str) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        namespace: ns.into(),
        name: name.into(),
        service_account: "sa".into(),
        phase: PodPhase::Running,
        ips: vec![ip.parse().unwrap()],
        ..Default::default()
    }
}

pub(super) fn ns(name: &str, mode: Option<&str>) -> NamespaceInfo {
    match mode {
        Some(m) => NamespaceInfo::new(name, &[(DATAPLANE_MODE_LABEL, m)]),
        None => NamespaceInfo::new(name, &[]),
    }
}

impl Harness {
    pub(super) fn new(pods: Vec<PodInfo>, namespaces: Vec<NamespaceInfo>) -> Self {
        Self::with_selectors(pods, namespaces, EnablementSelectors::default())
    }

    /// A harness whose agent decides with `selectors`.
    pub(super) fn with_selectors(
        pods: Vec<PodInfo>,
        namespaces: Vec<NamespaceInfo>,
        selectors: EnablementSelectors,
    ) -> Self {
        let cache = Arc::new(ClusterCache::new("istio-system"));
        cache.pods_init();
        for p in pods {
            cache.pods_init_apply(p);
        }
        cache.pods_init_done();
        cache.namespaces_init();
        for n in namespaces {
            cache.namespaces_init_apply(n);
        }
        cache.namespaces_init_done();
        let run = tempfile::tempdir().unwrap();
        let proc = tempfile::tempdir().unwrap();
        let paths = Arc::new(NetnsPaths::load(run.path()).unwrap());
        let resolver = NetnsResolver::new(paths, proc.path().to_path_buf());
        let redir = Arc::new(FakeRedirector::default());
        redir.ztunnel.store(true, Ordering::SeqCst);
        let api = Arc::new(FakeApi::default());
        let r = Reconciler::new(
            ReconcileConfig {
                enablement: EnablementConfig {
                    exclude_namespaces: vec!["kube-system".into()],
                    agent_namespace: "istio-system".into(),
                    agent_pod: None,
                    selectors,
                },
                needs_netns: false,
                workers: 2,
                cni_add_ztunnel_wait: Duration::from_millis(200),
                cni_add_startup_wait: Duration::from_millis(500),
                retry_base: Duration::from_millis(20),
                retry_max: Duration::from_millis(100),
                unenrol_attempts: 3,
            },
            cache.clone(),
            api.clone(),
            redir.clone(),
            resolver,
            AgentMetrics::new(),
        );
        r.set_ztunnel_available(true);
        Self {
            r,
            cache,
            redir,
            api,
            _run: run,
            proc_dir: proc,
        }
    }

    /// Feeds changes like the app's dispatcher does.
    pub(super) fn apply_ns(&self, n: NamespaceInfo) {
        for c in self.cache.apply_namespace(n) {
            self.r.handle_change(&c);
        }
    }

    pub(super) fn apply_pod(&self, p: PodInfo) {
        for c in self.cache.apply_pod(p) {
            self.r.handle_change(&c);
        }
    }

    pub(super) fn delete_pod(&self, uid: &str) {
        for c in self.cache.delete_pod(uid) {
            self.r.handle_change(&c);
        }
    }

    /// Waits until the work queue stays empty (delayed retries aside).
    pub(super) async fn settle(&self) {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.r.queue.is_empty() {
                tokio::time::sleep(Duration::from_millis(30)).await;
                if self.r.queue.is_empty() {
                    return;
                }
            }
        }
    }
}

pub(super) async fn started(h: &Harness) -> Vec<tokio::task::JoinHandle<()>> {
    h.r.startup().await;
    h.r.spawn_workers()
}

#[tokio::test]
async fn label_and_unlabel_a_namespace() {
    let mut opted_out = running("u3", "demo", "c", "10.0.0.3");
    opted_out.set_label(DATAPLANE_MODE_LABEL, Some("none"));
    let mut no_ip = running("u4", "demo", "d", "10.0.0.4");
    no_ip.ips.clear();
    no_ip.phase = PodPhase::Pending;
    let h = Harness::new(
        vec![
            running("u1", "demo", "a", "10.0.0.1"),
            running("u2", "demo", "b", "10.0.0.2"),
            opted_out,
            no_ip,
            running("u5", "other", "e", "10.0.0.5"),
        ],
        vec![ns("demo", None), ns("other", None)],
    );
    let _w = started(&h).await;
    h.settle().await;
    assert!(h.redir.reconciled.lock().unwrap().is_empty());
    assert!(h.redir.calls("enrol").is_empty());

    h.apply_ns(ns("demo", Some("ambient")));
    h.settle().await;
    let mut enrolled = h.redir.calls("enrol");
    enrolled.sort();
    assert_eq!(
        enrolled,
        vec!["u1", "u2"],
        "label none and no-IP pods stay out"
    );
    assert_eq!(h.r.enrolled_uids(), vec!["u1", "u2"]);
    assert_eq!(h.api.annotation_of("demo/a"), Some(Some("enabled".into())));
    assert_eq!(h.api.annotation_of("demo/c"), None);
    assert_eq!(
        h.cache.pod("u1").unwrap().redirection.as_deref(),
        Some("enabled")
    );
    assert_eq!(h.r.metrics().pods_enrolled.get(), 2);

    // nothing changes: no more operations
    let before = h.redir.calls.lock().unwrap().len();
    h.apply_ns(ns("demo", Some("ambient")));
    h.r.handle_change(&crate::cluster::Change::Namespace("demo".into()));
    h.settle().await;
    assert_eq!(h.redir.calls.lock().unwrap().len(), before, "idempotent");

    h.apply_ns(ns("demo", None));
    h.settle().await;
    let mut out = h.redir.calls("unenrol");
    out.sort();
    assert_eq!(out, vec!["u1", "u2"]);
    assert!(h.r.enrolled_uids().is_empty());
    assert_eq!(h.api.annotation_of("demo/a"), Some(None));
    assert_eq!(h.api.annotation_of("demo/b"), Some(None));
    assert_eq!(h.redir.overlaps.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn pending_until_ztunnel_connects() {
    let h = Harness::new(
        vec![running("u1", "demo", "a", "10.0.0.1")],
        vec![ns("demo", None)],
    );
    h.redir.ztunnel.store(false, Ordering::SeqCst);
    h.r.set_ztunnel_available(false);
    let _w = started(&h).await;
    h.apply_ns(ns("demo", Some("ambient")));
    h.settle().await;
    assert_eq!(h.r.pending_uids(), vec!["u1"]);
    assert_eq!(h.api.annotation_of("demo/a"), Some(Some("pending".into())));
    assert_eq!(h.r.metrics().pods_pending.get(), 1);

    h.redir.ztunnel.store(true, Ordering::SeqCst);
    h.r.set_ztunnel_available(true);
    h.settle().await;
    assert_eq!(h.r.enrolled_uids(), vec!["u1"]);
    assert_eq!(h.api.annotation_of("demo/a"), Some(Some("enabled".into())));
}

#[tokio::test]
async fn fatal_failures_are_retried_with_backoff_and_not_annotated() {
    let mut enrolled = running("u1", "demo", "a", "10.0.0.1");
    enrolled.redirection = Some("enabled".into()); // by the previous agent
    let h = Harness::new(vec![enrolled], vec![ns("demo", Some("ambient"))]);
    h.redir.fatal.lock().unwrap().insert("u1".into());
    // start-up hands u1 to reconcile (the fake reports it enrolled); make
    // the next pass fail by changing the pod
    let _w = started(&h).await;
    h.settle().await;
    assert_eq!(h.r.enrolled_uids(), vec!["u1"]);
    let mut p = h.cache.pod("u1").unwrap();
    p.set_label(DATAPLANE_MODE_LABEL, Some("none"));
    h.apply_pod(p.clone());
    h.settle().await;
    assert!(h.r.enrolled_uids().is_empty());
    p.set_label(DATAPLANE_MODE_LABEL, None);
    h.apply_pod(p);
    // several attempts within a few backoff periods
    tokio::time::sleep(Duration::from_millis(400)).await;
    let attempts = h.redir.calls("enrol").len();
    assert!(attempts >= 3, "retried: {attempts} attempts");
    assert!(h.r.enrolled_uids().is_empty());
    assert_eq!(
        h.api.annotation_of("demo/a"),
        Some(None),
        "not redirected: no annotation"
    );
    h.redir.fatal.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.r.enrolled_uids(), vec!["u1"]);
}

#[tokio::test]
async fn deleted_pods_are_cleaned_up_and_forgotten() {
    let h = Harness::new(
        vec![running("u1", "demo", "a", "10.0.0.1")],
        vec![ns("demo", Some("ambient"))],
    );
    let _w = started(&h).await;
    h.settle().await;
    h.r.resolver
        .paths()
        .remember("u1", Path::new("/var/run/netns/x"))
        .await
        .unwrap();
    h.delete_pod("u1");
    h.settle().await;
    assert_eq!(h.redir.calls("unenrol"), vec!["u1"]);
    assert!(h.r.records().is_empty());
    assert!(
        h.r.resolver.paths().get("u1").is_none(),
        "netns record dropped"
    );
    assert!(
        h.r.locks.lock().unwrap().is_empty(),
        "no per-pod lock kept for gone pods"
    );
    // the deleted pod gets no annotation patch
    assert_eq!(
        h.api
            .patches
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_none())
            .count(),
        0
    );
}

/// GENEVE mode (no per-pod netns): a deleted pod's capture is node state (ipset entry,
/// route) that would catch the next pod given its IP, so a failed removal is retried.
#[tokio::test]
async fn a_deleted_pods_failed_unenrol_is_retried_when_its_state_is_on_the_node() {
    let h = Harness::new(
        vec![running("u1", "demo", "a", "10.0.0.1")],
        vec![ns("demo", Some("ambient"))],
    );
    let _w = started(&h).await;
    h.settle().await;
    h.redir
        .unenrol_failures
        .lock()
        .unwrap()
        .insert("u1".into(), 1);
    h.delete_pod("u1");
    h.settle().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.settle().await;
    assert_eq!(h.redir.calls("unenrol"), vec!["u1", "u1"], "retried once");
    assert!(h.r.records().is_empty(), "forgotten once removed");
}

#[tokio::test]
async fn startup_rebuilds_and_undoes_a_previous_agents_work() {
    let mut stale = running("u2", "plain", "b", "10.0.0.2");
    stale.redirection = Some("enabled".into()); // enrolled by the previous agent
    let mut ambient = running("u1", "demo", "a", "10.0.0.1");
    ambient.redirection = Some("enabled".into());
    let h = Harness::new(
        vec![ambient, stale],
        vec![ns("demo", Some("ambient")), ns("plain", None)],
    );
    let _w = started(&h).await;
    h.settle().await;
    // Both were enrolled by the previous agent: both stay in ztunnel's snapshot until
    // the queue has removed the one no longer wanted (as upstream).
    let mut reconciled = h.redir.reconciled.lock().unwrap().clone();
    reconciled.sort();
    assert_eq!(reconciled, ["u1", "u2"]);
    assert_eq!(h.redir.calls("unenrol"), vec!["u2"]);
    assert!(h.redir.calls("enrol").is_empty(), "reconcile, not re-enrol");
    assert_eq!(h.api.annotation_of("plain/b"), Some(None));
    assert_eq!(h.api.annotation_of("demo/a"), None, "already correct");
    assert_eq!(h.r.enrolled_uids(), vec!["u1"]);
}

/// At start-up the annotation decides what a previous agent enrolled, as upstream's
/// snapshot: a pod labelled while the agent was down (never enrolled, no annotation) is
/// enrolled with its rules and ztunnel's acknowledgement, not recorded as enrolled by the
/// start-up reconcile (whose rule re-application may be off); an enrolled pod whose IP the
/// cache does not have yet stays in the snapshot (ztunnel keeps its proxy); a pod left
/// `pending` (rules in place, no acknowledgement yet) is reconciled like an enrolled one.
#[tokio::test]
async fn startup_snapshot_follows_the_annotation() {
    let new = running("u1", "demo", "new", "10.0.0.1");
    let mut no_ip = running("u2", "demo", "old", "10.0.0.2");
    no_ip.redirection = Some("enabled".into());
    no_ip.ips.clear();
    let mut pending = running("u3", "demo", "pending", "10.0.0.3");
    pending.redirection = Some("pending".into());
    let h = Harness::new(vec![new, no_ip, pending], vec![ns("demo", Some("ambient"))]);
    let _w = started(&h).await;
    h.settle().await;
    let mut reconciled = h.redir.reconciled.lock().unwrap().clone();
    reconciled.sort();
    assert_eq!(reconciled, ["u2", "u3"]);
    assert_eq!(
        h.api.annotation_of("demo/pending"),
        Some(Some("enabled".into()))
    );
    assert_eq!(
        h.redir.calls("enrol"),
        vec!["u1"],
        "the new pod is enrolled"
    );
    assert!(h.redir.calls("unenrol").is_empty());
    assert_eq!(
        h.api.annotation_of("demo/new"),
        Some(Some("enabled".into()))
    );
}

pub(super) fn add_event(ns: &str, name: &str, uid: Option<&str>) -> CmdAddEvent {
    CmdAddEvent {
        netns: format!("/var/run/netns/cni-{name}"),
        pod_name: name.into(),
        pod_namespace: ns.into(),
        pod_uid: uid.map(String::from),
        ips: vec![PodIp {
            interface: Some(0),
            address: "10.0.0.9/24".into(),
            gateway: None,
        }],
    }
}

#[tokio::test]
async fn cni_add_enrols_before_answering() {
    let mut new = running("u9", "demo", "new", "10.0.0.9");
    new.ips.clear();
    new.phase = PodPhase::Pending;
    let h = Harness::new(vec![new], vec![ns("demo", Some("ambient"))]);
    let _w = started(&h).await;
    let reply =
        h.r.cni_add(add_event("demo", "new", Some("u9")))
            .await
            .unwrap();
    assert_eq!(reply.enrolment, Enrolment::Enrolled);
    let sent = h.redir.last("enrol", "u9").expect("enrolled");
    assert_eq!(sent.netns, Some(PathBuf::from("/var/run/netns/cni-new")));
    assert_eq!(
        sent.ips,
        vec!["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        h.api.annotation_of("demo/new"),
        Some(Some("enabled".into()))
    );
    assert_eq!(
        h.r.resolver.paths().get("u9"),
        Some(PathBuf::from("/var/run/netns/cni-new"))
    );
    // the watcher then reports the IP: nothing more to do
    h.apply_pod(running("u9", "demo", "new", "10.0.0.9"));
    h.settle().await;
    assert_eq!(h.redir.calls("enrol").len(), 1);
}

#[tokio::test]
async fn cni_add_of_other_pods() {
    let mut none = running("u1", "demo", "out", "10.0.0.1");
    none.set_label(DATAPLANE_MODE_LABEL, Some("none"));
    let h = Harness::new(
        vec![none],
        vec![ns("demo", Some("ambient")), ns("plain", None)],
    );
    let _w = started(&h).await;
    // opted out: NotAmbient, netns still remembered for a later label
    let reply =
        h.r.cni_add(add_event("demo", "out", Some("u1")))
            .await
            .unwrap();
    assert_eq!(reply.enrolment, Enrolment::NotAmbient);
    assert!(reply.reason.contains("none"), "{}", reply.reason);
    assert!(h.r.resolver.paths().get("u1").is_some());

    // not in the cache yet: GET from the API, then cached
    h.api.pods.lock().unwrap().insert(
        ("plain".into(), "fresh".into()),
        running("u2", "plain", "fresh", "10.0.0.2"),
    );
    let reply =
        h.r.cni_add(add_event("plain", "fresh", Some("u2")))
            .await
            .unwrap();
    assert_eq!(reply.enrolment, Enrolment::NotAmbient);
    assert_eq!(h.api.gets.load(Ordering::SeqCst), 1);
    assert!(h.cache.pod("u2").is_some());

    // unknown everywhere: deleted meanwhile
    let reply =
        h.r.cni_add(add_event("plain", "ghost", None))
            .await
            .unwrap();
    assert_eq!(reply.enrolment, Enrolment::NotAmbient);
    // excluded namespace
    h.api.pods.lock().unwrap().insert(
        ("kube-system".into(), "dns".into()),
        running("u3", "kube-system", "dns", "10.0.0.3"),
    );
    let reply =
        h.r.cni_add(add_event("kube-system", "dns", Some("u3")))
            .await
            .unwrap();
    assert_eq!(reply.enrolment, Enrolment::NotAmbient);
    assert!(h.redir.calls("enrol").is_empty());
}

#[tokio::test]
async fn cni_add_fails_closed_and_leaves_nothing() {
    let mut p = running("u1", "demo", "a", "10.0.0.1");
    p.ips.clear();
    let mut q = running("u2", "demo", "b", "10.0.0.2");
    q.ips.clear();
    let h = Harness::new(vec![p, q], vec![ns("demo", Some("ambient"))]);
    let _w = started(&h).await;

    // no ztunnel
    h.redir.ztunnel.store(false, Ordering::SeqCst);
    h.r.set_ztunnel_available(false);
    let err =
        h.r.cni_add(add_event("demo", "a", Some("u1")))
            .await
            .unwrap_err();
    assert!(
        matches!(&err, CmdAddRefusal::EnrolmentFailed(why) if why.contains("no ztunnel") && why.contains("demo/a")),
        "{err:?}"
    );
    assert!(h.redir.calls("enrol").is_empty(), "not even tried");

    // ztunnel connected but the enrolment fails: undone
    h.redir.ztunnel.store(true, Ordering::SeqCst);
    h.r.set_ztunnel_available(true);
    h.redir.fatal.lock().unwrap().insert("u2".into());
    let err =
        h.r.cni_add(add_event("demo", "b", Some("u2")))
            .await
            .unwrap_err();
    assert!(
        matches!(&err, CmdAddRefusal::EnrolmentFailed(why) if why.contains("demo/b") && why.contains("boom")),
        "{err:?}"
    );
    assert_eq!(h.redir.calls("unenrol"), vec!["u2"]);
    assert!(h.r.records().is_empty());
    assert_eq!(h.api.annotation_of("demo/b"), None);
}

#[tokio::test]
async fn cni_add_reads_process_netns_paths_through_host_proc() {
    // cri-dockerd names the sandbox `/proc/<pid>/ns/net` in the node's PID namespace.
    let mut new = running("u9", "demo", "new", "10.0.0.9");
    new.ips.clear();
    let h = Harness::new(vec![new], vec![ns("demo", Some("ambient"))]);
    let _w = started(&h).await;
    let mut ev = add_event("demo", "new", Some("u9"));
    ev.netns = "/proc/4242/ns/net".into();
    h.r.cni_add(ev).await.unwrap();
    let want = h.proc_dir.path().join("4242/ns/net");
    assert_eq!(
        h.redir.last("enrol", "u9").unwrap().netns,
        Some(want.clone())
    );
    assert_eq!(h.r.resolver.paths().get("u9"), Some(want));
}

#[tokio::test]
async fn cni_add_before_start_up_is_undecided_not_failed() {
    // The plugin reads Undecided (503) as "decide from the API yourself", so
    // pods outside the mesh start while the agent syncs; EnrolmentFailed (500)
    // would fail every pod's ADD.
    let h = Harness::new(
        vec![running("u1", "demo", "a", "10.0.0.1")],
        vec![ns("demo", Some("ambient"))],
    );
    let err =
        h.r.cni_add(add_event("demo", "a", Some("u1")))
            .await
            .unwrap_err();
    assert!(
        matches!(&err, CmdAddRefusal::Undecided(why) if why.contains("still starting") && why.contains("demo/a")),
        "{err:?}"
    );
    assert_eq!(err.status().as_u16(), 503);
    assert!(h.redir.calls("enrol").is_empty());
}

#[tokio::test]
async fn one_operation_per_pod_at_a_time() {
    let mut p = running("u1", "demo", "a", "10.0.0.1");
    p.ips.clear();
    let h = Harness::new(vec![p.clone()], vec![ns("demo", Some("ambient"))]);
    let _w = started(&h).await;
    *h.redir.delay.lock().unwrap() = Duration::from_millis(50);
    // CNI ADD while the watcher delivers the IP and labels flip
    let r = h.r.clone();
    let add = tokio::spawn(async move { r.cni_add(add_event("demo", "a", Some("u1"))).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    p.ips = vec!["10.0.0.1".parse().unwrap()];
    h.apply_pod(p.clone());
    for i in 0..4 {
        h.apply_ns(ns("demo", if i % 2 == 0 { None } else { Some("ambient") }));
        h.r.sync("u1").await;
    }
    assert!(add.await.unwrap().is_ok());
    h.settle().await;
    assert_eq!(h.redir.overlaps.load(Ordering::SeqCst), 0);
    assert_eq!(h.r.enrolled_uids(), vec!["u1"], "ends as labelled");
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let cache = Arc::new(ClusterCache::new("x"));
    let run = tempfile::tempdir().unwrap();
    let paths = Arc::new(NetnsPaths::load(run.path()).unwrap());
    let r = Reconciler::new(
        ReconcileConfig::default(),
        cache,
        Arc::new(FakeApi::default()),
        Arc::new(FakeRedirector::default()),
        NetnsResolver::new(paths, "/nonexistent".into()),
        AgentMetrics::new(),
    );
    let d: Vec<u128> = (1..=8).map(|a| r.backoff(a).as_millis()).collect();
    assert_eq!(d, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
}
