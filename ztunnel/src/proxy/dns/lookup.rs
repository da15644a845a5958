//! Answers from the mesh state: which Service (or ServiceEntry) a queried name means for
//! a client, and its addresses. Names are compared in lower case without the trailing dot.
//!
//! As upstream's DNS proxy, a name is tried as given, then as the Kubernetes names it
//! abbreviates from the client's namespace (`svc` → `svc.<ns>.svc.<domain>`, `svc.ns` →
//! `svc.ns.svc.<domain>`, `svc.ns.svc` → `svc.ns.svc.<domain>`), then with each search
//! domain stripped (and those expansions again); each candidate also matches wildcard
//! hosts (`*.example.com`). A name found by stripping a search domain is answered with a
//! CNAME to the stripped name (when there are records to follow it). Services with VIPs
//! answer with the VIPs on the client's network, headless Services with their endpoints'
//! addresses; a single-stack Service (`ipFamilies`) has no records of the other family.

use std::net::IpAddr;
use std::sync::Arc;

use crate::state::{Service, Snapshot};

/// The querying workload, as far as lookups care.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub namespace: &'a str,
    pub network: &'a str,
    /// `PREFERED_SERVICE_NAMESPACE` (upstream's spelling): among Services of one host in
    /// other namespaces, one in this namespace is taken unless one is canonical.
    pub preferred_namespace: Option<&'a str>,
}

/// The queried address family (record type A or AAAA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn matches(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// A name the mesh knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The stripped name when the query matched only after removing a search domain and
    /// there are addresses: the answer starts with a CNAME from the queried name to it,
    /// and the address records carry it.
    pub cname: Option<String>,
    /// The Service that matched (`namespace/hostname`, for the log).
    pub service: String,
    /// Addresses of the queried family, shuffled; empty is a valid answer (NOERROR, no
    /// records: the name exists).
    pub addrs: Vec<IpAddr>,
}

/// Lower case, without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Looks `name` up for `client`. `domain`: the cluster domain; `search`: the search
/// domains to strip (normalized). `None`: not a mesh name (forward it).
pub fn lookup(
    snap: &Snapshot,
    client: Client<'_>,
    domain: &str,
    search: &[String],
    name: &str,
    family: Family,
) -> Option<Found> {
    let name = normalize(name);
    if name.is_empty() {
        return None;
    }
    let svc_domain = format!("svc.{domain}");
    for alias in aliases(&name, client.namespace, domain, search) {
        for candidate in wildcards(&alias.name) {
            let is_wildcard = candidate.starts_with("*.");
            let Some(service) = best_match(snap, client, &candidate, &svc_domain) else {
                continue;
            };
            let addrs = addresses(snap, client, service, family);
            return Some(Found {
                // No records: an empty answer, without the CNAME (as upstream).
                cname: alias.stripped.filter(|_| !is_wildcard && !addrs.is_empty()),
                service: format!("{}/{}", service.namespace, service.hostname),
                addrs,
            });
        }
    }
    None
}

/// A name to try, and the stripped form it came from (search domain removed).
#[derive(Debug, PartialEq, Eq)]
struct Alias {
    name: String,
    stripped: Option<String>,
}

fn aliases(name: &str, namespace: &str, domain: &str, search: &[String]) -> Vec<Alias> {
    let mut out: Vec<Alias> = Vec::new();
    let mut add = |name: String, stripped: Option<&str>| {
        if !out.iter().any(|a| a.name == name) {
            out.push(Alias {
                name,
                stripped: stripped.map(str::to_string),
            });
        }
    };
    add(name.to_string(), None);
    for fqdn in kube_fqdns(name, namespace, domain) {
        add(fqdn, None);
    }
    for s in search {
        let Some(stripped) = name
            .strip_suffix(s.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|rest| !rest.is_empty())
        else {
            continue;
        };
        add(stripped.to_string(), Some(stripped));
        for fqdn in kube_fqdns(stripped, namespace, domain) {
            add(fqdn, Some(stripped));
        }
    }
    out
}

/// The Kubernetes names `name` may abbreviate for a client in `namespace`.
fn kube_fqdns(name: &str, namespace: &str, domain: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    let ends_in_svc = labels.len() > 1 && labels.last() == Some(&"svc");
    match labels.len() {
        1 => vec![format!("{name}.{namespace}.svc.{domain}")],
        2 => vec![
            format!("{name}.svc.{domain}"),
            format!("{name}.{namespace}.svc.{domain}"),
        ],
        3 if ends_in_svc => vec![format!("{name}.{domain}"), format!("{name}.svc.{domain}")],
        3 => vec![format!("{name}.svc.{domain}")],
        4 if ends_in_svc => vec![format!("{name}.{domain}")],
        _ => Vec::new(),
    }
}

/// `a.b.c` → `a.b.c`, `*.b.c`, `*.c`.
fn wildcards(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let mut rest = name;
    while let Some((_, tail)) = rest.split_once('.') {
        out.push(format!("*.{tail}"));
        rest = tail;
    }
    out
}

/// The Service named `host` this client means: one in its own namespace, else the
/// canonical one, else one in the preferred namespace, else the first by namespace. Services without host VIPs answer only
/// when they are Kubernetes Services (headless), not ServiceEntries (a ServiceEntry with
/// only CIDR VIPs is left to the upstream resolvers, as upstream). A Service not visible
/// to the client's namespace (`visibility: Namespace` elsewhere) is not a candidate: when
/// none is left the name is not the mesh's and is forwarded, as upstream.
fn best_match<'s>(
    snap: &'s Snapshot,
    client: Client<'_>,
    host: &str,
    svc_domain: &str,
) -> Option<&'s Arc<Service>> {
    let mut candidates = snap
        .services_by_host(host)
        .iter()
        .filter(|s| {
            !s.vips.is_empty()
                || normalize(&s.hostname)
                    .strip_suffix(svc_domain)
                    .is_some_and(|r| r.ends_with('.'))
        })
        .filter(|s| s.visible_for(Some(client.namespace)));
    let mut fallback: Option<&Arc<Service>> = None;
    for s in candidates.by_ref() {
        if s.namespace == client.namespace {
            return Some(s);
        }
        let preferred = |x: &Service| client.preferred_namespace == Some(x.namespace.as_str());
        match fallback {
            None => fallback = Some(s),
            Some(f) if f.canonical => {}
            Some(_) if s.canonical => fallback = Some(s),
            Some(f) if !preferred(f) && preferred(s) => fallback = Some(s),
            Some(_) => {}
        }
    }
    fallback
}

/// Whether `svc` serves addresses of `family`: a single-stack Service (`ipFamilies` IPv4
/// or IPv6) has none of the other family even when its endpoints are dual-stack pods (a
/// headless Service answers with its endpoints' addresses).
fn family_allowed(svc: &Service, family: Family) -> bool {
    match svc.ip_families.as_ref().and_then(|v| v.as_str()) {
        Some("IPv4") => family == Family::V4,
        Some("IPv6") => family == Family::V6,
        _ => true,
    }
}

fn addresses(snap: &Snapshot, client: Client<'_>, svc: &Service, family: Family) -> Vec<IpAddr> {
    if !family_allowed(svc, family) {
        return Vec::new();
    }
    let mut addrs: Vec<IpAddr> = if svc.vips.is_empty() {
        snap.endpoints(&svc.key())
            .iter()
            .filter_map(|ep| {
                ep.workload
                    .workload_ips
                    .iter()
                    .copied()
                    .find(|ip| family.matches(ip))
            })
            .collect()
    } else {
        svc.vips
            .iter()
            .filter(|v| v.network == client.network && family.matches(&v.address))
            .map(|v| v.address)
            .collect()
    };
    addrs.sort();
    addrs.dedup();
    rand::seq::SliceRandom::shuffle(addrs.as_mut_slice(), &mut rand::rng());
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;
    use crate::state::file::{FileDefaults, parse};

    const DOMAIN: &str = "cluster.local";

    fn snapshot() -> Arc<Snapshot> {
        let yaml = r#"
workloads:
  - uid: c1
    name: client
    namespace: ns1
    serviceAccount: sa
    workloadIps: ["10.0.0.1"]
  - uid: h1
    name: db-0
    namespace: ns1
    serviceAccount: sa
    workloadIps: ["10.0.0.21", "fd00::21"]
    services: {"ns1/db.ns1.svc.cluster.local": {5432: 5432}}
  - uid: h2
    name: db-1
    namespace: ns1
    serviceAccount: sa
    workloadIps: ["10.0.0.22"]
    services: {"ns1/db.ns1.svc.cluster.local": {5432: 5432}}
  - uid: h3
    name: v4db-0
    namespace: ns1
    serviceAccount: sa
    workloadIps: ["10.0.0.31", "fd00::31"]
    services: {"ns1/v4db.ns1.svc.cluster.local": {5432: 5432}, "ns1/v6db.ns1.svc.cluster.local": {5432: 5432}}
services:
  - name: v4db
    namespace: ns1
    hostname: v4db.ns1.svc.cluster.local
    ports: {5432: 5432}
    ipFamilies: IPv4
  - name: v6db
    namespace: ns1
    hostname: v6db.ns1.svc.cluster.local
    ports: {5432: 5432}
    ipFamilies: IPv6
  - name: web
    namespace: ns1
    hostname: web.ns1.svc.cluster.local
    vips: ["/10.96.0.10", "/fd00:96::10", "other/10.200.0.10"]
    ports: {80: 8080}
  - name: web
    namespace: ns2
    hostname: web.ns2.svc.cluster.local
    vips: ["/10.96.0.20"]
    ports: {80: 8080}
  - name: db
    namespace: ns1
    hostname: db.ns1.svc.cluster.local
    ports: {5432: 5432}
  - name: ext
    namespace: ns2
    hostname: api.example.com
    vips: ["/240.240.0.1"]
    ports: {443: 443}
  - name: ext
    namespace: ns3
    hostname: api.example.com
    vips: ["/240.240.0.3"]
    ports: {443: 443}
  - name: wild
    namespace: ns2
    hostname: "*.wild.example.com"
    vips: ["/240.240.0.9"]
    ports: {443: 443}
  - name: novip
    namespace: ns2
    hostname: novip.example.com
    ports: {443: 443}
  - name: private
    namespace: ns2
    hostname: private.ns2.svc.cluster.local
    vips: ["/10.96.0.30"]
    ports: {80: 80}
    visibility: Namespace
  - name: internal
    namespace: ns1
    hostname: internal.example.com
    vips: ["/240.240.0.11"]
    ports: {443: 443}
    visibility: Namespace
  - name: internal
    namespace: ns3
    hostname: internal.example.com
    vips: ["/240.240.0.13"]
    ports: {443: 443}
    visibility: Namespace
  - name: ranges
    namespace: ns2
    hostname: ranges.example.com
    cidrVips: [{network: "", cidr: 10.123.0.0/16}]
    ports: {443: 443}
"#;
        let lc = parse(
            yaml,
            std::path::Path::new("dns.yaml"),
            &FileDefaults {
                trust_domain: DOMAIN.into(),
                cluster_id: "Kubernetes".into(),
            },
        )
        .unwrap();
        let store = Store::new();
        store
            .source("file")
            .replace_all(lc.workloads, lc.services, lc.policies);
        store.snapshot()
    }

    fn ns1() -> Client<'static> {
        Client {
            namespace: "ns1",
            network: "",
            preferred_namespace: None,
        }
    }

    fn find(name: &str, client: Client<'_>, search: &[&str], family: Family) -> Option<Found> {
        let search: Vec<String> = search.iter().map(|s| s.to_string()).collect();
        lookup(&snapshot(), client, DOMAIN, &search, name, family)
    }

    fn ips(f: &Found) -> Vec<String> {
        let mut v: Vec<String> = f.addrs.iter().map(|a| a.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn kubernetes_short_names_expand_from_the_client_namespace() {
        for name in [
            "web",
            "web.ns1",
            "web.ns1.svc",
            "web.ns1.svc.cluster.local",
            "WEB.NS1.svc.cluster.local.",
        ] {
            let f = find(name, ns1(), &[], Family::V4).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(ips(&f), ["10.96.0.10"], "{name}");
            assert_eq!(f.cname, None, "{name}");
            assert_eq!(f.service, "ns1/web.ns1.svc.cluster.local");
        }
        let ns2 = Client {
            namespace: "ns2",
            network: "",
            preferred_namespace: None,
        };
        assert_eq!(
            ips(&find("web", ns2, &[], Family::V4).unwrap()),
            ["10.96.0.20"]
        );
        assert_eq!(
            ips(&find("web.ns1", ns2, &[], Family::V4).unwrap()),
            ["10.96.0.10"]
        );
        assert!(find("web.ns9", ns1(), &[], Family::V4).is_none());
        assert!(find("nothing", ns1(), &[], Family::V4).is_none());
        assert!(find("web.ns1.svc.other.domain", ns1(), &[], Family::V4).is_none());
    }

    #[test]
    fn family_and_network_select_the_vips() {
        let f = find("web", ns1(), &[], Family::V6).unwrap();
        assert_eq!(ips(&f), ["fd00:96::10"]);
        let other = Client {
            namespace: "ns1",
            network: "other",
            preferred_namespace: None,
        };
        assert_eq!(
            ips(&find("web", other, &[], Family::V4).unwrap()),
            ["10.200.0.10"]
        );
        // Known name without a record of the family: found, no addresses (NOERROR).
        let f = find("web.ns2", ns1(), &[], Family::V6).unwrap();
        assert!(f.addrs.is_empty());
    }

    #[test]
    fn headless_services_answer_with_endpoint_addresses() {
        let f = find("db", ns1(), &[], Family::V4).unwrap();
        assert_eq!(ips(&f), ["10.0.0.21", "10.0.0.22"]);
        let f = find("db", ns1(), &[], Family::V6).unwrap();
        assert_eq!(ips(&f), ["fd00::21"]);
    }

    #[test]
    fn single_stack_services_have_no_records_of_the_other_family() {
        // Dual-stack pods behind single-stack headless Services (upstream's
        // `service_family_allowed`): found, but nothing of the other family.
        let f = find("v4db", ns1(), &[], Family::V4).unwrap();
        assert_eq!(ips(&f), ["10.0.0.31"]);
        let f = find("v4db", ns1(), &[], Family::V6).unwrap();
        assert!(f.addrs.is_empty(), "{f:?}");
        let f = find("v6db", ns1(), &[], Family::V6).unwrap();
        assert_eq!(ips(&f), ["fd00::31"]);
        let f = find("v6db", ns1(), &[], Family::V4).unwrap();
        assert!(f.addrs.is_empty(), "{f:?}");
    }

    #[test]
    fn service_entries_prefer_the_client_namespace_then_the_first() {
        let ns3 = Client {
            namespace: "ns3",
            network: "",
            preferred_namespace: None,
        };
        assert_eq!(
            ips(&find("api.example.com", ns3, &[], Family::V4).unwrap()),
            ["240.240.0.3"]
        );
        assert_eq!(
            ips(&find("api.example.com", ns1(), &[], Family::V4).unwrap()),
            ["240.240.0.1"]
        );
        // A ServiceEntry without VIPs is left to the upstream resolvers.
        assert!(find("novip.example.com", ns1(), &[], Family::V4).is_none());
        // PREFERED_SERVICE_NAMESPACE picks among other namespaces' entries; the client's
        // own namespace still comes first.
        let prefer = |ns, preferred| Client {
            namespace: ns,
            network: "",
            preferred_namespace: Some(preferred),
        };
        let api = |c| ips(&find("api.example.com", c, &[], Family::V4).unwrap());
        assert_eq!(api(prefer("ns1", "ns3")), ["240.240.0.3"]);
        assert_eq!(api(prefer("ns1", "ns2")), ["240.240.0.1"]);
        assert_eq!(api(prefer("ns1", "nowhere")), ["240.240.0.1"]);
        assert_eq!(api(prefer("ns2", "ns3")), ["240.240.0.1"]);
    }

    #[test]
    fn namespace_scoped_services_answer_only_their_namespace() {
        let in_ns = |ns| Client {
            namespace: ns,
            network: "",
            preferred_namespace: None,
        };
        let f = find("private.ns2", in_ns("ns2"), &[], Family::V4).unwrap();
        assert_eq!(ips(&f), ["10.96.0.30"]);
        // From another namespace it is not the mesh's name: forwarded.
        assert!(find("private.ns2", ns1(), &[], Family::V4).is_none());
        assert!(find("private.ns2.svc.cluster.local", ns1(), &[], Family::V6).is_none());
        // Of two scoped entries for one host, each namespace sees its own; others none.
        let host = "internal.example.com";
        let ip_in = |ns| ips(&find(host, in_ns(ns), &[], Family::V4).unwrap());
        assert_eq!(ip_in("ns1"), ["240.240.0.11"]);
        assert_eq!(ip_in("ns3"), ["240.240.0.13"]);
        assert!(find(host, in_ns("ns2"), &[], Family::V4).is_none());
    }

    #[test]
    fn services_with_only_cidr_vips_are_forwarded() {
        assert!(find("ranges.example.com", ns1(), &[], Family::V4).is_none());
    }

    #[test]
    fn wildcard_hosts_match_subdomains_without_cname() {
        let f = find("a.b.wild.example.com", ns1(), &["example.com"], Family::V4).unwrap();
        assert_eq!(ips(&f), ["240.240.0.9"]);
        assert_eq!(f.cname, None);
        assert!(find("wild.example.com", ns1(), &[], Family::V4).is_none());
    }

    #[test]
    fn search_domains_are_stripped_and_answered_with_a_cname() {
        // The client's resolver appended its host's search domain.
        let f = find("web.corp.example", ns1(), &["corp.example"], Family::V4).unwrap();
        assert_eq!(f.cname.as_deref(), Some("web"));
        assert_eq!(ips(&f), ["10.96.0.10"]);
        let f = find("web.ns2.corp.example", ns1(), &["corp.example"], Family::V4).unwrap();
        assert_eq!(f.cname.as_deref(), Some("web.ns2"));
        assert_eq!(ips(&f), ["10.96.0.20"]);
        // Found by stripping, but no records of the family: an empty answer, no CNAME.
        let f = find("web.ns2.corp.example", ns1(), &["corp.example"], Family::V6).unwrap();
        assert_eq!(f.cname, None);
        assert!(f.addrs.is_empty());
        // Nothing left after stripping: not a match.
        assert!(find("corp.example", ns1(), &["corp.example"], Family::V4).is_none());
    }

    #[test]
    fn wildcards_and_fqdns() {
        assert_eq!(wildcards("a.b.c"), ["a.b.c", "*.b.c", "*.c"]);
        assert_eq!(wildcards("a"), ["a"]);
        assert_eq!(kube_fqdns("x", "ns", DOMAIN), ["x.ns.svc.cluster.local"]);
        assert_eq!(
            kube_fqdns("x.y", "ns", DOMAIN),
            ["x.y.svc.cluster.local", "x.y.ns.svc.cluster.local"]
        );
        assert_eq!(
            kube_fqdns("x.y.svc", "ns", DOMAIN),
            ["x.y.svc.cluster.local", "x.y.svc.svc.cluster.local"]
        );
        assert_eq!(
            kube_fqdns("x.y.z", "ns", DOMAIN),
            ["x.y.z.svc.cluster.local"]
        );
        assert_eq!(
            kube_fqdns("w.x.y.svc", "ns", DOMAIN),
            ["w.x.y.svc.cluster.local"]
        );
        assert!(kube_fqdns("w.x.y.z", "ns", DOMAIN).is_empty());
    }
}
