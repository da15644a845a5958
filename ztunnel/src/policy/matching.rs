//! Whether one policy matches one connection.
//!
//! OR over rules, AND over clauses, OR over matches; within a match every
//! non-empty field must hold (positive list: any entry; `not*` list: no
//! entry). Structural edge cases follow upstream ztunnel: a policy without
//! rules never matches, a rule without clauses and a clause without matches
//! always match, a match with no field set never matches.
//!
//! Principals are matched against `<td>/ns/<ns>/sa/<sa>` (no `spiffe://`,
//! as Istio writes them) piece by piece, without building the string.
//!
//! A connection without a peer identity (plaintext) has no principal,
//! namespace or service account: a positive identity condition fails for it
//! and a `not*` identity condition holds for it (nothing in the list equals
//! the absent identity). This is upstream ztunnel's behaviour and Envoy's
//! (`not_id` over an `authenticated` principal is true without TLS). So
//! `DENY notPrincipals: ["*"]` denies plaintext, `ALLOW notNamespaces: [x]`
//! allows plaintext.

use std::net::IpAddr;

use super::model::{Action, Authorization, IpBlock, Match, ServiceAccountMatch, StringMatch};

/// A peer's SPIFFE identity in Istio's shape,
/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`, borrowed
/// from wherever the caller keeps it (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity<'a> {
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

impl<'a> PeerIdentity<'a> {
    /// Parse `spiffe://td/ns/x/sa/y` (the scheme may be omitted). `None` for
    /// any other shape.
    pub fn from_spiffe(id: &'a str) -> Option<Self> {
        let rest = id.strip_prefix("spiffe://").unwrap_or(id);
        let mut parts = rest.split('/');
        let (td, ns_kw, ns, sa_kw, sa) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        let ok = parts.next().is_none()
            && ns_kw == "ns"
            && sa_kw == "sa"
            && !td.is_empty()
            && !ns.is_empty()
            && !sa.is_empty();
        ok.then_some(PeerIdentity {
            trust_domain: td,
            namespace: ns,
            service_account: sa,
        })
    }

    /// The principal `<td>/ns/<ns>/sa/<sa>` as its five pieces.
    fn pieces(&self) -> [&'a [u8]; 5] {
        [
            self.trust_domain.as_bytes(),
            b"/ns/",
            self.namespace.as_bytes(),
            b"/sa/",
            self.service_account.as_bytes(),
        ]
    }

    fn principal_len(&self) -> usize {
        self.trust_domain.len() + self.namespace.len() + self.service_account.len() + 8
    }

    /// Whether the principal starts with `prefix`, without building it.
    fn principal_starts_with(&self, prefix: &str) -> bool {
        let mut rest = prefix.as_bytes();
        for piece in self.pieces() {
            if rest.len() <= piece.len() {
                return piece.starts_with(rest);
            }
            if !rest.starts_with(piece) {
                return false;
            }
            rest = &rest[piece.len()..];
        }
        rest.is_empty()
    }

    /// Whether the principal ends with `suffix`, without building it.
    fn principal_ends_with(&self, suffix: &str) -> bool {
        let mut rest = suffix.as_bytes();
        for piece in self.pieces().iter().rev() {
            if rest.len() <= piece.len() {
                return piece.ends_with(rest);
            }
            if !rest.ends_with(piece) {
                return false;
            }
            rest = &rest[..rest.len() - piece.len()];
        }
        rest.is_empty()
    }

    /// Istio principal matching (the principal has no `spiffe://`).
    pub fn principal_matches(&self, m: &StringMatch) -> bool {
        match m {
            StringMatch::Exact(x) => {
                x.len() == self.principal_len() && self.principal_starts_with(x)
            }
            StringMatch::Prefix(x) => self.principal_starts_with(x),
            StringMatch::Suffix(x) => self.principal_ends_with(x),
            StringMatch::Presence => true,
        }
    }
}

impl std::fmt::Display for PeerIdentity<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The connection attributes a policy can look at. Borrowed; building one
/// does not allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    /// Proven peer identity; `None` for plaintext.
    pub identity: Option<PeerIdentity<'a>>,
    /// `None`: not known (see [`policy_matches`]).
    pub src_ip: Option<IpAddr>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

impl<'a> Peer<'a> {
    pub fn new(
        identity: Option<PeerIdentity<'a>>,
        src_ip: Option<IpAddr>,
        dst_ip: IpAddr,
        dst_port: u16,
    ) -> Self {
        Peer {
            identity,
            src_ip,
            dst_ip,
            dst_port,
        }
    }
}

/// Whether `policy` matches the connection. The action matters only when the source
/// address is unknown: its conditions then fail closed, holding for a DENY (or AUDIT)
/// policy and failing for an ALLOW one.
pub fn policy_matches(policy: &Authorization, peer: &Peer<'_>) -> bool {
    let unknown_src_holds = policy.action != Action::Allow;
    policy.rules.iter().any(|rule| {
        rule.iter().all(|clause| {
            clause.is_empty()
                || clause
                    .iter()
                    .any(|m| match_matches(m, peer, unknown_src_holds))
        })
    })
}

fn match_matches(m: &Match, peer: &Peer<'_>, unknown_src_holds: bool) -> bool {
    if m.is_empty() {
        return false;
    }
    let id = peer.identity.as_ref();
    let source_ips = match &peer.src_ip {
        Some(ip) => field(&m.source_ips, &m.not_source_ips, |b: &IpBlock| {
            b.contains(ip)
        }),
        None => (m.source_ips.is_empty() && m.not_source_ips.is_empty()) || unknown_src_holds,
    };
    field(&m.destination_ports, &m.not_destination_ports, |p| {
        *p == peer.dst_port
    }) && source_ips
        && field(&m.destination_ips, &m.not_destination_ips, |b: &IpBlock| {
            b.contains(&peer.dst_ip)
        })
        && field(&m.principals, &m.not_principals, |s| {
            id.is_some_and(|id| id.principal_matches(s))
        })
        && field(&m.namespaces, &m.not_namespaces, |s| {
            id.is_some_and(|id| s.matches(id.namespace))
        })
        && field(
            &m.service_accounts,
            &m.not_service_accounts,
            |sa: &ServiceAccountMatch| {
                id.is_some_and(|id| {
                    id.namespace == sa.namespace && id.service_account == sa.service_account
                })
            },
        )
}

/// Positive list: empty or any entry holds; negative list: no entry holds.
fn field<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Rule, Scope};

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
            Some("10.0.0.1".parse().unwrap()),
            "10.0.1.1".parse().unwrap(),
            8080,
        )
    }

    /// mTLS from td/ns/a/sa/client at 10.0.0.1 to 10.0.1.1:8080.
    fn tls_a() -> Peer<'static> {
        Peer::new(
            PeerIdentity::from_spiffe("spiffe://td/ns/a/sa/client"),
            Some("10.0.0.1".parse().unwrap()),
            "10.0.1.1".parse().unwrap(),
            8080,
        )
    }

    /// mTLS from other-td/ns/b/sa/admin at 192.168.0.9 to [fd00::1]:9090.
    fn tls_b() -> Peer<'static> {
        Peer::new(
            PeerIdentity::from_spiffe("spiffe://other-td/ns/b/sa/admin"),
            Some("192.168.0.9".parse().unwrap()),
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
    fn identity_parsing() {
        let id = PeerIdentity::from_spiffe("spiffe://td/ns/a/sa/client").unwrap();
        assert_eq!(
            (id.trust_domain, id.namespace, id.service_account),
            ("td", "a", "client")
        );
        assert_eq!(id.to_string(), "spiffe://td/ns/a/sa/client");
        assert_eq!(
            PeerIdentity::from_spiffe("td/ns/a/sa/c").map(|i| i.service_account),
            Some("c")
        );
        for odd in [
            "spiffe://td/ns/a",
            "spiffe://td/x/a/sa/c",
            "td/ns//sa/c",
            "spiffe:///ns/a/sa/c",
            "td/ns/a/sa/c/d",
            "",
        ] {
            assert_eq!(PeerIdentity::from_spiffe(odd), None, "{odd}");
        }
    }

    /// Piecewise principal matching agrees with matching the joined string.
    #[test]
    fn principal_matching_without_joining() {
        let ids = [
            "spiffe://td/ns/a/sa/client",
            "spiffe://cluster.local/ns/é/sa/x",
        ];
        let patterns = [
            "",
            "t",
            "td",
            "td/",
            "td/ns/",
            "td/ns/a",
            "td/ns/a/sa/client",
            "td/ns/a/sa/clientx",
            "xtd/ns/a/sa/client",
            "/sa/client",
            "a/sa/client",
            "client",
            "t",
            "/ns/a/",
            "é",
            "cluster.local/ns/é",
            "/ns/é/sa/x",
            "x",
            "sa/x",
            "cluster.local/ns/é/sa/x",
            "cluster.local/ns/",
            "d/ns/a/sa/client",
            "td/ns/a/sa/clien",
        ];
        for id in ids {
            let parsed = PeerIdentity::from_spiffe(id).unwrap();
            let joined = id.strip_prefix("spiffe://").unwrap();
            for p in patterns {
                for m in [
                    StringMatch::Exact(p.into()),
                    StringMatch::Prefix(p.into()),
                    StringMatch::Suffix(p.into()),
                    StringMatch::Presence,
                ] {
                    assert_eq!(
                        parsed.principal_matches(&m),
                        m.matches(joined),
                        "{id} {m:?}"
                    );
                }
            }
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
    fn an_unknown_source_address_fails_closed() {
        let by_ip = |action, m: Match| Authorization {
            action,
            ..single(m)
        };
        let from = Match {
            source_ips: vec![block("10.0.0.0/8")],
            ..Default::default()
        };
        let not_from = Match {
            not_source_ips: vec![block("10.0.0.0/8")],
            ..Default::default()
        };
        let port = Match {
            destination_ports: vec![8080],
            ..Default::default()
        };
        let unknown = Peer {
            src_ip: None,
            ..tls_a()
        };
        // A DENY that needs the address matches; an ALLOW that needs it does not.
        assert!(policy_matches(&by_ip(Action::Deny, from.clone()), &unknown));
        assert!(policy_matches(
            &by_ip(Action::Deny, not_from.clone()),
            &unknown
        ));
        assert!(!policy_matches(&by_ip(Action::Allow, from), &unknown));
        assert!(!policy_matches(&by_ip(Action::Allow, not_from), &unknown));
        // Conditions on other attributes are unaffected.
        assert!(policy_matches(
            &by_ip(Action::Allow, port.clone()),
            &unknown
        ));
        assert!(policy_matches(&by_ip(Action::Deny, port), &unknown));
    }

    #[test]
    fn ipv4_mapped_source() {
        let pol = single(Match {
            source_ips: vec![block("10.0.0.0/8")],
            ..Default::default()
        });
        let peer = Peer::new(
            None,
            Some("::ffff:10.1.2.3".parse().unwrap()),
            "10.0.1.1".parse().unwrap(),
            80,
        );
        assert!(policy_matches(&pol, &peer));
    }
}
