//! Errors of GENEVE redirection; each names the namespace or object.

use std::net::Ipv4Addr;

use super::ipset::IpsetError;
use super::state::PlanError;
use super::sysctl::SysctlError;
use crate::redirect::iptables::IptablesError;
use crate::redirect::netlink::NetlinkError;
use crate::redirect::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum GeneveError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("iptables in netns {netns}: {source}")]
    Iptables {
        netns: String,
        #[source]
        source: IptablesError,
    },
    #[error("ipset in netns {netns}: {source}")]
    Ipset {
        netns: String,
        #[source]
        source: IpsetError,
    },
    #[error("sysctl in netns {netns}: {source}")]
    Sysctl {
        netns: String,
        #[source]
        source: SysctlError,
    },
    #[error("cannot list interfaces of netns {netns}: {source}")]
    Interfaces {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "ztunnel pod {ip} is reached through {dev} ({kind}) in netns {netns}; GENEVE mode needs the pod's own veth (point-to-point CNI), as upstream"
    )]
    ZtunnelDevice {
        ip: Ipv4Addr,
        dev: String,
        kind: String,
        netns: String,
    },
    #[error("no source address toward ztunnel pod {ip} in netns {netns}")]
    NoSource { ip: Ipv4Addr, netns: String },
    #[error("no free GENEVE UDP port for tunnels to ztunnel pod {ip}")]
    NoPort { ip: Ipv4Addr },
    #[error("no ztunnel pod is set for GENEVE redirection on this node")]
    NoZtunnel,
}
