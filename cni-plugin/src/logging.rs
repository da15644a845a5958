//! Plugin logs: one line per decision on stderr (runtimes capture it).

use tracing::level_filters::LevelFilter;

/// Installs the stderr logger at `plugin_log_level` (`debug`, `info`,
/// `warn`, `error`, `none`; anything else means `info`). Idempotent.
pub fn init(level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(parse_level(level))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

fn parse_level(level: &str) -> LevelFilter {
    match level.to_ascii_lowercase().as_str() {
        "debug" => LevelFilter::DEBUG,
        "warn" | "warning" => LevelFilter::WARN,
        "error" => LevelFilter::ERROR,
        "none" | "off" => LevelFilter::OFF,
        _ => LevelFilter::INFO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(parse_level("DEBUG"), LevelFilter::DEBUG);
        assert_eq!(parse_level("none"), LevelFilter::OFF);
        assert_eq!(parse_level("bogus"), LevelFilter::INFO);
    }
}
