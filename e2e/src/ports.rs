//! Ports for programs a test starts with a fixed listen address.
//!
//! Asking the kernel for port 0 and handing the number to a child races with
//! every outgoing connection on the machine: such a port comes from the
//! ephemeral range, and a client socket may take it before the child binds it
//! (CI saw `Address already in use` this way). These ports come from below the
//! ephemeral range instead, are checked on both wildcards (which conflict
//! with any socket on the port) and are never handed out twice by
//! one test process.

use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out; below it live well-known services.
const FIRST: u32 = 20_000;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// First port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn bindable(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok();
    v4 && match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        // No IPv6 on this machine: only IPv4 can conflict.
        Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
    }
}

/// A TCP port nobody listens on and no ephemeral socket will take.
pub fn free_port() -> u16 {
    let end = ephemeral_start().max(FIRST + 1_000);
    let span = end - FIRST;
    // Different test processes start at different places in the range.
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() * 97 % span + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if bindable(port) {
            return port;
        }
    }
    panic!("no free TCP port between {FIRST} and {end}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_below_the_ephemeral_range_and_bindable() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        for p in [a, b] {
            assert!(u32::from(p) >= FIRST && u32::from(p) < ephemeral_start().max(FIRST + 1_000));
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("port is free");
        }
    }
}
