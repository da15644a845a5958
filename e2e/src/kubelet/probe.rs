//! Readiness probes, run like the kubelet runs them: from the node's
//! network namespace to the pod IP (so probes of redirected pods take the
//! node → pod path that in-pod redirection must let through).
//!
//! Supported: `httpGet` (numeric or named port, `path`, HTTP/1.1, success
//! = 200–399) and `tcpSocket` (connect). `exec` probes are not.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A probe resolved against its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    Http { port: u16, path: String },
    Tcp { port: u16 },
}

/// Timing of a probe (seconds from the spec, Kubernetes defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn port_of(c: &Container, p: &IntOrString) -> Result<u16, String> {
    match p {
        IntOrString::Int(i) => {
            u16::try_from(*i).map_err(|_| format!("probe port {i} out of range"))
        }
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| {
                format!(
                    "probe port {name:?} is not a named port of container {}",
                    c.name
                )
            }),
    }
}

/// The action and timing of `probe` of container `c`.
pub fn resolve(c: &Container, probe: &Probe) -> Result<(ProbeAction, ProbeTiming), String> {
    let action = if let Some(h) = &probe.http_get {
        ProbeAction::Http {
            port: port_of(c, &h.port)?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
        }
    } else if let Some(t) = &probe.tcp_socket {
        ProbeAction::Tcp {
            port: port_of(c, &t.port)?,
        }
    } else {
        return Err(format!(
            "container {}: only httpGet and tcpSocket probes are supported by kubelet-lite",
            c.name
        ));
    };
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    Ok((
        action,
        ProbeTiming {
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10),
            timeout: secs(probe.timeout_seconds, 1),
            success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
        },
    ))
}

/// Runs `action` against `ip` (blocking; call it on a thread inside the
/// node's netns). `Ok(())` = success; `Err` says why not.
pub fn run_blocking(action: &ProbeAction, ip: IpAddr, timeout: Duration) -> Result<(), String> {
    let port = match action {
        ProbeAction::Http { port, .. } | ProbeAction::Tcp { port } => *port,
    };
    let addr = SocketAddr::new(ip, port);
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let ProbeAction::Http { path, .. } = action else {
        return Ok(());
    };
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("read from {addr}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: no HTTP status in {line:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("{addr}{path}: HTTP {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_resolve_named_ports_and_defaults() {
        let c: Container = serde_json::from_value(json!({
            "name": "zt", "ports": [{"name": "http-health", "containerPort": 15021}]
        }))
        .unwrap();
        let p: Probe = serde_json::from_value(json!({
            "httpGet": {"path": "/healthz/ready", "port": "http-health"}, "periodSeconds": 5
        }))
        .unwrap();
        let (a, t) = resolve(&c, &p).unwrap();
        assert_eq!(
            a,
            ProbeAction::Http {
                port: 15021,
                path: "/healthz/ready".into()
            }
        );
        assert_eq!(t.period, Duration::from_secs(5));
        assert_eq!(t.failure_threshold, 3);
        let p: Probe = serde_json::from_value(json!({"tcpSocket": {"port": 8080}})).unwrap();
        assert_eq!(resolve(&c, &p).unwrap().0, ProbeAction::Tcp { port: 8080 });
        let p: Probe = serde_json::from_value(json!({"tcpSocket": {"port": "nope"}})).unwrap();
        assert!(resolve(&c, &p).unwrap_err().contains("nope"));
        let p: Probe = serde_json::from_value(json!({"exec": {"command": ["true"]}})).unwrap();
        assert!(resolve(&c, &p).unwrap_err().contains("only httpGet"));
    }

    #[test]
    fn http_probe_reads_the_status() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            for code in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).unwrap();
                write!(s, "HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").unwrap();
            }
        });
        let a = ProbeAction::Http {
            port,
            path: "/ready".into(),
        };
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        run_blocking(&a, ip, Duration::from_secs(2)).unwrap();
        let e = run_blocking(&a, ip, Duration::from_secs(2)).unwrap_err();
        assert!(e.contains("HTTP 503"), "{e}");
        t.join().unwrap();
        let e = run_blocking(&ProbeAction::Tcp { port }, ip, Duration::from_secs(2)).unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }
}
