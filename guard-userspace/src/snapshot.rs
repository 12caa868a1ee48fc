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
