//! The kubeconfig the agent writes for the plugin's fallback lookup
//! (`<run_dir>/istio-cni-kubeconfig`). The plugin runs on the host, where
//! the agent container's files do not exist, so everything is inlined:
//! CA, token, client certificate and key.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde_json::Value;

use super::atomic_write::write_atomically;

/// File name inside the run dir.
pub const PLUGIN_KUBECONFIG: &str = "istio-cni-kubeconfig";
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the agent's own credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeconfigSource {
    /// The service account of the agent's pod.
    InCluster {
        server: String,
        /// The CA the plugin trusts for `server` (`KUBE_CA_FILE`, default
        /// the service account's `ca.crt`); not read when `insecure`.
        ca_file: PathBuf,
        token_file: PathBuf,
        /// `SKIP_TLS_VERIFY=true`: the kubeconfig says
        /// `insecure-skip-tls-verify` and carries no CA (upstream's setting,
        /// an explicit opt-in).
        insecure: bool,
    },
    /// A kubeconfig file (its current context).
    File(PathBuf),
}

impl KubeconfigSource {
    /// `KUBECONFIG` if set, else the in-cluster service account
    /// (`KUBERNETES_SERVICE_HOST`/`_PORT`/`_PROTOCOL`, with upstream
    /// istio-cni's `KUBE_CA_FILE` and `SKIP_TLS_VERIFY`), else nothing.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Option<Self> {
        if let Some(path) = env("KUBECONFIG").filter(|p| !p.is_empty()) {
            // A list of files: the first one carries the context.
            let first = path.split(':').next().unwrap_or(&path).to_string();
            return Some(Self::File(first.into()));
        }
        let host = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty())?;
        let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let port = set("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
        let scheme = set("KUBERNETES_SERVICE_PROTOCOL").unwrap_or_else(|| "https".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(Self::InCluster {
            server: format!("{scheme}://{host}:{port}"),
            ca_file: set("KUBE_CA_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(SA_DIR).join("ca.crt")),
            token_file: Path::new(SA_DIR).join("token"),
            insecure: matches!(
                set("SKIP_TLS_VERIFY").as_deref().map(str::trim),
                Some("true" | "1" | "yes")
            ),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kubeconfig {path} is not valid YAML: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("kubeconfig {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write plugin kubeconfig {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default, Serialize)]
struct Out {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    clusters: Vec<Named<OutCluster>>,
    users: Vec<NamedUser>,
    contexts: Vec<Named<OutContext>>,
    #[serde(rename = "current-context")]
    current_context: &'static str,
}

#[derive(Debug, Serialize)]
struct Named<T> {
    name: &'static str,
    #[serde(flatten)]
    inner: T,
}

#[derive(Debug, Default, Serialize)]
struct OutCluster {
    cluster: ClusterBody,
}

#[derive(Debug, Default, Serialize)]
struct ClusterBody {
    server: String,
    #[serde(
        rename = "certificate-authority-data",
        skip_serializing_if = "Option::is_none"
    )]
    ca_data: Option<String>,
    #[serde(
        rename = "insecure-skip-tls-verify",
        skip_serializing_if = "Option::is_none"
    )]
    insecure: Option<bool>,
    #[serde(rename = "tls-server-name", skip_serializing_if = "Option::is_none")]
    tls_server_name: Option<String>,
}

#[derive(Debug, Serialize)]
struct NamedUser {
    name: &'static str,
    user: UserBody,
}

#[derive(Debug, Default, Serialize)]
struct UserBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(
        rename = "client-certificate-data",
        skip_serializing_if = "Option::is_none"
    )]
    cert_data: Option<String>,
    #[serde(rename = "client-key-data", skip_serializing_if = "Option::is_none")]
    key_data: Option<String>,
}

#[derive(Debug, Serialize)]
struct OutContext {
    context: ContextBody,
}

#[derive(Debug, Serialize)]
struct ContextBody {
    cluster: &'static str,
    user: &'static str,
}

const NAME: &str = "istio-cni";

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, KubeconfigError> {
    fs::read(path).map_err(|source| KubeconfigError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The plugin kubeconfig for `src`, as YAML.
pub fn render(src: &KubeconfigSource) -> Result<String, KubeconfigError> {
    let (cluster, user) = match src {
        KubeconfigSource::InCluster {
            server,
            ca_file,
            token_file,
            insecure,
        } => {
            let token = String::from_utf8_lossy(&read("service account token", token_file)?)
                .trim()
                .to_string();
            let ca_data = if *insecure {
                None
            } else {
                Some(B64.encode(read("API server CA", ca_file)?))
            };
            (
                ClusterBody {
                    server: server.clone(),
                    ca_data,
                    insecure: insecure.then_some(true),
                    ..Default::default()
                },
                UserBody {
                    token: Some(token),
                    ..Default::default()
                },
            )
        }
        KubeconfigSource::File(path) => from_file(path)?,
    };
    let out = Out {
        api_version: "v1",
        kind: "Config",
        clusters: vec![Named {
            name: NAME,
            inner: OutCluster { cluster },
        }],
        users: vec![NamedUser { name: NAME, user }],
        contexts: vec![Named {
            name: NAME,
            inner: OutContext {
                context: ContextBody {
                    cluster: NAME,
                    user: NAME,
                },
            },
        }],
        current_context: NAME,
    };
    Ok(serde_yaml_ng::to_string(&out).expect("kubeconfig always serialises"))
}

fn from_file(path: &Path) -> Result<(ClusterBody, UserBody), KubeconfigError> {
    let invalid = |reason: String| KubeconfigError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let text = read("kubeconfig", path)?;
    let doc: Value = serde_yaml_ng::from_slice(&text).map_err(|e| KubeconfigError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let current = doc
        .get("current-context")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("no current-context".into()))?;
    let find = |list: &str, name: &str, body: &str| -> Result<Value, KubeconfigError> {
        doc.get(list)
            .and_then(Value::as_array)
            .and_then(|l| {
                l.iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
            })
            .and_then(|e| e.get(body))
            .cloned()
            .ok_or_else(|| invalid(format!("{list} has no entry {name:?}")))
    };
    let ctx = find("contexts", current, "context")?;
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    let cluster_name = field(&ctx, "cluster")
        .ok_or_else(|| invalid(format!("context {current:?} names no cluster")))?;
    let cluster = find("clusters", &cluster_name, "cluster")?;
    let resolve = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { base.join(p) }
    };
    let data_or_file = |v: &Value,
                        data: &str,
                        file: &str,
                        what: &'static str|
     -> Result<Option<String>, KubeconfigError> {
        if let Some(d) = field(v, data) {
            return Ok(Some(d));
        }
        match field(v, file) {
            Some(f) => Ok(Some(B64.encode(read(what, &resolve(f))?))),
            None => Ok(None),
        }
    };
    let cluster_body = ClusterBody {
        server: field(&cluster, "server")
            .ok_or_else(|| invalid(format!("cluster {cluster_name:?} has no server")))?,
        ca_data: data_or_file(
            &cluster,
            "certificate-authority-data",
            "certificate-authority",
            "CA file",
        )?,
        insecure: cluster
            .get("insecure-skip-tls-verify")
            .and_then(Value::as_bool),
        tls_server_name: field(&cluster, "tls-server-name"),
    };
    let user_body = match field(&ctx, "user") {
        None => UserBody::default(),
        Some(user_name) => {
            let user = find("users", &user_name, "user")?;
            if user.get("exec").is_some() || user.get("auth-provider").is_some() {
                return Err(invalid(format!(
                    "user {user_name:?} uses an exec/auth-provider plugin, which the CNI plugin cannot run on the host"
                )));
            }
            let token = match field(&user, "token") {
                Some(t) => Some(t),
                None => match field(&user, "tokenFile") {
                    Some(f) => Some(
                        String::from_utf8_lossy(&read("token file", &resolve(f))?)
                            .trim()
                            .to_string(),
                    ),
                    None => None,
                },
            };
            UserBody {
                token,
                cert_data: data_or_file(
                    &user,
                    "client-certificate-data",
                    "client-certificate",
                    "client certificate",
                )?,
                key_data: data_or_file(&user, "client-key-data", "client-key", "client key")?,
            }
        }
    };
    Ok((cluster_body, user_body))
}

/// Upstream's default file mode of the plugin kubeconfig
/// (`KUBECONFIG_MODE`).
pub const DEFAULT_MODE: u32 = 0o600;

/// Writes `content` to `path` with file mode `mode` unless it is already
/// there with that mode (a mode-only difference is fixed in place).
/// Returns whether it changed anything.
pub fn write_if_changed(path: &Path, content: &str, mode: u32) -> Result<bool, KubeconfigError> {
    use std::os::unix::fs::PermissionsExt;
    let write_err = |source| KubeconfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    if fs::read(path).ok().as_deref() == Some(content.as_bytes()) {
        let current = fs::metadata(path).map_err(write_err)?.permissions().mode() & 0o7777;
        if current == mode {
            return Ok(false);
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(write_err)?;
        return Ok(true);
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(write_err)?;
    }
    write_atomically(path, content.as_bytes(), mode).map_err(write_err)?;
    Ok(true)
}

/// Removes the plugin kubeconfig (absent is fine).
pub fn remove(path: &Path) -> std::io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_selection() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            KubeconfigSource::from_env(env(&[
                ("KUBECONFIG", "/a:/b"),
                ("KUBERNETES_SERVICE_HOST", "10.0.0.1")
            ])),
            Some(KubeconfigSource::File("/a".into()))
        );
        let Some(KubeconfigSource::InCluster { server, .. }) = KubeconfigSource::from_env(env(&[
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "6443"),
        ])) else {
            panic!("in-cluster expected");
        };
        assert_eq!(server, "https://[fd00::1]:6443");
        assert_eq!(KubeconfigSource::from_env(env(&[])), None);
        assert_eq!(
            KubeconfigSource::from_env(env(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")])),
            Some(KubeconfigSource::InCluster {
                server: "https://10.0.0.1:443".into(),
                ca_file: Path::new(SA_DIR).join("ca.crt"),
                token_file: Path::new(SA_DIR).join("token"),
                insecure: false,
            })
        );
        // Upstream istio-cni's settings.
        assert_eq!(
            KubeconfigSource::from_env(env(&[
                ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
                ("KUBERNETES_SERVICE_PROTOCOL", "http"),
                ("KUBE_CA_FILE", "/etc/ca/api.pem"),
                ("SKIP_TLS_VERIFY", "true"),
            ])),
            Some(KubeconfigSource::InCluster {
                server: "http://10.0.0.1:443".into(),
                ca_file: "/etc/ca/api.pem".into(),
                token_file: Path::new(SA_DIR).join("token"),
                insecure: true,
            })
        );
    }

    #[test]
    fn in_cluster_inlines_ca_and_token() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("ca.crt"), b"CA PEM").unwrap();
        fs::write(d.path().join("token"), b"tok123\n").unwrap();
        let src = |ca: &str, insecure| KubeconfigSource::InCluster {
            server: "https://10.96.0.1:443".into(),
            ca_file: d.path().join(ca),
            token_file: d.path().join("token"),
            insecure,
        };
        let y = render(&src("ca.crt", false)).unwrap();
        let v: Value = serde_yaml_ng::from_str(&y).unwrap();
        assert_eq!(v["current-context"], "istio-cni");
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://10.96.0.1:443"
        );
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"],
            B64.encode(b"CA PEM")
        );
        assert_eq!(v["users"][0]["user"]["token"], "tok123");
        assert!(v["clusters"][0]["cluster"]["insecure-skip-tls-verify"].is_null());

        // A missing CA is an error naming the file...
        let e = render(&src("absent.pem", false)).unwrap_err();
        assert!(e.to_string().contains("absent.pem"), "{e}");
        // ...unless verification is explicitly off: then no CA at all.
        let v: Value = serde_yaml_ng::from_str(&render(&src("absent.pem", true)).unwrap()).unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["insecure-skip-tls-verify"],
            true
        );
        assert!(v["clusters"][0]["cluster"]["certificate-authority-data"].is_null());
        assert_eq!(v["users"][0]["user"]["token"], "tok123");
    }

    #[test]
    fn file_source_resolves_relative_files_and_rejects_exec() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("client.crt"), b"CERT").unwrap();
        fs::write(
            d.path().join("config"),
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             contexts: [{name: c, context: {cluster: k, user: u}}, {name: other, context: {cluster: x}}]\n\
             clusters: [{name: k, cluster: {server: 'http://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
             users: [{name: u, user: {client-certificate: client.crt, client-key-data: S0VZ, token: t}}]\n",
        )
        .unwrap();
        let v: Value = serde_yaml_ng::from_str(
            &render(&KubeconfigSource::File(d.path().join("config"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "http://127.0.0.1:6443"
        );
        assert_eq!(
            v["clusters"][0]["cluster"]["insecure-skip-tls-verify"],
            true
        );
        assert_eq!(
            v["users"][0]["user"]["client-certificate-data"],
            B64.encode(b"CERT")
        );
        assert_eq!(v["users"][0]["user"]["client-key-data"], "S0VZ");
        assert_eq!(v["users"][0]["user"]["token"], "t");

        fs::write(
            d.path().join("exec"),
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n\
             clusters: [{name: k, cluster: {server: 'https://x'}}]\n\
             users: [{name: u, user: {exec: {command: aws}}}]\n",
        )
        .unwrap();
        let e = render(&KubeconfigSource::File(d.path().join("exec"))).unwrap_err();
        assert!(e.to_string().contains("exec"), "{e}");
        let e = render(&KubeconfigSource::File(d.path().join("nope"))).unwrap_err();
        assert!(e.to_string().contains("nope"));
    }

    #[test]
    fn writes_only_on_change_with_the_configured_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run").join(PLUGIN_KUBECONFIG);
        let mode = || fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert!(write_if_changed(&p, "a", DEFAULT_MODE).unwrap());
        assert!(!write_if_changed(&p, "a", DEFAULT_MODE).unwrap());
        assert!(write_if_changed(&p, "b", DEFAULT_MODE).unwrap());
        assert_eq!(mode(), 0o600);
        // Same content, other KUBECONFIG_MODE: the mode is fixed in place.
        assert!(write_if_changed(&p, "b", 0o640).unwrap());
        assert_eq!(mode(), 0o640);
        assert_eq!(fs::read_to_string(&p).unwrap(), "b");
        assert!(!write_if_changed(&p, "b", 0o640).unwrap());
        assert!(remove(&p).unwrap());
        assert!(!remove(&p).unwrap());
    }
}
