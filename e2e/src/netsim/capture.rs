//! Packet capture inside a namespace: `tcpdump -w` running for the duration
//! of some work, then the file read with [`CaptureReport`]. This is how
//! tests prove what is on the wire (e.g. only TLS to 15008, no plaintext
//! marker).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::error::{NetsimError, Result};
use super::namespace::NamedNetns;
use super::pcap::CaptureReport;
use super::process::Process;

/// A running `tcpdump`.
#[derive(Debug)]
pub struct Capture {
    process: Process,
    file: PathBuf,
    netns: String,
    iface: String,
    stderr: std::thread::JoinHandle<String>,
}

impl Capture {
    /// Starts `tcpdump -i <iface> -w <file> [filter]` inside `netns` and
    /// returns once it is capturing. `filter` is a pcap filter expression
    /// (e.g. `"tcp"`), `None` for everything.
    ///
    /// `iface` may be a bridge (`cni0` of a node: all traffic of its pods,
    /// same-node traffic included; `br0` of the underlay: all traffic
    /// between nodes): tcpdump puts the device in promiscuous mode, and a
    /// promiscuous bridge hands every frame it forwards to its own device
    /// too. `any` also works (Linux cooked frames; a forwarded frame is
    /// then seen once per interface it crosses).
    pub fn start(
        netns: &NamedNetns,
        iface: &str,
        file: &Path,
        filter: Option<&str>,
    ) -> Result<Self> {
        let err = |reason: String| NetsimError::Capture {
            netns: netns.name().to_string(),
            iface: iface.to_string(),
            reason,
        };
        let mut cmd = netns.command("tcpdump");
        // --immediate-mode: hand each packet over at once (else the kernel
        // ring delivers in blocks after up to 1 s, and packets still in it
        // at stop are lost); -s: the largest GSO frame on a veth, but not
        // more (the ring holds buffer/snaplen frames: with the default
        // 256 KiB snaplen and 2 MiB buffer only 8, and a busy machine drops
        // packets); -B: 32 MiB of ring; -U: write each packet at once;
        // -Z root: do not drop privileges (the file may be in a root-only
        // directory); -n: no DNS.
        cmd.args([
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "65600",
            "-B",
            "32768",
            "-Z",
            "root",
            "-w",
        ])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(f) = filter {
            cmd.args(f.split_whitespace());
        }
        let mut process =
            Process::spawn(cmd).map_err(|e| err(format!("cannot start tcpdump: {e}")))?;
        let stderr = process.child().stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if line.contains("listening on")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        // Returns as soon as tcpdump says it listens; the bound is generous because in the
        // emulated VM on a busy host starting tcpdump alone took over 10 s.
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => Ok(Self {
                process,
                file: file.to_path_buf(),
                netns: netns.name().to_string(),
                iface: iface.to_string(),
                stderr: reader,
            }),
            Err(_) => {
                process.terminate(Duration::from_millis(500));
                let out = reader.join().unwrap_or_default();
                Err(err(format!(
                    "tcpdump did not start capturing: {}",
                    out.trim()
                )))
            }
        }
    }

    /// The capture file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Stops tcpdump (SIGINT, so it flushes) and reads the file. Fails when
    /// the kernel dropped packets: an incomplete capture proves nothing
    /// about what was on the wire.
    pub fn stop(mut self) -> Result<CaptureReport> {
        // SIGINT makes tcpdump drop what it has not read yet, so first wait
        // until it has consumed everything: asleep and the file not growing.
        self.wait_quiescent(Duration::from_secs(3));
        let _ = self.process.signal(Signal::SIGINT);
        let status = self.process.wait_timeout(Duration::from_secs(5));
        if status.is_none() {
            self.process.terminate(Duration::from_millis(500));
        }
        let log = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new))
            .join()
            .unwrap_or_default();
        let mut report = CaptureReport::read(&self.file).map_err(|e| NetsimError::Capture {
            netns: self.netns.clone(),
            iface: self.iface.clone(),
            reason: format!("{e}; tcpdump said: {}", log.trim()),
        })?;
        let dropped = dropped_count(&log);
        if dropped > 0 {
            return Err(NetsimError::Capture {
                netns: self.netns.clone(),
                iface: self.iface.clone(),
                reason: format!(
                    "the kernel dropped {dropped} packets, the capture is incomplete: {}",
                    log.trim()
                ),
            });
        }
        report.log = log;
        Ok(report)
    }
}

impl Capture {
    fn wait_quiescent(&self, max: Duration) {
        let pid = self.process.pid();
        let state = || -> Option<char> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat[stat.rfind(')')? + 2..].chars().next()
        };
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let deadline = std::time::Instant::now() + max;
        let mut last = (size(), 0u32);
        std::thread::sleep(Duration::from_millis(50));
        while std::time::Instant::now() < deadline {
            let now = size();
            let calm = state() == Some('S') && now == last.0;
            last = (now, if calm { last.1 + 1 } else { 0 });
            if last.1 >= 3 {
                return;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

/// `N` of tcpdump's "N packets dropped by kernel" (0 when absent).
fn dropped_count(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.trim().strip_suffix("packets dropped by kernel"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Captures on `iface` in `netns` while `f` runs, then returns `f`'s result
/// and what was captured. The file is written to `file`.
pub fn capture_during<T>(
    netns: &NamedNetns,
    iface: &str,
    file: &Path,
    filter: Option<&str>,
    f: impl FnOnce() -> T,
) -> Result<(T, CaptureReport)> {
    let cap = Capture::start(netns, iface, file, filter)?;
    let out = f();
    let report = cap.stop()?;
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dropped_packets_are_read_from_the_summary() {
        let log = "listening on any\n14 packets captured\n20 packets received by filter\n6 packets dropped by kernel\n";
        assert_eq!(super::dropped_count(log), 6);
        assert_eq!(super::dropped_count("0 packets dropped by kernel"), 0);
        assert_eq!(super::dropped_count(""), 0);
    }
}
