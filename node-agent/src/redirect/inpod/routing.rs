//! Policy routing inside a pod netns (rtnetlink): replies on connections
//! ztunnel delivered (connmark 0x111, restored to the packet mark by the
//! mangle rules) go to `lo`, back to ztunnel's socket, not out of the pod.
//!
//! | object | value |
//! |---|---|
//! | rule | priority 32764, fwmark 0x111/0xfff → table 100 (IPv4; IPv6 too when enabled) |
//! | route, table 100 | local 0.0.0.0/0 dev lo (IPv6: local ::/0 dev lo, when lo has IPv6) |
//!
//! The functions ending in `_here` act on the calling thread's netns: call
//! them from inside [`crate::redirect::netns::Netns::run`]. They run their own
//! single-threaded runtime for the netlink socket, which is created in (and
//! stays bound to) that netns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::rules::{CONN_MARK, MARK_MASK};

pub const ROUTE_TABLE: u32 = 100;
pub const RULE_PRIORITY: u32 = 32764;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("netlink runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no loopback interface \"lo\" in this netns")]
    NoLoopback,
}

/// What [`inspect_here`] found of our routing objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingState {
    pub rule_v4: usize,
    pub rule_v6: usize,
    pub route_v4: usize,
    pub route_v6: usize,
}

impl RoutingState {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let what = what.into();
    move |source| RoutingError::Netlink { what, source }
}

fn block_on<T>(f: impl AsyncFnOnce(Handle) -> Result<T, RoutingError>) -> Result<T, RoutingError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RoutingError::Runtime)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

/// Adds the rule(s) and route(s) that are missing. `ipv6`: also the IPv6
/// rule and route, when `lo` has IPv6 in this netns.
pub fn ensure_here(ipv6: bool) -> Result<(), RoutingError> {
    block_on(async |h: Handle| {
        let lo = loopback_index(&h).await?;
        let v6 = ipv6 && lo_has_ipv6(&h, lo).await?;
        let families = [
            (IpVersion::V4, IpAddr::from(Ipv4Addr::UNSPECIFIED), true),
            (IpVersion::V6, IpAddr::from(Ipv6Addr::UNSPECIFIED), v6),
        ];
        for (version, any, wanted) in families {
            if !wanted {
                continue;
            }
            if our_rules(&h, version.clone()).await?.is_empty() {
                add_rule(&h, any.is_ipv6()).await?;
            }
            if our_routes(&h, version).await?.is_empty() {
                let msg = RouteMessageBuilder::<IpAddr>::new()
                    .destination_prefix(any, 0)
                    .expect("the unspecified address with prefix 0 is a valid destination")
                    .output_interface(lo)
                    .table_id(ROUTE_TABLE)
                    .kind(RouteType::Local)
                    .scope(RouteScope::Host)
                    .build();
                h.route()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("adding route local {any}/0 dev lo table 100")))?;
            }
        }
        Ok(())
    })
}

/// Deletes exactly our rule(s) and route(s) (both families), if present.
pub fn remove_here() -> Result<(), RoutingError> {
    block_on(async |h: Handle| {
        for v in [IpVersion::V4, IpVersion::V6] {
            for rule in our_rules(&h, v.clone()).await? {
                h.rule()
                    .del(rule)
                    .execute()
                    .await
                    .map_err(nl("deleting rule fwmark 0x111/0xfff lookup 100"))?;
            }
            for route in our_routes(&h, v.clone()).await? {
                h.route()
                    .del(route)
                    .execute()
                    .await
                    .map_err(nl("deleting local default route in table 100"))?;
            }
        }
        Ok(())
    })
}

/// Counts our rules and routes in the calling thread's netns.
pub fn inspect_here() -> Result<RoutingState, RoutingError> {
    block_on(async |h: Handle| {
        Ok(RoutingState {
            rule_v4: our_rules(&h, IpVersion::V4).await?.len(),
            rule_v6: our_rules(&h, IpVersion::V6).await?.len(),
            route_v4: our_routes(&h, IpVersion::V4).await?.len(),
            route_v6: our_routes(&h, IpVersion::V6).await?.len(),
        })
    })
}

async fn add_rule(h: &Handle, v6: bool) -> Result<(), RoutingError> {
    let req = h
        .rule()
        .add()
        .priority(RULE_PRIORITY)
        .fw_mark(CONN_MARK)
        .table_id(ROUTE_TABLE)
        .action(RuleAction::ToTable);
    let result = if v6 {
        let mut r = req.v6();
        r.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(MARK_MASK));
        r.execute().await
    } else {
        let mut r = req.v4();
        r.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(MARK_MASK));
        r.execute().await
    };
    result.map_err(nl(format!(
        "adding {} rule priority 32764 fwmark 0x111/0xfff lookup 100",
        if v6 { "IPv6" } else { "IPv4" }
    )))
}

async fn loopback_index(h: &Handle) -> Result<u32, RoutingError> {
    let mut links = h.link().get().match_name("lo".to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(RoutingError::NoLoopback),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(RoutingError::NoLoopback)
        }
        Err(e) => Err(nl("looking up lo")(e)),
    }
}

async fn lo_has_ipv6(h: &Handle, lo: u32) -> Result<bool, RoutingError> {
    let addrs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(lo)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses of lo"))?;
    Ok(addrs
        .iter()
        .any(|a| a.header.family == AddressFamily::Inet6))
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

async fn our_rules(h: &Handle, v: IpVersion) -> Result<Vec<RuleMessage>, RoutingError> {
    let rules: Vec<RuleMessage> = h
        .rule()
        .get(v)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing rules"))?;
    Ok(rules
        .into_iter()
        .filter(|r| {
            let has = |want: &RuleAttribute| r.attributes.iter().any(|a| a == want);
            has(&RuleAttribute::Priority(RULE_PRIORITY))
                && has(&RuleAttribute::FwMark(CONN_MARK))
                && has(&RuleAttribute::FwMask(MARK_MASK))
                && rule_table(r) == ROUTE_TABLE
        })
        .collect())
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

async fn our_routes(h: &Handle, v: IpVersion) -> Result<Vec<RouteMessage>, RoutingError> {
    let filter = match v {
        IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let routes: Vec<RouteMessage> = h
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes"))?;
    Ok(routes
        .into_iter()
        .filter(|r| {
            route_table(r) == ROUTE_TABLE
                && r.header.kind == RouteType::Local
                && r.header.destination_prefix_length == 0
        })
        .collect())
}
