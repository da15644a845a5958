//! Keeping ztunnel's resident memory small.
//!
//! - [`tune_allocator`]: at most two glibc malloc arenas (the data plane is thread-per-core
//!   with a handful of threads; more arenas only fragment memory), and buffers up to 2 MiB
//!   served from the heap instead of fresh `mmap`s: a bulk transfer allocates and frees
//!   256 KiB chunks all the time, and with glibc's defaults every one of them was a new
//!   mapping whose pages had to be faulted in and zeroed (hundreds of thousands of page
//!   faults per second, a third of the throughput). Freed memory is kept for reuse and
//!   returned to the kernel by [`trim_periodically`].
//! - [`release_startup_pages`]: once ztunnel is ready, drop the page-table entries of its
//!   code and constant data. Start-up runs a lot of code used only once (configuration,
//!   YAML, key generation, certificate parsing, TLS set-up); with the kernel's fault-around
//!   each of those touches maps 64 KiB of a 15 MB text. Afterwards only what runs again is
//!   mapped back in (from the page cache). Only read-only file mappings whose pages are all
//!   clean file pages are touched (checked in `/proc/self/smaps`), so no data can be lost.

use std::io;

/// Heap allocations below this size never get their own mapping.
const MMAP_THRESHOLD: i32 = 2 * 1024 * 1024;
/// Free memory at the top of the heap kept for reuse between trims.
const TRIM_THRESHOLD: i32 = 64 * 1024 * 1024;

/// glibc malloc settings for ztunnel. Call before starting threads.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; these options exist on glibc.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Returns free heap memory to the kernel every `every` (from the current tokio runtime).
pub fn trim_periodically(every: std::time::Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            // SAFETY: malloc_trim has no preconditions.
            #[cfg(target_env = "gnu")]
            unsafe {
                libc::malloc_trim(0);
            }
        }
    });
}

/// Drops the resident pages of read-only file mappings (code and constant data of the
/// ztunnel binary and its shared libraries) whose pages are all clean file pages; returns
/// the bytes of address space released.
pub fn release_startup_pages() -> io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in parse_smaps(&smaps) {
        // Read-only, private, backed by a file, and not a single page copied on write (a
        // RELRO segment written by the dynamic loader has anonymous pages: skipped).
        let read_only = m.perms == "r-xp" || m.perms == "r--p";
        if !read_only || !m.path.starts_with('/') || m.anonymous_kb != 0 || m.rss_kb == 0 {
            continue;
        }
        // SAFETY: the range is a read-only, private, file-backed mapping without anonymous
        // (copied-on-write) pages, as /proc/self/smaps just reported. MADV_DONTNEED on it
        // only removes page-table entries; the next access faults the same bytes back in
        // from the file.
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
        released += m.end - m.start;
    }
    Ok(released)
}

struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kb: u64,
    anonymous_kb: u64,
}

fn parse_smaps(text: &str) -> Vec<Mapping<'_>> {
    let mut out: Vec<Mapping<'_>> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            out.push(Mapping {
                start,
                end,
                perms,
                path,
                rss_kb: 0,
                anonymous_kb: 0,
            });
            continue;
        }
        let value = || {
            fields
                .clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        if let Some(m) = out.last_mut() {
            match first {
                "Rss:" => m.rss_kb = value(),
                "Anonymous:" => m.anonymous_kb = value(),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_parsing() {
        let text = "7f00-7f10 r-xp 00000000 08:01 12 /usr/lib/libc.so.6\n\
                    Rss:                  40 kB\n\
                    Anonymous:             0 kB\n\
                    7f10-7f20 r--p 00000000 08:01 12 /usr/lib/libc.so.6\n\
                    Rss:                   8 kB\n\
                    Anonymous:             4 kB\n\
                    7f20-7f30 rw-p 00000000 00:00 0\n\
                    Rss:                   4 kB\n";
        let m = parse_smaps(text);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].start, m[0].end, m[0].perms), (0x7f00, 0x7f10, "r-xp"));
        assert_eq!(m[0].path, "/usr/lib/libc.so.6");
        assert_eq!((m[0].rss_kb, m[0].anonymous_kb), (40, 0));
        assert_eq!(m[1].anonymous_kb, 4);
        assert_eq!(m[2].path, "");
    }

    #[test]
    fn releasing_code_pages_keeps_the_process_working() {
        let before = resident_file_kb();
        let mapped = release_startup_pages().unwrap();
        let after = resident_file_kb();
        assert!(mapped > 0, "the test binary has a code mapping");
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
