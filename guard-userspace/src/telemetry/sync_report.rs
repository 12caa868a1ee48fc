//! What one pass of the agent did, as telemetry records it: the pass says what happened (a
//! [`SyncReport`]), and what `/metrics`, `/readyz`, the logs of events and `guard status`
//! read is derived here, so the pass carries no bookkeeping of its own.

use std::{sync::Arc, time::Duration};

use crate::{
    host::interfaces::Link,
    kernel::{attach::Attachments, maps::UpdateError},
    policy::{file::Mode, snapshot::Swarm},
    state::{desired::Desired, doors},
    telemetry::metrics::{AgentState, Attachment},
};

/// One pass that reached the maps, whether or not Docker was asked.
pub struct SyncReport<'a> {
    /// The mode of the policy in force.
    pub mode: Mode,
    /// What the maps were made to hold.
    pub desired: &'a Desired,
    /// The host's interfaces as the pass found them.
    pub links: &'a [Link],
    /// Every program on every interface, after the pass.
    pub attachments: &'a Attachments,
    /// The swarm whose members the pass admitted (None: not in a swarm).
    pub swarm: Option<&'a Swarm>,
    /// Denied sources by where they come from: `policy`, `file`, `cli`, `crowdsec`.
    pub denied: [(&'static str, usize); 4],
    /// Why each interface and hook that should run a program does not, and each network
    /// whose bridge was not found.
    pub unguarded: Vec<String>,
    /// The map updates that failed.
    pub failures: &'a [UpdateError],
    /// Set when the pass put back removed pins: whether every link is attached again.
    pub restored: Option<bool>,
}

impl AgentState {
    /// Takes in what a pass did.
    pub fn record(&mut self, report: &SyncReport) {
        let desired = report.desired;
        self.mode = report.mode;
        let door_names =
            desired.doors.iter().filter_map(|d| Some((d.target, doors::name(d.target)?.into())));
        self.names = desired
            .containers
            .iter()
            .map(|c| (c.target, c.container.name.clone()))
            .chain(door_names)
            .collect();
        self.openings =
            Arc::new(desired.containers.iter().map(|c| (c.target, c.openings.clone())).collect());
        self.ifaces = report.links.iter().map(|l| (l.ifindex, l.name.clone())).collect();
        self.label_errors = desired
            .containers
            .iter()
            .flat_map(|c| {
                c.label_errors.iter().map(|e| (c.container.name.clone(), e.label.clone()))
            })
            .collect();
        self.attachments = report
            .attachments
            .all()
            .map(|(hook, iface, how)| Attachment { hook, iface: iface.to_string(), how })
            .collect();
        self.map_entries = desired.tables.sizes();
        self.doors = desired
            .doors
            .iter()
            .flat_map(|d| {
                let name = doors::name(d.target).unwrap_or("engine");
                d.ports.iter().map(move |(proto, port)| {
                    (name.to_string(), doors::port_name(*proto, *port), d.sources.len())
                })
            })
            .collect();
        self.swarm_nodes = report.swarm.map(|s| s.nodes.len());
        self.denied = report.denied.to_vec();
        self.unguarded = report.unguarded.clone();
        for failure in report.failures {
            *self.update_errors.entry(failure.map).or_default() += 1;
        }
        if let Some(every_link_back) = report.restored {
            self.restoring = !every_link_back;
        }
    }

    /// Takes in how a pass against Docker ended: `took`, when it synced; whether Docker
    /// answered, either way.
    pub fn record_pass(&mut self, took: Option<Duration>, docker_answered: bool) {
        self.docker_connected = docker_answered;
        if let Some(took) = took {
            self.synced = true;
            self.sync_seconds.observe(took.as_secs_f64());
        }
    }
}
