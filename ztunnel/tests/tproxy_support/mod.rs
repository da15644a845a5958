//! Shared by the TPROXY-mode tests (`tproxy_netns.rs`, `tproxy_node_certs.rs`): named
//! network namespaces wired like a node (pods' veths ending in a "ztunnel pod" netns with
//! the TPROXY rules, marks and local route the node agent installs there), the node proxy
//! on a thread inside such a namespace, and blocking clients and servers in pod namespaces.
//!
//! Needs root (network namespaces, TPROXY); tests check [`is_root`] first.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use node_agent::redirect::netns::Netns;
use ztunnel::proxy::{ProxyFactory, ProxyInputs, ProxyScope, ProxySpec};
use ztunnel::redirect::tproxy::TproxySocketFactory;

/// Whether the test can run; prints why it is skipped when not.
pub fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: needs root (network namespaces, TPROXY)");
    }
    root
}

/// `ip -n <ns> <args>`; panics with ip's stderr when it fails.
pub fn ip(ns: &str, args: &str) {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Named namespaces `<prefix><pid>-<role>` with `lo` up, deleted on drop.
pub struct Namespaces {
    names: Vec<String>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

impl Namespaces {
    pub fn new(prefix: &str, roles: &[&str]) -> Self {
        let p = format!("{prefix}{}", std::process::id());
        let t = Namespaces {
            names: roles.iter().map(|n| format!("{p}-{n}")).collect(),
        };
        for n in &t.names {
            let out = Command::new("ip")
                .args(["netns", "add", n])
                .output()
                .unwrap();
            assert!(out.status.success(), "ip netns add {n}");
            ip(n, "link set lo up");
        }
        t
    }

    /// The name of the `i`th namespace (in the order of `roles`).
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The `i`th namespace, opened.
    pub fn ns(&self, i: usize) -> Netns {
        Netns::open(format!("/run/netns/{}", self.names[i])).unwrap()
    }
}

/// A pod link: veth `link` in the ztunnel netns `zt` (with `gw` on it and a route to
/// `addr`), peer `eth0` in `pod` with `addr`, default route via `gw`.
pub fn pod_link(zt: &str, link: &str, pod: &str, addr: Ipv4Addr, gw: Ipv4Addr) {
    ip(
        zt,
        &format!("link add {link} type veth peer name eth0 netns {pod}"),
    );
    ip(zt, &format!("addr add {gw}/32 dev {link}"));
    ip(zt, &format!("link set {link} up"));
    ip(zt, &format!("route add {addr}/32 dev {link} scope link"));
    ip(pod, &format!("addr add {addr}/32 dev eth0"));
    ip(pod, "link set eth0 up");
    ip(pod, &format!("route add {gw}/32 dev eth0 scope link"));
    ip(pod, &format!("route add default via {gw} dev eth0"));
}

/// The policy routing the node agent sets up in the ztunnel netns: TPROXY-marked (0x400)
/// packets to the local table, and with `return_mark` also packets marked 0x4d3 (replies
/// that must reach the proxy's transparent sockets).
pub fn tproxy_routing(zt: &str, return_mark: bool) {
    ip(zt, "rule add fwmark 0x400/0xfff lookup 100 priority 20000");
    if return_mark {
        ip(zt, "rule add fwmark 0x4d3/0xfff lookup 100 priority 20003");
    }
    ip(zt, "route add local 0.0.0.0/0 dev lo table 100");
}

/// One of the rules the node agent puts in the mangle PREROUTING chain of the ztunnel
/// netns, for TCP arriving on a link.
pub enum Prerouting<'a> {
    /// `(link, port)`: TPROXY to the proxy's `port` on 127.0.0.1, mark 0x400.
    Capture(&'a str, u16),
    /// `(link, port)`: like [`Prerouting::Capture`] but only TCP to that same port (HBONE
    /// arriving on the inbound link).
    CapturePort(&'a str, u16),
    /// `(link, local)`: mark 0x4d3 unless addressed to `local` (replies that must reach the
    /// proxy's transparent sockets).
    ReturnMark(&'a str, Ipv4Addr),
}

impl Prerouting<'_> {
    fn link(&self) -> &str {
        match self {
            Prerouting::Capture(link, _)
            | Prerouting::CapturePort(link, _)
            | Prerouting::ReturnMark(link, _) => link,
        }
    }

    fn rule(&self) -> String {
        let tproxy = |link: &str, dport: String, port: u16| {
            format!(
                "-A PREROUTING -i {link} -p tcp{dport} -j TPROXY --on-port {port} \
                 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff"
            )
        };
        match self {
            Prerouting::Capture(link, port) => tproxy(link, String::new(), *port),
            Prerouting::CapturePort(link, port) => tproxy(link, format!(" --dport {port}"), *port),
            Prerouting::ReturnMark(link, local) => format!(
                "-A PREROUTING ! -d {local}/32 -i {link} -p tcp -j MARK --set-xmark 0x4d3/0xfff"
            ),
        }
    }
}

/// In `ns`: rp_filter off (all, default and every link of `rules`), then `rules` added to
/// the mangle table (`iptables-restore --noflush`).
pub fn install_prerouting(ns: &Netns, rules: &[Prerouting]) {
    let links: Vec<&str> = rules.iter().map(Prerouting::link).collect();
    let mut table = String::from("*mangle\n");
    for r in rules {
        table.push_str(&r.rule());
        table.push('\n');
    }
    table.push_str("COMMIT\n");
    ns.run(move || {
        for k in ["all", "default"].iter().chain(&links) {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{k}/rp_filter"), "0").unwrap();
        }
        let mut child = Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(table.as_bytes())
            .unwrap();
        assert!(
            child.wait().unwrap().success(),
            "iptables-restore:\n{table}"
        );
    })
    .unwrap();
}

/// The node proxy (TPROXY sockets, any address) running on a thread inside a netns, so
/// every socket it makes (listeners, upstream connects) lives there.
pub struct NodeProxy {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl NodeProxy {
    /// Starts the node proxy in `ns` and waits until it listens.
    pub fn start(ns: Netns, inputs: ProxyInputs, orig_src: bool) -> Self {
        Self::start_with(ns, inputs, orig_src, |_| ())
    }

    /// Like [`NodeProxy::start`], first calling `beside` inside the proxy's runtime; what it
    /// returns is kept until the proxy stops (e.g. a watcher running alongside it).
    pub fn start_with<T>(
        ns: Netns,
        inputs: ProxyInputs,
        orig_src: bool,
        beside: impl FnOnce(&ProxyInputs) -> T + Send + 'static,
    ) -> Self {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _beside = beside(&inputs);
                let handle = ProxyFactory::new(inputs)
                    .start(ProxySpec {
                        scope: ProxyScope::Node,
                        sockets: Arc::new(TproxySocketFactory::new()),
                        bind_ip: IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
                        orig_src,
                        dns: false,
                    })
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                let _ = stop_rx.await;
                handle.drain(Duration::from_millis(200)).await;
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("proxy started");
        NodeProxy { stop, thread }
    }

    /// Drains the proxy and joins its thread.
    pub fn stop(self) {
        self.stop.send(()).unwrap();
        self.thread.join().unwrap();
    }
}

/// Echo server on `addr` inside `ns`; reports each client's address.
pub fn echo_server(ns: &Netns, addr: SocketAddr) -> mpsc::Receiver<SocketAddr> {
    let l = ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = tx.send(s.peer_addr().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx
}

/// From inside `ns`: connects to `dst`, sends `payload` and returns as many bytes read back.
pub fn roundtrip(ns: &Netns, dst: SocketAddr, payload: &'static [u8]) -> Vec<u8> {
    ns.run(move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(payload)?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("round trip to {dst}: {e}"))
}
