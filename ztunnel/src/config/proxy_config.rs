//! Istio's ProxyConfig as upstream's ztunnel reads it: the mesh config's `defaultConfig`
//! (the file `./etc/istio/config/mesh`, when present) overlaid by the `PROXY_CONFIG`
//! environment variable (YAML or JSON). The fields ztunnel uses act as defaults under
//! the environment variables that name the same setting:
//!
//! | ProxyConfig field | default for |
//! |---|---|
//! | `discoveryAddress` | `XDS_ADDRESS` (`https://` added when it has no scheme), when no local config or Kubernetes discovery is set |
//! | `proxyAdminPort` | the `ADMIN_ADDR` port (on 127.0.0.1) |
//! | `statsPort` | the `STATS_ADDR` port |
//! | `concurrency` | `ZTUNNEL_WORKER_THREADS` (0: one per CPU) |
//! | `proxyMetadata` | `ISTIO_META_<KEY>` for each key (`DNS_CAPTURE`, `DNS_PROXY_ADDR`, …; with or without the prefix) |

use std::collections::HashMap;

use serde::Deserialize;

use super::ConfigError;

/// Where upstream reads the mesh config (relative to the working directory, `/` in the
/// image).
pub const MESH_CONFIG_FILE: &str = "./etc/istio/config/mesh";

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    #[serde(default)]
    default_config: Option<ProxyConfig>,
}

/// The ProxyConfig fields ztunnel reads (others are ignored, as upstream).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    #[serde(default)]
    discovery_address: Option<String>,
    #[serde(default)]
    proxy_admin_port: Option<u16>,
    #[serde(default)]
    stats_port: Option<u16>,
    #[serde(default)]
    concurrency: Option<u32>,
    #[serde(default)]
    proxy_metadata: HashMap<String, String>,
}

impl ProxyConfig {
    /// `mesh_file`: the mesh config file's text, if it exists; `env`: `PROXY_CONFIG`.
    pub fn parse(mesh_file: Option<&str>, env: Option<&str>) -> Result<Self, ConfigError> {
        let mesh = match mesh_file {
            None => None,
            Some(text) => serde_yaml_ng::from_str::<Option<MeshConfig>>(text)
                .map_err(|e| ConfigError {
                    field: "mesh config",
                    value: MESH_CONFIG_FILE.into(),
                    reason: format!("not a mesh config: {e}"),
                })?
                .and_then(|m| m.default_config),
        };
        let overlay = match env.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(text) => serde_yaml_ng::from_str::<ProxyConfig>(text)
                .map(Some)
                .map_err(|e| ConfigError {
                    field: "PROXY_CONFIG",
                    value: text.into(),
                    reason: format!("not a ProxyConfig: {e}"),
                })?,
        };
        let mut pc = mesh.unwrap_or_default();
        if let Some(o) = overlay {
            pc.discovery_address = o.discovery_address.or(pc.discovery_address);
            pc.proxy_admin_port = o.proxy_admin_port.or(pc.proxy_admin_port);
            pc.stats_port = o.stats_port.or(pc.stats_port);
            pc.concurrency = o.concurrency.or(pc.concurrency);
            pc.proxy_metadata.extend(o.proxy_metadata);
        }
        pc.proxy_metadata = pc
            .proxy_metadata
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("ISTIO_META_") {
                Some(stripped) => (stripped.to_string(), v),
                None => (k, v),
            })
            .collect();
        Ok(pc)
    }

    /// The value this config gives the environment variable `key` when it is unset.
    /// `wildcard`: `[::]` or `0.0.0.0` (`IPV6_ENABLED`); `local_source`: a local config
    /// or Kubernetes discovery is configured (then `discoveryAddress` is not used).
    pub fn default_for(&self, key: &str, wildcard: &str, local_source: bool) -> Option<String> {
        match key {
            "XDS_ADDRESS" if !local_source => self.discovery_address.as_ref().map(|a| {
                if a.contains("://") {
                    a.clone()
                } else {
                    format!("https://{a}")
                }
            }),
            "ADMIN_ADDR" => self.proxy_admin_port.map(|p| format!("127.0.0.1:{p}")),
            "STATS_ADDR" => self.stats_port.map(|p| format!("{wildcard}:{p}")),
            "ZTUNNEL_WORKER_THREADS" => self.concurrency.map(|c| c.to_string()),
            _ => key
                .strip_prefix("ISTIO_META_")
                .and_then(|k| self.proxy_metadata.get(k).cloned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  \
                        concurrency: 4\n  proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: \"false\"\n    \
                        FOO: mesh\n";

    #[test]
    fn env_overlays_the_mesh_file_and_prefixes_are_dropped() {
        let pc = ProxyConfig::parse(
            Some(MESH),
            Some(
                "{\"concurrency\": 2, \"statsPort\": 9020, \"proxyMetadata\": {\"FOO\": \"env\"}}",
            ),
        )
        .unwrap();
        assert_eq!(
            pc.default_for("XDS_ADDRESS", "[::]", false).as_deref(),
            Some("https://istiod.istio-system.svc:15012")
        );
        assert_eq!(pc.default_for("XDS_ADDRESS", "[::]", true), None);
        assert_eq!(
            pc.default_for("ZTUNNEL_WORKER_THREADS", "[::]", false)
                .as_deref(),
            Some("2")
        );
        assert_eq!(
            pc.default_for("STATS_ADDR", "0.0.0.0", false).as_deref(),
            Some("0.0.0.0:9020")
        );
        assert_eq!(pc.default_for("ADMIN_ADDR", "[::]", false), None);
        assert_eq!(
            pc.default_for("ISTIO_META_DNS_CAPTURE", "[::]", false)
                .as_deref(),
            Some("false")
        );
        assert_eq!(
            pc.default_for("ISTIO_META_FOO", "[::]", false).as_deref(),
            Some("env")
        );
        assert_eq!(pc.default_for("FOO", "[::]", false), None);
    }

    #[test]
    fn absent_and_empty_sources_give_nothing() {
        for (mesh, env) in [(None, None), (Some(""), Some("  ")), (Some("{}"), None)] {
            let pc = ProxyConfig::parse(mesh, env).unwrap();
            assert_eq!(pc, ProxyConfig::default(), "{mesh:?} {env:?}");
        }
    }

    #[test]
    fn malformed_sources_are_named() {
        let e = ProxyConfig::parse(None, Some("concurrency: many")).unwrap_err();
        assert_eq!(e.field, "PROXY_CONFIG");
        let e = ProxyConfig::parse(Some("defaultConfig: [1"), None).unwrap_err();
        assert_eq!(
            (e.field, e.value.as_str()),
            ("mesh config", MESH_CONFIG_FILE)
        );
    }
}
