//! `demo` (run by `make demo` through `scripts/demo.sh`, as root): a
//! two-node simulated cluster on this machine, a client and a server, the
//! namespace enrolled with real kubectl, and what changed on the wire, in
//! ztunnel's access log and in its metrics. Cleans up when it ends (also on
//! Ctrl-C: the next run sweeps what a killed run left).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use e2e::netsim::CaptureReport;
use e2e::simcluster::{
    REDIRECTION_ANNOTATION, RedirectMode, SimCluster, SimClusterConfig, WorkloadSpec, ZTUNNEL,
};
use e2e::workloads;

#[derive(Parser)]
#[command(
    name = "demo",
    about = "Node-in-a-box demo: plaintext vs mTLS before and after `kubectl label namespace demo istio.io/dataplane-mode=ambient`"
)]
struct Cli {
    /// Redirection mode: inpod, or geneve (needs a kernel with GENEVE).
    #[arg(long, default_value = "inpod")]
    mode: String,
    /// How long each traffic sample runs.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    sample: Duration,
}

const NS: &str = "demo";
const SECRET: &str = "card-number-4111";

fn step(n: usize, text: &str) {
    println!("\n[{n}/5] {text}");
}

fn say(text: &str) {
    println!("      {text}");
}

/// One line about what the capture saw.
fn wire_summary(cap: &CaptureReport) -> String {
    let mut conns: BTreeMap<u16, usize> = BTreeMap::new();
    for p in cap.packets.iter().filter(|p| p.is_tcp_syn()) {
        *conns.entry(p.dst_port).or_default() += 1;
    }
    // The service side of a segment is its lower port (clients use
    // ephemeral ports).
    let mut data: BTreeMap<u16, usize> = BTreeMap::new();
    for p in cap
        .packets
        .iter()
        .filter(|p| p.is_tcp() && !p.payload.is_empty())
    {
        *data.entry(p.src_port.min(p.dst_port)).or_default() += 1;
    }
    let ports: Vec<String> = conns
        .iter()
        .map(|(port, n)| format!("{n} to port {port}"))
        .collect();
    let ports = if ports.is_empty() {
        "no new TCP connection (requests rode a pooled one)".to_string()
    } else {
        format!("new TCP connections: {}", ports.join(", "))
    };
    let data: Vec<String> = data
        .iter()
        .map(|(port, n)| format!("{n} on port {port}"))
        .collect();
    let data = format!("data segments: {}", data.join(", "));
    let payload = if cap.contains(SECRET.as_bytes()) {
        format!("payload READABLE on the wire: \"{SECRET} ...\"")
    } else {
        format!("\"{SECRET}\" not found in any packet: encrypted")
    };
    format!("wire (node1 <-> node2): {ports}; {data}; {payload}")
}

/// `name{a="x",b="y"} v` → the selected labels and the value.
fn short_metric(line: &str, keep: &[&str]) -> String {
    let Some((head, value)) = line.rsplit_once(' ') else {
        return line.to_string();
    };
    let (name, labels) = head.split_once('{').unwrap_or((head, ""));
    let labels = labels.trim_end_matches('}');
    let mut picked = Vec::new();
    for part in labels.split("\",") {
        let part = part.trim_end_matches('"');
        if let Some((k, v)) = part.split_once("=\"")
            && keep.contains(&k)
        {
            picked.push(format!("{k}={v}"));
        }
    }
    format!("{name}{{{}}} {value}", picked.join(" "))
}

fn sample(sim: &SimCluster, label: &str, d: Duration) -> Result<CaptureReport> {
    let cap = sim.capture_pod_traffic(label)?;
    std::thread::sleep(d);
    Ok(cap.stop()?)
}

fn client_log_summary(sim: &SimCluster, from_line: usize) -> (usize, usize, usize) {
    let log = sim.pod_log(NS, "client");
    let lines: Vec<&str> = log.lines().skip(from_line).collect();
    let ok = lines.iter().filter(|l| l.starts_with("ok ")).count();
    let failed = lines.iter().filter(|l| l.starts_with("fail ")).count();
    (ok, failed, log.lines().count())
}

fn run(cli: &Cli) -> Result<()> {
    let mode = match cli.mode.as_str() {
        "inpod" => RedirectMode::Inpod,
        "geneve" => RedirectMode::Geneve,
        m => bail!("--mode {m}: expected inpod or geneve"),
    };
    if let Some(why) = e2e::simcluster::missing_prerequisite() {
        bail!("cannot run the demo: {why}");
    }
    println!(
        "geneva-mesh demo: an Istio-ambient-compatible data plane on a simulated two-node cluster"
    );
    let primary = match mode {
        RedirectMode::Inpod => "bridge",
        RedirectMode::Geneve => "ptp",
    };
    step(
        1,
        &format!(
            "starting the cluster: Kubernetes API (test double), kubelet-lite per node, CNI {primary}+host-local, the chart's node agent, ztunnel and built-in CA"
        ),
    );
    let t0 = Instant::now();
    let sim = SimCluster::start(SimClusterConfig::new("demo", mode))?;
    say(&format!(
        "ready in {:.1}s ({} redirection); kubectl: kubectl --kubeconfig {}",
        t0.elapsed().as_secs_f64(),
        mode.as_str(),
        sim.kubeconfig().display()
    ));

    step(
        2,
        "namespace demo: server on node2 (serviceaccount server), client on node1 (serviceaccount client)",
    );
    sim.create_namespace(NS, &[])?;
    let n1 = sim.node(1).name().to_string();
    let n2 = sim.node(2).name().to_string();
    let server = sim.run_workload(
        &WorkloadSpec::server(NS, "server", &n2, "server"),
        Duration::from_secs(30),
    )?;
    let server_ip: IpAddr = server.ip.context("server has no IP")?;
    let target = SocketAddr::new(server_ip, workloads::DEFAULT_PORT).to_string();
    let client = WorkloadSpec::server(NS, "client", &n1, "client").args(&[
        "client",
        "--target",
        &target,
        "--interval",
        "250ms",
        "--message",
        SECRET,
    ]);
    let mut client = client;
    client.readiness_port = None;
    let client_info = sim.run_workload(&client, Duration::from_secs(30))?;
    say(&format!(
        "client {} sends \"{SECRET} #N\" to server {target} every 250 ms over a new TCP connection",
        client_info.ip.map(|i| i.to_string()).unwrap_or_default()
    ));

    step(3, "before enrolment");
    std::thread::sleep(Duration::from_millis(300));
    let (_, _, mark) = client_log_summary(&sim, 0);
    let cap = sample(&sim, "demo-before", cli.sample)?;
    let (ok, failed, mark2) = client_log_summary(&sim, mark);
    say(&format!("client: {ok} requests answered, {failed} failed"));
    say(&wire_summary(&cap));

    step(
        4,
        "kubectl label namespace demo istio.io/dataplane-mode=ambient",
    );
    sim.kubectl(&["label", "namespace", NS, "istio.io/dataplane-mode=ambient"])?;
    let labelled = Instant::now();
    let deadline = labelled + Duration::from_secs(10);
    while ["client", "server"]
        .iter()
        .any(|p| sim.annotation(NS, p, REDIRECTION_ANNOTATION).as_deref() != Some("enabled"))
    {
        if Instant::now() > deadline {
            bail!("pods not enrolled after 10 s\n{}", sim.diagnostics());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    say(&format!(
        "both pods annotated {REDIRECTION_ANNOTATION}=enabled {} ms later, without a restart",
        labelled.elapsed().as_millis()
    ));
    std::thread::sleep(Duration::from_millis(500));
    let (_, _, mark3) = client_log_summary(&sim, mark2);
    let cap = sample(&sim, "demo-after", cli.sample)?;
    let (ok, failed, _) = client_log_summary(&sim, mark3);
    say(&format!("client: {ok} requests answered, {failed} failed"));
    say(&wire_summary(&cap));
    for (node, dir) in [(&n1, "outbound"), (&n2, "inbound")] {
        let log = sim.component_log(ZTUNNEL, node);
        if let Some(line) = log.lines().rev().find(|l| {
            l.contains("src.identity=spiffe://") && l.contains(&format!("direction=\"{dir}\""))
        }) {
            let fields: Vec<&str> = line
                .split_whitespace()
                .filter(|f| {
                    ["src.identity=", "dst.identity=", "direction=", "dst.addr="]
                        .iter()
                        .any(|k| f.starts_with(k))
                })
                .collect();
            say(&format!("ztunnel {node} access log: {}", fields.join(" ")));
        }
    }
    let metrics = sim.ztunnel_metrics(&n2)?;
    let keep = [
        "reporter",
        "source_principal",
        "destination_principal",
        "connection_security_policy",
    ];
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_received_bytes_total",
    ] {
        if let Some(l) = metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("sa/client"))
        {
            say(&format!("ztunnel {n2} metrics: {}", short_metric(l, &keep)));
        }
    }

    step(5, "cleaning up (pods, CNI DEL, namespaces, processes)");
    let t = Instant::now();
    drop(sim);
    say(&format!("done in {:.1}s", t.elapsed().as_secs_f64()));
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}
