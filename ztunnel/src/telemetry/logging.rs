//! Process logging: `RUST_LOG` filter (default `info`), plain or JSON (`LOG_FORMAT=json`),
//! on stdout as upstream's ztunnel.
//!
//! The JSON form is upstream's, so log pipelines built for Istio's ztunnel read it: one
//! object per line, `level` (lower case), `time` (RFC 3339, UTC), `scope` (the tracing
//! target, e.g. `access`), then the event's fields by name (`message`, `src.addr`, ...),
//! then the fields of the spans the event is in.
//!
//! The filter can be changed while running ([`set_filter`], the admin endpoint
//! `/logging`, as upstream's `istioctl ztunnel-config log`).

use std::fmt;
use std::sync::{Mutex, OnceLock};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
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
            .event_format(IstioJson)
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

/// Upstream ztunnel's JSON line (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct IstioJson;

impl<S, N> FormatEvent<S, N> for IstioJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut time = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let mut line = Map::new();
        line.insert(
            "level".into(),
            meta.level().as_str().to_ascii_lowercase().into(),
        );
        line.insert("time".into(), time.into());
        line.insert("scope".into(), meta.target().into());
        event.record(&mut Fields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && let Ok(v) = serde_json::from_str::<Value>(fields)
                {
                    line.insert(span.metadata().name().into(), v);
                }
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Records an event's fields into a JSON object, numbers and booleans as such.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_logs::{Buf, keep_callsites_live};

    #[test]
    fn json_lines_have_upstreams_keys() {
        keep_callsites_live();
        let buf = Buf::default();
        let b2 = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || b2.clone())
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(IstioJson)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("proxy", uid = "pod-1");
            let _g = span.enter();
            tracing::info!(
                target: "access",
                { src.addr = %"10.0.0.1:1234", bytes_sent = 5u64, mtls = true },
                "connection complete"
            );
        });
        let text = buf.text();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["level"], "info", "{text}");
        assert_eq!(v["scope"], "access");
        assert_eq!(v["message"], "connection complete");
        assert_eq!(v["src.addr"], "10.0.0.1:1234");
        assert_eq!(v["bytes_sent"], 5);
        assert_eq!(v["mtls"], true);
        assert_eq!(v["proxy"]["uid"], "pod-1", "span fields: {text}");
        let time = v["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
        assert!(
            v.get("timestamp").is_none() && v.get("target").is_none(),
            "{text}"
        );
    }
}
