//! The authorization decision for one inbound connection, at the destination.
//!
//! Istio's order: any matching enforced DENY policy denies; otherwise, when
//! at least one enforced ALLOW policy applies to the destination workload,
//! one of them must match; otherwise the connection is allowed. Dry-run
//! policies (any action) and AUDIT policies never change the decision: they
//! are evaluated and logged (target `ztunnel::policy`, with the policy key,
//! whether it matched, and the decision the connection would get were the
//! policy enforced).
//!
//! Evaluation allocates nothing: the request borrows, the iterators chain
//! over the set's indexes, and a denial carries the policy key as a shared
//! `Arc<str>`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use super::matching::{Peer, PeerIdentity, policy_matches};
use super::model::Action;
use super::set::{Entry, Kind, PolicySet};

/// One inbound connection as the destination sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a, S: AsRef<str> = String> {
    /// Namespace of the destination workload.
    pub dst_workload_namespace: &'a str,
    /// `"<ns>/<name>"` of the policies bound to the destination workload
    /// (its `authorizationPolicies`, i.e. WorkloadSelector-scoped policies
    /// whose selector matches it). Unknown keys are ignored.
    pub dst_workload_policy_refs: &'a [S],
    /// Peer identity proven by mTLS; `None` for plaintext. Borrow it from
    /// the caller's identity type, or [`PeerIdentity::from_spiffe`].
    pub src_identity: Option<PeerIdentity<'a>>,
    /// The client's address; `None` when unknown (source-IP conditions fail closed: a
    /// DENY that needs them matches, an ALLOW that needs them does not).
    pub src_ip: Option<IpAddr>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `"<ns>/<name>"`: the matching DENY policy, or for
        /// [`DenyReason::NotAllowed`] the most specific applicable ALLOW
        /// policy (selector-bound, then namespace, then global).
        policy: Arc<str>,
        reason: DenyReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// An enforced DENY policy matched.
    DenyPolicyMatched,
    /// ALLOW policies apply to the workload and none matched.
    NotAllowed,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// The policy key of a denial.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Decision::Allow => None,
            Decision::Deny { policy, .. } => Some(policy),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allow"),
            Decision::Deny {
                policy,
                reason: DenyReason::DenyPolicyMatched,
            } => write!(f, "deny (DENY policy {policy} matched)"),
            Decision::Deny {
                policy,
                reason: DenyReason::NotAllowed,
            } => write!(f, "deny (no ALLOW policy matched, e.g. {policy})"),
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::DenyPolicyMatched => "DENY policy matched",
            DenyReason::NotAllowed => "no ALLOW policy matched",
        })
    }
}

impl PolicySet {
    /// Decide whether the connection is allowed. Allocation-free.
    pub fn evaluate<S: AsRef<str>>(&self, req: &Request<'_, S>) -> Decision {
        let peer = Peer::new(req.src_identity, req.src_ip, req.dst_ip, req.dst_port);
        let (decision, allow_applied) = self.enforce(req, &peer);
        if self.has_observers() {
            self.observe(req, &peer, &decision, allow_applied);
        }
        decision
    }

    /// [`Self::evaluate`] without the dry-run/AUDIT logging pass: for re-checking a
    /// connection that was already evaluated (and logged) when it opened.
    pub fn evaluate_enforced<S: AsRef<str>>(&self, req: &Request<'_, S>) -> Decision {
        let peer = Peer::new(req.src_identity, req.src_ip, req.dst_ip, req.dst_port);
        self.enforce(req, &peer).0
    }

    /// The enforced decision, and whether any enforced ALLOW policy applied.
    ///
    /// One pass over the applicable policies (referenced ones, the
    /// namespace's, the global ones): a matching DENY ends it; ALLOW policies
    /// are evaluated until one matches.
    fn enforce<S: AsRef<str>>(&self, req: &Request<'_, S>, peer: &Peer<'_>) -> (Decision, bool) {
        let ns = req.dst_workload_namespace;
        let mut allow = AllowState::default();
        for r in req.dst_workload_policy_refs {
            let Some(e) = self.by_key.get(r.as_ref()) else {
                continue;
            };
            if PolicySet::applies_by_scope(e, ns) {
                continue;
            }
            match e.kind {
                Kind::Deny if policy_matches(&e.policy, peer) => return deny(e),
                Kind::Allow => allow.consider(e, peer),
                _ => {}
            }
        }
        let buckets = self
            .by_namespace
            .get(ns)
            .into_iter()
            .chain(std::iter::once(&self.global));
        for bucket in buckets {
            if let Some(e) = bucket.deny.iter().find(|e| policy_matches(&e.policy, peer)) {
                return deny(e);
            }
            for e in &bucket.allow {
                allow.consider(e, peer);
            }
        }
        match (allow.first, allow.matched) {
            (None, _) => (Decision::Allow, false),
            (Some(_), true) => (Decision::Allow, true),
            (Some(e), false) => (
                Decision::Deny {
                    policy: e.key.clone(),
                    reason: DenyReason::NotAllowed,
                },
                true,
            ),
        }
    }

    fn has_observers(&self) -> bool {
        self.observers > 0
    }

    /// Policies of `kind` that apply to the destination: the ones the
    /// workload references, then its namespace's, then the global ones.
    fn applicable<'s, S: AsRef<str>>(
        &'s self,
        req: &'s Request<'_, S>,
        kind: Kind,
    ) -> impl Iterator<Item = &'s Arc<Entry>> + 's {
        let ns = req.dst_workload_namespace;
        let referenced = req
            .dst_workload_policy_refs
            .iter()
            .filter_map(move |r| self.by_key.get(r.as_ref()))
            .filter(move |e| e.kind == kind && !PolicySet::applies_by_scope(e, ns));
        let namespace = self
            .by_namespace
            .get(ns)
            .into_iter()
            .flat_map(move |b| b.list(kind).iter());
        referenced
            .chain(namespace)
            .chain(self.global.list(kind).iter())
    }

    /// Evaluate dry-run and AUDIT policies and log what they would do.
    fn observe<S: AsRef<str>>(
        &self,
        req: &Request<'_, S>,
        peer: &Peer<'_>,
        actual: &Decision,
        allow_applied: bool,
    ) {
        for e in self.applicable(req, Kind::Observe) {
            let p = &e.policy;
            let matched = policy_matches(p, peer);
            let src = OptDisplay(req.src_identity.as_ref());
            if p.action == Action::Audit && !p.dry_run {
                if matched {
                    tracing::info!(
                        target: "ztunnel::policy",
                        policy = %e.key, src.identity = %src, src.ip = %OptDisplay(req.src_ip.as_ref()),
                        dst.ip = %req.dst_ip, dst.port = req.dst_port,
                        "AUDIT authorization policy matched"
                    );
                }
                continue;
            }
            let would_be = would_be(p.action, matched, actual, allow_applied);
            if matched || would_be != actual.is_allow() {
                tracing::info!(
                    target: "ztunnel::policy",
                    policy = %e.key, action = ?p.action, matched,
                    would_be = if would_be { "allow" } else { "deny" },
                    actual = %actual, src.identity = %src, src.ip = %OptDisplay(req.src_ip.as_ref()),
                    dst.ip = %req.dst_ip, dst.port = req.dst_port,
                    "dry-run authorization policy"
                );
            } else {
                tracing::debug!(
                    target: "ztunnel::policy",
                    policy = %e.key, action = ?p.action, matched,
                    would_be = if would_be { "allow" } else { "deny" },
                    "dry-run authorization policy"
                );
            }
        }
    }
}

fn deny(e: &Entry) -> (Decision, bool) {
    (
        Decision::Deny {
            policy: e.key.clone(),
            reason: DenyReason::DenyPolicyMatched,
        },
        false,
    )
}

/// ALLOW policies seen so far: the first (for the denial message) and
/// whether one matched (then the rest are not evaluated).
#[derive(Default)]
struct AllowState<'s> {
    first: Option<&'s Entry>,
    matched: bool,
}

impl<'s> AllowState<'s> {
    fn consider(&mut self, e: &'s Entry, peer: &Peer<'_>) {
        self.first.get_or_insert(e);
        if !self.matched && policy_matches(&e.policy, peer) {
            self.matched = true;
        }
    }
}

/// Whether the connection would be allowed were this dry-run policy enforced
/// alongside the enforced ones.
fn would_be(action: Action, matched: bool, actual: &Decision, allow_applied: bool) -> bool {
    match (action, actual) {
        (Action::Deny, _) => !matched && actual.is_allow(),
        (Action::Audit, _) => actual.is_allow(),
        (
            Action::Allow,
            Decision::Deny {
                reason: DenyReason::DenyPolicyMatched,
                ..
            },
        ) => false,
        (
            Action::Allow,
            Decision::Deny {
                reason: DenyReason::NotAllowed,
                ..
            },
        ) => matched,
        // Allowed now: either an enforced ALLOW matched (stays allowed) or
        // none applied (this one would then have to match).
        (Action::Allow, Decision::Allow) => matched || allow_applied,
    }
}

struct OptDisplay<'a, T>(Option<&'a T>);

impl<T: fmt::Display> fmt::Display for OptDisplay<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::policy::model::Authorization;

    fn set(yaml: &str) -> PolicySet {
        let pols: Vec<Authorization> = serde_yaml_ng::from_str(yaml).expect(yaml);
        PolicySet::new(pols)
    }

    /// A connection: `(identity, src ip, dst port)`, to a workload in
    /// namespace `dst` at 10.0.1.1 bound to `refs`.
    struct Conn {
        dst: &'static str,
        refs: &'static [&'static str],
        id: Option<&'static str>,
        src: &'static str,
        port: u16,
    }

    const fn conn(id: Option<&'static str>, port: u16) -> Conn {
        Conn {
            dst: "app",
            refs: &[],
            id,
            src: "10.0.0.1",
            port,
        }
    }

    const X: Option<&str> = Some("spiffe://cluster.local/ns/x/sa/client");
    const Y: Option<&str> = Some("spiffe://cluster.local/ns/y/sa/client");
    const ADMIN: Option<&str> = Some("spiffe://cluster.local/ns/y/sa/admin");
    const PLAIN: Option<&str> = None;

    fn eval(set: &PolicySet, c: &Conn) -> Decision {
        set.evaluate(&Request {
            dst_workload_namespace: c.dst,
            dst_workload_policy_refs: c.refs,
            src_identity: c.id.map(|id| PeerIdentity::from_spiffe(id).unwrap()),
            src_ip: Some(c.src.parse().unwrap()),
            dst_ip: "10.0.1.1".parse().unwrap(),
            dst_port: c.port,
        })
    }

    /// Expected result: allow, or deny naming the policy.
    #[derive(Debug)]
    enum Want {
        Allow,
        Denied(&'static str),
        NotAllowed(&'static str),
    }
    use Want::*;

    fn check(name: &str, yaml: &str, cases: &[(Conn, Want)]) {
        let set = set(yaml);
        for (i, (c, want)) in cases.iter().enumerate() {
            let got = eval(&set, c);
            let ok = match (want, &got) {
                (Allow, Decision::Allow) => true,
                (Denied(p), Decision::Deny { policy, reason }) => {
                    **policy == **p && *reason == DenyReason::DenyPolicyMatched
                }
                (NotAllowed(p), Decision::Deny { policy, reason }) => {
                    **policy == **p && *reason == DenyReason::NotAllowed
                }
                _ => false,
            };
            assert!(ok, "{name} case {i}: want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn no_policies_allow_everything() {
        check(
            "empty",
            "[]",
            &[(conn(PLAIN, 80), Allow), (conn(X, 80), Allow)],
        );
    }

    #[test]
    fn allow_only_from_namespace() {
        check(
            "allow-from-x",
            r#"
- name: allow-x
  namespace: app
  scope: Namespace
  action: Allow
  rules: [[[{namespaces: [!Exact x]}]]]
"#,
            &[
                (conn(X, 80), Allow),
                (conn(Y, 80), NotAllowed("app/allow-x")),
                (conn(PLAIN, 80), NotAllowed("app/allow-x")),
                // Another namespace's workloads are not affected.
                (
                    Conn {
                        dst: "other",
                        ..conn(Y, 80)
                    },
                    Allow,
                ),
            ],
        );
    }

    #[test]
    fn deny_on_port_blocks_only_that_port() {
        check(
            "deny-port",
            r#"
- name: deny-9999
  namespace: app
  scope: Namespace
  action: Deny
  rules: [[[{destinationPorts: [9999]}]]]
"#,
            &[
                (conn(X, 9999), Denied("app/deny-9999")),
                (conn(PLAIN, 9999), Denied("app/deny-9999")),
                (conn(X, 80), Allow),
                (conn(PLAIN, 80), Allow),
            ],
        );
    }

    #[test]
    fn deny_wins_over_allow_and_any_allow_suffices() {
        check(
            "deny-over-allow",
            r#"
- name: allow-x
  namespace: app
  scope: Namespace
  action: Allow
  rules: [[[{namespaces: [!Exact x]}]]]
- name: allow-admin
  namespace: app
  scope: Namespace
  action: Allow
  rules: [[[{principals: [!Suffix /sa/admin]}]]]
- name: deny-x-8443
  namespace: root
  scope: Global
  action: Deny
  rules: [[[{namespaces: [!Exact x]}], [{destinationPorts: [8443]}]]]
"#,
            &[
                (conn(X, 80), Allow),
                (conn(ADMIN, 80), Allow),
                (conn(X, 8443), Denied("root/deny-x-8443")),
                (conn(Y, 80), NotAllowed("app/allow-x")),
            ],
        );
    }

    #[test]
    fn scope_resolution() {
        let yaml = r#"
- name: global-allow-y
  namespace: istio-system
  scope: Global
  action: Allow
  rules: [[[{namespaces: [!Exact y]}]]]
- name: sel-allow-x
  namespace: app
  scope: WorkloadSelector
  action: Allow
  rules: [[[{namespaces: [!Exact x]}]]]
- name: other-ns-deny-all
  namespace: other
  scope: Namespace
  action: Deny
  rules: [[]]
"#;
        let bound: &'static [&'static str] = &["app/sel-allow-x"];
        let unknown: &'static [&'static str] = &["app/missing", "istio-system/global-allow-y"];
        check(
            "scopes",
            yaml,
            &[
                // Global applies everywhere; the selector policy only when bound.
                (conn(X, 80), NotAllowed("istio-system/global-allow-y")),
                (conn(Y, 80), Allow),
                (
                    Conn {
                        refs: bound,
                        ..conn(X, 80)
                    },
                    Allow,
                ),
                (
                    Conn {
                        refs: bound,
                        ..conn(Y, 80)
                    },
                    Allow,
                ),
                (
                    Conn {
                        refs: bound,
                        ..conn(PLAIN, 80)
                    },
                    NotAllowed("app/sel-allow-x"),
                ),
                // Unknown refs are ignored; a ref to a global policy counts once.
                (
                    Conn {
                        refs: unknown,
                        ..conn(Y, 80)
                    },
                    Allow,
                ),
                // Namespace scope: only its own namespace.
                (
                    Conn {
                        dst: "other",
                        ..conn(Y, 80)
                    },
                    Denied("other/other-ns-deny-all"),
                ),
                (
                    Conn {
                        dst: "app",
                        ..conn(Y, 80)
                    },
                    Allow,
                ),
            ],
        );
    }

    #[test]
    fn selector_policy_of_another_namespace_applies_when_referenced() {
        let refs: &'static [&'static str] = &["other/deny-plain"];
        check(
            "cross-ns-ref",
            r#"
- name: deny-plain
  namespace: other
  scope: Namespace
  action: Deny
  rules: [[[{notPrincipals: [!Presence ]}]]]
"#,
            &[
                (
                    Conn {
                        refs,
                        ..conn(PLAIN, 80)
                    },
                    Denied("other/deny-plain"),
                ),
                (conn(PLAIN, 80), Allow),
                (
                    Conn {
                        refs,
                        ..conn(X, 80)
                    },
                    Allow,
                ),
            ],
        );
    }

    #[test]
    fn empty_rules() {
        check(
            "allow-nothing",
            "- {name: allow-nothing, namespace: app, scope: Namespace, action: Allow}",
            &[
                (conn(X, 80), NotAllowed("app/allow-nothing")),
                (conn(PLAIN, 80), NotAllowed("app/allow-nothing")),
            ],
        );
        check(
            "deny-nothing",
            "- {name: deny-nothing, namespace: app, scope: Namespace, action: Deny, rules: []}",
            &[(conn(X, 80), Allow), (conn(PLAIN, 80), Allow)],
        );
        check(
            "allow-all",
            "- {name: allow-all, namespace: app, scope: Namespace, action: Allow, rules: [[]]}",
            &[(conn(X, 80), Allow), (conn(PLAIN, 80), Allow)],
        );
        check(
            "deny-all",
            "- {name: deny-all, namespace: app, scope: Namespace, action: Deny, rules: [[]]}",
            &[(conn(X, 80), Denied("app/deny-all"))],
        );
    }

    #[test]
    fn plaintext_and_identity_fields() {
        check(
            "plaintext",
            r#"
- name: deny-plaintext
  namespace: root
  scope: Global
  action: Deny
  rules: [[[{notPrincipals: [!Presence ]}]]]
- name: allow-authenticated
  namespace: app
  scope: Namespace
  action: Allow
  rules:
  - [[{principals: [!Presence ]}]]
  - [[{sourceIps: [192.168.0.0/16]}]]
"#,
            &[
                (conn(PLAIN, 80), Denied("root/deny-plaintext")),
                (
                    Conn {
                        src: "192.168.1.1",
                        ..conn(PLAIN, 80)
                    },
                    Denied("root/deny-plaintext"),
                ),
                (conn(X, 80), Allow),
            ],
        );
    }

    #[test]
    fn dry_run_and_audit_never_enforced() {
        check(
            "dry-run",
            r#"
- name: dry-deny-all
  namespace: app
  scope: Namespace
  action: Deny
  dryRun: true
  rules: [[]]
- name: dry-allow-nothing
  namespace: app
  scope: Namespace
  action: Allow
  dryRun: true
- name: audit-all
  namespace: app
  scope: Namespace
  action: Audit
  rules: [[]]
"#,
            &[(conn(X, 80), Allow), (conn(PLAIN, 80), Allow)],
        );
    }

    use crate::test_logs::capture as logs;

    #[test]
    fn dry_run_is_logged_with_would_be_result() {
        let set = set(r#"
- name: dry-deny-9999
  namespace: app
  scope: Namespace
  action: Deny
  dryRun: true
  rules: [[[{destinationPorts: [9999]}]]]
- name: dry-allow-x
  namespace: app
  scope: Namespace
  action: Allow
  dryRun: true
  rules: [[[{namespaces: [!Exact x]}]]]
- name: audit-y
  namespace: app
  scope: Namespace
  action: Audit
  rules: [[[{namespaces: [!Exact y]}]]]
"#);
        let out = logs(|| assert!(eval(&set, &conn(Y, 9999)).is_allow()));
        assert!(out.contains("policy=app/dry-deny-9999"), "{out}");
        assert!(out.contains("matched=true would_be=\"deny\""), "{out}");
        // Y does not match the dry-run ALLOW: enforcing it would deny.
        assert!(out.contains("policy=app/dry-allow-x"), "{out}");
        assert!(out.contains("matched=false would_be=\"deny\""), "{out}");
        assert!(
            out.contains("AUDIT authorization policy matched policy=app/audit-y"),
            "{out}"
        );

        // X on 80: the dry-run ALLOW matches (logged), the DENY does not and
        // would not change anything (debug only), the AUDIT does not match.
        let out = logs(|| assert!(eval(&set, &conn(X, 80)).is_allow()));
        assert!(out.contains("policy=app/dry-allow-x"), "{out}");
        assert!(!out.contains("dry-deny-9999"), "{out}");
        assert!(!out.contains("audit-y"), "{out}");
    }

    #[test]
    fn enforced_only_evaluation_decides_alike_without_logging_dry_runs() {
        let set = set(r#"
- {name: dry-deny-all, namespace: app, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}
- {name: deny-9999, namespace: app, scope: Namespace, action: Deny,
   rules: [[[{destinationPorts: [9999]}]]]}
"#);
        for c in [conn(X, 80), conn(X, 9999)] {
            let req = Request {
                dst_workload_namespace: c.dst,
                dst_workload_policy_refs: c.refs,
                src_identity: c.id.map(|id| PeerIdentity::from_spiffe(id).unwrap()),
                src_ip: Some(c.src.parse().unwrap()),
                dst_ip: "10.0.1.1".parse().unwrap(),
                dst_port: c.port,
            };
            let mut enforced = None;
            let out = logs(|| enforced = Some(set.evaluate_enforced(&req)));
            assert_eq!(enforced.unwrap(), set.evaluate(&req));
            assert!(!out.contains("dry-deny-all"), "{out}");
        }
    }

    #[test]
    fn would_be_table() {
        let deny = Decision::Deny {
            policy: "a/b".into(),
            reason: DenyReason::DenyPolicyMatched,
        };
        let not_allowed = Decision::Deny {
            policy: "a/b".into(),
            reason: DenyReason::NotAllowed,
        };
        let allow = Decision::Allow;
        let cases = [
            (Action::Deny, true, &allow, false, false),
            (Action::Deny, false, &allow, false, true),
            (Action::Deny, false, &not_allowed, true, false),
            (Action::Allow, true, &not_allowed, true, true),
            (Action::Allow, false, &not_allowed, true, false),
            (Action::Allow, true, &deny, false, false),
            (Action::Allow, false, &allow, false, false),
            (Action::Allow, false, &allow, true, true),
            (Action::Allow, true, &allow, false, true),
        ];
        for (action, matched, actual, applied, want) in cases {
            assert_eq!(
                would_be(action, matched, actual, applied),
                want,
                "{action:?} matched={matched} actual={actual} allow_applied={applied}"
            );
        }
    }

    #[test]
    fn decision_display() {
        let d = Decision::Deny {
            policy: "ns/p".into(),
            reason: DenyReason::DenyPolicyMatched,
        };
        assert_eq!(d.to_string(), "deny (DENY policy ns/p matched)");
        assert_eq!(d.policy(), Some("ns/p"));
        assert_eq!(Decision::Allow.to_string(), "allow");
    }
}
