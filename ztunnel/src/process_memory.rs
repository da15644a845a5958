//! Keeping ztunnel's resident memory small.
//!
//! - [`tune_allocator`]: at most two glibc malloc arenas (the data plane is thread-per-core
//!   with a handful of threads; more arenas only fragment memory), and buffers up to 2 MiB
//!   served from the heap instead of fresh `mmap`s: a bulk transfer allocates and frees
//!   256 KiB chunks all the time, and with glibc's defaults every one of them was a new
//!   mapping whose pages had to be faulted in and zeroed (hundreds of thousands of page
//!   faults per second, a third of the throughput). Freed memory is kept for reuse and
//!   returned to the kernel by [`trim_periodically`].
//! - once ztunnel is ready, `app` drops the page-table entries of its code and constant
//!   data with [`mesh_memory::release_file_pages`] (shared with the node agent): start-up
//!   runs a lot of code used only once (configuration, YAML, key generation, certificate
//!   parsing, TLS set-up), and only what runs again is mapped back in from the page cache.

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
