//! Which Linux bridge carries each of the engine's bridge networks.
//!
//! The gate and the reply memory sit on that bridge, so a network whose bridge is not found
//! is not guarded there. Docker names its bridges (`com.docker.network.bridge.name`, or
//! `br-` and the first 12 digits of the id), but other engines that speak its API do not:
//! Podman's compatible `/networks` answers `"Options": {}` and its bridges are `podman0`,
//! `podman1`… So the engine's name is tried first and the kernel's word after it: the bridge
//! that holds the network's gateway, then the bridge with an address inside its subnet (Docker
//! 28 omits the gateway of a network created without `--gateway`, so the gateway alone is not
//! enough). A bridge network left without one is said aloud, naming what was tried.

use std::net::IpAddr;

use crate::{
    host::interfaces::Link,
    policy::snapshot::{Network, Snapshot},
};

/// How a network's bridge was found, or that it was not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Not a bridge network (host, none, macvlan, overlay…): no bridge to look for.
    NotBridge,
    /// The bridge the engine names exists.
    Named(String),
    /// The bridge that holds one of the network's gateway addresses.
    Gateway(String),
    /// The bridge with an address inside one of the network's subnets.
    Subnet(String),
    /// None: what was tried, for the warning.
    Missing(String),
}

impl Found {
    pub fn bridge(&self) -> Option<&str> {
        match self {
            Found::Named(b) | Found::Gateway(b) | Found::Subnet(b) => Some(b),
            Found::NotBridge | Found::Missing(_) => None,
        }
    }
}

/// The bridge of `network` among `links`, given every interface's addresses (`(interface,
/// address)`). A network is a bridge network when the engine gave or implied a bridge name.
pub fn find(network: &Network, links: &[Link], addrs: &[(String, IpAddr)]) -> Found {
    let Some(named) = &network.bridge else {
        return Found::NotBridge;
    };
    let is_bridge = |name: &str| links.iter().any(|l| l.is_bridge && l.name == name);
    if is_bridge(named) {
        return Found::Named(named.clone());
    }
    let bridge_holding = |wanted: &dyn Fn(IpAddr) -> bool| {
        addrs.iter().find(|(iface, ip)| wanted(*ip) && is_bridge(iface)).map(|(i, _)| i.clone())
    };
    if let Some(b) = bridge_holding(&|ip| network.gateways.contains(&ip)) {
        return Found::Gateway(b);
    }
    if let Some(b) = bridge_holding(&|ip| network.subnets.iter().any(|s| s.contains(ip))) {
        return Found::Subnet(b);
    }
    Found::Missing(tried(network, named))
}

/// What [`find`] looked for, in words.
fn tried(network: &Network, named: &str) -> String {
    let list = |items: Vec<String>| if items.is_empty() { "none".into() } else { items.join(", ") };
    format!(
        "the engine's name {named} (no such bridge), a bridge holding its gateway ({}), a bridge \
         with an address in its subnet ({})",
        list(network.gateways.iter().map(ToString::to_string).collect()),
        list(network.subnets.iter().map(ToString::to_string).collect()),
    )
}

/// `snapshot` with each network's bridge replaced by the one found (None where none is), and in
/// `uncovered`, what to say of every bridge network without one that a container is on. Podman's netavark
/// creates a network's bridge with its first container and removes it with its last, so a
/// network no container uses has none, rightly.
pub fn resolved(
    snapshot: &Snapshot,
    links: &[Link],
    addrs: &[(String, IpAddr)],
    uncovered: &mut Vec<String>,
) -> Snapshot {
    let mut out = snapshot.clone();
    for network in &mut out.networks {
        let found = find(network, links, addrs);
        let in_use = snapshot
            .containers
            .iter()
            .flat_map(|c| &c.addresses)
            .any(|ip| network.subnets.iter().any(|s| s.contains(*ip)));
        if let Found::Missing(tried) = &found
            && in_use
        {
            uncovered.push(format!(
                "network {} ({}): no Linux bridge found, so no gate and no reply memory guard \
                 its containers there; tried {tried}",
                network.name,
                network.id.get(..12).unwrap_or(&network.id),
            ));
        }
        network.bridge = found.bridge().map(String::from);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, is_bridge: bool) -> Link {
        Link {
            name: name.into(),
            ifindex: 1,
            master: None,
            is_veth: false,
            is_bridge,
            link_type: 1,
        }
    }

    fn network(bridge: Option<&str>, subnet: &str, gateway: Option<&str>) -> Network {
        Network {
            id: "0123456789abcdef".into(),
            name: "web".into(),
            bridge: bridge.map(String::from),
            subnets: vec![subnet.parse().expect("a subnet")],
            gateways: gateway.iter().map(|g| g.parse().expect("an address")).collect(),
        }
    }

    fn addr(iface: &str, ip: &str) -> (String, IpAddr) {
        (iface.into(), ip.parse().expect("an address"))
    }

    #[test]
    fn the_engine_s_name_wins_when_that_bridge_exists() {
        let links = [link("docker0", true), link("br-0123456789ab", true)];
        let addrs = [addr("docker0", "172.17.0.1")];
        let n = network(Some("br-0123456789ab"), "172.17.0.0/16", Some("172.17.0.1"));
        assert_eq!(find(&n, &links, &addrs), Found::Named("br-0123456789ab".into()));
    }

    #[test]
    fn podman_s_bridge_is_found_by_its_gateway_address() {
        // Podman's compatible API names no bridge: the guess br-<id> does not exist.
        let links = [link("eth0", false), link("podman0", true), link("podman1", true)];
        let addrs =
            [addr("eth0", "192.0.2.5"), addr("podman0", "10.88.0.1"), addr("podman1", "10.89.0.1")];
        let n = network(Some("br-0123456789ab"), "10.89.0.0/24", Some("10.89.0.1"));
        assert_eq!(find(&n, &links, &addrs), Found::Gateway("podman1".into()));
    }

    #[test]
    fn without_a_gateway_the_subnet_finds_the_bridge() {
        // Docker 28 omits the gateway of a network created without --gateway.
        let links = [link("eth0", false), link("podman1", true)];
        let addrs =
            [addr("eth0", "10.89.0.200"), addr("podman1", "fe80::1"), addr("podman1", "10.89.0.1")];
        let n = network(Some("br-0123456789ab"), "10.89.0.0/24", None);
        // eth0 holds an address in the subnet too, but it is no bridge.
        assert_eq!(find(&n, &links, &addrs), Found::Subnet("podman1".into()));
    }

    #[test]
    fn a_bridge_network_without_a_bridge_says_what_was_tried() {
        let links = [link("eth0", false)];
        let n = network(Some("br-0123456789ab"), "10.89.0.0/24", None);
        let Found::Missing(tried) = find(&n, &links, &[]) else {
            panic!("no bridge should be found");
        };
        assert!(tried.contains("br-0123456789ab") && tried.contains("10.89.0.0/24"), "{tried}");
        // Without containers it has no bridge yet (Podman makes it with the first): quiet.
        let mut warnings = Vec::new();
        let mut snapshot =
            Snapshot { networks: vec![n], containers: vec![], doors: Default::default() };
        let out = resolved(&snapshot, &links, &[], &mut warnings);
        assert_eq!(out.networks[0].bridge, None);
        assert!(warnings.is_empty(), "{warnings:?}");
        // With one, it is said.
        snapshot.containers.push(crate::policy::snapshot::Container {
            id: "c".into(),
            name: "db".into(),
            image: String::new(),
            labels: Default::default(),
            addresses: vec!["10.89.0.10".parse().expect("an address")],
            published: vec![],
        });
        let out = resolved(&snapshot, &links, &[], &mut warnings);
        assert_eq!(out.networks[0].bridge, None);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with("network web (0123456789ab): no Linux bridge"),
            "{warnings:?}"
        );
    }

    #[test]
    fn other_drivers_are_not_looked_for() {
        let n = network(None, "10.0.0.0/24", Some("10.0.0.1"));
        let links = [link("br0", true)];
        let mut warnings = Vec::new();
        assert_eq!(find(&n, &links, &[addr("br0", "10.0.0.1")]), Found::NotBridge);
        let snapshot =
            Snapshot { networks: vec![n], containers: vec![], doors: Default::default() };
        assert_eq!(resolved(&snapshot, &links, &[], &mut warnings).networks[0].bridge, None);
        assert!(warnings.is_empty());
    }
}
