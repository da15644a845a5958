//! From a pod's container spec to a running process, the way a container
//! runtime would start it — as far as a process on the host can be made to
//! look like one:
//!
//! - **command**: `command` + `args` (kubelet semantics; `$(VAR)` expanded
//!   from the container's environment), paths through the pod's
//!   [`PathView`] (image files and volume mounts, see [`super::volumes`]);
//! - **environment**: only what the container spec says (plus the
//!   kubelet's injected variables and a default `PATH`); `value`,
//!   `$(VAR)` references and `valueFrom.fieldRef` (downward API:
//!   `metadata.name`, `metadata.namespace`, `metadata.uid`,
//!   `metadata.labels['k']`, `metadata.annotations['k']`, `spec.nodeName`,
//!   `spec.serviceAccountName`, `status.podIP`, `status.hostIP`); values
//!   rewritten through the path view;
//! - **network**: the pod's netns (or the node's for `hostNetwork`);
//! - **/etc/hosts**: the kubelet-managed file of the pod (localhost, the
//!   pod's own name, `hostAliases`) bind-mounted in a private mount
//!   namespace of the process — `hostAliases` stand in for cluster DNS;
//! - **security context**: `runAsUser`/`runAsGroup` (container, else pod
//!   level), the capability set (`privileged`: all; otherwise the runtime's
//!   default set with `capabilities.drop` then `capabilities.add` applied:
//!   the bounding, inheritable and ambient sets are reduced before `exec`,
//!   so a root process gets exactly these), `allowPrivilegeEscalation:
//!   false` as `no_new_privs`. Not emulated: read-only root filesystem,
//!   seccomp, user namespaces, resource limits.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::volumes::{Images, PathView, VolumeError};

/// `PATH` of a container whose spec sets none (the usual image default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set for unprivileged containers.
pub const RUNTIME_DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Linux capability names by number (`linux/capability.h`).
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("pod {pod}: container {container}: {reason}")]
    Spec {
        pod: String,
        container: String,
        reason: String,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("pod {pod}: container {container}: cannot start {program}: {source}")]
    Spawn {
        pod: String,
        container: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Capability number of `name` (`NET_ADMIN` or `CAP_NET_ADMIN`).
pub fn cap_number(name: &str) -> Option<u8> {
    let n = name.strip_prefix("CAP_").unwrap_or(name);
    CAP_NAMES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(n))
        .map(|i| i as u8)
}

/// Names of the capabilities in `mask`.
pub fn cap_names(mask: u64) -> Vec<&'static str> {
    (0..CAP_NAMES.len())
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| CAP_NAMES[i])
        .collect()
}

/// What the kubelet knows when it starts a container.
#[derive(Debug, Clone)]
pub struct LaunchContext<'a> {
    /// `status.podIP` (the node IP for `hostNetwork`).
    pub pod_ip: Option<IpAddr>,
    pub host_ip: IpAddr,
    /// Volume name → backing host path ([`super::volumes::prepare`]).
    pub volumes: &'a BTreeMap<String, PathBuf>,
    pub images: &'a Images,
    /// Variables the kubelet adds to every container (before the spec's).
    pub injected_env: &'a [(String, String)],
}

/// Everything needed to start one container process.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSpec {
    pub container: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub view: PathView,
    pub user: Option<u32>,
    pub group: Option<u32>,
    /// Allowed capabilities as a bit mask; `None` = unrestricted
    /// (privileged).
    pub capabilities: Option<u64>,
    pub no_new_privs: bool,
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// `metadata.labels['app']` → (`metadata.labels`, `app`).
fn subscript(path: &str) -> Option<(&str, &str)> {
    let (base, rest) = path.split_once('[')?;
    let key = rest
        .strip_suffix(']')?
        .trim_matches(|c| c == '\'' || c == '"');
    Some((base, key))
}

/// Value of a downward-API `fieldPath`.
/// `valueFrom.resourceFieldRef` for CPU, as kubelet resolves it: the named
/// container's (else this one's) limit or request in units of the divisor
/// (default 1), rounded up; without a limit, the node's CPUs.
pub fn resource_field_ref(
    pod: &Pod,
    this: &k8s_openapi::api::core::v1::Container,
    r: &k8s_openapi::api::core::v1::ResourceFieldSelector,
) -> Result<String, String> {
    let container = match r.container_name.as_deref().filter(|n| !n.is_empty()) {
        None => this,
        Some(name) => pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == name))
            .ok_or_else(|| format!("resourceFieldRef names unknown container {name:?}"))?,
    };
    let cores = |q: &str| -> Result<f64, String> {
        match q.strip_suffix('m') {
            Some(m) => m.parse::<f64>().map(|v| v / 1000.0),
            None => q.parse::<f64>(),
        }
        .map_err(|e| format!("CPU quantity {q:?}: {e}"))
    };
    let divisor = match &r.divisor {
        Some(d) => cores(&d.0)?,
        None => 1.0,
    };
    let resources = container.resources.as_ref();
    let value = match r.resource.as_str() {
        "limits.cpu" => resources
            .and_then(|x| x.limits.as_ref())
            .and_then(|l| l.get("cpu")),
        "requests.cpu" => resources
            .and_then(|x| x.requests.as_ref())
            .and_then(|l| l.get("cpu")),
        other => {
            return Err(format!(
                "resourceFieldRef {other} is not supported by kubelet-lite"
            ));
        }
    };
    let n = match value {
        Some(q) => cores(&q.0)?,
        None if r.resource == "limits.cpu" => {
            std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
        }
        None => 0.0,
    };
    Ok(((n / divisor).ceil() as u64).to_string())
}

pub fn field_ref(pod: &Pod, path: &str, pod_ip: Option<IpAddr>, host_ip: IpAddr) -> Option<String> {
    let spec = pod.spec.as_ref();
    let m = &pod.metadata;
    if let Some((base, key)) = subscript(path) {
        let map = match base {
            "metadata.labels" => m.labels.as_ref(),
            "metadata.annotations" => m.annotations.as_ref(),
            _ => return None,
        };
        return Some(map.and_then(|l| l.get(key)).cloned().unwrap_or_default());
    }
    match path {
        "metadata.name" => m.name.clone(),
        "metadata.namespace" => m.namespace.clone(),
        "metadata.uid" => m.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .or(Some("default".into())),
        "status.podIP" => pod_ip.map(|ip| ip.to_string()),
        "status.podIPs" => pod_ip.map(|ip| ip.to_string()),
        "status.hostIP" | "status.hostIPs" => Some(host_ip.to_string()),
        _ => None,
    }
}

/// Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` is a
/// literal `$`, undefined references stay as written.
pub fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The capability mask of a container (`None` = privileged).
pub fn capability_mask(pod: &Pod, c: &Container) -> Result<Option<u64>, String> {
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        return Ok(None);
    }
    let mut mask: u64 = 0;
    for n in RUNTIME_DEFAULT_CAPS {
        mask |= 1 << cap_number(n).expect("known capability");
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    for d in caps.and_then(|c| c.drop.as_ref()).into_iter().flatten() {
        if d.eq_ignore_ascii_case("ALL") {
            mask = 0;
        } else {
            let n = cap_number(d)
                .ok_or_else(|| format!("pod {}: unknown capability {d:?} in drop", pod_key(pod)))?;
            mask &= !(1 << n);
        }
    }
    for a in caps.and_then(|c| c.add.as_ref()).into_iter().flatten() {
        if a.eq_ignore_ascii_case("ALL") {
            return Ok(None);
        }
        let n = cap_number(a)
            .ok_or_else(|| format!("pod {}: unknown capability {a:?} in add", pod_key(pod)))?;
        mask |= 1 << n;
    }
    Ok(Some(mask))
}

/// Builds the launch spec of container `c` of `pod` (pure).
pub fn launch_spec(
    pod: &Pod,
    c: &Container,
    ctx: &LaunchContext<'_>,
) -> Result<LaunchSpec, ContainerError> {
    let fail = |reason: String| ContainerError::Spec {
        pod: pod_key(pod),
        container: c.name.clone(),
        reason,
    };
    // The container's filesystem view: image files, then volume mounts.
    let mut view = PathView::default();
    if let Some(image) = c.image.as_deref() {
        for (cpath, host) in ctx.images.files(image) {
            view.add(cpath.clone(), host.clone());
        }
    }
    for m in c.volume_mounts.iter().flatten() {
        let host = ctx
            .volumes
            .get(&m.name)
            .ok_or_else(|| VolumeError::UnknownMount {
                pod: pod_key(pod),
                container: c.name.clone(),
                mount: m.name.clone(),
            })?;
        let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => host.join(sub),
            None => host.clone(),
        };
        view.add(m.mount_path.clone(), host);
    }

    // Environment, in order, with $(VAR) references to earlier entries.
    let mut env: Vec<(String, String)> = Vec::new();
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut set = |k: String, v: String, env: &mut Vec<(String, String)>| {
        vars.insert(k.clone(), v.clone());
        env.retain(|(e, _)| *e != k);
        env.push((k, v));
    };
    for (k, v) in ctx.injected_env {
        set(k.clone(), v.clone(), &mut env);
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            if let Some(r) = &from.resource_field_ref {
                resource_field_ref(pod, c, r)
                    .map_err(|why| fail(format!("env {}: {why}", e.name)))?
            } else {
                let f = from.field_ref.as_ref().ok_or_else(|| {
                    fail(format!(
                        "env {}: only valueFrom.fieldRef and resourceFieldRef are supported by kubelet-lite",
                        e.name
                    ))
                })?;
                field_ref(pod, &f.field_path, ctx.pod_ip, ctx.host_ip).ok_or_else(|| {
                    fail(format!(
                        "env {}: fieldRef {} has no value",
                        e.name, f.field_path
                    ))
                })?
            }
        } else {
            let current: HashMap<String, String> = env.iter().cloned().collect();
            expand(e.value.as_deref().unwrap_or(""), &current)
        };
        set(e.name.clone(), view.translate_value(&value), &mut env);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        set("PATH".into(), DEFAULT_PATH.into(), &mut env);
    }
    let vars: HashMap<String, String> = env.iter().cloned().collect();

    // Command line.
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    if argv.is_empty() {
        // The image's entrypoint: its first file.
        let entry = c
            .image
            .as_deref()
            .and_then(|i| ctx.images.files(i).first())
            .map(|(cpath, _)| cpath.display().to_string())
            .ok_or_else(|| fail("no command and no known image entrypoint".into()))?;
        argv.push(entry);
    }
    argv.extend(c.args.clone().unwrap_or_default());
    let argv: Vec<String> = argv
        .iter()
        .map(|a| view.translate_value(&expand(a, &vars)))
        .collect();
    let program = PathBuf::from(&argv[0]);

    // Security context.
    let sc = c.security_context.as_ref();
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let user = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user))
        .map(|u| u as u32);
    let group = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
        .map(|g| g as u32);
    let capabilities = capability_mask(pod, c).map_err(fail)?;
    let no_new_privs = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    Ok(LaunchSpec {
        container: c.name.clone(),
        program,
        args: argv[1..].to_vec(),
        env,
        view,
        user,
        group,
        capabilities,
        no_new_privs,
    })
}

/// The kubelet-managed `/etc/hosts` of a pod.
pub fn hosts_file(pod: &Pod, pod_ip: Option<IpAddr>) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file (kubelet-lite).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    let name = pod.metadata.name.clone().unwrap_or_default();
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or(name);
    if let Some(ip) = pod_ip {
        s.push_str(&format!("{ip}\t{hostname}\n"));
    }
    let aliases = pod.spec.as_ref().and_then(|s| s.host_aliases.as_ref());
    if let Some(aliases) = aliases.filter(|a| !a.is_empty()) {
        s.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            let names = a.hostnames.clone().unwrap_or_default().join("\t");
            s.push_str(&format!("{}\t{names}\n", a.ip));
        }
    }
    s
}

/// Values prepared before `fork` for [`isolate`] (which runs between fork
/// and exec, where nothing may allocate).
struct Isolation {
    hosts: Option<CString>,
    etc_hosts: CString,
    root: CString,
    caps: Option<u64>,
    last_cap: u32,
    user: Option<u32>,
    group: Option<u32>,
    no_new_privs: bool,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn os_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// In the child, after it entered the netns (see
/// [`crate::netsim::NamedNetns::command`]) and before `exec`.
///
/// # Safety
/// Only raw system calls on values prepared before the fork.
unsafe fn isolate(i: &Isolation) -> std::io::Result<()> {
    unsafe {
        if let Some(hosts) = &i.hosts {
            // A private mount namespace (again: never touch the host's).
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(os_err());
            }
            if libc::mount(
                std::ptr::null(),
                i.root.as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(os_err());
            }
            if libc::mount(
                hosts.as_ptr(),
                i.etc_hosts.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(os_err());
            }
        }
        if let Some(mask) = i.caps {
            for cap in 0..=i.last_cap {
                if cap < 64
                    && mask & (1u64 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                    && *libc::__errno_location() != libc::EINVAL
                {
                    return Err(os_err());
                }
            }
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            );
            let mut hdr = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) != 0 {
                return Err(os_err());
            }
            data[0].inheritable &= mask as u32;
            data[1].inheritable &= (mask >> 32) as u32;
            if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
                return Err(os_err());
            }
        }
        if let Some(g) = i.group
            && (libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(g) != 0)
        {
            return Err(os_err());
        }
        if let Some(u) = i.user
            && libc::setuid(u) != 0
        {
            return Err(os_err());
        }
        if i.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os_err());
        }
    }
    Ok(())
}

/// Applies `spec` to `cmd` (made by `NamedNetns::command` for the pod's or
/// node's netns): program arguments, environment (cleared first; `owner`
/// re-added as the scope marker), `/etc/hosts`, security context.
pub fn configure(
    cmd: &mut std::process::Command,
    spec: &LaunchSpec,
    hosts: Option<&Path>,
    owner: (&str, &str),
) {
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env(owner.0, owner.1);
    let iso = Isolation {
        hosts: hosts.map(|h| CString::new(h.as_os_str().as_encoded_bytes()).expect("no NUL")),
        etc_hosts: CString::new("/etc/hosts").unwrap(),
        root: CString::new("/").unwrap(),
        caps: spec.capabilities,
        last_cap: last_cap(),
        user: spec.user,
        group: spec.group,
        no_new_privs: spec.no_new_privs,
    };
    // SAFETY: `isolate` makes only raw system calls on prepared values.
    unsafe {
        cmd.pre_exec(move || isolate(&iso));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars: HashMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("$(A)/b", &vars), "x/b");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("a$b", &vars), "a$b");
        assert_eq!(expand("$(A", &vars), "$(A");
    }

    #[test]
    fn capabilities_drop_all_then_add() {
        let p = pod(
            json!({"metadata": {"name": "p", "namespace": "n"}, "spec": {"containers": [
                {"name": "a", "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}}},
                {"name": "b"},
                {"name": "c", "securityContext": {"privileged": true}},
                {"name": "d", "securityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
                {"name": "e", "securityContext": {"capabilities": {"add": ["BOGUS"]}}}
            ]}}),
        );
        let cs = &p.spec.as_ref().unwrap().containers;
        let a = capability_mask(&p, &cs[0]).unwrap().unwrap();
        assert_eq!(cap_names(a), ["NET_ADMIN", "SYS_ADMIN"]);
        let b = capability_mask(&p, &cs[1]).unwrap().unwrap();
        assert_eq!(cap_names(b).len(), RUNTIME_DEFAULT_CAPS.len());
        assert!(cap_names(b).contains(&"NET_RAW"));
        assert_eq!(capability_mask(&p, &cs[2]).unwrap(), None);
        let d = capability_mask(&p, &cs[3]).unwrap().unwrap();
        assert!(!cap_names(d).contains(&"NET_RAW"));
        let e = capability_mask(&p, &cs[4]).unwrap_err();
        assert!(e.contains("BOGUS") && e.contains("n/p"), "{e}");
    }

    #[test]
    fn launch_spec_resolves_env_paths_and_command() {
        let p = pod(json!({
            "metadata": {"name": "agent-x", "namespace": "istio-system", "uid": "u1", "labels": {"app": "a"}},
            "spec": {
                "nodeName": "node1",
                "serviceAccountName": "sa1",
                "securityContext": {"runAsUser": 65532},
                "containers": [{
                    "name": "c", "image": "localhost/geneva-mesh/node-agent:dev",
                    "command": ["/usr/local/bin/node-agent"], "args": ["ca", "--x=$(POD_NAME)"],
                    "env": [
                        {"name": "CNI_BIN_DIR", "value": "/host/opt/cni/bin"},
                        {"name": "SRC", "value": "/opt/istio-cni/bin/istio-cni"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                        {"name": "REF", "value": "$(NODE_NAME)-$(MISSING)"},
                        {"name": "URL", "value": "https://mesh-ca.istio-system.svc:15012"},
                        {"name": "CPUS", "valueFrom": {"resourceFieldRef":
                            {"containerName": "c", "resource": "limits.cpu", "divisor": "1"}}},
                        {"name": "MILLIS", "valueFrom": {"resourceFieldRef":
                            {"resource": "requests.cpu", "divisor": "1m"}}}
                    ],
                    "resources": {"limits": {"cpu": "1500m"}, "requests": {"cpu": "250m"}},
                    "volumeMounts": [{"name": "bin", "mountPath": "/host/opt/cni/bin"}]
                }]
            }
        }));
        let volumes: BTreeMap<String, PathBuf> =
            [("bin".to_string(), PathBuf::from("/n1/opt/cni/bin"))].into();
        let mut images = Images::default();
        images.add_file("node-agent", "/usr/local/bin/node-agent", "/t/node-agent");
        images.add_file("node-agent", "/opt/istio-cni/bin/istio-cni", "/t/istio-cni");
        let injected = [("KUBECONFIG".to_string(), "/k".to_string())];
        let ctx = LaunchContext {
            pod_ip: Some("10.244.1.7".parse().unwrap()),
            host_ip: "172.30.0.11".parse().unwrap(),
            volumes: &volumes,
            images: &images,
            injected_env: &injected,
        };
        let c = &p.spec.as_ref().unwrap().containers[0];
        let s = launch_spec(&p, c, &ctx).unwrap();
        let env: HashMap<_, _> = s.env.iter().cloned().collect();
        assert_eq!(s.program, Path::new("/t/node-agent"));
        assert_eq!(s.args, ["ca", "--x=agent-x"]);
        assert_eq!(env["CNI_BIN_DIR"], "/n1/opt/cni/bin");
        assert_eq!(env["SRC"], "/t/istio-cni");
        assert_eq!(env["POD_NAME"], "agent-x");
        assert_eq!(env["NODE_NAME"], "node1");
        assert_eq!(env["IP"], "10.244.1.7");
        assert_eq!(env["APP"], "a");
        assert_eq!(env["REF"], "node1-$(MISSING)");
        assert_eq!(env["URL"], "https://mesh-ca.istio-system.svc:15012");
        assert_eq!(env["KUBECONFIG"], "/k");
        assert_eq!(env["CPUS"], "2", "1.5 CPUs rounded up, as kubelet");
        assert_eq!(env["MILLIS"], "250");
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(s.user, Some(65532));
        assert_eq!(s.group, None);

        // A mount naming no volume is refused, naming the pod.
        let mut bad = c.clone();
        bad.volume_mounts.as_mut().unwrap()[0].name = "nope".into();
        let e = launch_spec(&p, &bad, &ctx).unwrap_err().to_string();
        assert!(
            e.contains("istio-system/agent-x") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn hosts_file_has_aliases() {
        let p = pod(
            json!({"metadata": {"name": "zt"}, "spec": {"containers": [],
            "hostAliases": [{"ip": "10.244.1.3", "hostnames": ["mesh-ca", "mesh-ca.istio-system.svc"]}]}}),
        );
        let h = hosts_file(&p, Some("10.244.2.4".parse().unwrap()));
        assert!(h.contains("127.0.0.1\tlocalhost"));
        assert!(h.contains("10.244.2.4\tzt\n"));
        assert!(h.contains("10.244.1.3\tmesh-ca\tmesh-ca.istio-system.svc\n"));
    }
}
