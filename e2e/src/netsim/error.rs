//! The one error type of the simulated-topology library. Every variant names
//! the namespace (and link, key, program ...) it is about.

use node_agent::redirect::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum NetsimError {
    /// A file-system or process operation on behalf of a namespace failed.
    #[error("netns {netns}: {action}: {source}")]
    Io {
        netns: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request inside a namespace failed.
    #[error("netns {netns}: {action}: {source}")]
    Netlink {
        netns: String,
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// Entering a namespace failed (or the work inside panicked).
    #[error(transparent)]
    Enter(#[from] NetsimEnterError),
    /// A caller error: bad name, exhausted address range, missing link ...
    #[error("{0}")]
    Invalid(String),
    /// A capture could not be started, stopped or read.
    #[error("capture in netns {netns} on {iface}: {reason}")]
    Capture {
        netns: String,
        iface: String,
        reason: String,
    },
}

/// Wrapper so that `?` on the agent's [`NetnsError`] converts.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct NetsimEnterError(#[from] pub NetnsError);

impl From<NetnsError> for NetsimError {
    fn from(e: NetnsError) -> Self {
        NetsimError::Enter(NetsimEnterError(e))
    }
}

pub type Result<T, E = NetsimError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    netns: impl Into<String>,
    action: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> NetsimError {
    let netns = netns.into();
    let action = action.into();
    move |source| NetsimError::Io {
        netns,
        action,
        source,
    }
}
