//! Process and runtime metrics with upstream ztunnel's names, read at every scrape:
//! `process_open_fds`, `process_max_fds` (the soft `RLIMIT_NOFILE`; a proxy that runs out
//! of descriptors refuses connections, so dashboards alert on the ratio) and, under the
//! `tokio_` prefix, the data-plane runtimes' `num_workers`, `num_alive_tasks`,
//! `global_queue_depth` and per-worker `worker_total_busy_duration_seconds`,
//! `worker_park_count`, `worker_park_unpark_count` (label `worker`).
//!
//! The data plane runs one single-threaded runtime per worker thread, so "worker `i`" is
//! the only worker of runtime `i`, and the runtime-wide figures are sums over them.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::runtime::Handle;

/// `process_open_fds` and `process_max_fds`.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// Open descriptors of this process (`/proc/self/fd`, without the one listing it).
pub fn open_fds() -> std::io::Result<u64> {
    let n = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(n.saturating_sub(1))
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match open_fds() {
            Ok(n) => gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                n as i64,
            )?,
            Err(e) => tracing::warn!(error = %e, "cannot count open descriptors in /proc/self/fd"),
        }
        match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok((soft, _)) => gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of file descriptors",
                soft.min(i64::MAX as u64) as i64,
            )?,
            Err(e) => tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE"),
        }
        Ok(())
    }
}

/// The `tokio_*` family over the data-plane runtimes.
#[derive(Debug)]
pub struct RuntimeCollector {
    runtimes: Vec<Handle>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Worker {
    worker: usize,
}

impl RuntimeCollector {
    /// Registers the collector under `tokio_` in `registry`.
    pub fn register(registry: &mut Registry, runtimes: Vec<Handle>) {
        registry
            .sub_registry_with_prefix("tokio")
            .register_collector(Box::new(Self { runtimes }));
    }

    /// Every worker of every runtime, numbered in order.
    fn workers(&self) -> impl Iterator<Item = (usize, tokio::runtime::RuntimeMetrics, usize)> {
        self.runtimes
            .iter()
            .flat_map(|h| {
                let m = h.metrics();
                (0..m.num_workers()).map(move |w| (m.clone(), w))
            })
            .enumerate()
            .map(|(i, (m, w))| (i, m, w))
    }

    fn per_worker<T: EncodeMetric>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&tokio::runtime::RuntimeMetrics, usize) -> T,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (i, m, w) in self.workers() {
            value(&m, w).encode(family.encode_family(&Worker { worker: i })?)?;
        }
        Ok(())
    }
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sum = |f: fn(&tokio::runtime::RuntimeMetrics) -> usize| {
            self.runtimes.iter().map(|h| f(&h.metrics())).sum::<usize>() as i64
        };
        gauge(
            &mut encoder,
            "num_workers",
            "the number of worker threads used by the runtime",
            sum(|m| m.num_workers()),
        )?;
        gauge(
            &mut encoder,
            "global_queue_depth",
            "the number of tasks currently scheduled in the runtime's global queue",
            sum(|m| m.global_queue_depth()),
        )?;
        gauge(
            &mut encoder,
            "num_alive_tasks",
            "the number of alive tasks in the runtime",
            sum(|m| m.num_alive_tasks()),
        )?;
        self.per_worker(
            &mut encoder,
            "worker_total_busy_duration_seconds",
            "the amount of time worker threads have been busy",
            |m, w| ConstCounter::new(m.worker_total_busy_duration(w).as_secs_f64()),
        )?;
        self.per_worker(
            &mut encoder,
            "worker_park_count",
            "the total number of times the given worker thread has parked",
            |m, w| ConstCounter::new(m.worker_park_count(w)),
        )?;
        self.per_worker(
            &mut encoder,
            "worker_park_unpark_count",
            "the total number of times the given worker thread has parked and unparked",
            |m, w| ConstCounter::new(m.worker_park_unpark_count(w)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, line_start: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("{line_start} missing in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn process_and_runtime_metrics_with_upstream_names() {
        let runtimes: Vec<tokio::runtime::Runtime> = (0..2)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
            })
            .collect();
        // Two tasks parked forever on runtime 1; runtime 0 runs one task to completion.
        let _alive: Vec<_> = (0..2)
            .map(|_| runtimes[1].spawn(std::future::pending::<()>()))
            .collect();
        runtimes[0]
            .block_on(async { tokio::time::sleep(std::time::Duration::from_millis(5)).await });
        let mut reg = Registry::default();
        reg.register_collector(Box::new(ProcessCollector));
        RuntimeCollector::register(
            &mut reg,
            runtimes.iter().map(|r| r.handle().clone()).collect(),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();

        let fds = value(&text, "process_open_fds ");
        assert!(fds >= 3.0, "{text}");
        assert!(value(&text, "process_max_fds ") >= fds, "{text}");
        assert_eq!(value(&text, "tokio_num_workers "), 2.0, "{text}");
        assert_eq!(value(&text, "tokio_num_alive_tasks "), 2.0, "{text}");
        assert_eq!(value(&text, "tokio_global_queue_depth "), 2.0, "{text}");
        for w in ["0", "1"] {
            for name in [
                "tokio_worker_total_busy_duration_seconds_total",
                "tokio_worker_park_count_total",
                "tokio_worker_park_unpark_count_total",
            ] {
                value(&text, &format!("{name}{{worker=\"{w}\"}} "));
            }
        }
        assert!(
            value(&text, "tokio_worker_park_count_total{worker=\"0\"} ") >= 1.0,
            "runtime 0 parked in its sleep\n{text}"
        );
    }
}
