//! The CNI plugin's log lines, forwarded to the node agent (upstream istio-cni's
//! format), so an operator reads them with `kubectl logs` on the agent's pod rather than
//! in the container runtime's log on the node.
//!
//! Transport: HTTP/1.1 `POST /log` over the Unix socket `<cni_agent_run_dir>/log.sock`.
//! The body is a JSON array of strings; each string is one JSON log line with `level`
//! (`debug`, `info`, `warn`, `error`), `time` (RFC 3339), `msg`, and any other keys as
//! the line's fields. Lines that do not parse are skipped, as upstream.

use serde_json::{Map, Value};

/// Path of the log endpoint on the agent's Unix socket.
pub const PLUGIN_LOG_PATH: &str = "/log";
/// File name of the agent's log socket inside the run dir.
pub const PLUGIN_LOG_SOCKET: &str = "log.sock";

/// One forwarded log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLogLine {
    pub level: String,
    pub time: String,
    pub msg: String,
    /// Every other key, with its value as text (strings unquoted).
    pub fields: Vec<(String, String)>,
}

impl PluginLogLine {
    /// The line as one JSON object.
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        m.insert("level".into(), Value::String(self.level.clone()));
        m.insert("time".into(), Value::String(self.time.clone()));
        m.insert("msg".into(), Value::String(self.msg.clone()));
        for (k, v) in &self.fields {
            m.entry(k.clone())
                .or_insert_with(|| Value::String(v.clone()));
        }
        Value::Object(m).to_string()
    }

    /// A JSON log line with string `level`, `time` and `msg`; `None` otherwise.
    pub fn parse(line: &str) -> Option<Self> {
        let Value::Object(mut m) = serde_json::from_str(line).ok()? else {
            return None;
        };
        let mut take = |k: &str| match m.remove(k) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let (level, time, msg) = (take("level")?, take("time")?, take("msg")?);
        let fields = m
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        Some(PluginLogLine {
            level,
            time,
            msg,
            fields,
        })
    }
}

/// The request body for `lines` (already JSON log lines).
pub fn encode_batch(lines: &[String]) -> Vec<u8> {
    serde_json::to_vec(lines).expect("strings always serialise")
}

/// The lines of a request body; the body itself must be a JSON array of strings.
pub fn parse_batch(body: &[u8]) -> Result<Vec<PluginLogLine>, serde_json::Error> {
    let lines: Vec<String> = serde_json::from_slice(body)?;
    Ok(lines
        .iter()
        .filter_map(|l| PluginLogLine::parse(l))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_shaped_lines_round_trip_and_bad_ones_are_skipped() {
        let upstream = r#"{"level":"info","time":"2026-11-29T03:00:00.123456Z","msg":"pod added","pod":"default/web-1","retries":2}"#;
        let ours = PluginLogLine {
            level: "warn".into(),
            time: "2026-11-29T03:00:01Z".into(),
            msg: "agent down".into(),
            fields: vec![("container".into(), "abc".into())],
        };
        let body = encode_batch(&[
            upstream.to_string(),
            "not json".to_string(),
            r#"{"level":"info","msg":"no time"}"#.to_string(),
            ours.to_json(),
        ]);
        let lines = parse_batch(&body).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].msg, "pod added");
        assert_eq!(lines[0].level, "info");
        let mut fields = lines[0].fields.clone();
        fields.sort();
        assert_eq!(
            fields,
            [
                ("pod".to_string(), "default/web-1".to_string()),
                ("retries".to_string(), "2".to_string())
            ]
        );
        assert_eq!(lines[1], ours);
        assert!(parse_batch(b"{\"not\":\"an array\"}").is_err());
    }
}
