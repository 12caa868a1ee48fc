//! `guard run`: load, then keep the maps equal to the desired state until told to stop.
//!
//! Level-triggered: Docker events only wake the loop; every pass takes a fresh snapshot and
//! applies the difference, and a periodic pass repairs whatever an event stream missed.
//!
//! Closed from the start: the agent attaches at once, whether or not Docker answers, with
//! what it last knew (the state directory) and nothing opened until it has synced. While
//! Docker is away it keeps applying what it knew to the interfaces as they come and go (never
//! opening, never emptying), and tries Docker again every
//! [`DOCKER_POLL`](crate::host::docker_link::DOCKER_POLL).
//!
//! One job per file: `start` (checks, load, pin, the tasks beside the loop), `supervisor`
//! (the loop: Docker's connection, backoff, signals), `sync` (one pass: the desired state in
//! the maps and on the interfaces), `watchers` (the tasks that wake the loop).

mod start;
mod supervisor;
mod sync;
mod watchers;

use std::{path::PathBuf, time::Duration};

use crate::{kernel::pins::Pins, kernel::tc_filter::Mechanism, policy::file::Mode};

pub struct RunOptions {
    /// Interfaces to protect; empty means every uplink (see
    /// [`crate::host::interfaces::select_uplinks`]).
    pub ifaces: Vec<String>,
    pub trusted: Vec<String>,
    pub pins: Pins,
    pub resync: Duration,
    /// The policy file (absent is fine: the defaults).
    pub config: PathBuf,
    /// Overrides the file's mode.
    pub mode: Option<Mode>,
    /// Where `/metrics`, `/healthz`, `/drops` and `/access` are served.
    pub metrics_addr: std::net::SocketAddr,
    /// Where the agent keeps what it last knew (see [`crate::host::state_dir`]).
    pub state_dir: PathBuf,
    /// How TC programs go on interfaces; `None`: TCX where the kernel has it.
    pub tc: Option<Mechanism>,
    /// How often the exposure picture is taken again besides after every sync.
    pub scan_interval: Duration,
    /// Where each exposure change is POSTed (`--alert-url`).
    pub alert_url: Option<crate::telemetry::webhook::Target>,
    /// A CrowdSec local API whose bans the agent follows (`--crowdsec-url`).
    pub crowdsec: Option<crate::host::crowdsec::CrowdSec>,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let started = start::start(opts)?;
    supervisor::supervise(started).await
}
