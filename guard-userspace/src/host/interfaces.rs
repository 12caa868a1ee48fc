//! The host's interfaces and addresses, and which interfaces are uplinks.
//!
//! An uplink is every interface except loopback, Docker's bridges, the container veths
//! enslaved to them, and those the operator trusts. Discovery is re-run on every reconcile, so
//! an interface that appears later is protected and one that vanishes does no harm.

use std::{collections::BTreeSet, fs, io, net::IpAddr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    /// The bridge (or bond) this interface is enslaved to.
    pub master: Option<String>,
    /// Whether the driver is veth: only a veth in a Docker bridge is a container's side.
    pub is_veth: bool,
    /// Whether it is a Linux bridge.
    pub is_bridge: bool,
    /// The ARPHRD_* type (/sys/class/net/X/type), which says how its frames start.
    pub link_type: u16,
}

impl Link {
    /// How XDP sees this link's packets; None for a type guard cannot read.
    pub fn framing(&self) -> Option<Framing> {
        framing_of_link_type(self.link_type)
    }
}

/// How XDP sees a link's packets, which decides the XDP entry point that can read them: an
/// Ethernet header first (NICs, veth, macvlan, vxlan, tap, bond), or the IP header first (L3
/// devices have no link header, and generic XDP hands over the packet from the network header
/// on: tun, wireguard, ipip, sit, gre, ppp).
pub use guard_common::parse::Framing;

/// The framing of an ARPHRD_* link type; None for a type guard cannot read.
pub fn framing_of_link_type(link_type: u16) -> Option<Framing> {
    // include/uapi/linux/if_arp.h
    const ETHER: u16 = 1;
    const PPP: u16 = 512;
    const RAWIP: u16 = 519;
    const TUNNEL: u16 = 768; // ipip
    const TUNNEL6: u16 = 769; // ip6tnl
    const SIT: u16 = 776;
    const IPGRE: u16 = 778;
    const IP6GRE: u16 = 823;
    const NONE: u16 = 65534; // tun, wireguard
    match link_type {
        ETHER => Some(Framing::Ethernet),
        PPP | RAWIP | TUNNEL | TUNNEL6 | SIT | IPGRE | IP6GRE | NONE => Some(Framing::Ip),
        _ => None,
    }
}

/// Every interface of the agent's network namespace (see [`crate::host::rtnetlink::dump_links`]).
pub fn links() -> io::Result<Vec<Link>> {
    let records = crate::host::rtnetlink::dump_links()?;
    let name_of =
        |ifindex: u32| records.iter().find(|r| r.ifindex == ifindex).map(|r| r.name.clone());
    let mut links: Vec<Link> = records
        .iter()
        .map(|r| Link {
            name: r.name.clone(),
            ifindex: r.ifindex,
            master: r.master.and_then(name_of),
            is_veth: r.kind.as_deref() == Some("veth"),
            is_bridge: r.kind.as_deref() == Some("bridge"),
            link_type: r.link_type,
        })
        .collect();
    links.sort_by_key(|l| l.ifindex);
    Ok(links)
}

/// Every address the host receives on, on every interface (loopback included; the desired
/// state filters): its unicast addresses, the broadcast addresses of its IPv4 subnets and its
/// IPv6 anycast addresses (a forwarding host answers each prefix's subnet-router anycast
/// address). docker-proxy's wildcard sockets receive on all of them.
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    let mut ips: Vec<IpAddr> = Vec::new();
    for a in addrs {
        if let Some(v4) = a.address.as_ref().and_then(|sa| sa.as_sockaddr_in()) {
            let prefix = a
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| u32::from(m.ip()).leading_ones());
            ips.extend(v4_local_addresses(v4.ip(), prefix));
            // A broadcast address set by hand (`brd 10.0.0.77`) is routed as one too. On a
            // point-to-point link the same field holds the peer: not ours.
            if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_POINTOPOINT) {
                let brd = a.broadcast.as_ref().and_then(|sa| sa.as_sockaddr_in());
                ips.extend(brd.map(|b| IpAddr::V4(b.ip())));
            }
        } else if let Some(v6) = a.address.as_ref().and_then(|sa| sa.as_sockaddr_in6()) {
            ips.push(IpAddr::V6(v6.ip()));
        }
    }
    ips.extend(anycast6(&fs::read_to_string(ANYCAST6).unwrap_or_default()));
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// Every unicast address with the interface that holds it (both families): what tells which
/// bridge carries an engine network (see [`crate::host::bridges`]).
pub fn interface_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    let ip = |a: &nix::ifaddrs::InterfaceAddress| -> Option<IpAddr> {
        let sa = a.address.as_ref()?;
        sa.as_sockaddr_in()
            .map(|v4| IpAddr::V4(v4.ip()))
            .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
    };
    Ok(addrs.filter_map(|a| Some((a.interface_name.clone(), ip(&a)?))).collect())
}

/// An IPv4 address and what the kernel receives along with it: for a prefix shorter than 31
/// bits, the subnet's broadcast address (`fib_add_ifaddr` adds that route whether or not the
/// address was given a broadcast address) and its lowest address (a broadcast address too on
/// kernels before 5.14). Computed, not only read from the address's broadcast field: `ip addr
/// add` without `brd +`, and point-to-point links, leave that field empty or holding the peer.
fn v4_local_addresses(addr: std::net::Ipv4Addr, prefix: u32) -> Vec<IpAddr> {
    let mut out = vec![IpAddr::V4(addr)];
    if prefix < 31 {
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        let bits = u32::from(addr);
        out.push(IpAddr::V4((bits | !mask).into()));
        out.push(IpAddr::V4((bits & mask).into()));
    }
    out
}

const ANYCAST6: &str = "/proc/net/anycast6";

/// The addresses in /proc/net/anycast6: `ifindex name address(32 hex digits) refcount`.
fn anycast6(table: &str) -> Vec<IpAddr> {
    table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 32))
        .map(|bits| IpAddr::V6(bits.into()))
        .collect()
}

/// A socket that becomes readable whenever a link or an address appears, changes or goes
/// (rtnetlink's link and address groups). Nothing is parsed: the agent is level-triggered, a
/// message only means "look again".
pub fn change_notifications() -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
    };
    const GROUPS: u32 = libc::RTMGRP_LINK as u32
        | libc::RTMGRP_IPV4_IFADDR as u32
        | libc::RTMGRP_IPV6_IFADDR as u32;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &NetlinkAddr::new(0, GROUPS))?;
    Ok(fd)
}

/// Whether `link` is a bridge as Docker names the ones it creates (`docker0`, `br-` and the
/// first 12 hex digits of the network's id). Docker makes them, and starts the containers
/// with restart policies on them, before its API answers, and a network created while the
/// agent is away has one before the agent hears of it: such a bridge is taken for Docker's,
/// so it gets the gate rather than becoming an uplink that judges containers' own packets as
/// outside traffic. (One Docker does not report is a leftover of Docker's: the same.)
/// Podman's netavark does the same with `podman0`, `podman1`…, which its compatible API does
/// not even name: taken for an engine's bridge alike. A swarm node's `docker_gwbridge`, where
/// its tasks reach the host, likewise.
pub fn named_like_docker(link: &Link) -> bool {
    let id = link.name.strip_prefix("br-");
    let podman = link.name.strip_prefix("podman");
    link.is_bridge
        && (link.name == "docker0"
            || link.name == "docker_gwbridge"
            || id.is_some_and(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            || podman.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
}

/// The uplinks among `links`, given Docker's bridge names and the trusted interfaces.
pub fn select_uplinks(
    links: &[Link],
    docker_bridges: &BTreeSet<String>,
    trusted: &[String],
) -> Vec<Link> {
    links
        .iter()
        .filter(|l| l.name != "lo")
        .filter(|l| !docker_bridges.contains(&l.name))
        // A container's side is a veth in a Docker bridge. Any other port of such a bridge (a
        // NIC, a tap, a macvlan or vxlan someone added) lets outside frames into it: an uplink.
        .filter(|l| !(l.is_veth && l.master.as_ref().is_some_and(|m| docker_bridges.contains(m))))
        .filter(|l| !trusted.contains(&l.name))
        .filter(|l| !is_overlay_vxlan(&l.name))
        .cloned()
        .collect()
}

/// A Swarm overlay's vxlan device, as Docker names it: `vx-`, the VNI in 6 hex digits, `-`,
/// the first 5 of the network's id. Docker creates it here and moves it into the overlay's
/// sandbox namespace a moment later: not an uplink. What it decapsulates arrived on a real
/// uplink first, at the VXLAN port, which guard judges there (an engine door).
pub fn is_overlay_vxlan(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("vx-") else { return false };
    let Some((vni, network)) = rest.split_once('-') else { return false };
    vni.len() == 6
        && vni.bytes().all(|b| b.is_ascii_hexdigit())
        && network.len() == 5
        && network.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The interfaces the operator named with `--iface`, those that exist right now.
pub fn named(links: &[Link], names: &[String]) -> (Vec<Link>, Vec<String>) {
    let found: Vec<Link> = links.iter().filter(|l| names.contains(&l.name)).cloned().collect();
    let missing = names.iter().filter(|n| !found.iter().any(|l| &l.name == *n)).cloned().collect();
    (found, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, ifindex: u32, master: Option<&str>) -> Link {
        let is_veth = name.starts_with("veth");
        let is_bridge = name.starts_with("br") || name == "docker0";
        Link {
            name: name.into(),
            ifindex,
            master: master.map(Into::into),
            is_veth,
            is_bridge,
            link_type: 1,
        }
    }

    #[test]
    fn uplinks_exclude_loopback_docker_bridges_their_veths_and_trusted() {
        let links = vec![
            link("lo", 1, None),
            link("eth0", 2, None),
            link("docker0", 3, None),
            link("br-0123456789ab", 4, None),
            link("veth1a2b3c", 5, Some("docker0")),
            link("veth9f8e7d", 6, Some("br-0123456789ab")),
            link("wg0", 7, None),
            link("eth1", 8, Some("br0")), // a port of the host's own bridge: an uplink
            link("br0", 9, None),
            link("vx-001001-4f2a9", 10, None), // an overlay's, on its way to its sandbox
            link("vx-lan", 11, None),
        ];
        let bridges: BTreeSet<String> = ["docker0", "br-0123456789ab"].map(String::from).into();
        let names: Vec<String> = select_uplinks(&links, &bridges, &["wg0".to_string()])
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, ["eth0", "eth1", "br0", "vx-lan"]);
    }

    #[test]
    fn a_docker_bridge_port_that_is_not_a_veth_is_an_uplink() {
        let renamed_veth = Link { is_veth: true, ..link("eth7", 5, Some("docker0")) };
        let links = vec![
            link("docker0", 3, None),
            link("veth1a2b3c", 4, Some("docker0")),
            renamed_veth,
            link("enp3s0", 6, Some("docker0")), // a NIC someone bridged into docker0
            link("tap0", 7, Some("br-0123456789ab")),
        ];
        let bridges: BTreeSet<String> = ["docker0", "br-0123456789ab"].map(String::from).into();
        let names: Vec<String> =
            select_uplinks(&links, &bridges, &[]).into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["enp3s0", "tap0"], "veths (whatever their name) are containers' sides");
    }

    #[test]
    fn bridges_named_as_docker_names_them_are_taken_for_docker_s() {
        let docker: Vec<String> = [
            link("docker0", 3, None),
            link("br-0123456789ab", 4, None),
            link("br-0123456789abc", 5, None), // one digit too many
            link("br-lan", 6, None),
            link("br0", 7, None),
            Link { is_bridge: false, ..link("br-ba9876543210", 8, None) }, // not a bridge
            Link { is_bridge: true, ..link("podman1", 9, None) },          // netavark's
            Link { is_bridge: true, ..link("podman", 10, None) },
            Link { is_bridge: true, ..link("podmanx", 11, None) },
        ]
        .iter()
        .filter(|l| named_like_docker(l))
        .map(|l| l.name.clone())
        .collect();
        assert_eq!(docker, ["docker0", "br-0123456789ab", "podman1"]);
        let gateway_bridge = Link { is_bridge: true, ..link("docker_gwbridge", 12, None) };
        assert!(named_like_docker(&gateway_bridge), "a swarm node's gateway bridge");
    }

    #[test]
    fn framing_follows_the_link_type() {
        assert_eq!(framing_of_link_type(1), Some(Framing::Ethernet));
        for l3 in [65534, 768, 769, 776, 778, 512, 519] {
            assert_eq!(framing_of_link_type(l3), Some(Framing::Ip), "ARPHRD {l3}");
        }
        // Infiniband, IEEE 802.11 radiotap, CAN: nothing guard can read.
        for other in [32, 803, 280] {
            assert_eq!(framing_of_link_type(other), None, "ARPHRD {other}");
        }
    }

    #[test]
    fn loopback_is_not_a_veth_and_has_its_own_link_type() {
        let lo = links().expect("rtnetlink answers").into_iter().find(|l| l.name == "lo");
        let lo = lo.expect("this host has lo");
        assert!(!lo.is_veth, "lo is not a veth");
        assert_eq!(lo.link_type, 772, "ARPHRD_LOOPBACK");
    }

    #[test]
    fn named_interfaces_report_the_missing_ones() {
        let links = vec![link("eth0", 2, None), link("h0", 5, None)];
        let (found, missing) = named(&links, &["h0".into(), "nope".into()]);
        assert_eq!(found, vec![link("h0", 5, None)]);
        assert_eq!(missing, vec!["nope".to_string()]);
    }

    #[test]
    fn an_ipv4_subnet_brings_its_broadcast_and_lowest_address() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let ip = "10.66.0.7".parse().unwrap();
        assert_eq!(v4_local_addresses(ip, 24), [a("10.66.0.7"), a("10.66.0.255"), a("10.66.0.0")]);
        assert_eq!(v4_local_addresses(ip, 31), [a("10.66.0.7")]);
        assert_eq!(v4_local_addresses(ip, 32), [a("10.66.0.7")]);
        assert_eq!(v4_local_addresses(ip, 0)[1], a("255.255.255.255"));
    }

    #[test]
    fn anycast_table_is_read() {
        let table = "2    eth0            20010db8000000010000000000000000     1\n\
                     3    br0             fd000000000000000000000000000000     2\n\
                     bad line\n";
        let expected: Vec<IpAddr> = ["2001:db8:0:1::", "fd00::"].map(|a| a.parse().unwrap()).into();
        assert_eq!(anycast6(table), expected);
    }

    #[test]
    fn this_host_has_loopback() {
        let links = links().expect("rtnetlink answers");
        assert!(links.iter().any(|l| l.name == "lo"));
        let addrs = host_addresses().expect("getifaddrs works");
        assert!(addrs.iter().any(std::net::IpAddr::is_loopback));
    }

    /// Interfaces made with `ip`, deleted when dropped.
    struct ScratchLinks(Vec<String>);

    impl ScratchLinks {
        /// `ip ARGS`, which creates interface `creates`.
        fn add(&mut self, args: &[&str], creates: &str) {
            Self::ip(args);
            self.0.push(creates.to_string());
        }

        fn ip(args: &[&str]) {
            let out = std::process::Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    impl Drop for ScratchLinks {
        fn drop(&mut self) {
            for name in self.0.iter().rev() {
                let _ = std::process::Command::new("ip").args(["link", "del", name]).output();
            }
        }
    }

    #[test]
    fn the_kernel_tells_a_veth_from_a_tap_a_macvlan_and_a_tun() {
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("skipped: needs root to create interfaces");
        }
        let id = std::process::id() % 100_000;
        let [veth, peer, macvlan, tap, tun, bridge] =
            ["v", "p", "m", "t", "u", "b"].map(|kind| format!("gu{kind}{id}"));
        let mut scratch = ScratchLinks(Vec::new());
        scratch.add(&["link", "add", &veth, "type", "veth", "peer", "name", &peer], &veth);
        scratch.add(&["link", "add", &macvlan, "link", &peer, "type", "macvlan"], &macvlan);
        scratch.add(&["tuntap", "add", &tap, "mode", "tap"], &tap);
        scratch.add(&["tuntap", "add", &tun, "mode", "tun"], &tun);
        scratch.add(&["link", "add", &bridge, "type", "bridge"], &bridge);
        for port in [&veth, &macvlan, &tap] {
            ScratchLinks::ip(&["link", "set", port, "master", &bridge]);
        }
        let all = links().expect("rtnetlink answers");
        let find = |name: &str| {
            all.iter()
                .find(|l| l.name == *name)
                .unwrap_or_else(|| panic!("{name} is listed"))
                .clone()
        };
        assert!(find(&veth).is_veth && find(&peer).is_veth, "both ends of a veth pair are veths");
        assert!(!find(&tap).is_veth, "a tap is not a veth");
        assert_eq!(find(&tap).framing(), Some(Framing::Ethernet), "a tap carries Ethernet");
        assert_eq!(find(&tun).link_type, 65534, "a tun is ARPHRD_NONE");
        assert_eq!(find(&tun).framing(), Some(Framing::Ip), "a tun carries IP");

        // The bridge taken for a Docker bridge: its veth port is a container's side, its
        // macvlan and tap ports are uplinks.
        let ours: Vec<Link> =
            all.into_iter().filter(|l| l.name.ends_with(&id.to_string())).collect();
        let uplinks: Vec<String> = select_uplinks(&ours, &BTreeSet::from([bridge.clone()]), &[])
            .into_iter()
            .map(|l| l.name)
            .collect();
        for name in [&peer, &macvlan, &tap, &tun] {
            assert!(uplinks.contains(name), "{name} is an uplink: {uplinks:?}");
        }
        assert!(!uplinks.contains(&veth) && !uplinks.contains(&bridge), "{uplinks:?}");
    }
}
