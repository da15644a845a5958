//! The production [`WorkloadProxyManager`]: one proxy-engine instance per
//! in-pod workload ([`ProxyFactory::start_for_workload`] with that pod's
//! [`InpodSocketFactory`]).
//!
//! Stopping a workload (Del, snapshot drain, duplicate Add in a new netns)
//! removes it at once and drains it in the background for the grace period,
//! so the ZDS answer is never delayed by open connections.
//!
//! Each running workload holds its namespace/service account in the certificate
//! manager ([`crate::identity::SecretManager::hold`]) until its proxy has drained:
//! when the last workload of an account leaves this node, its certificates stop
//! being renewed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo as ZdsWorkloadInfo;

use super::netns::InpodNetns;
use super::socket_factory::InpodSocketFactory;
use super::state::{StartError, WorkloadProxyManager};
use crate::config::WorkloadInfo;
use crate::identity::manager::AccountHold;
use crate::proxy::{ProxyFactory, ProxyHandle};

/// A running workload proxy and its hold on its account's certificates.
struct Running {
    handle: ProxyHandle,
    hold: AccountHold,
}

impl Running {
    /// Drains the proxy in the background for `grace`, then releases the account.
    fn drain_in_background(self, grace: Duration) {
        tokio::spawn(self.drain(grace));
    }

    async fn drain(self, grace: Duration) {
        self.handle.drain(grace).await;
        drop(self.hold);
    }
}

/// Per-workload proxies on the shared engine.
pub struct EngineWorkloadProxies {
    factory: ProxyFactory,
    mark: Option<u32>,
    reuse_port: bool,
    drain_grace: Duration,
    running: Mutex<HashMap<String, Running>>,
}

impl EngineWorkloadProxies {
    /// `mark`: `PACKET_MARK` (1337 in in-pod mode); `reuse_port`:
    /// `INPOD_PORT_REUSE`; `drain_grace`: how long a removed workload's open
    /// connections may finish.
    pub fn new(
        factory: ProxyFactory,
        mark: Option<u32>,
        reuse_port: bool,
        drain_grace: Duration,
    ) -> Self {
        Self {
            factory,
            mark,
            reuse_port,
            drain_grace,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The running proxies by ZDS uid (admin, tests).
    pub fn handles(&self) -> Vec<(String, ProxyHandle)> {
        self.running
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.handle.clone()))
            .collect()
    }

    /// Drains every proxy for at most the grace period (shutdown).
    pub async fn drain_all(&self) {
        let running: Vec<Running> = self
            .running
            .lock()
            .unwrap()
            .drain()
            .map(|(_, r)| r)
            .collect();
        futures::future::join_all(running.into_iter().map(|r| r.drain(self.drain_grace))).await;
    }
}

impl WorkloadProxyManager for EngineWorkloadProxies {
    fn start<'a>(
        &'a self,
        uid: &'a str,
        info: &'a ZdsWorkloadInfo,
        netns: Arc<InpodNetns>,
    ) -> BoxFuture<'a, Result<(), StartError>> {
        Box::pin(async move {
            let sockets = Arc::new(
                InpodSocketFactory::new(netns, self.mark, self.reuse_port)
                    .with_keepalive(self.factory.inputs().cfg.keepalive),
            );
            let workload = WorkloadInfo {
                namespace: info.namespace.clone(),
                name: info.name.clone(),
                service_account: info.service_account.clone(),
            };
            // Taken before the proxy prefetches the certificate; released (dropped) if it
            // fails to start.
            let hold = self
                .factory
                .inputs()
                .certs
                .hold(&info.namespace, &info.service_account);
            let handle = self.factory.start_for_workload(workload, sockets).await?;
            let running = Running { handle, hold };
            if let Some(old) = self
                .running
                .lock()
                .unwrap()
                .insert(uid.to_string(), running)
            {
                // The state machine stops before restarting; be safe anyway.
                old.drain_in_background(self.drain_grace);
            }
            Ok(())
        })
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let running = self.running.lock().unwrap().remove(uid);
            if let Some(r) = running {
                r.drain_in_background(self.drain_grace);
            }
        })
    }

    fn manager_metrics(&self) -> Option<crate::telemetry::metrics::WorkloadManagerMetrics> {
        Some(self.factory.inputs().metrics.workload_manager.clone())
    }
}
