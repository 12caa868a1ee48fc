//! The seed scenario as a snapshot (the sample Docker world the tests judge), and the
//! builders for containers and published ports that tests extend it with.
//!
//! Shared by this crate's unit tests and by the `tests` crate (the verdict tests, which run
//! the real program on it). `#[cfg(test)]` code is invisible to another crate, and a cargo
//! feature would have to be switched on by every build of the `tests` crate, so this is an
//! ordinary module kept out of the docs: a few constructors of plain data, with no effect on
//! the agent.

use crate::policy::{
    Proto,
    snapshot::{Container, Network, Published, Snapshot},
};

/// The host's address on its uplink: `db` publishes one port on it alone.
pub const HOST: &str = "198.18.0.1";
/// The project network's gateway (a host address too).
pub const GATEWAY: &str = "172.30.0.1";
/// An outside host inside `partner`'s allowed prefix, and the one source `vpn-only` allows.
pub const OUTSIDE_A: &str = "198.18.1.2";
/// An outside host no label names.
pub const OUTSIDE_B: &str = "198.18.2.2";
/// `db`: published (5432/tcp on both families, 5353/udp, 5354/udp on [`HOST`] only), no label.
pub const DB: &str = "172.30.0.2";
/// `api`: neither published nor labelled.
pub const API: &str = "172.30.0.3";
/// `web`: exposes 443/tcp, 53/udp and 9/sctp; publishes 443 (both families), 8443 and 53/udp.
pub const WEB: &str = "172.30.0.4";
pub const WEB6: &str = "fd00:30::4";
/// `partner`: 9000/tcp open to 198.18.1.0/24, published as 19000.
pub const PARTNER: &str = "172.30.0.5";
/// `vpn-only`: every port open to [`OUTSIDE_A`] and 2001:db8:1::/64, nothing published.
pub const VPN_ONLY: &str = "172.30.0.6";

/// The seed scenario: the project network (172.30.0.0/24, fd00:30::/64, bridge `br-n1`) and
/// its five containers (see the address constants for what each opens).
pub fn seed_snapshot() -> Snapshot {
    let mut db = container(1, "db", &[DB], &[]);
    db.published = vec![
        publish("0.0.0.0", 5432, 5432, Proto::Tcp),
        publish("::", 5432, 5432, Proto::Tcp),
        publish("0.0.0.0", 15353, 5353, Proto::Udp),
        publish("::", 15353, 5353, Proto::Udp),
        // Bound to one host address only: docker-proxy's socket takes no broadcast.
        publish(HOST, 15354, 5354, Proto::Udp),
    ];
    let api = container(2, "api", &[API], &[]);
    let mut web = container(3, "web", &[WEB, WEB6], &[("guard.expose", "443/tcp,53/udp,9/sctp")]);
    web.published = vec![
        publish("0.0.0.0", 10443, 443, Proto::Tcp),
        publish("0.0.0.0", 18443, 8443, Proto::Tcp),
        publish("::", 10443, 443, Proto::Tcp),
        publish("0.0.0.0", 10053, 53, Proto::Udp),
    ];
    let mut partner = container(
        4,
        "partner",
        &[PARTNER],
        &[("guard.allow.partner", "9000/tcp from 198.18.1.0/24")],
    );
    partner.published = vec![publish("0.0.0.0", 19000, 9000, Proto::Tcp)];
    let vpn = container(
        5,
        "vpn-only",
        &[VPN_ONLY],
        &[("guard.allow.vpn", "* from 198.18.1.2, 2001:db8:1::/64")],
    );
    Snapshot {
        networks: vec![Network {
            id: "n1".into(),
            name: "project".into(),
            bridge: Some("br-n1".into()),
            subnets: vec!["172.30.0.0/24".parse().unwrap(), "fd00:30::/64".parse().unwrap()],
            gateways: vec![GATEWAY.parse().unwrap(), "fd00:30::1".parse().unwrap()],
        }],
        containers: vec![db, api, web, partner, vpn],
        doors: Default::default(),
    }
}

/// A running container; `n` makes its id (64 hex digits, `n` repeated).
pub fn container(n: u8, name: &str, addrs: &[&str], labels: &[(&str, &str)]) -> Container {
    Container {
        id: format!("{n:02x}").repeat(32),
        name: name.into(),
        image: "busybox".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        published: vec![],
    }
}

/// A port Docker publishes on `host_ip` (`0.0.0.0` or `::`: every host address).
pub fn publish(host_ip: &str, host_port: u16, container_port: u16, proto: Proto) -> Published {
    Published { host_ip: host_ip.parse().unwrap(), host_port, container_port, proto }
}
