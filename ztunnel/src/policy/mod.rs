//! L4 authorization (Istio `AuthorizationPolicy` semantics), evaluated at the
//! destination. A pure module: it imports nothing from the rest of ztunnel.
//!
//! - [`model`]: the local-config `policies` schema (serde types).

pub mod evaluate;
pub mod kube;
pub mod matching;
pub mod model;
pub mod set;

pub use evaluate::{Decision, DenyReason, Request};
pub use matching::PeerIdentity;
pub use model::Authorization;
pub use set::PolicySet;
