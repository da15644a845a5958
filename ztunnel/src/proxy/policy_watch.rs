//! Open inbound connections follow policy changes.
//!
//! Inbound connections (HBONE streams, plaintext, the node-local fast path) are authorized
//! when they open. Each one that passes registers an [`Authorized`] record — the inputs of
//! that decision — with its connection-tracker entry. One task per proxy follows the
//! store's change notifications and evaluates the open connections again when either
//!
//! - the policies changed (the store keeps the same `Arc<PolicySet>` while they do not), or
//! - a connection's destination workload changed its namespace or policy bindings
//!   (`authorizationPolicies`: a selector started or stopped matching);
//!
//! any other change (workloads coming and going, services) costs one pointer comparison and
//! one lookup per open inbound connection. A connection now denied is revoked: its copy is
//! cancelled (an HBONE stream is reset, a plaintext client reset), the access log records
//! it as an error naming the policy with `response_flags=DENY`, and
//! `ztunnel_connections_refused_total{reason="policy_denied"}` counts it, like a denial at
//! open. Upstream ztunnel does the same (its connection manager and policy watcher).
//! Re-checks evaluate enforced policies only: dry-run and AUDIT policies were logged when
//! the connection opened.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use super::ProxyCtx;
use super::authorize::{AuthorizationRequest, Denied, reauthorize};
use super::conntrack::ConnGuard;
use crate::identity::Identity;
use crate::state::{Snapshot, Workload};
use crate::telemetry::{ConnectionTelemetry, Direction, RefusalReason, ResponseFlags};

/// What an open inbound connection was authorized with, and its revocation.
pub(crate) struct Authorized {
    dst_workload: Arc<Workload>,
    src_identity: Option<Identity>,
    src_ip: Option<IpAddr>,
    dst_addr: SocketAddr,
    revoked: CancellationToken,
    denial: OnceLock<Denied>,
}

impl Authorized {
    /// `dst_addr`: the address policies see as destination (workload IP and target port).
    pub(super) fn new(
        dst_workload: Arc<Workload>,
        src_identity: Option<Identity>,
        src_ip: Option<IpAddr>,
        dst_addr: SocketAddr,
    ) -> Arc<Self> {
        Arc::new(Authorized {
            dst_workload,
            src_identity,
            src_ip,
            dst_addr,
            revoked: CancellationToken::new(),
            denial: OnceLock::new(),
        })
    }

    /// The destination workload as `snap` has it (the one authorized if it is gone).
    fn current_workload<'a>(&'a self, snap: &'a Snapshot) -> &'a Workload {
        snap.workload_by_uid(&self.dst_workload.uid)
            .map(|w| &**w)
            .unwrap_or(&self.dst_workload)
    }

    /// Whether the destination workload's authorization inputs differ in `snap`.
    fn bindings_changed(&self, snap: &Snapshot) -> bool {
        let w = self.current_workload(snap);
        !std::ptr::eq(w, &*self.dst_workload)
            && (w.namespace != self.dst_workload.namespace
                || w.authorization_policies != self.dst_workload.authorization_policies)
    }

    /// The decision `snap` gives this connection now.
    fn check(&self, snap: &Snapshot) -> Result<(), Denied> {
        reauthorize(&AuthorizationRequest {
            snapshot: snap,
            dst_workload: self.current_workload(snap),
            src_identity: self.src_identity.as_ref(),
            src_ip: self.src_ip,
            dst_addr: self.dst_addr,
        })
    }

    /// Re-checks against `snap` and revokes when denied; true when revoked now.
    fn enforce(&self, snap: &Snapshot) -> bool {
        if self.revoked.is_cancelled() {
            return false;
        }
        match self.check(snap) {
            Ok(()) => false,
            Err(denied) => {
                let _ = self.denial.set(denied);
                self.revoked.cancel();
                true
            }
        }
    }

    /// Resolves with the denial once a policy change revoked the connection.
    pub(super) async fn revoked(&self) -> Denied {
        self.revoked.cancelled().await;
        self.denial
            .get()
            .cloned()
            .expect("the denial is set before the revocation is signalled")
    }
}

impl ProxyCtx {
    /// Registers a connection that `snap` authorized, to be re-checked on policy changes.
    /// Returns the handle whose [`Authorized::revoked`] the connection's copy races.
    pub(super) fn track_authorized(
        &self,
        guard: &ConnGuard,
        snap: &Snapshot,
        auth: Arc<Authorized>,
    ) -> Arc<Authorized> {
        guard.set_authorized(auth.clone());
        // A change the watcher handled between `snap` and the registration above did not
        // see this connection: check it against the current state once.
        let now = self.inputs.state.snapshot();
        if now.version != snap.version {
            auth.enforce(&now);
        }
        auth
    }

    /// Ends the telemetry of a connection revoked by a policy change: counted as a policy
    /// denial, access-logged as an error naming the policy.
    pub(super) fn close_revoked(
        &self,
        tele: ConnectionTelemetry,
        denied: &Denied,
        sent: u64,
        recv: u64,
    ) {
        self.inputs
            .metrics
            .refused(Direction::Inbound, RefusalReason::policy_denied);
        tele.close_with_flag(
            sent,
            recv,
            Some(&revocation_message(denied)),
            ResponseFlags::AuthorizationPolicyDenied,
        );
    }
}

/// The access-log error of a revoked connection.
pub(super) fn revocation_message(denied: &Denied) -> String {
    format!("connection closed after a policy change: {denied}")
}

/// Starts the watcher of one proxy; it ends when the proxy's pool shuts down (drain).
pub(super) fn spawn(ctx: &Arc<ProxyCtx>) {
    // Subscribe before the first snapshot so no change between the two is missed.
    let mut changes = ctx.inputs.state.subscribe();
    let ctx = ctx.clone();
    let tracker = ctx.tracker.clone();
    tracker.spawn(async move {
        let mut last = ctx.inputs.state.snapshot();
        loop {
            tokio::select! {
                _ = ctx.pool_shutdown.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
            let snap = ctx.inputs.state.snapshot();
            let policies_changed = !Arc::ptr_eq(last.policies(), snap.policies());
            let revoked = recheck(ctx.conns.authorized(), &snap, policies_changed);
            if revoked > 0 {
                tracing::info!(
                    connections = revoked,
                    version = snap.version,
                    "policy change: closed open inbound connections now denied"
                );
            }
            last = snap;
        }
    });
}

/// Re-checks `open` against `snap` (all of them when `policies_changed`, else those whose
/// destination's bindings changed); the number revoked.
fn recheck(open: Vec<Arc<Authorized>>, snap: &Snapshot, policies_changed: bool) -> usize {
    open.iter()
        .filter(|c| policies_changed || c.bindings_changed(snap))
        .filter(|c| c.enforce(snap))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;
    use crate::state::file::test_store;

    const YAML: &str = r#"
workloads:
- {uid: b, name: b, namespace: ns, serviceAccount: sa-b, workloadIps: ["10.0.0.2"],
   protocol: HBONE, services: {}}
"#;

    fn set_policies(store: &Store, yaml: &str) {
        let pols: Vec<crate::policy::Authorization> = serde_yaml_ng::from_str(yaml).unwrap();
        store.source("policies").replace_all(vec![], vec![], pols);
    }

    fn open(store: &Store, port: u16) -> Arc<Authorized> {
        let snap = store.snapshot();
        let b = snap.workload_by_uid("b").unwrap().clone();
        Authorized::new(
            b,
            Some(Identity::new("cluster.local", "ns-a", "sa-a")),
            Some("10.0.0.1".parse().unwrap()),
            SocketAddr::new("10.0.0.2".parse().unwrap(), port),
        )
    }

    #[tokio::test]
    async fn a_deny_revokes_only_the_connections_it_matches() {
        let store = test_store(YAML);
        let (c80, c81) = (open(&store, 80), open(&store, 81));
        set_policies(
            &store,
            "[{name: deny-80, namespace: ns, scope: Namespace, action: Deny, \
              rules: [[[{destinationPorts: [80]}]]]}]",
        );
        let snap = store.snapshot();
        assert_eq!(recheck(vec![c80.clone(), c81.clone()], &snap, true), 1);
        let denied = c80.revoked().await;
        assert_eq!(denied.policy, "ns/deny-80");
        assert!(revocation_message(&denied).contains("ns/deny-80"));
        assert!(!c81.revoked.is_cancelled());
        // Revoked once only.
        assert_eq!(recheck(vec![c80, c81], &snap, true), 0);
    }

    #[test]
    fn without_policy_changes_only_rebound_workloads_are_rechecked() {
        let store = test_store(YAML);
        set_policies(
            &store,
            "[{name: only-x, namespace: ns, scope: WorkloadSelector, action: Allow, \
              rules: [[[{namespaces: [!Exact x]}]]]}]",
        );
        let c = open(&store, 80);
        // Policies unchanged, workload unchanged: not even evaluated.
        assert_eq!(recheck(vec![c.clone()], &store.snapshot(), false), 0);
        assert!(!c.bindings_changed(&store.snapshot()));
        // The selector policy now binds b: the ALLOW applies and ns-a is not allowed.
        let mut b = (**store.snapshot().workload_by_uid("b").unwrap()).clone();
        b.authorization_policies = vec!["ns/only-x".into()];
        store.source("file").upsert_workload(b);
        let snap = store.snapshot();
        assert!(c.bindings_changed(&snap));
        assert_eq!(recheck(vec![c.clone()], &snap, false), 1);
        assert!(c.revoked.is_cancelled());
    }
}
