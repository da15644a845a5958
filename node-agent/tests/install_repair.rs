//! The installer running against scratch bin/conf/run dirs: waits for a
//! primary config, repairs rewrites and removals within a second (through
//! inotify: the periodic resync is set far beyond the deadline), keeps
//! readiness false while the install is invalid, passes over configs that
//! do not load, and uninstalls cleanly.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::health::Readiness;
use node_agent::install::chain::PluginSettings;
use node_agent::install::kubeconfig::KubeconfigSource;
use node_agent::install::{ConfigMode, InstallConfig, Installer, READY_COMPONENT};
use serde_json::{Value, json};

const REPAIR_DEADLINE: Duration = Duration::from_secs(1);

struct Dirs {
    _root: tempfile::TempDir,
    src: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
    run: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let p = root.path().to_path_buf();
    for d in ["bin", "conf", "run", "image", "sa"] {
        fs::create_dir(p.join(d)).unwrap();
    }
    fs::write(p.join("image/istio-cni"), b"\x7fELF fake plugin").unwrap();
    fs::write(p.join("sa/ca.crt"), b"CA").unwrap();
    fs::write(p.join("sa/token"), b"token-1").unwrap();
    Dirs {
        src: p.join("image/istio-cni"),
        bin: p.join("bin"),
        conf: p.join("conf"),
        run: p.join("run"),
        _root: root,
    }
}

fn config(d: &Dirs, mode: ConfigMode) -> InstallConfig {
    let kubeconfig = d.run.join("istio-cni-kubeconfig");
    let sa = d.src.parent().unwrap().parent().unwrap().join("sa");
    InstallConfig {
        plugin_src: d.src.clone(),
        bin_dir: d.bin.clone(),
        secondary_bin_dir: None,
        conf_dir: d.conf.clone(),
        primary_conf_name: None,
        mode,
        write: Default::default(),
        plugin: PluginSettings {
            log_level: "info".into(),
            run_dir: d.run.clone(),
            ambient_enabled: true,
            exclude_namespaces: vec!["kube-system".into()],
            pod_namespace: "istio-system".into(),
            detection_retry: false,
            kubeconfig: kubeconfig.clone(),
            enablement_selectors: Default::default(),
        },
        kubeconfig_source: Some(KubeconfigSource::InCluster {
            server: "https://10.96.0.1:443".into(),
            ca_file: sa.join("ca.crt"),
            token_file: sa.join("token"),
            insecure: false,
        }),
        kubeconfig_path: kubeconfig,
        kubeconfig_mode: 0o600,
        // Far beyond the deadline: repairs must come from inotify events.
        resync_interval: Duration::from_secs(60),
    }
}

fn primary_list() -> Value {
    json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
           "plugins": [{"type": "bridge", "bridge": "cni0"}, {"type": "portmap"}]})
}

/// Writes like a CNI daemon does: temp file, then rename.
fn write_like_a_cni(path: &Path, v: &Value) {
    let tmp = path.with_extension("writing");
    fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn chained(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|p| p.iter().filter(|x| x["type"] == "istio-cni").count() == 1)
}

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Running {
    installer: Arc<Installer>,
    readiness: Readiness,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(cfg: InstallConfig) -> Self {
        let readiness = Readiness::new();
        let installer = Arc::new(Installer::new(cfg, readiness.register(READY_COMPONENT)));
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(installer.clone().run(async {
            let _ = rx.await;
        }));
        Self {
            installer,
            readiness,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) -> Arc<Installer> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task.take().unwrap())
            .await
            .expect("installer loop stops")
            .unwrap();
        self.installer.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_primary_then_repairs_rewrites_and_removals() {
    let d = dirs();
    let list = d.conf.join("10-k8s.conflist");
    let bin = d.bin.join("istio-cni");
    let run = Running::start(config(&d, ConfigMode::Chained));

    // No primary config yet: binary and kubeconfig are in place, not ready.
    wait_for("binary installed", REPAIR_DEADLINE, || bin.exists()).await;
    wait_for("not ready while waiting", REPAIR_DEADLINE, || {
        run.readiness
            .not_ready()
            .iter()
            .any(|(_, r)| r.contains("waiting for a CNI config"))
    })
    .await;
    assert!(d.run.join("istio-cni-kubeconfig").exists());

    // The primary CNI writes its config: chained within a second, ready.
    write_like_a_cni(&list, &primary_list());
    let t = wait_for("chained after first config", REPAIR_DEADLINE, || {
        chained(&list)
    })
    .await;
    wait_for("ready", REPAIR_DEADLINE, || run.readiness.is_ready()).await;
    println!("first chain after {t:?}");

    // Rewritten by the primary CNI (as at reboot): repaired.
    for round in 0..3 {
        write_like_a_cni(&list, &primary_list());
        let t = wait_for("repaired after rewrite", REPAIR_DEADLINE, || chained(&list)).await;
        println!("rewrite {round}: repaired after {t:?}");
    }
    // Overwritten in place (no rename).
    fs::write(&list, serde_json::to_vec(&primary_list()).unwrap()).unwrap();
    wait_for("repaired after in-place write", REPAIR_DEADLINE, || {
        chained(&list)
    })
    .await;

    // Binary removed or replaced: put back.
    fs::remove_file(&bin).unwrap();
    wait_for("binary restored", REPAIR_DEADLINE, || bin.exists()).await;
    fs::write(&bin, b"something else").unwrap();
    wait_for("binary content restored", REPAIR_DEADLINE, || {
        fs::read(&bin).ok().as_deref() == Some(b"\x7fELF fake plugin".as_slice())
    })
    .await;

    // Config removed, then written back as a single .conf: wrapped.
    fs::remove_file(&list).unwrap();
    wait_for("not ready without config", REPAIR_DEADLINE, || {
        !run.readiness.is_ready()
    })
    .await;
    let conf = d.conf.join("10-k8s.conf");
    write_like_a_cni(
        &conf,
        &json!({"cniVersion": "0.3.1", "name": "k8s", "type": "bridge"}),
    );
    wait_for("single conf wrapped", REPAIR_DEADLINE, || {
        !conf.exists() && chained(&list)
    })
    .await;
    wait_for("ready again", REPAIR_DEADLINE, || run.readiness.is_ready()).await;

    // A primary that loads but cannot be chained keeps us not ready, with
    // the file named.
    write_like_a_cni(
        &d.conf.join("05-broken.conflist"),
        &json!({"cniVersion": "0.2.0", "name": "old", "plugins": [{"type": "bridge"}]}),
    );
    wait_for("not ready on unchainable primary", REPAIR_DEADLINE, || {
        run.readiness
            .not_ready()
            .iter()
            .any(|(_, r)| r.contains("05-broken.conflist"))
    })
    .await;
    fs::remove_file(d.conf.join("05-broken.conflist")).unwrap();
    wait_for("ready after removal", REPAIR_DEADLINE, || {
        run.readiness.is_ready()
    })
    .await;

    // Token rotation reaches the plugin kubeconfig (on the next pass).
    let installer = run.stop().await;
    let sa_token = d.src.parent().unwrap().parent().unwrap().join("sa/token");
    fs::write(&sa_token, b"token-2").unwrap();
    installer.reconcile().unwrap();
    let kc = fs::read_to_string(d.run.join("istio-cni-kubeconfig")).unwrap();
    assert!(kc.contains("token-2"), "{kc}");

    // Uninstall: original shape back, kubeconfig gone; the binary stays for
    // the runtimes' DEL of pods created before (cached config names it).
    let changes = installer.uninstall().unwrap();
    assert!(changes.len() >= 2, "{changes:?}");
    assert!(!installer.is_ready());
    assert!(
        bin.exists(),
        "plugin binary kept for teardown of existing pods"
    );
    assert!(!d.run.join("istio-cni-kubeconfig").exists());
    assert!(!list.exists());
    let restored: Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
    assert_eq!(
        restored,
        json!({"cniVersion": "0.3.1", "name": "k8s", "type": "bridge"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_mode_follows_primary_and_leaves_it_alone() {
    let d = dirs();
    let primary = d.conf.join("10-k8s.conflist");
    write_like_a_cni(&primary, &primary_list());
    let run = Running::start(config(&d, ConfigMode::IstioOwned));
    let ours = d.conf.join("02-istio-cni.conflist");
    wait_for("owned config written", REPAIR_DEADLINE, || chained(&ours)).await;
    wait_for("ready", REPAIR_DEADLINE, || run.readiness.is_ready()).await;

    fs::remove_file(&ours).unwrap();
    wait_for("owned config restored", REPAIR_DEADLINE, || chained(&ours)).await;

    let mut changed = primary_list();
    changed["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "bandwidth"}));
    write_like_a_cni(&primary, &changed);
    wait_for("owned config follows primary", REPAIR_DEADLINE, || {
        fs::read(&ours)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["plugins"].as_array().is_some_and(|p| p.len() == 4))
    })
    .await;
    assert!(!chained(&primary), "primary never modified");

    let installer = run.stop().await;
    installer.keep_for_upgrade();
    assert!(
        ours.exists() && d.bin.join("istio-cni").exists(),
        "upgrade keeps everything"
    );
    installer.uninstall().unwrap();
    assert!(!ours.exists());
    assert!(primary.exists());
    assert!(d.bin.join("istio-cni").exists(), "binary kept on uninstall");
}

/// `ISTIO_OWNED_CNI_CONFIG_FILENAME`: the istio-owned config under another
/// name is written, repaired and uninstalled under that name, and it is never
/// taken for the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_mode_uses_the_configured_file_name() {
    let d = dirs();
    let primary = d.conf.join("10-k8s.conflist");
    write_like_a_cni(&primary, &primary_list());
    let mut cfg = config(&d, ConfigMode::IstioOwned);
    cfg.write.owned_name = "00-mesh.conflist".into();
    let run = Running::start(cfg);
    let ours = d.conf.join("00-mesh.conflist");
    wait_for("owned config written", REPAIR_DEADLINE, || chained(&ours)).await;
    wait_for("ready", REPAIR_DEADLINE, || run.readiness.is_ready()).await;
    assert!(!d.conf.join("02-istio-cni.conflist").exists());
    fs::remove_file(&ours).unwrap();
    wait_for("owned config restored", REPAIR_DEADLINE, || chained(&ours)).await;
    assert!(!chained(&primary), "primary never modified");
    let installer = run.stop().await;
    installer.uninstall().unwrap();
    assert!(!ours.exists());
    assert!(primary.exists() && !chained(&primary));
}

/// A config that sorts first but does not load is passed over (ready,
/// chained into the next); once it is fixed, it is the primary and gets
/// chained within a second; broken again, the chaining stays where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_does_not_load_is_skipped_until_it_is_fixed() {
    let d = dirs();
    let first = d.conf.join("05-first.conflist");
    let list = d.conf.join("10-k8s.conflist");
    fs::write(&first, b"{ half written").unwrap();
    write_like_a_cni(&list, &primary_list());
    let run = Running::start(config(&d, ConfigMode::Chained));
    wait_for("next config chained", REPAIR_DEADLINE, || chained(&list)).await;
    wait_for("ready", REPAIR_DEADLINE, || run.readiness.is_ready()).await;
    assert_eq!(fs::read(&first).unwrap(), b"{ half written", "left alone");

    write_like_a_cni(&first, &primary_list());
    let t = wait_for("fixed config chained", REPAIR_DEADLINE, || chained(&first)).await;
    println!("fixed config chained after {t:?}");
    assert!(run.readiness.is_ready());
    assert!(chained(&list), "the earlier primary keeps its entry");

    write_like_a_cni(
        &first,
        &json!({"cniVersion": "1.0.0", "name": "k8s-pod-network"}),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(run.readiness.is_ready());
    assert!(chained(&list));

    let installer = run.stop().await;
    installer.uninstall().unwrap();
    assert!(!chained(&list));
}
