//! The host's interfaces and addresses, and which interfaces are uplinks.
//!
//! An uplink is every interface except loopback, Docker's bridges, the container veths
//! enslaved to them, and those the operator trusts. Discovery is re-run on every reconcile, so
//! an interface that appears later is protected and one that vanishes does no harm.

use std::{collections::BTreeSet, fs, io, net::IpAddr, path::Path};

const SYS_CLASS_NET: &str = "/sys/class/net";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    /// The bridge (or bond) this interface is enslaved to.
    pub master: Option<String>,
}

/// Every interface of the host network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    let mut links = Vec::new();
    for entry in fs::read_dir(SYS_CLASS_NET)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        // An interface can vanish between read_dir and here: skip it, the next pass sees truth.
        let Some(ifindex) = read_ifindex(&dir) else {
            continue;
        };
        let master = fs::read_link(dir.join("master"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        links.push(Link { name, ifindex, master });
    }
    links.sort_by_key(|l| l.ifindex);
    Ok(links)
}

fn read_ifindex(dir: &Path) -> Option<u32> {
    fs::read_to_string(dir.join("ifindex")).ok()?.trim().parse().ok()
}

/// Every address the host receives on, on every interface (loopback included; the desired
/// state filters): its unicast addresses, the IPv4 broadcast address of each of its subnets and
/// its IPv6 anycast addresses (a forwarding host answers each prefix's subnet-router anycast
/// address). docker-proxy's wildcard sockets receive on all of them.
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    let ip_of = |sa: &nix::sys::socket::SockaddrStorage| {
        if let Some(v4) = sa.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        }
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for a in addrs {
        ips.extend(a.address.as_ref().and_then(ip_of));
        // Point-to-point links report their peer in the same field: not ours.
        if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_POINTOPOINT) {
            ips.extend(a.broadcast.as_ref().and_then(ip_of).filter(IpAddr::is_ipv4));
        }
    }
    ips.extend(anycast6(&fs::read_to_string(ANYCAST6).unwrap_or_default()));
    ips.sort();
    ips.dedup();
    Ok(ips)
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
        .filter(|l| !l.master.as_ref().is_some_and(|m| docker_bridges.contains(m)))
        .filter(|l| !trusted.contains(&l.name))
        .cloned()
        .collect()
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
        Link { name: name.into(), ifindex, master: master.map(Into::into) }
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
        ];
        let bridges: BTreeSet<String> = ["docker0", "br-0123456789ab"].map(String::from).into();
        let names: Vec<String> = select_uplinks(&links, &bridges, &["wg0".to_string()])
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, ["eth0", "eth1", "br0"]);
    }

    #[test]
    fn named_interfaces_report_the_missing_ones() {
        let links = vec![link("eth0", 2, None), link("h0", 5, None)];
        let (found, missing) = named(&links, &["h0".into(), "nope".into()]);
        assert_eq!(found, vec![link("h0", 5, None)]);
        assert_eq!(missing, vec!["nope".to_string()]);
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
        let links = links().expect("/sys/class/net is readable");
        assert!(links.iter().any(|l| l.name == "lo"));
        let addrs = host_addresses().expect("getifaddrs works");
        assert!(addrs.iter().any(|a| a.is_loopback()));
    }
}
