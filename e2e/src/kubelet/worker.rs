//! One pod's life on the node: volumes → sandbox (netns + CNI ADD, retried)
//! → containers (started, probed, restarted) → teardown (stop, CNI DEL,
//! netns, cgroup, files). See the module docs of [`super`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, Patch, PatchParams};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

use super::cni::{AddResult, SandboxRef};
use super::container::{self, LaunchContext};
use super::probe::{self, ProbeAction, ProbeTiming};
use super::status::{ContainerState, PodStatusReport, now_rfc3339};
use super::{ContainerInfo, PodCommand, PodInfo, PodPhase, Shared, cgroup, volumes};
use crate::netsim::{NamedNetns, OWNER_ENV};

/// How often the supervision loop looks at processes and probes.
const TICK: Duration = Duration::from_millis(25);

struct Ctr {
    spec: Container,
    child: Option<tokio::process::Child>,
    pid: Option<u32>,
    restarts: u32,
    held: bool,
    restart_at: Option<Instant>,
    backoff: Duration,
    started_at: Option<String>,
    exit_code: Option<i32>,
    ready: bool,
    probe: Option<(ProbeAction, ProbeTiming)>,
    next_probe: Instant,
    successes: u32,
    failures: u32,
    log: PathBuf,
    /// Set when the spec or probe is unusable: never started.
    broken: Option<String>,
}

struct Worker {
    shared: Arc<Shared>,
    uid: String,
    key: String,
    pod: Pod,
    updates: watch::Receiver<Option<Pod>>,
    commands: mpsc::UnboundedReceiver<PodCommand>,
    info: Arc<Mutex<PodInfo>>,
    deleted: bool,
    host_network: bool,
    netns: Option<NamedNetns>,
    sandbox: Option<SandboxRef>,
    added: Option<AddResult>,
    ip: Option<IpAddr>,
    volumes: BTreeMap<String, PathBuf>,
    hosts: Option<PathBuf>,
    ctrs: Vec<Ctr>,
    start_time: String,
    sandbox_message: Option<String>,
    last_report: Option<PodStatusReport>,
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    uid: String,
    updates: watch::Receiver<Option<Pod>>,
    commands: mpsc::UnboundedReceiver<PodCommand>,
    info: Arc<Mutex<PodInfo>>,
) {
    let Some(pod) = updates.borrow().clone() else {
        shared.pods().remove(&uid);
        return;
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let key = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    );
    let log_dir = shared.cfg.fs.log_dir(
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or(""),
        &uid,
    );
    let ctrs = spec
        .containers
        .iter()
        .map(|c| {
            let (probe, broken) = match c.readiness_probe.as_ref().map(|p| probe::resolve(c, p)) {
                None => (None, None),
                Some(Ok(p)) => (Some(p), None),
                Some(Err(e)) => (None, Some(e)),
            };
            Ctr {
                spec: c.clone(),
                child: None,
                pid: None,
                restarts: 0,
                held: false,
                restart_at: None,
                backoff: shared.cfg.restart_backoff.0,
                started_at: None,
                exit_code: None,
                ready: false,
                probe,
                next_probe: Instant::now(),
                successes: 0,
                failures: 0,
                log: log_dir.join(format!("{}.log", c.name)),
                broken,
            }
        })
        .collect();
    let mut w = Worker {
        host_network: spec.host_network == Some(true),
        shared: shared.clone(),
        uid: uid.clone(),
        key,
        pod,
        updates,
        commands,
        info,
        deleted: false,
        netns: None,
        sandbox: None,
        added: None,
        ip: None,
        volumes: BTreeMap::new(),
        hosts: None,
        ctrs,
        start_time: now_rfc3339(),
        sandbox_message: None,
        last_report: None,
    };
    w.sync_info();
    if w.prepare().await {
        w.supervise().await;
    }
    w.teardown().await;
    shared.pods().remove(&uid);
}

impl Worker {
    fn cfg(&self) -> &super::KubeletConfig {
        &self.shared.cfg
    }

    /// Copies the current state into the shared [`PodInfo`].
    fn sync_info(&self) {
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner());
        i.netns = self.netns.as_ref().map(|n| n.name().to_string());
        i.ip = self.ip;
        i.ready = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.ready);
        i.containers = self
            .ctrs
            .iter()
            .map(|c| {
                (
                    c.spec.name.clone(),
                    ContainerInfo {
                        pid: c.pid,
                        running: c.child.is_some(),
                        ready: c.ready,
                        restarts: c.restarts,
                        held: c.held,
                        log: c.log.clone(),
                    },
                )
            })
            .collect();
    }

    fn set_phase(&self, phase: PodPhase) {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).phase = phase;
    }

    fn note_failure(&mut self, what: &str, e: &str) {
        tracing::warn!(pod = %self.key, node = %self.cfg().node_name, "kubelet-lite: {what} failed (retrying): {e}");
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner());
        i.sandbox_failures += 1;
        i.last_error = Some(format!("{what}: {e}"));
    }

    /// Takes pod updates; returns true once the pod is deleted.
    fn poll_updates(&mut self) -> bool {
        // Always look at the value: `changed()` in a select may already
        // have marked it seen.
        let current = self.updates.borrow_and_update();
        match &*current {
            None => self.deleted = true,
            Some(p) if p.metadata.resource_version != self.pod.metadata.resource_version => {
                self.pod = p.clone()
            }
            Some(_) => {}
        }
        drop(current);
        self.deleted
    }

    /// Sleeps `d` unless the pod is deleted meanwhile; true = deleted.
    async fn sleep_or_deleted(&mut self, d: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if self.poll_updates() {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return self.poll_updates(),
                r = self.updates.changed() => {
                    if r.is_err() {
                        self.deleted = true;
                        return true;
                    }
                }
            }
        }
    }

    /// Volumes, sandbox, containers. False when the pod went first.
    async fn prepare(&mut self) -> bool {
        let (first, max) = self.cfg().sandbox_backoff;
        // Volumes.
        let mut delay = first;
        loop {
            if self.poll_updates() {
                return false;
            }
            match volumes::prepare(&self.shared.client, &self.pod, &self.cfg().fs).await {
                Ok(v) => {
                    self.volumes = v;
                    break;
                }
                Err(e) => {
                    self.note_failure("volumes", &e.to_string());
                    self.sandbox_message = Some(e.to_string());
                    self.report("Pending").await;
                    if self.sleep_or_deleted(delay).await {
                        return false;
                    }
                    delay = (delay * 2).min(max);
                }
            }
        }
        // Sandbox.
        if self.host_network {
            self.ip = Some(IpAddr::V4(self.cfg().node_ip));
        } else if !self.create_sandbox().await {
            return false;
        }
        self.sandbox_message = None;
        // /etc/hosts (kubelet-managed, pod network only).
        if !self.host_network {
            let dir = self.cfg().fs.pod_dir(&self.uid);
            let path = dir.join("etc-hosts");
            let content = container::hosts_file(&self.pod, self.ip);
            let written =
                std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, content));
            match written {
                Ok(()) => self.hosts = Some(path),
                Err(e) => {
                    tracing::warn!(pod = %self.key, error = %e, "kubelet-lite: cannot write the pod's hosts file")
                }
            }
        }
        // Containers.
        self.set_phase(PodPhase::Running);
        for i in 0..self.ctrs.len() {
            self.start_container(i);
        }
        self.sync_info();
        self.report("Running").await;
        true
    }

    /// netns + CNI ADD, retried with backoff. False when the pod went first.
    async fn create_sandbox(&mut self) -> bool {
        let (first, max) = self.cfg().sandbox_backoff;
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let short: String = self
            .uid
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(6)
            .collect();
        let netns_name = format!("{}-{name}-{short}", self.cfg().node_name);
        let scope = self.cfg().scope.clone();
        let created = tokio::task::spawn_blocking(move || scope.create_netns(&netns_name))
            .await
            .expect("netns creation panicked");
        let netns = match created {
            Ok(n) => n,
            Err(e) => {
                self.note_failure("sandbox netns", &e.to_string());
                return false;
            }
        };
        let sb = SandboxRef {
            namespace: self.pod.metadata.namespace.clone().unwrap_or_default(),
            name: name.clone(),
            uid: self.uid.clone(),
            container_id: format!("sandbox-{}", self.uid),
            netns_path: netns.path().to_path_buf(),
            ifname: "eth0".into(),
        };
        self.netns = Some(netns);
        self.sandbox = Some(sb.clone());
        self.sync_info();
        let mut delay = first;
        loop {
            if self.poll_updates() {
                return false;
            }
            let t0 = Instant::now();
            match self.shared.cni.add(&sb).await {
                Ok(r) => {
                    tracing::info!(pod = %self.key, node = %self.cfg().node_name, plugins = ?r.list.plugin_types(),
                        ips = ?r.ips(), took = ?t0.elapsed(), "kubelet-lite: sandbox ready");
                    self.ip = r.ips().first().copied();
                    self.info
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .cni_log
                        .clone_from(&r.plugin_log);
                    self.added = Some(r);
                    return true;
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.note_failure("CNI ADD", &msg);
                    self.sandbox_message = Some(msg);
                    self.report("Pending").await;
                    if self.sleep_or_deleted(delay).await {
                        return false;
                    }
                    delay = (delay * 2).min(max);
                }
            }
        }
    }

    fn start_container(&mut self, i: usize) {
        if let Some(why) = &self.ctrs[i].broken {
            tracing::error!(pod = %self.key, container = %self.ctrs[i].spec.name, "kubelet-lite: cannot start: {why}");
            return;
        }
        let ctx = LaunchContext {
            pod_ip: self.ip,
            host_ip: IpAddr::V4(self.cfg().node_ip),
            volumes: &self.volumes,
            images: &self.cfg().images,
            injected_env: &self.cfg().injected_env,
        };
        let spec = match container::launch_spec(&self.pod, &self.ctrs[i].spec, &ctx) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(pod = %self.key, "kubelet-lite: {e}");
                self.ctrs[i].broken = Some(e.to_string());
                return;
            }
        };
        let node_ns;
        let ns: &NamedNetns = match (&self.netns, self.host_network) {
            (Some(n), false) => n,
            _ => match NamedNetns::open(&self.cfg().node_netns) {
                Ok(n) => {
                    node_ns = n;
                    &node_ns
                }
                Err(e) => {
                    tracing::error!(pod = %self.key, error = %e, "kubelet-lite: node netns unavailable");
                    return;
                }
            },
        };
        let mut cmd = ns.command(&spec.program);
        container::configure(
            &mut cmd,
            &spec,
            self.hosts.as_deref(),
            (OWNER_ENV, self.cfg().scope.prefix()),
        );
        let c = &mut self.ctrs[i];
        let log = c
            .log
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&c.log)
            });
        match log.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((out, err)) => {
                cmd.stdout(out).stderr(err);
            }
            Err(e) => {
                tracing::warn!(pod = %self.key, log = %c.log.display(), error = %e, "kubelet-lite: no container log");
            }
        }
        cmd.stdin(std::process::Stdio::null());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(false);
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id();
                c.child = Some(child);
                c.pid = pid;
                c.started_at = Some(now_rfc3339());
                c.exit_code = None;
                c.ready = c.probe.is_none();
                c.successes = 0;
                c.failures = 0;
                if let Some((_, t)) = &c.probe {
                    c.next_probe =
                        Instant::now() + t.initial_delay.min(self.shared.cfg.max_probe_period);
                }
                if let (Some(h), Some(pid)) = (&self.shared.cfg.cgroup_hierarchy, pid) {
                    let dir = cgroup::pod_dir(
                        h,
                        self.shared.cfg.scope.prefix(),
                        &self.shared.cfg.node_name,
                        &self.uid,
                    )
                    .join(&c.spec.name);
                    if let Err(e) = cgroup::join(&dir, pid) {
                        tracing::warn!(pod = %self.key, dir = %dir.display(), error = %e, "kubelet-lite: cannot put container in its cgroup");
                    }
                }
                tracing::info!(pod = %self.key, container = %c.spec.name, pid = ?pid, restarts = c.restarts,
                    program = %spec.program.display(), "kubelet-lite: container started");
            }
            Err(e) => {
                tracing::error!(pod = %self.key, container = %c.spec.name, program = %spec.program.display(), error = %e,
                    "kubelet-lite: cannot start container");
                c.restart_at = Some(Instant::now() + c.backoff);
                c.backoff = (c.backoff * 2).min(self.shared.cfg.restart_backoff.1);
            }
        }
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn signal(c: &Ctr, sig: Signal) {
        if let Some(pid) = c.pid.filter(|_| c.child.is_some()) {
            let p = Pid::from_raw(pid as i32);
            if killpg(p, sig).is_err() {
                let _ = nix::sys::signal::kill(p, sig);
            }
        }
    }

    fn handle(&mut self, cmd: PodCommand) {
        match cmd {
            PodCommand::Kill {
                container,
                signal,
                hold,
            } => {
                if let Some(c) = self.ctrs.iter_mut().find(|c| c.spec.name == container) {
                    c.held |= hold;
                    tracing::info!(pod = %self.key, container = %container, ?signal, hold, "kubelet-lite: signalling container (test hook)");
                    Self::signal(c, signal);
                }
            }
            PodCommand::Release { container } => {
                if let Some(c) = self.ctrs.iter_mut().find(|c| c.spec.name == container) {
                    c.held = false;
                    if c.child.is_none() {
                        c.restart_at = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Runs probes due now (each from the node netns).
    async fn probe(&mut self) -> bool {
        let Some(ip) = self.ip else { return false };
        let now = Instant::now();
        let cap = self.cfg().max_probe_period;
        let node_netns = self.cfg().node_netns.clone();
        let mut changed = false;
        for c in self.ctrs.iter_mut() {
            let Some((action, timing)) = c.probe.clone() else {
                continue;
            };
            if c.child.is_none() || now < c.next_probe {
                continue;
            }
            c.next_probe = now + timing.period.min(cap);
            let ns = node_netns.clone();
            let result = tokio::task::spawn_blocking(move || {
                NamedNetns::open(&ns)
                    .map_err(|e| e.to_string())
                    .and_then(|n| {
                        n.run(|| probe::run_blocking(&action, ip, timing.timeout))
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|r| r)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match result {
                Ok(()) => {
                    c.failures = 0;
                    c.successes += 1;
                    if !c.ready && c.successes >= timing.success_threshold {
                        c.ready = true;
                        changed = true;
                    }
                }
                Err(e) => {
                    c.successes = 0;
                    c.failures += 1;
                    if c.ready && c.failures >= timing.failure_threshold {
                        tracing::info!(pod = %self.key, container = %c.spec.name, "kubelet-lite: readiness probe failed: {e}");
                        c.ready = false;
                        changed = true;
                    }
                }
            }
        }
        changed
    }

    async fn supervise(&mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let resync_every = self.cfg().volume_resync;
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + resync_every, resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = resync.tick() => {
                    // Bounded: a slow API must not hold up probes and restarts.
                    let sync = volumes::refresh(&self.shared.client, &self.pod, &self.volumes);
                    if tokio::time::timeout(resync_every, sync).await.is_err() {
                        tracing::warn!(pod = %self.key, "kubelet-lite: volume refresh took longer than {resync_every:?}; retried next period");
                    }
                }
                r = self.updates.changed() => {
                    if r.is_err() {
                        self.deleted = true;
                    }
                }
                Some(cmd) = self.commands.recv() => self.handle(cmd),
            }
            if self.poll_updates() {
                return;
            }
            let mut changed = false;
            let policy = self.restart_policy().to_string();
            let (first, max) = self.cfg().restart_backoff;
            for c in self.ctrs.iter_mut() {
                let Some(child) = c.child.as_mut() else {
                    continue;
                };
                let Ok(Some(st)) = child.try_wait() else {
                    continue;
                };
                let code = st.code().unwrap_or(
                    128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0),
                );
                tracing::info!(pod = %self.key, container = %c.spec.name, status = %st, "kubelet-lite: container exited");
                // What is left of its process group goes too.
                if let Some(pid) = c.pid {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                c.child = None;
                c.ready = false;
                c.exit_code = Some(code);
                changed = true;
                let restart = match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => code != 0,
                    _ => true,
                };
                if restart {
                    c.restart_at = Some(Instant::now() + c.backoff);
                    c.backoff = (c.backoff * 2).min(max);
                }
            }
            let now = Instant::now();
            for i in 0..self.ctrs.len() {
                let c = &self.ctrs[i];
                if c.child.is_none() && !c.held && c.restart_at.is_some_and(|t| now >= t) {
                    self.ctrs[i].restart_at = None;
                    self.ctrs[i].restarts += 1;
                    self.start_container(i);
                    changed = true;
                }
            }
            // A container that ran long enough gets its backoff reset.
            for c in self.ctrs.iter_mut() {
                if c.child.is_some() && c.ready {
                    c.backoff = first;
                }
            }
            changed |= self.probe().await;
            if changed {
                self.sync_info();
                let phase = self.phase_name();
                self.report(phase).await;
            }
        }
    }

    fn phase_name(&self) -> &'static str {
        let done = self.ctrs.iter().all(|c| {
            c.child.is_none() && c.restart_at.is_none() && !c.held && c.exit_code.is_some()
        });
        if !self.ctrs.is_empty() && done {
            if self.ctrs.iter().all(|c| c.exit_code == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else {
            "Running"
        }
    }

    /// Patches `pods/status` when the report changed.
    async fn report(&mut self, phase: &'static str) {
        let sandbox_ready = self.host_network || self.added.is_some();
        let report = PodStatusReport {
            phase,
            pod_ip: if sandbox_ready { self.ip } else { None },
            host_ip: IpAddr::V4(self.cfg().node_ip),
            start_time: self.start_time.clone(),
            sandbox_ready,
            sandbox_message: self.sandbox_message.clone(),
            containers: self
                .ctrs
                .iter()
                .map(|c| ContainerState {
                    name: c.spec.name.clone(),
                    image: c.spec.image.clone().unwrap_or_default(),
                    running: c.child.is_some(),
                    ready: c.ready,
                    restarts: c.restarts,
                    started_at: c.started_at.clone(),
                    waiting_reason: if sandbox_ready {
                        (c.child.is_none() && c.exit_code.is_none())
                            .then(|| "CrashLoopBackOff".to_string())
                    } else {
                        Some("ContainerCreating".into())
                    },
                    exit_code: c.exit_code,
                })
                .collect(),
        };
        if self.last_report.as_ref() == Some(&report) {
            return;
        }
        let ns = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &ns);
        let body = serde_json::json!({"status": report.to_status(&now_rfc3339())});
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => self.last_report = Some(report),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(pod = %self.key, error = %e, "kubelet-lite: status update failed")
            }
        }
    }

    async fn teardown(&mut self) {
        self.set_phase(PodPhase::Terminating);
        let grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(Duration::from_secs(30))
            .min(self.cfg().max_grace);
        for c in &self.ctrs {
            Self::signal(c, Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for c in self.ctrs.iter_mut() {
            if let Some(child) = c.child.as_mut()
                && tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
            {
                Self::signal(c, Signal::SIGKILL);
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), c.child.as_mut().unwrap().wait())
                        .await;
            }
            // Children of the container that outlived it.
            if let Some(pid) = c.pid {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            c.child = None;
            c.ready = false;
        }
        if let Some(sb) = self.sandbox.take() {
            for attempt in 0..3 {
                match self.shared.cni.del(&sb, self.added.as_ref()).await {
                    Ok(()) => break,
                    Err(e) if attempt < 2 => {
                        tracing::warn!(pod = %self.key, error = %e, "kubelet-lite: CNI DEL failed (retrying)");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        tracing::error!(pod = %self.key, error = %e, "kubelet-lite: CNI DEL failed; removing the netns anyway")
                    }
                }
            }
        }
        if let Some(ns) = self.netns.take() {
            let _ = tokio::task::spawn_blocking(move || drop(ns)).await;
        }
        if let Some(h) = self.cfg().cgroup_hierarchy.clone() {
            let dir = cgroup::pod_dir(
                &h,
                self.cfg().scope.prefix(),
                &self.cfg().node_name,
                &self.uid,
            );
            let _ = tokio::task::spawn_blocking(move || cgroup::remove_tree(&dir)).await;
        }
        let _ = std::fs::remove_dir_all(self.cfg().fs.pod_dir(&self.uid));
        self.sync_info();
        self.set_phase(PodPhase::Gone);
        tracing::info!(pod = %self.key, node = %self.cfg().node_name, "kubelet-lite: pod torn down");
    }
}
