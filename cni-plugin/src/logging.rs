//! Plugin logs: one line per decision on stderr (runtimes capture it) and, as upstream
//! istio-cni, the same lines forwarded to the node agent's log socket at the end of the
//! run ([`forward_to_agent`]), so they show in the agent's pod log.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use mesh_proto::plugin_log::{PLUGIN_LOG_SOCKET, PluginLogLine};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

/// Bound on each write of the run's lines: the plugin never waits longer on the agent's
/// log socket (the agent may be hung; the lines are on stderr anyway).
pub const FORWARD_TIMEOUT: Duration = Duration::from_millis(500);

/// The run's lines, as JSON log lines, and the run dir they go to.
static CAPTURED: Mutex<Option<Captured>> = Mutex::new(None);

struct Captured {
    run_dir: PathBuf,
    lines: Vec<String>,
}

/// Installs the stderr logger at `plugin_log_level` (`debug`, `info`, `warn`, `error`,
/// `none`; anything else means `info`) and keeps the same lines for the agent at
/// `<run_dir>/log.sock`. Idempotent.
pub fn init(level: &str, run_dir: &Path) {
    let filter = parse_level(level);
    {
        let mut c = CAPTURED.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_some() {
            return;
        }
        *c = Some(Captured {
            run_dir: run_dir.to_path_buf(),
            lines: Vec::new(),
        });
    }
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_filter(filter);
    let subscriber = Registry::default()
        .with(stderr)
        .with(Capture.with_filter(filter));
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Sends the run's lines to the agent's log socket, if it exists, within
/// [`FORWARD_TIMEOUT`]; failures are ignored (stderr has the lines).
pub fn forward_to_agent() {
    let Some(Captured { run_dir, lines }) = CAPTURED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .map(|c| Captured {
            run_dir: c.run_dir.clone(),
            lines: std::mem::take(&mut c.lines),
        })
    else {
        return;
    };
    let socket = run_dir.join(PLUGIN_LOG_SOCKET);
    if lines.is_empty() || !socket.exists() {
        return;
    }
    let _ = crate::agent_client::post_log_lines(&socket, &lines, FORWARD_TIMEOUT);
}

/// Keeps each event as a JSON log line.
struct Capture;

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut v = Fields::default();
        event.record(&mut v);
        let line = PluginLogLine {
            level: level_name(event.metadata().level()).into(),
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            msg: v.msg,
            fields: v.fields,
        };
        if let Some(c) = CAPTURED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            c.lines.push(line.to_json());
        }
    }
}

#[derive(Default)]
struct Fields {
    msg: String,
    fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.record(field, s);
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.msg = value;
        } else {
            self.fields.push((field.name().to_string(), value));
        }
    }
}

/// Upstream's level names (zap's).
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        _ => "debug",
    }
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

    #[test]
    fn events_become_upstream_shaped_json_lines() {
        // Other tests of this binary log through the global subscriber into the same
        // buffer: only this test's lines are looked at.
        let subscriber = Registry::default().with(Capture.with_filter(LevelFilter::INFO));
        CAPTURED.lock().unwrap().get_or_insert_with(|| Captured {
            run_dir: PathBuf::from("/nonexistent"),
            lines: Vec::new(),
        });
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(container = %"c1", pod = "ns/web", "capture test: {}", "kept");
            tracing::debug!("capture test: filtered out");
        });
        let lines: Vec<PluginLogLine> = CAPTURED
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .lines
            .iter()
            .filter_map(|l| PluginLogLine::parse(l))
            .filter(|l| l.msg.starts_with("capture test:"))
            .collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert_eq!(
            (l.level.as_str(), l.msg.as_str()),
            ("info", "capture test: kept")
        );
        assert!(l.time.ends_with('Z'), "{}", l.time);
        let mut f = l.fields.clone();
        f.sort();
        assert_eq!(
            f,
            [
                ("container".to_string(), "c1".to_string()),
                ("pod".to_string(), "ns/web".to_string())
            ]
        );
    }
}
