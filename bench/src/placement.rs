//! Where the measured processes run: a reference measurement pins the whole chain
//! (client, both ztunnels, server) to one vCPU, so every wake-up in it is a switch on
//! that CPU and none crosses to another one. On this emulated VM a cross-vCPU wake-up
//! (an IPI to a halted vCPU) costs tens of microseconds, which the ztunnels pay in
//! CPU time; with free placement the scheduler puts the chain on one or on both vCPUs
//! from run to run, so the free figure moves between the two regimes.

use anyhow::{Context, Result};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The chain pinned to one CPU; every pinned thread gets its former mask back on drop.
pub struct OneCpu {
    restore: Vec<(Pid, CpuSet)>,
}

impl OneCpu {
    /// Pins the calling thread (so what it spawns next inherits the mask) and every
    /// thread of `pids` to the first CPU this process may use.
    pub fn pin(pids: &[i32]) -> Result<OneCpu> {
        let own = sched_getaffinity(Pid::from_raw(0)).context("reading the CPU mask")?;
        let cpu = (0..CpuSet::count())
            .find(|&c| own.is_set(c).unwrap_or(false))
            .context("no CPU in this process's mask")?;
        let mut one = CpuSet::new();
        one.set(cpu).context("building the one-CPU mask")?;
        let mut pinned = OneCpu {
            restore: Vec::new(),
        };
        let mut threads = vec![Pid::from_raw(0)];
        for &pid in pids {
            threads.extend(threads_of(pid)?);
        }
        for tid in threads {
            let before =
                sched_getaffinity(tid).with_context(|| format!("CPU mask of thread {tid}"))?;
            sched_setaffinity(tid, &one)
                .with_context(|| format!("pinning thread {tid} to CPU {cpu}"))?;
            pinned.restore.push((tid, before));
        }
        Ok(pinned)
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        for (tid, mask) in &self.restore {
            // A thread that ended meanwhile needs nothing back.
            let _ = sched_setaffinity(*tid, mask);
        }
    }
}

/// Every thread of process `pid`.
fn threads_of(pid: i32) -> Result<Vec<Pid>> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .map(|tid: i32| Ok(Pid::from_raw(tid)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_threads_of_a_process_and_restores_them() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let before = sched_getaffinity(pid).unwrap();
        {
            let _one = OneCpu::pin(&[child.id() as i32]).unwrap();
            let now = sched_getaffinity(pid).unwrap();
            let set = (0..CpuSet::count())
                .filter(|&c| now.is_set(c).unwrap())
                .count();
            assert_eq!(set, 1, "the child runs on one CPU");
            let me = sched_getaffinity(Pid::from_raw(0)).unwrap();
            assert_eq!(me, now, "the calling thread is pinned to the same CPU");
        }
        assert_eq!(sched_getaffinity(pid).unwrap(), before, "restored");
        child.kill().unwrap();
        let _ = child.wait();
    }
}
