//! Names and numbers of GENEVE redirection (facts from upstream Istio
//! 1.18–1.20, see `shared/reference/redirection-geneve.md`).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Node-side inbound tunnel (traffic *for* mesh pods), VNI 1000.
pub const NODE_INBOUND_LINK: &str = "istioin";
/// Node-side outbound tunnel (traffic *from* mesh pods), VNI 1001.
pub const NODE_OUTBOUND_LINK: &str = "istioout";
/// ztunnel-side end of the inbound tunnel.
pub const ZTUNNEL_INBOUND_LINK: &str = "pistioin";
/// ztunnel-side end of the outbound tunnel.
pub const ZTUNNEL_OUTBOUND_LINK: &str = "pistioout";

/// Fixed, locally administered MAC addresses of the four tunnel devices
/// (`02:69:73` = "is"). GENEVE devices are Ethernet: each side caches the
/// other's MAC for the inner next hop (`192.168.12x.y`). Random MACs made a
/// ztunnel-side rebuild (same ztunnel IP, devices recreated after a hold)
/// black-hole captured traffic until the node's neighbour entry went stale
/// (~30 s); with fixed ones a recreated device answers to the cached MAC.
pub const NODE_INBOUND_MAC: [u8; 6] = [0x02, 0x69, 0x73, 0x00, 0x00, 0x01];
pub const NODE_OUTBOUND_MAC: [u8; 6] = [0x02, 0x69, 0x73, 0x00, 0x00, 0x02];
pub const ZTUNNEL_INBOUND_MAC: [u8; 6] = [0x02, 0x69, 0x73, 0x00, 0x00, 0x11];
pub const ZTUNNEL_OUTBOUND_MAC: [u8; 6] = [0x02, 0x69, 0x73, 0x00, 0x00, 0x12];

pub const INBOUND_VNI: u32 = 1000;
pub const OUTBOUND_VNI: u32 = 1001;

/// Kernel default GENEVE UDP port; the search for a free one starts here.
pub const GENEVE_DEFAULT_PORT: u16 = 6081;

pub const NODE_INBOUND_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 126, 1);
pub const ZTUNNEL_INBOUND_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 126, 2);
pub const NODE_OUTBOUND_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
pub const ZTUNNEL_OUTBOUND_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
/// Prefix length of the four tunnel addresses.
pub const TUNNEL_PREFIX: u8 = 30;

pub fn net(addr: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(addr, TUNNEL_PREFIX).expect("/30 is a valid prefix")
}

/// Route tables (same numbers in the node and ztunnel namespaces).
pub const TABLE_INBOUND: u32 = 100;
pub const TABLE_OUTBOUND: u32 = 101;
pub const TABLE_PROXY: u32 = 102;

/// Node rule priorities.
pub const PRIO_SKIP: u32 = 100;
pub const PRIO_OUTBOUND: u32 = 101;
pub const PRIO_PROXY_RET: u32 = 102;
pub const PRIO_INBOUND: u32 = 103;
/// Priority of the kernel's `lookup main` rule, target of the skip rule.
pub const PRIO_MAIN: u32 = 32766;

/// ztunnel netns rule priorities (cleanup removes the whole range).
pub const PRIO_TPROXY: u32 = 20000;
pub const PRIO_ORG_SRC_RET: u32 = 20003;

/// Node fwmarks (value, mask): value and mask are equal for all of them.
pub const MARK_OUTBOUND: u32 = 0x100;
pub const MARK_SKIP: u32 = 0x200;
pub const MARK_CONN_SKIP: u32 = 0x220;
pub const MARK_PROXY: u32 = 0x210;
pub const MARK_PROXY_RET: u32 = 0x040;
/// ztunnel netns marks, mask 0xfff.
pub const MARK_TPROXY: u32 = 0x400;
pub const MARK_ORG_SRC_RET: u32 = 0x4d3;
pub const ZTUNNEL_MARK_MASK: u32 = 0xfff;

/// ztunnel listener ports.
pub const PORT_OUTBOUND: u16 = 15001;
pub const PORT_INBOUND_PLAIN: u16 = 15006;
pub const PORT_INBOUND_HBONE: u16 = 15008;
pub const PORT_DNS: u16 = 15053;

/// ipset of enrolled pod IPs (hash:ip, comment = pod UID).
pub const IPSET_NAME: &str = "ztunnel-pods-ips";

/// Prefix of the node chains; one chain per hooked built-in chain.
pub const CHAIN_PREFIX: &str = "ztunnel-";
