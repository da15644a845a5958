//! Dropping the page-table entries of clean read-only file mappings.
//!
//! Start-up runs a lot of code exactly once (configuration, clients, key
//! generation, certificate parsing, TLS set-up, the first lists), and the
//! kernel's fault-around maps 64 KiB of the binary around every page it
//! touches: much of a fresh process's RSS is clean code pages it will not run
//! again. [`release_file_pages`] drops the page-table entries of read-only,
//! private, file-backed mappings (the binary's code and constants, shared
//! libraries) whose pages are all clean file pages, as `/proc/self/smaps`
//! reports them; what runs again is mapped back from the page cache on the
//! next access, so nothing can be lost. Used by ztunnel and the node agent
//! once they are ready.

use std::io;

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
    fn releasing_drops_file_pages_and_code_keeps_running() {
        let before = resident_file_kb();
        let released = release_file_pages().unwrap();
        let after = resident_file_kb();
        assert!(released > 0, "a test binary has resident code pages");
        assert!(after < before, "file-backed RSS {before} kB -> {after} kB");
        // Code runs again after the release (faulted back in).
        let v: Vec<u64> = (0..1000).map(|x| x * 3).collect();
        assert_eq!(v.iter().sum::<u64>(), 1_498_500);
        assert!(format!("{v:?}").len() > 1000);
    }

    fn resident_file_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("RssFile:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}
