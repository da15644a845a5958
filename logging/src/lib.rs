//! Istio's JSON log line (`LOG_FORMAT=json`), so log pipelines built for Istio's
//! components read ours: one object per line with `level` (lower case), `time` (RFC 3339,
//! UTC), `scope`, the message, then the event's fields by name (numbers and booleans as
//! such), then the fields of the spans the event is in (an object per span name).
//!
//! Two dialects, as upstream has them:
//! - [`IstioJson::ztunnel`]: Istio's ztunnel (Rust): the message under `message`, the
//!   scope is the tracing target (`access`, `ztunnel::proxy`, ...);
//! - [`IstioJson::istio_go`]: Istio's Go components, istio-cni among them (zap with
//!   Istio's encoder): the message under `msg`, the scope a short name chosen by the
//!   program from the target.
//!
//! Use with `tracing_subscriber::fmt().fmt_fields(JsonFields::new()).event_format(..)`
//! (span fields are read back as JSON).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON event formatter (see the crate docs).
#[derive(Debug, Clone, Copy)]
pub struct IstioJson {
    message_key: &'static str,
    scope: fn(&str) -> String,
}

impl IstioJson {
    /// Istio ztunnel's keys: `message`, scope = the tracing target.
    pub fn ztunnel() -> Self {
        IstioJson {
            message_key: "message",
            scope: str::to_string,
        }
    }

    /// Istio's Go keys (`msg`); `scope` names the scope of an event from its target.
    pub fn istio_go(scope: fn(&str) -> String) -> Self {
        IstioJson {
            message_key: "msg",
            scope,
        }
    }
}

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
        line.insert("scope".into(), (self.scope)(meta.target()).into());
        event.record(&mut Fields {
            line: &mut line,
            message_key: self.message_key,
        });
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

/// Records an event's fields into a JSON object, numbers and booleans as such; the
/// message under the dialect's key.
struct Fields<'a> {
    line: &'a mut Map<String, Value>,
    message_key: &'static str,
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let key = match field.name() {
            "message" => self.message_key,
            name => name,
        };
        self.line.insert(key.into(), value);
    }
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::format::JsonFields;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One event, formatted by `format`, parsed back.
    fn line(format: IstioJson) -> Value {
        let buf = Buf::default();
        let b2 = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || b2.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .fmt_fields(JsonFields::new())
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("proxy", uid = "pod-1");
            let _g = span.enter();
            tracing::info!(
                target: "node_agent::install::chain",
                { src.addr = %"10.0.0.1:1234", bytes_sent = 5u64, mtls = true },
                "connection complete"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn ztunnel_dialect() {
        let v = line(IstioJson::ztunnel());
        assert_eq!(v["level"], "info", "{v}");
        assert_eq!(v["scope"], "node_agent::install::chain");
        assert_eq!(v["message"], "connection complete");
        assert!(v.get("msg").is_none(), "{v}");
        assert_eq!(v["src.addr"], "10.0.0.1:1234");
        assert_eq!(v["bytes_sent"], 5);
        assert_eq!(v["mtls"], true);
        assert_eq!(v["proxy"]["uid"], "pod-1", "span fields: {v}");
        let time = v["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
        assert!(v.get("timestamp").is_none() && v.get("target").is_none());
    }

    #[test]
    fn istio_go_dialect() {
        let v = line(IstioJson::istio_go(|t| {
            t.split("::").nth(1).unwrap_or("default").to_string()
        }));
        assert_eq!(v["msg"], "connection complete", "{v}");
        assert!(v.get("message").is_none(), "{v}");
        assert_eq!(v["scope"], "install");
        assert_eq!(v["level"], "info");
        assert_eq!(v["bytes_sent"], 5);
    }
}
