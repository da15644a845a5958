//! The results table (printed and written to `bench/RESULTS.md`).

use std::fmt::Write;

use crate::tools::Percentiles;

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Results {
    pub direct_gbps: f64,
    pub mesh_gbps: f64,
    pub direct_pp: Percentiles,
    pub mesh_pp: Percentiles,
    /// Same, with every CPU kept busy by `SCHED_IDLE` spinners.
    pub direct_pp_busy: Percentiles,
    pub mesh_pp_busy: Percentiles,
    /// Reference: ping-pong over loopback in one pod, direct and through one socat hop.
    pub socat_pp_base: Percentiles,
    pub socat_pp: Percentiles,
    /// CPU of the socat hop at 1000 req/s (cores).
    pub socat_cpu: f64,
    pub direct_rr: Percentiles,
    pub mesh_rr: Percentiles,
    /// Per ztunnel (a, b).
    pub idle_rss_mib: Vec<f64>,
    pub idle_cpu: Vec<f64>,
    pub load_rss_mib: Vec<f64>,
    pub load_cpu: Vec<f64>,
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

impl Results {
    /// The markdown table with ratios to direct and the targets.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let ratio = self.mesh_gbps / self.direct_gbps * 100.0;
        let _ = writeln!(
            t,
            "| metric | direct | through 2 ztunnels | ratio / added | target | met |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|");
        let _ = writeln!(
            t,
            "| iperf3 single stream (Gbit/s) | {:.2} | {:.2} | {ratio:.1}% of direct | >= 30% | {} |",
            self.direct_gbps,
            self.mesh_gbps,
            yes(ratio >= 30.0)
        );
        let pp = |name: &str, d: f64, m: f64, target: Option<f64>| {
            let added = m - d;
            format!(
                "| ping-pong 64 B {name} (µs, RTT/2) | {d:.1} | {m:.1} | +{added:.1} ({:.1}x) | {} | {} |",
                m / d,
                target
                    .map(|t| format!("<= +{t}"))
                    .unwrap_or_else(|| "-".into()),
                target.map(|t| yes(added <= t)).unwrap_or("-")
            )
        };
        let _ = writeln!(
            t,
            "{}",
            pp(
                "p50, idle CPUs",
                self.direct_pp.p50,
                self.mesh_pp.p50,
                Some(25.0)
            )
        );
        let _ = writeln!(
            t,
            "{}",
            pp("p90, idle CPUs", self.direct_pp.p90, self.mesh_pp.p90, None)
        );
        let _ = writeln!(
            t,
            "{}",
            pp(
                "p99, idle CPUs",
                self.direct_pp.p99,
                self.mesh_pp.p99,
                Some(50.0)
            )
        );
        let _ = writeln!(
            t,
            "{}",
            pp(
                "p50, busy CPUs",
                self.direct_pp_busy.p50,
                self.mesh_pp_busy.p50,
                Some(25.0)
            )
        );
        let _ = writeln!(
            t,
            "{}",
            pp(
                "p90, busy CPUs",
                self.direct_pp_busy.p90,
                self.mesh_pp_busy.p90,
                None
            )
        );
        let _ = writeln!(
            t,
            "{}",
            pp(
                "p99, busy CPUs",
                self.direct_pp_busy.p99,
                self.mesh_pp_busy.p99,
                Some(50.0)
            )
        );
        let _ = writeln!(
            t,
            "| reference: ping-pong 64 B p50 through ONE socat hop, loopback, busy CPUs (µs, RTT/2) | {:.1} | {:.1} | +{:.1} | - | - |",
            self.socat_pp_base.p50,
            self.socat_pp.p50,
            self.socat_pp.p50 - self.socat_pp_base.p50
        );
        for (name, d, m) in [
            ("p50", self.direct_rr.p50, self.mesh_rr.p50),
            ("p90", self.direct_rr.p90, self.mesh_rr.p90),
            ("p99", self.direct_rr.p99, self.mesh_rr.p99),
        ] {
            let _ = writeln!(
                t,
                "| 1 KB req/resp @ 1000/s {name} (µs, RTT/2) | {d:.1} | {m:.1} | +{:.1} ({:.1}x) | - | - |",
                m - d,
                m / d
            );
        }
        let _ = writeln!(
            t,
            "| ztunnel RSS idle (MiB, A / B) | - | {} | - | <= 8 | {} |",
            pair(&self.idle_rss_mib, 1),
            yes(max(&self.idle_rss_mib) <= 8.0)
        );
        let _ = writeln!(
            t,
            "| ztunnel CPU idle (cores, A / B) | - | {} | - | - | - |",
            pair(&self.idle_cpu, 4)
        );
        let _ = writeln!(
            t,
            "| ztunnel RSS @ 1000 req/s (MiB, A / B) | - | {} | - | <= 10 | {} |",
            pair(&self.load_rss_mib, 1),
            yes(max(&self.load_rss_mib) <= 10.0)
        );
        let _ = writeln!(
            t,
            "| ztunnel CPU @ 1000 req/s (cores, A / B) | - | {} | - | <= 0.04 | {} |",
            pair(&self.load_cpu, 4),
            yes(max(&self.load_cpu) <= 0.04)
        );
        let _ = writeln!(
            t,
            "| reference: one socat hop, CPU @ 1000 req/s (cores) | - | {:.4} | - | - | - |",
            self.socat_cpu
        );
        t
    }
}
