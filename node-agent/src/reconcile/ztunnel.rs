//! Whether a ztunnel can take pods, per mode, fed into
//! [`Reconciler::set_ztunnel_available`] (pending pods are retried when it
//! becomes true) and into readiness: the agent is not Ready while it would
//! refuse ambient pods' CNI ADDs for lack of a ztunnel (upstream
//! istio/ztunnel#1208, #1674).
//!
//! - in-pod: a ztunnel is connected to the ZDS server ([`follow_zds`]);
//! - GENEVE: the active ztunnel pod (newest Ready `app=ztunnel` pod in the
//!   agent's namespace on this node) is known and the tunnels to it are
//!   built ([`follow_geneve`]; rebuilt when that pod changes). Without one
//!   the redirector holds the node: enrolled pods stay captured and their
//!   traffic is refused (fail closed, as in-pod mode) until a ztunnel pod is
//!   Ready again.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::Reconciler;
use crate::health::ReadyFlag;
use crate::redirect::geneve::{GeneveRedirector, ZtunnelPod};
use crate::zds::ZdsServer;

/// Readiness component for "a ztunnel can take pods".
pub const READY_COMPONENT: &str = "ztunnel";
/// The ztunnel pod's interface toward the node (GENEVE).
pub const ZTUNNEL_IFACE: &str = "eth0";

fn set(reconciler: &Reconciler, ready: &ReadyFlag, available: bool, why: &str) {
    reconciler.set_ztunnel_available(available);
    if available {
        ready.set_ready();
    } else {
        ready.set_not_ready(why);
    }
}

/// In-pod mode: polls the ZDS server's connections every `interval` until
/// `shutdown`.
pub async fn follow_zds(
    zds: ZdsServer,
    reconciler: Arc<Reconciler>,
    ready: ReadyFlag,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut last = None;
    loop {
        let now = zds.connected();
        if last != Some(now) {
            if now {
                tracing::info!(
                    connections = zds.connections(),
                    "ztunnel connected over ZDS"
                );
            } else {
                tracing::warn!(socket = %zds.config().socket_path.display(), "no ztunnel connected: ambient pods cannot start on this node");
            }
            set(
                &reconciler,
                &ready,
                now,
                "no ztunnel connected to the ZDS socket",
            );
            last = Some(now);
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// GENEVE mode: points the redirector at the active ztunnel pod whenever
/// `changed` is notified (and retries every second after a failure) until
/// `shutdown`. Every `recheck` it compares the kernel with what it built and
/// re-applies everything when something else changed it (kube-proxy
/// re-inserting its hooks above ours, a firewall reload flushing our chains,
/// a deleted rule or route): capture must not silently stop.
pub async fn follow_geneve(
    geneve: Arc<GeneveRedirector>,
    reconciler: Arc<Reconciler>,
    ready: ReadyFlag,
    changed: Arc<Notify>,
    recheck: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut current: Option<ZtunnelPod> = None;
    let mut failing = false;
    // Nothing built yet: "available" must be decided once.
    let mut first = true;
    loop {
        let wanted = wanted_ztunnel(&reconciler).await;
        let retry = match wanted {
            Err(why) => {
                // The pod exists but cannot be used yet (no netns found):
                // keep what is built and try again.
                tracing::warn!(reason = %why, "active ztunnel pod not usable yet");
                true
            }
            Ok(w) if w == current && !failing && !first => false,
            Ok(w) => match geneve.set_ztunnel(w.clone()).await {
                Ok(()) => {
                    match &w {
                        Some(z) => {
                            tracing::info!(ztunnel = %z.ip, uid = %z.uid, "GENEVE redirection points at ztunnel")
                        }
                        None => tracing::warn!(
                            "no Ready ztunnel pod on this node: ambient pods cannot start, enrolled pods' traffic is refused"
                        ),
                    }
                    set(
                        &reconciler,
                        &ready,
                        w.is_some(),
                        "no Ready ztunnel pod on this node",
                    );
                    current = w;
                    failing = false;
                    first = false;
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build GENEVE redirection to ztunnel; retrying");
                    set(
                        &reconciler,
                        &ready,
                        false,
                        "GENEVE redirection to ztunnel failed",
                    );
                    failing = true;
                    true
                }
            },
        };
        let wait = if retry {
            Duration::from_secs(1)
        } else {
            recheck
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {
                if !retry && current.is_some() {
                    match geneve.drift().await {
                        Ok(d) if d.is_empty() => {}
                        Ok(d) => {
                            tracing::warn!(drift = %d.join("; "), "GENEVE redirection was changed by something else; re-applying it");
                            // Re-applies everything for the same ztunnel (a refresh).
                            failing = true;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot check GENEVE redirection for drift"),
                    }
                }
            }
        }
    }
}

/// The ztunnel GENEVE should point at: `Ok(None)` = no active pod;
/// `Err` = there is one but its netns or IPv4 address is not known.
async fn wanted_ztunnel(reconciler: &Reconciler) -> Result<Option<ZtunnelPod>, String> {
    let Some(pod) = reconciler.cache().active_ztunnel() else {
        return Ok(None);
    };
    let ip = pod
        .ips
        .iter()
        .find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .ok_or_else(|| format!("ztunnel pod {} has no IPv4 address", pod.key()))?;
    let netns = reconciler
        .resolve_netns(&pod)
        .await
        .ok_or_else(|| format!("netns of ztunnel pod {} not found", pod.key()))?;
    Ok(Some(ZtunnelPod {
        uid: pod.uid.clone(),
        ip,
        netns,
        iface: ZTUNNEL_IFACE.to_string(),
    }))
}
