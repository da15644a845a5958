//! Process logging: `RUST_LOG` filter (default `info`), plain or JSON (`LOG_FORMAT=json`),
//! on stdout as upstream's ztunnel.
//!
//! The JSON form is upstream's ([`mesh_logging::IstioJson::ztunnel`]), so log pipelines
//! built for Istio's ztunnel read it: one object per line, `level` (lower case), `time`
//! (RFC 3339, UTC), `scope` (the tracing target, e.g. `access`), then the event's fields
//! by name (`message`, `src.addr`, ...), then the fields of the spans the event is in.
//!
//! The filter can be changed while running ([`set_filter`], the admin endpoint
//! `/logging`, as upstream's `istioctl ztunnel-config log`).

use std::sync::{Mutex, OnceLock};

use mesh_logging::IstioJson;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
#[error("invalid RUST_LOG={value:?}: {reason}")]
pub struct LoggingError {
    pub value: String,
    pub reason: String,
}

/// The running filter: the reload handle, the start-up filter and the current one.
struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    startup: String,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

fn parse_filter(value: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::builder().parse(value).map_err(|e| LoggingError {
        value: value.to_string(),
        reason: e.to_string(),
    })
}

/// Installs the global subscriber. Call once, at start-up.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let value = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let (filter, handle) = reload::Layer::new(parse_filter(&value)?);
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(std::io::stdout);
    let fmt = match format {
        LogFormat::Json => fmt
            .fmt_fields(JsonFields::new())
            .event_format(IstioJson::ztunnel())
            .boxed(),
        LogFormat::Plain => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| LoggingError {
            value: value.clone(),
            reason: format!("logging already initialised: {e}"),
        })?;
    let _ = CONTROL.set(Control {
        handle,
        startup: value.clone(),
        current: Mutex::new(value),
    });
    Ok(())
}

/// The filter in force (`RUST_LOG` syntax); `None` before [`init`].
pub fn current_filter() -> Option<String> {
    let c = CONTROL.get()?;
    Some(c.current.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Replaces the filter (`RUST_LOG` syntax, e.g. `debug` or `info,access=debug`); `None`
/// restores the start-up one. Returns the filter now in force.
pub fn set_filter(value: Option<&str>) -> Result<String, LoggingError> {
    let c = CONTROL.get().ok_or_else(|| LoggingError {
        value: value.unwrap_or_default().to_string(),
        reason: "logging is not initialised".into(),
    })?;
    let value = value.unwrap_or(&c.startup).trim().to_string();
    let filter = parse_filter(&value)?;
    c.handle.reload(filter).map_err(|e| LoggingError {
        value: value.clone(),
        reason: e.to_string(),
    })?;
    *c.current.lock().unwrap_or_else(|e| e.into_inner()) = value.clone();
    tracing::info!(filter = %value, "log filter changed");
    Ok(value)
}
