//! Test scaffolding: a minimal CNI runtime (runs a conflist chain the way
//! libcni does, inside a throw-away "node" netns so the root netns is never
//! touched), named netns guards, a fake Kubernetes API, a fake agent.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_istio-cni");
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// No plugin run may take longer than this.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A short unique name (interface names are limited to 15 bytes).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Why netns tests cannot run here, if they cannot.
pub fn netns_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for p in ["bridge", "host-local"] {
        if !Path::new(REFERENCE_PLUGINS).join(p).exists() {
            return Some(format!(
                "{REFERENCE_PLUGINS}/{p} missing (containernetworking-plugins)"
            ));
        }
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 missing".into());
    }
    None
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>` output.
    pub fn ip_output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The outcome of one plugin run.
#[derive(Debug)]
pub struct PluginRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl PluginRun {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts a spec error with `code`; returns the error JSON.
    pub fn expect_error(&self, code: u64) -> Value {
        assert!(
            !self.success,
            "expected failure, got success: {}",
            self.stdout
        );
        let v = self.json();
        assert_eq!(v["code"], code, "error: {v}\nstderr: {}", self.stderr);
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v
    }
}

/// How stdin is given.
pub enum Stdin<'a> {
    Json(&'a Value),
    Raw(&'a [u8]),
    /// `/dev/null`: no config at all.
    Null,
}

/// Runs `bin` with exactly `env` (plus PATH), optionally inside `netns`.
pub fn run_plugin(
    bin: &str,
    env: &[(&str, String)],
    stdin: Stdin<'_>,
    netns: Option<&NamedNetns>,
) -> PluginRun {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(match stdin {
        Stdin::Null => Stdio::null(),
        _ => Stdio::piped(),
    });
    let ns_file = netns.map(|n| File::open(n.path()).expect("open node netns"));
    if let Some(f) = &ns_file {
        let fd = f.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    if let Some(mut w) = child.stdin.take() {
        let bytes = match stdin {
            Stdin::Json(v) => serde_json::to_vec(v).unwrap(),
            Stdin::Raw(b) => b.to_vec(),
            Stdin::Null => Vec::new(),
        };
        let _ = w.write_all(&bytes);
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{bin} hung for more than {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let elapsed = start.elapsed();
    PluginRun {
        success: status.success(),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
        elapsed,
    }
}

/// The variables a runtime sets.
pub fn cni_env(
    command: &str,
    container: &str,
    netns: &str,
    args: &str,
) -> Vec<(&'static str, String)> {
    let plugin_dir = Path::new(PLUGIN).parent().unwrap().display().to_string();
    vec![
        ("CNI_COMMAND", command.into()),
        ("CNI_CONTAINERID", container.into()),
        ("CNI_NETNS", netns.into()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_ARGS", args.into()),
        ("CNI_PATH", format!("{REFERENCE_PLUGINS}:{plugin_dir}")),
    ]
}

/// `K8S_POD_*` arguments as kubelet's runtimes pass them.
pub fn k8s_args(namespace: &str, name: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=infra;K8S_POD_UID={uid}"
    )
}

/// A node: its netns, a bridge name and host-local state in a temp dir.
pub struct Node {
    pub netns: NamedNetns,
    pub bridge: String,
    pub ipam_dir: tempfile::TempDir,
    pub subnet: String,
}

impl Node {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst) % 250;
        Self {
            netns: NamedNetns::new("icn-node"),
            bridge: unique("icb"),
            ipam_dir: tempfile::tempdir().unwrap(),
            subnet: format!("10.{}.{}.0/24", 200 + (std::process::id() % 50), n),
        }
    }

    /// The conflist our node agent would produce: bridge + host-local, then
    /// istio-cni (`istio` is merged into the entry).
    pub fn conflist(&self, version: &str, istio: Value) -> Value {
        let mut entry =
            json!({"type": "istio-cni", "name": "istio-cni", "plugin_log_level": "debug"});
        for (k, v) in istio.as_object().unwrap() {
            entry[k] = v.clone();
        }
        json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": true,
                 "ipam": {"type": "host-local", "subnet": self.subnet,
                          "dataDir": self.ipam_dir.path(), "routes": [{"dst": "0.0.0.0/0"}]}},
                entry
            ]
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The bridge lives in the node netns and goes with it.
    }
}

/// What a runtime does with a conflist (libcni semantics).
pub struct Runtime<'a> {
    pub node: &'a Node,
    pub conflist: Value,
}

/// A failed chain step.
#[derive(Debug)]
pub struct StepFailure {
    pub plugin: String,
    pub run: PluginRun,
}

impl Runtime<'_> {
    fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        conf
    }

    fn binary(plugin: &Value) -> String {
        let t = plugin["type"].as_str().unwrap();
        if t == "istio-cni" {
            PLUGIN.to_string()
        } else {
            format!("{REFERENCE_PLUGINS}/{t}")
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().unwrap().clone()
    }

    /// ADD through the chain; on failure, DEL what was added (as runtimes
    /// do) and return the failing step. Ok: (final result, runs).
    pub fn add(
        &self,
        container: &str,
        pod: &NamedNetns,
        args: &str,
    ) -> Result<(Value, Vec<PluginRun>), StepFailure> {
        let env = cni_env("ADD", container, &pod.path().display().to_string(), args);
        let mut prev: Option<Value> = None;
        let mut runs = Vec::new();
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, prev.as_ref());
            let run = run_plugin(
                &Self::binary(&plugin),
                &env,
                Stdin::Json(&conf),
                Some(&self.node.netns),
            );
            if !run.success {
                let _ = self.del(container, pod, args, prev.as_ref());
                return Err(StepFailure {
                    plugin: plugin["type"].as_str().unwrap().into(),
                    run,
                });
            }
            prev = Some(run.json());
            runs.push(run);
        }
        Ok((prev.unwrap(), runs))
    }

    pub fn check(
        &self,
        container: &str,
        pod: &NamedNetns,
        args: &str,
        result: &Value,
    ) -> Result<(), StepFailure> {
        let env = cni_env("CHECK", container, &pod.path().display().to_string(), args);
        for plugin in self.plugins() {
            let conf = self.plugin_conf(&plugin, Some(result));
            let run = run_plugin(
                &Self::binary(&plugin),
                &env,
                Stdin::Json(&conf),
                Some(&self.node.netns),
            );
            if !run.success {
                return Err(StepFailure {
                    plugin: plugin["type"].as_str().unwrap().into(),
                    run,
                });
            }
            assert_eq!(run.stdout.trim(), "", "CHECK prints nothing on success");
        }
        Ok(())
    }

    /// DEL in reverse order.
    pub fn del(
        &self,
        container: &str,
        pod: &NamedNetns,
        args: &str,
        result: Option<&Value>,
    ) -> Result<(), StepFailure> {
        let env = cni_env("DEL", container, &pod.path().display().to_string(), args);
        for plugin in self.plugins().iter().rev() {
            let conf = self.plugin_conf(plugin, result);
            let run = run_plugin(
                &Self::binary(plugin),
                &env,
                Stdin::Json(&conf),
                Some(&self.node.netns),
            );
            if !run.success {
                return Err(StepFailure {
                    plugin: plugin["type"].as_str().unwrap().into(),
                    run,
                });
            }
        }
        Ok(())
    }
}

/// A fake Kubernetes API serving fixed objects by path, listening on
/// 127.0.0.1 inside `netns` (where the plugin runs).
pub struct FakeApi {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    pub fn start_in(netns: &NamedNetns, objects: HashMap<String, Value>) -> Self {
        let ns_file = File::open(netns.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        // This thread enters the node netns and serves from there; it is
        // never used for anything else.
        std::thread::spawn(move || {
            // SAFETY: plain syscall on an fd we own.
            assert_eq!(
                unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let objects = Arc::new(objects);
            for stream in listener.incoming().flatten() {
                let objects = objects.clone();
                let reqs = reqs.clone();
                std::thread::spawn(move || serve_one(stream, &objects, &reqs));
            }
        });
        Self {
            addr: rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            requests,
        }
    }

    /// A kubeconfig for this server (what an admin would have; the node
    /// agent turns it into the plugin's).
    pub fn write_kubeconfig(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 clusters: [{{name: fake, cluster: {{server: 'http://{}'}}}}]\n\
                 users: [{{name: fake, user: {{token: fake-token}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
                self.addr
            ),
        )
        .unwrap();
    }
}

fn serve_one(
    stream: std::net::TcpStream,
    objects: &HashMap<String, Value>,
    reqs: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('?')
        .next()
        .unwrap_or("")
        .to_string();
    reqs.lock().unwrap().push(path.clone());
    let (status, body) = match objects.get(&path) {
        Some(v) => ("200 OK", v.to_string()),
        None => (
            "404 Not Found",
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                   "message": format!("{path} not found")})
            .to_string(),
        ),
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

pub fn pod_object(namespace: &str, name: &str, labels: Value, host_network: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "labels": labels},
           "spec": {"hostNetwork": host_network, "containers": [{"name": "app", "image": "app"}]}})
}

pub fn namespace_object(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}
