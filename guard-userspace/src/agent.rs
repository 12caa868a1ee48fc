//! `guard run`: load, then keep the maps equal to the desired state until told to stop.
//!
//! Level-triggered: Docker events only wake the loop; every pass takes a fresh snapshot and
//! applies the difference, and a periodic pass repairs whatever an event stream missed.
//!
//! Closed from the start: the agent attaches at once, whether or not Docker answers, with
//! what it last knew (the state directory) and nothing opened until it has synced. While
//! Docker is away it keeps applying what it knew to the interfaces as they come and go (never
//! opening, never emptying), and tries Docker again every [`DOCKER_POLL`].

use aya::maps::RingBuf;
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    events::{self, monotonic_ns, recent::Recent},
    http::{self, Shared},
    metrics::{AgentState, Attachment},
};
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::Ebpf;
use futures_util::StreamExt;
use guard_common::maps::{IFACE_DOCKER, IFACE_INSIDE, IFACE_UPLINK, door};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tracing::{error, info, warn};

use crate::{
    attach::Attachments,
    bans::{BanStore, DenySources},
    bridges,
    desired::{Desired, desired_state},
    docker::{DockerClient, DockerError},
    docker_link::{DOCKER_POLL, DockerLink},
    doors,
    engine_doors::EngineDoorsWatch,
    hook::{Class, Hook},
    identities::Identities,
    interfaces::{self, Framing, Link},
    kernel, loader,
    maps::PolicyMaps,
    pins::{Owner, Pins},
    policy_file::{self, Mode, PolicyFile},
    repin::MapHandles,
    snapshot::{EngineDoors, Snapshot, Swarm},
    state::{Saved, StateDir},
    tables::diff,
    tc_filter::Mechanism,
};

pub struct RunOptions {
    /// Interfaces to protect; empty means every uplink (see [`interfaces::select_uplinks`]).
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
    /// Where the agent keeps what it last knew (see [`crate::state`]).
    pub state_dir: PathBuf,
    /// How TC programs go on interfaces; `None`: TCX where the kernel has it.
    pub tc: Option<Mechanism>,
    /// How often the exposure picture is taken again besides after every sync.
    pub scan_interval: Duration,
    /// Where each exposure change is POSTed (`--alert-url`).
    pub alert_url: Option<crate::webhook::Target>,
    /// A CrowdSec local API whose bans the agent follows (`--crowdsec-url`).
    pub crowdsec: Option<crate::crowdsec::CrowdSec>,
}

/// How often the swarm's membership is asked while the node is in one.
const SWARM_POLL: Duration = Duration::from_secs(1);

/// Longest wait between attempts to reconcile after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Everything that can be wrong with the arguments is checked before anything is loaded, so
    // a start that fails leaves nothing behind. Nothing about Docker or the policy file can
    // stop the start: without the agent, a fresh boot has no protection at all.
    let links = interfaces::links()?;
    if !opts.ifaces.is_empty() {
        let (_, missing) = interfaces::named(&links, &opts.ifaces);
        if !missing.is_empty() {
            bail!("no interface named {} (see `ip link`)", missing.join(", "));
        }
    }
    let both: Vec<&str> =
        opts.trusted.iter().filter(|t| opts.ifaces.contains(t)).map(String::as_str).collect();
    if !both.is_empty() {
        bail!(
            "{} is both --iface (guard it) and --trust-iface (never filter it): name it once",
            both.join(", ")
        );
    }
    let (_, absent) = interfaces::named(&links, &opts.trusted);
    for name in absent {
        warn!(iface = %name, "--trust-iface names no interface (see `ip link`); it is trusted once it appears");
    }
    kernel::require()?;
    let tc = kernel::tc_mechanism(opts.tc)?;
    let state = StateDir::new(&opts.state_dir);
    let bans = BanStore::new(&opts.state_dir);
    // CrowdSec's bans, as its follower (started below) holds them.
    let mut crowdsec_decisions = None;
    if let Some(config) = opts.crowdsec.clone() {
        // What was followed last stands until the local API answers (fail closed).
        let kept = crate::bans::saved_crowdsec(&opts.state_dir);
        let (decisions, follower) = tokio::sync::watch::channel(kept);
        tokio::spawn(crate::crowdsec::follow(config, decisions));
        crowdsec_decisions = Some(follower);
    }
    let mut crowdsec_changes = crowdsec_decisions.clone();
    let saved = state.load().unwrap_or_else(|e| {
        warn!("{e}");
        None
    });
    let start = StartPolicy::choose(&opts, saved.as_ref());
    let listener = http::bind(opts.metrics_addr)?;

    let mut ebpf = loader::load(&opts.pins)?;
    // Before anything pinned is touched: two agents on one pin directory would undo each
    // other's map entries every pass. Loading alone changed nothing.
    let owner = opts.pins.claim()?;
    pin_programs(&mut ebpf, &opts.pins)?;
    let handles = MapHandles::open(&opts.pins)?;
    if let Err(e) = state.create() {
        warn!("{e}; protecting without it");
    }
    let maps = PolicyMaps::from_ebpf(&mut ebpf)?;
    let events =
        ebpf.take_map(guard_common::maps::EVENTS).context("the object has no event ring")?;
    let events = RingBuf::try_from(events)?;
    // A previous agent's protection is in force when its maps hold state or its links are
    // pinned (an upgrade to another map layout starts with new, empty maps).
    let pinned = maps.read()?;
    let maps_adopted = !pinned.identities.is_empty() || !pinned.networks.is_empty();
    let links_pinned = opts.pins.pinned_links().is_ok_and(|links| !links.is_empty());
    let ids = Identities::adopt(pinned.identities);
    let shared = Arc::new(Shared {
        state: Mutex::new(AgentState {
            mode: start.policy.mode,
            config_valid: start.valid,
            ..Default::default()
        }),
        drops: Recent::new(),
        access: Recent::new(),
        pins: opts.pins.clone(),
        heartbeat: Mutex::new(Instant::now()),
        stale_after: opts.resync * 3 + MAX_BACKOFF,
        exposures: Arc::default(),
    });
    http::start(listener, shared.clone(), http::Limits::default())?;
    tokio::spawn(events::ring::consume(events, shared.clone()));
    tokio::spawn(renew_event_budgets(opts.pins.clone()));
    let webhook = opts.alert_url.clone().and_then(crate::webhook::Webhook::start_or_say);
    let scans = crate::alerts::ScanOptions {
        pins: opts.pins.clone(),
        config: opts.config.clone(),
        state_dir: opts.state_dir.clone(),
        interval: opts.scan_interval,
    };
    tokio::spawn(crate::alerts::keep_current(scans, shared.exposures.clone(), webhook));
    info!(addr = %opts.metrics_addr, "serving /metrics, /healthz, /drops and /access");
    let known = saved.map(|s| s.snapshot).unwrap_or_default();
    let mut agent = Agent {
        ebpf,
        _owner: owner,
        handles,
        maps,
        ids,
        attachments: Attachments::new(tc),
        opts,
        warnings: Warnings::default(),
        attach_errors: Warnings::default(),
        policy: start.policy,
        policy_text: start.text,
        closed: start.closed,
        state,
        last_saved: None,
        save_failing: false,
        saved_policy: start.saved_text,
        known,
        adopted: links_pinned || maps_adopted,
        maps_adopted,
        changed: true,
        deny: DenySources::new(crowdsec_decisions.clone()),
        bans,
        synced: false,
        shared: shared.clone(),
        engine: EngineDoorsWatch::default(),
        doors_unknown: false,
        door_errors: Warnings::default(),
    };

    let wake = Arc::new(Notify::new());
    let docker_back = Arc::new(Notify::new());
    tokio::spawn(follow_docker_events(wake.clone(), docker_back.clone()));
    // Bound before the first pass, so a link that appears during it is not missed: the socket
    // queues what happens until the task reads it.
    tokio::spawn(follow_interface_changes(interfaces::change_notifications(), wake.clone()));
    tokio::spawn(watch_pins(agent.opts.pins.clone(), wake.clone()));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let mut docker = DockerLink::default();
    // While Docker cannot be asked, a pass applies what the agent last knew (closed until it
    // has synced): it runs at start and whenever interfaces change, so uplinks and Docker's
    // bridges (which dockerd creates before its API answers) are guarded at once.
    let mut offline_pass_due = true;
    let mut announced = false;
    // And every resync interval, as when Docker answers: an interface change the netlink
    // socket lost (ENOBUFS) is seen then.
    let mut last_offline_pass = Instant::now();
    // Failed reconciles back off; wake-ups in between (a burst of events as a daemon stops) do
    // not count as attempts, so they cannot inflate the delay.
    let mut backoff = Backoff::default();
    loop {
        *shared.heartbeat.lock().expect("not poisoned") = Instant::now();
        docker.try_connect();
        match &docker.client {
            Some(client) if backoff.due() => {
                let started = Instant::now();
                let result = agent.reconcile(client).await;
                let mut state = shared.state.lock().expect("not poisoned");
                state.docker_connected = result
                    .as_ref()
                    .map_or_else(|e| e.downcast_ref::<DockerError>().is_none(), |()| true);
                if result.is_ok() {
                    state.synced = true;
                    state.sync_seconds.observe(started.elapsed().as_secs_f64());
                }
                drop(state);
                match result {
                    Ok(()) => {
                        backoff.succeeded();
                        if agent.changed || !agent.synced {
                            shared.exposures.after_sync();
                        }
                        if !agent.synced {
                            agent.synced = true;
                            tell_systemd_ready();
                            info!(pin_dir = %agent.opts.pins.root().display(), "initial sync complete");
                            agent.summarise();
                            // Every link runs this build's program (and maps) now: maps of
                            // another layout, left by an agent of another version, serve
                            // nothing.
                            drop_other_layouts(&agent.opts.pins);
                        }
                    }
                    Err(e) => {
                        let delay = backoff.failed();
                        warn!(
                            "reconcile failed: {e:#}; retrying in {delay:?}, protection unchanged"
                        );
                        if e.downcast_ref::<DockerError>().is_some() {
                            docker.lost();
                            offline_pass_due = true;
                        }
                    }
                }
            }
            Some(_) => {}
            // Adopted maps keep protecting as they are while the first answer from Docker is
            // awaited: a healthy daemon answers within milliseconds, and closing first would
            // interrupt every exposed service on each restart of the agent.
            None if (offline_pass_due || last_offline_pass.elapsed() >= agent.opts.resync)
                && (docker.heard_back || !agent.adopted) =>
            {
                offline_pass_due = false;
                last_offline_pass = Instant::now();
                match agent.apply_known() {
                    Ok(()) if !agent.synced && !announced => {
                        announced = true;
                        info!(
                            "guarding before Docker answers: nothing is opened until the agent has synced"
                        );
                        tell_systemd_ready();
                    }
                    Ok(()) => {}
                    Err(e) => warn!(
                        "applying the last known state failed: {e:#}; retrying on the next change"
                    ),
                }
            }
            None => {}
        }
        // In a swarm, membership is asked every second: a node that joins is admitted to the
        // overlay within a second of the engine knowing it (workers get no event for it).
        let resync = if agent.known.doors.swarm.is_some() {
            agent.opts.resync.min(SWARM_POLL)
        } else {
            agent.opts.resync
        };
        let wait = match docker.client {
            None => docker.until_next_attempt(),
            Some(_) => backoff.remaining().unwrap_or(resync),
        };
        // A ban ends on time: the pass after it lifts it.
        let until_ban_ends = agent.deny.next_expiry.map(|at| {
            Duration::from_secs(at.saturating_sub(crate::bans::now())) + Duration::from_millis(50)
        });
        let wait = until_ban_ends.map_or(wait, |until| wait.min(until));
        tokio::select! {
            ended = docker.attempt_ended() => docker.settle(ended, agent.synced),
            () = wake.notified() => offline_pass_due = true,
            // CrowdSec added or deleted a ban: a pass puts it in force.
            () = decisions_changed(&mut crowdsec_changes) => offline_pass_due = true,
            // The event stream reached Docker again: try at once, whatever the backoff says.
            () = docker_back.notified() => backoff.succeeded(),
            () = tokio::time::sleep(wait) => {}
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the policy file");
                offline_pass_due = true;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let _ = agent.maps.renew_event_budget(monotonic_ns(), true);
    info!("stopping; the pinned program and maps keep protecting (`guard unload` removes them)");
    Ok(())
}

/// When the followed decisions change; never without a follower (or once it has stopped).
async fn decisions_changed(
    follower: &mut Option<tokio::sync::watch::Receiver<crate::crowdsec::Bans>>,
) {
    if let Some(decisions) = follower
        && decisions.changed().await.is_ok()
    {
        return;
    }
    *follower = None;
    std::future::pending::<()>().await;
}

/// The policy the agent starts with. A file that does not parse never means no protection:
/// the last file that parsed (kept in the state directory) is used, or, without one,
/// everything stays closed; either way the error is logged with its line and column,
/// `guard_config_valid` is 0 and `/readyz` is not ready until the file is fixed.
struct StartPolicy {
    policy: PolicyFile,
    /// The file's text as read (what a reload compares against).
    text: Option<String>,
    /// The text of the policy in force, as the state directory keeps it.
    saved_text: Option<String>,
    valid: bool,
    closed: bool,
}

impl StartPolicy {
    fn choose(opts: &RunOptions, saved: Option<&Saved>) -> StartPolicy {
        let read = read_policy_text(&opts.config);
        let error = match &read {
            Ok(text) => match parse_policy(opts, text.as_deref()) {
                Ok(policy) => {
                    if text.is_none() {
                        let default = opts.config.as_path() == Path::new(policy_file::DEFAULT_PATH);
                        let config = opts.config.display();
                        if default {
                            info!(%config, "no policy file: labels alone decide what is open");
                        } else {
                            warn!(%config, "no policy file at this --config path: labels alone decide what is open");
                        }
                    }
                    info!(config = %opts.config.display(), mode = %policy.mode, rules = policy.rules.len(), "policy loaded");
                    let text = text.clone();
                    return StartPolicy {
                        policy,
                        saved_text: text.clone(),
                        text,
                        valid: true,
                        closed: false,
                    };
                }
                Err(e) => e,
            },
            Err(e) => anyhow::anyhow!("{e:#}"),
        };
        error!("{error:#}");
        let text = read.ok().flatten();
        let last_good = saved.and_then(|s| {
            parse_policy(opts, s.policy_text.as_deref()).ok().map(|p| (p, s.policy_text.clone()))
        });
        match last_good {
            Some((policy, saved_text)) => {
                error!(
                    state = %opts.state_dir.display(),
                    "running with the last policy file that parsed until this one is fixed"
                );
                StartPolicy { policy, text, saved_text, valid: false, closed: false }
            }
            None => {
                error!(
                    "no earlier policy file is known: every container stays closed until the file is fixed"
                );
                let mut policy = PolicyFile::default();
                if let Some(mode) = opts.mode {
                    policy.mode = mode;
                }
                StartPolicy { policy, text, saved_text: None, valid: false, closed: true }
            }
        }
    }
}

/// Tells systemd (`Type=notify`) that the agent guards: the maps hold what it knows and the
/// programs are attached, so docker.service, ordered after it, starts only now. Nothing when
/// not run by systemd; a second call is harmless.
fn tell_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(e) => return warn!("telling systemd the agent is ready: {e}"),
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    // A leading '@' names an abstract socket.
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(b"READY=1", &addr)),
        None => socket.send_to(b"READY=1", &path),
    };
    if let Err(e) = sent {
        warn!("telling systemd the agent is ready ({}): {e}", path.to_string_lossy());
    }
}

struct Agent {
    ebpf: Ebpf,
    /// The claim on the pin directory (taken again when the directory is restored).
    _owner: Owner,
    /// What it takes to pin the maps again if their pins are removed under the agent.
    handles: MapHandles,
    maps: PolicyMaps,
    ids: Identities,
    attachments: Attachments,
    opts: RunOptions,
    warnings: Warnings,
    /// Interfaces and hooks that could not be attached, said once each while they last.
    attach_errors: Warnings,
    policy: PolicyFile,
    /// The file's text when `policy` was parsed from it (None: absent).
    policy_text: Option<String>,
    /// No policy that parsed is known (a broken file at the first start): nothing is opened.
    closed: bool,
    state: StateDir,
    /// What was last written to the state directory (None: nothing yet by this agent).
    last_saved: Option<Saved>,
    /// Whether writing the state failed last time (it is said once).
    save_failing: bool,
    /// The text of the policy in force, as last saved.
    saved_policy: Option<String>,
    /// Docker's state as last seen (from the state directory until the first sync).
    known: Snapshot,
    /// Whether a previous agent's protection was in force at start (its links or maps).
    adopted: bool,
    /// Whether the maps were a previous agent's, holding its last sync.
    maps_adopted: bool,
    /// Whether the maps have held Docker's state since this agent started.
    synced: bool,
    /// The deny files and bans, as last read.
    deny: DenySources,
    /// `guard ban`'s bans, in the state directory.
    bans: BanStore,
    /// Whether the last pass wrote a map entry or changed an attachment: only then can what
    /// the network reaches have changed (the exposure scan runs again).
    changed: bool,
    /// What `/metrics` and the drop log read.
    shared: Arc<Shared>,
    /// Finds the engine's own doors (its swarm, its API on tcp).
    engine: EngineDoorsWatch,
    /// The engine would not say what its doors are (said once; the last known stand).
    doors_unknown: bool,
    /// The engine's doors that are open beyond what the policy can fix, said once each.
    door_errors: Warnings,
}

impl Agent {
    /// Re-reads the policy file; a changed file that parses replaces the policy, one that
    /// does not is reported and the policy in force stays.
    fn reload_policy(&mut self) {
        let text = match read_policy_text(&self.opts.config) {
            Ok(text) => text,
            Err(e) => return warn!("{e:#}; keeping the policy in force"),
        };
        if text == self.policy_text {
            return;
        }
        // A file that vanishes (a botched deploy, a volume that did not mount) must not
        // quietly drop its rules: the policy in force stays until a file is back.
        if text.is_none() {
            warn!(config = %self.opts.config.display(), "the policy file is gone; keeping the policy in force until it is back");
            self.policy_text = None;
            return;
        }
        match parse_policy(&self.opts, text.as_deref()) {
            Ok(policy) => {
                info!(mode = %policy.mode, rules = policy.rules.len(), "policy file changed: reloaded");
                let mut state = self.shared.state.lock().expect("not poisoned");
                state.reloads_ok += 1;
                state.config_valid = true;
                self.policy = policy;
                self.policy_text = text.clone();
                self.saved_policy = text;
                self.closed = false;
            }
            Err(e) => {
                warn!("{e:#}; keeping the policy in force");
                let mut state = self.shared.state.lock().expect("not poisoned");
                state.reloads_failed += 1;
                state.config_valid = false;
                // Report a broken file once, not on every pass.
                self.policy_text = text;
            }
        }
    }

    async fn reconcile(&mut self, docker: &DockerClient) -> anyhow::Result<()> {
        self.reload_policy();
        let snapshot = self.agreeing_snapshot(docker).await?;
        if snapshot.doors.swarm != self.known.doors.swarm || !self.synced {
            say_swarm(snapshot.doors.swarm.as_ref());
        }
        self.apply(&snapshot, true)?;
        self.known = snapshot;
        self.save_state();
        Ok(())
    }

    /// Docker's state, where nothing the agent knew has vanished on the word of one answer: a
    /// network or container missing from a snapshot is dropped only when a second snapshot,
    /// taken at once, agrees (a destroyed one is gone from both).
    async fn agreeing_snapshot(&mut self, docker: &DockerClient) -> Result<Snapshot, DockerError> {
        let mut now = docker.snapshot().await?;
        now.doors = self.engine_doors(docker).await;
        if !self.synced || !now.lacks_any_of(&self.known) {
            return Ok(now);
        }
        let mut again = docker.snapshot().await?;
        again.doors = self.engine_doors(docker).await;
        Ok(now.with_unconfirmed_removals(&self.known, &again))
    }

    /// The engine's doors as it names them now; where it does not answer (a manager that
    /// lost its quorum cannot list nodes), the ones last known: a swarm's own traffic is never
    /// dropped because a question went unanswered.
    async fn engine_doors(&mut self, docker: &DockerClient) -> EngineDoors {
        match self.engine.doors(docker).await {
            Ok(doors) => {
                if self.doors_unknown {
                    info!("the engine names its swarm and listeners again");
                }
                self.doors_unknown = false;
                doors
            }
            Err(e) => {
                if !self.doors_unknown {
                    warn!("{e}; the engine's doors stay guarded as last known");
                }
                self.doors_unknown = true;
                self.known.doors.clone()
            }
        }
    }

    /// While Docker cannot be asked: what the agent last knew, on the interfaces as they are
    /// now. Before the first sync everything in it is closed.
    fn apply_known(&mut self) -> anyhow::Result<()> {
        self.reload_policy();
        let known = std::mem::take(&mut self.known);
        let result = self.apply(&known, self.synced);
        self.known = known;
        result
    }

    /// Keeps the state directory equal to what the agent knows, writing only on change.
    fn save_state(&mut self) {
        let saved = Saved::new(&self.known, self.saved_policy.clone());
        if self.last_saved.as_ref() == Some(&saved) {
            return;
        }
        match self.state.save(&saved) {
            Ok(()) => {
                self.last_saved = Some(saved);
                self.save_failing = false;
            }
            // Said once until it works again, not on every pass.
            Err(e) if !self.save_failing => {
                self.save_failing = true;
                warn!("{e}; a restart or reboot will not start from the current state");
            }
            Err(_) => {}
        }
    }

    /// Makes maps and attachments match `snapshot` under the policy in force. `synced`: the
    /// snapshot is Docker's word since this agent started; otherwise nothing is opened.
    fn apply(&mut self, snapshot: &Snapshot, synced: bool) -> anyhow::Result<()> {
        let restoring = self.restore_pins()?;
        let links = interfaces::links().context("listing interfaces")?;
        let host_addrs = interfaces::host_addresses().context("listing host addresses")?;

        let mut desired = if !synced && self.maps_adopted {
            // The pins outlived the previous agent: its maps hold its last sync, more surely
            // than the state directory (which an upgrade from an agent without one lacks).
            Desired { tables: self.maps.read()?, ..Desired::default() }
        } else {
            let targets = self.ids.assign(snapshot.containers.iter().map(|c| c.id.as_str()));
            desired_state(snapshot, &host_addrs, &targets, &self.policy)
        };
        if !synced || self.closed {
            desired.tables.close_openings();
        }
        let mut warnings = Vec::new();
        // Held until the maps are written: a `guard ban` made meanwhile is never undone.
        let (denied, ban_lock) =
            self.deny.gather(&self.policy.deny_files, &self.bans, &mut warnings);
        // Read under the lock, when there is one: what `guard ban` wrote is in it.
        let kernel = self.maps.read()?;
        desired.tables.deny(denied);
        if ban_lock.is_none() {
            desired.tables.keep_denied(&kernel);
        }
        for policy in &desired.containers {
            for error in &policy.label_errors {
                warnings.push(error.warning(&policy.container.name));
            }
        }

        // The engine's bridge names are a guess where it gives none (Podman): the kernel says.
        let iface_addrs = interfaces::interface_addresses().context("listing addresses")?;
        // A network without its bridge has no gate: said once, and not ready while it lasts.
        let mut uncovered = Vec::new();
        let snapshot = &bridges::resolved(snapshot, &links, &iface_addrs, &mut uncovered);
        warnings.extend(uncovered.iter().cloned());
        let docker_bridges = docker_bridges(&links, snapshot);
        let uplinks = self.uplinks(&links, &docker_bridges, &mut warnings);
        let bridges: Vec<Link> =
            links.iter().filter(|l| docker_bridges.contains(&l.name)).cloned().collect();
        let known_bridges: BTreeSet<String> =
            snapshot.networks.iter().filter_map(|n| n.bridge.clone()).collect();
        desired.tables.uplinks = interface_roles(&links, &uplinks, &docker_bridges, &known_bridges);

        // Maps before links: a new link must never run against maps that are still empty.
        let plan = diff(&kernel, &desired.tables);
        let mut failures = Vec::new();
        if !plan.is_empty() {
            failures = self.maps.apply(&plan);
            info!(changes = plan.change_count(), failed = failures.len(), synced, "maps updated");
            warnings.extend(failures.iter().map(ToString::to_string));
        }
        let counted =
            desired.tables.identities.keys().chain(desired.doors.iter().map(|d| &d.target));
        self.maps.forget_drops(&counted.copied().collect());

        let pins = &self.opts.pins;
        let attached_before: Vec<_> =
            self.attachments.all().map(|(h, i, a)| (h, i.to_string(), a)).collect();
        let mut errors = Vec::new();
        for hook in Hook::ALL {
            let on = match hook.class() {
                Class::Uplink => &uplinks,
                Class::Bridge => &bridges,
            };
            errors.extend(self.attachments.sync(&mut self.ebpf, hook, pins, on));
        }
        let attached_now: Vec<_> =
            self.attachments.all().map(|(h, i, a)| (h, i.to_string(), a)).collect();
        self.changed = !plan.is_empty() || attached_before != attached_now || !errors.is_empty();
        self.warnings.report(warnings);
        self.door_errors
            .report_errors(doors::unsafe_listeners(&snapshot.doors, &self.policy.management));
        // What could not be attached is not guarded: an error, and not ready, until it is.
        let unguarded: Vec<String> = errors.iter().map(ToString::to_string).collect();
        self.attach_errors.report_errors(unguarded.clone());

        let mut state = self.shared.state.lock().expect("not poisoned");
        state.mode = self.policy.mode;
        let door_names =
            desired.doors.iter().filter_map(|d| Some((d.target, doors::name(d.target)?.into())));
        state.names = desired
            .containers
            .iter()
            .map(|c| (c.target, c.container.name.clone()))
            .chain(door_names)
            .collect();
        state.openings =
            Arc::new(desired.containers.iter().map(|c| (c.target, c.openings.clone())).collect());
        state.ifaces = links.iter().map(|l| (l.ifindex, l.name.clone())).collect();
        state.label_errors = desired
            .containers
            .iter()
            .flat_map(|c| {
                c.label_errors.iter().map(|e| (c.container.name.clone(), e.label.clone()))
            })
            .collect();
        state.attachments = self
            .attachments
            .all()
            .map(|(hook, iface, how)| Attachment { hook, iface: iface.to_string(), how })
            .collect();
        state.map_entries = desired.tables.sizes();
        state.doors = desired
            .doors
            .iter()
            .flat_map(|d| {
                let name = doors::name(d.target).unwrap_or("engine");
                d.ports.iter().map(move |(proto, port)| {
                    (name.to_string(), doors::port_name(*proto, *port), d.sources.len())
                })
            })
            .collect();
        state.swarm_nodes = snapshot.doors.swarm.as_ref().map(|s| s.nodes.len());
        let (in_files, banned, crowdsec) = self.deny.counts();
        state.denied = vec![
            ("policy", self.policy.deny.len()),
            ("file", in_files),
            ("cli", banned),
            ("crowdsec", crowdsec),
        ];
        state.unguarded = unguarded.into_iter().chain(uncovered).collect();
        for failure in &failures {
            *state.update_errors.entry(failure.map).or_default() += 1;
        }
        if restoring {
            state.restoring = !errors.is_empty();
            if errors.is_empty() {
                error!(pin_dir = %pins.root().display(), "protection restored: maps and programs pinned again, every link attached afresh");
            }
        }
        Ok(())
    }

    /// One line, once synced, that says what the agent guards.
    fn summarise(&self) {
        let state = self.shared.state.lock().expect("not poisoned");
        let on = |hook: Hook| -> Vec<String> {
            state
                .attachments
                .iter()
                .filter(|a| a.hook == hook)
                .map(|a| format!("{} ({})", a.iface, a.how.label()))
                .collect()
        };
        info!(
            uplinks = %on(Hook::Xdp).join(", "),
            bridges = %on(Hook::BridgeGate).join(", "),
            mode = %state.mode,
            containers = state.names.keys().filter(|t| !door::is_door(**t)).count(),
            engine_doors = %state.names.iter().filter(|(t, _)| door::is_door(**t)).map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", "),
            label_errors = state.label_errors.len(),
            config = %self.opts.config.display(),
            "guarding"
        );
    }

    /// Puts back the pins if someone removed them under the agent (`guard unload --force`):
    /// the links went with them, so nothing filters until the next attach. Says so loudly,
    /// counts it and holds `/readyz` at 503 until every link is back. Whether it restored.
    fn restore_pins(&mut self) -> anyhow::Result<bool> {
        let pins = &self.opts.pins;
        if self.handles.intact(pins) {
            return Ok(false);
        }
        error!(
            pin_dir = %pins.root().display(),
            "the pins were removed under the running agent (guard unload --force?): protection was lost; restoring it"
        );
        {
            let mut state = self.shared.state.lock().expect("not poisoned");
            state.protection_lost += 1;
            state.restoring = true;
        }
        self.handles.restore(pins)?;
        pin_programs(&mut self.ebpf, pins)?;
        // The claim was on the directory that was removed.
        self._owner = pins.claim()?;
        Ok(true)
    }

    fn uplinks(
        &self,
        links: &[Link],
        docker_bridges: &BTreeSet<String>,
        warnings: &mut Vec<String>,
    ) -> Vec<Link> {
        if self.opts.ifaces.is_empty() {
            let trusted: Vec<String> =
                self.opts.trusted.iter().chain(&self.policy.trusted_interfaces).cloned().collect();
            return interfaces::select_uplinks(links, docker_bridges, &trusted);
        }
        let (found, missing) = interfaces::named(links, &self.opts.ifaces);
        for name in missing {
            warnings
                .push(format!("interface {name} is gone; it will be protected when it returns"));
        }
        found
    }
}

fn read_policy_text(path: &std::path::Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the policy file {}", path.display())),
    }
}

/// The policy from the file's text (None: the defaults), with `--mode` applied.
fn parse_policy(opts: &RunOptions, text: Option<&str>) -> anyhow::Result<PolicyFile> {
    let mut policy = match text {
        Some(text) => policy_file::parse(text, &opts.config.display().to_string())?,
        None => PolicyFile::default(),
    };
    if let Some(mode) = opts.mode {
        policy.mode = mode;
    }
    Ok(policy)
}

fn drop_other_layouts(pins: &Pins) {
    for dir in pins.other_layouts() {
        let removed = fs::read_dir(&dir).map_or(0, |entries| {
            entries.flatten().filter(|e| fs::remove_file(e.path()).is_ok()).count()
        });
        let _ = fs::remove_dir(&dir);
        info!(dir = %dir.display(), maps = removed, "removed the maps of an older layout");
    }
}

/// Docker's bridges: those its networks name, and bridges named as Docker names them (see
/// [`interfaces::named_like_docker`]), which it creates before its API answers.
fn docker_bridges(links: &[Link], snapshot: &Snapshot) -> BTreeSet<String> {
    let named = snapshot.networks.iter().filter_map(|n| n.bridge.clone());
    let alike = links.iter().filter(|l| interfaces::named_like_docker(l)).map(|l| l.name.clone());
    named.chain(alike).collect()
}

/// Every interface's role for the kernel: the uplinks; the bridges of Docker networks the agent
/// knows, with their containers' veths; and the rest, neither uplinks nor Docker's (loopback,
/// trusted ones, those `--iface` leaves out). A bridge named like Docker's whose network the
/// agent does not know yet is left out, like any interface that appears before the next pass:
/// the kernel takes an interface the map does not name for one of a network it has not seen.
fn interface_roles(
    links: &[Link],
    uplinks: &[Link],
    docker_bridges: &BTreeSet<String>,
    known_bridges: &BTreeSet<String>,
) -> BTreeMap<u32, u32> {
    fn bridge_of<'a>(l: &'a Link, docker_bridges: &BTreeSet<String>) -> Option<&'a String> {
        let bridge = if l.is_veth { l.master.as_ref()? } else { &l.name };
        docker_bridges.contains(bridge).then_some(bridge)
    }
    links
        .iter()
        .filter_map(|l| {
            let role = match bridge_of(l, docker_bridges) {
                Some(bridge) if known_bridges.contains(bridge) => IFACE_DOCKER,
                Some(_) => return None,
                None if uplinks.iter().any(|u| u.ifindex == l.ifindex) => IFACE_UPLINK,
                None => IFACE_INSIDE,
            };
            Some((l.ifindex, role))
        })
        .collect()
}

/// Pins the freshly loaded programs (replacing a previous agent's pins) so tools such as
/// `guard explain` can find the programs that are attached.
fn pin_programs(ebpf: &mut Ebpf, pins: &Pins) -> anyhow::Result<()> {
    for (hook, framing) in Hook::PROGRAMS {
        let path = pins.program(hook, framing);
        remove_old_pin(&path)?;
        loader::pin_program(ebpf, hook, framing, &path).with_context(|| {
            format!("pinning the {} program at {}", hook.name(), path.display())
        })?;
    }
    for framing in Framing::ALL {
        let path = pins.explain_program(framing);
        remove_old_pin(&path)?;
        loader::explain_program(ebpf, framing)?
            .pin(&path)
            .with_context(|| format!("pinning the explain program at {}", path.display()))?;
    }
    Ok(())
}

fn remove_old_pin(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        fs::remove_file(path).with_context(|| format!("removing old pin {}", path.display()))?;
    }
    Ok(())
}

/// Wakes the reconciler on every container or network event; reconnects every
/// [`DOCKER_POLL`] while Docker is away and says so (`docker_back`) when the stream is up
/// again, so the reconciler resyncs at once.
async fn follow_docker_events(wake: Arc<Notify>, docker_back: Arc<Notify>) {
    loop {
        // The reconcile loop reports an unreachable Docker; this only retries.
        if let Ok(client) = DockerClient::connect().await {
            docker_back.notify_one();
            let mut events = Box::pin(client.events());
            while let Some(event) = events.next().await {
                match event {
                    Ok(()) => wake.notify_one(),
                    Err(e) => {
                        warn!("Docker event stream: {e}");
                        break;
                    }
                }
            }
            // The stream ended: the daemon restarted or went away.
            wake.notify_one();
        }
        tokio::time::sleep(DOCKER_POLL).await;
    }
}

/// How often the pins are looked at between passes: removing them (`guard unload --force`)
/// detaches every link, so the agent restores them within this.
const PIN_CHECK: Duration = Duration::from_millis(500);

/// Wakes the reconciler when the pin directory's maps are gone (see [`Agent::restore_pins`]).
/// A stat of one pin: the whole directory goes at once.
async fn watch_pins(pins: Pins, wake: Arc<Notify>) {
    let probe = pins.map(guard_common::maps::ADDRS);
    loop {
        tokio::time::sleep(PIN_CHECK).await;
        if !probe.exists() {
            wake.notify_one();
        }
    }
}

/// When the next reconcile may be tried after failures: 1 s, doubling up to [`MAX_BACKOFF`].
#[derive(Default)]
struct Backoff {
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    fn due(&self) -> bool {
        self.next.is_none_or(|next| Instant::now() >= next)
    }

    /// Records a failed attempt; the delay until the next one.
    fn failed(&mut self) -> Duration {
        let delay = (Duration::from_secs(1) * 2u32.saturating_pow(self.failures)).min(MAX_BACKOFF);
        self.failures += 1;
        self.next = Some(Instant::now() + delay);
        delay
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    /// Time left before the next attempt, if one is pending.
    fn remaining(&self) -> Option<Duration> {
        self.next.map(|next| next.saturating_duration_since(Instant::now()))
    }
}

/// Wakes the reconciler when interfaces or addresses change (a new uplink is protected, an
/// address added later counts for published ports, within a moment rather than a resync).
async fn follow_interface_changes(
    socket: std::io::Result<std::os::fd::OwnedFd>,
    wake: Arc<Notify>,
) {
    let socket = match socket {
        Ok(socket) => socket,
        Err(e) => {
            return warn!("cannot follow interface changes ({e}); relying on the periodic resync");
        }
    };
    // SAFETY: the OwnedFd is owned by the AsyncFd for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            return warn!("cannot follow interface changes ({e}); relying on the periodic resync");
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(mut ready) = fd.readable_mut().await else { return };
        // Drain everything queued, then wake once.
        loop {
            let raw = std::os::fd::AsRawFd::as_raw_fd(ready.get_inner());
            match nix::sys::socket::recv(raw, &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(_) => continue,
                // ENOBUFS: messages were lost; a resync sees everything anyway.
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => break,
            }
        }
        ready.clear_ready();
        wake.notify_one();
    }
}

/// Ends spent event budgets (drops' and accesses') each second (see
/// [`PolicyMaps::renew_event_budget`]).
async fn renew_event_budgets(pins: Pins) {
    let mut maps = match PolicyMaps::from_pins(&pins) {
        Ok(maps) => maps,
        Err(e) => return warn!("{e}; after a flood, drop and access events may resume late"),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let _ = maps.renew_event_budget(monotonic_ns(), false);
    }
}

/// The swarm as the agent now guards its doors, said when it changes.
fn say_swarm(swarm: Option<&Swarm>) {
    match swarm {
        None => info!("not in a swarm: no overlay, gossip or control port to guard"),
        Some(swarm) => {
            let nodes: Vec<String> = swarm.nodes.iter().map(ToString::to_string).collect();
            info!(
                nodes = %nodes.join(", "),
                data_path_port = swarm.data_path_port,
                manager = swarm.control_port.is_some(),
                "swarm members may reach this node's overlay, gossip and control ports"
            );
        }
    }
}

/// Logs a warning when it first appears, not on every reconcile while it persists.
#[derive(Default)]
struct Warnings {
    active: BTreeSet<String>,
}

impl Warnings {
    fn report(&mut self, current: Vec<String>) {
        for message in self.new_ones(current) {
            warn!("{message}");
        }
    }

    fn report_errors(&mut self, current: Vec<String>) {
        for message in self.new_ones(current) {
            error!("{message}");
        }
    }

    /// The messages of `current` not said last time; remembers `current`.
    fn new_ones(&mut self, current: Vec<String>) -> Vec<String> {
        let current: BTreeSet<String> = current.into_iter().collect();
        let new = current.difference(&self.active).cloned().collect();
        self.active = current;
        new
    }
}
