//! The paths to each port of the report that the engine's own rules leave (published,
//! direct), from Docker's view of the container and the engine's routing facts.

use super::ContainerReport;
use crate::{policy::snapshot::Snapshot, state::engine_paths::EngineFirewall};

/// Fills `paths` of every single-port row of a container Docker knows. A range row keeps
/// none: its ports may differ, and each one's paths would repeat the container's.
pub fn add(containers: &mut [ContainerReport], snapshot: &Snapshot, firewall: &EngineFirewall) {
    for report in containers {
        let Some(container) = snapshot.containers.iter().find(|c| c.id.starts_with(&report.id))
        else {
            continue;
        };
        for port in report.ports.iter_mut().filter(|p| p.last_port.is_none()) {
            let published: Vec<_> = container
                .published
                .iter()
                .filter(|p| p.container_port == port.port && p.proto.name() == port.proto)
                .map(|p| (p.host_ip, p.host_port))
                .collect();
            port.paths = firewall.paths(&container.addresses, port.port, &published);
        }
    }
}
