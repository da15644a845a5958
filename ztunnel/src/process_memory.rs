//! Keeping ztunnel's resident memory small.
//!
//! - [`tune_allocator`]: at most two glibc malloc arenas (the data plane is thread-per-core
//!   with a handful of threads; more arenas only fragment memory).
//! - [`release_startup_text`]: once ztunnel is ready, drop the page-table entries of its own
//!   executable code. Start-up runs a lot of code used only once (configuration, YAML, key
//!   generation, certificate parsing, TLS set-up); with the kernel's fault-around each of
//!   those touches maps 64 KiB of a 15 MB text. Afterwards only code that runs again is
//!   mapped back in (from the page cache). Only read-only, executable, file-backed mappings
//!   of the ztunnel binary are touched, so no data can be lost.

use std::io;

/// Limits glibc to two malloc arenas. Call before starting threads.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX is valid on glibc.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Drops the resident pages of the executable's code mappings; returns the bytes unmapped
/// from the page tables.
pub fn release_startup_text() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut released = 0;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let path = parts.nth(3);
        if perms != "r-xp" || path.map(std::path::Path::new) != Some(exe.as_path()) {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: the range is a read-only, private, file-backed code mapping of our own
        // executable (checked above). MADV_DONTNEED on it only removes page-table entries;
        // the next execution of that code faults the same bytes back in from the file,
        // which cannot change while it is being executed (ETXTBSY).
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released += end - start;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releasing_code_pages_keeps_the_process_working() {
        let before = resident_file_kb();
        let mapped = release_startup_text().unwrap();
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
