//! SOCKS5 (`UNSTABLE_ENABLE_SOCKS5`, as upstream): an application that cannot be
//! captured asks the proxy for a destination on `127.0.0.1:15080` in its netns, and the
//! connection then goes exactly as a captured outbound connection to that destination
//! would ([`super::outbound::handle_to`]: waypoints, services, HBONE, passthrough,
//! policy, metrics, access log).
//!
//! The subset of RFC 1928 upstream serves: version 5, the "no authentication" method
//! only (any other offer is answered `0xFF` and closed), the CONNECT command only
//! (others: reply `0x07`), IPv4, IPv6 and domain-name addresses (other types: `0x08`).
//! A domain name is looked up as the DNS proxy answers it for the client (a mesh
//! Service's hostname, or a Kubernetes short name of one, gives its VIP on the client's
//! network; [`super::dns::lookup`]), else with the system resolver within
//! `CONNECTION_TIMEOUT`; neither: reply `0x04` (host unreachable). Unlike upstream this
//! also works with the DNS proxy off.
//!
//! As upstream, the success reply (bound address `0.0.0.0:0`) is sent once the request
//! is read, before the route is taken: a destination that then cannot be reached closes
//! the connection instead of answering with an error code.
//!
//! The greeting and the request must arrive within `HANDSHAKE_TIMEOUT`. Malformed input
//! closes the connection with a log naming the client and counts in
//! `ztunnel_connections_refused_total{direction="outbound"}` (`bad_request`;
//! `handshake_timeout` when too slow, `upstream_unavailable` for a name that does not
//! resolve).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::conntrack::ConnGuard;
use super::dns::lookup::{self, Client, Family};
use super::{ProxyCtx, ProxyScope, outbound};
use crate::telemetry::{Direction, RefusalReason};

const VERSION: u8 = 5;
const METHOD_NO_AUTH: u8 = 0x00;
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// RFC 1928 reply codes this proxy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum ReplyCode {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    HostUnreachable = 0x04,
    CommandNotSupported = 0x07,
    AddressTypeNotSupported = 0x08,
}

/// What a parser made of the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step<T> {
    Done(T),
    /// The message is at least this many bytes long in all: read up to there (never
    /// further, so no byte of the client's payload is consumed).
    Need(usize),
}

/// Where the client asked to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    Addr(SocketAddr),
    Domain(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Domain(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Input this proxy does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum WireError {
    #[error("not SOCKS5 (version byte {0:#04x})")]
    Version(u8),
    #[error("no acceptable authentication method (offered {0:02x?}; only 00, none, is served)")]
    NoAcceptableMethod(Vec<u8>),
    #[error("command {0:#04x} not supported (only CONNECT)")]
    Command(u8),
    #[error("address type {0:#04x} not supported")]
    AddressType(u8),
    #[error("domain name {0:?} is empty or not UTF-8")]
    Domain(String),
}

impl WireError {
    /// The bytes to answer with before closing, where the protocol has an answer.
    fn answer(&self) -> Option<Vec<u8>> {
        match self {
            WireError::Version(_) => None,
            WireError::NoAcceptableMethod(_) => Some(vec![VERSION, METHOD_NONE_ACCEPTABLE]),
            WireError::Command(_) => Some(reply(ReplyCode::CommandNotSupported, None)),
            WireError::AddressType(_) => Some(reply(ReplyCode::AddressTypeNotSupported, None)),
            WireError::Domain(_) => Some(reply(ReplyCode::GeneralFailure, None)),
        }
    }
}

/// The method-selection message (`VER NMETHODS METHODS...`): accepted when it offers
/// "no authentication".
pub(super) fn parse_greeting(buf: &[u8]) -> Result<Step<()>, WireError> {
    let [version, n, ..] = *buf else {
        return Ok(Step::Need(2));
    };
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let len = 2 + usize::from(n);
    let Some(methods) = buf.get(2..len) else {
        return Ok(Step::Need(len));
    };
    if methods.contains(&METHOD_NO_AUTH) {
        Ok(Step::Done(()))
    } else {
        Err(WireError::NoAcceptableMethod(methods.to_vec()))
    }
}

/// The request (`VER CMD RSV ATYP DST.ADDR DST.PORT`), read whole before the command is
/// judged so a refusal leaves nothing unread.
pub(super) fn parse_request(buf: &[u8]) -> Result<Step<Target>, WireError> {
    let [version, command, _reserved, atyp, ..] = *buf else {
        return Ok(Step::Need(4));
    };
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let addr_len = match atyp {
        ATYP_IPV4 => 4,
        ATYP_IPV6 => 16,
        ATYP_DOMAIN => match buf.get(4) {
            None => return Ok(Step::Need(5)),
            Some(&n) => 1 + usize::from(n),
        },
        other => return Err(WireError::AddressType(other)),
    };
    let len = 4 + addr_len + 2;
    if buf.len() < len {
        return Ok(Step::Need(len));
    }
    if command != CMD_CONNECT {
        return Err(WireError::Command(command));
    }
    let addr = &buf[4..4 + addr_len];
    let port = u16::from_be_bytes([buf[len - 2], buf[len - 1]]);
    let ip = |bytes: &[u8]| -> IpAddr {
        match bytes.len() {
            4 => Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes")).into(),
            _ => Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes")).into(),
        }
    };
    Ok(Step::Done(match atyp {
        ATYP_DOMAIN => {
            let name = &addr[1..];
            match std::str::from_utf8(name) {
                Ok(s) if !s.is_empty() => Target::Domain(s.to_string(), port),
                _ => return Err(WireError::Domain(String::from_utf8_lossy(name).into())),
            }
        }
        _ => Target::Addr(SocketAddr::new(ip(addr), port)),
    }))
}

/// A reply (`VER REP RSV ATYP BND.ADDR BND.PORT`); without a bound address, `0.0.0.0:0`.
pub(super) fn reply(code: ReplyCode, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut out = vec![VERSION, code as u8, 0];
    match bound.ip() {
        IpAddr::V4(ip) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// Why a negotiation ended without a target.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one message with `parse`, exactly as many bytes as it needs.
async fn read_message<T>(
    client: &mut TcpStream,
    parse: fn(&[u8]) -> Result<Step<T>, WireError>,
) -> Result<T, Failure> {
    let mut buf = Vec::with_capacity(16);
    loop {
        match parse(&buf)? {
            Step::Done(v) => return Ok(v),
            Step::Need(len) => {
                let have = buf.len();
                buf.resize(len, 0);
                client.read_exact(&mut buf[have..]).await?;
            }
        }
    }
}

/// Method negotiation and the request.
async fn negotiate(client: &mut TcpStream) -> Result<Target, Failure> {
    read_message(client, parse_greeting).await?;
    client.write_all(&[VERSION, METHOD_NO_AUTH]).await?;
    read_message(client, parse_request).await
}

/// Serves one SOCKS5 client.
pub(super) async fn handle(
    ctx: Arc<ProxyCtx>,
    mut client: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
) {
    let cfg = &ctx.inputs.cfg;
    let metrics = &ctx.inputs.metrics;
    let refuse = |reason| metrics.refused(Direction::Outbound, reason);
    let target = match tokio::time::timeout(cfg.handshake_timeout, negotiate(&mut client)).await {
        Ok(Ok(t)) => t,
        Err(_) => {
            tracing::warn!(src = %peer, timeout = ?cfg.handshake_timeout, "socks5: handshake not finished in time; closing");
            return refuse(RefusalReason::handshake_timeout);
        }
        Ok(Err(Failure::Io(e))) => {
            tracing::debug!(src = %peer, error = %e, "socks5: client went away during the handshake");
            return refuse(RefusalReason::bad_request);
        }
        Ok(Err(Failure::Wire(e))) => {
            tracing::warn!(src = %peer, error = %e, "socks5: request refused; closing");
            if let Some(answer) = e.answer() {
                let _ = client.write_all(&answer).await;
            }
            return refuse(RefusalReason::bad_request);
        }
    };
    let dst = match &target {
        Target::Addr(a) => *a,
        Target::Domain(host, port) => match resolve(&ctx, peer, host, *port).await {
            Ok(a) => a,
            Err(why) => {
                tracing::warn!(src = %peer, target = %target, error = %why, "socks5: cannot resolve the requested host; closing");
                let _ = client
                    .write_all(&reply(ReplyCode::HostUnreachable, None))
                    .await;
                return refuse(RefusalReason::upstream_unavailable);
            }
        },
    };
    if let Err(e) = client.write_all(&reply(ReplyCode::Succeeded, None)).await {
        tracing::debug!(src = %peer, target = %target, error = %e, "socks5: cannot send the reply; closing");
        return;
    }
    tracing::debug!(src = %peer, target = %target, dst = %dst, "socks5: connecting");
    outbound::handle_to(ctx, client, peer, dst, guard).await
}

/// `host` as the client means it: a mesh name, as the DNS proxy would answer the client
/// (its namespace's short names included; the client's address family first), else the
/// system resolver within `CONNECTION_TIMEOUT`.
async fn resolve(
    ctx: &ProxyCtx,
    peer: SocketAddr,
    host: &str,
    port: u16,
) -> Result<SocketAddr, String> {
    let cfg = &ctx.inputs.cfg;
    {
        let snap = ctx.inputs.state.snapshot();
        let src = outbound::source_workload(ctx, &snap, peer);
        let namespace = match (&src, &ctx.scope) {
            (Some(w), _) => w.namespace.as_str(),
            (None, ProxyScope::Workload(info)) => info.namespace.as_str(),
            (None, ProxyScope::Node) => "",
        };
        let client = Client {
            namespace,
            network: src.as_ref().map_or(&cfg.network, |w| &w.network),
            preferred_namespace: cfg.preferred_service_namespace.as_deref(),
        };
        let families = match (peer.is_ipv4(), cfg.ipv6_enabled) {
            (_, false) => &[Family::V4][..],
            (true, true) => &[Family::V4, Family::V6],
            (false, true) => &[Family::V6, Family::V4],
        };
        let mut mesh_name = None;
        for &family in families {
            let domain = &cfg.cluster_domain;
            if let Some(found) = lookup::lookup(&snap, client, domain, &[], host, family) {
                if let Some(ip) = found.addrs.first() {
                    return Ok(SocketAddr::new(*ip, port));
                }
                mesh_name = Some(found.service);
            }
        }
        if let Some(service) = mesh_name {
            return Err(format!(
                "service {service} has no address for network {:?}",
                client.network
            ));
        }
    }
    match tokio::time::timeout(cfg.connect_timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| "no addresses".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", cfg.connect_timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_offering_no_authentication_is_accepted() {
        assert_eq!(parse_greeting(&[5, 1, 0]), Ok(Step::Done(())));
        assert_eq!(parse_greeting(&[5, 3, 2, 1, 0]), Ok(Step::Done(())));
    }

    #[test]
    fn greeting_without_no_authentication_is_refused_with_ff() {
        let e = parse_greeting(&[5, 2, 1, 2]).unwrap_err();
        assert_eq!(e, WireError::NoAcceptableMethod(vec![1, 2]));
        assert_eq!(e.answer(), Some(vec![5, 0xFF]));
        // No methods at all: nothing acceptable either.
        let e = parse_greeting(&[5, 0]).unwrap_err();
        assert_eq!(e, WireError::NoAcceptableMethod(vec![]));
    }

    #[test]
    fn other_versions_are_closed_without_an_answer() {
        let e = parse_greeting(&[4, 1, 0]).unwrap_err();
        assert_eq!(e, WireError::Version(4));
        assert_eq!(e.answer(), None);
        assert_eq!(
            parse_request(&[4, 1, 0, 1, 10, 0, 0, 1, 0, 80]),
            Err(WireError::Version(4))
        );
    }

    #[test]
    fn truncated_messages_ask_for_exactly_the_rest() {
        assert_eq!(parse_greeting(&[]), Ok(Step::Need(2)));
        assert_eq!(parse_greeting(&[5]), Ok(Step::Need(2)));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(Step::Need(4)));
        assert_eq!(parse_request(&[5, 1, 0]), Ok(Step::Need(4)));
        assert_eq!(parse_request(&[5, 1, 0, ATYP_IPV4, 10]), Ok(Step::Need(10)));
        assert_eq!(parse_request(&[5, 1, 0, ATYP_IPV6]), Ok(Step::Need(22)));
        assert_eq!(parse_request(&[5, 1, 0, ATYP_DOMAIN]), Ok(Step::Need(5)));
        assert_eq!(
            parse_request(&[5, 1, 0, ATYP_DOMAIN, 3, b'a']),
            Ok(Step::Need(10))
        );
    }

    #[test]
    fn connect_requests_for_all_address_types() {
        assert_eq!(
            parse_request(&[5, 1, 0, ATYP_IPV4, 10, 1, 2, 3, 0x1f, 0x90]),
            Ok(Step::Done(Target::Addr("10.1.2.3:8080".parse().unwrap())))
        );
        let mut v6 = vec![5, 1, 0, ATYP_IPV6];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse_request(&v6),
            Ok(Step::Done(Target::Addr("[fd00::1]:443".parse().unwrap())))
        );
        let name = b"b.ns-b.svc.cluster.local";
        let mut d = vec![5, 1, 0, ATYP_DOMAIN, name.len() as u8];
        d.extend_from_slice(name);
        d.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            parse_request(&d),
            Ok(Step::Done(Target::Domain(
                "b.ns-b.svc.cluster.local".into(),
                80
            )))
        );
    }

    #[test]
    fn other_commands_get_07_after_the_whole_request() {
        // BIND (2) and UDP ASSOCIATE (3): refused once the address is read.
        assert_eq!(parse_request(&[5, 2, 0, ATYP_IPV4, 10]), Ok(Step::Need(10)));
        let e = parse_request(&[5, 3, 0, ATYP_IPV4, 10, 0, 0, 1, 0, 53]).unwrap_err();
        assert_eq!(e, WireError::Command(3));
        assert_eq!(e.answer().unwrap()[..2], [5, 0x07]);
    }

    #[test]
    fn bad_address_types_and_names_are_refused() {
        let e = parse_request(&[5, 1, 0, 0x02]).unwrap_err();
        assert_eq!(e, WireError::AddressType(2));
        assert_eq!(e.answer().unwrap()[..2], [5, 0x08]);
        assert!(matches!(
            parse_request(&[5, 1, 0, ATYP_DOMAIN, 0, 0, 80]),
            Err(WireError::Domain(_))
        ));
        assert!(matches!(
            parse_request(&[5, 1, 0, ATYP_DOMAIN, 1, 0xFF, 0, 80]),
            Err(WireError::Domain(_))
        ));
    }

    #[test]
    fn replies_carry_the_bound_address() {
        assert_eq!(
            reply(ReplyCode::Succeeded, None),
            [5, 0, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            reply(
                ReplyCode::HostUnreachable,
                Some("10.0.0.1:258".parse().unwrap())
            ),
            [5, 4, 0, ATYP_IPV4, 10, 0, 0, 1, 1, 2]
        );
        let v6 = reply(ReplyCode::GeneralFailure, Some("[::1]:1".parse().unwrap()));
        assert_eq!(v6.len(), 22);
        assert_eq!(v6[..4], [5, 1, 0, ATYP_IPV6]);
    }
}
