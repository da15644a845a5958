//! The CNI ADD path: the plugin asks the agent about every new pod sandbox
//! ([`crate::plugin_events`]). The agent decides from its informer cache
//! (GETting the pod and namespace when the cache has not seen them yet),
//! remembers the sandbox's netns path for every pod, and for an ambient pod
//! enrols it before answering:
//!
//! | situation | answer |
//! |---|---|
//! | not ambient (or the pod no longer exists) | `200 NotAmbient` with the reason |
//! | ambient, redirection complete (rules + ztunnel Ack) | `200 Enrolled` |
//! | ambient, no ztunnel within `cni_add_ztunnel_wait`, or enrolment failed | [`CmdAddRefusal::EnrolmentFailed`] → `500`: the ADD fails closed, kubelet retries; whatever was half done is undone |
//! | agent still starting, or the API cannot be asked | [`CmdAddRefusal::Undecided`] → `503`: the plugin decides from the API itself |
//!
//! The pod's lock is held for the whole enrolment, so a watcher-driven pass
//! on the same pod waits for it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_proto::cni_event::{CmdAddEvent, CmdAddReply, Enrolment};

use super::plan::{Actual, Annotation};
use super::{PodRecord, Reconciler};
use crate::cluster::PodInfo;
use crate::cluster::enablement::Reason;
use crate::plugin_events::{CmdAddRefusal, PodEventHandler};

/// [`PodEventHandler`] over the [`Reconciler`].
#[derive(Clone)]
pub struct CniAddHandler {
    reconciler: Arc<Reconciler>,
}

impl CniAddHandler {
    pub fn new(reconciler: Arc<Reconciler>) -> Self {
        Self { reconciler }
    }
}

impl PodEventHandler for CniAddHandler {
    fn cmd_add(&self, event: CmdAddEvent) -> BoxFuture<'_, Result<CmdAddReply, CmdAddRefusal>> {
        Box::pin(async move {
            let t0 = std::time::Instant::now();
            let r = self.reconciler.cni_add(event).await;
            let m = self.reconciler.metrics();
            m.observe("cni_add", t0.elapsed());
            m.cni_add(match &r {
                Ok(reply) if reply.enrolment == Enrolment::Enrolled => "enrolled",
                Ok(_) => "not_ambient",
                Err(_) => "refused",
            });
            r
        })
    }
}

/// The address part of a CNI result IP (`10.0.0.5/24` or `10.0.0.5`).
pub fn parse_event_ip(s: &str) -> Option<IpAddr> {
    let addr = s.split('/').next().unwrap_or(s);
    addr.trim().parse().ok()
}

fn not_ambient(reason: impl Into<String>) -> CmdAddReply {
    CmdAddReply {
        enrolment: Enrolment::NotAmbient,
        reason: reason.into(),
    }
}

impl Reconciler {
    /// Handles one CNI ADD (see the module docs).
    pub async fn cni_add(&self, ev: CmdAddEvent) -> Result<CmdAddReply, CmdAddRefusal> {
        let key = format!("{}/{}", ev.pod_namespace, ev.pod_name);
        if tokio::time::timeout(self.cfg.cni_add_startup_wait, self.wait_started())
            .await
            .is_err()
        {
            return Err(CmdAddRefusal::Undecided(format!(
                "node agent is still starting (syncing pods and redirection); pod {key} will be retried"
            )));
        }
        let pod = match self
            .lookup_pod(&ev)
            .await
            .map_err(CmdAddRefusal::Undecided)?
        {
            Some(p) => p,
            None => {
                tracing::info!(pod = %key, "CNI ADD: pod not in the API (deleted meanwhile): not enrolled");
                return Ok(not_ambient("pod does not exist in the API"));
            }
        };
        let netns = self.resolver.event_netns_path(&ev.netns);
        if let Err(e) = self.resolver.paths().remember(&pod.uid, &netns).await {
            tracing::warn!(pod = %key, error = %e, "cannot record the pod's netns path");
        }
        let ns_labels = match self.cache.namespace_labels(&pod.namespace) {
            Some(l) => l,
            None => match self.api.get_namespace(&pod.namespace).await {
                Ok(Some(ns)) => {
                    let l = ns.labels.clone();
                    self.cache.insert_namespace_from_api(ns);
                    l
                }
                Ok(None) => Default::default(),
                Err(e) => {
                    return Err(CmdAddRefusal::Undecided(format!(
                        "cannot decide about pod {key}: {e}"
                    )));
                }
            },
        };
        let decision = pod.decide(&ns_labels, &self.cfg.enablement);
        if !decision.is_ambient() {
            tracing::info!(pod = %key, uid = %pod.uid, reason = %decision.reason(), "CNI ADD: not ambient");
            return Ok(not_ambient(decision.reason().to_string()));
        }

        let lock = self.pod_lock(&pod.uid);
        let result = {
            let _guard = lock.lock().await;
            self.enrol_new_sandbox(&pod, &ev, netns, decision.reason())
                .await
        };
        self.drop_pod_lock(&pod.uid, &lock);
        self.update_gauges();
        result
    }

    /// The pod from the cache (by UID, else by name with a matching UID),
    /// else from the API (and then into the cache).
    async fn lookup_pod(&self, ev: &CmdAddEvent) -> Result<Option<PodInfo>, String> {
        let uid = ev.pod_uid.as_deref().filter(|u| !u.is_empty());
        let cached = match uid {
            Some(u) => self.cache.pod(u),
            None => None,
        }
        .or_else(|| {
            self.cache
                .pod_by_name(&ev.pod_namespace, &ev.pod_name)
                .filter(|p| uid.is_none_or(|u| u == p.uid))
        });
        if cached.is_some() {
            return Ok(cached);
        }
        let fetched = self
            .api
            .get_pod(&ev.pod_namespace, &ev.pod_name)
            .await
            .map_err(|e| {
                format!(
                    "cannot decide about pod {}/{}: {e}",
                    ev.pod_namespace, ev.pod_name
                )
            })?;
        match fetched {
            Some(p) if uid.is_none_or(|u| u == p.uid) => {
                for c in self.cache.insert_from_api(p.clone()) {
                    self.handle_change(&c);
                }
                Ok(Some(p))
            }
            // Another incarnation of the name: this sandbox's pod is gone.
            Some(_) | None => Ok(None),
        }
    }

    async fn enrol_new_sandbox(
        &self,
        pod: &PodInfo,
        ev: &CmdAddEvent,
        netns: PathBuf,
        reason: Reason,
    ) -> Result<CmdAddReply, CmdAddRefusal> {
        let key = pod.key();
        if !self.ztunnel_available() && !self.wait_ztunnel(self.cfg.cni_add_ztunnel_wait).await {
            return Err(CmdAddRefusal::EnrolmentFailed(format!(
                "no ztunnel is connected on this node: ambient pod {key} cannot start yet (kubelet retries)"
            )));
        }
        let mut redirect = pod.to_redirect(Some(netns));
        let ips: Vec<IpAddr> = ev
            .ips
            .iter()
            .filter_map(|ip| parse_event_ip(&ip.address))
            .collect();
        if !ips.is_empty() {
            redirect.ips = ips;
        }
        match self.redirector.enrol(&redirect).await {
            Ok(()) => {
                self.records().insert(
                    pod.uid.clone(),
                    PodRecord {
                        actual: Actual::Enrolled,
                        redirect,
                        attempts: 0,
                        retry_at: None,
                    },
                );
                tracing::info!(pod = %key, uid = %pod.uid, reason = %reason, netns = %ev.netns, mode = self.redirector.mode(), "pod enrolled (CNI ADD)");
                // Redirection is in place; the annotation is informative:
                // a failed patch is retried by the queue.
                self.annotate(
                    pod,
                    Annotation::Set(crate::cluster::pod::REDIRECTION_ENABLED),
                )
                .await;
                Ok(CmdAddReply {
                    enrolment: Enrolment::Enrolled,
                    reason: reason.to_string(),
                })
            }
            Err(e) => {
                self.metrics.failure("enrol", e.is_retryable());
                // The runtime discards this sandbox: leave nothing behind.
                if let Err(u) = self.redirector.unenrol(&redirect).await {
                    tracing::warn!(pod = %key, error = %u, "cleanup after a failed CNI ADD enrolment failed");
                }
                self.records().remove(&pod.uid);
                tracing::warn!(pod = %key, uid = %pod.uid, error = %e, "CNI ADD refused: enrolment failed");
                Err(CmdAddRefusal::EnrolmentFailed(format!(
                    "enrolling ambient pod {key} failed: {e}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ips_parse_with_or_without_prefix() {
        assert_eq!(
            parse_event_ip("10.244.1.5/24"),
            Some("10.244.1.5".parse().unwrap())
        );
        assert_eq!(
            parse_event_ip("fd00::5/64"),
            Some("fd00::5".parse().unwrap())
        );
        assert_eq!(
            parse_event_ip("10.0.0.1"),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(parse_event_ip("nonsense"), None);
    }
}
