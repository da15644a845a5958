//! What to do about one pod, decided without side effects: from what the
//! pod should be ([`Desired`]), what the agent did to it ([`Actual`]) and the
//! annotation the pod carries, a [`Plan`].

use crate::cluster::enablement::Reason;
use crate::cluster::pod::{REDIRECTION_ENABLED, REDIRECTION_PENDING};

/// What the pod should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// Ambient and running with an IP: enrolled.
    Enrol(Reason),
    /// Ambient but its sandbox has no IP yet: the CNI ADD enrols it.
    AwaitSandbox,
    /// Not ambient.
    Out(Reason),
    /// Deleted, or finished (`Succeeded`/`Failed`).
    Gone,
}

/// What the agent did to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Actual {
    /// Nothing known (never enrolled by this agent process).
    #[default]
    None,
    /// Redirection complete.
    Enrolled,
    /// Redirected, ztunnel has not taken it (retryable).
    Pending,
    /// Enrolment failed and was undone; retried with backoff.
    Failed,
}

/// A redirection operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Enrol,
    Unenrol,
}

/// What the annotation should become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Annotation {
    Set(&'static str),
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    pub op: Option<Op>,
    /// Applied when there is no `op` (an `op`'s outcome decides the
    /// annotation itself, see [`after_enrol`]).
    pub annotation: Option<Annotation>,
    /// Drop everything remembered about the pod.
    pub forget: bool,
}

/// Decides the next step. `annotation` is the pod's current
/// `ambient.istio.io/redirection` value; `pod_exists` is false once the pod
/// is deleted (nothing to annotate); `retry_due` is true when a failed or
/// pending pod's backoff has elapsed (or ztunnel just connected).
pub fn plan(
    desired: Desired,
    actual: Actual,
    annotation: Option<&str>,
    pod_exists: bool,
    retry_due: bool,
) -> Plan {
    // Only our two values say an agent redirected the pod; anything else (the chart's
    // `disabled` on ztunnel pods, a user's value) is not ours to undo or remove.
    let annotated = is_ours(annotation);
    let ensure = |want: &'static str| (annotation != Some(want)).then_some(Annotation::Set(want));
    match desired {
        Desired::Gone => Plan {
            // Also a pod a previous agent enrolled (annotated): ZDS del and
            // probe ipset; its rules go with its netns.
            op: (actual != Actual::None || annotated).then_some(Op::Unenrol),
            annotation: (pod_exists && annotated).then_some(Annotation::Remove),
            forget: true,
        },
        Desired::Out(_) => Plan {
            op: (actual != Actual::None || annotated).then_some(Op::Unenrol),
            annotation: annotated.then_some(Annotation::Remove),
            forget: false,
        },
        Desired::AwaitSandbox => match actual {
            Actual::Enrolled => Plan {
                annotation: ensure(REDIRECTION_ENABLED),
                ..Plan::default()
            },
            _ => Plan::default(),
        },
        Desired::Enrol(_) => match actual {
            Actual::Enrolled => Plan {
                annotation: ensure(REDIRECTION_ENABLED),
                ..Plan::default()
            },
            Actual::None => Plan {
                op: Some(Op::Enrol),
                ..Plan::default()
            },
            Actual::Pending | Actual::Failed if retry_due => Plan {
                op: Some(Op::Enrol),
                ..Plan::default()
            },
            Actual::Pending => Plan {
                annotation: ensure(REDIRECTION_PENDING),
                ..Plan::default()
            },
            Actual::Failed => Plan::default(),
        },
    }
}

/// State and annotation after an enrolment attempt: `Ok` → enrolled,
/// `enabled`; retryable failure → pending, `pending`; other failure →
/// failed, no annotation (the pod is not redirected).
pub fn after_enrol(result: Result<(), bool>) -> (Actual, Annotation) {
    match result {
        Ok(()) => (Actual::Enrolled, Annotation::Set(REDIRECTION_ENABLED)),
        Err(true) => (Actual::Pending, Annotation::Set(REDIRECTION_PENDING)),
        Err(false) => (Actual::Failed, Annotation::Remove),
    }
}

/// True for the annotation values an agent writes (`enabled`, `pending`).
pub fn is_ours(annotation: Option<&str>) -> bool {
    matches!(annotation, Some(REDIRECTION_ENABLED | REDIRECTION_PENDING))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_annotation_values_are_left_alone() {
        // The chart marks ztunnel pods `disabled`; they are opted out (mode none).
        assert_eq!(
            plan(OUT, Actual::None, Some("disabled"), true, false),
            Plan::default()
        );
        assert_eq!(
            plan(Desired::Gone, Actual::None, Some("disabled"), true, false),
            Plan {
                forget: true,
                ..Plan::default()
            }
        );
        assert!(is_ours(Some("pending")) && is_ours(Some("enabled")));
        assert!(!is_ours(Some("disabled")) && !is_ours(None));
    }

    const IN: Desired = Desired::Enrol(Reason::Selector {
        index: 1,
        default: true,
    });
    const OUT: Desired = Desired::Out(Reason::NoSelector { default: true });

    #[test]
    fn enrol_table() {
        use Actual::*;
        // (actual, annotation, retry_due) → (op, annotation)
        type Case<'a> = (
            Actual,
            Option<&'a str>,
            bool,
            Option<Op>,
            Option<Annotation>,
        );
        let cases: &[Case] = &[
            (None, Option::None, false, Some(Op::Enrol), Option::None),
            // previous agent's annotation: still enrol (re-apply, ZDS add)
            (None, Some("enabled"), false, Some(Op::Enrol), Option::None),
            (Enrolled, Some("enabled"), false, Option::None, Option::None),
            (
                Enrolled,
                Option::None,
                false,
                Option::None,
                Some(Annotation::Set("enabled")),
            ),
            (
                Enrolled,
                Some("pending"),
                false,
                Option::None,
                Some(Annotation::Set("enabled")),
            ),
            (Pending, Some("pending"), false, Option::None, Option::None),
            (
                Pending,
                Option::None,
                false,
                Option::None,
                Some(Annotation::Set("pending")),
            ),
            (
                Pending,
                Some("pending"),
                true,
                Some(Op::Enrol),
                Option::None,
            ),
            (Failed, Option::None, false, Option::None, Option::None),
            (Failed, Option::None, true, Some(Op::Enrol), Option::None),
        ];
        for (i, (actual, ann, due, op, want_ann)) in cases.iter().enumerate() {
            let p = plan(IN, *actual, *ann, true, *due);
            assert_eq!(
                (p.op, p.annotation, p.forget),
                (*op, *want_ann, false),
                "case {i}"
            );
        }
    }

    #[test]
    fn unenrol_and_gone_table() {
        use Actual::*;
        for actual in [Enrolled, Pending, Failed] {
            let p = plan(OUT, actual, Some("enabled"), true, false);
            assert_eq!(p.op, Some(Op::Unenrol));
            assert_eq!(p.annotation, Some(Annotation::Remove));
            assert!(!p.forget);
        }
        // never enrolled, never annotated: nothing to do
        assert_eq!(plan(OUT, None, Option::None, true, false), Plan::default());
        // annotated by a previous agent: undo it
        let p = plan(OUT, None, Some("enabled"), true, false);
        assert_eq!(p.op, Some(Op::Unenrol));

        // deleted pod: unenrol, nothing to annotate, forget
        let p = plan(Desired::Gone, Enrolled, Some("enabled"), false, false);
        assert_eq!(
            (p.op, p.annotation, p.forget),
            (Some(Op::Unenrol), Option::None, true)
        );
        // finished pod that still exists: annotation removed too
        let p = plan(Desired::Gone, Enrolled, Some("enabled"), true, false);
        assert_eq!(p.annotation, Some(Annotation::Remove));
        // gone and unknown: just forget
        let p = plan(Desired::Gone, None, Option::None, false, false);
        assert_eq!((p.op, p.forget), (Option::None, true));
    }

    #[test]
    fn new_pods_wait_for_their_cni_add() {
        assert_eq!(
            plan(Desired::AwaitSandbox, Actual::None, None, true, true),
            Plan::default()
        );
        let p = plan(Desired::AwaitSandbox, Actual::Enrolled, None, true, false);
        assert_eq!(p.annotation, Some(Annotation::Set("enabled")));
    }

    #[test]
    fn outcomes() {
        assert_eq!(
            after_enrol(Ok(())),
            (Actual::Enrolled, Annotation::Set("enabled"))
        );
        assert_eq!(
            after_enrol(Err(true)),
            (Actual::Pending, Annotation::Set("pending"))
        );
        assert_eq!(
            after_enrol(Err(false)),
            (Actual::Failed, Annotation::Remove)
        );
    }
}
