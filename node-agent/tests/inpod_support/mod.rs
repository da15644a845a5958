//! Shared by the in-pod integration tests: the golden cases, throw-away
//! network namespaces and a fake ztunnel hand-off.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::future::BoxFuture;
use mesh_proto::zds::WorkloadInfo;

use node_agent::redirect::inpod::rules::{
    self, ANNOTATION_BYPASS_INBOUND, ANNOTATION_DNS_CAPTURE, ANNOTATION_REROUTE_VIRTUAL_INTERFACES,
    Ownership, PodRuleOptions,
};
use node_agent::redirect::inpod::{HandoffError, WorkloadHandoff};
use node_agent::redirect::iptables::{Family, Ruleset};
use node_agent::redirect::netns::Netns;

/// (golden name, global DNS capture, pod annotations); files
/// `testdata/inpod/<name>_v4.golden` and `_v6.golden`.
pub type GoldenCase = (&'static str, bool, &'static [(&'static str, &'static str)]);

pub const GOLDEN_CASES: &[GoldenCase] = &[
    ("pod_default", false, &[]),
    ("pod_dns_capture", true, &[]),
    (
        "pod_dns_annotation_on_global_off",
        false,
        &[(ANNOTATION_DNS_CAPTURE, "true")],
    ),
    (
        "pod_dns_annotation_off_global_on",
        true,
        &[(ANNOTATION_DNS_CAPTURE, "false")],
    ),
    (
        "pod_bypass_inbound",
        false,
        &[(ANNOTATION_BYPASS_INBOUND, "true")],
    ),
    (
        "pod_virtual_interfaces",
        false,
        &[(ANNOTATION_REROUTE_VIRTUAL_INTERFACES, "fake1s0f0,fake1s0f1")],
    ),
    (
        "pod_virtual_interface_wildcard",
        false,
        &[(ANNOTATION_REROUTE_VIRTUAL_INTERFACES, "tap+")],
    ),
    (
        "pod_bypass_inbound_and_virtual_interfaces",
        false,
        &[
            (ANNOTATION_BYPASS_INBOUND, "true"),
            (ANNOTATION_REROUTE_VIRTUAL_INTERFACES, "fake1s0f0,fake1s0f1"),
        ],
    ),
    (
        "pod_all_variants",
        true,
        &[
            (ANNOTATION_BYPASS_INBOUND, "true"),
            (ANNOTATION_REROUTE_VIRTUAL_INTERFACES, "fake1s0f0"),
        ],
    ),
];

pub fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn options(global_dns: bool, pairs: &[(&str, &str)]) -> PodRuleOptions {
    let (opts, warnings) = PodRuleOptions::from_annotations(global_dns, &annotations(pairs));
    assert!(warnings.is_empty(), "{pairs:?}: {warnings:?}");
    opts
}

pub fn family_suffix(f: Family) -> &'static str {
    match f {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/inpod")
}

pub fn read_golden(name: &str) -> String {
    let path = golden_dir().join(format!("{name}.golden"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `UPDATE_GOLDENS=1 cargo test -p node-agent --test inpod_rules`)",
            path.display()
        )
    })
}

/// A golden batch, as the owned part of what `iptables-save` would print
/// after applying it to an empty netns (`-I X 1` hooks read back as `-A X`).
pub fn golden_view(name: &str, owned: Ownership) -> BTreeMap<(String, String), Vec<String>> {
    let text = read_golden(name);
    let normalised: String = text
        .lines()
        .map(|l| match l.strip_prefix("-I ") {
            Some(rest) => {
                let (chain, rest) = rest.split_once(' ').unwrap();
                let rest = rest.strip_prefix("1 ").unwrap_or(rest);
                format!("-A {chain} {rest}\n")
            }
            None => format!("{l}\n"),
        })
        .collect();
    rules::owned_view(&Ruleset::parse(&normalised), owned)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A fresh anonymous network namespace with `lo` up. It disappears when the
/// handle (and every clone) is dropped, so nothing can leak on failure.
pub struct TestNetns {
    pub ns: Netns,
}

impl TestNetns {
    pub fn new() -> Self {
        let ns = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let ns = Netns::current().expect("own netns");
            set_lo_up();
            ns
        })
        .join()
        .unwrap();
        Self { ns }
    }

    /// A path that opens this namespace while `self` lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.ns.as_raw_fd()
        ))
    }

    pub fn netns(&self) -> Netns {
        Netns::open(self.path()).unwrap()
    }
}

fn set_lo_up() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        use futures::TryStreamExt;
        let lo = handle
            .link()
            .get()
            .match_name("lo".to_string())
            .execute()
            .try_next()
            .await
            .unwrap()
            .expect("lo");
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(lo.header.index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .expect("set lo up");
    });
}

/// Runs `cmd` with `args` inside `ns`, returns stdout (panics on failure).
pub fn run_in(ns: &Netns, cmd: &str, args: &[&str]) -> String {
    let (cmd, args): (String, Vec<String>) =
        (cmd.into(), args.iter().map(|s| s.to_string()).collect());
    ns.run(move || {
        let out = std::process::Command::new(&cmd)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .unwrap()
}

/// Records hand-off calls; fails `add` while `fail_add` is set. With
/// `watch_host` (a host netns path), each `add` also records that netns's
/// `ipset save` at that moment in `host_sets_at_add`.
#[derive(Default)]
pub struct FakeHandoff {
    pub calls: Mutex<Vec<String>>,
    pub fail_add: Mutex<bool>,
    pub watch_host: Mutex<Option<PathBuf>>,
    pub host_sets_at_add: Mutex<Vec<String>>,
}

impl WorkloadHandoff for FakeHandoff {
    fn add<'a>(
        &'a self,
        uid: &'a str,
        info: &'a WorkloadInfo,
        netns: &'a Netns,
    ) -> BoxFuture<'a, Result<(), HandoffError>> {
        Box::pin(async move {
            assert!(node_agent::redirect::netns::is_netns(
                std::os::fd::AsFd::as_fd(netns)
            ));
            self.calls
                .lock()
                .unwrap()
                .push(format!("add {uid} {}/{}", info.namespace, info.name));
            let watched = self.watch_host.lock().unwrap().clone();
            if let Some(host) = watched {
                let sets = run_in(&Netns::open(host).unwrap(), "ipset", &["save"]);
                self.host_sets_at_add.lock().unwrap().push(sets);
            }
            if *self.fail_add.lock().unwrap() {
                return Err("no ztunnel connected".into());
            }
            Ok(())
        })
    }

    fn register(&self, uid: &str, _info: &WorkloadInfo, netns: Option<&Netns>) {
        self.calls.lock().unwrap().push(format!(
            "register {uid} {}",
            if netns.is_some() { "netns" } else { "keep" }
        ));
    }

    fn del<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, Result<(), HandoffError>> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(format!("del {uid}"));
            Ok(())
        })
    }
}
