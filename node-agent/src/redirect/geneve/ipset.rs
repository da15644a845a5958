//! The `ztunnel-pods-ips` ipset (hash:ip, comment = pod UID), driven by
//! `ipset restore -exist` batches.
//!
//! Like the iptables helpers, the functions that run `ipset` act in the
//! network namespace of the calling thread: call them from inside
//! [`crate::redirect::netns::Netns::run`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;

use super::constants::IPSET_NAME;
use crate::redirect::batch_input::{self, BatchFailure};

#[derive(Debug, thiserror::Error)]
pub enum IpsetError {
    #[error("cannot run ipset for set {set}: {source}")]
    Spawn {
        set: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ipset {op} failed for set {set} ({status}): {stderr}")]
    Failed {
        op: &'static str,
        set: String,
        status: String,
        stderr: String,
    },
    #[error("pod UID {uid:?} cannot be an ipset comment (quotes, newlines or over 255 bytes)")]
    BadComment { uid: String },
}

/// Creates the set if missing (same type: no error if present).
pub fn create_line() -> String {
    format!("create {IPSET_NAME} hash:ip comment\n")
}

/// Adds (or updates the comment of) `ip`. With `-exist` an entry that is
/// already there gets the new comment, atomically.
pub fn add_line(ip: Ipv4Addr, uid: &str) -> Result<String, IpsetError> {
    if uid.len() > 255 || uid.contains(['"', '\n', '\r', '\0']) {
        return Err(IpsetError::BadComment {
            uid: uid.to_string(),
        });
    }
    Ok(format!("add {IPSET_NAME} {ip} comment \"{uid}\"\n"))
}

/// Deletes `ip` (missing is fine with `-exist`).
pub fn del_line(ip: Ipv4Addr) -> String {
    format!("del {IPSET_NAME} {ip}\n")
}

/// Destroys the set (missing is fine with `-exist`).
pub fn destroy_line() -> String {
    format!("destroy {IPSET_NAME}\n")
}

/// Runs `ipset restore -exist` with `batch` in the calling thread's netns.
pub fn restore(batch: &str) -> Result<(), IpsetError> {
    batch_input::apply("ipset", &["restore", "-exist"], batch).map_err(|e| match e {
        BatchFailure::Spawn(source) => IpsetError::Spawn {
            set: IPSET_NAME.into(),
            source,
        },
        BatchFailure::Refused { status, stderr } => IpsetError::Failed {
            op: "restore",
            set: IPSET_NAME.into(),
            status,
            stderr,
        },
    })?;
    Ok(())
}

/// Entries of the set (IP → comment), or `None` when the set does not exist.
pub fn list() -> Result<Option<BTreeMap<Ipv4Addr, String>>, IpsetError> {
    let out = Command::new("ipset")
        .args(["save", IPSET_NAME])
        .output()
        .map_err(|source| IpsetError::Spawn {
            set: IPSET_NAME.into(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("does not exist") {
            return Ok(None);
        }
        return Err(IpsetError::Failed {
            op: "save",
            set: IPSET_NAME.into(),
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(Some(parse_save(&String::from_utf8_lossy(&out.stdout))))
}

/// Parses `ipset save` output: `add <set> <ip> [comment "<c>"]` lines of our
/// set.
pub fn parse_save(text: &str) -> BTreeMap<Ipv4Addr, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&format!("add {IPSET_NAME} ")) else {
            continue;
        };
        let (ip, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            continue;
        };
        let comment = tail
            .split_once("comment \"")
            .and_then(|(_, c)| c.split_once('"'))
            .map(|(c, _)| c.to_string())
            .unwrap_or_default();
        out.insert(ip, comment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(create_line(), "create ztunnel-pods-ips hash:ip comment\n");
        assert_eq!(
            add_line(Ipv4Addr::new(10, 0, 0, 5), "6f1c-uid").unwrap(),
            "add ztunnel-pods-ips 10.0.0.5 comment \"6f1c-uid\"\n"
        );
        assert_eq!(
            del_line(Ipv4Addr::new(10, 0, 0, 5)),
            "del ztunnel-pods-ips 10.0.0.5\n"
        );
        assert!(matches!(
            add_line(Ipv4Addr::LOCALHOST, "a\"b"),
            Err(IpsetError::BadComment { .. })
        ));
        assert!(add_line(Ipv4Addr::LOCALHOST, &"x".repeat(256)).is_err());
    }

    #[test]
    fn parses_save_output() {
        let text = "create ztunnel-pods-ips hash:ip family inet hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x29e5f686\nadd ztunnel-pods-ips 10.1.1.1 comment \"b\"\nadd ztunnel-pods-ips 10.1.1.2\nadd other 10.9.9.9 comment \"x\"\n";
        let m = parse_save(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&Ipv4Addr::new(10, 1, 1, 1)], "b");
        assert_eq!(m[&Ipv4Addr::new(10, 1, 1, 2)], "");
    }
}
