//! Whether one policy matches one connection.
//!
//! OR over rules, AND over clauses, OR over matches; within a match every
//! non-empty field must hold (positive list: any entry; `not*` list: no
//! entry). Structural edge cases follow upstream ztunnel: a policy without
//! rules never matches, a rule without clauses and a clause without matches
//! always match, a match with no field set never matches.
//!
//! A connection without a peer identity (plaintext) has no principal,
//! namespace or service account: a positive identity condition fails for it
//! and a `not*` identity condition holds for it (nothing in the list equals
//! the absent identity). This is upstream ztunnel's behaviour and Envoy's
//! (`not_id` over an `authenticated` principal is true without TLS). So
//! `DENY notPrincipals: ["*"]` denies plaintext, `ALLOW notNamespaces: [x]`
//! allows plaintext.

use std::net::IpAddr;

use super::model::{Authorization, IpBlock, Match, ServiceAccountMatch, StringMatch};

/// The connection attributes a policy can look at. Borrowed; building one
/// does not allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    /// Peer identity without `spiffe://`: `<td>/ns/<ns>/sa/<sa>`.
    pub principal: Option<&'a str>,
    /// Namespace and service account parsed out of the principal.
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

impl<'a> Peer<'a> {
    /// `identity` is the peer's SPIFFE id (`spiffe://td/ns/x/sa/y`; the
    /// scheme may be omitted); `None` for plaintext.
    pub fn new(identity: Option<&'a str>, src_ip: IpAddr, dst_ip: IpAddr, dst_port: u16) -> Self {
        let principal = identity.map(|id| id.strip_prefix("spiffe://").unwrap_or(id));
        let (namespace, service_account) = match principal.and_then(split_principal) {
            Some((ns, sa)) => (Some(ns), Some(sa)),
            None => (None, None),
        };
        Peer {
            principal,
            namespace,
            service_account,
            src_ip,
            dst_ip,
            dst_port,
        }
    }
}

/// `<td>/ns/<ns>/sa/<sa>` → `(ns, sa)`; `None` for any other shape.
fn split_principal(principal: &str) -> Option<(&str, &str)> {
    let mut parts = principal.split('/');
    let (_td, ns_kw, ns, sa_kw, sa) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if parts.next().is_some() || ns_kw != "ns" || sa_kw != "sa" || ns.is_empty() || sa.is_empty() {
        return None;
    }
    Some((ns, sa))
}

/// Whether `policy` matches the connection (regardless of its action).
pub fn policy_matches(policy: &Authorization, peer: &Peer<'_>) -> bool {
    policy.rules.iter().any(|rule| {
        rule.iter()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| match_matches(m, peer)))
    })
}

fn match_matches(m: &Match, peer: &Peer<'_>) -> bool {
    if m.is_empty() {
        return false;
    }
    field(&m.destination_ports, &m.not_destination_ports, |p| {
        *p == peer.dst_port
    }) && field(&m.source_ips, &m.not_source_ips, |b: &IpBlock| {
        b.contains(&peer.src_ip)
    }) && field(&m.destination_ips, &m.not_destination_ips, |b: &IpBlock| {
        b.contains(&peer.dst_ip)
    }) && field(&m.principals, &m.not_principals, |s| {
        opt_str(s, peer.principal)
    }) && field(&m.namespaces, &m.not_namespaces, |s| {
        opt_str(s, peer.namespace)
    }) && field(
        &m.service_accounts,
        &m.not_service_accounts,
        |sa: &ServiceAccountMatch| {
            peer.namespace == Some(sa.namespace.as_str())
                && peer.service_account == Some(sa.service_account.as_str())
        },
    )
}

fn opt_str(m: &StringMatch, value: Option<&str>) -> bool {
    value.is_some_and(|v| m.matches(v))
}

/// Positive list: empty or any entry holds; negative list: no entry holds.
fn field<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Action, Rule, Scope};

    fn policy(rules: Vec<Rule>) -> Authorization {
        Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: Scope::Global,
            action: Action::Allow,
            rules,
            dry_run: false,
        }
    }

    fn single(m: Match) -> Authorization {
        policy(vec![vec![vec![m]]])
    }

    /// Plaintext from 10.0.0.1 to 10.0.1.1:8080.
    fn plaintext() -> Peer<'static> {
        Peer::new(
            None,
            "10.0.0.1".parse().unwrap(),
            "10.0.1.1".parse().unwrap(),
            8080,
        )
    }

    /// mTLS from td/ns/a/sa/client at 10.0.0.1 to 10.0.1.1:8080.
    fn tls_a() -> Peer<'static> {
        Peer::new(
            Some("spiffe://td/ns/a/sa/client"),
            "10.0.0.1".parse().unwrap(),
            "10.0.1.1".parse().unwrap(),
            8080,
        )
    }

    /// mTLS from other-td/ns/b/sa/admin at 192.168.0.9 to [fd00::1]:9090.
    fn tls_b() -> Peer<'static> {
        Peer::new(
            Some("spiffe://other-td/ns/b/sa/admin"),
            "192.168.0.9".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            9090,
        )
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    fn block(s: &str) -> IpBlock {
        s.parse().unwrap()
    }

    fn sa(ns: &str, sa: &str) -> ServiceAccountMatch {
        ServiceAccountMatch {
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn peer_parsing() {
        let p = tls_a();
        assert_eq!(p.principal, Some("td/ns/a/sa/client"));
        assert_eq!(p.namespace, Some("a"));
        assert_eq!(p.service_account, Some("client"));
        let p = Peer::new(Some("td/ns/a/sa/c"), p.src_ip, p.dst_ip, 1);
        assert_eq!((p.namespace, p.service_account), (Some("a"), Some("c")));
        for odd in [
            "spiffe://td/ns/a",
            "spiffe://td/x/a/sa/c",
            "td/ns//sa/c",
            "td/ns/a/sa/c/d",
        ] {
            let p = Peer::new(Some(odd), p.src_ip, p.dst_ip, 1);
            assert!(p.principal.is_some(), "{odd}");
            assert_eq!((p.namespace, p.service_account), (None, None), "{odd}");
        }
    }

    /// One table row: a single-match policy and the expected result for the
    /// three connections (plaintext, tls_a, tls_b).
    struct Row {
        name: &'static str,
        m: Match,
        want: [bool; 3],
    }

    #[test]
    fn every_field() {
        let rows = vec![
            Row {
                name: "namespaces",
                m: Match {
                    namespaces: vec![exact("a")],
                    ..Default::default()
                },
                want: [false, true, false],
            },
            Row {
                name: "notNamespaces (plaintext satisfies it)",
                m: Match {
                    not_namespaces: vec![exact("a")],
                    ..Default::default()
                },
                want: [true, false, true],
            },
            Row {
                name: "namespaces presence",
                m: Match {
                    namespaces: vec![StringMatch::Presence],
                    ..Default::default()
                },
                want: [false, true, true],
            },
            Row {
                name: "serviceAccounts",
                m: Match {
                    service_accounts: vec![sa("a", "client")],
                    ..Default::default()
                },
                want: [false, true, false],
            },
            Row {
                name: "serviceAccounts wrong namespace",
                m: Match {
                    service_accounts: vec![sa("b", "client")],
                    ..Default::default()
                },
                want: [false, false, false],
            },
            Row {
                name: "notServiceAccounts",
                m: Match {
                    not_service_accounts: vec![sa("a", "client")],
                    ..Default::default()
                },
                want: [true, false, true],
            },
            Row {
                name: "principals exact",
                m: Match {
                    principals: vec![exact("td/ns/a/sa/client")],
                    ..Default::default()
                },
                want: [false, true, false],
            },
            Row {
                name: "principals with spiffe:// never match (Istio writes them without)",
                m: Match {
                    principals: vec![exact("spiffe://td/ns/a/sa/client")],
                    ..Default::default()
                },
                want: [false, false, false],
            },
            Row {
                name: "principals * = any authenticated",
                m: Match {
                    principals: vec![StringMatch::from_istio_pattern("*")],
                    ..Default::default()
                },
                want: [false, true, true],
            },
            Row {
                name: "principals suffix wildcard",
                m: Match {
                    principals: vec![StringMatch::from_istio_pattern("*/sa/admin")],
                    ..Default::default()
                },
                want: [false, false, true],
            },
            Row {
                name: "principals prefix wildcard",
                m: Match {
                    principals: vec![StringMatch::from_istio_pattern("td/ns/a/*")],
                    ..Default::default()
                },
                want: [false, true, false],
            },
            Row {
                name: "principals wildcard in the middle is literal",
                m: Match {
                    principals: vec![StringMatch::from_istio_pattern("*/ns/a/sa/*")],
                    ..Default::default()
                },
                want: [false, false, false],
            },
            Row {
                name: "notPrincipals * = plaintext only",
                m: Match {
                    not_principals: vec![StringMatch::Presence],
                    ..Default::default()
                },
                want: [true, false, false],
            },
            Row {
                name: "notPrincipals exact",
                m: Match {
                    not_principals: vec![exact("td/ns/a/sa/client")],
                    ..Default::default()
                },
                want: [true, false, true],
            },
            Row {
                name: "sourceIps CIDR",
                m: Match {
                    source_ips: vec![block("10.0.0.0/24")],
                    ..Default::default()
                },
                want: [true, true, false],
            },
            Row {
                name: "sourceIps bare address",
                m: Match {
                    source_ips: vec![block("192.168.0.9")],
                    ..Default::default()
                },
                want: [false, false, true],
            },
            Row {
                name: "notSourceIps",
                m: Match {
                    not_source_ips: vec![block("10.0.0.0/8")],
                    ..Default::default()
                },
                want: [false, false, true],
            },
            Row {
                name: "destinationIps v6",
                m: Match {
                    destination_ips: vec![block("fd00::/8")],
                    ..Default::default()
                },
                want: [false, false, true],
            },
            Row {
                name: "notDestinationIps",
                m: Match {
                    not_destination_ips: vec![block("10.0.1.1")],
                    ..Default::default()
                },
                want: [false, false, true],
            },
            Row {
                name: "destinationPorts",
                m: Match {
                    destination_ports: vec![80, 8080],
                    ..Default::default()
                },
                want: [true, true, false],
            },
            Row {
                name: "notDestinationPorts",
                m: Match {
                    not_destination_ports: vec![8080],
                    ..Default::default()
                },
                want: [false, false, true],
            },
            Row {
                name: "fields are ANDed",
                m: Match {
                    namespaces: vec![exact("a")],
                    destination_ports: vec![9090],
                    ..Default::default()
                },
                want: [false, false, false],
            },
            Row {
                name: "positive and negative on one field",
                m: Match {
                    source_ips: vec![block("0.0.0.0/0"), block("::/0")],
                    not_source_ips: vec![block("10.0.0.1")],
                    ..Default::default()
                },
                want: [false, false, true],
            },
            Row {
                name: "empty match never matches",
                m: Match::default(),
                want: [false, false, false],
            },
        ];
        let peers = [plaintext(), tls_a(), tls_b()];
        for row in rows {
            let pol = single(row.m);
            for (peer, want) in peers.iter().zip(row.want) {
                assert_eq!(policy_matches(&pol, peer), want, "{}: {:?}", row.name, peer);
            }
        }
    }

    #[test]
    fn structure() {
        let ns_a = || Match {
            namespaces: vec![exact("a")],
            ..Default::default()
        };
        let ns_b = || Match {
            namespaces: vec![exact("b")],
            ..Default::default()
        };
        let port_8080 = || Match {
            destination_ports: vec![8080],
            ..Default::default()
        };
        let cases: Vec<(&str, Vec<Rule>, [bool; 3])> = vec![
            ("no rules: never", vec![], [false, false, false]),
            ("empty rule: always", vec![vec![]], [true, true, true]),
            (
                "empty clause: always",
                vec![vec![vec![]]],
                [true, true, true],
            ),
            (
                "OR over matches",
                vec![vec![vec![ns_a(), ns_b()]]],
                [false, true, true],
            ),
            (
                "AND over clauses",
                vec![vec![vec![ns_a(), ns_b()], vec![port_8080()]]],
                [false, true, false],
            ),
            (
                "OR over rules",
                vec![vec![vec![ns_b()]], vec![vec![port_8080()]]],
                [true, true, true],
            ),
            (
                "empty clause inside a rule is neutral",
                vec![vec![vec![], vec![ns_a()]]],
                [false, true, false],
            ),
        ];
        let peers = [plaintext(), tls_a(), tls_b()];
        for (name, rules, want) in cases {
            let pol = policy(rules);
            for (peer, want) in peers.iter().zip(want) {
                assert_eq!(policy_matches(&pol, peer), want, "{name}: {peer:?}");
            }
        }
    }

    #[test]
    fn ipv4_mapped_source() {
        let pol = single(Match {
            source_ips: vec![block("10.0.0.0/8")],
            ..Default::default()
        });
        let peer = Peer::new(
            None,
            "::ffff:10.1.2.3".parse().unwrap(),
            "10.0.1.1".parse().unwrap(),
            80,
        );
        assert!(policy_matches(&pol, &peer));
    }
}
