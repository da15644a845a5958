//! CPU time and resident memory of a process from /proc.

use anyhow::{Context, Result, anyhow};

/// User + system CPU time in seconds.
pub fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let rest = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14, stime 15 (1-based) = index 11, 12 after the state field.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / tck)
}

/// Resident set size in MiB (`VmRSS`).
pub fn rss_mib(pid: i32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no VmRSS"))?;
    Ok(kb / 1024.0)
}

/// CPU used by `pids` while `f` runs, in cores (CPU seconds / wall seconds), per pid.
pub fn cpu_during<T>(pids: &[i32], f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<f64>)> {
    let before: Vec<f64> = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .collect::<Result<_>>()?;
    let start = std::time::Instant::now();
    let out = f()?;
    let wall = start.elapsed().as_secs_f64();
    let after: Vec<f64> = pids
        .iter()
        .map(|&p| cpu_seconds(p))
        .collect::<Result<_>>()?;
    Ok((
        out,
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a - b) / wall)
            .collect(),
    ))
}

/// Processes whose parent is `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// CPU (cores) of the children of `pid` while `f` runs for about `seconds`: sampled one
/// second after the start and one second before the end, so short-lived per-connection
/// children (socat `fork`) are measured while they exist.
pub fn cpu_during_children<T: Send>(
    pid: i32,
    seconds: u64,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<(T, f64)> {
    std::thread::scope(|scope| {
        let worker = scope.spawn(f);
        std::thread::sleep(std::time::Duration::from_secs(1));
        let kids = children(pid);
        let t0 = std::time::Instant::now();
        let c0: f64 = kids.iter().filter_map(|&k| cpu_seconds(k).ok()).sum();
        std::thread::sleep(std::time::Duration::from_secs(
            seconds.saturating_sub(2).max(1),
        ));
        let c1: f64 = kids.iter().filter_map(|&k| cpu_seconds(k).ok()).sum();
        let rate = (c1 - c0) / t0.elapsed().as_secs_f64();
        let out = worker
            .join()
            .map_err(|_| anyhow!("measured workload panicked"))??;
        Ok((out, rate))
    })
}
