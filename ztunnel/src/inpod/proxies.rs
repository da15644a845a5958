//! The production [`WorkloadProxyManager`]: one proxy-engine instance per
//! in-pod workload ([`ProxyFactory::start_for_workload`] with that pod's
//! [`InpodSocketFactory`]).
//!
//! Stopping a workload (Del, snapshot drain, duplicate Add in a new netns)
//! removes it at once and drains it in the background for the grace period,
//! so the ZDS answer is never delayed by open connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo as ZdsWorkloadInfo;

use super::netns::InpodNetns;
use super::socket_factory::InpodSocketFactory;
use super::state::{StartError, WorkloadProxyManager};
use crate::config::WorkloadInfo;
use crate::proxy::{ProxyFactory, ProxyHandle};

/// Per-workload proxies on the shared engine.
pub struct EngineWorkloadProxies {
    factory: ProxyFactory,
    mark: Option<u32>,
    reuse_port: bool,
    drain_grace: Duration,
    running: Mutex<HashMap<String, ProxyHandle>>,
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
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Drains every proxy for at most the grace period (shutdown).
    pub async fn drain_all(&self) {
        let handles: Vec<ProxyHandle> = self
            .running
            .lock()
            .unwrap()
            .drain()
            .map(|(_, h)| h)
            .collect();
        futures::future::join_all(handles.iter().map(|h| h.drain(self.drain_grace))).await;
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
            let sockets = Arc::new(InpodSocketFactory::new(netns, self.mark, self.reuse_port));
            let workload = WorkloadInfo {
                namespace: info.namespace.clone(),
                name: info.name.clone(),
                service_account: info.service_account.clone(),
            };
            let handle = self.factory.start_for_workload(workload, sockets).await?;
            if let Some(old) = self.running.lock().unwrap().insert(uid.to_string(), handle) {
                // The state machine stops before restarting; be safe anyway.
                let grace = self.drain_grace;
                tokio::spawn(async move { old.drain(grace).await });
            }
            Ok(())
        })
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let handle = self.running.lock().unwrap().remove(uid);
            if let Some(h) = handle {
                let grace = self.drain_grace;
                tokio::spawn(async move { h.drain(grace).await });
            }
        })
    }
}
