//! The test bed most end-to-end tests start from: the test bed held, the host routing, one
//! Docker network and outside hosts that route it via the host. A test adds its containers
//! (locals, or fields of its own bed declared before this one, so that they go first) and its
//! agent; everything goes on drop, in the reverse order, a panicking test included.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::agent::Agent;
use crate::docker::{Container, ContainerSpec, Network};
use crate::host::RoutingHost;
use crate::netns::OutsideHost;
use crate::{Exclusive, prepare_test_bed};

/// What differs between the beds: the network and the outside hosts.
#[derive(Default)]
pub struct BedSpec<'a> {
    /// The Docker network's name (`guard-e2e-` prefixed, for leftover cleanup).
    pub network: &'a str,
    pub subnet_v4: &'a str,
    pub subnet_v6: Option<&'a str>,
    /// Outside hosts as (name, number), each routing the network's subnets via the host.
    pub outside: &'a [(&'a str, u8)],
    pub gateway: Gateway,
}

/// How the network treats what is routed to its containers (Docker 28's gateway modes; on
/// 20.10, which has none, every one is a plain NAT network: see [`Network`]'s constructors).
#[derive(Default, Clone, Copy)]
pub enum Gateway {
    /// The engine's default.
    #[default]
    Nat,
    /// `nat-unprotected`: nothing routed straight to a container is dropped but by guard.
    GuardOnly,
    /// `routed`, IPv4 only: no NAT.
    Routed,
}

/// Field order is drop order: outside hosts, then the network, then the host settings and
/// last the test bed's lock.
pub struct Bed {
    /// The outside hosts, in the order of [`BedSpec::outside`].
    pub outside: Vec<OutsideHost>,
    pub net: Network,
    _routing: RoutingHost,
    _exclusive: Exclusive,
}

impl Bed {
    pub fn new(spec: BedSpec) -> Self {
        let exclusive = prepare_test_bed();
        let routing = RoutingHost::enable();
        let net = match spec.gateway {
            Gateway::Nat => Network::create(spec.network, spec.subnet_v4, spec.subnet_v6),
            Gateway::GuardOnly => {
                Network::create_guard_only(spec.network, spec.subnet_v4, spec.subnet_v6)
            }
            Gateway::Routed => {
                assert!(spec.subnet_v6.is_none(), "a routed bed network is IPv4 only");
                Network::create_routed(spec.network, spec.subnet_v4)
            }
        };
        let subnets: Vec<&str> =
            [Some(spec.subnet_v4), spec.subnet_v6].into_iter().flatten().collect();
        let outside =
            spec.outside.iter().map(|&(name, n)| outside_host(name, n, &subnets)).collect();
        Bed { outside, net, _routing: routing, _exclusive: exclusive }
    }

    /// The usual bed: an IPv4-only network `network` in the engine's default mode, and the
    /// `outside` hosts.
    pub fn nat_v4(network: &str, subnet_v4: &str, outside: &[(&str, u8)]) -> Self {
        Bed::new(BedSpec { network, subnet_v4, outside, ..Default::default() })
    }

    /// A container on the bed's network: `spec` with its network set.
    pub fn run(&self, spec: ContainerSpec) -> Container {
        Container::run(ContainerSpec { network: Some(&self.net), ..spec })
    }

    /// The first outside host.
    pub fn a(&self) -> &OutsideHost {
        &self.outside[0]
    }

    /// The second outside host.
    pub fn b(&self) -> &OutsideHost {
        &self.outside[1]
    }

    /// The host ends of the outside hosts' links: the uplinks an agent guards.
    pub fn uplinks(&self) -> Vec<&str> {
        self.outside.iter().map(OutsideHost::host_end).collect()
    }

    /// An agent on every uplink, with `extra` arguments.
    pub fn agent(&self, extra: &[&str]) -> Agent {
        Agent::start_with(&self.uplinks(), extra)
    }

    /// Like [`Bed::agent`], with `/metrics` on a free loopback port: the agent, and that
    /// address.
    pub fn agent_with_metrics(&self, extra: &[&str]) -> (Agent, SocketAddr) {
        Agent::start_with_metrics(&self.uplinks(), extra)
    }
}

/// Lets a test file's own bed, which holds the common [`Bed`] in its field `base` (its last,
/// so that the file's containers go first), be used as the common one: `bed.a()`,
/// `bed.net`, `bed.agent(..)`.
#[macro_export]
macro_rules! on_the_common_bed {
    ($bed:ty) => {
        impl std::ops::Deref for $bed {
            type Target = $crate::bed::Bed;

            fn deref(&self) -> &Self::Target {
                &self.base
            }
        }
    };
}

/// Outside host `name` numbered `n`, a neighbour that routes `subnets` via the host.
pub fn outside_host(name: &str, n: u8, subnets: &[&str]) -> OutsideHost {
    let host = OutsideHost::new(name, n);
    for subnet in subnets {
        host.route_via_host(subnet);
    }
    host
}

/// An empty policy file `TMP/guard-e2e-TAG-PID.toml` for `--config`, removed on drop.
pub struct PolicyFile(PathBuf);

impl PolicyFile {
    pub fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("guard-e2e-{tag}-{}.toml", std::process::id()));
        fs::write(&path, "").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        PolicyFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a `guard` argument.
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
