//! Docker's state through its API: a [`Snapshot`] of networks and running containers, and a
//! stream of the events that should wake the reconciler.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use bollard::{
    Docker,
    models::{
        ContainerSummary, EventMessageTypeEnum, LocalNodeState, Network as DockerNetwork,
        PortSummaryTypeEnum,
    },
    query_parameters::{
        EventsOptions, InspectNetworkOptions, ListContainersOptions, ListNetworksOptions,
    },
};
use futures_util::{Stream, StreamExt};

use crate::{
    policy::Proto,
    policy::snapshot::{
        CONTROL_PORT, Container, EngineDoors, Network, Published, Snapshot, Swarm, VXLAN_PORT,
    },
    state::engine_paths::{Engine, EngineFirewall, GatewayMode, NetworkRouting},
};

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker daemon (is dockerd running, and /var/run/docker.sock mounted?): {0}"
    )]
    Connect(#[source] bollard::errors::Error),
    #[error("the Docker daemon accepts connections but does not answer yet (still starting?)")]
    Starting,
    #[error("Docker API call {call} failed: {source}")]
    Api { call: &'static str, source: bollard::errors::Error },
}

/// The bridge network a swarm node's tasks reach the host through.
const GATEWAY_BRIDGE: &str = "docker_gwbridge";

/// How long a daemon may take to answer the first request.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct DockerClient {
    docker: Docker,
}

impl DockerClient {
    /// Connects through DOCKER_HOST or the local socket, at the daemon's API version. A
    /// daemon that is still starting accepts connections before it answers them: that counts
    /// as unreachable after [`CONNECT_TIMEOUT`], so the caller is never held up for long.
    pub async fn connect() -> Result<Self, DockerError> {
        let docker = Docker::connect_with_local_defaults().map_err(DockerError::Connect)?;
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| DockerError::Starting)?
            .map_err(DockerError::Connect)?;
        Ok(DockerClient { docker })
    }

    pub async fn snapshot(&self) -> Result<Snapshot, DockerError> {
        let networks = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await
            .map_err(|source| DockerError::Api { call: "list networks", source })?;
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions { all: false, ..Default::default() }))
            .await
            .map_err(|source| DockerError::Api { call: "list containers", source })?;
        let mut containers: Vec<Container> = containers.iter().filter_map(container).collect();
        self.add_gateway_endpoints(&networks, &mut containers).await;
        Ok(Snapshot {
            networks: networks.iter().map(network).collect(),
            containers,
            // Filled by the agent (see [`crate::host::engine_doors`]).
            doors: EngineDoors::default(),
        })
    }

    /// A swarm task's address on `docker_gwbridge`, where its host-mode published ports are
    /// DNATed: the container's own networks do not list it (only its overlays); the bridge
    /// network's endpoints do, under the container's id.
    async fn add_gateway_endpoints(
        &self,
        networks: &[DockerNetwork],
        containers: &mut [Container],
    ) {
        if !networks.iter().any(|n| n.name.as_deref() == Some(GATEWAY_BRIDGE)) {
            return;
        }
        // Gone since the list (the node left its swarm): no task of it to open.
        let Ok(inspect) = self.docker.inspect_network(GATEWAY_BRIDGE, None).await else {
            return;
        };
        for (id, endpoint) in inspect.containers.unwrap_or_default() {
            let Some(container) = containers.iter_mut().find(|c| c.id == id) else { continue };
            let addresses = [endpoint.ipv4_address, endpoint.ipv6_address];
            for cidr in addresses.iter().flatten() {
                let ip = cidr.split('/').next().and_then(|ip| ip.parse::<IpAddr>().ok());
                if let Some(ip) = ip.filter(|ip| !container.addresses.contains(ip)) {
                    container.addresses.push(ip);
                }
            }
        }
    }

    /// This node's swarm, if it is an active member: its members as the engine names them
    /// and the ports it uses. Managers list every node; every node knows its managers and the
    /// peers of the overlays it is on. A worker is not told the data-path port: it takes
    /// Docker's default.
    pub async fn swarm(&self) -> Result<Option<Swarm>, DockerError> {
        let api = |call| move |source| DockerError::Api { call, source };
        let info = self.docker.info().await.map_err(api("info"))?;
        let Some(swarm) = info.swarm else { return Ok(None) };
        if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
            return Ok(None);
        }
        let mut nodes: BTreeSet<IpAddr> = BTreeSet::new();
        nodes.extend(swarm.node_addr.as_deref().and_then(|a| a.parse::<IpAddr>().ok()));
        let managers = swarm.remote_managers.unwrap_or_default();
        nodes.extend(managers.iter().filter_map(|m| host_of(m.addr.as_deref()?)));
        let mut control_port = None;
        if swarm.control_available == Some(true) {
            let own = managers.iter().find(|m| m.node_id.is_some() && m.node_id == swarm.node_id);
            let own = own.and_then(|m| m.addr.as_deref()?.parse::<SocketAddr>().ok());
            control_port = Some(own.map_or(CONTROL_PORT, |a| a.port()));
            for node in self.docker.list_nodes(None).await.map_err(api("list swarm nodes"))? {
                let status = node.status.and_then(|s| s.addr);
                let manager = node.manager_status.and_then(|m| m.addr);
                nodes.extend(status.as_deref().and_then(host_of));
                nodes.extend(manager.as_deref().and_then(host_of));
            }
        }
        let filters = HashMap::from([("driver".to_string(), vec!["overlay".to_string()])]);
        let options = ListNetworksOptions { filters: Some(filters) };
        let overlays =
            self.docker.list_networks(Some(options)).await.map_err(api("list overlays"))?;
        let encrypted = overlays
            .iter()
            .any(|n| n.options.as_ref().is_some_and(|o| o.contains_key("encrypted")));
        for overlay in overlays.iter().filter_map(|n| n.id.as_deref()) {
            let verbose = InspectNetworkOptions { verbose: true, ..Default::default() };
            // An overlay removed since the list is no error: its peers are gone with it.
            let Ok(inspect) = self.docker.inspect_network(overlay, Some(verbose)).await else {
                continue;
            };
            let peers = inspect.peers.unwrap_or_default();
            nodes.extend(peers.iter().filter_map(|p| host_of(p.ip.as_deref()?)));
        }
        nodes.retain(|ip| !ip.is_unspecified());
        let data_path_port = swarm.cluster.and_then(|c| c.data_path_port).unwrap_or(0);
        let data_path_port = u16::try_from(data_path_port).ok().filter(|p| *p != 0);
        Ok(Some(Swarm {
            data_path_port: data_path_port.unwrap_or(VXLAN_PORT),
            control_port,
            nodes,
            encrypted,
        }))
    }

    /// The engine and its bridge networks' routing options: what decides which paths to a
    /// container its own firewall leaves open (see [`crate::state::engine_paths`]).
    pub async fn firewall(&self) -> Result<EngineFirewall, DockerError> {
        let api = |call| move |source| DockerError::Api { call, source };
        let version = self.docker.version().await.map_err(api("version"))?;
        let components: Vec<(String, String)> = version
            .components
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.name, c.version))
            .collect();
        let engine = Engine::from_version(&components, version.version.as_deref());
        let networks = self
            .docker
            .list_networks(None::<ListNetworksOptions>)
            .await
            .map_err(api("list networks"))?;
        let networks = networks
            .iter()
            .map(|n| {
                let options = n.options.clone().unwrap_or_default();
                let mode =
                    |family| GatewayMode::from_option(options.get(family).map(String::as_str));
                NetworkRouting {
                    name: n.name.clone().unwrap_or_default(),
                    driver: n.driver.clone().unwrap_or_default(),
                    subnets: network(n).subnets,
                    mode_v4: mode("com.docker.network.bridge.gateway_mode_ipv4"),
                    mode_v6: mode("com.docker.network.bridge.gateway_mode_ipv6"),
                    // Docker separates them with colons.
                    trusted_interfaces: options
                        .get("com.docker.network.bridge.trusted_host_interfaces")
                        .map(|t| t.split(':').filter(|i| !i.is_empty()).map(String::from).collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        Ok(EngineFirewall { engine, networks })
    }

    /// Container and network events; each one only means "look again".
    pub fn events(&self) -> impl Stream<Item = Result<(), DockerError>> + use<> {
        let filters =
            HashMap::from([("type".to_string(), vec!["container".into(), "network".into()])]);
        self.docker
            .events(Some(EventsOptions { filters: Some(filters), ..Default::default() }))
            .filter_map(|event| async move {
                match event {
                    Ok(e) => matches!(
                        e.typ,
                        Some(EventMessageTypeEnum::CONTAINER | EventMessageTypeEnum::NETWORK)
                    )
                    .then_some(Ok(())),
                    Err(source) => Some(Err(DockerError::Api { call: "events", source })),
                }
            })
    }
}

/// The address of a swarm node as the engine writes it: `ip`, or `ip:port` for managers.
fn host_of(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| addr.parse()).ok()
}

fn network(n: &DockerNetwork) -> Network {
    let id = n.id.clone().unwrap_or_default();
    let options = n.options.clone().unwrap_or_default();
    let bridge = match options.get("com.docker.network.bridge.name") {
        Some(name) => Some(name.clone()),
        None if n.driver.as_deref() == Some("bridge") => {
            Some(format!("br-{}", id.get(..12).unwrap_or(&id)))
        }
        None => None,
    };
    let configs = n.ipam.as_ref().and_then(|i| i.config.clone()).unwrap_or_default();
    Network {
        name: n.name.clone().unwrap_or_default(),
        bridge,
        subnets: configs.iter().filter_map(|c| c.subnet.as_deref()?.parse().ok()).collect(),
        gateways: configs.iter().filter_map(|c| c.gateway.as_deref()?.parse().ok()).collect(),
        id,
    }
}

fn container(c: &ContainerSummary) -> Option<Container> {
    let id = c.id.clone()?;
    let name = c
        .names
        .as_ref()
        .and_then(|n| n.first())
        .map_or_else(|| id.chars().take(12).collect(), |n| n.trim_start_matches('/').to_string());
    let endpoints = c.network_settings.as_ref().and_then(|s| s.networks.as_ref());
    let addresses: Vec<IpAddr> = endpoints
        .into_iter()
        .flat_map(|eps| eps.values())
        .flat_map(|ep| [ep.ip_address.as_deref(), ep.global_ipv6_address.as_deref()])
        .filter_map(|ip| ip.filter(|s| !s.is_empty())?.parse().ok())
        .collect();
    let published = c.ports.iter().flatten().filter_map(|p| {
        let proto = match p.typ {
            Some(PortSummaryTypeEnum::UDP) => Proto::Udp,
            Some(PortSummaryTypeEnum::SCTP) => Proto::Sctp,
            _ => Proto::Tcp,
        };
        let host_ip =
            p.ip.as_deref().filter(|s| !s.is_empty()).unwrap_or("0.0.0.0").parse().ok()?;
        Some(Published {
            host_ip,
            host_port: p.public_port?,
            container_port: p.private_port,
            proto,
        })
    });
    Some(Container {
        id,
        name,
        image: c.image.clone().unwrap_or_default(),
        labels: c.labels.clone().unwrap_or_default().into_iter().collect::<BTreeMap<_, _>>(),
        addresses,
        published: published.collect(),
    })
}
