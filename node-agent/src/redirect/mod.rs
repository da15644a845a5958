//! Traffic redirection: how enrolled pods' traffic is steered into ztunnel.
//!
//! Two modes implement [`Redirector`]:
//! - `inpod` ([`inpod::InpodRedirector`]): capture rules inside each pod's
//!   own netns, the netns handed to ztunnel over ZDS, plus the host probe SNAT;
//! - `geneve`: node-level redirection through a GENEVE tunnel to ztunnel.
//!
//! The control loop (`reconcile`) only talks to `dyn Redirector`; it decides
//! *which* pods are enrolled, a redirector only knows *how*.
//!
//! # Contract for implementers
//!
//! - Every method is idempotent: enrolling an enrolled pod re-applies its
//!   redirection (picking up changed annotations) and succeeds; unenrolling a
//!   pod that is not enrolled succeeds and changes nothing.
//! - Errors are [`RedirectError`]s: they name the pod and the stage that
//!   failed, and say whether retrying later can help
//!   ([`RedirectError::is_retryable`]). A retryable failure of `enrol` means
//!   "redirection is in place but not complete": the proxy did not take the
//!   pod yet, or a re-enrolment of a pod already redirected failed and its
//!   previous redirection stays (the control loop annotates the pod `pending`
//!   and retries); a non-retryable one means the pod is not redirected and
//!   nothing of the attempt is left behind.
//! - Methods are async and must not block the runtime: kernel work runs on a
//!   dedicated thread (see [`netns::Netns::run_async`]).
//! - `sync_ips` is called for an enrolled pod whose IPs changed; it only
//!   touches what the mode keeps per pod IP.
//! - `reconcile` is called once at start-up with every pod that should be
//!   enrolled *now*. It repairs their redirection, forgets/cleans pods it
//!   finds redirected that are not in the list, and rebuilds whatever the mode
//!   keeps on the host. It reports per pod rather than failing as a whole. A
//!   listed pod without IPs (not in the informer cache yet) has unknown, not
//!   no, IPs: what the node holds for it is kept.
//! - `cleanup_all` removes everything the redirector ever installed (pods and
//!   host), for uninstall. It is not called on an upgrade restart.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use futures::future::BoxFuture;

pub mod batch_input;
pub mod geneve;
#[cfg(test)]
mod golden;
pub mod inpod;
pub mod iptables;
pub mod netlink;
pub mod netns;
pub mod nftables;

/// What a redirector needs to know about one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRedirect {
    /// `metadata.uid`: the key for everything about this pod (and the ZDS uid).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Pod IPs (`status.podIPs`, or the CNI result's IPs on ADD).
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace when known (the CNI `Netns` path on ADD).
    /// `None`: the redirector finds it itself (in-pod: a `/proc` scan for the
    /// pod UID) or does not need it (GENEVE).
    pub netns: Option<PathBuf>,
    /// The pod's annotations; each mode reads the ones that change its rules
    /// (in-pod: `ambient.istio.io/dns-capture`,
    /// `ambient.istio.io/bypass-inbound-capture`,
    /// `istio.io/reroute-virtual-interfaces`). Passing all of them is fine.
    pub annotations: BTreeMap<String, String>,
}

impl PodRedirect {
    /// `namespace/name`, for messages.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A failed redirection step, for one pod or for the node.
#[derive(Debug, thiserror::Error)]
#[error("{target}: {stage}: {source}")]
pub struct RedirectError {
    /// `pod <namespace>/<name> (uid <uid>)`, or `node` for host-level work.
    pub target: String,
    /// The pod's UID; empty for host-level work.
    pub uid: String,
    /// What was being done, e.g. "applying pod rules", "ZDS add".
    pub stage: &'static str,
    /// True when the failure is transient (e.g. no ztunnel connected yet) and
    /// the redirection rules themselves are in place.
    pub retryable: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl RedirectError {
    pub fn new(
        pod: &PodRedirect,
        stage: &'static str,
        retryable: bool,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            target: format!("pod {} (uid {})", pod.key(), pod.uid),
            uid: pod.uid.clone(),
            stage,
            retryable,
            source: source.into(),
        }
    }

    /// A failure of host-level (node) work.
    pub fn node(
        stage: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            target: "node".into(),
            uid: String::new(),
            stage,
            retryable: false,
            source: source.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

/// Result of [`Redirector::reconcile`].
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// UIDs whose redirection is complete.
    pub enrolled: Vec<String>,
    /// Pods that could not be (fully) enrolled.
    pub failed: Vec<RedirectError>,
    /// UIDs the redirector knew as enrolled that were not in the list and
    /// were cleaned up.
    pub removed: Vec<String>,
}

/// One redirection mode. Object-safe: the control loop holds a
/// `Arc<dyn Redirector>`.
pub trait Redirector: Send + Sync {
    /// `"inpod"` or `"geneve"`, for logs and metrics.
    fn mode(&self) -> &'static str;

    /// Redirect `pod`'s traffic to ztunnel (and, in-pod, hand its netns to
    /// ztunnel). Idempotent.
    fn enrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>>;

    /// Undo [`Redirector::enrol`] for `pod`. Idempotent; a pod whose netns is
    /// already gone is not an error.
    fn unenrol<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>>;

    /// `pod` is enrolled and its IPs changed since (e.g. they were unknown
    /// when the agent restarted): make the node-level state kept per pod IP
    /// follow `pod.ips` (in-pod: the kubelet-probe SNAT ipset; GENEVE: the
    /// capture ipset and the pod's routes). Nothing else (rules, ztunnel
    /// hand-off) is redone. Idempotent; a failure is retryable.
    fn sync_ips<'a>(&'a self, pod: &'a PodRedirect) -> BoxFuture<'a, Result<(), RedirectError>>;

    /// Start-up: make the redirection of exactly `enrolled` true again.
    fn reconcile<'a>(&'a self, enrolled: &'a [PodRedirect]) -> BoxFuture<'a, ReconcileReport>;

    /// Remove everything this redirector installed, on every pod it knows and
    /// on the host (uninstall).
    fn cleanup_all(&self) -> BoxFuture<'_, Result<(), RedirectError>>;
}
