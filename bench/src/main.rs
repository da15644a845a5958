//! `bench-dedicated`: direct TCP between two simulated pods vs through the two pods'
//! dedicated ztunnels, in one run. Prints the table and writes it to `bench/RESULTS.md`.
//!
//! Usage: `bench-dedicated [--ztunnel PATH] [--seconds N] [--results PATH]
//! [--istio-ztunnel PATH]` (root). With `--istio-ztunnel`, Istio's own ztunnel is measured in
//! the same run and topology, after this project's. `--hold SECONDS` only sets up the two
//! pods with running ztunnels (Istio's with `--istio-ztunnel`) and prints their netns and
//! pids, for profiling by hand.

mod placement;
mod procstat;
mod report;
mod tools;
mod topology;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

struct Args {
    ztunnel: PathBuf,
    seconds: u64,
    results: Option<PathBuf>,
    /// Record a `perf` profile of both ztunnels for each mesh phase (`<prefix>-<phase>.data`).
    perf: Option<PathBuf>,
    skip_direct: bool,
    /// Extra environment for both ztunnels (`--env K=V`, repeatable).
    env: Vec<(String, String)>,
    /// Set up the meshed pods, print their netns names and ztunnel pids, keep them for this
    /// many seconds (for manual experiments), then exit without measuring.
    hold: Option<u64>,
    /// Istio's ztunnel binary (built with `--features testing`): measure it too, same run.
    istio: Option<PathBuf>,
    /// Mesh phases to run (`--phases load,pingpong,busy,iperf`; default all).
    phases: Vec<Phase>,
    /// Skip the floor reference (`bench-floor-relay` in place of the ztunnels).
    no_floor: bool,
    /// Run the phases this many times (A/B comparisons on a noisy machine); each round's
    /// figures are printed, the tables show the last round.
    rounds: usize,
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench lives in the workspace")
        .to_path_buf()
}

const USAGE: &str = "usage: bench-dedicated [--ztunnel PATH] [--seconds N] \
    [--results PATH | --no-results] [--perf PREFIX] [--skip-direct] [--env K=V]... \
    [--hold SECONDS] [--istio-ztunnel PATH] [--phases load,pingpong,busy,iperf] [--rounds N] [--no-floor]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        ztunnel: workspace().join("target/release/ztunnel"),
        seconds: 10,
        results: Some(workspace().join("bench/RESULTS.md")),
        perf: None,
        skip_direct: false,
        env: Vec::new(),
        hold: None,
        istio: None,
        phases: Phase::ALL.to_vec(),
        rounds: 1,
        no_floor: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ztunnel" => args.ztunnel = it.next().context("--ztunnel PATH")?.into(),
            "--seconds" => args.seconds = it.next().context("--seconds N")?.parse()?,
            "--results" => args.results = Some(it.next().context("--results PATH")?.into()),
            "--no-results" => args.results = None,
            "--perf" => args.perf = Some(it.next().context("--perf PREFIX")?.into()),
            "--skip-direct" => args.skip_direct = true,
            "--no-floor" => args.no_floor = true,
            "--hold" => args.hold = Some(it.next().context("--hold SECONDS")?.parse()?),
            "--phases" => {
                args.phases = it
                    .next()
                    .context("--phases LIST")?
                    .split(',')
                    .map(Phase::parse)
                    .collect::<Result<_>>()?
            }
            "--rounds" => args.rounds = it.next().context("--rounds N")?.parse()?,
            "--istio-ztunnel" => {
                args.istio = Some(it.next().context("--istio-ztunnel PATH")?.into())
            }
            "--env" => {
                let kv = it.next().context("--env K=V")?;
                let (k, v) = kv.split_once('=').context("--env K=V")?;
                args.env.push((k.to_string(), v.to_string()));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    // A partial run would overwrite the results file with zeros and infinite ratios.
    let partial = args.skip_direct || args.phases.len() != Phase::ALL.len() || args.rounds != 1;
    if partial && args.results.is_some() && args.hold.is_none() {
        bail!(
            "--skip-direct, --phases and --rounds measure only part of the table: add --no-results"
        );
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.hold.is_some() {
        // Before any thread exists, so every thread inherits the mask.
        hold_signals().thread_block()?;
    }
    if !e2e::netsim::can_create_netns() {
        bail!("bench-dedicated needs root (network namespaces, iptables)");
    }
    if !args.ztunnel.is_file() {
        bail!(
            "ztunnel binary {} not found: cargo build --release -p ztunnel",
            args.ztunnel.display()
        );
    }
    let s = args.seconds;
    let mut r = report::Results::default();
    let mut topo = topology::Topology::new("bench")?;
    let b_ip = topo.b.ip();
    let servers = tools::start_servers(topo.b.netns())?;
    let server_pids: Vec<i32> = servers.iter().map(|p| p.pid() as i32).collect();

    if !args.skip_direct {
        r.direct = Some(measure_direct(&topo, &server_pids, s)?);
    }

    eprintln!("starting the two ztunnels ...");
    topo.capture()?;
    let ours = topology::Flavor::Ours {
        binary: args.ztunnel.clone(),
        ca_dir: workspace().join("ztunnel/testdata/ca"),
    };
    if let Some(hold) = args.hold {
        // `--hold` with `--istio-ztunnel` holds Istio's ztunnel, for profiling it the same way.
        match &args.istio {
            Some(istio) => topo.start_ztunnels(
                &topology::Flavor::Istio {
                    binary: istio.clone(),
                },
                &args.env,
            )?,
            None => topo.start_ztunnels(&ours, &args.env)?,
        }
        let pids: Vec<i32> = topo.ztunnels.iter().map(|z| z.pid()).collect();
        println!(
            "pod a: netns {} ip {}\npod b: netns {} ip {} (iperf3 :5201, sockperf :11111)\nztunnel pids: {pids:?}\nlogs: {}",
            topo.a.netns().name(),
            topo.a.ip(),
            topo.b.netns().name(),
            b_ip,
            topo.dir().display()
        );
        // Wait for the hold time or SIGTERM/SIGINT (blocked since start), then clean up.
        let set = hold_signals();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(hold));
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGTERM);
        });
        let sig = set.wait()?;
        eprintln!("{sig}: cleaning up");
        return Ok(());
    }
    topo.stop_ztunnels();
    // Each phase runs on fresh ztunnels, this project's then Istio's, so slow drifts of
    // the machine hit both alike.
    let mut flavors = vec![("mesh", ours)];
    if let Some(istio) = &args.istio {
        flavors.push((
            "istio",
            topology::Flavor::Istio {
                binary: istio.clone(),
            },
        ));
    }
    if !args.no_floor {
        flavors.push((
            "floor",
            topology::Flavor::Floor {
                binary: floor_relay()?,
            },
        ));
    }
    let mut measured: Vec<report::MeshResults> =
        flavors.iter().map(|_| Default::default()).collect();
    let names: Vec<&str> = flavors.iter().map(|(tag, _)| *tag).collect();
    for round in 1..=args.rounds {
        for &phase in &args.phases {
            for ((tag, flavor), m) in flavors.iter().zip(measured.iter_mut()) {
                topo.start_ztunnels(flavor, &args.env)?;
                let result = measure_phase(&args, &topo, &server_pids, phase, tag, m);
                topo.stop_ztunnels();
                result?;
            }
        }
        if args.rounds > 1 {
            eprintln!("round {round}:\n{}", report::compact(&names, &measured));
        }
    }
    let mut measured = measured.into_iter();
    r.mesh = measured.next().unwrap_or_default();
    if args.istio.is_some() {
        r.istio = measured.next();
    }
    r.floor = measured.next();

    let table = r.table();
    println!("{table}");
    if let Some(t) = r.istio_table() {
        println!("{t}");
    }
    if let Some(t) = r.floor_table() {
        println!("{t}");
    }
    if let Some(path) = &args.results {
        let text = report_markdown(
            &table,
            r.istio_table().as_deref(),
            r.floor_table().as_deref(),
            &args,
        )?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The direct path between the pods and the one-hop reference relay, `s` seconds each.
fn measure_direct(
    topo: &topology::Topology,
    servers: &[i32],
    s: u64,
) -> Result<report::DirectResults> {
    let b_ip = topo.b.ip();
    eprintln!("direct: 1 KB request/response at 1000/s ...");
    let rr = tools::request_response(topo.a.netns(), b_ip, 1024, 1000, s)?;
    eprintln!("direct: 1 KB request/response at 1000/s, client and server on one vCPU ...");
    let rr_one_cpu = {
        let _one = placement::OneCpu::pin(servers)?;
        tools::request_response(topo.a.netns(), b_ip, 1024, 1000, s)?
    };
    eprintln!("direct: 64 B ping-pong ...");
    let pp = tools::ping_pong(topo.a.netns(), b_ip, 64, s)?;
    eprintln!("direct: 64 B ping-pong, busy CPUs ...");
    let pp_busy = {
        let _busy = tools::BusyCpus::start();
        tools::ping_pong(topo.a.netns(), b_ip, 64, s)?
    };
    eprintln!("reference: one socat hop ...");
    let socat = tools::start_reference_forwarder(topo.b.netns())?;
    let socat_pp_base = {
        let _busy = tools::BusyCpus::start();
        tools::ping_pong_local(topo.b.netns(), 11111, 64, s)?
    };
    let socat_pp = {
        let _busy = tools::BusyCpus::start();
        tools::ping_pong_local(topo.b.netns(), 7777, 64, s)?
    };
    // The forwarder's child (one per connection) does the work; measure it at 1000/s.
    let ns_b = topo.b.netns();
    let (_, socat_cpu) = procstat::cpu_during_children(socat.pid() as i32, s, || {
        tools::request_response_local(ns_b, 7777, 1024, 1000, s)
    })?;
    drop(socat);
    eprintln!("direct: iperf3 single stream ...");
    let gbps = tools::iperf3(topo.a.netns(), b_ip, s)?;
    Ok(report::DirectResults {
        gbps,
        pp,
        pp_busy,
        rr,
        rr_one_cpu,
        socat_pp_base,
        socat_pp,
        socat_cpu,
    })
}

/// The mesh measurements, each run on freshly started ztunnels.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Idle CPU and RSS, then 1 KB request/response at 1000/s with CPU and RSS.
    Load,
    PingPong,
    PingPongBusy,
    Iperf,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::Load,
        Phase::PingPong,
        Phase::PingPongBusy,
        Phase::Iperf,
    ];

    fn parse(name: &str) -> Result<Phase> {
        Ok(match name {
            "load" => Phase::Load,
            "pingpong" => Phase::PingPong,
            "busy" => Phase::PingPongBusy,
            "iperf" => Phase::Iperf,
            other => bail!("unknown phase {other:?}: load, pingpong, busy, iperf"),
        })
    }
}

/// Runs `phase` through the running ztunnels into `m`; `tag` names progress lines and
/// profiles.
fn measure_phase(
    args: &Args,
    topo: &topology::Topology,
    servers: &[i32],
    phase: Phase,
    tag: &str,
    m: &mut report::MeshResults,
) -> Result<()> {
    let s = args.seconds;
    let b_ip = topo.b.ip();
    let pids: Vec<i32> = topo.ztunnels.iter().map(|z| z.pid()).collect();
    let rss = || -> Result<Vec<f64>> { pids.iter().map(|&p| procstat::rss_mib(p)).collect() };
    match phase {
        Phase::Load => {
            std::thread::sleep(Duration::from_secs(2));
            eprintln!("{tag}: idle ...");
            let ((), idle_cpu) = procstat::cpu_during(&pids, || {
                std::thread::sleep(Duration::from_secs(s));
                Ok(())
            })?;
            let idle_rss_mib = rss()?;
            eprintln!("{tag}: 1 KB request/response at 1000/s ...");
            let (rr, load_cpu) = procstat::cpu_during(&pids, || {
                tools::request_response(topo.a.netns(), b_ip, 1024, 1000, s)
            })?;
            let load_rss_mib = rss()?;
            eprintln!("{tag}: 1 KB request/response at 1000/s, whole chain on one vCPU ...");
            let one_cpu = {
                let chain: Vec<i32> = pids.iter().chain(servers).copied().collect();
                let _one = placement::OneCpu::pin(&chain)?;
                let (rr, cpu) = procstat::cpu_during(&pids, || {
                    tools::request_response(topo.a.netns(), b_ip, 1024, 1000, s)
                })?;
                report::OneCpuLoad { rr, cpu }
            };
            m.load = Some(report::LoadResults {
                rr,
                idle_rss_mib,
                idle_cpu,
                load_rss_mib,
                load_cpu,
                one_cpu,
            });
        }
        Phase::PingPong => {
            eprintln!("{tag}: 64 B ping-pong ...");
            m.pp = Some(profiled(args, &format!("{tag}-pingpong"), &pids, || {
                tools::ping_pong(topo.a.netns(), b_ip, 64, s)
            })?);
        }
        Phase::PingPongBusy => {
            eprintln!("{tag}: 64 B ping-pong, busy CPUs ...");
            let _busy = tools::BusyCpus::start();
            m.pp_busy = Some(tools::ping_pong(topo.a.netns(), b_ip, 64, s)?);
        }
        Phase::Iperf => {
            eprintln!("{tag}: iperf3 single stream ...");
            m.gbps = Some(profiled(args, &format!("{tag}-iperf3"), &pids, || {
                tools::iperf3(topo.a.netns(), b_ip, s)
            })?);
        }
    }
    Ok(())
}

const NOTES: &str = "## Reading the table

- **Idle vs busy CPUs.** On this VM a wake-up of a halted vCPU costs tens of microseconds,
  so ping-pong latency depends on whether the CPUs are idle. \"Busy CPUs\" runs the same
  measurement while `SCHED_IDLE` spinners keep every vCPU out of idle (they yield at once
  to any other task); the issue's reference figures (direct 8.7 µs) match that regime.
- **One hop costs what it costs here.** Each message through the mesh crosses four
  user-space hops per round trip (client → ztunnel A → ztunnel B → server and back), and
  RTT/2 counts two of them. The floor table puts two minimal relays where the ztunnels
  are: their added latency is what the two extra hops cost on this machine before any
  TLS or HTTP/2 work, so a target below it cannot be met by any pair of user-space
  proxies here. The socat row measures one plain relay hop over loopback in one pod
  (no TLS, but it polls with select).
- **Placement.** With free placement the scheduler runs the chain (client, ztunnel A,
  ztunnel B, server) on one vCPU or spreads it over both, from run to run; a wake-up
  that crosses to the other vCPU costs tens of microseconds here, and the woken
  ztunnel pays part of it in CPU time, so the free CPU figure moves between two regimes
  (0.039 and 0.058 cores for one binary in back-to-back runs). The \"whole chain on one
  vCPU\" rows pin all four processes to one CPU (`placement.rs`), direct and mesh alike:
  each wake-up is then a switch on that CPU, and the figure is steady. Neither ztunnel
  pins itself: on a real node the app runs where the kernel puts it.
- **RSS** is VmRSS. ztunnel drops the page-table entries of clean read-only file pages
  (code, constants, libraries) once it is ready, so start-up-only code does not stay
  resident; what the data path uses is faulted back in (and counted) as it runs.
- **Noise.** The machine is shared with builds; numbers vary by tens of percent between
  runs (the direct iperf3 path alone measured 9.6–14.4 Gbit/s on one day), so compare
  ratios from one run only. Run `make bench` on an otherwise idle machine.
- **Against Istio's ztunnel.** With `ISTIO_ZTUNNEL=…` the second table measures Istio's
  own ztunnel phase by phase right after this one. For A/B runs of one figure use
  `bench-dedicated --skip-direct --no-results --phases iperf --rounds 4` (each round
  prints both).
";

/// `bench-floor-relay`, built beside this binary (`cargo build --release -p mesh-bench`).
fn floor_relay() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating bench-dedicated")?;
    let relay = exe.with_file_name("bench-floor-relay");
    if !relay.is_file() {
        bail!(
            "{} not found: cargo build --release -p mesh-bench (or pass --no-floor)",
            relay.display()
        );
    }
    Ok(relay)
}

fn hold_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Runs `f`, under `perf record` of `pids` when `--perf` was given.
fn profiled<T>(args: &Args, phase: &str, pids: &[i32], f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(prefix) = &args.perf else {
        return f();
    };
    let out = format!("{}-{phase}.data", prefix.display());
    let pid_list = pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "1999", "-g", "-p", &pid_list, "-o", &out])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("perf record")?;
    std::thread::sleep(Duration::from_millis(500));
    let result = f();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(perf.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = perf.wait();
    eprintln!("profile: {out}");
    result
}

/// The same-run comparison with Istio's ztunnel, with what was run.
fn istio_section(table: &str, args: &Args) -> String {
    let bin = args.istio.as_deref().unwrap_or(Path::new("?"));
    // `version.BuildInfo{Version:"…", GitRevision:"…", …, CryptoProvider:"…"}`
    let info = command_output(&bin.display().to_string(), &["version"]);
    let field = |name: &str| {
        info.split(&format!("{name}:\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("unknown")
            .to_string()
    };
    let revision = field("GitRevision");
    let dirty = if revision.ends_with("-dirty") {
        "; \"-dirty\": its Cargo.toml without the git-only tls-boring provider, see \
         bench/build-istio-ztunnel.sh"
    } else {
        ""
    };
    let version = format!(
        "git revision {revision}, crypto {}, {} profile{dirty}",
        field("CryptoProvider"),
        field("BuildProfile")
    );
    format!(
        "## Same run: Istio's ztunnel\n\n\
         Istio's own ztunnel (`{bin}`, {version}) in the same two pods, with the same capture \
         rules and local config file; every measurement runs on freshly started ztunnels, \
         this project's and then Istio's, back to back (`PROXY_MODE=dedicated`, `FAKE_CA=true` (its built-in test CA), `PACKET_MARK=1337`, \
         default 2 worker threads). The issue's targets were set relative to Istio's ztunnel on \
         this topology; this table is that calibration on the machine that ran it.\n\n{table}\n",
        bin = bin.display()
    )
}

/// The same-run comparison with the two minimal relays, with what they are.
fn floor_section(table: &str) -> String {
    format!(
        "## Same run: the floor of any two-proxy data path\n\n\
         `bench-floor-relay` (`bench/src/bin/floor_relay.rs`) in place of both ztunnels, started \
         the same way behind the same capture rules: a captured connection to `:15001` is carried \
         to the peer pod's `:15008` with a 6-byte destination header, and from there to the app. \
         No TLS, no HTTP/2, no event loop: a blocking thread per direction, one `read` and one \
         `write` per message per hop, sockets marked like a ztunnel's. Whatever two proxies \
         between the pods add to the direct path on this machine, they add at least this; \
         \"this vs floor\" is what TLS, HTTP/2 and the event loop cost on top.\n\n{table}\n"
    )
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn report_markdown(
    table: &str,
    istio: Option<&str>,
    floor: Option<&str>,
    args: &Args,
) -> Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|x| x.1.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let kernel = command_output("uname", &["-sr"]);
    let commit = command_output(
        "git",
        &[
            "-C",
            &workspace().display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    Ok(format!(
        "# Benchmark results\n\n\
         Latest `make bench` run (`bench-dedicated`, release build).\n\n\
         - Date: {date}\n\
         - Machine: {cpu}, {cores} cores, {mem_kb}, {kernel}\n\
         - Commit: {commit}\n\
         - Topology: two pods (netns + veth) on one simulated node's bridge; \"through 2 ztunnels\" = \
         each pod runs a dedicated ztunnel (`PROXY_MODE=dedicated`, {threads}) with the in-pod capture rules, \
         so traffic goes app → ztunnel A → HBONE (mTLS, HTTP/2 CONNECT) → ztunnel B → app.\n\
         - Tools: iperf3 single stream ({s} s); sockperf ping-pong 64 B ({s} s) and under-load 1 KB \
         at 1000 msg/s with a reply to every message ({s} s); latency columns are sockperf's \
         default metric (round trip / 2, µs). CPU = (utime+stime)/wall over the period; RSS = VmRSS.\n\
         - ztunnel binary: `{bin}`\n\n{table}\n{istio}{floor}{NOTES}",
        istio = istio.map(|t| istio_section(t, args)).unwrap_or_default(),
        floor = floor.map(floor_section).unwrap_or_default(),
        mem_kb = mem
            .replace("MemTotal:", "RAM")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        threads = "ZTUNNEL_WORKER_THREADS=2 (default)",
        s = args.seconds,
        bin = args.ztunnel.display(),
    ))
}
