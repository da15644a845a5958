//! How many data-plane worker threads ztunnel runs, as upstream decides it:
//!
//! - `ZTUNNEL_WORKER_THREADS`: a number (0: one per CPU) or a percentage of the CPUs
//!   (`50%`, rounded up, at least 1).
//! - Unset: `ZTUNNEL_RESOURCE_CPU_LIMIT` (the chart sets it only when the pod has a CPU
//!   limit) is taken as the count, raised to `ZTUNNEL_RESOURCE_CPU_REQUEST` (set only when
//!   it has a CPU request); without a limit, a quarter of the CPUs (rounded up), raised to
//!   the request and to at least 2.
//! - "CPUs" is `ZTUNNEL_RESOURCE_CPU_LIMIT`, else `ZTUNNEL_CPU_LIMIT` (the downward API's
//!   `limits.cpu`, which is the node's cores when there is no limit), else the cores this
//!   process may run on.
//!
//! CPU quantities take Kubernetes' forms (`2`, `1.5`, `500m`) and round up.

use super::ConfigError;

/// The default when neither `ZTUNNEL_WORKER_THREADS` nor a CPU limit says otherwise.
const DEFAULT_WORKER_THREADS: usize = 2;
/// Share of the CPUs used by default when no CPU limit is set.
const DEFAULT_CPU_FRACTION: f64 = 0.25;
/// Upper bound (the runtime's threads are created up front).
const MAX_WORKER_THREADS: usize = 256;

fn error(field: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A Kubernetes CPU quantity in `field`, in whole CPUs rounded up.
fn cpu_quantity(
    get: &dyn Fn(&str) -> Option<String>,
    field: &'static str,
) -> Result<Option<usize>, ConfigError> {
    let Some(raw) = get(field) else {
        return Ok(None);
    };
    let v = raw.trim();
    let cores = match v.strip_suffix('m') {
        Some(millis) => millis.parse::<f64>().map(|m| m / 1000.0),
        None => v.parse::<f64>(),
    }
    .map_err(|e| {
        error(
            field,
            &raw,
            format!("not a CPU quantity (2, 1.5, 500m): {e}"),
        )
    })?;
    if !cores.is_finite() || cores <= 0.0 {
        return Err(error(field, &raw, "must be a positive CPU quantity"));
    }
    Ok(Some(cores.ceil() as usize))
}

/// The CPUs ztunnel may use.
fn cpu_count(get: &dyn Fn(&str) -> Option<String>) -> Result<usize, ConfigError> {
    if let Some(limit) = cpu_quantity(get, "ZTUNNEL_RESOURCE_CPU_LIMIT")? {
        return Ok(limit);
    }
    match get("ZTUNNEL_CPU_LIMIT") {
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(error(
                "ZTUNNEL_CPU_LIMIT",
                &v,
                "not a positive whole number of CPUs",
            )),
        },
    }
}

fn default_threads(get: &dyn Fn(&str) -> Option<String>) -> Result<usize, ConfigError> {
    // A request of 0 is what the downward API reports for a container without one.
    let request = match get("ZTUNNEL_RESOURCE_CPU_REQUEST") {
        Some(v) if v.trim() == "0" => 0,
        _ => cpu_quantity(get, "ZTUNNEL_RESOURCE_CPU_REQUEST")?.unwrap_or(0),
    };
    Ok(match cpu_quantity(get, "ZTUNNEL_RESOURCE_CPU_LIMIT")? {
        // An explicit limit wins, even below the default; a larger request raises it.
        Some(limit) => limit.max(request),
        None => {
            let share = (cpu_count(get)? as f64 * DEFAULT_CPU_FRACTION).ceil() as usize;
            share.max(request).max(DEFAULT_WORKER_THREADS)
        }
    })
}

/// The worker-thread count (`get` returns `None` for unset or empty variables).
pub(super) fn worker_threads(get: &dyn Fn(&str) -> Option<String>) -> Result<usize, ConfigError> {
    let field = "ZTUNNEL_WORKER_THREADS";
    let threads = match get(field) {
        None => default_threads(get)?,
        Some(v) => match v.trim().strip_suffix('%') {
            Some(pct) => match pct.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => {
                    ((cpu_count(get)? as f64 * p / 100.0).ceil() as usize).max(1)
                }
                _ => {
                    return Err(error(
                        field,
                        &v,
                        "a percentage must be above 0% and at most 100%",
                    ));
                }
            },
            None => match v.trim().parse::<usize>() {
                Ok(0) => cpu_count(get)?,
                Ok(n) => n,
                Err(e) => {
                    return Err(error(
                        field,
                        &v,
                        format!("not a number or a percentage: {e}"),
                    ));
                }
            },
        },
    };
    Ok(threads.clamp(1, MAX_WORKER_THREADS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(vars: &[(&str, &str)]) -> Result<usize, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        worker_threads(&move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn explicit_counts_and_percentages() {
        assert_eq!(threads(&[("ZTUNNEL_WORKER_THREADS", "3")]), Ok(3));
        let limit = ("ZTUNNEL_CPU_LIMIT", "8");
        assert_eq!(threads(&[limit, ("ZTUNNEL_WORKER_THREADS", "50%")]), Ok(4));
        assert_eq!(threads(&[limit, ("ZTUNNEL_WORKER_THREADS", "10%")]), Ok(1));
        assert_eq!(threads(&[limit, ("ZTUNNEL_WORKER_THREADS", "0")]), Ok(8));
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(threads(&[("ZTUNNEL_WORKER_THREADS", "100%")]), Ok(cpus));
        // The resource limit counts as the CPUs too.
        let rlimit = ("ZTUNNEL_RESOURCE_CPU_LIMIT", "6");
        assert_eq!(threads(&[rlimit, ("ZTUNNEL_WORKER_THREADS", "50%")]), Ok(3));
        assert_eq!(threads(&[("ZTUNNEL_WORKER_THREADS", "1000")]), Ok(256));
    }

    #[test]
    fn default_follows_the_pods_cpu_limit_and_request() {
        // No limit: a quarter of the CPUs, at least 2, at least the request.
        assert_eq!(threads(&[("ZTUNNEL_CPU_LIMIT", "4")]), Ok(2));
        assert_eq!(threads(&[("ZTUNNEL_CPU_LIMIT", "32")]), Ok(8));
        assert_eq!(threads(&[("ZTUNNEL_CPU_LIMIT", "12")]), Ok(3));
        let request = ("ZTUNNEL_RESOURCE_CPU_REQUEST", "5");
        assert_eq!(threads(&[("ZTUNNEL_CPU_LIMIT", "32"), request]), Ok(8));
        assert_eq!(threads(&[("ZTUNNEL_CPU_LIMIT", "8"), request]), Ok(5));
        let no_request = ("ZTUNNEL_RESOURCE_CPU_REQUEST", "0");
        assert_eq!(threads(&[("ZTUNNEL_CPU_LIMIT", "4"), no_request]), Ok(2));
        // A limit is the count, even below 2, raised by a larger request.
        assert_eq!(threads(&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "1")]), Ok(1));
        assert_eq!(threads(&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "500m")]), Ok(1));
        assert_eq!(threads(&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "2500m")]), Ok(3));
        assert_eq!(threads(&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "1.5")]), Ok(2));
        assert_eq!(
            threads(&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "3"), request]),
            Ok(5)
        );
        assert_eq!(
            threads(&[
                ("ZTUNNEL_RESOURCE_CPU_LIMIT", "3"),
                ("ZTUNNEL_RESOURCE_CPU_REQUEST", "250m")
            ]),
            Ok(3)
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (field, value) in [
            ("ZTUNNEL_RESOURCE_CPU_LIMIT", "two"),
            ("ZTUNNEL_RESOURCE_CPU_LIMIT", "0"),
            ("ZTUNNEL_RESOURCE_CPU_REQUEST", "-1"),
            ("ZTUNNEL_RESOURCE_CPU_REQUEST", "0.0.1"),
            ("ZTUNNEL_CPU_LIMIT", "1.5"),
            ("ZTUNNEL_WORKER_THREADS", "0%"),
            ("ZTUNNEL_WORKER_THREADS", "many"),
        ] {
            let e = threads(&[(field, value)]).unwrap_err();
            assert_eq!((e.field, e.value.as_str()), (field, value), "{e}");
        }
    }
}
