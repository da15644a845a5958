//! The CNI spec itself: environment, versions, results, errors. Nothing here
//! knows about Istio.

pub mod args;
pub mod error;
pub mod invocation;
pub mod result;
pub mod version;
