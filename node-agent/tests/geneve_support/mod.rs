//! Test topology for GENEVE redirection: a simulated node namespace, a
//! ztunnel pod namespace attached point-to-point (as kindnet/ptp do), two
//! application pods on a bridge, and a "remote" namespace standing for
//! another node on the underlay. Built with `ip` (test fixture only) and
//! removed on drop.
//!
//! ```text
//!   remote 172.30.<n>.2 ──veth── 172.30.<n>.1  NODE  10.244.1.1/32 ──veth── 10.244.1.5 ztunnel (eth0)
//!                                               │
//!                                             bridge 10.244.1.129/25 ── pod-a .130/32, pod-b .131/32
//! ```

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use node_agent::redirect::netns::Netns;

pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const ZT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
pub const ZT_IP2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 130);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 131);

/// Runs `ip <args>` (optionally inside netns `ns`), panicking with its
/// stderr on failure.
pub fn ip(ns: Option<&str>, args: &str) {
    let out = run_ip(ns, args);
    assert!(
        out.status.success(),
        "ip {args} (netns {ns:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `commands` with one `ip -batch -` (optionally inside netns `ns`).
pub fn ip_batch(ns: Option<&str>, commands: Vec<String>) {
    use std::io::Write;
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ip -batch");
    let text = commands.join("\n") + "\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip -batch (netns {ns:?}) failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run_ip(ns: Option<&str>, args: &str) -> std::process::Output {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args.split_whitespace());
    cmd.output().expect("run ip")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `None` when this kernel can create GENEVE devices; else why not. Also
/// installs a log subscriber when `RUST_LOG` is set.
pub fn geneve_missing() -> Option<String> {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    static CHECK: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let missing = CHECK.get_or_init(check_geneve).clone();
    if let Some(why) = &missing
        && std::env::var_os("GENEVE_TESTS_REQUIRED").is_some_and(|v| v == "1")
    {
        panic!("GENEVE_TESTS_REQUIRED=1 but {why}");
    }
    missing
}

fn check_geneve() -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    let ns = format!("gvchk{}", std::process::id());
    ip(None, &format!("netns add {ns}"));
    let out = run_ip(
        Some(&ns),
        "link add gvchk type geneve id 1 remote 192.0.2.1",
    );
    let _ = run_ip(None, &format!("netns del {ns}"));
    (!out.status.success()).then(|| {
        format!(
            "this kernel cannot create GENEVE devices ({}); run scripts/vm-tests.sh",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// The simulated node; everything is deleted on drop.
pub struct Topo {
    pub prefix: String,
    pub node: String,
    pub zt: String,
    pub pod_a: String,
    pub pod_b: String,
    pub remote: String,
    /// Node side of the ztunnel veth.
    pub zt_veth: String,
    pub remote_ip: Ipv4Addr,
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in [&self.node, &self.zt, &self.pod_a, &self.pod_b, &self.remote] {
            let _ = run_ip(None, &format!("netns del {ns}"));
        }
    }
}

impl Topo {
    /// `tag`: a short unique name for the test (≤ 4 characters).
    pub fn new(tag: &str) -> Self {
        let prefix = format!("gv{tag}{}", std::process::id() % 10000);
        let n = (std::process::id() % 200) as u8 + 10;
        let t = Topo {
            node: format!("{prefix}-node"),
            zt: format!("{prefix}-zt"),
            pod_a: format!("{prefix}-pa"),
            pod_b: format!("{prefix}-pb"),
            remote: format!("{prefix}-rem"),
            zt_veth: format!("{prefix}z"),
            remote_ip: Ipv4Addr::new(172, 30, n, 2),
            prefix,
        };
        let all = [&t.node, &t.zt, &t.pod_a, &t.pod_b, &t.remote];
        ip_batch(
            None,
            all.iter().map(|ns| format!("netns add {ns}")).collect(),
        );
        sysctl(&t.node, "net.ipv4.ip_forward", "1");
        sysctl(&t.node, "net.ipv4.conf.all.send_redirects", "0");
        sysctl(&t.node, "net.ipv4.conf.default.send_redirects", "0");
        let br = format!("{}br", t.prefix);
        let up = format!("{}u", t.prefix);
        let mut node = vec![
            "link set lo up".to_string(),
            // ztunnel pod: point-to-point veth, /32 route on the node
            format!(
                "link add {} type veth peer name eth0 netns {}",
                t.zt_veth, t.zt
            ),
            format!("addr add {HOST_IP}/32 dev {}", t.zt_veth),
            format!("link set {} up", t.zt_veth),
            format!("route add {ZT_IP}/32 dev {} scope link", t.zt_veth),
            // application pods on a bridge
            format!("link add {br} type bridge"),
            format!("addr add 10.244.1.129/25 dev {br}"),
            format!("link set {br} up"),
            // another node on the underlay
            format!("link add {up} type veth peer name eth0 netns {}", t.remote),
            format!("addr add 172.30.{n}.1/24 dev {up}"),
            format!("link set {up} up"),
        ];
        for (ns, i) in [(&t.pod_a, 'a'), (&t.pod_b, 'b')] {
            let host_side = format!("{}{i}", t.prefix);
            node.push(format!(
                "link add {host_side} type veth peer name eth0 netns {ns}"
            ));
            node.push(format!("link set {host_side} master {br} up"));
        }
        ip_batch(Some(&t.node), node);
        ip_batch(
            Some(&t.zt),
            vec![
                "link set lo up".into(),
                format!("addr add {ZT_IP}/32 dev eth0"),
                "link set eth0 up".into(),
                format!("route add {HOST_IP}/32 dev eth0 scope link"),
                format!("route add default via {HOST_IP} dev eth0"),
            ],
        );
        for (ns, addr) in [(&t.pod_a, POD_A), (&t.pod_b, POD_B)] {
            // /32 address and an on-link gateway: pod-to-pod traffic on the
            // same node is routed by the node (as with kindnet/ptp), never
            // bridged directly, so the node's rules see it.
            ip_batch(
                Some(ns),
                vec![
                    "link set lo up".into(),
                    format!("addr add {addr}/32 dev eth0"),
                    "link set eth0 up".into(),
                    "route add 10.244.1.129/32 dev eth0 scope link".into(),
                    "route add default via 10.244.1.129 dev eth0".into(),
                ],
            );
        }
        ip_batch(
            Some(&t.remote),
            vec![
                "link set lo up".into(),
                format!("addr add {}/24 dev eth0", t.remote_ip),
                "link set eth0 up".into(),
                format!("route add default via 172.30.{n}.1"),
            ],
        );
        t
    }

    pub fn path(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }

    pub fn netns(name: &str) -> Netns {
        Netns::open(Self::path(name)).expect("open test netns")
    }

    /// Moves the ztunnel pod to `new_ip` (as a restarted pod would get).
    pub fn readdress_ztunnel(&self, old: Ipv4Addr, new_ip: Ipv4Addr) {
        let zt = Some(self.zt.as_str());
        ip(zt, &format!("addr add {new_ip}/32 dev eth0"));
        ip(zt, &format!("addr del {old}/32 dev eth0"));
        ip(
            zt,
            &format!("route replace default via {HOST_IP} dev eth0 src {new_ip}"),
        );
        let node = Some(self.node.as_str());
        ip(node, &format!("route del {old}/32 dev {}", self.zt_veth));
        ip(
            node,
            &format!("route add {new_ip}/32 dev {} scope link", self.zt_veth),
        );
    }
}

pub fn sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    Topo::netns(ns)
        .run(move || std::fs::write(&path, value))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("sysctl {key}={value} in {ns}: {e}"));
}

/// A TCP listener bound in netns `ns`; with `transparent`, IP_TRANSPARENT
/// (what ztunnel's TPROXY listeners use).
pub fn listen(ns: &str, addr: SocketAddr, transparent: bool) -> TcpListener {
    Topo::netns(ns)
        .run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            if transparent {
                s.set_ip_transparent_v4(true)?;
            }
            s.bind(&addr.into())?;
            s.listen(64)?;
            s.set_nonblocking(false)?;
            Ok::<_, std::io::Error>(TcpListener::from(s))
        })
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("listen on {addr} in {ns}: {e}"))
}

/// Connects from netns `ns` to `dst` (optionally from `src`), sends `msg`.
pub fn connect(ns: &str, dst: SocketAddr, msg: &'static [u8]) -> std::io::Result<TcpStream> {
    Topo::netns(ns)
        .run(move || {
            use std::io::Write;
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
            s.write_all(msg)?;
            Ok(s)
        })
        .expect("enter netns")
}

/// What a listener saw: (local address, peer address, first bytes).
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub data: Vec<u8>,
}

/// Accepts one connection within `timeout`.
pub fn accept_one(l: &TcpListener, timeout: Duration) -> Option<Seen> {
    use std::io::Read;
    l.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                return Some(Seen {
                    local: s.local_addr().unwrap(),
                    peer,
                    data: buf[..n].to_vec(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}
