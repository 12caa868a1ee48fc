//! Which paths to a container port the engine's own firewall leaves open, so that `guard
//! status` can say what outside hosts really reach once guard lets them (pure; the facts come
//! from [`crate::host::docker::DockerClient::firewall`]).
//!
//! A port guard opens is reachable by two paths: through a host port the engine publishes
//! (DNAT), and by routing straight to the container's address. Engines differ on the second:
//! - Docker before 28 forwards whatever is routed to a container (the seed problem).
//! - Docker 28 and later, on a bridge network in the default gateway mode `nat`, drops it in
//!   its own rules (a raw-table drop per container address, a filter drop per unpublished
//!   port), except published ports from the interfaces the network's
//!   `trusted_host_interfaces` names, and on every interface when the daemon runs with `allow-direct-routing` (which the API does not
//!   show, so the reason says so). `nat-unprotected` forwards everything; `routed` forwards
//!   the container ports Docker publishes and drops the rest; `isolated` has no way out or in.
//! - Podman's netavark forwards everything.
//!
//! Guard's own verdict is the same on both paths: this only says which of them exist.

use std::net::IpAddr;

use serde::Serialize;

use crate::policy::Cidr;

/// The engine, as its `/version` names itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    Docker { version: String },
    Podman { version: String },
}

impl Engine {
    /// From `/version`: Podman lists a component named "Podman Engine"; Docker's engine is
    /// the "Engine" component (or the top-level version, on engines without components).
    pub fn from_version(components: &[(String, String)], version: Option<&str>) -> Engine {
        if let Some((_, v)) = components.iter().find(|(name, _)| name.contains("Podman")) {
            return Engine::Podman { version: v.clone() };
        }
        let engine = components.iter().find(|(name, _)| name == "Engine").map(|(_, v)| v.as_str());
        Engine::Docker { version: engine.or(version).unwrap_or("unknown").to_string() }
    }

    pub fn name(&self) -> String {
        match self {
            Engine::Docker { version } => format!("Docker {version}"),
            Engine::Podman { version } => format!("Podman {version}"),
        }
    }

    /// Docker 28 and later filter what is routed straight to containers.
    fn filters_direct_routing(&self) -> bool {
        match self {
            Engine::Docker { version } => version
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
                .is_some_and(|m| m >= 28),
            Engine::Podman { .. } => false,
        }
    }
}

/// A bridge network's gateway mode for one address family
/// (`com.docker.network.bridge.gateway_mode_ipv4` / `_ipv6`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GatewayMode {
    #[default]
    Nat,
    NatUnprotected,
    Routed,
    Isolated,
}

impl GatewayMode {
    /// Docker's option value; anything it does not know is taken as the default, `nat`.
    pub fn from_option(value: Option<&str>) -> GatewayMode {
        match value {
            Some("nat-unprotected") => GatewayMode::NatUnprotected,
            Some("routed") => GatewayMode::Routed,
            Some("isolated") => GatewayMode::Isolated,
            _ => GatewayMode::Nat,
        }
    }

    fn name(self) -> &'static str {
        match self {
            GatewayMode::Nat => "nat",
            GatewayMode::NatUnprotected => "nat-unprotected",
            GatewayMode::Routed => "routed",
            GatewayMode::Isolated => "isolated",
        }
    }
}

/// What decides the direct path on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkRouting {
    pub name: String,
    /// `bridge`, `macvlan`, `overlay`…: gateway modes are the bridge driver's.
    pub driver: String,
    pub subnets: Vec<Cidr>,
    pub mode_v4: GatewayMode,
    pub mode_v6: GatewayMode,
    /// `com.docker.network.bridge.trusted_host_interfaces`: these reach the published ports
    /// on container addresses directly in `nat` mode.
    pub trusted_interfaces: Vec<String>,
}

/// The engine and its bridge networks, as `status` needs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineFirewall {
    pub engine: Engine,
    pub networks: Vec<NetworkRouting>,
}

/// One way to a container port from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PathReport {
    /// "published" (a host port) or "direct" (the container's own address).
    pub path: &'static str,
    /// `0.0.0.0:8080`, `172.18.0.2:80`.
    pub to: String,
    /// Whether the engine's own rules let it through (guard's verdict is the port's).
    pub open: bool,
    pub why: String,
}

impl EngineFirewall {
    /// The paths to one port of a container with `addresses`, which the engine publishes on
    /// `published` (host address, host port) for that port and protocol.
    pub fn paths(
        &self,
        addresses: &[IpAddr],
        port: u16,
        published: &[(IpAddr, u16)],
    ) -> Vec<PathReport> {
        let mut paths: Vec<PathReport> = published
            .iter()
            .map(|(ip, host_port)| {
                let to = socket(*ip, *host_port);
                if ip.is_loopback() {
                    let why = "bound to loopback: the host only (guard drops what an uplink \
                               sends to loopback addresses)";
                    PathReport { path: "published", to, open: false, why: why.into() }
                } else {
                    let why = format!("{} publishes it", self.engine.name());
                    PathReport { path: "published", to, open: true, why }
                }
            })
            .collect();
        let is_published = !published.is_empty();
        for addr in addresses {
            let network =
                self.networks.iter().find(|n| n.subnets.iter().any(|s| s.contains(*addr)));
            let (open, why) = self.direct(network, addr.is_ipv4(), is_published);
            paths.push(PathReport { path: "direct", to: socket(*addr, port), open, why });
        }
        paths
    }

    fn direct(
        &self,
        network: Option<&NetworkRouting>,
        v4: bool,
        published: bool,
    ) -> (bool, String) {
        let engine = self.engine.name();
        if !self.engine.filters_direct_routing() {
            return (true, format!("{engine} forwards what is routed to its containers"));
        }
        let Some(network) = network else {
            return (true, format!("not on a bridge network of {engine}'s: nothing filters it"));
        };
        if network.driver != "bridge" {
            let why =
                format!("{engine} does not filter {} networks: {}", network.driver, network.name);
            return (true, why);
        }
        let mode = if v4 { network.mode_v4 } else { network.mode_v6 };
        let on = format!("network {} (gateway mode {})", network.name, mode.name());
        // Trusted interfaces reach the published ports on container addresses directly.
        let trusted = !network.trusted_interfaces.is_empty() && published;
        match mode {
            GatewayMode::NatUnprotected => (true, format!("{engine} forwards it: {on}")),
            GatewayMode::Routed if published => {
                (true, format!("{engine} forwards published ports: {on}"))
            }
            GatewayMode::Routed => (false, format!("{engine} drops unpublished ports: {on}")),
            GatewayMode::Isolated => (false, format!("{engine} lets nothing in: {on}")),
            GatewayMode::Nat if trusted => (
                true,
                format!(
                    "{engine} forwards it from {} only (trusted_host_interfaces): {on}",
                    network.trusted_interfaces.join(", ")
                ),
            ),
            GatewayMode::Nat => (
                false,
                format!(
                    "{engine} drops it: {on}, unless its daemon runs with allow-direct-routing"
                ),
            ),
        }
    }
}

fn socket(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        v4 => format!("{v4}:{port}"),
    }
}

/// One word for the table: which paths are open.
pub fn summary(paths: &[PathReport]) -> String {
    let open = |kind| paths.iter().any(|p| p.path == kind && p.open);
    let exists = |kind| paths.iter().any(|p| p.path == kind);
    match (open("published"), open("direct")) {
        (true, true) => "published, direct".into(),
        (true, false) if exists("direct") => "published only (engine drops direct)".into(),
        (true, false) => "published".into(),
        (false, true) => "direct".into(),
        (false, false) => "none (engine drops it)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(mode: GatewayMode, trusted: &[&str]) -> NetworkRouting {
        NetworkRouting {
            name: "web".into(),
            driver: "bridge".into(),
            subnets: vec!["172.18.0.0/16".parse().unwrap(), "fd00:18::/64".parse().unwrap()],
            mode_v4: mode,
            mode_v6: GatewayMode::Nat,
            trusted_interfaces: trusted.iter().map(ToString::to_string).collect(),
        }
    }

    fn docker(version: &str, net: NetworkRouting) -> EngineFirewall {
        EngineFirewall { engine: Engine::Docker { version: version.into() }, networks: vec![net] }
    }

    const ADDR: &str = "172.18.0.2";
    const PUBLIC: (IpAddr, u16) = (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

    fn direct(fw: &EngineFirewall, published: &[(IpAddr, u16)]) -> PathReport {
        let paths = fw.paths(&[ADDR.parse().unwrap()], 80, published);
        paths.into_iter().find(|p| p.path == "direct").expect("a direct path")
    }

    #[test]
    fn docker_28_drops_direct_routing_in_nat_mode_and_older_engines_do_not() {
        let nat = network(GatewayMode::Nat, &[]);
        let d28 = direct(&docker("28.5.2", nat.clone()), &[PUBLIC]);
        assert!(!d28.open, "{d28:?}");
        assert_eq!(d28.to, "172.18.0.2:80");
        assert!(d28.why.contains("gateway mode nat") && d28.why.contains("allow-direct-routing"));
        assert!(direct(&docker("20.10.24+dfsg1", nat.clone()), &[PUBLIC]).open);
        assert!(direct(&docker("27.5.1", nat.clone()), &[]).open);
        let podman = EngineFirewall {
            engine: Engine::Podman { version: "4.3.1".into() },
            networks: vec![nat],
        };
        assert!(direct(&podman, &[]).open);
    }

    #[test]
    fn each_gateway_mode_and_trusted_interfaces_decide_the_direct_path() {
        let open = |mode, trusted: &[&str], published: &[(IpAddr, u16)]| {
            direct(&docker("28.5.2", network(mode, trusted)), published).open
        };
        assert!(open(GatewayMode::NatUnprotected, &[], &[]));
        assert!(open(GatewayMode::Routed, &[], &[PUBLIC]));
        assert!(!open(GatewayMode::Routed, &[], &[]));
        assert!(!open(GatewayMode::Isolated, &[], &[PUBLIC]));
        assert!(open(GatewayMode::Nat, &["eth1"], &[PUBLIC]));
        assert!(!open(GatewayMode::Nat, &["eth1"], &[]), "trusted reach published ports only");
        let macvlan = NetworkRouting { driver: "macvlan".into(), ..network(GatewayMode::Nat, &[]) };
        assert!(direct(&docker("28.5.2", macvlan), &[]).open);
        // IPv6 has a mode of its own; an address on no network the engine names is open.
        let fw = docker("28.5.2", network(GatewayMode::NatUnprotected, &[]));
        let v6 = fw.paths(&["fd00:18::2".parse().unwrap(), "10.9.9.9".parse().unwrap()], 80, &[]);
        assert_eq!(
            v6.iter().map(|p| (p.to.as_str(), p.open)).collect::<Vec<_>>(),
            [("[fd00:18::2]:80", false), ("10.9.9.9:80", true)]
        );
    }

    #[test]
    fn published_paths_and_the_summary() {
        let fw = docker("28.5.2", network(GatewayMode::Nat, &[]));
        let loopback = ("127.0.0.1".parse().unwrap(), 5432);
        let paths = fw.paths(&[ADDR.parse().unwrap()], 80, &[PUBLIC, loopback]);
        let published: Vec<_> =
            paths.iter().filter(|p| p.path == "published").map(|p| (&*p.to, p.open)).collect();
        assert_eq!(published, [("0.0.0.0:8080", true), ("127.0.0.1:5432", false)]);
        assert_eq!(summary(&paths), "published only (engine drops direct)");
        let old = docker("20.10.24", network(GatewayMode::Nat, &[]));
        assert_eq!(
            summary(&old.paths(&[ADDR.parse().unwrap()], 80, &[PUBLIC])),
            "published, direct"
        );
        assert_eq!(summary(&old.paths(&[ADDR.parse().unwrap()], 80, &[])), "direct");
        assert_eq!(
            summary(&fw.paths(&[ADDR.parse().unwrap()], 80, &[loopback])),
            "none (engine drops it)"
        );
    }

    #[test]
    fn the_engine_is_named_by_its_version_answer() {
        let podman = [("Podman Engine".to_string(), "4.3.1".to_string())];
        assert_eq!(
            Engine::from_version(&podman, Some("4.3.1")),
            Engine::Podman { version: "4.3.1".into() }
        );
        let docker = [("Engine".to_string(), "28.5.2".to_string())];
        assert_eq!(
            Engine::from_version(&docker, Some("28.5.2")),
            Engine::Docker { version: "28.5.2".into() }
        );
        assert_eq!(
            Engine::from_version(&[], Some("20.10.24")),
            Engine::Docker { version: "20.10.24".into() }
        );
        assert_eq!(GatewayMode::from_option(Some("bogus")), GatewayMode::Nat);
    }
}
