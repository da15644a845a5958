//! The agent's resident memory after start-up.
//!
//! Start-up runs a lot of code exactly once (configuration, client set-up,
//! the first lists, the installer, the start-up reconcile): once the agent
//! runs, [`release_file_pages`] (shared with ztunnel, crate `mesh-memory`)
//! drops the page-table entries of its clean read-only file mappings.
//! [`limit_malloc_arenas`] keeps freed heap memory from spreading over
//! per-thread arenas. The memory benchmark reports RSS both before and
//! after (`e2e/tests/control_loop_memory.rs`).

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

pub use mesh_memory::release_file_pages;
