//! Docker's state as the agent needs it: plain data, filled by [`crate::docker`], consumed by
//! the pure [`crate::desired`] computation (and built by hand in its unit tests), and kept on
//! disk by [`crate::state`].

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::policy::{Cidr, Proto};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub networks: Vec<Network>,
    pub containers: Vec<Container>,
}

impl Snapshot {
    /// Whether a network or container of `known` is missing here.
    pub fn lacks_any_of(&self, known: &Snapshot) -> bool {
        known.networks.iter().any(|n| !self.networks.iter().any(|m| m.id == n.id))
            || known.containers.iter().any(|c| !self.containers.iter().any(|d| d.id == c.id))
    }

    /// This snapshot, with every network and container of `known` that it lacks but `again`
    /// (a second snapshot, taken right after) still holds put back, as `again` has it. One
    /// answer that misses something never removes its protection; two that agree do.
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
}
