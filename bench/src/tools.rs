//! iperf3 and sockperf, run inside pod namespaces, and their output parsed.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use e2e::netsim::{NamedNetns, Process, describe_failure};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Starts the servers (iperf3 on 5201, sockperf on 11111) in `ns`.
pub fn start_servers(ns: &NamedNetns) -> Result<Vec<Process>> {
    let iperf = ns
        .spawn("iperf3", ["-s", "-p", "5201"], None)
        .context("iperf3 server")?;
    let sockperf = ns
        .spawn(
            "sockperf",
            ["sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"],
            None,
        )
        .context("sockperf server")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(vec![iperf, sockperf])
}

/// Single-stream iperf3 throughput from `ns` to `server`, in Gbit/s (receiver side).
pub fn iperf3(ns: &NamedNetns, server: Ipv4Addr, seconds: u64) -> Result<f64> {
    let out = ns.output(
        "iperf3",
        [
            "-c",
            &server.to_string(),
            "-p",
            "5201",
            "-t",
            &seconds.to_string(),
            "-O",
            "1",
            "-J",
        ],
        Duration::from_secs(seconds + 30),
    )?;
    if !out.status.success() {
        bail!(describe_failure("iperf3 client", &out));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON without end.sum_received.bits_per_second"))?;
    Ok(bps / 1e9)
}

/// sockperf ping-pong with `size`-byte messages: percentiles of sockperf's default latency
/// (round trip / 2).
pub fn ping_pong(
    ns: &NamedNetns,
    server: Ipv4Addr,
    size: usize,
    seconds: u64,
) -> Result<Percentiles> {
    sockperf(
        ns,
        &[
            "pp",
            "--tcp",
            "-i",
            &server.to_string(),
            "-p",
            "11111",
            "-m",
            &size.to_string(),
            "-t",
            &seconds.to_string(),
        ],
        seconds,
    )
}

/// sockperf under load: `size`-byte requests at `rate` per second, every one answered;
/// percentiles of the round trip / 2.
pub fn request_response(
    ns: &NamedNetns,
    server: Ipv4Addr,
    size: usize,
    rate: u32,
    seconds: u64,
) -> Result<Percentiles> {
    sockperf(
        ns,
        &[
            "ul",
            "--tcp",
            "-i",
            &server.to_string(),
            "-p",
            "11111",
            "-m",
            &size.to_string(),
            "--mps",
            &rate.to_string(),
            "--reply-every",
            "1",
            "-t",
            &seconds.to_string(),
        ],
        seconds,
    )
}

fn sockperf(ns: &NamedNetns, args: &[&str], seconds: u64) -> Result<Percentiles> {
    let out = ns.output("sockperf", args, Duration::from_secs(seconds + 30))?;
    if !out.status.success() {
        bail!(describe_failure("sockperf client", &out));
    }
    parse_sockperf(&String::from_utf8_lossy(&out.stdout))
        .or_else(|_| parse_sockperf(&String::from_utf8_lossy(&out.stderr)))
}

/// Reads `---> percentile 50.000 =   17.786` lines.
pub fn parse_sockperf(text: &str) -> Result<Percentiles> {
    let find = |p: &str| -> Result<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("sockperf output has no percentile {p}:\n{text}"))
    };
    Ok(Percentiles {
        p50: find("50.000")?,
        p90: find("90.000")?,
        p99: find("99.000")?,
    })
}

/// Keeps every CPU busy with `SCHED_IDLE` spinners while alive, so vCPUs never halt and a
/// wake-up does not pay the hypervisor's idle-exit latency (any other task preempts a
/// `SCHED_IDLE` one at once). Latency measured this way isolates the proxies' own cost.
pub struct BusyCpus {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyCpus {
    pub fn start() -> BusyCpus {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let param = libc::sched_param { sched_priority: 0 };
                    // SAFETY: changes the policy of the calling thread only.
                    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        BusyCpus { stop, threads }
    }
}

impl Drop for BusyCpus {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A minimal user-space forwarder for reference: `socat` in `ns` relaying
/// `127.0.0.1:7777` to `127.0.0.1:11111` (the sockperf server in the same namespace).
pub fn start_reference_forwarder(ns: &NamedNetns) -> Result<Process> {
    let p = ns
        .spawn(
            "socat",
            [
                "TCP-LISTEN:7777,reuseaddr,nodelay,fork",
                "TCP:127.0.0.1:11111,nodelay",
            ],
            None,
        )
        .context("socat (apt-get install socat)")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(p)
}

/// Ping-pong to `127.0.0.1:port` from inside `ns`.
pub fn ping_pong_local(
    ns: &NamedNetns,
    port: u16,
    size: usize,
    seconds: u64,
) -> Result<Percentiles> {
    sockperf(
        ns,
        &[
            "pp",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &size.to_string(),
            "-t",
            &seconds.to_string(),
        ],
        seconds,
    )
}

/// Request/response like [`request_response`] to `127.0.0.1:port` from inside `ns`.
pub fn request_response_local(
    ns: &NamedNetns,
    port: u16,
    size: usize,
    rate: u32,
    seconds: u64,
) -> Result<Percentiles> {
    sockperf(
        ns,
        &[
            "ul",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &size.to_string(),
            "--mps",
            &rate.to_string(),
            "--reply-every",
            "1",
            "-t",
            &seconds.to_string(),
        ],
        seconds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_percentiles() {
        let text = "sockperf: ---> percentile 99.000 =   55.031\n\
                    sockperf: ---> percentile 90.000 =   21.772\n\
                    sockperf: ---> percentile 50.000 =   17.786\n";
        let p = parse_sockperf(text).unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (17.786, 21.772, 55.031));
        assert!(parse_sockperf("nothing").is_err());
    }
}
