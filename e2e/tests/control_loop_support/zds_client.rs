//! ztunnel's side of ZDS: its real `InpodClient` with a proxy manager that only records
//! what it was asked to run.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;
use ztunnel::inpod::{
    InpodClient, InpodClientConfig, InpodNetns, StartError, WorkloadProxyManager,
};

/// Records what ztunnel was asked to run.
#[derive(Default)]
pub struct RecordingProxies {
    /// uid → netns inode of the running proxy.
    pub running: Mutex<BTreeMap<String, u64>>,
    /// Every start, in order.
    pub starts: Mutex<Vec<String>>,
}

impl WorkloadProxyManager for RecordingProxies {
    fn start<'a>(
        &'a self,
        uid: &'a str,
        _info: &'a WorkloadInfo,
        netns: Arc<InpodNetns>,
    ) -> BoxFuture<'a, Result<(), StartError>> {
        Box::pin(async move {
            self.running
                .lock()
                .unwrap()
                .insert(uid.to_string(), netns.inode());
            self.starts.lock().unwrap().push(uid.to_string());
            Ok(())
        })
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.running.lock().unwrap().remove(uid);
        })
    }
}

/// ztunnel's real ZDS client on its own runtime thread.
pub struct Ztunnel {
    pub proxies: Arc<RecordingProxies>,
    client: Arc<InpodClient<RecordingProxies>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ztunnel {
    pub fn start(uds: &Path) -> Self {
        let proxies = Arc::new(RecordingProxies::default());
        let client = Arc::new(InpodClient::new(
            InpodClientConfig {
                uds: uds.to_path_buf(),
                backoff_initial: Duration::from_millis(10),
                backoff_max: Duration::from_millis(100),
                retry_interval: Duration::from_secs(1),
            },
            proxies.clone(),
        ));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = client.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(c.run(async {
                let _ = rx.await;
            }));
        });
        Self {
            proxies,
            client,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn running(&self) -> Vec<String> {
        self.proxies
            .running
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    pub fn starts(&self) -> usize {
        self.proxies.starts.lock().unwrap().len()
    }

    /// A snapshot completed on the current connection (ztunnel readiness).
    pub fn ready(&self) -> bool {
        *self.client.readiness().borrow()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
