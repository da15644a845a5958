//! Shared by `inpod_netns.rs` and `inpod_probe_entries.rs` (both also
//! declare `mod inpod_support;`, whose `is_root` this uses).

/// Returns from the test, saying why, unless it runs as root.
macro_rules! require_root {
    () => {
        if !$crate::inpod_support::is_root() {
            eprintln!("skipped: needs root to create network namespaces");
            return;
        }
    };
}

pub(crate) use require_root;
