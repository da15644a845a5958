//! Links, addresses and routes inside a [`NamedNetns`], through rtnetlink
//! (no `ip` command). Each call opens a netlink socket on a thread inside
//! the namespace, drives the request there with a small current-thread
//! runtime, and returns; calls block the caller (use `spawn_blocking` from
//! async code).

use std::future::Future;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::error::{NetsimError, Result};
use super::namespace::NamedNetns;

/// One link as seen by [`NamedNetns::links`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, ... (`None` for e.g. `lo`).
    pub kind: Option<String>,
    /// Index of the bridge this link is enslaved to.
    pub controller: Option<u32>,
    pub up: bool,
    /// Hardware address (empty for links without one).
    pub mac: Vec<u8>,
}

/// A locally administered unicast MAC derived from the namespace and bridge names.
fn bridge_mac(netns: &str, bridge: &str) -> [u8; 6] {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (netns, bridge).hash(&mut h);
    let b = h.finish().to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

impl NamedNetns {
    /// Runs `f` with an rtnetlink handle whose socket lives in this
    /// namespace. `action` names the operation for errors.
    pub fn netlink<T, F, Fut>(&self, action: &str, f: F) -> Result<T>
    where
        F: FnOnce(Handle) -> Fut + Send,
        Fut: Future<Output = Result<T, rtnetlink::Error>>,
        T: Send,
    {
        let name = self.name().to_string();
        // The runtime is built here, not on the namespace thread: tokio
        // creates process-wide sockets the first time a runtime with I/O is
        // built (signal/process driver), and sockets belong to the netns
        // they are created in: built inside, they would pin this namespace
        // forever.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(super::error::io_err(&name, "build netlink runtime"))?;
        self.run(move || -> Result<T> {
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(super::error::io_err(&name, "open netlink socket"))?;
                let driver = tokio::spawn(conn);
                let out = f(handle).await;
                driver.abort();
                out.map_err(|source| NetsimError::Netlink {
                    netns: name.clone(),
                    action: action.to_string(),
                    source,
                })
            })
        })?
    }

    /// Index of link `name`, or an error naming the link.
    pub fn link_index(&self, name: &str) -> Result<u32> {
        let n = name.to_string();
        self.netlink(&format!("look up link {name}"), |h| async move {
            let link = h.link().get().match_name(n).execute().try_next().await?;
            Ok(link.map(|l| l.header.index).unwrap_or(0))
        })
        .and_then(|idx| {
            if idx == 0 {
                Err(NetsimError::Invalid(format!(
                    "netns {}: no link named {name}",
                    self.name()
                )))
            } else {
                Ok(idx)
            }
        })
    }

    /// All links of this namespace.
    pub fn links(&self) -> Result<Vec<LinkInfo>> {
        self.netlink("list links", |h| async move {
            let msgs: Vec<LinkMessage> = h.link().get().execute().try_collect().await?;
            Ok(msgs.iter().map(link_info).collect())
        })
    }

    /// True when a link called `name` exists here.
    pub fn has_link(&self, name: &str) -> Result<bool> {
        Ok(self.links()?.iter().any(|l| l.name == name))
    }

    /// Sets link `name` up.
    pub fn link_up(&self, name: &str) -> Result<()> {
        let n = name.to_string();
        self.netlink(&format!("set link {name} up"), |h| async move {
            h.link()
                .set(LinkUnspec::new_with_name(&n).up().build())
                .execute()
                .await
        })
    }

    /// Creates a veth pair: `name` here and `peer_name` in `peer_ns` (or
    /// here when `None`). Both ends are left down.
    pub fn add_veth(
        &self,
        name: &str,
        peer_name: &str,
        peer_ns: Option<&NamedNetns>,
    ) -> Result<()> {
        let (n, p) = (name.to_string(), peer_name.to_string());
        let peer_fd = peer_ns.map(|ns| ns.raw_fd());
        let target = peer_ns.map(|ns| ns.name()).unwrap_or(self.name());
        self.netlink(
            &format!("add veth {name} with peer {peer_name} in netns {target}"),
            |h| async move {
                let msg = match peer_fd {
                    None => LinkVeth::new(&n, &p).build(),
                    Some(fd) => {
                        let peer = LinkUnspec::new_with_name(&p).setns_by_fd(fd).build();
                        LinkVeth::new(&n, &p)
                            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                            .build()
                    }
                };
                h.link().add(msg).execute().await
            },
        )
    }

    /// Creates a bridge called `name` (up).
    ///
    /// The bridge gets a fixed MAC address of its own, as the bridge CNI plugin gives
    /// it: otherwise the kernel gives a bridge the lowest MAC of its ports, which
    /// changes when a port with a lower one is added, and the pods' ARP entries for
    /// the gateway go stale (their packets to it are dropped until ARP probes again).
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        let n = name.to_string();
        let mac = bridge_mac(self.name(), name);
        self.netlink(&format!("add bridge {name}"), |h| async move {
            h.link()
                .add(LinkBridge::new(&n).address(mac.to_vec()).build())
                .execute()
                .await
        })
    }

    /// Enslaves link `name` to bridge `bridge`.
    pub fn set_controller(&self, name: &str, bridge: &str) -> Result<()> {
        let br = self.link_index(bridge)?;
        let n = name.to_string();
        self.netlink(
            &format!("attach {name} to bridge {bridge}"),
            |h| async move {
                h.link()
                    .set(LinkUnspec::new_with_name(&n).controller(br).build())
                    .execute()
                    .await
            },
        )
    }

    /// Moves link `name` into `target` (where it keeps its name).
    pub fn move_link(&self, name: &str, target: &NamedNetns) -> Result<()> {
        let n = name.to_string();
        let fd = target.raw_fd();
        self.netlink(
            &format!("move link {name} to netns {}", target.name()),
            |h| async move {
                h.link()
                    .set(LinkUnspec::new_with_name(&n).setns_by_fd(fd).build())
                    .execute()
                    .await
            },
        )
    }

    /// Renames link `name` (must be down).
    pub fn rename_link(&self, name: &str, new_name: &str) -> Result<()> {
        let idx = self.link_index(name)?;
        let nn = new_name.to_string();
        self.netlink(
            &format!("rename link {name} to {new_name}"),
            |h| async move {
                h.link()
                    .set(LinkUnspec::new_with_index(idx).name(nn).build())
                    .execute()
                    .await
            },
        )
    }

    /// Deletes link `name`.
    pub fn delete_link(&self, name: &str) -> Result<()> {
        let idx = self.link_index(name)?;
        self.netlink(&format!("delete link {name}"), |h| async move {
            h.link().del(idx).execute().await
        })
    }

    /// Adds address `addr` (with prefix length) to link `name`.
    pub fn add_address(&self, name: &str, addr: IpNet) -> Result<()> {
        let idx = self.link_index(name)?;
        self.netlink(&format!("add address {addr} to {name}"), |h| async move {
            h.address()
                .add(idx, addr.addr(), addr.prefix_len())
                .execute()
                .await
        })
    }

    /// Addresses of link `name`.
    pub fn addresses(&self, name: &str) -> Result<Vec<IpNet>> {
        use netlink_packet_route::address::AddressAttribute;
        let idx = self.link_index(name)?;
        self.netlink(&format!("list addresses of {name}"), |h| async move {
            let msgs: Vec<_> = h
                .address()
                .get()
                .set_link_index_filter(idx)
                .execute()
                .try_collect()
                .await?;
            let mut out = Vec::new();
            for m in msgs {
                for a in &m.attributes {
                    if let AddressAttribute::Address(ip) = a
                        && let Ok(net) = IpNet::new(*ip, m.header.prefix_len)
                    {
                        out.push(net);
                    }
                }
            }
            Ok(out)
        })
    }

    /// Adds a route to `dst` via gateway `via` and/or out of link `dev`
    /// (`0.0.0.0/0` for a default route).
    pub fn add_route(&self, dst: IpNet, via: Option<IpAddr>, dev: Option<&str>) -> Result<()> {
        if let Some(gw) = via
            && gw.is_ipv4() != dst.addr().is_ipv4()
        {
            return Err(NetsimError::Invalid(format!(
                "netns {}: route {dst} via {gw}: address families differ",
                self.name()
            )));
        }
        let oif = dev.map(|d| self.link_index(d)).transpose()?;
        let what = format!(
            "add route {dst}{}{}",
            via.map(|v| format!(" via {v}")).unwrap_or_default(),
            dev.map(|d| format!(" dev {d}")).unwrap_or_default()
        );
        self.netlink(&what, |h| async move {
            let msg = match (dst, via) {
                (IpNet::V4(d), gw) => {
                    let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                        .destination_prefix(d.addr(), d.prefix_len());
                    if let Some(IpAddr::V4(g)) = gw {
                        b = b.gateway(g);
                    }
                    if let Some(i) = oif {
                        b = b.output_interface(i);
                    }
                    b.build()
                }
                (IpNet::V6(d), gw) => {
                    let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                        .destination_prefix(d.addr(), d.prefix_len());
                    if let Some(IpAddr::V6(g)) = gw {
                        b = b.gateway(g);
                    }
                    if let Some(i) = oif {
                        b = b.output_interface(i);
                    }
                    b.build()
                }
            };
            h.route().add(msg).execute().await
        })
    }
}

fn link_info(m: &LinkMessage) -> LinkInfo {
    use netlink_packet_route::link::{LinkFlags, LinkInfo as Info};
    let mut name = String::new();
    let mut kind = None;
    let mut controller = None;
    let mut mac = Vec::new();
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Address(a) => mac = a.clone(),
            LinkAttribute::Controller(i) => controller = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let Info::Kind(k) = i {
                        kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    LinkInfo {
        index: m.header.index,
        name,
        kind,
        controller,
        up: m.header.flags.contains(LinkFlags::Up),
        mac,
    }
}
