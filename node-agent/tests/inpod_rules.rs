//! Golden files for every in-pod rule variant (pod netns, IPv4 and IPv6) and
//! the host probe-SNAT rules. `UPDATE_GOLDENS=1` rewrites them.

mod inpod_support;

use inpod_support::*;
use node_agent::redirect::inpod::rules::{self, RuleConfig};
use node_agent::redirect::iptables::Family;

/// Every golden file: (file stem, batch for a fresh netns).
fn golden_batches() -> Vec<(String, String)> {
    let cfg = RuleConfig::default();
    let mut out = Vec::new();
    for (name, global_dns, ann) in GOLDEN_CASES {
        let o = options(*global_dns, ann);
        for fam in [Family::V4, Family::V6] {
            out.push((
                format!("{name}_{}", family_suffix(fam)),
                rules::fresh_batch(&rules::pod_rules(&cfg, &o, fam), rules::POD_OWNERSHIP),
            ));
        }
    }
    for fam in [Family::V4, Family::V6] {
        out.push((
            format!("host_{}", family_suffix(fam)),
            rules::fresh_batch(&rules::host_rules(&cfg, fam), rules::HOST_OWNERSHIP),
        ));
    }
    out
}

#[test]
fn goldens() {
    let dir = golden_dir();
    let update = std::env::var_os("UPDATE_GOLDENS").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for (name, batch) in golden_batches() {
        let path = dir.join(format!("{name}.golden"));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &batch).unwrap();
            continue;
        }
        let want = read_golden(&name);
        if want != batch {
            failures.push(format!(
                "{}:\n--- golden\n{want}--- generated\n{batch}",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The golden set is complete: no stray files, nothing missing.
#[test]
fn every_golden_file_is_generated() {
    let mut on_disk: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".golden").map(str::to_string)
        })
        .collect();
    let mut generated: Vec<String> = golden_batches().into_iter().map(|(n, _)| n).collect();
    on_disk.sort();
    generated.sort();
    assert_eq!(on_disk, generated);
}

/// Spot checks against the reference table, independent of the goldens.
#[test]
fn default_v4_has_the_reference_rules() {
    let b = read_golden("pod_dns_capture_v4");
    for want in [
        "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
        "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        "-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1",
        "-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1",
        "-A PREROUTING -j ISTIO_PRERT",
        "-A OUTPUT -j ISTIO_OUTPUT",
    ] {
        assert!(b.contains(want), "missing {want}");
    }
    let h = read_golden("host_v6");
    assert!(h.contains("-I POSTROUTING 1 -j ISTIO_POSTRT"));
    assert!(h.contains(
        "--match-set istio-inpod-probes-v6 dst -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    ));
}
