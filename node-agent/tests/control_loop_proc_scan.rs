//! The control loop with the real in-pod redirector, for pods whose CNI ADD
//! the agent never saw (started before the agent, or its run dir lost): the
//! netns is found by scanning `/proc` for a process whose cgroup names the
//! pod UID, as on a real node (root; cgroup v1 `pids` or v2 hierarchy).
//!
//! - start-up enrols a running ambient pod found only that way (rules in
//!   its netns, handed to the proxy with that netns), and unlabelling
//!   removes the rules again;
//! - a new agent (nothing remembered) removes the rules a previous agent
//!   left in a pod that is no longer ambient, and its annotation;
//! - a process whose netns holds none of the pod's IPs is not taken for the
//!   pod's.
//!
//! Namespaces: anonymous (held by fds and by the pod's `sleep` process);
//! the cgroup directories and processes are removed by a guard.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;
use node_agent::cluster::api::{ApiError, ClusterApi};
use node_agent::cluster::cache::ClusterCache;
use node_agent::cluster::enablement::EnablementConfig;
use node_agent::cluster::pod::{NamespaceInfo, PodInfo, PodPhase};
use node_agent::metrics::AgentMetrics;
use node_agent::reconcile::pod_netns::{NetnsPaths, NetnsResolver};
use node_agent::reconcile::{ReconcileConfig, Reconciler};
use node_agent::redirect::inpod::{HandoffError, InpodConfig, InpodRedirector, WorkloadHandoff};
use node_agent::redirect::netns::Netns;

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (netns, cgroups)".into());
    }
    if cgroup_parent().is_none() {
        return Some("no writable cgroup hierarchy under /sys/fs/cgroup".into());
    }
    None
}

macro_rules! require_env {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// A cgroup hierarchy we may create directories in: v1 `pids`, else the v2
/// root (or the hybrid `unified` mount).
fn cgroup_parent() -> Option<PathBuf> {
    [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| {
        p.join("cgroup.procs").exists() && {
            let probe = p.join(format!("cl-probe-{}", std::process::id()));
            let ok = std::fs::create_dir(&probe).is_ok();
            let _ = std::fs::remove_dir(&probe);
            ok
        }
    })
}

fn unique_uid(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{:08x}-{:04x}", n as u32, std::process::id() as u16)
}

/// The pod's IP, on its `eth0` and in its `status.podIPs`.
const POD_IP: &str = "10.99.0.5";

/// Gives the calling thread's netns an `eth0` (a veth) holding `ip`/24.
fn add_pod_interface(ip: &str) {
    use futures::TryStreamExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        handle
            .link()
            .add(rtnetlink::LinkVeth::new("eth0", "peer0").up().build())
            .execute()
            .await
            .unwrap();
        let eth0 = handle
            .link()
            .get()
            .match_name("eth0")
            .execute()
            .try_next()
            .await
            .unwrap()
            .unwrap();
        handle
            .address()
            .add(eth0.header.index, ip.parse().unwrap(), 24)
            .execute()
            .await
            .unwrap();
    });
}

/// A "pod": a `sleep` in its own netns, in cgroup `.../kubepods/pod<uid>`.
struct PodProcess {
    child: Child,
    netns: Netns,
    cgroup_root: PathBuf,
}

impl PodProcess {
    fn start(uid: &str) -> Self {
        let parent = cgroup_parent().unwrap();
        let cgroup_root = parent.join(format!("cltest-{uid}"));
        let leaf = cgroup_root.join("kubepods").join(format!("pod{uid}"));
        std::fs::create_dir_all(&leaf).expect("create cgroup");
        // A netns of its own with the pod's IP on an interface (the agent
        // pairs a netns with a pod only if it holds one of the pod's IPs),
        // then a process living in it.
        let (child, netns) = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            add_pod_interface(POD_IP);
            let netns = Netns::current().unwrap();
            let child = Command::new("sleep").arg("300").spawn().unwrap();
            (child, netns)
        })
        .join()
        .unwrap();
        std::fs::write(leaf.join("cgroup.procs"), child.id().to_string()).expect("join cgroup");
        Self {
            child,
            netns,
            cgroup_root,
        }
    }

    fn inode(&self) -> u64 {
        self.netns.inode().unwrap()
    }

    /// `ISTIO` lines of iptables-save (both backends, both families).
    fn rules(&self) -> Vec<String> {
        self.netns
            .run(|| {
                let mut lines = Vec::new();
                for save in [
                    "iptables-nft-save",
                    "iptables-legacy-save",
                    "ip6tables-nft-save",
                    "ip6tables-legacy-save",
                ] {
                    if let Ok(out) = Command::new(save).output() {
                        lines.extend(
                            String::from_utf8_lossy(&out.stdout)
                                .lines()
                                .filter(|l| l.contains("ISTIO") && !l.starts_with('#'))
                                .map(String::from),
                        );
                    }
                }
                lines
            })
            .unwrap()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Leaves first; an emptied cgroup can be removed.
        let mut dirs: Vec<PathBuf> = walk(&self.cgroup_root);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

/// The node: an anonymous netns held by fd.
fn node_netns() -> (Netns, PathBuf) {
    let ns = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        Netns::current().unwrap()
    })
    .join()
    .unwrap();
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        ns.as_raw_fd()
    ));
    (ns, path)
}

#[derive(Default)]
struct RecordingHandoff {
    /// "register <uid> <inode>", "add <uid> <inode>", "del <uid>".
    calls: Mutex<Vec<String>>,
}

impl WorkloadHandoff for RecordingHandoff {
    fn add<'a>(
        &'a self,
        uid: &'a str,
        _info: &'a WorkloadInfo,
        netns: &'a Netns,
    ) -> BoxFuture<'a, Result<(), HandoffError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(format!("add {uid} {}", netns.inode().unwrap()));
            Ok(())
        })
    }

    fn register(&self, uid: &str, _info: &WorkloadInfo, netns: Option<&Netns>) {
        let ino = netns.map(|n| n.inode().unwrap()).unwrap_or(0);
        self.calls
            .lock()
            .unwrap()
            .push(format!("register {uid} {ino}"));
    }

    fn del<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<(), HandoffError>> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(format!("del {uid}"));
            Ok(())
        })
    }
}

#[derive(Default)]
struct RecordingApi {
    patches: Mutex<Vec<(String, Option<String>)>>,
}

impl ClusterApi for RecordingApi {
    fn get_pod<'a>(
        &'a self,
        _namespace: &'a str,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, ApiError>> {
        Box::pin(async { Ok(None) })
    }
    fn get_namespace<'a>(
        &'a self,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<Option<NamespaceInfo>, ApiError>> {
        Box::pin(async { Ok(None) })
    }
    fn set_redirection<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        self.patches
            .lock()
            .unwrap()
            .push((format!("{namespace}/{name}"), value.map(String::from)));
        Box::pin(async { Ok(()) })
    }
    fn daemonset_exists<'a>(
        &'a self,
        _namespace: &'a str,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(async { Ok(true) })
    }
}

fn pod(uid: &str, redirection: Option<&str>) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        namespace: "demo".into(),
        name: "web".into(),
        service_account: "web".into(),
        phase: PodPhase::Running,
        ready: true,
        ips: vec![POD_IP.parse().unwrap()],
        redirection: redirection.map(String::from),
        rule_annotations: BTreeMap::new(),
        ..Default::default()
    }
}

fn cache_with(p: PodInfo, ambient: bool) -> Arc<ClusterCache> {
    let cache = Arc::new(ClusterCache::new("istio-system"));
    cache.pods_init();
    cache.pods_init_apply(p);
    cache.pods_init_done();
    cache.namespaces_init();
    cache.namespaces_init_apply(if ambient {
        NamespaceInfo::new("demo", &[("istio.io/dataplane-mode", "ambient")])
    } else {
        NamespaceInfo::new("demo", &[])
    });
    cache.namespaces_init_done();
    cache
}

struct Agent {
    reconciler: Arc<Reconciler>,
    handoff: Arc<RecordingHandoff>,
    api: Arc<RecordingApi>,
    _run_dir: tempfile::TempDir,
}

/// A fresh agent (nothing remembered) with the real in-pod redirector.
async fn agent(cache: Arc<ClusterCache>, node: &Path) -> Agent {
    let handoff = Arc::new(RecordingHandoff::default());
    let redirector = InpodRedirector::new(
        InpodConfig {
            host_netns: Some(node.to_path_buf()),
            proc_root: "/proc".into(),
            ..InpodConfig::default()
        },
        handoff.clone(),
    )
    .await
    .expect("in-pod redirector");
    let run_dir = tempfile::tempdir().unwrap();
    let paths = Arc::new(NetnsPaths::load(run_dir.path()).unwrap());
    let api = Arc::new(RecordingApi::default());
    let reconciler = Reconciler::new(
        ReconcileConfig {
            enablement: EnablementConfig {
                exclude_namespaces: vec!["kube-system".into()],
                agent_namespace: "istio-system".into(),
                agent_pod: None,
                selectors: Default::default(),
            },
            ..ReconcileConfig::default()
        },
        cache,
        api.clone(),
        Arc::new(redirector),
        NetnsResolver::new(paths, "/proc".into()),
        AgentMetrics::new(),
    );
    reconciler.set_ztunnel_available(true);
    Agent {
        reconciler,
        handoff,
        api,
        _run_dir: run_dir,
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_pod_found_through_its_cgroup_is_enrolled_and_unenrolled() {
    require_env!();
    let uid = unique_uid("a1");
    let p = PodProcess::start(&uid);
    let (_node, node_path) = node_netns();
    let cache = cache_with(pod(&uid, None), true);
    let a = agent(cache.clone(), &node_path).await;

    a.reconciler.startup().await;
    let workers = a.reconciler.spawn_workers();
    // Never enrolled before (no annotation): the queue enrols it, with its netns found
    // under /proc (no CNI event for it).
    eventually("enrolled", || {
        a.reconciler.enrolled_uids() == vec![uid.clone()]
    })
    .await;
    assert_eq!(
        *a.handoff.calls.lock().unwrap(),
        vec![format!("add {uid} {}", p.inode())],
        "handed over with the netns found under /proc"
    );
    let rules = p.rules();
    assert!(
        rules
            .iter()
            .any(|l| l.contains("-A ISTIO_OUTPUT") && l.contains("15001")),
        "{rules:?}"
    );
    eventually("annotation enabled", || {
        a.api.patches.lock().unwrap().last() == Some(&("demo/web".into(), Some("enabled".into())))
    })
    .await;

    for c in cache.apply_namespace(NamespaceInfo::new("demo", &[])) {
        a.reconciler.handle_change(&c);
    }
    eventually("unenrolled", || a.reconciler.enrolled_uids().is_empty()).await;
    assert!(p.rules().is_empty(), "{:?}", p.rules());
    assert!(
        a.handoff
            .calls
            .lock()
            .unwrap()
            .contains(&format!("del {uid}"))
    );
    a.reconciler.stop();
    for w in workers {
        w.await.unwrap();
    }
}

/// The pod's process found under /proc is in a netns that holds none of the pod's IPs
/// (`status.podIPs` says another address): not the pod's netns as far as the agent can
/// tell, so nothing is applied in it nor handed over. Once the Pod object's IPs are the
/// ones in that netns, it is enrolled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_netns_without_the_pod_ips_is_not_enrolled() {
    require_env!();
    let uid = unique_uid("a3");
    let p = PodProcess::start(&uid);
    let (_node, node_path) = node_netns();
    let other_ip = PodInfo {
        ips: vec!["10.99.0.77".parse().unwrap()],
        ..pod(&uid, None)
    };
    let cache = cache_with(other_ip, true);
    let a = agent(cache.clone(), &node_path).await;

    a.reconciler.startup().await;
    let workers = a.reconciler.spawn_workers();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.reconciler.enrolled_uids().is_empty());
    assert!(a.handoff.calls.lock().unwrap().is_empty());
    assert!(p.rules().is_empty(), "{:?}", p.rules());

    for c in cache.apply_pod(pod(&uid, None)) {
        a.reconciler.handle_change(&c);
    }
    eventually("enrolled", || {
        a.reconciler.enrolled_uids() == vec![uid.clone()]
    })
    .await;
    assert_eq!(
        *a.handoff.calls.lock().unwrap(),
        vec![format!("add {uid} {}", p.inode())]
    );
    a.reconciler.stop();
    for w in workers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_agent_removes_what_a_previous_agent_left_in_an_opted_out_pod() {
    require_env!();
    let uid = unique_uid("b2");
    let p = PodProcess::start(&uid);
    let (_node, node_path) = node_netns();

    // The previous agent enrolled the pod.
    {
        let first = agent(cache_with(pod(&uid, None), true), &node_path).await;
        first.reconciler.startup().await;
        let workers = first.reconciler.spawn_workers();
        eventually("enrolled", || {
            first.reconciler.enrolled_uids() == vec![uid.clone()]
        })
        .await;
        assert!(!p.rules().is_empty());
        first.reconciler.stop();
        for w in workers {
            w.await.unwrap();
        }
    }
    // Meanwhile the namespace was unlabelled; the pod still says enabled.
    let cache = cache_with(pod(&uid, Some("enabled")), false);
    let second = agent(cache, &node_path).await;
    second.reconciler.startup().await;
    let workers = second.reconciler.spawn_workers();
    eventually("annotation removed", || {
        second.api.patches.lock().unwrap().last() == Some(&("demo/web".into(), None))
    })
    .await;
    assert!(p.rules().is_empty(), "rules left: {:?}", p.rules());
    assert!(
        second
            .handoff
            .calls
            .lock()
            .unwrap()
            .contains(&format!("del {uid}")),
        "ztunnel told to drop it"
    );
    second.reconciler.stop();
    for w in workers {
        w.await.unwrap();
    }
}
