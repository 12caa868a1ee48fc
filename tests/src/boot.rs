//! A reboot, as the test bed can stage one: the agent stops and its pins go (bpffs is memory;
//! its state directory stays on disk), dockerd stops with its containers, and the bridges go
//! with it (dockerd creates them again when it starts, before its API answers). Then the test
//! boots the agent, starts dockerd, and measures what an outside host saw.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::agent::Agent;
use crate::cmd;
use crate::docker::{Network, docker};
use crate::dockerd::DockerdOutage;
use crate::prober::{Outcome, ProbeReport};

/// Stops the agent, removes its pins, stops dockerd and deletes the bridges of `networks`.
/// The outage brings dockerd back on drop; boot the agent with [`Agent::boot`] first.
pub fn power_off(agent: &mut Agent, networks: &[&Network]) -> DockerdOutage {
    agent.terminate();
    agent.lose_pins();
    let bridges: Vec<String> = networks.iter().map(|n| bridge_of(n)).collect();
    let outage = DockerdOutage::begin();
    for bridge in bridges {
        cmd::run("ip", &["link", "del", &bridge]);
    }
    outage
}

/// The Linux bridge behind a Docker bridge network: `br-` and the first 12 digits of its id.
pub fn bridge_of(net: &Network) -> String {
    let id = docker(&["network", "inspect", "-f", "{{.Id}}", net.name()]);
    format!("br-{}", &id.trim()[..12])
}

/// When Docker says the container last started (its clock is the host's).
pub fn started_at(container: &str) -> SystemTime {
    let started = docker(&["inspect", "-f", "{{.State.StartedAt}}", container]);
    let seconds = cmd::run("date", &["-d", started.trim(), "+%s.%N"]);
    let seconds: f64 = seconds.trim().parse().expect("date +%s.%N prints seconds");
    UNIX_EPOCH + Duration::from_secs_f64(seconds)
}

/// When the first handshake with `target` completed, by the wall clock, given the wall-clock
/// time the prober started. An attempt sent earlier can complete later, on its retransmitted
/// SYN, so this is the earliest completion, not the earliest send.
pub fn first_completed(
    report: &ProbeReport,
    target: usize,
    origin: SystemTime,
) -> Option<SystemTime> {
    report
        .established(target)
        .iter()
        .filter_map(|a| match a.outcome {
            Outcome::Established(latency) => Some(origin + a.sent + latency),
            _ => None,
        })
        .min()
}
