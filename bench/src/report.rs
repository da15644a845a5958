//! The results table (printed and written to `bench/RESULTS.md`).
//!
//! A run may measure only part of the table (`--skip-direct`, `--phases`): what was not
//! measured is `None` and its rows are left out, never shown as zeros.

use std::fmt::Write;

use crate::tools::Percentiles;

/// Idle and 1 KB request/response at 1000/s through one implementation's two ztunnels.
#[derive(Debug, Default)]
pub struct LoadResults {
    pub rr: Percentiles,
    /// Per ztunnel (a, b).
    pub idle_rss_mib: Vec<f64>,
    pub idle_cpu: Vec<f64>,
    pub load_rss_mib: Vec<f64>,
    pub load_cpu: Vec<f64>,
    /// The same load with the whole chain pinned to one vCPU (`placement`).
    pub one_cpu: OneCpuLoad,
}

/// Request/response at 1000/s with client, ztunnels and server on one vCPU.
#[derive(Debug, Default)]
pub struct OneCpuLoad {
    pub rr: Percentiles,
    /// Per ztunnel (a, b), cores.
    pub cpu: Vec<f64>,
}

/// What the mesh phases of one implementation (two ztunnels) measured.
#[derive(Debug, Default)]
pub struct MeshResults {
    pub gbps: Option<f64>,
    pub pp: Option<Percentiles>,
    /// Same, with every CPU kept busy by `SCHED_IDLE` spinners.
    pub pp_busy: Option<Percentiles>,
    pub load: Option<LoadResults>,
}

/// The direct path between the two pods, and the one-hop reference relay.
#[derive(Debug, Default)]
pub struct DirectResults {
    pub gbps: f64,
    pub pp: Percentiles,
    pub pp_busy: Percentiles,
    pub rr: Percentiles,
    /// The same with client and server on one vCPU.
    pub rr_one_cpu: Percentiles,
    /// Reference: ping-pong over loopback in one pod, direct and through one socat hop.
    pub socat_pp_base: Percentiles,
    pub socat_pp: Percentiles,
    /// CPU of the socat hop at 1000 req/s (cores).
    pub socat_cpu: f64,
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Results {
    pub direct: Option<DirectResults>,
    /// Through this project's ztunnels.
    pub mesh: MeshResults,
    /// Through Istio's ztunnels, same topology and rules (`--istio-ztunnel`).
    pub istio: Option<MeshResults>,
    /// Through two `bench-floor-relay`s in place of the ztunnels, same topology and rules.
    pub floor: Option<MeshResults>,
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn yes(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

fn pair(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// A latency row of the main table: mesh against direct (when measured) and the target.
fn latency_row(name: &str, direct: Option<f64>, mesh: f64, target: Option<f64>) -> String {
    let target_col = target.map_or_else(|| "-".into(), |t| format!("<= +{t}"));
    match direct {
        Some(d) => {
            let added = mesh - d;
            format!(
                "| {name} (µs, RTT/2) | {d:.1} | {mesh:.1} | {added:+.1} ({:.1}x) | {target_col} | {} |",
                mesh / d,
                target.map_or("-", |t| yes(added <= t))
            )
        }
        None => format!("| {name} (µs, RTT/2) | - | {mesh:.1} | - | {target_col} | - |"),
    }
}

/// Percentile rows (p50, p90, p99; `{p}` in `name` says where) with the targets for p50
/// and p99.
fn percentile_rows(
    t: &mut String,
    name: &str,
    direct: Option<&Percentiles>,
    mesh: &Percentiles,
    targets: (Option<f64>, Option<f64>),
) {
    for (p, d, m, target) in [
        ("p50", direct.map(|d| d.p50), mesh.p50, targets.0),
        ("p90", direct.map(|d| d.p90), mesh.p90, None),
        ("p99", direct.map(|d| d.p99), mesh.p99, targets.1),
    ] {
        let _ = writeln!(t, "{}", latency_row(&name.replace("{p}", p), d, m, target));
    }
}

impl Results {
    /// The markdown table with ratios to direct and the targets.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let d = self.direct.as_ref();
        let m = &self.mesh;
        let _ = writeln!(
            t,
            "| metric | direct | through 2 ztunnels | ratio / added | target | met |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|");
        if let Some(gbps) = m.gbps {
            let _ = match d {
                Some(d) => {
                    let ratio = gbps / d.gbps * 100.0;
                    writeln!(
                        t,
                        "| iperf3 single stream (Gbit/s) | {:.2} | {gbps:.2} | {ratio:.1}% of direct | >= 30% | {} |",
                        d.gbps,
                        yes(ratio >= 30.0)
                    )
                }
                None => writeln!(
                    t,
                    "| iperf3 single stream (Gbit/s) | - | {gbps:.2} | - | >= 30% | - |"
                ),
            };
        }
        if let Some(pp) = &m.pp {
            let name = "ping-pong 64 B {p}, idle CPUs";
            percentile_rows(&mut t, name, d.map(|d| &d.pp), pp, (Some(25.0), Some(50.0)));
        }
        if let Some(pp) = &m.pp_busy {
            let name = "ping-pong 64 B {p}, busy CPUs";
            let direct = d.map(|d| &d.pp_busy);
            percentile_rows(&mut t, name, direct, pp, (Some(25.0), Some(50.0)));
        }
        if let Some(d) = d {
            let _ = writeln!(
                t,
                "| reference: ping-pong 64 B p50 through ONE socat hop, loopback, busy CPUs (µs, RTT/2) | {:.1} | {:.1} | {:+.1} | - | - |",
                d.socat_pp_base.p50,
                d.socat_pp.p50,
                d.socat_pp.p50 - d.socat_pp_base.p50
            );
        }
        if let Some(load) = &m.load {
            let name = "1 KB req/resp @ 1000/s {p}";
            percentile_rows(&mut t, name, d.map(|d| &d.rr), &load.rr, (None, None));
            let _ = writeln!(
                t,
                "| ztunnel RSS idle (MiB, A / B) | - | {} | - | <= 8 | {} |",
                pair(&load.idle_rss_mib, 1),
                yes(max(&load.idle_rss_mib) <= 8.0)
            );
            let _ = writeln!(
                t,
                "| ztunnel CPU idle (cores, A / B) | - | {} | - | - | - |",
                pair(&load.idle_cpu, 4)
            );
            let _ = writeln!(
                t,
                "| ztunnel RSS @ 1000 req/s (MiB, A / B) | - | {} | - | <= 10 | {} |",
                pair(&load.load_rss_mib, 1),
                yes(max(&load.load_rss_mib) <= 10.0)
            );
            let _ = writeln!(
                t,
                "| ztunnel CPU @ 1000 req/s (cores, A / B) | - | {} | - | <= 0.04 | {} |",
                pair(&load.load_cpu, 4),
                yes(max(&load.load_cpu) <= 0.04)
            );
            let one = &load.one_cpu;
            let _ = writeln!(
                t,
                "{}",
                latency_row(
                    "reference: 1 KB req/resp @ 1000/s p50, whole chain on one vCPU",
                    d.map(|d| d.rr_one_cpu.p50),
                    one.rr.p50,
                    None
                )
            );
            let _ = writeln!(
                t,
                "| reference: ztunnel CPU @ 1000 req/s, whole chain on one vCPU (cores, A / B) | - | {} | - | - | - |",
                pair(&one.cpu, 4)
            );
        }
        if let Some(d) = d {
            let _ = writeln!(
                t,
                "| reference: one socat hop, CPU @ 1000 req/s (cores) | - | {:.4} | - | - | - |",
                d.socat_cpu
            );
        }
        t
    }

    /// Same-run comparison with Istio's ztunnel, when it was measured. The targets
    /// are scaled from Istio's ztunnel on this topology (20–27% of direct, +30–37 µs p50),
    /// so this is the row-by-row calibration of the table above on whatever machine ran it.
    /// Rows appear for what both measured.
    pub fn istio_table(&self) -> Option<String> {
        Some(self.comparison_table(self.istio.as_ref()?, "Istio ztunnel", "Istio"))
    }

    /// Same-run comparison with two minimal relays in place of the ztunnels: what any
    /// two-proxy data path costs on the machine, below which no proxy pair can go.
    pub fn floor_table(&self) -> Option<String> {
        Some(self.comparison_table(self.floor.as_ref()?, "two minimal relays (floor)", "floor"))
    }

    /// This project's ztunnels against `other` (column `other_column`, ratios "this vs
    /// `other_name`"), row by row for what both measured.
    fn comparison_table(&self, o: &MeshResults, other_column: &str, other_name: &str) -> String {
        let m = &self.mesh;
        let d = self.direct.as_ref();
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| metric | direct | {other_column} | this ztunnel | this vs {other_name} |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|");
        if let (Some(og), Some(mg)) = (o.gbps, m.gbps) {
            let of_direct =
                |g: f64| d.map_or(String::new(), |d| format!(" ({:.1}%)", g / d.gbps * 100.0));
            let _ = writeln!(
                t,
                "| iperf3 single stream (Gbit/s) | {} | {og:.2}{} | {mg:.2}{} | {:.2}x throughput |",
                d.map_or("-".into(), |d| format!("{:.2}", d.gbps)),
                of_direct(og),
                of_direct(mg),
                mg / og
            );
        }
        let mut rows: Vec<(&str, Option<f64>, f64, f64)> = Vec::new();
        if let (Some(op), Some(mp)) = (&o.pp, &m.pp) {
            rows.push((
                "ping-pong 64 B p50, idle CPUs",
                d.map(|d| d.pp.p50),
                op.p50,
                mp.p50,
            ));
            rows.push((
                "ping-pong 64 B p99, idle CPUs",
                d.map(|d| d.pp.p99),
                op.p99,
                mp.p99,
            ));
        }
        if let (Some(op), Some(mp)) = (&o.pp_busy, &m.pp_busy) {
            let direct = d.map(|d| &d.pp_busy);
            rows.push((
                "ping-pong 64 B p50, busy CPUs",
                direct.map(|d| d.p50),
                op.p50,
                mp.p50,
            ));
            rows.push((
                "ping-pong 64 B p99, busy CPUs",
                direct.map(|d| d.p99),
                op.p99,
                mp.p99,
            ));
        }
        if let (Some(ol), Some(ml)) = (&o.load, &m.load) {
            let direct = d.map(|d| &d.rr);
            rows.push((
                "1 KB req/resp @ 1000/s p50",
                direct.map(|d| d.p50),
                ol.rr.p50,
                ml.rr.p50,
            ));
            rows.push((
                "1 KB req/resp @ 1000/s p99",
                direct.map(|d| d.p99),
                ol.rr.p99,
                ml.rr.p99,
            ));
        }
        for (name, direct, other, ours) in rows {
            let _ = writeln!(t, "{}", added_latency_row(name, direct, other, ours));
        }
        if let (Some(ol), Some(ml)) = (&o.load, &m.load) {
            let rows = [
                (
                    "RSS idle (MiB, A / B)",
                    &ol.idle_rss_mib,
                    &ml.idle_rss_mib,
                    1,
                ),
                (
                    "RSS @ 1000 req/s (MiB, A / B)",
                    &ol.load_rss_mib,
                    &ml.load_rss_mib,
                    1,
                ),
                (
                    "CPU @ 1000 req/s (cores, A / B)",
                    &ol.load_cpu,
                    &ml.load_cpu,
                    4,
                ),
                (
                    "CPU @ 1000 req/s, whole chain on one vCPU (cores, A / B)",
                    &ol.one_cpu.cpu,
                    &ml.one_cpu.cpu,
                    4,
                ),
            ];
            for (name, other, ours, digits) in rows {
                let _ = writeln!(
                    t,
                    "| proxy {name} | - | {} | {} | {:.2}x |",
                    pair(other, digits),
                    pair(ours, digits),
                    max(ours) / max(other)
                );
            }
        }
        t
    }
}

/// A row of the Istio table: each side's latency with what it added to direct.
fn added_latency_row(name: &str, direct: Option<f64>, other: f64, ours: f64) -> String {
    let Some(d) = direct else {
        return format!("| {name} (µs, RTT/2) | - | {other:.1} | {ours:.1} | - |");
    };
    // A ratio of added latencies means nothing when either added none (noise can put a
    // mesh percentile below the direct one).
    let ratio = if other - d > 0.0 && ours - d > 0.0 {
        format!("{:.2}x added latency", (ours - d) / (other - d))
    } else {
        "-".to_string()
    };
    format!(
        "| {name} (µs, RTT/2) | {d:.1} | {other:.1} ({:+.1}) | {ours:.1} ({:+.1}) | {ratio} |",
        other - d,
        ours - d,
    )
}

/// One line per implementation with the headline figures it measured (progress output of
/// `--rounds`).
pub fn compact(names: &[&str], measured: &[MeshResults]) -> String {
    measured
        .iter()
        .zip(names)
        .map(|(m, name)| {
            let mut parts = Vec::new();
            if let Some(g) = m.gbps {
                parts.push(format!("iperf {g:.2} Gbit/s"));
            }
            if let Some(pp) = &m.pp {
                parts.push(format!("pp p50 {:.1} µs", pp.p50));
            }
            if let Some(pp) = &m.pp_busy {
                parts.push(format!("busy pp p50 {:.1} µs", pp.p50));
            }
            if let Some(l) = &m.load {
                parts.push(format!(
                    "rr p50 {:.1} µs | cpu@1000 {}",
                    l.rr.p50,
                    pair(&l.load_cpu, 4)
                ));
            }
            if parts.is_empty() {
                parts.push("nothing measured".to_string());
            }
            format!("  {name:5} {}", parts.join(" | "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(p50: f64) -> Percentiles {
        Percentiles {
            p50,
            p90: p50,
            p99: p50,
        }
    }

    fn mesh(gbps: f64, p50: f64, load_cpu: f64) -> MeshResults {
        MeshResults {
            gbps: Some(gbps),
            pp: Some(flat(p50)),
            pp_busy: Some(flat(p50)),
            load: Some(LoadResults {
                rr: flat(p50),
                idle_rss_mib: vec![4.0, 5.0],
                idle_cpu: vec![0.0, 0.0],
                load_rss_mib: vec![8.0, 9.0],
                load_cpu: vec![load_cpu, load_cpu / 2.0],
                one_cpu: OneCpuLoad {
                    rr: flat(p50 - 10.0),
                    cpu: vec![load_cpu / 2.0, load_cpu / 4.0],
                },
            }),
        }
    }

    fn results(istio: Option<MeshResults>) -> Results {
        Results {
            direct: Some(DirectResults {
                gbps: 10.0,
                pp: flat(20.0),
                pp_busy: flat(20.0),
                rr: flat(20.0),
                rr_one_cpu: flat(15.0),
                socat_pp_base: flat(20.0),
                socat_pp: flat(30.0),
                socat_cpu: 0.04,
            }),
            mesh: mesh(3.0, 60.0, 0.05),
            istio,
            floor: None,
        }
    }

    #[test]
    fn main_table_gives_ratios_and_targets() {
        let t = results(None).table();
        assert!(
            t.contains(
                "| iperf3 single stream (Gbit/s) | 10.00 | 3.00 | 30.0% of direct | >= 30% | yes |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| ping-pong 64 B p50, busy CPUs (µs, RTT/2) | 20.0 | 60.0 | +40.0 (3.0x) | <= +25 | **no** |"),
            "{t}"
        );
        assert!(
            t.contains("| ztunnel CPU @ 1000 req/s (cores, A / B) | - | 0.0500 / 0.0250 | - | <= 0.04 | **no** |"),
            "{t}"
        );
        assert!(
            t.contains("| reference: 1 KB req/resp @ 1000/s p50, whole chain on one vCPU (µs, RTT/2) | 15.0 | 50.0 | +35.0 (3.3x) | - | - |"),
            "{t}"
        );
        assert!(
            t.contains("| reference: ztunnel CPU @ 1000 req/s, whole chain on one vCPU (cores, A / B) | - | 0.0250 / 0.0125 | - | - | - |"),
            "{t}"
        );
    }

    #[test]
    fn partial_runs_leave_out_what_was_not_measured() {
        // `--skip-direct --phases load`: no zeros, no NaN, no "yes" for what never ran.
        let mut r = results(None);
        r.direct = None;
        r.mesh.gbps = None;
        r.mesh.pp = None;
        r.mesh.pp_busy = None;
        let t = r.table();
        assert!(
            !t.contains("iperf3") && !t.contains("ping-pong") && !t.contains("socat"),
            "{t}"
        );
        assert!(!t.contains("NaN") && !t.contains("| 0.0 |"), "{t}");
        assert!(
            t.contains("| 1 KB req/resp @ 1000/s p50 (µs, RTT/2) | - | 60.0 | - | - | - |"),
            "{t}"
        );
        assert!(t.contains("ztunnel CPU @ 1000 req/s"), "{t}");

        let mut istio = mesh(2.0, 100.0, 0.1);
        istio.load = None;
        r.istio = Some(istio);
        r.mesh.gbps = Some(3.0);
        let t = r.istio_table().unwrap();
        assert!(
            t.contains("| iperf3 single stream (Gbit/s) | - | 2.00 | 3.00 | 1.50x throughput |"),
            "{t}"
        );
        assert!(
            !t.contains("RSS") && !t.contains("req/resp") && !t.contains("ping-pong"),
            "{t}"
        );
        assert_eq!(
            compact(
                &["this", "istio"],
                &[mesh(3.0, 60.0, 0.05), MeshResults::default()]
            ),
            "  this  iperf 3.00 Gbit/s | pp p50 60.0 µs | busy pp p50 60.0 µs | rr p50 60.0 µs | cpu@1000 0.0500 / 0.0250\n  istio nothing measured"
        );
    }

    #[test]
    fn no_istio_table_without_istio_measurements() {
        assert!(results(None).istio_table().is_none());
        assert!(results(None).floor_table().is_none());
    }

    #[test]
    fn floor_table_compares_with_the_minimal_relays() {
        let mut r = results(None);
        r.floor = Some(mesh(5.0, 40.0, 0.02));
        let t = r.floor_table().unwrap();
        assert!(
            t.starts_with(
                "| metric | direct | two minimal relays (floor) | this ztunnel | this vs floor |"
            ),
            "{t}"
        );
        // The relays add 20 µs, ours 40 µs.
        assert!(
            t.contains("40.0 (+20.0) | 60.0 (+40.0) | 2.00x added latency |"),
            "{t}"
        );
        assert!(t.contains("| proxy CPU @ 1000 req/s (cores, A / B) | - | 0.0200 / 0.0100 | 0.0500 / 0.0250 | 2.50x |"), "{t}");
    }

    #[test]
    fn istio_table_gives_ratios_of_throughput_added_latency_and_cpu() {
        let t = results(Some(mesh(2.0, 100.0, 0.1))).istio_table().unwrap();
        assert!(
            t.contains("| 10.00 | 2.00 (20.0%) | 3.00 (30.0%) | 1.50x throughput |"),
            "{t}"
        );
        // Ours adds 40 µs, Istio's 80 µs.
        assert!(
            t.contains("(+80.0) | 60.0 (+40.0) | 0.50x added latency |"),
            "{t}"
        );
        assert!(
            t.contains("| 0.1000 / 0.0500 | 0.0500 / 0.0250 | 0.50x |"),
            "{t}"
        );
    }

    #[test]
    fn no_latency_ratio_when_either_added_nothing() {
        let t = results(Some(mesh(2.0, 15.0, 0.1))).istio_table().unwrap();
        assert!(t.contains("15.0 (-5.0) | 60.0 (+40.0) | - |"), "{t}");
        assert!(!t.contains("added latency"), "{t}");
        let mut r = results(Some(mesh(2.0, 100.0, 0.1)));
        r.mesh = mesh(3.0, 15.0, 0.05);
        let t = r.istio_table().unwrap();
        assert!(t.contains("100.0 (+80.0) | 15.0 (-5.0) | - |"), "{t}");
        assert!(!t.contains("added latency"), "{t}");
        // The main table signs what was added, whichever way.
        assert!(
            r.table().contains("| 20.0 | 15.0 | -5.0 (0.8x) |"),
            "{}",
            r.table()
        );
    }
}
