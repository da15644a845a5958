//! Process logging: `RUST_LOG` filter (default `info`), plain or JSON (`LOG_FORMAT=json`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
#[error("invalid RUST_LOG={value:?}: {reason}")]
pub struct LoggingError {
    pub value: String,
    pub reason: String,
}

/// Installs the global subscriber. Call once, at start-up.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let value = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::builder()
        .parse(&value)
        .map_err(|e| LoggingError {
            value: value.clone(),
            reason: e.to_string(),
        })?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Plain => builder.try_init(),
    };
    result.map_err(|e| LoggingError {
        value,
        reason: format!("logging already initialised: {e}"),
    })
}
