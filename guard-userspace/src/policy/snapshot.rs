//! Docker's state as the agent needs it: plain data, filled by [`crate::host::docker`],
//! consumed by the pure [`crate::state::desired`] computation (and built by hand in its unit
//! tests), and kept on disk by [`crate::host::state_dir`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::policy::{Cidr, Proto};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub networks: Vec<Network>,
    pub containers: Vec<Container>,
    /// The engine's own management ports in use (absent from state saved by older agents).
    #[serde(default)]
    pub doors: EngineDoors,
}

/// The engine's own doors on this host (README, "What it protects"): what the engine
/// listens on besides the ports it publishes for containers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineDoors {
    /// Set while this node is an active member of a swarm.
    pub swarm: Option<Swarm>,
    /// The tcp sockets the engine's own process listens on: its API on tcp.
    pub api: Vec<ApiListener>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swarm {
    /// The overlay's VXLAN port (4789 unless the swarm was created with another).
    pub data_path_port: u16,
    /// This node is a manager: it listens on the control port.
    pub control_port: Option<u16>,
    /// Every node address the engine names (this node's included): the swarm's members.
    pub nodes: BTreeSet<IpAddr>,
    /// An overlay is encrypted: the nodes speak ESP (IPsec) to each other.
    #[serde(default)]
    pub encrypted: bool,
}

/// Swarm's fixed ports.
pub const VXLAN_PORT: u16 = 4789;
pub const GOSSIP_PORT: u16 = 7946;
pub const CONTROL_PORT: u16 = 2377;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ApiListener {
    pub addr: SocketAddr,
    /// It answered plain HTTP: no TLS, so no client certificate stands between whoever
    /// reaches it and root on the host.
    pub plain_text: bool,
}

impl Snapshot {
    /// Whether a network or container of `known` is missing here.
    pub fn lacks_any_of(&self, known: &Snapshot) -> bool {
        known.networks.iter().any(|n| !self.networks.iter().any(|m| m.id == n.id))
            || known.containers.iter().any(|c| !self.containers.iter().any(|d| d.id == c.id))
            || self.doors.lacks_nodes_of(&known.doors)
    }

    /// This snapshot, with every network and container of `known` that it lacks but `again`
    /// (a second snapshot, taken right after) still holds put back, as `again` has it. One
    /// answer that misses something never removes its protection; two that agree do.
    #[must_use]
    pub fn with_unconfirmed_removals(mut self, known: &Snapshot, again: &Snapshot) -> Snapshot {
        for network in &again.networks {
            let lost = known.networks.iter().any(|n| n.id == network.id)
                && !self.networks.iter().any(|n| n.id == network.id);
            if lost {
                self.networks.push(network.clone());
            }
        }
        for container in &again.containers {
            let lost = known.containers.iter().any(|c| c.id == container.id)
                && !self.containers.iter().any(|c| c.id == container.id);
            if lost {
                self.containers.push(container.clone());
            }
        }
        self.doors = self.doors.with_unconfirmed_removals(&known.doors, &again.doors);
        self
    }
}

impl EngineDoors {
    /// Whether the swarm, or one of its nodes, is missing here.
    fn lacks_nodes_of(&self, known: &EngineDoors) -> bool {
        match (&known.swarm, &self.swarm) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(known), Some(now)) => !known.nodes.is_subset(&now.nodes),
        }
    }

    /// As [`Snapshot::with_unconfirmed_removals`]: a node (or the whole swarm) that one
    /// answer misses keeps its place unless `again` misses it too. A swarm whose engine names
    /// no node at all keeps the nodes it had: an empty membership must never mean "drop the
    /// cluster's own traffic" while the node is in a swarm.
    fn with_unconfirmed_removals(mut self, known: &EngineDoors, again: &EngineDoors) -> Self {
        let Some(known_swarm) = &known.swarm else { return self };
        match (&mut self.swarm, &again.swarm) {
            (None, Some(_)) => self.swarm = again.swarm.clone(),
            (Some(now), Some(again)) => {
                let back = known_swarm.nodes.intersection(&again.nodes).copied();
                now.nodes.extend(back.collect::<Vec<_>>());
            }
            _ => {}
        }
        if let Some(now) = &mut self.swarm
            && now.nodes.is_empty()
        {
            now.nodes = known_swarm.nodes.clone();
        }
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    /// The Linux bridge behind a `bridge`-driver network (docker0, br-<id>), if any.
    pub bridge: Option<String>,
    pub subnets: Vec<Cidr>,
    pub gateways: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// Docker's full container id (64 hex digits): the identity policy follows.
    pub id: String,
    pub name: String,
    /// The image as the container was created from it (e.g. `nginx:1.27`).
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Every address the container holds, on every network, both families.
    pub addresses: Vec<IpAddr>,
    pub published: Vec<Published>,
}

/// A host port Docker publishes for a container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Published {
    /// The host address it is bound to; unspecified (0.0.0.0 or ::) means every address of
    /// that family.
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(id: &str) -> Network {
        Network { id: id.into(), name: id.into(), bridge: None, subnets: vec![], gateways: vec![] }
    }

    fn container(id: &str) -> Container {
        Container {
            id: id.into(),
            name: id.into(),
            image: String::new(),
            labels: BTreeMap::new(),
            addresses: vec![],
            published: vec![],
        }
    }

    fn snapshot(networks: &[&str], containers: &[&str]) -> Snapshot {
        Snapshot {
            networks: networks.iter().map(|n| network(n)).collect(),
            containers: containers.iter().map(|c| container(c)).collect(),
            doors: EngineDoors::default(),
        }
    }

    #[test]
    fn a_removal_stands_only_when_two_snapshots_agree() {
        let known = snapshot(&["web", "db"], &["a", "b", "c"]);
        // One answer misses the db network and container b; the next has them again, and
        // container c is gone from both.
        let now = snapshot(&["web"], &["a", "new"]);
        let again = snapshot(&["web", "db"], &["a", "b", "new"]);
        assert!(now.lacks_any_of(&known));
        let agreed = now.with_unconfirmed_removals(&known, &again);
        let ids = |s: &Snapshot| {
            let mut n: Vec<String> = s.networks.iter().map(|n| n.id.clone()).collect();
            let mut c: Vec<String> = s.containers.iter().map(|c| c.id.clone()).collect();
            n.sort();
            c.sort();
            (n, c)
        };
        assert_eq!(
            ids(&agreed),
            (vec!["db".into(), "web".into()], vec!["a".into(), "b".into(), "new".into()])
        );
        // Nothing the agent never knew is added, and agreeing answers change nothing.
        let steady = snapshot(&["web"], &["a"]);
        assert!(!steady.lacks_any_of(&snapshot(&["web"], &["a"])));
        assert_eq!(steady.clone().with_unconfirmed_removals(&known, &steady), steady);
    }

    fn swarm(nodes: &[&str]) -> EngineDoors {
        let nodes = nodes.iter().map(|n| n.parse().unwrap()).collect();
        let swarm =
            Swarm { data_path_port: VXLAN_PORT, control_port: None, nodes, encrypted: false };
        EngineDoors { swarm: Some(swarm), api: vec![] }
    }

    fn nodes(doors: &EngineDoors) -> Vec<String> {
        doors.swarm.as_ref().map_or(vec![], |s| s.nodes.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_node_leaves_only_when_two_answers_agree_and_a_swarm_never_empties() {
        let known = swarm(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let now = swarm(&["10.0.0.1", "10.0.0.4"]);
        assert!(now.lacks_nodes_of(&known));
        let again = swarm(&["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
        let agreed = now.with_unconfirmed_removals(&known, &again);
        assert_eq!(nodes(&agreed), ["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
        // A swarm answer without a single node keeps the known membership.
        let empty = swarm(&[]);
        assert_eq!(nodes(&empty.with_unconfirmed_removals(&known, &swarm(&[]))), nodes(&known));
        // Leaving the swarm stands when two answers agree; one answer is not enough.
        let left = EngineDoors::default();
        assert!(left.lacks_nodes_of(&known));
        assert_eq!(left.clone().with_unconfirmed_removals(&known, &left.clone()), left);
        // Joining needs no confirmation.
        assert!(!known.lacks_nodes_of(&left));
        assert_eq!(nodes(&left.with_unconfirmed_removals(&known, &known)), nodes(&known));
    }
}
