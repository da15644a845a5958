//! L4 authorization (Istio `AuthorizationPolicy` semantics), evaluated at the
//! destination. A pure module: it imports nothing from the rest of ztunnel.
//!
//! - [`model`]: the local-config `policies` schema (serde types; also what
//!   `/config_dump` shows).
//! - [`matching`]: whether one policy matches one connection
//!   ([`PeerIdentity`], [`matching::Peer`]).
//! - [`set`]: [`PolicySet`], the immutable scope-indexed set (global list,
//!   per-namespace buckets, policies by `"<ns>/<name>"`).
//! - [`evaluate`]: [`PolicySet::evaluate`]`(&`[`Request`]`) -> `[`Decision`]
//!   (DENY first, then ALLOW; dry-run and AUDIT logged only; no allocation).
//! - [`kube`]: `security.istio.io/v1` `AuthorizationPolicy` objects, their
//!   conversion into the model (fail-closed for what L4 cannot enforce) and
//!   [`kube::selector_matches`]; [`kube::peer_authn`]: `PeerAuthentication`
//!   objects converted into DENY policies (istiod's ambient conversion).

pub mod evaluate;
pub mod kube;
pub mod matching;
pub mod model;
pub mod set;

pub use evaluate::{Decision, DenyReason, Request};
pub use matching::PeerIdentity;
pub use model::Authorization;
pub use set::PolicySet;
