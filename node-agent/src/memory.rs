//! The agent's resident memory after start-up.
//!
//! Start-up runs a lot of code exactly once (configuration, client set-up,
//! the first lists, the installer, the start-up reconcile), and the
//! kernel's fault-around maps 64 KiB of the binary around every page it
//! touches: most of the agent's RSS is clean code pages it will not run
//! again. [`release_file_pages`] drops the page-table entries of read-only
//! file mappings (the binary's code and constants, shared libraries) once
//! the agent runs; what is used again is mapped back from the page cache on
//! the next access. Only mappings whose pages are all clean file pages are
//! touched (no anonymous copy-on-write page, checked in `/proc/self/smaps`),
//! so nothing can be lost. [`limit_malloc_arenas`] keeps freed heap memory
//! from spreading over per-thread arenas. The memory benchmark reports RSS both before and
//! after (`e2e/tests/control_loop_memory.rs`).

use std::io;

/// At most two glibc malloc arenas: the agent's work is small and mostly
/// serialised; one arena per thread that ever contended only keeps freed
/// memory around. Call first thing (arenas are created lazily).
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX exists
    // on glibc.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// One mapping of `/proc/self/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    rss_kb: u64,
    anonymous_kb: u64,
}

impl Mapping {
    /// Read-only, private, file-backed, resident, no anonymous page.
    fn releasable(&self) -> bool {
        (self.perms == "r-xp" || self.perms == "r--p")
            && self.path.starts_with('/')
            && self.anonymous_kb == 0
            && self.rss_kb > 0
    }
}

fn kb(value: &str) -> u64 {
    value
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':')
            && !key.contains(' ')
            && !key.contains('-')
        {
            if let Some(m) = out.last_mut() {
                match key {
                    "Rss" => m.rss_kb = kb(value),
                    "Anonymous" => m.anonymous_kb = kb(value),
                    _ => {}
                }
            }
            continue;
        }
        // Header: start-end perms offset dev inode [path]
        let mut fields = line.split_whitespace();
        let Some((start, end)) = fields.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let perms = fields.next().unwrap_or("").to_string();
        let path = fields.nth(3).unwrap_or("").to_string();
        out.push(Mapping {
            start,
            end,
            perms,
            path,
            rss_kb: 0,
            anonymous_kb: 0,
        });
    }
    out
}

/// Drops the resident pages of clean read-only file mappings (see the
/// module docs); returns the kilobytes that were resident in them.
/// Blocking (reads `/proc/self/smaps`).
pub fn release_file_pages() -> io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in parse_smaps(&smaps).iter().filter(|m| m.releasable()) {
        // SAFETY: [start, end) is a private read-only file mapping without
        // anonymous (copied-on-write) pages, as the kernel just reported;
        // MADV_DONTNEED only removes its page-table entries, and the next
        // access faults the same file bytes back in.
        let rc = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released += m.rss_kb;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55a7d8d75000-55a7d911e000 r--p 00000000 fd:01 123 /usr/local/bin/node-agent
Size:               3748 kB
Rss:                1772 kB
Anonymous:             0 kB
55a7d911e000-55a7d9ecb000 r-xp 003a9000 fd:01 123 /usr/local/bin/node-agent
Rss:                9104 kB
Anonymous:             0 kB
55a7d9f6a000-55a7d9f80000 r--p 011f4000 fd:01 123 /usr/local/bin/node-agent
Rss:                  88 kB
Anonymous:            88 kB
55a7da000000-55a7da100000 rw-p 00000000 00:00 0 [heap]
Rss:                 468 kB
Anonymous:           468 kB
7f0000000000-7f0000001000 r--p 00000000 00:00 0
Rss:                   4 kB
Anonymous:             4 kB
VmFlags: rd mr mw me
";

    #[test]
    fn only_clean_read_only_file_mappings_are_released() {
        let maps = parse_smaps(SAMPLE);
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[1].rss_kb, 9104);
        assert_eq!(maps[1].path, "/usr/local/bin/node-agent");
        let picked: Vec<u64> = maps
            .iter()
            .filter(|m| m.releasable())
            .map(|m| m.rss_kb)
            .collect();
        // RELRO with anonymous pages, the heap and anonymous read-only
        // memory are left alone.
        assert_eq!(picked, vec![1772, 9104]);
    }

    #[test]
    fn releasing_keeps_the_process_working() {
        let before = std::fs::read_to_string("/proc/self/status").unwrap();
        let released = release_file_pages().unwrap();
        assert!(released > 0, "a test binary has resident code pages");
        // Code keeps running (faulted back in) and data is intact.
        let after = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(before.contains("VmRSS") && after.contains("VmRSS"));
        assert_eq!(parse_smaps(SAMPLE).len(), 5);
    }
}
