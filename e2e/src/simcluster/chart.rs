//! What the Helm chart gives each container, read from the chart's own
//! golden files (`charts/tests/golden/env-{inpod,geneve}.txt`, kept equal to
//! the rendered chart by `make test-chart`), so the harness runs the
//! programs exactly as the chart configures them: command, host network,
//! user, capabilities, mounts and the complete environment (literal values
//! and downward-API `fieldRef`s).
//!
//! The golden files do not carry everything a Pod needs; what the harness
//! adds from the chart templates is in [`super::components`] (labels,
//! probes, ports, the projected token's audience and expiry, volume names).

use std::path::PathBuf;

/// The in-pod golden file (compiled in).
pub const GOLDEN_INPOD: &str = include_str!("../../../charts/tests/golden/env-inpod.txt");
/// The GENEVE golden file (compiled in).
pub const GOLDEN_GENEVE: &str = include_str!("../../../charts/tests/golden/env-geneve.txt");

/// Path of a golden file in the repository (for messages).
pub fn golden_path(mode_name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/tests/golden")
        .join(format!("env-{mode_name}.txt"))
}

#[derive(Debug, thiserror::Error)]
#[error("chart golden file {file} line {line}: {reason}")]
pub struct ChartError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// Where a mount's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    HostPath(String),
    EmptyDir,
    Secret(String),
    ConfigMap(String),
    /// A projected volume (the chart's are service-account tokens).
    Projected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartMount {
    pub path: String,
    pub source: MountSource,
    pub read_only: bool,
}

/// An environment value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath`.
    FieldRef(String),
    /// `valueFrom.resourceFieldRef`: (container, resource), divisor 1.
    ResourceFieldRef(String, String),
}

/// One container of the rendered chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartContainer {
    /// The section title, e.g. `node-agent ca`.
    pub section: String,
    /// `Deployment`, `DaemonSet`.
    pub workload_kind: String,
    /// e.g. `mesh-ca`.
    pub workload_name: String,
    pub container: String,
    pub command: Vec<String>,
    pub host_network: bool,
    pub uid: u32,
    pub capabilities: Vec<String>,
    pub mounts: Vec<ChartMount>,
    pub env: Vec<(String, EnvValue)>,
}

impl ChartContainer {
    pub fn env_value(&self, name: &str) -> Option<&EnvValue> {
        self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// All containers of one golden file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartGolden {
    pub containers: Vec<ChartContainer>,
}

impl ChartGolden {
    /// The container of workload `workload_name` (e.g. `ztunnel`).
    pub fn workload(&self, workload_name: &str) -> Option<&ChartContainer> {
        self.containers
            .iter()
            .find(|c| c.workload_name == workload_name)
    }
}

/// Parses a golden file.
pub fn parse(text: &str, file: &str) -> Result<ChartGolden, ChartError> {
    let err = |line: usize, reason: String| ChartError {
        file: file.to_string(),
        line,
        reason,
    };
    let mut containers: Vec<ChartContainer> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            // [node-agent ca] Deployment/mesh-ca container=ca
            let (section, rest) = rest
                .split_once(']')
                .ok_or_else(|| err(n, "section title without ]".into()))?;
            let mut words = rest.split_whitespace();
            let workload = words
                .next()
                .ok_or_else(|| err(n, "no Kind/name after the section title".into()))?;
            let (kind, name) = workload
                .split_once('/')
                .ok_or_else(|| err(n, format!("{workload:?} is not Kind/name")))?;
            let container = words
                .next()
                .and_then(|w| w.strip_prefix("container="))
                .ok_or_else(|| err(n, "no container=NAME".into()))?;
            containers.push(ChartContainer {
                section: section.to_string(),
                workload_kind: kind.into(),
                workload_name: name.into(),
                container: container.into(),
                command: Vec::new(),
                host_network: false,
                uid: 0,
                capabilities: Vec::new(),
                mounts: Vec::new(),
                env: Vec::new(),
            });
            continue;
        }
        let Some(c) = containers.last_mut() else {
            if line.starts_with('#') {
                continue; // file header
            }
            return Err(err(n, "content before the first [section]".into()));
        };
        if let Some(cmd) = line.strip_prefix("# command:") {
            c.command = cmd.split_whitespace().map(str::to_string).collect();
        } else if let Some(rest) = line.strip_prefix("# hostNetwork:") {
            // " true; uid 0; capabilities: NET_ADMIN,NET_RAW"
            for part in rest.split(';').map(str::trim) {
                if let Some(u) = part.strip_prefix("uid ") {
                    c.uid = u
                        .trim()
                        .parse()
                        .map_err(|_| err(n, format!("bad uid {u:?}")))?;
                } else if let Some(caps) = part.strip_prefix("capabilities:") {
                    c.capabilities = caps
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty() && *s != "none")
                        .map(str::to_string)
                        .collect();
                } else if part == "true" || part == "false" {
                    c.host_network = part == "true";
                } else {
                    return Err(err(n, format!("unknown field {part:?}")));
                }
            }
        } else if let Some(rest) = line.strip_prefix("# mount:") {
            // " /host/opt/cni/bin <- hostPath:/opt/cni/bin (read-only)"
            let (path, src) = rest
                .split_once("<-")
                .ok_or_else(|| err(n, "mount without <-".into()))?;
            let src = src.trim();
            let (src, read_only) = match src.strip_suffix("(read-only)") {
                Some(s) => (s.trim(), true),
                None => (src, false),
            };
            let source = if let Some(p) = src.strip_prefix("hostPath:") {
                MountSource::HostPath(p.into())
            } else if let Some(s) = src.strip_prefix("secret:") {
                MountSource::Secret(s.into())
            } else if let Some(s) = src.strip_prefix("configMap:") {
                MountSource::ConfigMap(s.into())
            } else if src.starts_with("projected:") {
                MountSource::Projected
            } else if src == "emptyDir" {
                MountSource::EmptyDir
            } else {
                return Err(err(n, format!("unknown mount source {src:?}")));
            };
            c.mounts.push(ChartMount {
                path: path.trim().into(),
                source,
                read_only,
            });
        } else if line.starts_with('#') {
            continue;
        } else if let Some((k, v)) = line.split_once('=') {
            let resource = v
                .strip_prefix("<resourceFieldRef:")
                .and_then(|r| r.strip_suffix('>'))
                .and_then(|r| r.split_once('/'));
            let value = match v
                .strip_prefix("<fieldRef:")
                .and_then(|r| r.strip_suffix('>'))
            {
                Some(path) => EnvValue::FieldRef(path.into()),
                None => match resource {
                    Some((c, r)) => EnvValue::ResourceFieldRef(c.into(), r.into()),
                    None => EnvValue::Literal(v.into()),
                },
            };
            c.env.push((k.into(), value));
        } else {
            return Err(err(n, format!("unrecognised line {line:?}")));
        }
    }
    for c in &containers {
        if c.command.is_empty() {
            return Err(err(0, format!("section [{}] has no command", c.section)));
        }
    }
    Ok(ChartGolden { containers })
}

/// The golden file of `mode_name` (`inpod` or `geneve`), parsed.
pub fn golden(mode_name: &str) -> Result<ChartGolden, ChartError> {
    let text = match mode_name {
        "geneve" => GOLDEN_GENEVE,
        _ => GOLDEN_INPOD,
    };
    parse(text, &golden_path(mode_name).display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_golden_files_parse_with_the_three_components() {
        for mode in ["inpod", "geneve"] {
            let g = golden(mode).unwrap();
            let agent = g.workload("node-agent").unwrap();
            assert!(agent.host_network);
            assert_eq!(agent.command, ["/usr/local/bin/node-agent"]);
            assert_eq!(
                agent.env_value("REDIRECT_MODE"),
                Some(&EnvValue::Literal(mode.into()))
            );
            assert_eq!(
                agent.env_value("NODE_NAME"),
                Some(&EnvValue::FieldRef("spec.nodeName".into()))
            );
            assert!(agent.capabilities.contains(&"NET_ADMIN".to_string()));
            let zt = g.workload("ztunnel").unwrap();
            assert!(!zt.host_network);
            assert_eq!(zt.command, ["/usr/local/bin/ztunnel", "proxy"]);
            assert!(zt.mounts.iter().any(|m| m.source == MountSource::Projected));
            let ca = g.workload("mesh-ca").unwrap();
            assert_eq!(ca.uid, 65532);
            assert!(ca.capabilities.is_empty());
            assert!(
                ca.mounts
                    .iter()
                    .any(|m| m.source == MountSource::Secret("mesh-ca-certs".into()) && m.read_only)
            );
        }
    }

    #[test]
    fn malformed_lines_are_reported_with_their_number() {
        let e = parse("# header\n[x] Nope container=a\n", "f.txt").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("f.txt line 2"), "{e}");
        let e = parse(
            "[x] DaemonSet/x container=a\n# command: /a\n# mount: /a <- nfs:x\n",
            "f",
        )
        .unwrap_err();
        assert!(e.reason.contains("nfs"), "{e}");
    }
}
