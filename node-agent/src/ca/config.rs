//! `node-agent ca` settings from the environment (names in ARCHITECTURE.md,
//! "node-agent ca"). Every rejection names the variable and the value.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// A `namespace/serviceaccount` pair (`CA_TRUSTED_NODE_ACCOUNTS` entries).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for ServiceAccountRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok(ServiceAccountRef {
                    namespace: ns.to_string(),
                    name: sa.to_string(),
                })
            }
            _ => Err(format!("{s:?} is not namespace/serviceaccount")),
        }
    }
}

/// Everything `node-agent ca` needs.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// `CA_LISTEN_ADDR` (`[::]:15012`): gRPC over TLS.
    pub listen_addr: SocketAddr,
    /// `CA_CERT_DIR` (`/etc/cacerts`): `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
    /// `cert-chain.pem`.
    pub cert_dir: PathBuf,
    /// `CA_SERVER_DNS_NAMES`: SANs of the serving certificate (entries that parse as IP
    /// addresses become IP SANs).
    pub server_dns_names: Vec<String>,
    /// `CA_TRUSTED_NODE_ACCOUNTS` (`istio-system/ztunnel`).
    pub trusted_node_accounts: Vec<ServiceAccountRef>,
    /// `TOKEN_AUDIENCES` (`istio-ca`).
    pub token_audiences: Vec<String>,
    /// `MAX_WORKLOAD_CERT_TTL` (24h): cap on `validity_duration`, also the default.
    pub max_workload_cert_ttl: Duration,
    /// `TRUST_DOMAIN` (`cluster.local`).
    pub trust_domain: String,
    /// `CLUSTER_ID` (`Kubernetes`): the only cluster whose tokens are accepted.
    pub cluster_id: String,
    /// `READY_PORT` (8000), all addresses: `/readyz`.
    pub ready_addr: SocketAddr,
    /// `METRICS_PORT` (15014), all addresses: `/metrics`.
    pub metrics_addr: SocketAddr,
    /// `POD_NAME`, `POD_NAMESPACE` (logs only).
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    /// How often `CA_CERT_DIR` is re-read (the mounted Secret changes in place). Not an
    /// environment setting; tests shorten it.
    pub reload_interval: Duration,
}

/// A rejected setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {field}={value:?}: {reason}")]
pub struct CaConfigError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

const ALL_V6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

impl CaConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<CaConfig, CaConfigError> {
        CaConfig::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get` (`None` or empty = unset).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CaConfig, CaConfigError> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let err = |field: &'static str, value: &str, reason: String| CaConfigError {
            field,
            value: value.to_string(),
            reason,
        };
        let list = |field: &str, default: &str| -> Vec<String> {
            get(field)
                .unwrap_or_else(|| default.to_string())
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        let port = |field: &'static str, default: u16| -> Result<SocketAddr, CaConfigError> {
            match get(field) {
                None => Ok(SocketAddr::new(ALL_V6, default)),
                Some(v) => v
                    .parse::<u16>()
                    .map(|p| SocketAddr::new(ALL_V6, p))
                    .map_err(|e| err(field, &v, format!("not a port number: {e}"))),
            }
        };

        let listen_raw = get("CA_LISTEN_ADDR").unwrap_or_else(|| "[::]:15012".into());
        let listen_addr = listen_raw.parse().map_err(|e| {
            err(
                "CA_LISTEN_ADDR",
                &listen_raw,
                format!("not an ip:port address: {e}"),
            )
        })?;

        let mut trusted_node_accounts = Vec::new();
        for entry in list("CA_TRUSTED_NODE_ACCOUNTS", "istio-system/ztunnel") {
            trusted_node_accounts.push(
                entry
                    .parse()
                    .map_err(|r| err("CA_TRUSTED_NODE_ACCOUNTS", &entry, r))?,
            );
        }
        let token_audiences = list("TOKEN_AUDIENCES", "istio-ca");
        if token_audiences.is_empty() {
            return Err(err(
                "TOKEN_AUDIENCES",
                "",
                "at least one audience required".into(),
            ));
        }

        let ttl_raw = get("MAX_WORKLOAD_CERT_TTL").unwrap_or_else(|| "24h".into());
        let max_workload_cert_ttl = humantime::parse_duration(&ttl_raw).map_err(|e| {
            err(
                "MAX_WORKLOAD_CERT_TTL",
                &ttl_raw,
                format!("not a duration like 24h: {e}"),
            )
        })?;
        if max_workload_cert_ttl < Duration::from_secs(60) {
            return Err(err(
                "MAX_WORKLOAD_CERT_TTL",
                &ttl_raw,
                "must be at least 1m".into(),
            ));
        }

        let trust_domain = get("TRUST_DOMAIN").unwrap_or_else(|| "cluster.local".into());
        if trust_domain.contains('/') || trust_domain.contains(char::is_whitespace) {
            return Err(err(
                "TRUST_DOMAIN",
                &trust_domain,
                "must be a DNS-like name without '/' or spaces".into(),
            ));
        }
        let server_dns_names = list("CA_SERVER_DNS_NAMES", "");
        for name in &server_dns_names {
            if name.parse::<IpAddr>().is_err()
                && rustls_pki_types::DnsName::try_from(name.as_str()).is_err()
            {
                return Err(err(
                    "CA_SERVER_DNS_NAMES",
                    name,
                    "not a DNS name or IP address".into(),
                ));
            }
        }

        Ok(CaConfig {
            listen_addr,
            cert_dir: get("CA_CERT_DIR")
                .unwrap_or_else(|| "/etc/cacerts".into())
                .into(),
            server_dns_names,
            trusted_node_accounts,
            token_audiences,
            max_workload_cert_ttl,
            trust_domain,
            cluster_id: get("CLUSTER_ID").unwrap_or_else(|| "Kubernetes".into()),
            ready_addr: port("READY_PORT", 8000)?,
            metrics_addr: port("METRICS_PORT", 15014)?,
            pod_name: get("POD_NAME"),
            pod_namespace: get("POD_NAMESPACE"),
            reload_interval: Duration::from_secs(10),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<CaConfig, CaConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CaConfig::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_chart_contract() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.listen_addr.to_string(), "[::]:15012");
        assert_eq!(c.cert_dir, PathBuf::from("/etc/cacerts"));
        assert_eq!(
            c.trusted_node_accounts,
            vec![ServiceAccountRef {
                namespace: "istio-system".into(),
                name: "ztunnel".into()
            }]
        );
        assert_eq!(c.token_audiences, vec!["istio-ca".to_string()]);
        assert_eq!(c.max_workload_cert_ttl, Duration::from_secs(86400));
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.cluster_id, "Kubernetes");
        assert_eq!(c.ready_addr.port(), 8000);
        assert_eq!(c.metrics_addr.port(), 15014);
        assert!(c.server_dns_names.is_empty());
    }

    #[test]
    fn chart_values_parse() {
        let c = cfg(&[
            ("CA_LISTEN_ADDR", "[::]:15012"),
            (
                "CA_SERVER_DNS_NAMES",
                "mesh-ca,mesh-ca.istio-system,mesh-ca.istio-system.svc",
            ),
            (
                "CA_TRUSTED_NODE_ACCOUNTS",
                "istio-system/ztunnel, kube-system/ztunnel-b",
            ),
            ("TOKEN_AUDIENCES", "istio-ca,other"),
            ("MAX_WORKLOAD_CERT_TTL", "12h"),
            ("READY_PORT", "8001"),
        ])
        .unwrap();
        assert_eq!(c.server_dns_names.len(), 3);
        assert_eq!(
            c.trusted_node_accounts[1].to_string(),
            "kube-system/ztunnel-b"
        );
        assert_eq!(c.token_audiences, vec!["istio-ca", "other"]);
        assert_eq!(c.max_workload_cert_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(c.ready_addr.port(), 8001);
    }

    #[test]
    fn rejections_name_the_variable() {
        for (vars, field) in [
            (vec![("CA_LISTEN_ADDR", "15012")], "CA_LISTEN_ADDR"),
            (
                vec![("CA_TRUSTED_NODE_ACCOUNTS", "ztunnel")],
                "CA_TRUSTED_NODE_ACCOUNTS",
            ),
            (
                vec![("MAX_WORKLOAD_CERT_TTL", "forever")],
                "MAX_WORKLOAD_CERT_TTL",
            ),
            (
                vec![("MAX_WORKLOAD_CERT_TTL", "1s")],
                "MAX_WORKLOAD_CERT_TTL",
            ),
            (vec![("TOKEN_AUDIENCES", " , ")], "TOKEN_AUDIENCES"),
            (vec![("TRUST_DOMAIN", "a/b")], "TRUST_DOMAIN"),
            (vec![("READY_PORT", "http")], "READY_PORT"),
            (
                vec![("CA_SERVER_DNS_NAMES", "bad name")],
                "CA_SERVER_DNS_NAMES",
            ),
        ] {
            let e = cfg(&vars).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }
}
