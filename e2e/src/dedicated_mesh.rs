//! A mesh of pods on one simulated node, each with its own ztunnel process in dedicated
//! mode (the real binary, configured by environment as the chart does), all reading one
//! `LOCAL_XDS_PATH` file that the test writes and rewrites (ztunnel reloads it on change).
//!
//! ```no_run
//! use e2e::dedicated_mesh::{DedicatedMesh, EchoServer, workload_entry};
//! let mut mesh = DedicatedMesh::new("mytest")?;
//! mesh.add_pod("client", "x", "client")?;
//! mesh.add_pod("server", "default", "server")?;
//! let yaml = format!(
//!     "workloads:\n{}{}",
//!     workload_entry(mesh.pod("client"), "HBONE", "{}", ""),
//!     workload_entry(mesh.pod("server"), "HBONE", "{}", ""),
//! );
//! mesh.write_config(&yaml);
//! mesh.start_ztunnel("client");
//! mesh.start_ztunnel("server");
//! let _srv = EchoServer::start(mesh.pod("server").netns(), 8080, None);
//! // ... connect from the client pod (captured by its ztunnel) ...
//! mesh.shutdown();
//! # Ok::<(), e2e::netsim::NetsimError>(())
//! ```
//!
//! A pod gets the in-pod capture rules (the node agent's generator and applier: outbound
//! TCP → 15001 except ztunnel's marked sockets, inbound TCP except 15008 → 15006) only when
//! its ztunnel is started; pods without a ztunnel are plain (out of the mesh) workloads.
//! Identities: `spiffe://cluster.local/ns/<namespace>/sa/<service account>`, certificates
//! from the test CA in `ztunnel/testdata/ca` (`ec-root.*`).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use node_agent::redirect::inpod::apply::apply_pod_here;
use node_agent::redirect::inpod::{PodNetConfig, PodRuleOptions, RuleConfig};
use node_agent::redirect::iptables::detect_backend;

use crate::bin_path;
use crate::netsim::{Cluster, NamedNetns, Node, Pod, Process, Result};

/// The trust domain every mesh pod uses.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A file of the test CA (`ec-root.pem`, `ec-root.key`, ...).
pub fn ca_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ztunnel/testdata/ca")
        .join(name)
}

/// One pod and (once started) its ztunnel.
pub struct MeshPod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    ztunnel: Option<Process>,
    /// The running ztunnel is Istio's (its logs and shutdown differ from ours).
    istio: bool,
    log: PathBuf,
    pod: Pod,
}

/// Which ztunnel a pod runs ([`DedicatedMesh::start_ztunnel_as`]).
#[derive(Debug, Clone, Copy)]
pub enum Flavor<'a> {
    /// This project's ztunnel, certificates from the test CA (`ec-root.*`).
    Ours,
    /// This project's ztunnel, certificates issued by another root (certificate, key).
    OursWithCa { cert: &'a Path, key: &'a Path },
    /// This project's ztunnel, certificates from the test CA, workloads and policies from
    /// istiod's xDS at `address` (`XDS_ADDRESS`; TLS verified against `istiod_root`,
    /// bearer token from the file `token`) instead of the local config file;
    /// `on_demand`: `XDS_ON_DEMAND=true` (and the DNS proxy off, which that requires).
    OursFromXds {
        address: &'a str,
        istiod_root: &'a Path,
        token: &'a Path,
        on_demand: bool,
    },
    /// Istio's own ztunnel, built with `--features testing` (`make istio-ztunnel`): same
    /// config file and capture rules, certificates from its built-in test CA (`FAKE_CA`),
    /// sockets marked 0x539 (`PACKET_MARK=1337`) like ours.
    Istio { binary: &'a Path },
}

impl MeshPod {
    pub fn netns(&self) -> &NamedNetns {
        self.pod.netns()
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip()
    }

    /// `spiffe://cluster.local/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// The workload uid used by [`workload_entry`].
    pub fn uid(&self) -> String {
        format!("Kubernetes//v1/Pod/{}/{}", self.namespace, self.name)
    }

    pub fn has_ztunnel(&self) -> bool {
        self.ztunnel.is_some()
    }

    /// Everything the pod's ztunnel printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines containing every needle.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// A TCP connection from inside the pod to `dst` (captured when the pod has a ztunnel).
    pub fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        connect_in(self.netns(), dst)
    }

    /// `GET path` on the pod's `127.0.0.1:port`: (status, body).
    pub fn http_get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        http_get(self.netns(), port, path)
    }

    /// `POST path` (no body) on the pod's `127.0.0.1:port`: (status, body).
    pub fn http_post(&self, port: u16, path: &str) -> Option<(u16, String)> {
        http_request(self.netns(), "POST", port, path)
    }

    /// The ztunnel's `/metrics` (15020); panics when unreachable.
    pub fn metrics(&self) -> String {
        match self.http_get(15020, "/metrics") {
            Some((200, body)) => body,
            other => panic!("pod {}: GET /metrics: {other:?}", self.name),
        }
    }

    /// A ztunnel admin document (15000), e.g. `/config_dump`; panics when unreachable.
    pub fn admin(&self, path: &str) -> String {
        match self.http_get(15000, path) {
            Some((200, body)) => body,
            other => panic!("pod {}: GET {path}: {other:?}", self.name),
        }
    }
}

/// Pods with dedicated ztunnels on one simulated node.
pub struct DedicatedMesh {
    // Dropped before the cluster: processes end before their namespaces go.
    pods: Vec<MeshPod>,
    config: PathBuf,
    /// DNS capture rules and this resolv.conf for ztunnels started from now on.
    dns: Option<PathBuf>,
    /// Extra environment of ztunnels started from now on.
    env: Vec<(String, String)>,
    cluster: Cluster,
}

impl DedicatedMesh {
    /// A one-node cluster (scope tag `tag`) with an empty local config file.
    pub fn new(tag: &str) -> Result<Self> {
        let cluster = Cluster::new(tag, 1)?;
        let config = cluster.scope().dir().join("local-config.yaml");
        std::fs::write(&config, "").map_err(|source| crate::netsim::NetsimError::Io {
            netns: "-".into(),
            action: format!("write {}", config.display()),
            source,
        })?;
        Ok(DedicatedMesh {
            pods: Vec::new(),
            config,
            dns: None,
            env: Vec::new(),
            cluster,
        })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn node(&self) -> &Node {
        self.cluster.node(1)
    }

    /// Adds a pod (netns, address, route; no capture, no ztunnel yet).
    pub fn add_pod(&mut self, name: &str, namespace: &str, service_account: &str) -> Result<()> {
        let pod = self.cluster.node(1).add_pod(name)?;
        let log = self
            .cluster
            .scope()
            .dir()
            .join(format!("ztunnel-{name}.log"));
        self.pods.push(MeshPod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            ztunnel: None,
            istio: false,
            log,
            pod,
        });
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &MeshPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the mesh"))
    }

    pub fn pods(&self) -> &[MeshPod] {
        &self.pods
    }

    /// ztunnels started from now on also get the DNS capture rules (port 53 → 15053),
    /// and their DNS proxy forwards to the servers of `resolv_conf` (`DNS_RESOLV_CONF`).
    pub fn capture_dns(&mut self, resolv_conf: &Path) {
        self.dns = Some(resolv_conf.to_path_buf());
    }

    /// ztunnels started from now on also get `name=value` in their environment.
    pub fn set_ztunnel_env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_string(), value.to_string()));
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Replaces the local config (written aside and renamed, so a reader never sees half a
    /// file).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.config.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write local config");
        std::fs::rename(&tmp, &self.config).expect("rename local config into place");
    }

    /// Rewrites the config and waits until every running ztunnel logged one more reload.
    pub fn update_config(&self, yaml: &str) {
        let before: Vec<usize> = self.pods.iter().map(reloads).collect();
        self.write_config(yaml);
        for (p, n) in self.pods.iter().zip(before) {
            if p.has_ztunnel() {
                wait_until(
                    &format!("ztunnel of {} to reload the config", p.name),
                    Duration::from_secs(10),
                    || reloads(p) > n,
                );
            }
        }
    }

    /// Applies the capture rules in pod `name` and starts its ztunnel; returns once it
    /// reports ready (certificate issued).
    pub fn start_ztunnel(&mut self, name: &str) {
        self.start_ztunnel_as(name, Flavor::Ours);
    }

    /// [`Self::start_ztunnel`] with the ztunnel of `flavor`.
    pub fn start_ztunnel_as(&mut self, name: &str, flavor: Flavor) {
        let config = self.config.clone();
        let node = self.cluster.node(1).name().to_string();
        let p = self
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the mesh"));
        assert!(p.ztunnel.is_none(), "ztunnel of {name} already started");
        let opts = PodRuleOptions {
            dns_capture: self.dns.is_some(),
            ..PodRuleOptions::default()
        };
        apply_capture_rules_with(&p.pod, &opts).expect("capture rules");
        let binary = match flavor {
            Flavor::Istio { binary } => binary.to_path_buf(),
            Flavor::Ours | Flavor::OursWithCa { .. } | Flavor::OursFromXds { .. } => {
                bin_path("ztunnel")
            }
        };
        let mut cmd = p.netns().command(binary);
        if let Some(resolv_conf) = &self.dns {
            cmd.env("DNS_RESOLV_CONF", resolv_conf);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        match flavor {
            Flavor::Ours => {
                cmd.env("CA_ROOT_CERT", ca_file("ec-root.pem"))
                    .env("CA_ROOT_KEY", ca_file("ec-root.key"));
            }
            Flavor::OursWithCa { cert, key } => {
                cmd.env("CA_ROOT_CERT", cert).env("CA_ROOT_KEY", key);
            }
            Flavor::OursFromXds {
                address,
                istiod_root,
                token,
                on_demand,
            } => {
                cmd.env("CA_ROOT_CERT", ca_file("ec-root.pem"))
                    .env("CA_ROOT_KEY", ca_file("ec-root.key"))
                    .env("XDS_ADDRESS", address)
                    .env("ROOT_CA_PATH", istiod_root)
                    .env("CA_TOKEN_PATH", token);
                if on_demand {
                    cmd.env("XDS_ON_DEMAND", "true")
                        .env("ISTIO_META_DNS_CAPTURE", "false");
                }
            }
            Flavor::Istio { .. } => {
                cmd.envs(crate::istio_ztunnel::FAKE_CA_ENV);
            }
        }
        // The config file, unless the test passes the config inline (`LOCAL_XDS`).
        let inline = self.env.iter().any(|(k, _)| k == "LOCAL_XDS");
        if !matches!(flavor, Flavor::OursFromXds { .. }) && !inline {
            cmd.env("LOCAL_XDS_PATH", &config);
        }
        p.istio = matches!(flavor, Flavor::Istio { .. });
        cmd.arg("proxy")
            .env("PROXY_MODE", "dedicated")
            .env(
                "PROXY_WORKLOAD_INFO",
                format!("{}/{}/{}", p.namespace, p.name, p.service_account),
            )
            .env("TRUST_DOMAIN", TRUST_DOMAIN)
            .env("NODE_NAME", &node)
            .env("TERMINATION_GRACE_PERIOD_SECONDS", "3")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            // A fresh log per start; both streams appended (ztunnel logs on stdout, fatal
            // errors on stderr) so neither overwrites the other.
            .stdout({
                std::fs::File::create(&p.log).expect("create ztunnel log");
                std::fs::File::options()
                    .append(true)
                    .open(&p.log)
                    .expect("open ztunnel log")
            })
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&p.log)
                    .expect("open ztunnel log"),
            );
        p.ztunnel = Some(Process::spawn(cmd).expect("spawn ztunnel"));
        let p = self.pod(name);
        wait_until(
            &format!("ztunnel of {name} ready"),
            Duration::from_secs(15),
            || matches!(p.http_get(15021, "/healthz/ready"), Some((200, _))),
        );
    }

    /// Takes the ztunnel process of pod `name` out of the mesh, for a test that signals and
    /// waits for it itself ([`Self::shutdown`] then skips the pod).
    pub fn take_ztunnel(&mut self, name: &str) -> Option<Process> {
        self.pods
            .iter_mut()
            .find(|p| p.name == name)
            .and_then(|p| p.ztunnel.take())
    }

    /// SIGTERM to every ztunnel; each must drain and exit 0.
    pub fn shutdown(mut self) {
        for p in &mut self.pods {
            let Some(z) = p.ztunnel.as_mut() else {
                continue;
            };
            z.signal(nix::sys::signal::Signal::SIGTERM)
                .expect("signal ztunnel");
            let status = z
                .wait_timeout(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("ztunnel of {} did not exit after SIGTERM", p.name));
            let log = p.log();
            assert!(status.success(), "ztunnel of {}: {status}\n{log}", p.name);
            if !p.istio {
                assert!(log.contains("drained; exiting"), "{log}");
            }
        }
    }
}

fn reloads(p: &MeshPod) -> usize {
    p.log().matches("local config reloaded").count()
}

/// A YAML list item (local-config `workloads`) for `p`: uid, name, namespace, service
/// account, trust domain, IP, `protocol`, node `node1`, `services` (a YAML flow map such as
/// `{"ns/echo.ns.svc.cluster.local": {80: 8080}}`) and `extra` lines (already indented by
/// two spaces, e.g. `"  waypoint: {destination: \"/10.0.0.9\"}\n"`).
pub fn workload_entry(p: &MeshPod, protocol: &str, services: &str, extra: &str) -> String {
    format!(
        "- uid: {uid}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  \
         trustDomain: {TRUST_DOMAIN}\n  workloadIps: [\"{ip}\"]\n  protocol: {protocol}\n  \
         node: node1\n  services: {services}\n{extra}",
        uid = p.uid(),
        name = p.name,
        ns = p.namespace,
        sa = p.service_account,
        ip = p.ip(),
    )
}

/// Applies the in-pod capture rules (the node agent's generator and applier) in `pod`;
/// dedicated mode uses the same rules. The error names the pod's netns.
pub fn apply_capture_rules(pod: &Pod) -> Result<(), String> {
    apply_capture_rules_with(pod, &PodRuleOptions::default())
}

/// [`apply_capture_rules`] with the variant `opts` (DNS capture, inbound bypass, ...).
pub fn apply_capture_rules_with(pod: &Pod, opts: &PodRuleOptions) -> Result<(), String> {
    let opts = opts.clone();
    let cfg = PodNetConfig {
        engine: detect_backend().into(),
        ipv6: false,
        rules: RuleConfig::default(),
    };
    let label = pod.netns().path().to_path_buf();
    let ns = label.display().to_string();
    pod.netns()
        .run(move || apply_pod_here(&cfg, &opts, &label).map_err(|e| e.to_string()))
        .map_err(|e| format!("entering {ns}: {e}"))?
        .map_err(|e| format!("capture rules in {ns}: {e}"))
}

/// `GET path` on `127.0.0.1:port` inside `ns`: (status, body).
pub fn http_get(ns: &NamedNetns, port: u16, path: &str) -> Option<(u16, String)> {
    http_request(ns, "GET", port, path)
}

/// `method path` (no body) on `127.0.0.1:port` inside `ns`: (status, body).
pub fn http_request(ns: &NamedNetns, method: &str, port: u16, path: &str) -> Option<(u16, String)> {
    http_request_bytes(ns, method, port, path)
        .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
}

/// [`http_request`] with the body as bytes (binary answers, e.g. a pprof profile);
/// waits up to 15 s of silence for the answer.
pub fn http_request_bytes(
    ns: &NamedNetns,
    method: &str,
    port: u16,
    path: &str,
) -> Option<(u16, Vec<u8>)> {
    let mut s = ns
        .run(move || {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(1),
            )
        })
        .ok()?
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&resp[..head_end.unwrap_or(resp.len())]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let body = head_end.map(|i| resp[i + 4..].to_vec()).unwrap_or_default();
    Some((status, body))
}

/// Polls `f` every 50 ms until it holds; panics after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A TCP server in a pod netns that (optionally) first sends a greeting line, then echoes
/// everything back until the client's EOF. Stops accepting when dropped; connections in
/// progress finish on their own threads.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `0.0.0.0:port` inside `ns`. `greeting`: sent (with `\n`) on accept.
    pub fn start(ns: &NamedNetns, port: u16, greeting: Option<&str>) -> Self {
        let listener = ns
            .run(move || TcpListener::bind(("0.0.0.0", port)))
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("bind echo server on port {port}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let greeting = greeting.map(|g| format!("{g}\n"));
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            let peers = peers.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, peer)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            peers.lock().unwrap().push(peer);
                            let greeting = greeting.clone();
                            std::thread::spawn(move || {
                                let _ = s.set_nonblocking(false);
                                if let Some(g) = greeting
                                    && s.write_all(g.as_bytes()).is_err()
                                {
                                    return;
                                }
                                let Ok(mut r) = s.try_clone() else { return };
                                let _ = io::copy(&mut r, &mut s);
                                let _ = s.shutdown(std::net::Shutdown::Write);
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        EchoServer {
            stop,
            accepted,
            peers,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The source address of every connection accepted so far (what the app sees).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP connection from inside `ns` to `dst` (5 s to connect, reads time out after 30 s).
pub fn connect_in(ns: &NamedNetns, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = ns
        .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .map_err(io::Error::other)??;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// [`echo`] of `len` patterned bytes; an error unless all of them come back unchanged.
pub fn echo_checked(s: TcpStream, len: usize) -> io::Result<()> {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let back = echo(s, &data)?;
    if back != data {
        return Err(io::Error::other(format!(
            "{} of {len} bytes came back, altered or cut",
            back.len()
        )));
    }
    Ok(())
}

/// Sends `data`, half-closes, and reads everything that comes back until EOF.
pub fn echo(mut s: TcpStream, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut w = s.try_clone()?;
    let out = data.to_vec();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        w.write_all(&out)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::new();
    let read = s.read_to_end(&mut back);
    let written = writer.join().expect("writer thread");
    read?;
    written?;
    Ok(back)
}

/// Reads one `\n`-terminated line (without it), byte by byte so nothing after it is
/// consumed.
pub fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&line)),
                ));
            }
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(b[0]),
        }
    }
}
