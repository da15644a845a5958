//! A simulated cluster: N nodes, each a network namespace, joined by an
//! underlay; per node a pod CIDR, a `cni0` bridge and "static" pods.
//!
//! ```text
//!   underlay netns (<prefix>-underlay)
//!     br0 172.30.0.1/24  ── node1 ─┐  ── node2 ─┐        routes 10.244.N.0/24 via node N
//!                                   │            │
//!   node netns (<prefix>-node1)     eth0 172.30.0.11/24    ip_forward=1, rp_filter=0
//!     cni0 10.244.1.1/24            route 10.244.2.0/24 via 172.30.0.12
//!       └ vethXXXXXXXX ── pod netns (<prefix>-node1-<pod>): eth0 10.244.1.200/24,
//!                                                          default via 10.244.1.1
//! ```
//!
//! The node side mirrors what the CNI `bridge` + `host-local` plugins build
//! (bridge `cni0` with the gateway `.1`, host veth `veth<8 hex>`, pod
//! interface `eth0`), so pods created by a real CNI chain
//! ([`Node::cni_conflist`]) and static pods ([`Node::add_pod`]) coexist on a
//! node: static pods take addresses from the top of the range
//! (`.200`–`.250` by default), the CNI range ends below it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ipnet::{IpNet, Ipv4Net};

use super::error::{NetsimError, Result};
use super::namespace::NamedNetns;
use super::scope::Scope;

/// Shape of a simulated cluster. `Default` gives the documented addresses.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Number of nodes (1–50); named `node1`, `node2`, ...
    pub nodes: usize,
    /// Underlay subnet (a /24); its `.1` is on the underlay bridge.
    pub underlay: Ipv4Net,
    /// Node `i` (1-based) gets underlay host address `node_ip_offset + i`
    /// (default 10: node1 = 172.30.0.11).
    pub node_ip_offset: u8,
    /// Node `i` gets pod CIDR `<a>.<b>.<i>.0/24` from these first two
    /// octets (default 10.244).
    pub pod_cidr_prefix: [u8; 2],
    /// Bridge name on each node (the CNI bridge plugin's default is `cni0`).
    pub bridge: String,
    /// Host addresses (last octet) handed to static pods, inclusive.
    pub static_pod_range: (u8, u8),
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nodes: 2,
            underlay: "172.30.0.0/24".parse().unwrap(),
            node_ip_offset: 10,
            pod_cidr_prefix: [10, 244],
            bridge: "cni0".into(),
            static_pod_range: (200, 250),
        }
    }
}

/// A running simulated cluster. Dropping it kills every process spawned in
/// its namespaces and removes all of them (see [`Scope`]).
#[derive(Debug)]
pub struct Cluster {
    underlay: NamedNetns,
    nodes: Vec<Node>,
    host_ip: Ipv4Addr,
    config: ClusterConfig,
    // Last: dropped after the namespaces above.
    scope: Arc<Scope>,
}

/// One simulated node.
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    netns: NamedNetns,
    underlay_ip: Ipv4Addr,
    pod_cidr: Ipv4Net,
    bridge: String,
    static_range: (u8, u8),
    used: Arc<Mutex<BTreeSet<u8>>>,
    scope: Arc<Scope>,
}

/// A pod created without CNI by [`Node::add_pod`]. Dropping it removes its
/// namespace (and with it both veth ends) and frees its address.
#[derive(Debug)]
pub struct Pod {
    name: String,
    node: String,
    netns: NamedNetns,
    ip: Ipv4Addr,
    cidr: Ipv4Net,
    gateway: Ipv4Addr,
    host_veth: String,
    used: Arc<Mutex<BTreeSet<u8>>>,
}

/// Underlay-side name of node `i`'s veth, and its bridge.
const UNDERLAY_BRIDGE: &str = "br0";
/// Interface name of the underlay link in a node, and of a pod's link.
pub const NODE_IFACE: &str = "eth0";
pub const POD_IFACE: &str = "eth0";

impl Cluster {
    /// A cluster of `nodes` nodes with default addresses, in a new
    /// [`Scope`] with `tag` (leftovers of earlier runs with that tag are
    /// removed first).
    pub fn new(tag: &str, nodes: usize) -> Result<Self> {
        Self::with_config(
            tag,
            ClusterConfig {
                nodes,
                ..Default::default()
            },
        )
    }

    pub fn with_config(tag: &str, config: ClusterConfig) -> Result<Self> {
        let scope = Arc::new(Scope::new(tag)?);
        Self::in_scope(scope, config)
    }

    /// Builds the cluster inside an existing scope (to share it with other
    /// namespaces the test creates).
    pub fn in_scope(scope: Arc<Scope>, config: ClusterConfig) -> Result<Self> {
        if config.nodes == 0 || config.nodes > 50 {
            return Err(NetsimError::Invalid(format!(
                "cluster {}: node count {} out of range 1-50",
                scope.prefix(),
                config.nodes
            )));
        }
        if config.underlay.prefix_len() != 24 {
            return Err(NetsimError::Invalid(format!(
                "cluster {}: underlay {} must be a /24",
                scope.prefix(),
                config.underlay
            )));
        }
        let (lo, hi) = config.static_pod_range;
        if lo < 2 || hi > 254 || lo > hi {
            return Err(NetsimError::Invalid(format!(
                "cluster {}: static pod range .{lo}-.{hi} must lie within .2-.254",
                scope.prefix()
            )));
        }
        let base = config.underlay.network().octets();
        let host_ip = Ipv4Addr::new(base[0], base[1], base[2], 1);
        let underlay = scope.create_netns("underlay")?;
        underlay.add_bridge(UNDERLAY_BRIDGE)?;
        underlay.add_address(
            UNDERLAY_BRIDGE,
            IpNet::V4(Ipv4Net::new(host_ip, 24).unwrap()),
        )?;
        underlay.link_up(UNDERLAY_BRIDGE)?;
        underlay.sysctl_set("net.ipv4.ip_forward", "1")?;

        let mut nodes = Vec::with_capacity(config.nodes);
        for i in 1..=config.nodes {
            nodes.push(Node::create(&scope, &underlay, &config, i)?);
        }
        // Routes between nodes' pod CIDRs over the underlay, and from the
        // underlay (host services) back to the pods.
        for n in &nodes {
            for m in &nodes {
                if n.index != m.index {
                    n.netns.add_route(
                        IpNet::V4(m.pod_cidr),
                        Some(IpAddr::V4(m.underlay_ip)),
                        None,
                    )?;
                }
            }
            underlay.add_route(IpNet::V4(n.pod_cidr), Some(IpAddr::V4(n.underlay_ip)), None)?;
        }
        Ok(Self {
            underlay,
            nodes,
            host_ip,
            config,
            scope,
        })
    }

    /// All nodes, `node1` first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node by 1-based number (`node(1)` is `node1`). Panics when absent.
    pub fn node(&self, number: usize) -> &Node {
        assert!(
            number >= 1 && number <= self.nodes.len(),
            "cluster {} has nodes 1..={}, not {number}",
            self.scope.prefix(),
            self.nodes.len()
        );
        &self.nodes[number - 1]
    }

    /// Node by name (`node2`).
    pub fn node_named(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The underlay namespace (bridge `br0`, one port per node named like
    /// the node).
    pub fn underlay(&self) -> &NamedNetns {
        &self.underlay
    }

    /// Name of the underlay bridge (in [`Cluster::underlay`]).
    pub fn underlay_bridge(&self) -> &'static str {
        UNDERLAY_BRIDGE
    }

    /// Starts a capture of all traffic between nodes (on the underlay
    /// bridge; see [`super::Capture::start`] for why a bridge sees the
    /// frames it forwards).
    pub fn capture_underlay(
        &self,
        file: &std::path::Path,
        filter: Option<&str>,
    ) -> Result<super::Capture> {
        super::Capture::start(&self.underlay, UNDERLAY_BRIDGE, file, filter)
    }

    /// Address on the underlay bridge (172.30.0.1): reachable from every
    /// node and pod; bind test services (e.g. the API double) here with
    /// [`Cluster::bind_host_tcp`].
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// A TCP listener inside the underlay namespace on `host_ip:port` (0 =
    /// any free port). The socket stays in that namespace wherever it is
    /// used, e.g. handed to the API double.
    pub fn bind_host_tcp(&self, port: u16) -> Result<std::net::TcpListener> {
        let addr = std::net::SocketAddr::from((self.host_ip, port));
        self.underlay
            .run(move || std::net::TcpListener::bind(addr))?
            .map_err(super::error::io_err(
                self.underlay.name(),
                format!("bind TCP {addr}"),
            ))
    }

    pub fn scope(&self) -> &Arc<Scope> {
        &self.scope
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }
}

impl Node {
    fn create(
        scope: &Arc<Scope>,
        underlay: &NamedNetns,
        config: &ClusterConfig,
        i: usize,
    ) -> Result<Self> {
        let name = format!("node{i}");
        let base = config.underlay.network().octets();
        let host = u8::try_from(config.node_ip_offset as usize + i)
            .ok()
            .filter(|h| *h < 255 && *h > 1)
            .ok_or_else(|| {
                NetsimError::Invalid(format!(
                    "cluster {}: node {i} underlay address out of range",
                    scope.prefix()
                ))
            })?;
        let underlay_ip = Ipv4Addr::new(base[0], base[1], base[2], host);
        let [a, b] = config.pod_cidr_prefix;
        let pod_cidr = Ipv4Net::new(Ipv4Addr::new(a, b, i as u8, 0), 24).unwrap();
        let gateway = Ipv4Addr::new(a, b, i as u8, 1);

        let netns = scope.create_netns(&name)?;
        underlay.add_veth(&name, NODE_IFACE, Some(&netns))?;
        underlay.set_controller(&name, UNDERLAY_BRIDGE)?;
        underlay.link_up(&name)?;
        netns.add_address(
            NODE_IFACE,
            IpNet::V4(Ipv4Net::new(underlay_ip, 24).unwrap()),
        )?;
        netns.link_up(NODE_IFACE)?;
        netns.add_bridge(&config.bridge)?;
        netns.add_address(
            &config.bridge,
            IpNet::V4(Ipv4Net::new(gateway, 24).unwrap()),
        )?;
        netns.link_up(&config.bridge)?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            netns.sysctl_set(k, v)?;
        }
        Ok(Self {
            index: i,
            name,
            netns,
            underlay_ip,
            pod_cidr,
            bridge: config.bridge.clone(),
            static_range: config.static_pod_range,
            used: Arc::new(Mutex::new(BTreeSet::new())),
            scope: scope.clone(),
        })
    }

    /// `node1`, `node2`, ... (use it as the Kubernetes node name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 1-based number.
    pub fn number(&self) -> usize {
        self.index
    }

    /// The node's namespace (where a node agent or a "host" process runs).
    pub fn netns(&self) -> &NamedNetns {
        &self.netns
    }

    /// The node's underlay address (172.30.0.1N): its `INSTANCE_IP`/node IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }

    /// The node's pod CIDR (10.244.N.0/24).
    pub fn pod_cidr(&self) -> Ipv4Net {
        self.pod_cidr
    }

    /// The pods' gateway, on the bridge (10.244.N.1).
    pub fn gateway(&self) -> Ipv4Addr {
        let o = self.pod_cidr.network().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    }

    /// The bridge pods attach to (`cni0`).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Creates a pod namespace `<prefix>-<node>-<name>` with `eth0` on the
    /// node's bridge, an address from the static range, and a default
    /// route via the bridge.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        let host = {
            let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
            let (lo, hi) = self.static_range;
            let free = (lo..=hi).find(|h| !used.contains(h)).ok_or_else(|| {
                NetsimError::Invalid(format!(
                    "node {}: static pod addresses .{lo}-.{hi} exhausted",
                    self.name
                ))
            })?;
            used.insert(free);
            free
        };
        let release = |used: &Arc<Mutex<BTreeSet<u8>>>| {
            used.lock().unwrap_or_else(|e| e.into_inner()).remove(&host);
        };
        match self.build_pod(name, host) {
            Ok(p) => Ok(p),
            Err(e) => {
                release(&self.used);
                Err(e)
            }
        }
    }

    /// An empty pod namespace `<prefix>-<node>-<name>` (only `lo`), for a
    /// pod whose network the real CNI chain sets up (see
    /// [`Node::cni_conflist`]); removed on drop and with the scope.
    pub fn create_pod_netns(&self, name: &str) -> Result<NamedNetns> {
        self.scope.create_netns(&format!("{}-{name}", self.name))
    }

    fn build_pod(&self, name: &str, host: u8) -> Result<Pod> {
        let netns = self.create_pod_netns(name)?;
        let host_veth = host_veth_name(netns.name());
        let o = self.pod_cidr.network().octets();
        let ip = Ipv4Addr::new(o[0], o[1], o[2], host);
        let gateway = self.gateway();
        self.netns.add_veth(&host_veth, POD_IFACE, Some(&netns))?;
        self.netns.set_controller(&host_veth, &self.bridge)?;
        self.netns.link_up(&host_veth)?;
        netns.add_address(POD_IFACE, IpNet::V4(Ipv4Net::new(ip, 24).unwrap()))?;
        netns.link_up(POD_IFACE)?;
        netns.add_route(
            "0.0.0.0/0".parse().unwrap(),
            Some(IpAddr::V4(gateway)),
            None,
        )?;
        Ok(Pod {
            name: name.to_string(),
            node: self.name.clone(),
            netns,
            ip,
            cidr: self.pod_cidr,
            gateway,
            host_veth,
            used: self.used.clone(),
        })
    }

    /// Directory for the host-local IPAM state of this node's CNI network
    /// (inside the scope's scratch directory, so it is removed with it).
    pub fn cni_ipam_dir(&self) -> PathBuf {
        self.scope.dir().join("cni-ipam").join(&self.name)
    }

    /// A CNI network configuration list for the real `bridge` +
    /// `host-local` plugins matching this node (same bridge, subnet and
    /// gateway; the address range stops below the static pod range). The
    /// kubelet-lite writes it as the node's primary config; the node agent
    /// then chains `istio-cni` into it.
    pub fn cni_conflist(&self, network_name: &str) -> serde_json::Value {
        let o = self.pod_cidr.network().octets();
        let end = self.static_range.0.saturating_sub(1).max(2);
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network_name,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": self.pod_cidr.to_string(),
                        "rangeStart": Ipv4Addr::new(o[0], o[1], o[2], 2).to_string(),
                        "rangeEnd": Ipv4Addr::new(o[0], o[1], o[2], end).to_string(),
                        "gateway": self.gateway().to_string(),
                    }]],
                    "dataDir": self.cni_ipam_dir().to_string_lossy(),
                }
            }]
        })
    }
}

/// `veth` + 8 hex digits derived from the pod namespace name (the bridge
/// plugin uses `veth` + 8 random hex digits).
fn host_veth_name(pod_netns: &str) -> String {
    // FNV-1a, 32 bit.
    let mut h: u32 = 0x811c_9dc5;
    for b in pod_netns.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("veth{h:08x}")
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Name of the node it runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn netns(&self) -> &NamedNetns {
        &self.netns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The node's pod CIDR (the pod's on-link subnet).
    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Interface inside the pod (`eth0`).
    pub fn iface(&self) -> &'static str {
        POD_IFACE
    }

    /// Host-side veth, in the node namespace.
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let host = self.ip.octets()[3];
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_ifnamsiz_and_differ() {
        let a = host_veth_name("t-0001-node1-a");
        let b = host_veth_name("t-0001-node1-b");
        assert_eq!(a.len(), 12);
        assert!(a.starts_with("veth"));
        assert_ne!(a, b);
    }

    #[test]
    fn default_config_matches_the_documented_addresses() {
        let c = ClusterConfig::default();
        assert_eq!(c.underlay.to_string(), "172.30.0.0/24");
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.static_pod_range, (200, 250));
    }
}
