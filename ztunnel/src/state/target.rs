//! The target an HBONE CONNECT names: used by the HBONE headers, the proxies and
//! telemetry alike.

use std::net::SocketAddr;

/// What an HBONE CONNECT names as its target (`:authority`): an address, or (double HBONE
/// through an east-west gateway, as upstream) a service hostname and service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HboneTarget {
    Addr(SocketAddr),
    Host { hostname: String, port: u16 },
}

impl From<SocketAddr> for HboneTarget {
    fn from(a: SocketAddr) -> Self {
        HboneTarget::Addr(a)
    }
}

/// As the authority string (`/debug/connections`).
impl serde::Serialize for HboneTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for HboneTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HboneTarget::Addr(a) => a.fmt(f),
            HboneTarget::Host { hostname, port } => write!(f, "{hostname}:{port}"),
        }
    }
}
