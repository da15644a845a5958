//! kubelet-lite on its own (root): one simulated node, the API double, the
//! real Debian `bridge` + `host-local` CNI plugins, no mesh.
//!
//! - a pod goes through the CNI chain, its container runs inside the pod
//!   netns and pod cgroup, status (phase, IP, Ready) is written back,
//!   deletion runs CNI DEL (IPAM released) and removes the netns;
//! - a failing ADD keeps the pod Pending (status says why), the chain is
//!   torn down after each failure, the container never starts; fixing the
//!   config lets it start;
//! - hostNetwork pods run in the node netns; a killed container is
//!   restarted (restart count in the status), a held one stays down until
//!   released; capabilities and user come from the security context;
//! - volumes (configMap, secret, projected token, hostPath), env paths and
//!   `/etc/hosts` with hostAliases as the container sees them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::apiserver::{ApiServer, ApiServerHandle};
use e2e::kubelet::{Images, Kubelet, KubeletConfig, PodPhase};
use e2e::netsim::{Cluster, NamedNetns};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

fn skip() -> Option<String> {
    if !e2e::netsim::can_create_netns() {
        return Some("needs root".into());
    }
    for p in ["bridge", "host-local"] {
        if !Path::new("/usr/lib/cni").join(p).exists() {
            return Some(format!(
                "/usr/lib/cni/{p} missing (containernetworking-plugins)"
            ));
        }
    }
    e2e::binaries::try_bin_path("e2e-workload").err()
}

macro_rules! require {
    () => {
        if let Some(why) = skip() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

struct Env {
    kubelet: Kubelet,
    api: ApiServerHandle,
    cluster: Cluster,
    root: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let cluster = Cluster::new(tag, 1).unwrap();
        let api = ApiServer::start().unwrap();
        let node = cluster.node(1);
        let root = cluster.scope().dir().join("node1");
        let bin = root.join("opt/cni/bin");
        let conf = root.join("etc/cni/net.d");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        for p in ["bridge", "host-local"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p)).unwrap();
        }
        std::fs::write(
            conf.join("10-bridge.conflist"),
            serde_json::to_vec(&node.cni_conflist("net")).unwrap(),
        )
        .unwrap();
        let mut cfg = KubeletConfig::new(
            node.name(),
            node.netns().name(),
            node.ip(),
            &node.pod_cidr().to_string(),
            root.clone(),
            cluster.scope().clone(),
        );
        let mut images = Images::default();
        images.add_file(
            "workload",
            "/usr/local/bin/e2e-workload",
            e2e::bin_path("e2e-workload"),
        );
        cfg.images = images;
        cfg.injected_env = vec![("INJECTED".into(), "yes".into())];
        let kubelet = Kubelet::start(cfg, api.kube_config()).unwrap();
        api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t"}}))
            .unwrap();
        Self {
            kubelet,
            api,
            cluster,
            root,
        }
    }

    fn create_pod(&self, name: &str, spec: Value) -> String {
        let mut spec = spec;
        spec["nodeName"] = json!("node1");
        let obj = self
            .api
            .create(json!({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": "t", "labels": {"app": name}},
                           "spec": spec}))
            .unwrap();
        obj["metadata"]["uid"].as_str().unwrap().to_string()
    }

    fn pod_object(&self, name: &str) -> Value {
        self.api
            .get("v1", "Pod", Some("t"), name)
            .unwrap_or(Value::Null)
    }

    fn ipam_allocations(&self) -> Vec<String> {
        let dir = self.cluster.node(1).cni_ipam_dir().join("net");
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn echo_spec() -> Value {
    json!({"containers": [{"name": "app", "image": "e2e/workload", "command": ["/usr/local/bin/e2e-workload"],
        "args": ["echo"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}],
        "terminationGracePeriodSeconds": 1})
}

fn condition(pod: &Value, kind: &str) -> Value {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .cloned()
        .unwrap_or(Value::Null)
}

fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn wait<T>(what: &str, max: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + max;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {max:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pod_lifecycle_through_the_cni_chain() {
    require!();
    let env = Env::new("kllife");
    let uid = env.create_pod("web", echo_spec());
    let info = env.kubelet.wait_ready("t", "web", SECOND * 20).unwrap();
    let ip = info.ip.expect("pod IP");
    assert!(env.cluster.node(1).pod_cidr().contains(&match ip {
        IpAddr::V4(v) => v,
        _ => panic!("{ip}"),
    }));

    // Status written back.
    let pod = wait("status Running with the IP", SECOND * 5, || {
        let p = env.pod_object("web");
        (p["status"]["phase"] == "Running" && condition(&p, "Ready")["status"] == "True")
            .then_some(p)
    });
    assert_eq!(pod["status"]["podIP"], ip.to_string());
    assert_eq!(
        pod["status"]["hostIP"],
        env.cluster.node(1).ip().to_string()
    );
    assert_eq!(pod["status"]["containerStatuses"][0]["restartCount"], 0);

    // The container runs inside the pod netns, in the pod's cgroup.
    let netns = NamedNetns::open(info.netns.as_deref().unwrap()).unwrap();
    let pid = info.containers["app"].pid.unwrap();
    let ns_ino = nix::sys::stat::stat(format!("/proc/{pid}/ns/net").as_str())
        .unwrap()
        .st_ino;
    assert_eq!(ns_ino, netns.inode().unwrap());
    if e2e::kubelet::cgroup::hierarchy().is_some() {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(cg.contains(&format!("/kubepods/pod{uid}/app")), "{cg}");
    }
    // It answers from the node (the route the kubelet's probe took).
    let addr = SocketAddr::new(ip, 8080);
    let reply = env
        .cluster
        .node(1)
        .netns()
        .run(move || e2e::workloads::exchange(addr, "ping", SECOND * 2))
        .unwrap()
        .unwrap();
    assert_eq!(reply, "web ping");
    assert_eq!(env.ipam_allocations(), vec![ip.to_string()]);

    // Deletion: CNI DEL (IPAM released), process and netns gone.
    env.api.delete("v1", "Pod", Some("t"), "web").unwrap();
    wait("pod torn down", SECOND * 10, || {
        env.kubelet.pod("t", "web").is_none().then_some(())
    });
    assert!(
        env.ipam_allocations().is_empty(),
        "{:?}",
        env.ipam_allocations()
    );
    assert!(
        !Path::new("/proc").join(pid.to_string()).exists()
            || proc_status(pid, "State").starts_with('Z')
    );
    assert!(!Path::new("/run/netns").join(info.netns.unwrap()).exists());
    assert!(!env.root.join("var/lib/kubelet/pods").join(&uid).exists());
}

#[test]
fn failed_add_keeps_the_pod_pending_and_its_container_unstarted() {
    require!();
    let env = Env::new("kladd");
    let conf = env.root.join("etc/cni/net.d/10-bridge.conflist");
    let good = std::fs::read(&conf).unwrap();
    let mut list: Value = serde_json::from_slice(&good).unwrap();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "refuser"}));
    std::fs::write(&conf, serde_json::to_vec(&list).unwrap()).unwrap();
    let refuser = env.root.join("opt/cni/bin/refuser");
    std::fs::write(
        &refuser,
        "#!/bin/sh\ncat >/dev/null\nif [ \"$CNI_COMMAND\" = ADD ]; then echo '{\"cniVersion\":\"1.0.0\",\"code\":100,\"msg\":\"refused for the test\"}'; exit 1; fi\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &refuser,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    env.create_pod("blocked", echo_spec());
    let info = env
        .kubelet
        .wait_pod("t", "blocked", SECOND * 10, "failed ADD twice", |p| {
            p.sandbox_failures >= 2
        })
        .unwrap();
    assert_eq!(info.phase, PodPhase::Pending);
    assert!(
        info.containers["app"].pid.is_none(),
        "container never started: {info:?}"
    );
    assert!(
        info.last_error
            .as_deref()
            .unwrap()
            .contains("refused for the test"),
        "{info:?}"
    );
    // The bridge's ADD was undone after each failure: no address held.
    assert!(
        env.ipam_allocations().is_empty(),
        "{:?}",
        env.ipam_allocations()
    );
    let pod = env.pod_object("blocked");
    assert_eq!(pod["status"]["phase"], "Pending");
    let sb = condition(&pod, "PodReadyToStartContainers");
    assert_eq!(sb["status"], "False");
    assert!(sb["message"].as_str().unwrap().contains("refused"), "{sb}");
    assert!(pod["status"].get("podIP").is_none());

    // The config is fixed: the next retry starts it.
    std::fs::write(&conf, &good).unwrap();
    let info = env.kubelet.wait_ready("t", "blocked", SECOND * 20).unwrap();
    assert!(info.ip.is_some());
}

#[test]
fn host_network_restarts_holds_and_security_context() {
    require!();
    let env = Env::new("klhost");
    env.create_pod(
        "hn",
        json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "c", "image": "busybox", "command": ["/bin/sleep"], "args": ["1000"],
            "securityContext": {"runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}}}]}),
    );
    env.create_pod(
        "nonroot",
        json!({"securityContext": {"runAsUser": 65532, "runAsGroup": 65532}, "terminationGracePeriodSeconds": 1,
               "containers": [{"name": "c", "image": "busybox", "command": ["/bin/sleep"], "args": ["1000"],
                               "securityContext": {"capabilities": {"drop": ["ALL"]}}}]}),
    );
    let hn = env.kubelet.wait_ready("t", "hn", SECOND * 20).unwrap();
    assert_eq!(hn.netns, None);
    assert_eq!(hn.ip, Some(IpAddr::V4(env.cluster.node(1).ip())));
    let pid = hn.containers["c"].pid.unwrap();
    let ino = nix::sys::stat::stat(format!("/proc/{pid}/ns/net").as_str())
        .unwrap()
        .st_ino;
    assert_eq!(
        ino,
        env.cluster.node(1).netns().inode().unwrap(),
        "runs in the node netns"
    );
    // NET_ADMIN (12) + SYS_ADMIN (21) only.
    let want = format!("{:016x}", (1u64 << 12) | (1u64 << 21));
    assert_eq!(proc_status(pid, "CapEff"), want);
    assert_eq!(proc_status(pid, "CapBnd"), want);
    let nr = env.kubelet.wait_ready("t", "nonroot", SECOND * 20).unwrap();
    let npid = nr.containers["c"].pid.unwrap();
    assert!(
        proc_status(npid, "Uid").starts_with("65532"),
        "{}",
        proc_status(npid, "Uid")
    );
    assert!(proc_status(npid, "Gid").starts_with("65532"));
    assert_eq!(proc_status(npid, "CapEff"), "0000000000000000");

    // Killed: restarted, and the status counts it.
    env.kubelet
        .kill_container("t", "hn", "c", Signal::SIGKILL, false)
        .unwrap();
    let again = env
        .kubelet
        .wait_pod("t", "hn", SECOND * 10, "restarted", |p| {
            p.containers["c"].restarts == 1 && p.containers["c"].running
        })
        .unwrap();
    assert_ne!(again.containers["c"].pid, Some(pid));
    wait("restartCount 1 in the API", SECOND * 5, || {
        (env.pod_object("hn")["status"]["containerStatuses"][0]["restartCount"] == 1).then_some(())
    });
    // Held: stays down until released.
    env.kubelet
        .kill_container("t", "hn", "c", Signal::SIGKILL, true)
        .unwrap();
    wait("container down", SECOND * 5, || {
        env.kubelet
            .pod("t", "hn")
            .filter(|p| !p.containers["c"].running)
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(800));
    let held = env.kubelet.pod("t", "hn").unwrap();
    assert!(
        !held.containers["c"].running && held.containers["c"].held,
        "{held:?}"
    );
    let pod = env.pod_object("hn");
    assert_eq!(condition(&pod, "Ready")["status"], "False");
    env.kubelet.release_container("t", "hn", "c").unwrap();
    env.kubelet.wait_ready("t", "hn", SECOND * 10).unwrap();
}

#[test]
fn volumes_env_and_hosts_as_the_container_sees_them() {
    require!();
    let env = Env::new("klvol");
    env.api
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": "t"},
                       "data": {"root-cert.pem": "ROOT"}}))
        .unwrap();
    env.api
        .create(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec", "namespace": "t"},
                       "data": {"key.pem": "S0VZ"}}))
        .unwrap();
    env.api
        .create(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa1", "namespace": "t"}}))
        .unwrap();
    let script = "echo CNI_BIN_DIR=$CNI_BIN_DIR; echo ROOT=$(cat $ROOT_CA_PATH); echo KEY=$(cat $KEY_DIR/key.pem); \
                  echo TOKEN_LEN=$(wc -c < $TOKEN); echo INJECTED=$INJECTED; echo NODE=$NODE_NAME; echo IP=$IP; \
                  cat /etc/hosts; exec sleep 1000";
    env.create_pod(
        "vol",
        json!({"serviceAccountName": "sa1", "terminationGracePeriodSeconds": 1,
            "hostAliases": [{"ip": "10.9.9.9", "hostnames": ["mesh-ca.istio-system.svc"]}],
            "containers": [{"name": "c", "image": "busybox", "command": ["/bin/sh", "-c", script],
            "env": [
                {"name": "CNI_BIN_DIR", "value": "/host/opt/cni/bin"},
                {"name": "ROOT_CA_PATH", "value": "/var/run/secrets/istio/root-cert.pem"},
                {"name": "KEY_DIR", "value": "/etc/cacerts"},
                {"name": "TOKEN", "value": "/var/run/secrets/tokens/istio-token"},
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "volumeMounts": [
                {"name": "bin", "mountPath": "/host/opt/cni/bin"},
                {"name": "root", "mountPath": "/var/run/secrets/istio", "readOnly": true},
                {"name": "certs", "mountPath": "/etc/cacerts", "readOnly": true},
                {"name": "tok", "mountPath": "/var/run/secrets/tokens", "readOnly": true}]}],
            "volumes": [
                {"name": "bin", "hostPath": {"path": "/opt/cni/bin", "type": "DirectoryOrCreate"}},
                {"name": "root", "configMap": {"name": "cm"}},
                {"name": "certs", "secret": {"secretName": "sec"}},
                {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"audience": "istio-ca", "path": "istio-token"}}]}}]}),
    );
    let info = env.kubelet.wait_ready("t", "vol", SECOND * 20).unwrap();
    let log_path = info.containers["c"].log.clone();
    let log = wait("the script's output", SECOND * 5, || {
        let l = std::fs::read_to_string(&log_path).unwrap_or_default();
        l.contains("mesh-ca").then_some(l)
    });
    assert!(
        log.contains(&format!(
            "CNI_BIN_DIR={}",
            env.root.join("opt/cni/bin").display()
        )),
        "{log}"
    );
    assert!(log.contains("ROOT=ROOT"), "{log}");
    assert!(log.contains("KEY=KEY"), "{log}");
    assert!(
        !log.contains("TOKEN_LEN=0") && log.contains("TOKEN_LEN="),
        "{log}"
    );
    assert!(log.contains("INJECTED=yes"), "{log}");
    assert!(log.contains("NODE=node1"), "{log}");
    assert!(log.contains(&format!("IP={}", info.ip.unwrap())), "{log}");
    assert!(log.contains("10.9.9.9\tmesh-ca.istio-system.svc"), "{log}");
    // The host's own /etc/hosts is untouched.
    assert!(
        !std::fs::read_to_string("/etc/hosts")
            .unwrap()
            .contains("10.9.9.9")
    );
    // The token is pod-bound and for istio-ca: TokenReview says so.
    let tok_path = env
        .root
        .join("var/lib/kubelet/pods")
        .join(&info.uid)
        .join("volumes/tok/istio-token");
    let token = std::fs::read_to_string(tok_path).unwrap();
    let claims = env.api.signer().verify(&token).unwrap();
    assert_eq!(
        e2e::apiserver::tokens::audiences(&claims),
        vec!["istio-ca".to_string()]
    );
    assert!(claims.to_string().contains(&info.uid), "{claims}");

    // ConfigMap volumes follow their object (the kubelet's periodic sync); a
    // file whose content did not change is not rewritten (watchers see nothing).
    let vol = env
        .root
        .join("var/lib/kubelet/pods")
        .join(&info.uid)
        .join("volumes");
    let key_file = vol.join("certs/key.pem");
    let key_before = std::fs::metadata(&key_file).unwrap();
    env.api
        .merge_patch(
            "v1",
            "ConfigMap",
            Some("t"),
            "cm",
            &json!({"data": {"root-cert.pem": "ROOT2"}}),
            false,
        )
        .unwrap();
    wait(
        "the ConfigMap volume to follow its object",
        SECOND * 10,
        || (std::fs::read_to_string(vol.join("root/root-cert.pem")).ok()? == "ROOT2").then_some(()),
    );
    let key_after = std::fs::metadata(&key_file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (key_before.ino(), key_before.mtime_nsec()),
        (key_after.ino(), key_after.mtime_nsec()),
        "an unchanged Secret file was rewritten"
    );
}
