//! How a proxy obtains its sockets.
//!
//! A [`SocketFactory`] decides where listeners and outbound connections live (which network
//! namespace, which mark, transparent or not) and how a captured connection's original
//! destination is recovered. The proxy engine only talks to this trait:
//!
//! | mode | factory | original destination |
//! |---|---|---|
//! | dedicated (this process is in the pod's netns) | [`dedicated::DedicatedSocketFactory`] | `SO_ORIGINAL_DST` (nat REDIRECT) |
//! | in-pod (ZDS hands over a netns fd) | `inpod` module: creates each socket inside the pod netns on a dedicated thread | `SO_ORIGINAL_DST` |
//! | TPROXY (GENEVE redirection) | transparent factory: `IP_TRANSPARENT` listeners | the accepted socket's local address |
//!
//! The trait itself is defined by the proxy engine ([`crate::proxy::sockets`]) and
//! re-exported here.

pub mod dedicated;
pub mod sockopt;
pub mod tproxy;

pub use crate::proxy::sockets::{
    BoxFuture, ListenerKind, OriginalDestination, SocketFactory, canonical,
};
