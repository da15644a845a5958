//! Start-up reconcile of pods a previous agent enrolled, when re-applying a
//! pod's redirection fails (in-pod: its rules; GENEVE: the node's ipset or
//! routes). A redirector that keeps such a pod held, with the redirection it
//! had, reports it retryable; one it could not take over at all reports it
//! not retryable.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::plan::Actual;
use super::tests::{Harness, ns, running};
use crate::test_support::warnings_async;

/// u1's rules cannot be re-applied (held: retryable), u3 cannot be taken
/// over (not retryable), u2 is fine. Both failures are logged naming the
/// pod and counted; neither pod counts as enrolled (u1 is `pending`); both
/// are retried with growing delays, not in a loop, and enrolled once their
/// enrolment works; u2 is enrolled at once and never touched again.
#[tokio::test]
async fn startup_failures_are_logged_retried_with_backoff_and_spare_other_pods() {
    let pods = [("u1", "a"), ("u2", "b"), ("u3", "c")]
        .iter()
        .enumerate()
        .map(|(i, (uid, name))| {
            let mut p = running(uid, "demo", name, &format!("10.0.0.{}", i + 1));
            p.redirection = Some("enabled".into()); // by the previous agent
            p
        })
        .collect();
    let h = Harness::new(pods, vec![ns("demo", Some("ambient"))]);
    h.redir
        .reconcile_failures
        .lock()
        .unwrap()
        .extend([("u1".to_string(), true), ("u3".to_string(), false)]);
    // Re-enrolments fail too (retryable) until this is set again.
    h.redir.ztunnel.store(false, Ordering::SeqCst);

    let logged = warnings_async(h.r.startup()).await;
    for pod in ["demo/a", "demo/c"] {
        assert!(
            logged
                .lines()
                .any(|l| l.contains("start-up reconcile") && l.contains(pod)),
            "{pod} not logged:\n{logged}"
        );
    }
    assert!(!logged.contains("demo/b"), "{logged}");
    assert_eq!(h.r.enrolled_uids(), vec!["u2"]);
    assert_eq!(h.r.pending_uids(), vec!["u1"]);
    assert_eq!(h.r.records()["u3"].actual, Actual::Failed);
    let metrics = h.r.metrics().render();
    for retryable in [true, false] {
        let line = format!(
            "node_agent_redirection_failures_total{{operation=\"enrol\",retryable=\"{retryable}\"}} 1"
        );
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }

    let _w = h.r.spawn_workers();
    // Retries after 20 ms, then 40, 80, 100 (the cap): a handful in 300 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for uid in ["u1", "u3"] {
        let n = h.redir.calls("enrol").iter().filter(|u| *u == uid).count();
        assert!((2..=8).contains(&n), "{uid}: {n} enrol attempts");
    }
    assert_eq!(h.r.enrolled_uids(), vec!["u2"]);
    assert_eq!(
        h.api.annotation_of("demo/a"),
        Some(Some("pending".into())),
        "redirected, not complete"
    );

    h.redir.ztunnel.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    h.settle().await;
    assert_eq!(h.r.enrolled_uids(), vec!["u1", "u2", "u3"]);
    for pod in ["demo/a", "demo/c"] {
        assert_eq!(h.api.annotation_of(pod), Some(Some("enabled".into())));
    }
    let attempts = h.redir.calls("enrol").len();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        h.redir.calls("enrol").len(),
        attempts,
        "no retry once enrolled"
    );

    // u2 was enrolled by the start-up reconcile and left alone.
    let calls = h.redir.calls.lock().unwrap().clone();
    assert!(calls.iter().all(|(_, p)| p.uid != "u2"), "{calls:?}");
    assert_eq!(h.api.annotation_of("demo/b"), None);
}
