//! Shared by the in-pod ZDS tests: throw-away pod netns, a proxy-manager
//! double that binds real listeners through the in-pod socket factory, and
//! a running `InpodClient`.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;
use node_agent::redirect::netns::Netns;
use node_agent::zds::ZdsConfig;
use ztunnel::inpod::{
    InpodClient, InpodClientConfig, InpodNetns, InpodSocketFactory, StartError,
    WorkloadProxyManager,
};
use ztunnel::redirect::SocketFactory;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub const MARK: u32 = 1337;

/// A throw-away pod netns with `lo` up; gone when dropped.
pub fn pod_netns() -> Netns {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        lo_up();
        Netns::current().unwrap()
    })
    .join()
    .unwrap()
}

/// `ioctl(SIOCSIFFLAGS)` on lo in the calling thread's netns.
pub fn lo_up() {
    // SAFETY: plain socket + ioctl with a zeroed, filled ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(s >= 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(s);
    }
}

pub fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
    }
}

/// Proxy manager double: "starting" binds the three in-pod listeners in the
/// workload's netns with the real socket factory and holds them.
#[derive(Default)]
pub struct ListenerProxies {
    pub running: Mutex<HashMap<String, (u64, Vec<tokio::net::TcpListener>)>>,
    pub failing: Mutex<HashSet<String>>,
    log: Mutex<Vec<String>>,
}

impl ListenerProxies {
    pub fn log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.running.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }
}

impl WorkloadProxyManager for ListenerProxies {
    fn start<'a>(
        &'a self,
        uid: &'a str,
        _info: &'a WorkloadInfo,
        netns: Arc<InpodNetns>,
    ) -> BoxFuture<'a, Result<(), StartError>> {
        Box::pin(async move {
            self.log.lock().unwrap().push(format!("start {uid}"));
            if self.failing.lock().unwrap().contains(uid) {
                return Err("injected bind failure".into());
            }
            let inode = netns.inode();
            let f = InpodSocketFactory::new(netns, Some(MARK), true);
            let (a, b, c) = f.workload_listeners().await?;
            self.running
                .lock()
                .unwrap()
                .insert(uid.to_string(), (inode, vec![a, b, c]));
            Ok(())
        })
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.log.lock().unwrap().push(format!("stop {uid}"));
            self.running.lock().unwrap().remove(uid);
        })
    }
}

pub fn client_config(path: &Path) -> InpodClientConfig {
    InpodClientConfig {
        uds: path.to_path_buf(),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        retry_interval: Duration::from_millis(100),
    }
}

pub fn server_config(path: &Path) -> ZdsConfig {
    ZdsConfig {
        socket_path: path.to_path_buf(),
        ack_timeout: Duration::from_secs(5),
        liveness_interval: Duration::from_millis(100),
        liveness_probe: Duration::from_millis(10),
    }
}

pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Connects from inside `ns` to 127.0.0.1:`port` (through the factory, so
/// from the pod's side).
pub async fn can_connect(ns: &Netns, port: u16) -> bool {
    let ins = Arc::new(InpodNetns::new(ns.as_fd().try_clone_to_owned().unwrap()).unwrap());
    let f = InpodSocketFactory::new(ins, None, false);
    f.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), None)
        .await
        .is_ok()
}

pub struct Running {
    pub client: Arc<InpodClient<ListenerProxies>>,
    pub proxies: Arc<ListenerProxies>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn start(path: &Path) -> Self {
        let proxies = Arc::new(ListenerProxies::default());
        let client = Arc::new(InpodClient::new(client_config(path), proxies.clone()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = client.clone();
        let task = tokio::spawn(async move {
            c.run(async {
                let _ = rx.await;
            })
            .await
        });
        Self {
            client,
            proxies,
            stop: Some(tx),
            task,
        }
    }

    pub fn ready(&self) -> bool {
        *self.client.readiness().borrow()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
        self.client.state().lock().await.drain_all().await;
    }
}
