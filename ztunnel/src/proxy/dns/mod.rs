//! The DNS proxy (port 15053), as upstream ztunnel's: pods whose DNS is captured
//! (`ambient.istio.io/dns-capture`, node agent `AMBIENT_DNS_CAPTURE`) get A/AAAA answers
//! for mesh Services and ServiceEntries from ztunnel's state, with Kubernetes short
//! names and search domains resolved for the pod's namespace; every other query is
//! relayed to ztunnel's upstream resolvers from inside the pod's netns.
//!
//! - [`lookup`]: which Service a name means for a client, and its addresses;
//! - [`message`]: parsing queries and authoring answers;
//! - [`forward`]: resolv.conf and relaying to the upstream resolvers;
//! - [`server`]: the UDP and TCP sockets, metrics and the `dns` log target.
//!
//! End-to-end tests over real sockets: `tests/dns_proxy.rs`, `tests/dns_proxy_inpod.rs`.

pub mod forward;
pub mod lookup;
pub mod message;
pub mod server;

pub use forward::Upstreams;
pub use server::{DnsClient, DnsHandler, SearchDomains};
