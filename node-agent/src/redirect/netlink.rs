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
//! ([`parse_link`], [`parse_route`], [`parse_rule`]) are pure functions,
//! unit-tested here without a kernel.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{
    InfoData, InfoGeneve, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, address::AddressAttribute};
use rtnetlink::{IpVersion, LinkGeneve, LinkUnspec, RouteMessageBuilder};

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

/// A GENEVE device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneveLink {
    pub name: String,
    pub vni: u32,
    pub remote: Ipv4Addr,
    pub dst_port: u16,
}

/// GENEVE attributes of an existing device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GeneveAttrs {
    pub vni: u32,
    pub remote: Option<Ipv4Addr>,
    /// UDP destination port (the kernel reports 6081 when none was given).
    pub dst_port: u16,
    /// Collect-metadata ("external") device.
    pub external: bool,
}

/// What the helpers need to know about an existing link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `geneve`, `bridge`...), absent for e.g. `lo`.
    pub kind: Option<String>,
    pub up: bool,
    pub geneve: Option<GeneveAttrs>,
    /// Netns id of the peer's namespace (veth), as this namespace knows it.
    pub link_netnsid: Option<i32>,
}

/// Route type: ordinary unicast or `local` (deliver to this host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Unicast,
    Local,
}

/// An IPv4 route in a given table, described by device *name*.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Net,
    pub kind: RouteKind,
    pub dev: String,
    pub via: Option<Ipv4Addr>,
    pub src: Option<Ipv4Addr>,
    /// `scope link` (directly reachable, no gateway). Local routes get
    /// `scope host` whatever this says.
    pub scope_link: bool,
    pub onlink: bool,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == RouteKind::Local {
            f.write_str("local ")?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        write!(f, " dev {}", self.dev)?;
        if self.scope_link {
            f.write_str(" scope link")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        if let Some(src) = self.src {
            write!(f, " src {src}")?;
        }
        write!(f, " table {}", self.table)
    }
}

/// What a policy rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RuleTarget {
    /// `lookup <table>`
    Table(u32),
    /// `goto <priority>`
    Goto(u32),
}

/// An IPv4 policy-routing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub priority: u32,
    /// `fwmark value/mask`
    pub fwmark: Option<(u32, u32)>,
    pub target: RuleTarget,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.priority)?;
        match self.fwmark {
            Some((v, m)) => write!(f, "from all fwmark {v:#x}/{m:#x}")?,
            None => f.write_str("from all")?,
        }
        match self.target {
            RuleTarget::Table(t) => write!(f, " lookup {t}"),
            RuleTarget::Goto(p) => write!(f, " goto {p}"),
        }
    }
}

/// The kernel's answer to "how would you reach `dst`" (`ip route get`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLookup {
    pub dev: String,
    pub ifindex: u32,
    /// Source address the kernel picks for this destination.
    pub src: Option<Ipv4Addr>,
    pub gateway: Option<Ipv4Addr>,
}

/// `RTM_NEWLINK` for a GENEVE device, created up.
pub fn geneve_link_message(spec: &GeneveLink) -> LinkMessage {
    LinkGeneve::new(&spec.name, spec.vni)
        .remote(spec.remote)
        .port(spec.dst_port)
        .up()
        .build()
}

/// `RTM_NEWROUTE`/`RTM_DELROUTE` body for `route`, with its device resolved
/// to `ifindex`.
pub fn route_message(route: &Route, ifindex: u32) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(route.table)
        .protocol(RouteProtocol::Static)
        .output_interface(ifindex);
    if route.dst.prefix_len() > 0 {
        b = b.destination_prefix(route.dst.network(), route.dst.prefix_len());
    }
    match route.kind {
        RouteKind::Local => b = b.kind(RouteType::Local).scope(RouteScope::Host),
        RouteKind::Unicast => {
            if route.scope_link {
                b = b.scope(RouteScope::Link);
            }
        }
    }
    if let Some(via) = route.via {
        b = b.gateway(via);
    }
    if let Some(src) = route.src {
        b = b.pref_source(src);
    }
    if route.onlink {
        b = b.onlink();
    }
    let mut msg = b.build();
    // Always say which table, also for ids that fit the header byte.
    msg.attributes.push(RouteAttribute::Table(route.table));
    msg
}

/// `RTM_NEWRULE`/`RTM_DELRULE` body for `rule`.
pub fn rule_message(rule: &Rule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.attributes.push(RuleAttribute::Priority(rule.priority));
    if let Some((mark, mask)) = rule.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    match rule.target {
        RuleTarget::Table(t) => {
            msg.header.action = RuleAction::ToTable;
            if t <= 255 {
                msg.header.table = t as u8;
            }
            msg.attributes.push(RuleAttribute::Table(t));
        }
        RuleTarget::Goto(p) => {
            msg.header.action = RuleAction::Goto;
            msg.attributes.push(RuleAttribute::Goto(p));
        }
    }
    msg
}

/// Reads the fields we use out of an `RTM_NEWLINK`.
pub fn parse_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => {
                            link.kind = Some(k.to_string());
                            if *k == InfoKind::Geneve && link.geneve.is_none() {
                                link.geneve = Some(GeneveAttrs {
                                    dst_port: 6081,
                                    ..Default::default()
                                });
                            }
                        }
                        LinkInfo::Data(InfoData::Geneve(attrs)) => {
                            let g = link.geneve.get_or_insert(GeneveAttrs {
                                dst_port: 6081,
                                ..Default::default()
                            });
                            for a in attrs {
                                match a {
                                    InfoGeneve::Id(v) => g.vni = *v,
                                    InfoGeneve::Remote(r) => g.remote = Some(*r),
                                    InfoGeneve::Port(p) => g.dst_port = *p,
                                    InfoGeneve::CollectMetadata => g.external = true,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // An unset remote is reported as 0.0.0.0 by some kernels.
    if let Some(g) = link.geneve.as_mut()
        && g.remote == Some(Ipv4Addr::UNSPECIFIED)
    {
        g.remote = None;
    }
    link
}

/// Converts an IPv4 `RTM_NEWROUTE` into a [`Route`], naming the device with
/// `name_of(ifindex)`. `None` for other families and for routes without an
/// output device (multipath, blackhole...).
pub fn parse_route(msg: &RouteMessage, name_of: impl Fn(u32) -> Option<String>) -> Option<Route> {
    if msg.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut via = None;
    let mut src = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(*a),
            RouteAttribute::PrefSource(RouteAddress::Inet(a)) => src = Some(*a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let kind = match msg.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Local => RouteKind::Local,
        _ => return None,
    };
    let dev = name_of(oif?)?;
    Some(Route {
        table,
        dst: Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?,
        kind,
        dev,
        via,
        src,
        scope_link: kind == RouteKind::Unicast && msg.header.scope == RouteScope::Link,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
    })
}

/// Converts an IPv4 `RTM_NEWRULE` into a [`Rule`]; `None` for rules this
/// module does not express (source/destination selectors, other actions).
pub fn parse_rule(msg: &RuleMessage) -> Option<Rule> {
    if msg.header.family != AddressFamily::Inet
        || msg.header.src_len != 0
        || msg.header.dst_len != 0
    {
        return None;
    }
    let mut priority = 0;
    let mut mark = None;
    let mut mask = None;
    let mut table = u32::from(msg.header.table);
    let mut goto = None;
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Goto(g) => goto = Some(*g),
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::Source(_)
            | RuleAttribute::Destination(_) => return None,
            _ => {}
        }
    }
    let target = match msg.header.action {
        RuleAction::ToTable => RuleTarget::Table(table),
        RuleAction::Goto => RuleTarget::Goto(goto?),
        _ => return None,
    };
    let fwmark = mark.map(|m| (m, mask.unwrap_or(u32::MAX)));
    Some(Rule {
        priority,
        fwmark,
        target,
    })
}

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
        let index = self.require_index(&route.dev).await?;
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
        let Some(link) = self.link(&route.dev).await? else {
            return Ok(false);
        };
        match self
            .handle
            .route()
            .del(route_message(route, link.index))
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

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{Emitable, Parseable};

    fn wire_link(msg: &LinkMessage) -> LinkMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        LinkMessage::parse(buf.as_slice()).expect("parse link")
    }

    fn wire_route(msg: &RouteMessage) -> RouteMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        RouteMessage::parse(buf.as_slice()).expect("parse route")
    }

    fn wire_rule(msg: &RuleMessage) -> RuleMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        RuleMessage::parse(buf.as_slice()).expect("parse rule")
    }

    #[test]
    fn geneve_message_carries_vni_remote_port_and_up() {
        let spec = GeneveLink {
            name: "istioin".into(),
            vni: 1000,
            remote: Ipv4Addr::new(10, 244, 1, 7),
            dst_port: 6082,
        };
        let msg = geneve_link_message(&spec);
        assert!(msg.header.flags.contains(LinkFlags::Up));
        let link = parse_link(&wire_link(&msg));
        assert_eq!(link.name, "istioin");
        assert_eq!(link.kind.as_deref(), Some("geneve"));
        assert_eq!(
            link.geneve,
            Some(GeneveAttrs {
                vni: 1000,
                remote: Some(Ipv4Addr::new(10, 244, 1, 7)),
                dst_port: 6082,
                external: false,
            })
        );
    }

    #[test]
    fn geneve_without_port_reads_back_as_6081() {
        let msg = LinkGeneve::new("g", 5).collect_metadata().build();
        let g = parse_link(&wire_link(&msg)).geneve.unwrap();
        assert!(g.external);
        assert_eq!(g.dst_port, 6081);
        assert_eq!(g.remote, None);
    }

    fn route(table: u32, dst: &str, dev: &str) -> Route {
        Route {
            table,
            dst: dst.parse().unwrap(),
            kind: RouteKind::Unicast,
            dev: dev.into(),
            via: None,
            src: None,
            scope_link: false,
            onlink: false,
        }
    }

    #[test]
    fn route_messages_round_trip() {
        let names = |i: u32| Some(format!("if{i}"));
        let cases = vec![
            Route {
                scope_link: true,
                ..route(100, "10.244.0.9/32", "if7")
            },
            Route {
                via: Some(Ipv4Addr::new(192, 168, 126, 2)),
                src: Some(Ipv4Addr::new(10, 244, 0, 1)),
                ..route(100, "10.244.0.5/32", "if7")
            },
            Route {
                via: Some(Ipv4Addr::new(192, 168, 127, 2)),
                ..route(101, "0.0.0.0/0", "if7")
            },
            Route {
                via: Some(Ipv4Addr::new(10, 244, 0, 9)),
                onlink: true,
                ..route(102, "0.0.0.0/0", "if7")
            },
            Route {
                kind: RouteKind::Local,
                ..route(100, "0.0.0.0/0", "if7")
            },
        ];
        for r in cases {
            let msg = route_message(&r, 7);
            let back = parse_route(&wire_route(&msg), names).expect("parses");
            assert_eq!(back, r, "{r}");
        }
    }

    #[test]
    fn default_route_has_no_destination_attribute_and_local_is_host_scope() {
        let msg = route_message(
            &Route {
                kind: RouteKind::Local,
                ..route(100, "0.0.0.0/0", "lo")
            },
            1,
        );
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(_)))
        );
        assert_eq!(msg.header.scope, RouteScope::Host);
        assert_eq!(msg.header.kind, RouteType::Local);
        assert_eq!(msg.header.table, 100);
        assert!(msg.attributes.contains(&RouteAttribute::Oif(1)));
    }

    #[test]
    fn rule_messages_round_trip() {
        let cases = [
            Rule {
                priority: 100,
                fwmark: Some((0x200, 0x200)),
                target: RuleTarget::Goto(32766),
            },
            Rule {
                priority: 101,
                fwmark: Some((0x100, 0x100)),
                target: RuleTarget::Table(101),
            },
            Rule {
                priority: 103,
                fwmark: None,
                target: RuleTarget::Table(100),
            },
            Rule {
                priority: 20003,
                fwmark: Some((0x4d3, 0xfff)),
                target: RuleTarget::Table(100),
            },
        ];
        for r in cases {
            let msg = rule_message(&r);
            assert_eq!(parse_rule(&wire_rule(&msg)), Some(r), "{r}");
        }
        let goto = rule_message(&cases[0]);
        assert_eq!(goto.header.action, RuleAction::Goto);
        assert!(goto.attributes.contains(&RuleAttribute::Goto(32766)));
    }

    #[test]
    fn rules_with_other_selectors_are_not_ours() {
        let mut msg = rule_message(&Rule {
            priority: 5,
            fwmark: None,
            target: RuleTarget::Table(5),
        });
        msg.attributes
            .push(RuleAttribute::Iifname("eth0".to_string()));
        assert_eq!(parse_rule(&msg), None);
    }

    #[test]
    fn display_reads_like_iproute2() {
        let r = Rule {
            priority: 102,
            fwmark: Some((0x40, 0x40)),
            target: RuleTarget::Table(102),
        };
        assert_eq!(r.to_string(), "102: from all fwmark 0x40/0x40 lookup 102");
        let rt = Route {
            via: Some(Ipv4Addr::new(192, 168, 126, 2)),
            src: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..route(100, "10.1.0.5/32", "istioin")
        };
        assert_eq!(
            rt.to_string(),
            "10.1.0.5/32 via 192.168.126.2 dev istioin src 10.0.0.1 table 100"
        );
    }
}
