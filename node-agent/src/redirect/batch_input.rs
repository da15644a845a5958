//! Feeding a batch to a restore tool on its standard input (`iptables-restore`,
//! `ipset restore`): one process per batch, its stderr kept for the error.

use std::io::Write;
use std::process::{Command, Stdio};

/// Why a batch was not applied; the callers wrap it in their own error naming
/// the table or set.
#[derive(Debug)]
pub enum BatchFailure {
    /// The tool could not be started or waited for.
    Spawn(std::io::Error),
    /// It ran and refused the batch (or could not read all of it).
    Refused { status: String, stderr: String },
}

/// Runs `program args…` in the calling thread's netns with `input` on stdin.
pub fn apply(program: &str, args: &[&str], input: &str) -> Result<(), BatchFailure> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(BatchFailure::Spawn)?;
    let write = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let out = child.wait_with_output().map_err(BatchFailure::Spawn)?;
    if !out.status.success() || write.is_err() {
        return Err(BatchFailure::Refused {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_refusal_with_stderr_and_missing_tools() {
        assert!(apply("sh", &["-c", "cat >/dev/null"], "x\n").is_ok());
        match apply(
            "sh",
            &["-c", "cat >/dev/null; echo bad line 2 >&2; exit 1"],
            "x\n",
        ) {
            Err(BatchFailure::Refused { stderr, .. }) => assert_eq!(stderr, "bad line 2"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            apply("/nonexistent/restore-tool", &[], ""),
            Err(BatchFailure::Spawn(_))
        ));
    }
}
