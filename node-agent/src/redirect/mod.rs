//! Traffic redirection: how enrolled pods' traffic is steered into ztunnel.

pub mod iptables;
pub mod netns;
