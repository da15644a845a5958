//! Golden-file comparison for the rule generators' unit tests (test-only).
//! `UPDATE_GOLDENS=1` rewrites the files under `testdata/<dir>/`.

use std::path::PathBuf;

pub fn golden_path(dir: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(dir)
        .join(name)
}

/// Asserts that `actual` equals the golden file `testdata/<dir>/<name>`, or
/// rewrites it when `UPDATE_GOLDENS=1`.
pub fn assert_golden(dir: &str, name: &str, actual: &str) {
    let path = golden_path(dir, name);
    if std::env::var_os("UPDATE_GOLDENS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `UPDATE_GOLDENS=1 cargo test -p node-agent --lib redirect`)",
            path.display()
        )
    });
    assert!(
        want == actual,
        "{} differs from the generated text (UPDATE_GOLDENS=1 to accept):\n--- golden\n{want}\n--- generated\n{actual}",
        path.display()
    );
}
