//! `GET /debug/pprof/profile` on the admin port, as upstream's: samples the whole
//! process's CPU use for `seconds` (1-300, default 10) at `frequency` Hz (1-1000,
//! default 100, Go's rate) and answers with a profile in pprof's protobuf format
//! (`go tool pprof http://localhost:15000/debug/pprof/profile?seconds=30`).
//!
//! Sampling is SIGPROF-driven (the `pprof` crate); the capture runs on its own thread
//! (it sleeps for the whole period), so no runtime thread blocks. One profile at a time:
//! a second request while one runs gets 409. The encoding (below) is ours: symbols as
//! the capture resolved them (the image keeps the symbol table), each stack leaf first,
//! two values per sample (`samples/count`, `cpu/nanoseconds`), the sampling thread's
//! name as a `thread` label, and the executable's mapping so `pprof` can re-symbolize
//! addresses against an unstripped binary.
//!
//! Heap profiles (`/debug/pprof/heap`) need jemalloc's profiler; this ztunnel uses the
//! system allocator, so that endpoint answers 501 with the reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use prost::Message as _;

use super::text;

/// Upstream's bounds and defaults.
const SECONDS: std::ops::RangeInclusive<u64> = 1..=300;
const DEFAULT_SECONDS: u64 = 10;
const FREQUENCY: std::ops::RangeInclusive<i32> = 1..=1000;
const DEFAULT_FREQUENCY: i32 = 100;

/// Set while a capture runs (the sampler is process-wide).
static RUNNING: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    seconds: u64,
    frequency: i32,
}

fn params(query: Option<&str>) -> Result<Params, String> {
    let mut p = Params {
        seconds: DEFAULT_SECONDS,
        frequency: DEFAULT_FREQUENCY,
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "seconds" => {
                p.seconds = v
                    .parse()
                    .ok()
                    .filter(|s| SECONDS.contains(s))
                    .ok_or_else(|| format!("invalid seconds value {v:?}; expected 1-300"))?
            }
            "frequency" => {
                p.frequency = v
                    .parse()
                    .ok()
                    .filter(|f| FREQUENCY.contains(f))
                    .ok_or_else(|| format!("invalid frequency value {v:?}; expected 1-1000"))?
            }
            _ => {}
        }
    }
    Ok(p)
}

/// Clears [`RUNNING`] when the capture ends, however it ends.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// `/debug/pprof/profile`.
pub(super) async fn profile(query: Option<&str>) -> Response<Full<Bytes>> {
    let p = match params(query) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    if RUNNING.swap(true, Ordering::AcqRel) {
        return text(
            StatusCode::CONFLICT,
            "a CPU profile is already being captured; retry when it ends\n",
        );
    }
    let running = Running;
    tracing::info!(
        seconds = p.seconds,
        frequency = p.frequency,
        "capturing a CPU profile"
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("pprof".into())
        .spawn(move || {
            let _running = running;
            let _ = tx.send(capture(p));
        });
    if let Err(e) = spawned {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("starting the profiler thread: {e}\n"),
        );
    }
    match rx.await {
        Ok(Ok(body)) => Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"profile.pb\"",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid"),
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CPU profile: {e}\n"),
        ),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "CPU profile: the profiler thread ended without a result\n",
        ),
    }
}

/// `/debug/pprof/heap` and `/debug/pprof/heap/profiling`.
pub(super) fn heap() -> Response<Full<Bytes>> {
    text(
        StatusCode::NOT_IMPLEMENTED,
        "heap profiles need jemalloc's profiler; this ztunnel uses the system allocator \
         (its RSS is in /metrics, per-connection state in /debug/connections)\n",
    )
}

/// Runs on the profiler thread: samples for the period, then encodes.
fn capture(p: Params) -> Result<Vec<u8>, pprof::Error> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(p.frequency)
        .build()?;
    std::thread::sleep(Duration::from_secs(p.seconds));
    let report = guard.report().build()?;
    drop(guard);
    Ok(encode(&report, executable_mapping()).encode_to_vec())
}

/// The executable's text mapping from `/proc/self/maps`: (start, limit, file offset,
/// path).
fn executable_mapping() -> Option<(u64, u64, u64, String)> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let exe = exe.to_str()?.to_owned();
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (range, perms, offset) = (f.next()?, f.next()?, f.next()?);
        let path = f.nth(2)?;
        if path != exe || !perms.contains('x') {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        Some((
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
            u64::from_str_radix(offset, 16).ok()?,
            exe.clone(),
        ))
    })
}

/// Builds the pprof message: interned strings, one function per (name, file), one
/// location per (function, line, address).
fn encode(report: &pprof::Report, exe: Option<(u64, u64, u64, String)>) -> format::Profile {
    let mut b = Builder::default();
    b.string(""); // index 0 is the empty string, by the format's rule
    let period = 1_000_000_000 / i64::from(report.timing.frequency.max(1));
    let mut profile = format::Profile {
        sample_type: vec![
            b.value_type("samples", "count"),
            b.value_type("cpu", "nanoseconds"),
        ],
        period_type: Some(b.value_type("cpu", "nanoseconds")),
        period,
        time_nanos: report
            .timing
            .start_time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        duration_nanos: report.timing.duration.as_nanos() as i64,
        ..Default::default()
    };
    let exe_range = exe.as_ref().map(|(start, limit, _, _)| *start..*limit);
    if let Some((start, limit, offset, path)) = &exe {
        profile.mapping.push(format::Mapping {
            id: 1,
            memory_start: *start,
            memory_limit: *limit,
            file_offset: *offset,
            filename: b.string(path),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            ..Default::default()
        });
    }
    let thread_key = b.string("thread");
    for (frames, &count) in &report.data {
        let mut location_id = Vec::new();
        for frame in &frames.frames {
            for symbol in frame {
                let address = symbol.addr.map_or(0, |a| a as u64);
                let mapping_id = match &exe_range {
                    Some(r) if r.contains(&address) => 1,
                    _ => 0,
                };
                let function_id = b.function(&symbol.name(), &symbol.filename());
                location_id.push(b.location(
                    function_id,
                    i64::from(symbol.lineno()),
                    address,
                    mapping_id,
                ));
            }
        }
        let count = count.max(0) as i64;
        profile.sample.push(format::Sample {
            location_id,
            value: vec![count, count * period],
            label: vec![format::Label {
                key: thread_key,
                str: b.string(&frames.thread_name_or_id()),
                ..Default::default()
            }],
        });
    }
    profile.function = b.functions;
    profile.location = b.locations;
    profile.string_table = b.strings;
    profile
}

#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<format::Function>,
    function_ids: HashMap<(i64, i64), u64>,
    locations: Vec<format::Location>,
    location_ids: HashMap<(u64, i64, u64), u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), id);
        id
    }

    fn value_type(&mut self, r#type: &str, unit: &str) -> format::ValueType {
        format::ValueType {
            r#type: self.string(r#type),
            unit: self.string(unit),
        }
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (self.string(name), self.string(file));
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        self.functions.push(format::Function {
            id,
            name: key.0,
            system_name: key.0,
            filename: key.1,
            start_line: 0,
        });
        self.function_ids.insert(key, id);
        id
    }

    fn location(&mut self, function_id: u64, line: i64, address: u64, mapping_id: u64) -> u64 {
        let key = (function_id, line, address);
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        self.locations.push(format::Location {
            id,
            mapping_id,
            address,
            line: vec![format::Line {
                function_id,
                line,
                column: 0,
            }],
            is_folded: false,
        });
        self.location_ids.insert(key, id);
        id
    }
}

/// pprof's `perftools.profiles` messages (github.com/google/pprof, proto/profile.proto),
/// the fields this encoder writes.
pub mod format {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_follow_upstreams_bounds() {
        let ok = |q| params(Some(q)).unwrap();
        assert_eq!(
            params(None).unwrap(),
            Params {
                seconds: 10,
                frequency: 100
            }
        );
        assert_eq!(
            ok("seconds=1&frequency=1000"),
            Params {
                seconds: 1,
                frequency: 1000
            }
        );
        assert_eq!(ok("seconds=300&other=x").seconds, 300);
        for bad in [
            "seconds=0",
            "seconds=301",
            "seconds=x",
            "frequency=0",
            "frequency=1001",
        ] {
            let e = params(Some(bad)).unwrap_err();
            assert!(e.contains("expected"), "{bad}: {e}");
        }
    }
}
