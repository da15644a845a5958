//! Pod volumes, and how a container "sees" its filesystem.
//!
//! Containers here are plain processes on the host filesystem: there is no
//! image root and no mount namespace per container (beyond `/etc/hosts`,
//! see [`super::container`]). What a container would find at a path is
//! emulated by a [`PathView`]: the pod's volume mounts (`mountPath` → the
//! directory backing the volume on this host) plus the image's files
//! ([`Images`]). The kubelet rewrites every environment value, the command
//! and the arguments through it: `CNI_BIN_DIR=/host/opt/cni/bin` with the
//! chart's `hostPath: /opt/cni/bin` mount becomes
//! `<node root>/opt/cni/bin`. Programs configured through such values (the
//! project's are: every path they use comes from an environment variable)
//! then behave as in a real pod; a path hard-coded in a program would not be
//! remapped.
//!
//! Volume sources backed here:
//! - `hostPath`: [`NodeFs::host_path`] — a per-node directory under the
//!   node's root for node-local state (`/opt/cni/bin`, `/etc/cni/net.d`,
//!   `/var/run/ztunnel`, ...), the real path for what the simulated nodes
//!   share with the host kernel (`/proc`, `/sys`, `/run/netns`,
//!   `/run/xtables.lock`, `/dev`). `DirectoryOrCreate` creates the directory.
//! - `emptyDir`: a fresh directory in the pod's directory.
//! - `configMap` / `secret`: the object's keys (or `items`) written as files
//!   (the kubelet reads them through the API; a missing object keeps the
//!   pod in `ContainerCreating`, as the real kubelet does).
//! - `projected`: `serviceAccountToken` sources through the TokenRequest API
//!   (audience, expiry, bound to the pod), `configMap`/`secret` sources.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath, Pod, Secret, ServiceAccount, Volume};
use kube::api::{Api, PostParams};

/// Host paths the simulated nodes share with the host (used as they are).
pub const SHARED_HOST_PATHS: [&str; 7] = [
    "/proc",
    "/sys",
    "/dev",
    "/run/netns",
    "/var/run/netns",
    "/run/xtables.lock",
    "/var/run/xtables.lock",
];

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("pod {pod}: volume {volume}: {reason}")]
    Source {
        pod: String,
        volume: String,
        reason: String,
    },
    #[error("pod {pod}: volume {volume}: cannot write {path}: {source}")]
    Write {
        pod: String,
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {pod}: container {container}: volumeMount {mount} names no volume of the pod")]
    UnknownMount {
        pod: String,
        container: String,
        mount: String,
    },
}

/// A node's view of "its" host filesystem.
#[derive(Debug, Clone)]
pub struct NodeFs {
    /// Where node-local host paths live (`<scope dir>/<node>`).
    pub root: PathBuf,
}

/// `true` when `path` is `prefix` or below it (component-wise).
pub fn path_within(path: &Path, prefix: &Path) -> bool {
    path.starts_with(prefix)
}

impl NodeFs {
    /// The host directory or file behind the node path `path`.
    pub fn host_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if SHARED_HOST_PATHS
            .iter()
            .any(|s| path_within(p, Path::new(s)))
        {
            return p.to_path_buf();
        }
        let rel: PathBuf = p
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.root.join(rel)
    }

    /// The kubelet's per-pod directory.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join("var/lib/kubelet/pods").join(uid)
    }

    /// The kubelet's log directory of a pod.
    pub fn log_dir(&self, namespace: &str, name: &str, uid: &str) -> PathBuf {
        self.root
            .join("var/log/pods")
            .join(format!("{namespace}_{name}_{uid}"))
    }
}

/// Files of the images the kubelet can "run": image short name (the last
/// path component of the image reference, without tag) → container path →
/// host file.
#[derive(Debug, Clone, Default)]
pub struct Images {
    images: BTreeMap<String, Vec<(PathBuf, PathBuf)>>,
}

/// `localhost/geneva-mesh/ztunnel:dev` → `ztunnel`.
pub fn image_short_name(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

impl Images {
    /// Registers a file of image `short_name`.
    pub fn add_file(
        &mut self,
        short_name: &str,
        container_path: impl Into<PathBuf>,
        host: impl Into<PathBuf>,
    ) {
        self.images
            .entry(short_name.to_string())
            .or_default()
            .push((container_path.into(), host.into()));
    }

    /// The files of `image` (empty for an unknown image: it then runs
    /// programs of the host).
    pub fn files(&self, image: &str) -> &[(PathBuf, PathBuf)] {
        self.images
            .get(image_short_name(image))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Container path → host path, longest prefix first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathView {
    entries: Vec<(PathBuf, PathBuf)>,
}

impl PathView {
    pub fn add(&mut self, container: impl Into<PathBuf>, host: impl Into<PathBuf>) {
        self.entries.push((container.into(), host.into()));
        self.entries
            .sort_by_key(|(c, _)| std::cmp::Reverse(c.components().count()));
    }

    /// The host path for an absolute container path, if a mount or image
    /// file covers it.
    pub fn translate_path(&self, path: &Path) -> Option<PathBuf> {
        if !path.is_absolute() {
            return None;
        }
        self.entries.iter().find_map(|(c, h)| {
            let rest = path.strip_prefix(c).ok()?;
            Some(if rest.as_os_str().is_empty() {
                h.clone()
            } else {
                h.join(rest)
            })
        })
    }

    /// `value` rewritten when it is an absolute path the view covers,
    /// unchanged otherwise (URLs, addresses, names ...).
    pub fn translate_value(&self, value: &str) -> String {
        if !value.starts_with('/') {
            return value.to_string();
        }
        self.translate_path(Path::new(value))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| value.to_string())
    }

    pub fn entries(&self) -> &[(PathBuf, PathBuf)] {
        &self.entries
    }
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Writes `files` (relative name → content) into `dir` (replacing it).
fn write_files(
    pod: &Pod,
    volume: &str,
    dir: &Path,
    files: &[(String, Vec<u8>)],
    mode: u32,
) -> Result<(), VolumeError> {
    use std::os::unix::fs::PermissionsExt;
    let werr = |path: &Path| {
        let (pod, volume, path) = (pod_key(pod), volume.to_string(), path.to_path_buf());
        move |source| VolumeError::Write {
            pod,
            volume,
            path,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(werr(dir))?;
    for (name, data) in files {
        let rel = Path::new(name);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(VolumeError::Source {
                pod: pod_key(pod),
                volume: volume.into(),
                reason: format!("file name {name:?} is not a relative path"),
            });
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(werr(parent))?;
        }
        if std::fs::read(&path).is_ok_and(|old| old == *data) {
            // Unchanged: not rewritten, so watchers of the file see no event.
            continue;
        }
        let tmp = path.with_extension("kubelet-tmp");
        std::fs::write(&tmp, data).map_err(werr(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(werr(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(werr(&path))?;
    }
    Ok(())
}

/// Keys (or `items`) of a ConfigMap/Secret as files.
fn select_items(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    what: &str,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    match items {
        None => Ok(data.into_iter().collect()),
        Some(items) => {
            let mut out = Vec::new();
            for it in items {
                match data.get(&it.key) {
                    Some(v) => out.push((it.path.clone(), v.clone())),
                    None if optional => {}
                    None => return Err(format!("{what} has no key {:?}", it.key)),
                }
            }
            Ok(out)
        }
    }
}

/// Materialises the pod's volumes; returns volume name → backing path.
/// A missing ConfigMap/Secret or a failed TokenRequest is an error (the
/// kubelet retries).
pub async fn prepare(
    client: &kube::Client,
    pod: &Pod,
    node: &NodeFs,
) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pod_dir = node.pod_dir(&uid);
    let mut out = BTreeMap::new();
    let volumes: &[Volume] = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or(&[]);
    for v in volumes {
        let src = |reason: String| VolumeError::Source {
            pod: pod_key(pod),
            volume: v.name.clone(),
            reason,
        };
        let dir = pod_dir.join("volumes").join(&v.name);
        let path = if let Some(hp) = &v.host_path {
            let p = node.host_path(&hp.path);
            let shared = p == Path::new(&hp.path);
            match hp.type_.as_deref() {
                Some("DirectoryOrCreate") if !shared => {
                    std::fs::create_dir_all(&p).map_err(|source| VolumeError::Write {
                        pod: pod_key(pod),
                        volume: v.name.clone(),
                        path: p.clone(),
                        source,
                    })?
                }
                Some("FileOrCreate") if !shared && !p.exists() => {
                    if let Some(parent) = p.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    std::fs::write(&p, b"").map_err(|source| VolumeError::Write {
                        pod: pod_key(pod),
                        volume: v.name.clone(),
                        path: p.clone(),
                        source,
                    })?
                }
                Some("Directory") | Some("File") if !p.exists() => {
                    return Err(src(format!("hostPath {} does not exist", p.display())));
                }
                _ => {}
            }
            p
        } else if v.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(|source| VolumeError::Write {
                pod: pod_key(pod),
                volume: v.name.clone(),
                path: dir.clone(),
                source,
            })?;
            dir
        } else if v.config_map.is_some() || v.secret.is_some() {
            let (files, mode) = object_files(client, &ns, v).await.map_err(src)?;
            write_files(pod, &v.name, &dir, &files, mode)?;
            dir
        } else if let Some(proj) = &v.projected {
            let mut files = Vec::new();
            for s in proj.sources.iter().flatten() {
                if let Some(t) = &s.service_account_token {
                    let token =
                        request_token(client, pod, t.audience.as_deref(), t.expiration_seconds)
                            .await
                            .map_err(src)?;
                    files.push((t.path.clone(), token.into_bytes()));
                }
            }
            let (more, mode) = object_files(client, &ns, v).await.map_err(src)?;
            files.extend(more);
            write_files(pod, &v.name, &dir, &files, mode)?;
            dir
        } else {
            return Err(src(
                "volume source not supported by kubelet-lite (hostPath, emptyDir, configMap, secret, projected are)".into(),
            ));
        };
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// The files of `v`'s ConfigMap and Secret sources (plain or projected;
/// token sources are not included) and their mode.
async fn object_files(
    client: &kube::Client,
    ns: &str,
    v: &Volume,
) -> Result<(Vec<(String, Vec<u8>)>, u32), String> {
    if let Some(cm) = &v.config_map {
        let opt = cm.optional.unwrap_or(false);
        let files = config_map_files(client, ns, &cm.name, cm.items.as_ref(), opt).await?;
        return Ok((files, 0o644));
    }
    if let Some(sec) = &v.secret {
        let name = sec.secret_name.clone().unwrap_or_default();
        let opt = sec.optional.unwrap_or(false);
        let files = secret_files(client, ns, &name, sec.items.as_ref(), opt).await?;
        return Ok((files, sec.default_mode.map(|m| m as u32).unwrap_or(0o644)));
    }
    let mut files = Vec::new();
    for s in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
        if let Some(cm) = &s.config_map {
            let opt = cm.optional.unwrap_or(false);
            files.extend(config_map_files(client, ns, &cm.name, cm.items.as_ref(), opt).await?);
        }
        if let Some(sec) = &s.secret {
            let opt = sec.optional.unwrap_or(false);
            files.extend(secret_files(client, ns, &sec.name, sec.items.as_ref(), opt).await?);
        }
    }
    Ok((files, 0o644))
}

/// Re-reads the ConfigMap and Secret behind the pod's volumes (plain and
/// projected sources; tokens are left alone) and rewrites the files whose
/// content changed, as the kubelet's periodic volume sync does. A volume
/// that cannot be refreshed is logged and keeps its old files.
pub async fn refresh(client: &kube::Client, pod: &Pod, volumes: &BTreeMap<String, PathBuf>) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let specs: &[Volume] = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or(&[]);
    for v in specs {
        let Some(dir) = volumes.get(&v.name) else {
            continue;
        };
        if v.config_map.is_none() && v.secret.is_none() && v.projected.is_none() {
            continue;
        }
        let written = match object_files(client, &ns, v).await {
            Ok((files, mode)) => write_files(pod, &v.name, dir, &files, mode),
            Err(reason) => Err(VolumeError::Source {
                pod: pod_key(pod),
                volume: v.name.clone(),
                reason,
            }),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "kubelet-lite: volume refresh failed; keeping the old files");
        }
    }
}

async fn config_map_files(
    client: &kube::Client,
    ns: &str,
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = match api.get_opt(name).await {
        Ok(Some(cm)) => cm,
        Ok(None) if optional => return Ok(Vec::new()),
        Ok(None) => return Err(format!("configmap {ns}/{name} not found")),
        Err(e) => return Err(format!("get configmap {ns}/{name}: {e}")),
    };
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.unwrap_or_default() {
        data.insert(k, v.0);
    }
    select_items(data, items, &format!("configmap {ns}/{name}"), optional)
}

async fn secret_files(
    client: &kube::Client,
    ns: &str,
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = match api.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) if optional => return Ok(Vec::new()),
        Ok(None) => return Err(format!("secret {ns}/{name} not found")),
        Err(e) => return Err(format!("get secret {ns}/{name}: {e}")),
    };
    let mut data: BTreeMap<String, Vec<u8>> = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    // The double encodes stringData on write; accept it here too.
    for (k, v) in s.string_data.unwrap_or_default() {
        data.insert(k, v.into_bytes());
    }
    select_items(data, items, &format!("secret {ns}/{name}"), optional)
}

/// A pod-bound token through the TokenRequest API.
async fn request_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: Option<i64>,
) -> Result<String, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(audience.map(|a| vec![a.to_string()]).unwrap_or_default()),
            expiration_seconds: Some(expiration_seconds.unwrap_or(3600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let out = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .map_err(|e| format!("TokenRequest for serviceaccount {ns}/{sa}: {e}"))?;
    out.status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("TokenRequest for serviceaccount {ns}/{sa} returned no token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_per_node_except_shared_kernel_paths() {
        let n = NodeFs {
            root: "/run/netsim/x.d/node1".into(),
        };
        assert_eq!(
            n.host_path("/opt/cni/bin"),
            Path::new("/run/netsim/x.d/node1/opt/cni/bin")
        );
        assert_eq!(
            n.host_path("/var/run/ztunnel"),
            Path::new("/run/netsim/x.d/node1/var/run/ztunnel")
        );
        assert_eq!(n.host_path("/proc"), Path::new("/proc"));
        assert_eq!(n.host_path("/proc/sys/net"), Path::new("/proc/sys/net"));
        assert_eq!(n.host_path("/var/run/netns"), Path::new("/var/run/netns"));
        assert_eq!(
            n.host_path("/run/xtables.lock"),
            Path::new("/run/xtables.lock")
        );
        // Not fooled by a common string prefix or by "..".
        assert_eq!(
            n.host_path("/procfoo"),
            Path::new("/run/netsim/x.d/node1/procfoo")
        );
        assert_eq!(
            n.host_path("/../etc/x"),
            Path::new("/run/netsim/x.d/node1/etc/x")
        );
    }

    #[test]
    fn path_view_takes_the_longest_mount() {
        let mut v = PathView::default();
        v.add("/host/proc", "/proc");
        v.add("/host/proc/sys/net", "/proc/sys/net");
        v.add("/host/opt/cni/bin", "/n1/opt/cni/bin");
        v.add("/usr/local/bin/ztunnel", "/t/debug/ztunnel");
        assert_eq!(v.translate_value("/host/opt/cni/bin"), "/n1/opt/cni/bin");
        assert_eq!(
            v.translate_value("/host/opt/cni/bin/istio-cni"),
            "/n1/opt/cni/bin/istio-cni"
        );
        assert_eq!(v.translate_value("/host/proc"), "/proc");
        assert_eq!(
            v.translate_value("/usr/local/bin/ztunnel"),
            "/t/debug/ztunnel"
        );
        for unchanged in [
            "/host/opt/cni/binary",
            "https://mesh-ca:15012",
            "[::]:15012",
            "inpod",
            "/etc/x",
        ] {
            assert_eq!(v.translate_value(unchanged), unchanged);
        }
    }

    #[test]
    fn image_names() {
        assert_eq!(
            image_short_name("localhost/geneva-mesh/ztunnel:dev"),
            "ztunnel"
        );
        assert_eq!(image_short_name("ztunnel"), "ztunnel");
        assert_eq!(
            image_short_name("reg:5000/a/node-agent@sha256:ab"),
            "node-agent"
        );
        let mut i = Images::default();
        i.add_file("ztunnel", "/usr/local/bin/ztunnel", "/b/ztunnel");
        assert_eq!(i.files("geneva-mesh/ztunnel:dev").len(), 1);
        assert!(i.files("busybox").is_empty());
    }

    #[test]
    fn items_select_keys() {
        let data: BTreeMap<String, Vec<u8>> = [
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec()),
        ]
        .into();
        assert_eq!(
            select_items(data.clone(), None, "cm", false).unwrap().len(),
            2
        );
        let items = vec![KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            ..Default::default()
        }];
        assert_eq!(
            select_items(data.clone(), Some(&items), "cm", false).unwrap(),
            vec![("sub/b.txt".to_string(), b"2".to_vec())]
        );
        let missing = vec![KeyToPath {
            key: "z".into(),
            path: "z".into(),
            ..Default::default()
        }];
        assert!(
            select_items(data, Some(&missing), "cm x/y", false)
                .unwrap_err()
                .contains("cm x/y has no key \"z\"")
        );
    }
}
