//! Enrolled pods whose IPs change (upstream istio/istio#60471): the
//! redirector's per-IP state follows them.

use std::time::Duration;

use super::tests::{Harness, ns, running, started};

/// An enrolled pod without an IP in the cache when the agent starts is
/// rebuilt with no IPs; when its IP shows up the redirector is asked to sync
/// it (probe ipset), once, without a re-enrolment.
#[tokio::test]
async fn enrolled_pod_without_ip_at_startup_gets_its_ip_synced_when_it_appears() {
    let mut p = running("u1", "demo", "a", "10.0.0.1");
    p.redirection = Some("enabled".into());
    p.ips.clear();
    let h = Harness::new(vec![p.clone()], vec![ns("demo", Some("ambient"))]);
    let _w = started(&h).await;
    h.settle().await;
    assert_eq!(*h.redir.reconciled.lock().unwrap(), vec!["u1".to_string()]);
    assert!(h.redir.calls("sync_ips").is_empty());

    let mut with_ip = p.clone();
    with_ip.ips = vec!["10.0.0.1".parse().unwrap()];
    h.apply_pod(with_ip.clone());
    h.settle().await;
    assert_eq!(h.redir.calls("sync_ips"), vec!["u1".to_string()]);
    let synced = h.redir.last("sync_ips", "u1").unwrap();
    assert_eq!(synced.ips, with_ip.ips);
    assert_eq!(
        (synced.namespace.as_str(), synced.name.as_str()),
        ("demo", "a")
    );
    assert!(h.redir.calls("enrol").is_empty(), "no re-enrolment");
    assert_eq!(h.r.enrolled_uids(), vec!["u1".to_string()]);

    // Recorded: another pass (any pod update) does not sync again.
    let mut touched = with_ip.clone();
    touched.ready = !touched.ready;
    h.apply_pod(touched);
    h.settle().await;
    assert_eq!(h.redir.calls("sync_ips").len(), 1);
}

/// An enrolled pod whose IP changes gets the new one synced; the pod is
/// unenrolled later with the IPs it has now.
#[tokio::test]
async fn enrolled_pods_changed_ip_is_synced_and_used_to_unenrol() {
    let h = Harness::new(
        vec![running("u1", "demo", "a", "10.0.0.1")],
        vec![ns("demo", Some("ambient"))],
    );
    let _w = started(&h).await;
    h.settle().await;
    assert_eq!(h.redir.calls("enrol"), vec!["u1".to_string()]);
    assert!(
        h.redir.calls("sync_ips").is_empty(),
        "same IPs: nothing to sync"
    );

    let moved = running("u1", "demo", "a", "10.0.0.9");
    h.apply_pod(moved.clone());
    h.settle().await;
    assert_eq!(h.redir.last("sync_ips", "u1").unwrap().ips, moved.ips);

    h.delete_pod("u1");
    h.settle().await;
    assert_eq!(h.redir.last("unenrol", "u1").unwrap().ips, moved.ips);
}

/// A failed sync is retried until it succeeds; the pod stays enrolled.
#[tokio::test]
async fn failed_ip_sync_is_retried() {
    let mut p = running("u1", "demo", "a", "10.0.0.1");
    p.redirection = Some("enabled".into());
    p.ips.clear();
    let h = Harness::new(vec![p.clone()], vec![ns("demo", Some("ambient"))]);
    let _w = started(&h).await;
    h.settle().await;
    h.redir.fatal.lock().unwrap().insert("u1".into());
    p.ips = vec!["10.0.0.1".parse().unwrap()];
    h.apply_pod(p);
    h.settle().await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(h.redir.calls("sync_ips").len() >= 2, "retried");
    h.redir.fatal.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(250)).await;
    h.settle().await;
    let n = h.redir.calls("sync_ips").len();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        h.redir.calls("sync_ips").len(),
        n,
        "no more syncs once it worked"
    );
    assert!(h.redir.calls("enrol").is_empty());
    assert_eq!(h.r.enrolled_uids(), vec!["u1".to_string()]);
}
