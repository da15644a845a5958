//! The authorization hook of the inbound paths (15008 and 15006).
//!
//! Every inbound connection calls [`authorize`] once, after the destination workload is
//! known and before the upstream connection is made. `Err(Denied)` answers 401 on HBONE and
//! resets a plaintext connection; both are access-logged with the policy name. Connections
//! that pass are checked again with [`reauthorize`] when policies change
//! ([`super::policy_watch`]).

use std::net::{IpAddr, SocketAddr};

use crate::identity::Identity;
use crate::policy::{Decision, PeerIdentity, Request};
use crate::state::{Snapshot, Workload};

/// What is known about the connection when deciding.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizationRequest<'a> {
    pub snapshot: &'a Snapshot,
    /// The workload the connection is for.
    pub dst_workload: &'a Workload,
    /// Proven by mTLS; `None` on plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The client's address; `None` when not known (the HBONE peer is a node proxy
    /// without original source): source-IP conditions then fail closed.
    pub src_ip: Option<IpAddr>,
    pub dst_addr: SocketAddr,
}

/// A denial, naming the deciding policy (`"<namespace>/<name>"`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("denied by policy {policy}: {reason}")]
pub struct Denied {
    pub policy: String,
    pub reason: String,
}

/// Allows or denies one inbound connection (the snapshot's L4 policies, Istio semantics;
/// allocation-free unless denied).
pub fn authorize(req: &AuthorizationRequest<'_>) -> Result<(), Denied> {
    decide(req, true)
}

/// [`authorize`] for a connection already open (a policy change): enforced policies only,
/// dry-run and AUDIT ones were logged when it opened.
pub fn reauthorize(req: &AuthorizationRequest<'_>) -> Result<(), Denied> {
    decide(req, false)
}

fn decide(req: &AuthorizationRequest<'_>, log_observers: bool) -> Result<(), Denied> {
    let src_identity = req.src_identity.map(|id| PeerIdentity {
        trust_domain: id.trust_domain(),
        namespace: id.namespace(),
        service_account: id.service_account(),
    });
    let request = Request {
        dst_workload_namespace: &req.dst_workload.namespace,
        dst_workload_policy_refs: &req.dst_workload.authorization_policies,
        src_identity,
        src_ip: req.src_ip,
        dst_ip: req.dst_addr.ip(),
        dst_port: req.dst_addr.port(),
    };
    let policies = req.snapshot.policies();
    let decision = if log_observers {
        policies.evaluate(&request)
    } else {
        policies.evaluate_enforced(&request)
    };
    match decision {
        Decision::Allow => Ok(()),
        Decision::Deny { policy, reason } => Err(Denied {
            policy: policy.to_string(),
            reason: reason.to_string(),
        }),
    }
}
