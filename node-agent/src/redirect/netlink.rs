//! rtnetlink helpers: links (GENEVE included), IPv4 addresses, routes and
//! policy-routing rules, in a chosen network namespace.
//!
//! A [`Netlink`] handle owns one `NETLINK_ROUTE` socket. The socket is
//! created on a [`Netns::run`] thread inside the target namespace and is
//! bound to that namespace for its whole life, so every request made through
//! the handle acts there while the caller stays in its own namespace (a
//! netlink socket's namespace is fixed when it is created). The socket is
//! then driven by the caller's tokio runtime.
//!
//! Message construction ([`geneve_link_message`], [`route_message`],
//! [`rule_message`]) and parsing of what the kernel sends back
//! ([`parse_link`], [`parse_route`], [`parse_rule`]) are pure functions in
//! `netlink/message.rs`, unit-tested there without a kernel.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, address::AddressAttribute};
use rtnetlink::{IpVersion, LinkUnspec, RouteMessageBuilder};

use super::netns::{Netns, NetnsError};

/// `ENODEV`/`ENOENT`/`ESRCH`/`EEXIST` as the kernel returns them.
const ENODEV: i32 = libc::ENODEV;
const ENOENT: i32 = libc::ENOENT;
const ESRCH: i32 = libc::ESRCH;
const EEXIST: i32 = libc::EEXIST;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket in netns {netns}: {source}")]
    Socket {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{op} in netns {netns}: {source}")]
    Request {
        op: String,
        netns: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {name} not found in netns {netns}")]
    NoLink { name: String, netns: String },
    #[error("no IPv4 route to {dst} in netns {netns}")]
    NoRoute { dst: Ipv4Addr, netns: String },
}

impl NetlinkError {
    /// The kernel's errno for a failed request, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request { source, .. } => errno(source),
            _ => None,
        }
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Every interface address (all links, IPv4 and IPv6) in `netns`.
///
/// Blocking: the netlink socket is made on a [`Netns::run`] thread inside
/// the namespace and driven there by a runtime of that thread's own, so this
/// needs no caller runtime, and must not be called from an async runtime
/// thread (call it from a blocking one).
pub fn addresses_blocking(netns: &Netns) -> Result<Vec<IpAddr>, NetlinkError> {
    let label = netns.path().display().to_string();
    let socket_error = |source| NetlinkError::Socket {
        netns: label.clone(),
        source,
    };
    netns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(socket_error)?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(socket_error)?;
            let conn = tokio::spawn(conn);
            let msgs: Result<Vec<_>, _> = handle.address().get().execute().try_collect().await;
            conn.abort();
            let msgs = msgs.map_err(|source| NetlinkError::Request {
                op: "list addresses".into(),
                netns: label.clone(),
                source,
            })?;
            Ok(msgs.iter().filter_map(parse_address).collect())
        })
    })?
}

/// A netlink connection bound to one network namespace.
pub struct Netlink {
    handle: rtnetlink::Handle,
    conn: tokio::task::JoinHandle<()>,
    netns: String,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("netns", &self.netns)
            .finish()
    }
}

mod message;

use message::route_table;
pub use message::*;

impl Netlink {
    /// Opens a netlink socket inside `netns`. Must be called from within a
    /// tokio runtime, which then drives the connection.
    pub async fn connect(netns: &Netns) -> Result<Self, NetlinkError> {
        let label = netns.path().display().to_string();
        let rt = tokio::runtime::Handle::current();
        let made = netns
            .run_async(move || {
                // The socket registers with the caller's runtime reactor.
                let _entered = rt.enter();
                rtnetlink::new_connection()
            })
            .await?;
        let (conn, handle, _) = made.map_err(|source| NetlinkError::Socket {
            netns: label.clone(),
            source,
        })?;
        Ok(Self {
            handle,
            conn: tokio::spawn(conn),
            netns: label,
        })
    }

    /// The namespace this handle acts in (for messages).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn fail(&self, op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError + '_ {
        let op = op.into();
        move |source| NetlinkError::Request {
            op,
            netns: self.netns.clone(),
            source,
        }
    }

    // ---- links -------------------------------------------------------

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.fail("list links"))?;
        Ok(msgs.iter().map(parse_link).collect())
    }

    /// The link called `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let res: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await;
        match res {
            Ok(msgs) => Ok(msgs.first().map(parse_link)),
            Err(e) if matches!(errno(&e), Some(ENODEV | ENOENT)) => Ok(None),
            Err(e) => Err(self.fail(format!("get link {name}"))(e)),
        }
    }

    async fn require_index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.link(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| NetlinkError::NoLink {
                name: name.to_string(),
                netns: self.netns.clone(),
            })
    }

    /// Creates a GENEVE device (up). Fails if the name is taken.
    pub async fn add_geneve(&self, spec: &GeneveLink) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(geneve_link_message(spec))
            .execute()
            .await
            .map_err(self.fail(format!(
                "add geneve link {} (vni {}, remote {}, port {})",
                spec.name, spec.vni, spec.remote, spec.dst_port
            )))
    }

    /// Brings `name` up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetlinkError> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(self.fail(format!("set link {name} up")))
    }

    /// Sets the MAC address of `name`.
    pub async fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(self.fail(format!("set the MAC address of link {name}")))
    }

    /// Deletes the link called `name`. `Ok(false)` when it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(ENODEV | ENOENT)) => Ok(false),
            Err(e) => Err(self.fail(format!("delete link {name}"))(e)),
        }
    }

    // ---- addresses ---------------------------------------------------

    /// Adds `addr` to `link`; already present is fine.
    pub async fn add_address(&self, link: &str, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let index = self.require_index(link).await?;
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(self.fail(format!("add address {addr} to link {link}"))(e)),
        }
    }

    /// IPv4 addresses on `link`.
    pub async fn addresses(&self, link: &str) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let index = self.require_index(link).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(self.fail(format!("list addresses of link {link}")))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a
                    && let Ok(net) = Ipv4Net::new(*ip, m.header.prefix_len)
                {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    // ---- routes ------------------------------------------------------

    /// Adds or replaces `route` (idempotent).
    pub async fn replace_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let index = match route.kind {
            RouteKind::Unreachable => None,
            _ => Some(self.require_index(&route.dev).await?),
        };
        self.handle
            .route()
            .add(route_message(route, index))
            .replace()
            .execute()
            .await
            .map_err(self.fail(format!("add route {route}")))
    }

    /// Deletes `route`. `Ok(false)` when it (or its device) did not exist.
    pub async fn delete_route(&self, route: &Route) -> Result<bool, NetlinkError> {
        let index = match route.kind {
            RouteKind::Unreachable => None,
            _ => match self.link(&route.dev).await? {
                Some(link) => Some(link.index),
                None => return Ok(false),
            },
        };
        match self
            .handle
            .route()
            .del(route_message(route, index))
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(false),
            Err(e) => Err(self.fail(format!("delete route {route}"))(e)),
        }
    }

    async fn route_messages(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut req = RouteMessageBuilder::<Ipv4Addr>::new().build();
        // A dump request: table 0 means "all tables".
        req.header.table = RouteHeader::RT_TABLE_UNSPEC;
        req.header.kind = RouteType::Unspec;
        req.header.protocol = RouteProtocol::Unspec;
        self.handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(self.fail("list routes"))
    }

    /// IPv4 routes of `table`, devices named.
    pub async fn routes(&self, table: u32) -> Result<Vec<Route>, NetlinkError> {
        let links = self.links().await?;
        let name_of = |i: u32| links.iter().find(|l| l.index == i).map(|l| l.name.clone());
        let mut out: Vec<Route> = self
            .route_messages()
            .await?
            .iter()
            .filter_map(|m| parse_route(m, name_of))
            .filter(|r| r.table == table)
            .collect();
        out.sort();
        Ok(out)
    }

    /// Number of IPv4 routes in `table`, including ones [`parse_route`] cannot
    /// express.
    pub async fn route_count(&self, table: u32) -> Result<usize, NetlinkError> {
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter(|m| m.header.address_family == AddressFamily::Inet)
            .filter(|m| route_table(m) == table)
            .count())
    }

    /// Deletes every IPv4 route in `table`; returns how many.
    pub async fn flush_table(&self, table: u32) -> Result<usize, NetlinkError> {
        let mut n = 0;
        for mut m in self.route_messages().await? {
            if m.header.address_family != AddressFamily::Inet || route_table(&m) != table {
                continue;
            }
            // Drop read-only attributes the kernel would reject on delete.
            m.attributes
                .retain(|a| !matches!(a, RouteAttribute::CacheInfo(_)));
            match self.handle.route().del(m).execute().await {
                Ok(()) => n += 1,
                Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => {}
                Err(e) => return Err(self.fail(format!("flush route table {table}"))(e)),
            }
        }
        Ok(n)
    }

    /// How the namespace would route a packet to `dst` (`ip route get`),
    /// for a packet carrying `fwmark` when given (policy rules apply).
    pub async fn route_get(
        &self,
        dst: Ipv4Addr,
        fwmark: Option<u32>,
    ) -> Result<RouteLookup, NetlinkError> {
        let mut req = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        if let Some(mark) = fwmark {
            req.attributes.push(RouteAttribute::Mark(mark));
        }
        req.header.table = RouteHeader::RT_TABLE_UNSPEC;
        req.header.protocol = RouteProtocol::Unspec;
        req.header.scope = RouteScope::Universe;
        req.header.kind = RouteType::Unspec;
        let res: Result<Vec<RouteMessage>, _> =
            self.handle.route().get(req).execute().try_collect().await;
        let msgs = match res {
            Ok(m) => m,
            Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => {
                return Err(NetlinkError::NoRoute {
                    dst,
                    netns: self.netns.clone(),
                });
            }
            Err(e) => return Err(self.fail(format!("route get {dst}"))(e)),
        };
        let no_route = || NetlinkError::NoRoute {
            dst,
            netns: self.netns.clone(),
        };
        let msg = msgs.first().ok_or_else(no_route)?;
        let mut lookup = RouteLookup {
            dev: String::new(),
            ifindex: 0,
            src: None,
            gateway: None,
        };
        for a in &msg.attributes {
            match a {
                RouteAttribute::Oif(i) => lookup.ifindex = *i,
                RouteAttribute::PrefSource(RouteAddress::Inet(s)) => lookup.src = Some(*s),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => lookup.gateway = Some(*g),
                _ => {}
            }
        }
        if lookup.ifindex == 0 {
            return Err(no_route());
        }
        lookup.dev = self
            .links()
            .await?
            .into_iter()
            .find(|l| l.index == lookup.ifindex)
            .map(|l| l.name)
            .ok_or_else(no_route)?;
        Ok(lookup)
    }

    // ---- rules -------------------------------------------------------

    /// IPv4 rules this module can express, in priority order.
    pub async fn rules(&self) -> Result<Vec<Rule>, NetlinkError> {
        Ok(self
            .rule_messages()
            .await?
            .iter()
            .filter_map(parse_rule)
            .collect())
    }

    async fn rule_messages(&self) -> Result<Vec<RuleMessage>, NetlinkError> {
        self.handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(self.fail("list rules"))
    }

    /// Adds `rule` unless an identical one exists.
    pub async fn add_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        if self.rules().await?.contains(rule) {
            return Ok(());
        }
        let mut req = self.handle.rule().add();
        *req.message_mut() = rule_message(rule);
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(self.fail(format!("add rule {rule}"))(e)),
        }
    }

    /// Deletes `rule`. `Ok(false)` when it did not exist.
    pub async fn delete_rule(&self, rule: &Rule) -> Result<bool, NetlinkError> {
        match self.handle.rule().del(rule_message(rule)).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => Ok(false),
            Err(e) => Err(self.fail(format!("delete rule {rule}"))(e)),
        }
    }

    /// Deletes every IPv4 rule whose priority is in `priorities` (whatever
    /// its selector); returns how many.
    pub async fn delete_rules_in(
        &self,
        priorities: std::ops::RangeInclusive<u32>,
    ) -> Result<usize, NetlinkError> {
        let mut n = 0;
        for m in self.rule_messages().await? {
            let prio = m.attributes.iter().find_map(|a| match a {
                RuleAttribute::Priority(p) => Some(*p),
                _ => None,
            });
            if !prio.is_some_and(|p| priorities.contains(&p)) {
                continue;
            }
            match self.handle.rule().del(m).execute().await {
                Ok(()) => n += 1,
                Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => {}
                Err(e) => {
                    return Err(self.fail(format!(
                        "delete rules with priority {}-{}",
                        priorities.start(),
                        priorities.end()
                    ))(e));
                }
            }
        }
        Ok(n)
    }

    /// Deletes every IPv4 rule (each copy) that [`parse_rule`] understands and
    /// `pred` accepts; rules it cannot parse are never touched. Returns how many.
    pub async fn delete_rules_where(
        &self,
        pred: impl Fn(&Rule) -> bool,
    ) -> Result<usize, NetlinkError> {
        let mut n = 0;
        for m in self.rule_messages().await? {
            let Some(rule) = parse_rule(&m) else {
                continue;
            };
            if !pred(&rule) {
                continue;
            }
            match self.handle.rule().del(m).execute().await {
                Ok(()) => n += 1,
                Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH)) => {}
                Err(e) => return Err(self.fail(format!("delete rule {rule}"))(e)),
            }
        }
        Ok(n)
    }

    /// Priorities of every IPv4 rule (including ones [`parse_rule`] skips).
    pub async fn rule_priorities(&self) -> Result<Vec<u32>, NetlinkError> {
        Ok(self
            .rule_messages()
            .await?
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Priority(p) => Some(*p),
                    _ => None,
                })
            })
            .collect())
    }
}
