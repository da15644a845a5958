//! The control loop: desired state (the informer cache + the enablement
//! rules) and events (cache changes, CNI ADDs, ztunnel coming and going) →
//! [`Redirector`] enrol/unenrol and the `ambient.istio.io/redirection`
//! annotation.
//!
//! - Every pod is handled by [`Reconciler::sync`] under a per-pod lock, so no
//!   two operations ever run on one pod at once (CNI ADD included). Passes
//!   are idempotent: each re-reads the cache and the pod's record and
//!   computes a [`plan::Plan`].
//! - Triggers go through a de-duplicating [`queue::WorkQueue`] served by a
//!   few workers: pod changes, namespace label changes (every pod of the
//!   namespace), retries (exponential backoff, 0.5 s doubling to 30 s), and
//!   ztunnel becoming available (every pending pod at once).
//! - Retryable failures (ztunnel has not taken the pod, or a redirected pod
//!   could not be updated) leave the pod redirected and annotated `pending`; other failures leave it
//!   unredirected (the redirector undoes half-done work), unannotated, and
//!   retried with backoff. Unenrol failures are retried a few times, then
//!   logged and given up.
//! - Start-up ([`Reconciler::startup`]): every pod that should be enrolled
//!   is handed to [`Redirector::reconcile`] (rules re-applied, ZDS snapshot
//!   rebuilt), then every cached pod is queued once, which fixes
//!   annotations and unenrols pods a previous agent enrolled that are no
//!   longer ambient.
//! - New pods are enrolled by their CNI ADD ([`cni_add`]), synchronously:
//!   the plugin gets its answer only when redirection is in place. A pod
//!   the watcher sees before its sandbox has an IP waits for that ADD.
//!
//! Netns of running pods: [`pod_netns`] (remembered CNI ADD paths, then a
//! `/proc` scan).

pub mod cni_add;
pub mod plan;
pub mod pod_netns;
pub mod queue;
pub mod ztunnel;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::enablement::{Decision, EnablementConfig};
use crate::cluster::{Change, ClusterApi, ClusterCache, PodInfo};
use crate::metrics::AgentMetrics;
use crate::redirect::{PodRedirect, Redirector};
use plan::{Actual, Annotation, Desired, Op};
use pod_netns::NetnsResolver;
use queue::WorkQueue;

/// Settings of the control loop.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    pub enablement: EnablementConfig,
    /// In-pod mode: enrolment needs each pod's netns.
    pub needs_netns: bool,
    /// Concurrent pod operations.
    pub workers: usize,
    /// How long a CNI ADD of an ambient pod waits for a ztunnel.
    pub cni_add_ztunnel_wait: Duration,
    /// How long a CNI ADD waits for the agent's start-up to finish.
    pub cni_add_startup_wait: Duration,
    /// First retry delay; doubles per attempt up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Unenrol attempts before giving up on a pod.
    pub unenrol_attempts: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enablement: EnablementConfig::default(),
            needs_netns: true,
            workers: 4,
            cni_add_ztunnel_wait: Duration::from_secs(2),
            cni_add_startup_wait: Duration::from_secs(3),
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            unenrol_attempts: 5,
        }
    }
}

/// What this agent did to one pod.
#[derive(Debug, Clone)]
struct PodRecord {
    actual: Actual,
    /// What was enrolled (names, IPs, netns path): used to unenrol a pod
    /// after it left the cache.
    redirect: PodRedirect,
    /// Consecutive failures.
    attempts: u32,
    /// Earliest time of the next enrol attempt (failed / pending pods).
    retry_at: Option<Instant>,
}

/// The control loop's shared core; see the module docs.
pub struct Reconciler {
    cfg: ReconcileConfig,
    cache: Arc<ClusterCache>,
    api: Arc<dyn ClusterApi>,
    redirector: Arc<dyn Redirector>,
    resolver: NetnsResolver,
    metrics: AgentMetrics,
    queue: Arc<WorkQueue>,
    records: Mutex<HashMap<String, PodRecord>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    ztunnel: watch::Sender<bool>,
    started: watch::Sender<bool>,
}

impl Reconciler {
    pub fn new(
        cfg: ReconcileConfig,
        cache: Arc<ClusterCache>,
        api: Arc<dyn ClusterApi>,
        redirector: Arc<dyn Redirector>,
        resolver: NetnsResolver,
        metrics: AgentMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            cache,
            api,
            redirector,
            resolver,
            metrics,
            queue: WorkQueue::new(),
            records: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            ztunnel: watch::channel(false).0,
            started: watch::channel(false).0,
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cache(&self) -> &Arc<ClusterCache> {
        &self.cache
    }

    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// UIDs whose redirection is complete.
    pub fn enrolled_uids(&self) -> Vec<String> {
        self.uids_in(Actual::Enrolled)
    }

    /// UIDs redirected but not yet taken by ztunnel.
    pub fn pending_uids(&self) -> Vec<String> {
        self.uids_in(Actual::Pending)
    }

    fn uids_in(&self, state: Actual) -> Vec<String> {
        let mut v: Vec<String> = self
            .records()
            .iter()
            .filter(|(_, r)| r.actual == state)
            .map(|(u, _)| u.clone())
            .collect();
        v.sort();
        v
    }

    /// True once [`Reconciler::startup`] finished.
    pub fn is_started(&self) -> bool {
        *self.started.borrow()
    }

    /// The netns path of `pod` (remembered CNI path, else a `/proc` scan
    /// checked against the pod's IPs).
    pub async fn resolve_netns(&self, pod: &PodInfo) -> Option<std::path::PathBuf> {
        self.resolver.resolve(&pod.to_redirect(None)).await
    }

    /// Whether a ztunnel can take pods now.
    pub fn ztunnel_available(&self) -> bool {
        *self.ztunnel.borrow()
    }

    /// A ztunnel became available (or went away). When it appears, every
    /// pending or failed pod is retried at once.
    pub fn set_ztunnel_available(&self, available: bool) {
        let was = self.ztunnel.send_replace(available);
        self.metrics.ztunnel_connected.set(i64::from(available));
        if available && !was {
            let uids: Vec<String> = {
                let mut recs = self.records();
                recs.iter_mut()
                    .filter(|(_, r)| matches!(r.actual, Actual::Pending | Actual::Failed))
                    .map(|(u, r)| {
                        r.retry_at = None;
                        u.clone()
                    })
                    .collect()
            };
            if !uids.is_empty() {
                tracing::info!(
                    pods = uids.len(),
                    "ztunnel available: retrying pending pods"
                );
            }
            for uid in uids {
                self.queue.add(&uid);
            }
        }
    }

    /// Routes a cache change to the work queue.
    pub fn handle_change(&self, change: &Change) {
        match change {
            Change::Pod(uid) => self.queue.add(uid),
            Change::Namespace(ns) => {
                for uid in self.cache.pods_in_namespace(ns) {
                    self.queue.add(&uid);
                }
            }
            Change::Ztunnel => {}
        }
    }

    /// Starts `cfg.workers` queue workers; they stop after [`Reconciler::stop`].
    pub fn spawn_workers(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        (0..self.cfg.workers.max(1))
            .map(|_| {
                let this = self.clone();
                tokio::spawn(async move {
                    while let Some(uid) = this.queue.next().await {
                        this.sync(&uid).await;
                    }
                })
            })
            .collect()
    }

    /// Stops the workers (each finishes its current pod).
    pub fn stop(&self) {
        self.queue.close();
    }

    fn pod_lock(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(uid.to_string())
            .or_default()
            .clone()
    }

    fn drop_pod_lock(&self, uid: &str, lock: &Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and the caller hold it: nobody is waiting.
        if Arc::strong_count(lock) <= 2 && !self.records().contains_key(uid) {
            locks.remove(uid);
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(16);
        (self.cfg.retry_base * 2u32.pow(exp)).min(self.cfg.retry_max)
    }

    /// What `pod` should be, with the rule that decided it.
    pub fn desired(&self, pod: Option<&PodInfo>) -> Desired {
        let Some(p) = pod else {
            return Desired::Gone;
        };
        if p.phase.is_terminal() {
            return Desired::Gone;
        }
        let ns_labels = self
            .cache
            .namespace_labels(&p.namespace)
            .unwrap_or_default();
        match p.decide(&ns_labels, &self.cfg.enablement) {
            Decision::Ambient(_) if p.ips.is_empty() => Desired::AwaitSandbox,
            Decision::Ambient(r) => Desired::Enrol(r),
            Decision::NotAmbient(r) => Desired::Out(r),
        }
    }

    fn update_gauges(&self) {
        let (mut enrolled, mut pending) = (0, 0);
        for r in self.records().values() {
            match r.actual {
                Actual::Enrolled => enrolled += 1,
                Actual::Pending => pending += 1,
                _ => {}
            }
        }
        self.metrics.pods_enrolled.set(enrolled);
        self.metrics.pods_pending.set(pending);
    }

    /// One idempotent pass over pod `uid` (see the module docs).
    pub async fn sync(&self, uid: &str) {
        let lock = self.pod_lock(uid);
        {
            let _guard = lock.lock().await;
            self.sync_locked(uid).await;
        }
        self.drop_pod_lock(uid, &lock);
        self.update_gauges();
    }

    async fn sync_locked(&self, uid: &str) {
        let pod = self.cache.pod(uid);
        let desired = self.desired(pod.as_ref());
        let (actual, retry_due) = match self.records().get(uid) {
            Some(r) => (r.actual, r.retry_at.is_none_or(|t| Instant::now() >= t)),
            None => (Actual::None, true),
        };
        let annotation = pod.as_ref().and_then(|p| p.redirection.as_deref());
        let p = plan::plan(desired, actual, annotation, pod.is_some(), retry_due);
        let key = pod
            .as_ref()
            .map(PodInfo::key)
            .or_else(|| self.records().get(uid).map(|r| r.redirect.key()))
            .unwrap_or_else(|| "?/?".into());
        if p.op.is_some() {
            tracing::info!(pod = %key, uid, ?desired, ?actual, op = ?p.op, "pod decision");
        } else {
            tracing::debug!(pod = %key, uid, ?desired, ?actual, "pod decision: nothing to do");
        }
        match (p.op, pod.as_ref()) {
            (Some(Op::Enrol), Some(pod)) => self.enrol(pod, desired).await,
            (Some(Op::Enrol), None) => {}
            (Some(Op::Unenrol), _) => self.unenrol(uid, pod.as_ref(), desired).await,
            (None, Some(pod)) => {
                if actual == Actual::Enrolled && matches!(desired, Desired::Enrol(_)) {
                    self.resync_ips(pod).await;
                }
                if let Some(a) = p.annotation {
                    self.annotate(pod, a).await;
                }
            }
            (None, None) => {}
        }
        // A failed unenrol that will be retried keeps its record (GENEVE: the
        // deleted pod's capture is node state); everything else is forgotten.
        let retrying = p.op == Some(Op::Unenrol) && self.records().contains_key(uid);
        if p.forget && !retrying {
            self.forget(uid).await;
        }
    }

    async fn enrol(&self, pod: &PodInfo, desired: Desired) {
        let t0 = std::time::Instant::now();
        let mut redirect = pod.to_redirect(None);
        if self.cfg.needs_netns {
            redirect.netns = self.resolver.resolve(&redirect).await;
        }
        let result = self.redirector.enrol(&redirect).await;
        self.metrics.observe("enrol", t0.elapsed());
        let reason = match desired {
            Desired::Enrol(r) => r.to_string(),
            _ => String::new(),
        };
        let outcome = match &result {
            Ok(()) => {
                tracing::info!(pod = %pod.key(), uid = %pod.uid, %reason, mode = self.redirector.mode(), "pod enrolled");
                Ok(())
            }
            Err(e) => {
                self.metrics.failure("enrol", e.is_retryable());
                if e.is_retryable() {
                    tracing::warn!(pod = %pod.key(), uid = %pod.uid, error = %e, "pod redirected, ztunnel has not taken it: pending");
                } else {
                    tracing::warn!(pod = %pod.key(), uid = %pod.uid, error = %e, "pod enrolment failed");
                }
                Err(e.is_retryable())
            }
        };
        let (actual, annotation) = plan::after_enrol(outcome);
        let retry = {
            let mut recs = self.records();
            let rec = recs.entry(pod.uid.clone()).or_insert_with(|| PodRecord {
                actual,
                redirect: redirect.clone(),
                attempts: 0,
                retry_at: None,
            });
            rec.actual = actual;
            rec.redirect = redirect;
            if actual == Actual::Enrolled {
                rec.attempts = 0;
                rec.retry_at = None;
                None
            } else {
                rec.attempts += 1;
                let delay = self.backoff(rec.attempts);
                rec.retry_at = Some(Instant::now() + delay);
                Some(delay)
            }
        };
        if let Some(delay) = retry {
            self.queue.add_after(&pod.uid, delay);
        }
        self.annotate(pod, annotation).await;
    }

    /// An enrolled pod that stays enrolled: when its IPs in the cache differ
    /// from those it was enrolled with (e.g. unknown at start-up, as upstream
    /// #60471), the redirector's per-IP state (probe ipset) follows them.
    async fn resync_ips(&self, pod: &PodInfo) {
        let redirect = {
            let recs = self.records();
            let Some(rec) = recs.get(&pod.uid) else {
                return;
            };
            if pod.ips.is_empty() || same_ips(&rec.redirect.ips, &pod.ips) {
                return;
            }
            PodRedirect {
                ips: pod.ips.clone(),
                ..rec.redirect.clone()
            }
        };
        let t0 = std::time::Instant::now();
        let result = self.redirector.sync_ips(&redirect).await;
        self.metrics.observe("sync_ips", t0.elapsed());
        match result {
            Ok(()) => {
                tracing::info!(pod = %pod.key(), uid = %pod.uid, ips = ?pod.ips, "enrolled pod's IPs synced");
                if let Some(rec) = self.records().get_mut(&pod.uid) {
                    rec.redirect.ips = redirect.ips;
                    rec.attempts = 0;
                }
            }
            Err(e) => {
                self.metrics.failure("sync_ips", e.is_retryable());
                let attempts = match self.records().get_mut(&pod.uid) {
                    Some(rec) => {
                        rec.attempts += 1;
                        rec.attempts
                    }
                    None => 1,
                };
                tracing::warn!(pod = %pod.key(), uid = %pod.uid, error = %e, attempts, "cannot sync the enrolled pod's IPs; will retry");
                self.queue.add_after(&pod.uid, self.backoff(attempts));
            }
        }
    }

    async fn unenrol(&self, uid: &str, pod: Option<&PodInfo>, desired: Desired) {
        let t0 = std::time::Instant::now();
        let recorded = self.records().get(uid).map(|r| r.redirect.clone());
        let mut redirect = match (recorded, pod) {
            (Some(r), _) => r,
            (None, Some(p)) => p.to_redirect(None),
            (None, None) => PodRedirect {
                uid: uid.to_string(),
                ..Default::default()
            },
        };
        // A pod enrolled by a previous agent: find its netns to remove its
        // rules (a deleted pod's rules go with its netns).
        if self.cfg.needs_netns && redirect.netns.is_none() && desired != Desired::Gone {
            redirect.netns = self.resolver.resolve(&redirect).await;
        }
        let result = self.redirector.unenrol(&redirect).await;
        self.metrics.observe("unenrol", t0.elapsed());
        let why = match desired {
            Desired::Out(r) => r.to_string(),
            Desired::Gone => "pod deleted or finished".to_string(),
            _ => String::new(),
        };
        match result {
            Ok(()) => {
                tracing::info!(pod = %redirect.key(), uid, reason = %why, "pod unenrolled");
                self.records().remove(uid);
                if let Some(p) = pod {
                    self.annotate(p, Annotation::Remove).await;
                }
            }
            Err(e) => {
                self.metrics.failure("unenrol", e.is_retryable());
                let attempts = {
                    let mut recs = self.records();
                    let rec = recs.entry(uid.to_string()).or_insert_with(|| PodRecord {
                        actual: Actual::Failed,
                        redirect: redirect.clone(),
                        attempts: 0,
                        retry_at: None,
                    });
                    rec.attempts += 1;
                    rec.attempts
                };
                // A deleted pod's in-pod rules went with its netns; GENEVE state is
                // on the node (ipset entry, route) and would capture the next pod
                // given the IP: retried like any other.
                let gone_with_netns = desired == Desired::Gone && self.cfg.needs_netns;
                if attempts >= self.cfg.unenrol_attempts || gone_with_netns {
                    tracing::error!(pod = %redirect.key(), uid, error = %e, attempts, "pod unenrol failed; giving up");
                    self.records().remove(uid);
                    if let Some(p) = pod {
                        self.annotate(p, Annotation::Remove).await;
                    }
                } else {
                    tracing::warn!(pod = %redirect.key(), uid, error = %e, attempts, "pod unenrol failed; will retry");
                    self.queue.add_after(uid, self.backoff(attempts));
                }
            }
        }
    }

    /// Makes the pod's annotation `a` (only if it differs); a failed patch
    /// is retried later.
    async fn annotate(&self, pod: &PodInfo, a: Annotation) {
        let want = match a {
            Annotation::Set(v) => Some(v),
            Annotation::Remove => None,
        };
        let current = self
            .cache
            .pod(&pod.uid)
            .map(|p| p.redirection)
            .unwrap_or_else(|| pod.redirection.clone());
        if current.as_deref() == want {
            return;
        }
        match self
            .api
            .set_redirection(&pod.namespace, &pod.name, want)
            .await
        {
            Ok(()) => {
                self.cache.set_redirection(&pod.uid, want);
                tracing::debug!(pod = %pod.key(), annotation = ?want, "redirection annotation updated");
            }
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "cannot update the redirection annotation; will retry");
                self.queue.add_after(&pod.uid, Duration::from_secs(1));
            }
        }
    }

    async fn forget(&self, uid: &str) {
        self.records().remove(uid);
        self.resolver.paths().forget(uid).await;
    }

    /// Start-up: rebuild the redirection of every pod a previous agent
    /// enrolled (annotated `enabled`; one [`Redirector::reconcile`] call, which
    /// also makes the ZDS snapshot), drop netns records of pods that no
    /// longer exist, then queue every pod once. Call after the cache is synced
    /// and before [`Reconciler::spawn_workers`].
    ///
    /// As upstream's snapshot, the annotation decides, not the label: a pod
    /// that should be enrolled but never was (labelled while the agent was
    /// down, or a failed enrolment undone) is enrolled by the queue with its
    /// rules and ztunnel's acknowledgement, instead of being recorded as
    /// enrolled with rules it never got (with start-up rule reconciliation
    /// off, its traffic bypassed ztunnel); a pod enrolled before but no longer
    /// wanted (unlabelled meanwhile) or without an IP in the cache yet stays in
    /// the snapshot, so ztunnel keeps serving it until the queue removes its
    /// rules, instead of draining its proxy under them.
    pub async fn startup(&self) {
        let t0 = std::time::Instant::now();
        let mut list = Vec::new();
        for pod in self.cache.pods() {
            // `pending` too: its rules are in place, only ztunnel's acknowledgement was
            // missing; left out, its probe-ipset entries would be pruned under them.
            let enrolled_before = plan::is_ours(pod.redirection.as_deref());
            if enrolled_before && self.desired(Some(&pod)) != Desired::Gone {
                let mut redirect = pod.to_redirect(None);
                if self.cfg.needs_netns {
                    redirect.netns = self.resolver.resolve(&redirect).await;
                }
                list.push(redirect);
            }
        }
        tracing::info!(
            pods = list.len(),
            mode = self.redirector.mode(),
            "start-up reconcile"
        );
        let report = self.redirector.reconcile(&list).await;
        let now = Instant::now();
        {
            let mut recs = self.records();
            for uid in &report.enrolled {
                if let Some(r) = list.iter().find(|p| &p.uid == uid) {
                    recs.insert(
                        uid.clone(),
                        PodRecord {
                            actual: Actual::Enrolled,
                            redirect: r.clone(),
                            attempts: 0,
                            retry_at: None,
                        },
                    );
                }
            }
            for e in &report.failed {
                self.metrics.failure("enrol", e.is_retryable());
                let Some(r) = list.iter().find(|p| p.uid == e.uid) else {
                    tracing::error!(error = %e, "start-up reconcile: node-level failure");
                    continue;
                };
                tracing::warn!(error = %e, "start-up reconcile: pod not (fully) enrolled");
                let actual = if e.is_retryable() {
                    Actual::Pending
                } else {
                    Actual::Failed
                };
                recs.insert(
                    e.uid.clone(),
                    PodRecord {
                        actual,
                        redirect: r.clone(),
                        attempts: 1,
                        retry_at: Some(now + self.cfg.retry_base),
                    },
                );
            }
        }
        for uid in &report.removed {
            tracing::info!(uid, "start-up reconcile: stale redirection removed");
        }
        for uid in self.resolver.paths().uids() {
            if self.cache.pod(&uid).is_none() {
                self.resolver.paths().forget(&uid).await;
            }
        }
        self.metrics.observe("startup", t0.elapsed());
        tracing::info!(
            enrolled = report.enrolled.len(),
            failed = report.failed.len(),
            removed = report.removed.len(),
            elapsed = ?t0.elapsed(),
            "start-up reconcile done"
        );
        for uid in self.cache.pod_uids() {
            self.queue.add(&uid);
        }
        // Failed ones come back after their backoff.
        for e in &report.failed {
            if !e.uid.is_empty() {
                self.queue.add_after(&e.uid, self.cfg.retry_base);
            }
        }
        self.update_gauges();
        self.started.send_replace(true);
    }

    /// Resolves when [`Reconciler::startup`] has finished.
    pub async fn wait_started(&self) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Resolves when a ztunnel is available, or after `max`; returns
    /// whether it is.
    pub async fn wait_ztunnel(&self, max: Duration) -> bool {
        let mut rx = self.ztunnel.subscribe();
        tokio::time::timeout(max, rx.wait_for(|z| *z)).await.is_ok()
    }

    /// Uninstall: removes the annotation from every pod this agent enrolled
    /// (best effort; the redirector's `cleanup_all` removes the rules).
    pub async fn remove_all_annotations(&self) {
        let pods: Vec<PodInfo> = self
            .cache
            .pods()
            .into_iter()
            .filter(|p| plan::is_ours(p.redirection.as_deref()))
            .collect();
        for p in pods {
            if let Err(e) = self.api.set_redirection(&p.namespace, &p.name, None).await {
                tracing::warn!(pod = %p.key(), error = %e, "cannot remove the redirection annotation");
            }
        }
        self.records().clear();
        self.update_gauges();
    }
}

/// Same IPs, whatever the order.
fn same_ips(a: &[std::net::IpAddr], b: &[std::net::IpAddr]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ip_sync;
#[cfg(test)]
mod tests_selectors;
#[cfg(test)]
mod tests_startup;
