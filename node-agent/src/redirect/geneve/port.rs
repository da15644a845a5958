//! Choice of the GENEVE UDP destination port (upstream 1.20+ behaviour).
//!
//! The kernel refuses a GENEVE device that would share its UDP port with an
//! "external" device (collect-metadata, or ID 0 without remote), or with a
//! device that has the same VNI and remote. Starting at 6081, the first port
//! where no wanted device clashes is taken. Both ends of a tunnel must use
//! the same port (it is the listening port too), so the search covers the
//! devices of both namespaces at once.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::constants::GENEVE_DEFAULT_PORT;
use crate::redirect::netlink::Link;

/// A device we want to create, next to the links already in its namespace.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub existing: &'a [Link],
    pub vni: u32,
    pub remote: Ipv4Addr,
}

/// True when a GENEVE device with `vni`/`remote` can use `port` next to
/// `existing` (links of other kinds are ignored).
pub fn port_free(existing: &[Link], port: u16, vni: u32, remote: Ipv4Addr) -> bool {
    !taken_ports(existing, vni, remote).contains(&port)
}

/// Ports a GENEVE device with `vni`/`remote` cannot use next to `existing`.
fn taken_ports(existing: &[Link], vni: u32, remote: Ipv4Addr) -> BTreeSet<u16> {
    existing
        .iter()
        .filter_map(|l| l.geneve.as_ref())
        .filter(|g| {
            g.external
                || (g.vni == 0 && g.remote.is_none())
                || (g.vni == vni && g.remote == Some(remote))
        })
        .map(|g| g.dst_port)
        .collect()
}

/// First port from 6081 upward that every wanted device can use. `None`
/// only if every port up to 65535 is taken.
pub fn choose_dst_port(wanted: &[Wanted<'_>]) -> Option<u16> {
    let taken: BTreeSet<u16> = wanted
        .iter()
        .flat_map(|w| taken_ports(w.existing, w.vni, w.remote))
        .collect();
    (GENEVE_DEFAULT_PORT..=u16::MAX).find(|p| !taken.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::netlink::GeneveAttrs;

    fn geneve(vni: u32, remote: Option<&str>, port: u16, external: bool) -> Link {
        Link {
            name: format!("g{vni}-{port}"),
            kind: Some("geneve".into()),
            geneve: Some(GeneveAttrs {
                vni,
                remote: remote.map(|r| r.parse().unwrap()),
                dst_port: port,
                external,
            }),
            ..Default::default()
        }
    }

    const ZT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 9);
    const HOST: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

    fn one(existing: &[Link], vni: u32) -> Option<u16> {
        choose_dst_port(&[Wanted {
            existing,
            vni,
            remote: ZT,
        }])
    }

    #[test]
    fn free_node_uses_6081() {
        assert_eq!(one(&[], 1000), Some(6081));
        let veth = Link {
            name: "veth1".into(),
            kind: Some("veth".into()),
            ..Default::default()
        };
        assert_eq!(one(&[veth], 1000), Some(6081));
    }

    #[test]
    fn external_device_pushes_us_up() {
        // e.g. OVN/Cilium's genev_sys_6081 (collect-metadata)
        assert_eq!(one(&[geneve(0, None, 6081, true)], 1000), Some(6082));
        // no collect-metadata flag read back, but ID 0 and no remote
        assert_eq!(one(&[geneve(0, None, 6081, false)], 1000), Some(6082));
    }

    #[test]
    fn same_vni_and_remote_clash_but_other_vni_or_remote_do_not() {
        let same = geneve(1000, Some("10.244.0.9"), 6081, false);
        assert_eq!(one(std::slice::from_ref(&same), 1000), Some(6082));
        assert_eq!(
            one(&[geneve(1001, Some("10.244.0.9"), 6081, false)], 1000),
            Some(6081)
        );
        assert_eq!(
            one(&[geneve(1000, Some("10.244.0.10"), 6081, false)], 1000),
            Some(6081)
        );
        // 6081 and 6082 taken; a device elsewhere on 6090 does not matter
        let links = [
            same,
            geneve(0, None, 6082, true),
            geneve(0, None, 6090, true),
        ];
        assert_eq!(one(&links, 1000), Some(6083));
    }

    #[test]
    fn both_tunnels_and_both_namespaces_must_agree() {
        // node: a device with VNI 1001 to the ztunnel on 6081 (stale istioout
        // of someone else); ztunnel netns: an external device on 6082.
        let node = [geneve(1001, Some("10.244.0.9"), 6081, false)];
        let zt = [geneve(0, None, 6082, true)];
        let wanted = [
            Wanted {
                existing: &node,
                vni: 1000,
                remote: ZT,
            },
            Wanted {
                existing: &node,
                vni: 1001,
                remote: ZT,
            },
            Wanted {
                existing: &zt,
                vni: 1000,
                remote: HOST,
            },
            Wanted {
                existing: &zt,
                vni: 1001,
                remote: HOST,
            },
        ];
        assert_eq!(choose_dst_port(&wanted), Some(6083));
    }

    #[test]
    fn exhausted_range_is_none() {
        let all: Vec<Link> = (6081..=u16::MAX)
            .map(|p| geneve(0, None, p, true))
            .collect();
        assert_eq!(one(&all, 1000), None);
    }
}
