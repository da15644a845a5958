//! Building and reading the HBONE `CONNECT` request.
//!
//! `:method CONNECT`, `:authority <ip>:<port>` (the HBONE target; `<hostname>:<port>`
//! through an east-west gateway), plus `forwarded` (`for="<client ip:port>"`,
//! `;host=<service hostname>` when known), `baggage` (source workload description), a
//! fresh W3C `traceparent`, and on the inner CONNECT of double HBONE
//! `x-forwarded-network` (the client's network).

use std::net::SocketAddr;

use http::{HeaderValue, Method, Request, Uri, Version};

pub use crate::state::HboneTarget;
use crate::state::Workload;

pub const BAGGAGE: &str = "baggage";
pub const FORWARDED: &str = "forwarded";
pub const TRACEPARENT: &str = "traceparent";
/// The client's network, on the inner CONNECT of double HBONE (upstream's header).
pub const X_FORWARDED_NETWORK: &str = "x-forwarded-network";

/// What goes into one CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The HBONE target (`podIP:targetPort`, or `hostname:servicePort` through an
    /// east-west gateway).
    pub authority: HboneTarget,
    /// The original client address (`forwarded: for=`).
    pub client: Option<SocketAddr>,
    /// Service hostname (`forwarded: ;host=`).
    pub host: Option<String>,
    /// Pre-built baggage value (see [`baggage_for`]).
    pub baggage: Option<String>,
    /// The client's network (`x-forwarded-network`), on double HBONE's inner CONNECT.
    pub forwarded_network: Option<String>,
}

/// The HTTP/2 request for `req` (body streamed separately).
pub fn build_request(req: &ConnectRequest) -> Request<()> {
    let uri: Uri = Uri::builder()
        .authority(req.authority.to_string())
        .build()
        .expect("a socket address or a DNS name with a port is a valid authority");
    let mut r = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .version(Version::HTTP_2)
        .body(())
        .expect("static request parts are valid");
    let h = r.headers_mut();
    if let Some(client) = req.client {
        let mut v = format!("for=\"{client}\"");
        if let Some(host) = &req.host {
            v.push_str(";host=");
            v.push_str(host);
        }
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(FORWARDED, v);
        }
    }
    if let Some(b) = &req.baggage
        && let Ok(v) = HeaderValue::from_str(b)
    {
        h.insert(BAGGAGE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&traceparent()) {
        h.insert(TRACEPARENT, v);
    }
    if let Some(n) = &req.forwarded_network
        && let Ok(v) = HeaderValue::from_str(n)
    {
        h.insert(X_FORWARDED_NETWORK, v);
    }
    r
}

/// `k8s.cluster.name=..,k8s.namespace.name=..,k8s.<type>.name=..,service.name=..,service.version=..`
/// and, when the workload has a locality, `cloud.region=..,cloud.availability_zone=..`.
pub fn baggage_for(w: &Workload) -> String {
    let mut parts = Vec::with_capacity(7);
    if !w.cluster_id.is_empty() {
        parts.push(format!("k8s.cluster.name={}", w.cluster_id));
    }
    parts.push(format!("k8s.namespace.name={}", w.namespace));
    parts.push(format!(
        "k8s.{}.name={}",
        w.workload_type_or_default(),
        w.telemetry_name()
    ));
    let svc = if w.canonical_name.is_empty() {
        &w.name
    } else {
        &w.canonical_name
    };
    if !svc.is_empty() {
        parts.push(format!("service.name={svc}"));
    }
    if !w.canonical_revision.is_empty() {
        parts.push(format!("service.version={}", w.canonical_revision));
    }
    if !w.locality.region.is_empty() {
        parts.push(format!("cloud.region={}", w.locality.region));
    }
    if !w.locality.zone.is_empty() {
        parts.push(format!("cloud.availability_zone={}", w.locality.zone));
    }
    parts.join(",")
}

/// A fresh W3C trace context: version 00, random trace and span ids, not sampled.
pub fn traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-00")
}

/// Source details a receiver can read from `baggage`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub workload_name: Option<String>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
}

pub fn parse_baggage(value: &str) -> Baggage {
    let mut b = Baggage::default();
    for item in value.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else {
            continue;
        };
        let v = Some(v.trim().to_string());
        match k.trim() {
            "k8s.cluster.name" => b.cluster = v,
            "k8s.namespace.name" => b.namespace = v,
            "service.name" => b.service_name = v,
            "service.version" => b.service_version = v,
            "cloud.region" => b.region = v,
            "cloud.availability_zone" => b.zone = v,
            k if k.starts_with("k8s.") && k.ends_with(".name") => b.workload_name = v,
            _ => {}
        }
    }
    b
}

/// The `host=` parameter of a `forwarded` header value (quotes removed), if any.
pub fn forwarded_host(value: &str) -> Option<String> {
    value
        .split([',', ';'])
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// Why a request is not a valid HBONE CONNECT (→ 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("authority {0:?} is not <ip>:<port>")]
    Authority(String),
    #[error("authority {0:?} is neither <ip>:<port> nor <hostname>:<port>")]
    HostAuthority(String),
}

/// The HBONE target of a request, an address or a hostname (see [`HboneTarget`]).
pub fn parse_authority<B>(req: &Request<B>) -> Result<HboneTarget, BadRequest> {
    match parse_target(req) {
        Ok(a) => Ok(HboneTarget::Addr(a)),
        Err(BadRequest::Authority(authority)) => {
            let host = authority
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .filter(|(h, p)| {
                    *p != 0
                        && !h.is_empty()
                        && h.len() <= 253
                        && h.split('.').all(|label| {
                            !label.is_empty()
                                && label.len() <= 63
                                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        })
                });
            match host {
                Some((hostname, port)) => Ok(HboneTarget::Host {
                    hostname: hostname.to_ascii_lowercase(),
                    port,
                }),
                None => Err(BadRequest::HostAuthority(authority)),
            }
        }
        Err(e) => Err(e),
    }
}

/// The HBONE target of a request.
pub fn parse_target<B>(req: &Request<B>) -> Result<SocketAddr, BadRequest> {
    if req.method() != Method::CONNECT {
        return Err(BadRequest::Method(req.method().to_string()));
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    authority
        .parse::<SocketAddr>()
        // IPv4-mapped IPv6 authorities name the IPv4 workload.
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .map_err(|_| BadRequest::Authority(authority.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        serde_yaml_ng::from_str(
            "name: sleep-abc\nnamespace: default\nworkloadName: sleep\nworkloadType: deployment\n\
             canonicalName: sleep\ncanonicalRevision: v1\nclusterId: Kubernetes\n",
        )
        .unwrap()
    }

    #[test]
    fn connect_request_headers() {
        let r = build_request(&ConnectRequest {
            authority: "10.0.0.2:8080".parse::<SocketAddr>().unwrap().into(),
            client: Some("10.0.0.1:41000".parse().unwrap()),
            host: Some("echo.default.svc.cluster.local".into()),
            baggage: Some(baggage_for(&workload())),
            forwarded_network: None,
        });
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().to_string(), "10.0.0.2:8080");
        assert_eq!(
            r.headers()[FORWARDED],
            "for=\"10.0.0.1:41000\";host=echo.default.svc.cluster.local"
        );
        assert_eq!(
            r.headers()[BAGGAGE],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
        );
        let tp = r.headers()[TRACEPARENT].to_str().unwrap();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!((parts[0], parts[1].len(), parts[2].len()), ("00", 32, 16));
        assert_eq!(parse_target(&r).unwrap(), "10.0.0.2:8080".parse().unwrap());
        let b = parse_baggage(r.headers()[BAGGAGE].to_str().unwrap());
        assert_eq!(b.namespace.as_deref(), Some("default"));
        assert_eq!(b.workload_name.as_deref(), Some("sleep"));
        assert_eq!(b.service_version.as_deref(), Some("v1"));
        assert!(r.headers().get(X_FORWARDED_NETWORK).is_none());
    }

    #[test]
    fn double_hbone_inner_connect_names_the_service_and_the_network() {
        let r = build_request(&ConnectRequest {
            authority: HboneTarget::Host {
                hostname: "echo.default.svc.cluster.local".into(),
                port: 80,
            },
            client: Some("10.0.0.1:41000".parse().unwrap()),
            host: Some("echo.default.svc.cluster.local".into()),
            baggage: None,
            forwarded_network: Some("net1".into()),
        });
        assert_eq!(r.uri().to_string(), "echo.default.svc.cluster.local:80");
        assert_eq!(r.headers()[X_FORWARDED_NETWORK], "net1");
        assert_eq!(
            parse_authority(&r),
            Ok(HboneTarget::Host {
                hostname: "echo.default.svc.cluster.local".into(),
                port: 80
            })
        );
    }

    #[test]
    fn baggage_carries_the_locality_as_istio() {
        let mut w = workload();
        w.locality.region = "eu-west1".into();
        w.locality.zone = "eu-west1-b".into();
        let v = baggage_for(&w);
        assert!(
            v.ends_with(",cloud.region=eu-west1,cloud.availability_zone=eu-west1-b"),
            "{v}"
        );
        let b = parse_baggage(&v);
        assert_eq!(
            (b.region.as_deref(), b.zone.as_deref()),
            (Some("eu-west1"), Some("eu-west1-b"))
        );
        // No locality: neither key is sent.
        assert!(!baggage_for(&workload()).contains("cloud."));
    }

    #[test]
    fn forwarded_host_parameter() {
        let h = |v| forwarded_host(v);
        assert_eq!(
            h("for=\"10.0.0.1:41000\";host=echo.default.svc.cluster.local").as_deref(),
            Some("echo.default.svc.cluster.local")
        );
        assert_eq!(h("for=1.2.3.4; Host=\"a.b\"").as_deref(), Some("a.b"));
        assert_eq!(h("for=\"10.0.0.1:41000\""), None);
        assert_eq!(h("host="), None);
    }

    #[test]
    fn ipv6_authority_and_forwarded() {
        let r = build_request(&ConnectRequest {
            authority: "[fd00::2]:80".parse::<SocketAddr>().unwrap().into(),
            client: Some("[fd00::1]:5000".parse().unwrap()),
            host: None,
            baggage: None,
            forwarded_network: None,
        });
        assert_eq!(r.uri().to_string(), "[fd00::2]:80");
        assert_eq!(r.headers()[FORWARDED], "for=\"[fd00::1]:5000\"");
        assert_eq!(parse_target(&r).unwrap(), "[fd00::2]:80".parse().unwrap());
    }

    #[test]
    fn rejects_non_connect_and_bad_authority() {
        let get = Request::builder()
            .method(Method::GET)
            .uri("http://10.0.0.1:80/")
            .body(())
            .unwrap();
        assert_eq!(parse_target(&get), Err(BadRequest::Method("GET".into())));
        for bad in ["example.com:80", "10.0.0.1", "10.0.0.1:99999"] {
            let r = Request::builder()
                .method(Method::CONNECT)
                .uri(bad)
                .body(())
                .unwrap();
            assert!(
                matches!(parse_target(&r), Err(BadRequest::Authority(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn authorities_name_an_address_or_a_service_hostname() {
        let req = |authority: &str| {
            Request::builder()
                .method(Method::CONNECT)
                .uri(authority)
                .body(())
                .unwrap()
        };
        assert_eq!(
            parse_authority(&req("10.0.0.2:8080")),
            Ok(HboneTarget::Addr("10.0.0.2:8080".parse().unwrap()))
        );
        assert_eq!(
            parse_authority(&req("Echo.default.svc.cluster.local:80")),
            Ok(HboneTarget::Host {
                hostname: "echo.default.svc.cluster.local".into(),
                port: 80
            })
        );
        for bad in ["echo.default:0", "bad_name.default:80", "a..b:80"] {
            assert!(
                matches!(
                    parse_authority(&req(bad)),
                    Err(BadRequest::HostAuthority(_))
                ),
                "{bad}"
            );
        }
        let get = Request::builder()
            .method(Method::GET)
            .uri("http://x/")
            .body(())
            .unwrap();
        assert!(matches!(parse_authority(&get), Err(BadRequest::Method(_))));
    }
}
