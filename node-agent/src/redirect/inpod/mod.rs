//! In-pod redirection: capture rules inside each enrolled pod's own netns,
//! the netns handed to ztunnel (ZDS), and the host's kubelet-probe SNAT.
//!
//! - [`rules`]: pure rule generators (golden-tested);
//! - [`apply`]: apply/remove them in a netns (plus [`routing`]);
//! - [`probe_snat`]: host chain + ipsets;
//! - [`InpodRedirector`]: the [`Redirector`] for this mode, with the hand-off
//!   to ztunnel behind the [`WorkloadHandoff`] trait (implemented by the ZDS
//!   server in `crate::zds`, and by fakes in tests).
//!
//! Enrol order: pod IPs into the probe ipset → rules in the pod netns →
//! hand-off (wait for ztunnel's Ack). Upstream adds the ipset entries last;
//! a kubelet probe arriving between its rules and its entries is captured
//! (refused before ztunnel has the pod, else proxied as plaintext from the
//! node). Here the probes are SNATed before any rule exists. Unenrol, the
//! reverse: rules → ipset → hand-off `del` (ztunnel keeps serving until the
//! rules are gone).
//!
//! Failures follow the [`Redirector`] contract. Enrolling a pod we do not
//! redirect yet either completes or leaves nothing behind (a failure undoes
//! the rules and the ipset entries added so far), so the error is not
//! retryable; the one exception is ztunnel not taking the pod, which leaves
//! the rules and entries (retryable, as upstream). Re-enrolling a
//! pod we already redirect (annotation change, retry, start-up survivor)
//! never tears it down: its previous redirection stays and a failure is
//! retryable.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;
use tokio::sync::Mutex;

use super::iptables::{self, Backend};
use super::netns::Netns;
use super::nftables;
use super::{PodRedirect, ReconcileReport, RedirectError, Redirector};

pub mod apply;
pub mod netns_discovery;
pub mod probe_snat;
pub mod routing;
pub mod rules;
pub mod rules_nft;

pub use apply::{ApplyError, PodNetConfig, RuleEngine, apply_pod, remove_pod, remove_rules};
pub use rules::{PodRuleOptions, RuleConfig};

/// Error from a [`WorkloadHandoff`].
pub type HandoffError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Hands enrolled pods' netns to the proxy (ZDS in production).
pub trait WorkloadHandoff: Send + Sync {
    /// Gives `netns` to the proxy for pod `uid` and waits for its answer.
    /// Also records the pod for later snapshots, even when this fails.
    fn add<'a>(
        &'a self,
        uid: &'a str,
        info: &'a WorkloadInfo,
        netns: &'a Netns,
    ) -> BoxFuture<'a, Result<(), HandoffError>>;

    /// Records an enrolled pod for the next snapshot without sending anything
    /// (start-up reconcile); `netns: None` = keep whatever proxy exists.
    fn register(&self, uid: &str, info: &WorkloadInfo, netns: Option<&Netns>);

    /// Tells every proxy to drop pod `uid` and forgets it. No proxy
    /// connected is not an error.
    fn del<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<(), HandoffError>>;
}

/// Settings of in-pod mode.
#[derive(Debug, Clone)]
pub struct InpodConfig {
    pub rules: RuleConfig,
    /// `AMBIENT_DNS_CAPTURE` (a pod annotation can override it).
    pub dns_capture: bool,
    /// `AMBIENT_IPV6`.
    pub ipv6: bool,
    /// `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP`.
    pub reconcile_rules_on_startup: bool,
    /// The node's netns, where the probe SNAT goes. `None`: the agent's own
    /// netns (hostNetwork agent). e.g. `/host/proc/1/ns/net`, or a simulated
    /// node's netns in tests.
    pub host_netns: Option<PathBuf>,
    /// `None`: detect in the host netns, as upstream.
    pub backend: Option<Backend>,
    /// `NATIVE_NFTABLES`: program native nftables instead of iptables (then
    /// `backend` is not used).
    pub nftables: bool,
    /// Where to look for pods' processes when the netns path is unknown.
    pub proc_root: PathBuf,
}

impl Default for InpodConfig {
    fn default() -> Self {
        Self {
            rules: RuleConfig::default(),
            dns_capture: false,
            ipv6: true,
            reconcile_rules_on_startup: true,
            host_netns: None,
            backend: None,
            nftables: false,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

struct EnrolledPod {
    netns: Netns,
    ips: Vec<IpAddr>,
}

/// Sets whether `e` is retryable (see the module docs).
fn retryable(mut e: RedirectError, retryable: bool) -> RedirectError {
    e.retryable = retryable;
    e
}

/// In-pod mode's [`Redirector`].
pub struct InpodRedirector {
    cfg: InpodConfig,
    net: PodNetConfig,
    /// The engine not in use, when the node still has its host state (from
    /// before `NATIVE_NFTABLES` was switched): its rules are removed from each
    /// pod the agent reconciles or unenrols, and its host state once the
    /// start-up reconcile re-applied every enrolled pod (kept until then, so
    /// an agent that dies half-way finds the switch again). `None` once done,
    /// and on nodes that never switched: then no pod pays for the check.
    other_engine: std::sync::Mutex<Option<RuleEngine>>,
    host: Netns,
    handoff: Arc<dyn WorkloadHandoff>,
    pods: Mutex<HashMap<String, EnrolledPod>>,
    /// Pods a previous agent enrolled whose netns the start-up reconcile could not find:
    /// registered with ztunnel to keep their proxies, and, until one is enrolled or
    /// unenrolled, treated as enrolled by a retry (a failure stays retryable and keeps
    /// the annotation: the rules a previous agent applied may still be in place).
    unreachable: std::sync::Mutex<HashSet<String>>,
    /// Serialises probe-ipset changes: removing a pod's entries reads their
    /// UID comments first, and an enrolment reusing the IP must not slip in
    /// between.
    ipset_lock: Mutex<()>,
}

fn info_of(pod: &PodRedirect) -> WorkloadInfo {
    WorkloadInfo {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
    }
}

impl InpodRedirector {
    /// Opens the host netns, detects the iptables backend there (unless
    /// configured, or nftables is) and installs the host probe-SNAT chain and
    /// sets.
    pub async fn new(
        cfg: InpodConfig,
        handoff: Arc<dyn WorkloadHandoff>,
    ) -> Result<Self, RedirectError> {
        let host = match &cfg.host_netns {
            Some(p) => Netns::open(p),
            None => Netns::current(),
        }
        .map_err(|e| RedirectError::node("opening the host netns", e))?;
        let engine = match (cfg.nftables, cfg.backend) {
            (true, _) => {
                host.run_async(nftables::probe)
                    .await
                    .map_err(|e| RedirectError::node("checking for nft (NATIVE_NFTABLES)", e))?
                    .map_err(|e| RedirectError::node("checking for nft (NATIVE_NFTABLES)", e))?;
                RuleEngine::Nftables
            }
            (false, Some(b)) => RuleEngine::Iptables(b),
            (false, None) => RuleEngine::Iptables(
                host.run_async(iptables::detect_backend)
                    .await
                    .map_err(|e| RedirectError::node("detecting the iptables backend", e))?,
            ),
        };
        let (rules, cfg_backend) = (cfg.rules.clone(), cfg.backend);
        let other_engine = host
            .run_async(move || probe_snat::leftover_engine_here(engine, cfg_backend, &rules))
            .await
            .ok()
            .flatten();
        if let Some(other) = other_engine {
            tracing::info!(rules = %other,
                "the node has state of the other rule engine (NATIVE_NFTABLES was switched): removing it from pods as they are reconciled, then from the node");
        }
        tracing::info!(rules = %engine, host_netns = %host.path().display(), "in-pod redirection");
        let net = PodNetConfig {
            engine,
            ipv6: cfg.ipv6,
            rules: cfg.rules.clone(),
        };
        let this = Self {
            cfg,
            net,
            other_engine: std::sync::Mutex::new(other_engine),
            host,
            handoff,
            pods: Mutex::new(HashMap::new()),
            unreachable: Default::default(),
            ipset_lock: Mutex::new(()),
        };
        this.ensure_host().await?;
        Ok(this)
    }

    pub fn engine(&self) -> RuleEngine {
        self.net.engine
    }

    /// The iptables backend, unless native nftables programs the rules.
    pub fn backend(&self) -> Option<Backend> {
        match self.net.engine {
            RuleEngine::Iptables(b) => Some(b),
            RuleEngine::Nftables => None,
        }
    }

    /// Removes the rules the engine not in use left in a pod's netns (best
    /// effort: logged, never fails the pod).
    async fn remove_other_engine_rules(&self, pod: &PodRedirect, netns: &Netns) {
        if let Some(other) = self.leftover_engine()
            && let Err(e) = remove_rules(netns, other).await
        {
            tracing::warn!(pod = %pod.key(), uid = %pod.uid, rules = %other, error = %e,
                "could not remove the rules of the engine not in use from the pod");
        }
    }

    /// The other rule engine whose state is still to be removed, if any.
    pub fn leftover_engine(&self) -> Option<RuleEngine> {
        *self.other_engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the other engine's host state (probes stay SNATed: ours is in
    /// place) and stops looking for its rules in pods.
    async fn retire_other_engine(&self) {
        let Some(other) = self.leftover_engine() else {
            return;
        };
        let stale = probe_snat::HostProbe {
            engine: other,
            rules: self.cfg.rules.clone(),
        };
        let label = self.host.path().to_path_buf();
        let removed = self
            .host
            .run_async(move || stale.remove_here(&label))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match removed {
            Ok(()) => {
                *self.other_engine.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(rules = %other, "the other rule engine's state is gone from the node and its pods");
            }
            Err(error) => tracing::warn!(rules = %other, %error,
                "could not remove the host probe SNAT of the engine not in use; retried at the next start"),
        }
    }

    /// Takes back the probe-SNAT entries of a pod whose first enrolment
    /// failed (best effort: logged).
    async fn forget_probe_entries(&self, pod: &PodRedirect) {
        let (uid, ips) = (pod.uid.clone(), pod.ips.clone());
        if let Err(e) = self
            .host_ipset(move |r| r.del_pod_ips_here(&uid, &ips))
            .await
        {
            tracing::warn!(pod = %pod.key(), uid = %pod.uid, error = %e,
                "could not remove the probe-SNAT entries of a pod whose enrolment failed");
        }
    }

    fn host_probe(&self) -> probe_snat::HostProbe {
        probe_snat::HostProbe {
            engine: self.net.engine,
            rules: self.cfg.rules.clone(),
        }
    }

    pub fn pod_net_config(&self) -> &PodNetConfig {
        &self.net
    }

    /// UIDs currently enrolled (rules applied), in no order.
    pub async fn enrolled_uids(&self) -> Vec<String> {
        self.pods.lock().await.keys().cloned().collect()
    }

    /// Our host probe SNAT in place (the other engine's, if any, stays until
    /// [`Self::retire_other_engine`]).
    async fn ensure_host(&self) -> Result<(), RedirectError> {
        let (probe, ipv6) = (self.host_probe(), self.cfg.ipv6);
        let label = self.host.path().to_path_buf();
        self.host
            .run_async(move || probe.ensure_here(ipv6, &label))
            .await
            .map_err(|e| RedirectError::node("host probe SNAT", e))?
            .map_err(|e| RedirectError::node("host probe SNAT", e))?;
        Ok(())
    }

    async fn host_ipset<T: Send + 'static>(
        &self,
        f: impl FnOnce(&probe_snat::HostProbe) -> Result<T, probe_snat::IpsetError> + Send + 'static,
    ) -> Result<T, HandoffError> {
        let probe = self.host_probe();
        let _serial = self.ipset_lock.lock().await;
        Ok(self.host.run_async(move || f(&probe)).await??)
    }

    /// The pod's rule variant; annotation values that cannot be used are
    /// logged and ignored (as upstream), never fail the pod.
    fn rule_options(&self, pod: &PodRedirect) -> PodRuleOptions {
        let (opts, warnings) =
            PodRuleOptions::from_annotations(self.cfg.dns_capture, &pod.annotations);
        for w in warnings {
            tracing::warn!(pod = %pod.key(), uid = %pod.uid, "{w}");
        }
        opts
    }

    /// The pod's netns: the one we hold (same pod re-enrolled), else its
    /// path, else a /proc scan (its find must hold one of the pod's IPs).
    async fn open_netns(
        &self,
        pod: &PodRedirect,
        held: Option<&Netns>,
    ) -> Result<Netns, RedirectError> {
        if let Some(path) = &pod.netns {
            let opened = Netns::open(path)
                .map_err(|e| RedirectError::new(pod, "opening pod netns", false, e))?;
            let checked = opened
                .try_clone()
                .map_err(|e| RedirectError::new(pod, "duplicating pod netns fd", false, e))?;
            let (root, p, host) = (self.cfg.proc_root.clone(), pod.clone(), self.host.id().ok());
            tokio::task::spawn_blocking(move || {
                netns_discovery::verify_opened(
                    &root,
                    &p,
                    &checked,
                    host,
                    &netns_discovery::InterfaceAddrCheck,
                )
            })
            .await
            .map_err(|e| RedirectError::new(pod, "checking pod netns", false, e))?
            .map_err(|e| RedirectError::new(pod, "checking pod netns", false, e))?;
            return Ok(opened);
        }
        if let Some(ns) = held {
            return ns
                .try_clone()
                .map_err(|e| RedirectError::new(pod, "duplicating pod netns fd", false, e));
        }
        self.discover_netns(pod).await.ok_or_else(|| {
            RedirectError::new(
                pod,
                "finding pod netns",
                false,
                format!(
                    "no process of the pod under {} in a netns holding one of its IPs {:?}",
                    self.cfg.proc_root.display(),
                    pod.ips
                ),
            )
        })
    }

    async fn discover_netns(&self, pod: &PodRedirect) -> Option<Netns> {
        let root = self.cfg.proc_root.clone();
        let pod = pod.clone();
        let host = self.host.id().ok();
        tokio::task::spawn_blocking(move || {
            netns_discovery::find_pod_netns(&root, &pod, host, &netns_discovery::InterfaceAddrCheck)
        })
        .await
        .ok()
        .flatten()
    }

    async fn enrol_pod(&self, pod: &PodRedirect) -> Result<(), RedirectError> {
        let (was_enrolled, held) = {
            let pods = self.pods.lock().await;
            let entry = pods.get(&pod.uid);
            (
                entry.is_some() || self.is_unreachable(&pod.uid),
                entry.and_then(|p| p.netns.try_clone().ok()),
            )
        };
        // Until ztunnel has the pod: retryable exactly when a previous
        // redirection stays in place.
        let opts = self.rule_options(pod);
        let netns = self
            .open_netns(pod, held.as_ref())
            .await
            .map_err(|e| retryable(e, was_enrolled))?;

        // The probe-SNAT entries first: from the moment the capture rules
        // exist, a kubelet probe must arrive SNATed (and so not be redirected);
        // added after them (as upstream), a probe in between went to ztunnel's
        // 15006 as plaintext from the node, or was refused before ztunnel had
        // the pod. An entry without rules only changes the probes' source.
        let (uid, ips) = (pod.uid.clone(), pod.ips.clone());
        if let Err(e) = self.host_ipset(move |r| r.add_ips_here(&uid, &ips)).await {
            if !was_enrolled {
                self.forget_probe_entries(pod).await;
            }
            return Err(RedirectError::new(
                pod,
                "adding pod IPs to the probe ipset",
                was_enrolled,
                e,
            ));
        }

        if let Err(e) = apply_pod(&netns, &self.net, &opts).await {
            if !was_enrolled {
                // Leave nothing half-applied in a pod we did not enrol before.
                let _ = remove_pod(&netns, self.net.engine).await;
                self.forget_probe_entries(pod).await;
            }
            return Err(RedirectError::new(
                pod,
                "applying pod rules",
                was_enrolled,
                e,
            ));
        }
        let kept = netns
            .try_clone()
            .map_err(|e| RedirectError::new(pod, "duplicating pod netns fd", was_enrolled, e));
        let kept = match kept {
            Ok(k) => k,
            Err(e) => {
                if !was_enrolled {
                    let _ = remove_pod(&netns, self.net.engine).await;
                    self.forget_probe_entries(pod).await;
                }
                return Err(e);
            }
        };
        self.pods.lock().await.insert(
            pod.uid.clone(),
            EnrolledPod {
                netns: kept,
                ips: pod.ips.clone(),
            },
        );
        self.set_unreachable(&pod.uid, false);

        self.handoff
            .add(&pod.uid, &info_of(pod), &netns)
            .await
            .map_err(|e| RedirectError::new(pod, "handing the pod to ztunnel", true, e))?;
        tracing::info!(pod = %pod.key(), uid = %pod.uid, ?opts, "pod enrolled (in-pod)");
        Ok(())
    }

    async fn unenrol_pod(&self, pod: &PodRedirect) -> Result<(), RedirectError> {
        self.set_unreachable(&pod.uid, false);
        let entry = self.pods.lock().await.remove(&pod.uid);
        let mut first_err = None;

        let mut ips = pod.ips.clone();
        if let Some(e) = &entry {
            ips.extend(e.ips.iter().copied());
        }
        ips.sort();
        ips.dedup();
        // Rules first, then the probe entries (the reverse of enrolment): no
        // moment where probes are unSNATed while capture rules exist.
        let (netns, held) = match entry {
            Some(e) => (Some(e.netns), Some(e.ips)),
            None => (pod.netns.as_ref().and_then(|p| Netns::open(p).ok()), None),
        };
        match netns {
            Some(ns) => {
                if let Err(e) = remove_pod(&ns, self.net.engine).await {
                    // The capture rules may still be there: taking the pod out of
                    // ztunnel or the probe ipset now would black-hole its traffic and
                    // fail its probes. It stays enrolled (and held) for the retry.
                    if let Some(ips) = held {
                        self.pods
                            .lock()
                            .await
                            .insert(pod.uid.clone(), EnrolledPod { netns: ns, ips });
                    }
                    return Err(RedirectError::new(pod, "removing pod rules", true, e));
                }
                self.remove_other_engine_rules(pod, &ns).await;
            }
            None => tracing::info!(pod = %pod.key(), "pod netns gone: no rules to remove"),
        }

        let uid = pod.uid.clone();
        if let Err(e) = self
            .host_ipset(move |r| r.del_pod_ips_here(&uid, &ips))
            .await
        {
            first_err.get_or_insert(RedirectError::new(
                pod,
                "removing pod IPs from the probe ipset",
                false,
                e,
            ));
        }

        if let Err(e) = self.handoff.del(&pod.uid).await {
            first_err.get_or_insert(RedirectError::new(
                pod,
                "removing the pod from ztunnel",
                true,
                e,
            ));
        }
        match first_err {
            Some(e) => Err(e),
            None => {
                tracing::info!(pod = %pod.key(), uid = %pod.uid, "pod unenrolled (in-pod)");
                Ok(())
            }
        }
    }

    fn is_unreachable(&self, uid: &str) -> bool {
        self.unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(uid)
    }

    fn set_unreachable(&self, uid: &str, unreachable: bool) {
        let mut set = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
        if unreachable {
            set.insert(uid.to_string());
        } else {
            set.remove(uid);
        }
    }

    async fn reconcile_pods(&self, enrolled: &[PodRedirect]) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        self.unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Err(e) = self.ensure_host().await {
            report.failed.push(e);
        }
        for pod in enrolled {
            match self.reconcile_one(pod).await {
                Ok(()) => report.enrolled.push(pod.uid.clone()),
                Err(e) => report.failed.push(e),
            }
        }
        // Pods we hold that should no longer be enrolled.
        let stale: Vec<String> = {
            let pods = self.pods.lock().await;
            pods.keys()
                .filter(|uid| !enrolled.iter().any(|p| &&p.uid == uid))
                .cloned()
                .collect()
        };
        for uid in stale {
            let pod = PodRedirect {
                uid: uid.clone(),
                ..Default::default()
            };
            match self.unenrol_pod(&pod).await {
                Ok(()) => report.removed.push(uid),
                Err(e) => report.failed.push(e),
            }
        }
        // Every enrolled pod now has our rules only: the other engine's host
        // state can go (not when rules were not re-applied: pods may still
        // hold the other engine's rules, removed when they are unenrolled).
        if self.cfg.reconcile_rules_on_startup && report.failed.is_empty() {
            self.retire_other_engine().await;
        }
        // Probe ipset: exactly the enrolled pods' IPs. Unless a pod's IPs are
        // unknown (empty in the cache at start-up): its entries cannot be told
        // from stale ones, and pruning them would leave its kubelet probes
        // captured (as upstream, skip the prune; its IPs are re-added by
        // `sync_ips` when they show up).
        let ipless: Vec<String> = enrolled
            .iter()
            .filter(|p| p.ips.is_empty())
            .map(PodRedirect::key)
            .collect();
        if !ipless.is_empty() {
            tracing::warn!(pods = ?ipless,
                "start-up: enrolled pods without IPs; not pruning the probe ipset");
            return report;
        }
        let want: Vec<IpAddr> = enrolled
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        match self.host_ipset(probe_snat::HostProbe::members_here).await {
            Ok(members) => {
                let extra: Vec<IpAddr> = members
                    .into_iter()
                    .map(|(ip, _)| ip)
                    .filter(|ip| !want.contains(ip))
                    .collect();
                if !extra.is_empty()
                    && let Err(e) = self.host_ipset(move |r| r.del_ips_here(&extra)).await
                {
                    report
                        .failed
                        .push(RedirectError::node("pruning the probe ipset", e));
                }
            }
            Err(e) => report
                .failed
                .push(RedirectError::node("listing the probe ipset", e)),
        }
        report
    }

    /// A pod a previous agent enrolled, at start-up. It goes into the ZDS
    /// snapshot whatever happens to its rules: it may still be redirected by
    /// the rules a previous agent applied, and leaving it out would make
    /// ztunnel drain its proxy under them (as upstream, which builds the
    /// snapshot independently and only logs rule errors). It is also held as
    /// enrolled, so a later retry keeps, rather than removes, its
    /// redirection; its failures are therefore retryable.
    async fn reconcile_one(&self, pod: &PodRedirect) -> Result<(), RedirectError> {
        let info = info_of(pod);
        let netns = match self.open_netns(pod, None).await {
            Ok(ns) => ns,
            Err(e) => {
                // Enrolled, but we cannot reach its netns: ask ztunnel to keep
                // whatever proxy it runs for it, and keep treating it as enrolled.
                self.handoff.register(&pod.uid, &info, None);
                self.set_unreachable(&pod.uid, true);
                return Err(retryable(e, true));
            }
        };
        self.handoff.register(&pod.uid, &info, Some(&netns));
        let kept = netns
            .try_clone()
            .map_err(|e| RedirectError::new(pod, "duplicating pod netns fd", true, e))?;
        self.pods.lock().await.insert(
            pod.uid.clone(),
            EnrolledPod {
                netns: kept,
                ips: pod.ips.clone(),
            },
        );
        let rules = if self.cfg.reconcile_rules_on_startup {
            let applied = self.reapply_rules(pod, &netns).await;
            if applied.is_ok() {
                // Only once ours are in place: the pod stays redirected.
                self.remove_other_engine_rules(pod, &netns).await;
            }
            applied
        } else {
            Ok(())
        };
        if let Err(e) = &rules {
            tracing::warn!(pod = %pod.key(), uid = %pod.uid, error = %e,
                "start-up: the pod's rules were not re-applied; it stays in the ZDS snapshot with the rules it had");
        }
        let (uid, ips) = (pod.uid.clone(), pod.ips.clone());
        let ipset = self
            .host_ipset(move |r| r.add_ips_here(&uid, &ips))
            .await
            .map_err(|e| RedirectError::new(pod, "adding pod IPs to the probe ipset", true, e));
        rules.and(ipset)
    }

    /// An enrolled pod's IPs changed: its probe-ipset entries follow them.
    /// Entries of IPs it no longer has are removed only while still its own
    /// (comment = its UID).
    async fn sync_pod_ips(&self, pod: &PodRedirect) -> Result<(), RedirectError> {
        let old = self
            .pods
            .lock()
            .await
            .get(&pod.uid)
            .map(|e| e.ips.clone())
            .unwrap_or_default();
        let (uid, ips) = (pod.uid.clone(), pod.ips.clone());
        self.host_ipset(move |r| r.add_ips_here(&uid, &ips))
            .await
            .map_err(|e| RedirectError::new(pod, "adding pod IPs to the probe ipset", true, e))?;
        let gone: Vec<IpAddr> = old.into_iter().filter(|ip| !pod.ips.contains(ip)).collect();
        if !gone.is_empty() {
            let uid = pod.uid.clone();
            self.host_ipset(move |r| r.del_pod_ips_here(&uid, &gone))
                .await
                .map_err(|e| {
                    RedirectError::new(pod, "removing old pod IPs from the probe ipset", true, e)
                })?;
        }
        if let Some(e) = self.pods.lock().await.get_mut(&pod.uid) {
            e.ips = pod.ips.clone();
        }
        tracing::info!(pod = %pod.key(), uid = %pod.uid, ips = ?pod.ips, "pod IPs synced to the probe ipset");
        Ok(())
    }

    async fn reapply_rules(&self, pod: &PodRedirect, netns: &Netns) -> Result<(), RedirectError> {
        let opts = self.rule_options(pod);
        apply_pod(netns, &self.net, &opts)
            .await
            .map_err(|e| RedirectError::new(pod, "re-applying pod rules", true, e))
    }

    async fn cleanup(&self) -> Result<(), RedirectError> {
        let uids: Vec<String> = self.pods.lock().await.keys().cloned().collect();
        let mut first_err = None;
        for uid in uids {
            let pod = PodRedirect {
                uid,
                ..Default::default()
            };
            if let Err(e) = self.unenrol_pod(&pod).await {
                first_err.get_or_insert(e);
            }
        }
        let probe = self.host_probe();
        let label = self.host.path().to_path_buf();
        let host = self
            .host
            .run_async(move || probe.remove_here(&label))
            .await
            .map_err(|e| RedirectError::node("removing host probe SNAT", e))
            .and_then(|r| r.map_err(|e| RedirectError::node("removing host probe SNAT", e)));
        if let Err(e) = host {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Redirector for InpodRedirector {
    fn mode(&self) -> &'static str {
        "inpod"
    }

    fn enrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.enrol_pod(pod))
    }

    fn unenrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.unenrol_pod(pod))
    }

    fn sync_ips<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>> {
        Box::pin(self.sync_pod_ips(pod))
    }

    fn reconcile<'a>(&'a self, enrolled: &'a [PodRedirect]) -> BoxFuture<'a, ReconcileReport> {
        Box::pin(self.reconcile_pods(enrolled))
    }

    fn cleanup_all(&self) -> BoxFuture<'_, Result<(), RedirectError>> {
        Box::pin(self.cleanup())
    }
}
