//! Netlink message construction and parsing for [`super::Netlink`], as pure
//! functions over plain descriptions ([`GeneveLink`], [`Route`], [`Rule`]) so
//! they are tested without a kernel.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoGeneve, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{LinkGeneve, RouteMessageBuilder};

/// A GENEVE device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneveLink {
    pub name: String,
    pub vni: u32,
    pub remote: Ipv4Addr,
    pub dst_port: u16,
    /// The device's (inner Ethernet) MAC address.
    pub mac: [u8; 6],
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
    /// `IFLA_ADDRESS` when it is an Ethernet MAC.
    pub mac: Option<[u8; 6]>,
}

/// Route type: ordinary unicast, `local` (deliver to this host) or
/// `unreachable` (drop, answering ICMP host unreachable; no device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Unicast,
    Local,
    Unreachable,
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
        match self.kind {
            RouteKind::Local => f.write_str("local ")?,
            RouteKind::Unreachable => f.write_str("unreachable ")?,
            RouteKind::Unicast => {}
        }
        write!(f, "{}", self.dst)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        if !self.dev.is_empty() {
            write!(f, " dev {}", self.dev)?;
        }
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
        .address(spec.mac.to_vec())
        .up()
        .build()
}

/// `RTM_NEWROUTE`/`RTM_DELROUTE` body for `route`, with its device resolved
/// to `ifindex` (`None` for a route without a device: unreachable).
pub fn route_message(route: &Route, ifindex: Option<u32>) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(route.table)
        .protocol(RouteProtocol::Static);
    if let Some(ifindex) = ifindex {
        b = b.output_interface(ifindex);
    }
    if route.dst.prefix_len() > 0 {
        b = b.destination_prefix(route.dst.network(), route.dst.prefix_len());
    }
    match route.kind {
        RouteKind::Local => b = b.kind(RouteType::Local).scope(RouteScope::Host),
        RouteKind::Unreachable => b = b.kind(RouteType::Unreachable),
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

/// The interface's own address in an `RTM_NEWADDR`: `IFA_LOCAL` when
/// present (on a point-to-point link `IFA_ADDRESS` is the peer's), else
/// `IFA_ADDRESS` (IPv6 sends only that one).
pub fn parse_address(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
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
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
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
/// output device (multipath, blackhole...) except unreachable ones (device
/// name empty).
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
        RouteType::Unreachable => RouteKind::Unreachable,
        _ => return None,
    };
    let dev = match (kind, oif) {
        (RouteKind::Unreachable, None) => String::new(),
        (_, oif) => name_of(oif?)?,
    };
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

/// The table of a route message (`RTA_TABLE`, else the header byte).
pub(super) fn route_table(m: &RouteMessage) -> u32 {
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

    #[test]
    fn an_address_is_its_local_side() {
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        let peer: IpAddr = "10.0.0.6".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        let mut msg = AddressMessage::default();
        assert_eq!(parse_address(&msg), None);
        msg.attributes = vec![AddressAttribute::Address(v6)];
        assert_eq!(parse_address(&msg), Some(v6));
        // point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL ours, either order
        msg.attributes = vec![AddressAttribute::Address(peer), AddressAttribute::Local(v4)];
        assert_eq!(parse_address(&msg), Some(v4));
        msg.attributes = vec![AddressAttribute::Local(v4), AddressAttribute::Address(peer)];
        assert_eq!(parse_address(&msg), Some(v4));
    }

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
            mac: [0x02, 0x69, 0x73, 0, 0, 1],
        };
        let msg = geneve_link_message(&spec);
        assert!(msg.header.flags.contains(LinkFlags::Up));
        let link = parse_link(&wire_link(&msg));
        assert_eq!(link.name, "istioin");
        assert_eq!(link.mac, Some([0x02, 0x69, 0x73, 0, 0, 1]));
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
            let msg = route_message(&r, Some(7));
            let back = parse_route(&wire_route(&msg), names).expect("parses");
            assert_eq!(back, r, "{r}");
        }
    }

    #[test]
    fn unreachable_routes_have_no_device() {
        let r = Route {
            kind: RouteKind::Unreachable,
            ..route(100, "10.244.0.5/32", "")
        };
        let msg = route_message(&r, None);
        assert_eq!(msg.header.kind, RouteType::Unreachable);
        assert!(
            !msg.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(_)))
        );
        let back = parse_route(&wire_route(&msg), |_| None).expect("parses");
        assert_eq!(back, r);
        assert_eq!(back.to_string(), "unreachable 10.244.0.5/32 table 100");
    }

    #[test]
    fn default_route_has_no_destination_attribute_and_local_is_host_scope() {
        let msg = route_message(
            &Route {
                kind: RouteKind::Local,
                ..route(100, "0.0.0.0/0", "lo")
            },
            Some(1),
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
