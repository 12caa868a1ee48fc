//! `guard run`: load, then keep the maps equal to the desired state until told to stop.
//!
//! Level-triggered: Docker events only wake the loop; every pass takes a fresh snapshot and
//! applies the difference, and a periodic pass repairs whatever an event stream missed. When
//! Docker is away the maps stay exactly as they are (never opened, never emptied).

use aya::maps::{MapData, RingBuf};
use guard_common::events::DropEvent;
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    drops::{Clock, DropRecord, RecentDrops},
    http::{self, Shared},
    metrics::AgentState,
};
use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::Ebpf;
use futures_util::StreamExt;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tracing::{info, warn};

use crate::{
    attach::Attachments,
    desired::desired_state,
    docker::{DockerClient, DockerError},
    identities::Identities,
    interfaces::{self, Framing, Link},
    loader,
    maps::PolicyMaps,
    pins::{Hook, Pins},
    policy_file::{self, Mode, PolicyFile},
    tables::diff,
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
    /// Where `/metrics`, `/healthz` and `/drops` are served.
    pub metrics_addr: std::net::SocketAddr,
}

/// Longest wait between attempts to reach Docker (and between reconciles that failed).
const MAX_BACKOFF: Duration = Duration::from_secs(8);

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Everything that can be wrong with the arguments is checked before anything is loaded, so
    // a start that fails leaves nothing behind. A bad policy file at start is fatal: the pinned
    // protection (with the last good file's openings) stays in place until it is fixed.
    if !opts.ifaces.is_empty() {
        let (_, missing) = interfaces::named(&interfaces::links()?, &opts.ifaces);
        if !missing.is_empty() {
            bail!("no interface named {} (see `ip link`)", missing.join(", "));
        }
    }
    let text = read_policy_text(&opts.config)?;
    let policy = parse_policy(&opts, text.as_deref())?;
    let listener = http::bind(opts.metrics_addr).await?;

    let mut ebpf = loader::load(&opts.pins)?;
    // Before anything pinned is touched: two agents on one pin directory would undo each
    // other's map entries every pass. Loading alone changed nothing.
    let _owner = opts.pins.claim()?;
    pin_programs(&mut ebpf, &opts.pins)?;
    let maps = PolicyMaps::from_ebpf(&mut ebpf)?;
    let events =
        ebpf.take_map(guard_common::maps::EVENTS).context("the object has no event ring")?;
    let events = RingBuf::try_from(events)?;
    let ids = Identities::adopt(maps.read()?.identities);
    info!(config = %opts.config.display(), mode = %policy.mode, rules = policy.rules.len(), "policy loaded");
    let shared = Arc::new(Shared {
        state: Mutex::new(AgentState { mode: policy.mode.to_string(), ..Default::default() }),
        drops: RecentDrops::new(),
        pins: opts.pins.clone(),
        heartbeat: Mutex::new(Instant::now()),
        stale_after: opts.resync * 3 + MAX_BACKOFF,
    });
    tokio::spawn(http::serve(listener, shared.clone()));
    tokio::spawn(consume_drop_events(events, shared.clone()));
    info!(addr = %opts.metrics_addr, "serving /metrics, /healthz and /drops");
    let mut agent = Agent {
        ebpf,
        maps,
        ids,
        attachments: Attachments::default(),
        opts,
        warnings: Warnings::default(),
        policy,
        policy_text: text,
        shared: shared.clone(),
    };

    let wake = Arc::new(Notify::new());
    let docker_back = Arc::new(Notify::new());
    tokio::spawn(follow_docker_events(wake.clone(), docker_back.clone()));
    tokio::spawn(follow_interface_changes(wake.clone()));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let mut docker: Option<DockerClient> = None;
    let mut synced = false;
    // Failed attempts (to connect, or to reconcile) back off; wake-ups in between (a burst of
    // events as a daemon stops) do not count as attempts, so they cannot inflate the delay.
    let mut backoff = Backoff::default();
    loop {
        *shared.heartbeat.lock().expect("not poisoned") = Instant::now();
        if backoff.due() {
            if docker.is_none() {
                match DockerClient::connect().await {
                    Ok(client) => docker = Some(client),
                    Err(e) => {
                        let delay = backoff.failed();
                        warn!("{e}; retrying in {delay:?}, protection unchanged");
                    }
                }
            }
            if let Some(client) = &docker {
                let started = Instant::now();
                let result = agent.reconcile(client).await;
                let mut state = shared.state.lock().expect("not poisoned");
                state.docker_connected = result
                    .as_ref()
                    .map_or_else(|e| e.downcast_ref::<DockerError>().is_none(), |_| true);
                if result.is_ok() {
                    state.synced = true;
                    state.sync_seconds.observe(started.elapsed().as_secs_f64());
                }
                drop(state);
                match result {
                    Ok(()) => {
                        backoff.succeeded();
                        if !synced {
                            synced = true;
                            info!(pin_dir = %agent.opts.pins.root().display(), "initial sync complete");
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
                            docker = None;
                        }
                    }
                }
            }
        }
        let wait = backoff.remaining().unwrap_or(agent.opts.resync);
        tokio::select! {
            _ = wake.notified() => {}
            // The event stream reached Docker again: try at once, whatever the backoff says.
            _ = docker_back.notified() => backoff.succeeded(),
            _ = tokio::time::sleep(wait) => {}
            _ = sighup.recv() => info!("SIGHUP: reloading the policy file"),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping; the pinned program and maps keep protecting (`guard unload` removes them)");
    Ok(())
}

struct Agent {
    ebpf: Ebpf,
    maps: PolicyMaps,
    ids: Identities,
    attachments: Attachments,
    opts: RunOptions,
    warnings: Warnings,
    policy: PolicyFile,
    /// The file's text when `policy` was parsed from it (None: absent).
    policy_text: Option<String>,
    /// What `/metrics` and the drop log read.
    shared: Arc<Shared>,
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
        match parse_policy(&self.opts, text.as_deref()) {
            Ok(policy) => {
                info!(mode = %policy.mode, rules = policy.rules.len(), "policy file changed: reloaded");
                self.shared.state.lock().expect("not poisoned").reloads_ok += 1;
                self.policy = policy;
                self.policy_text = text;
            }
            Err(e) => {
                warn!("{e:#}; keeping the policy in force");
                self.shared.state.lock().expect("not poisoned").reloads_failed += 1;
                // Report a broken file once, not on every pass.
                self.policy_text = text;
            }
        }
    }

    async fn reconcile(&mut self, docker: &DockerClient) -> anyhow::Result<()> {
        self.reload_policy();
        let snapshot = docker.snapshot().await?;
        let links = interfaces::links().context("listing interfaces")?;
        let host_addrs = interfaces::host_addresses().context("listing host addresses")?;

        let targets = self.ids.assign(snapshot.containers.iter().map(|c| c.id.as_str()));
        let desired = desired_state(&snapshot, &host_addrs, &targets, &self.policy);
        let mut warnings = Vec::new();
        for policy in &desired.containers {
            for error in &policy.label_errors {
                warnings.push(format!(
                    "container {}: {error}; ignored, its ports stay closed",
                    policy.container.name
                ));
            }
        }

        let uplinks = self.uplinks(&links, &snapshot, &mut warnings);
        let bridges = docker_bridges(&links, &snapshot);
        let mut desired = desired;
        desired.tables.uplinks = uplinks.iter().map(|l| (l.ifindex, 1)).collect();

        // Maps before links: a new link must never run against maps that are still empty.
        let plan = diff(&self.maps.read()?, &desired.tables);
        let mut failures = Vec::new();
        if !plan.is_empty() {
            failures = self.maps.apply(&plan);
            info!(changes = plan.change_count(), failed = failures.len(), "maps updated");
            warnings.extend(failures.iter().map(ToString::to_string));
        }
        self.maps.forget_drops(&targets.values().copied().collect());

        let pins = &self.opts.pins;
        let mut errors = Vec::new();
        for hook in Hook::ALL {
            let on = if matches!(hook, Hook::Xdp | Hook::TcEgress) { &uplinks } else { &bridges };
            errors.extend(self.attachments.sync(&mut self.ebpf, hook, pins, on));
        }
        warnings.extend(errors.iter().map(ToString::to_string));
        self.warnings.report(warnings);

        let mut state = self.shared.state.lock().expect("not poisoned");
        state.mode = self.policy.mode.to_string();
        state.names =
            desired.containers.iter().map(|c| (c.target, c.container.name.clone())).collect();
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
            .map(|(hook, iface, what)| (hook.name().to_string(), iface.to_string(), what.label()))
            .collect();
        state.map_entries = desired.tables.sizes();
        for failure in &failures {
            *state.update_errors.entry(failure.map).or_default() += 1;
        }
        Ok(())
    }

    fn uplinks(
        &self,
        links: &[Link],
        snapshot: &crate::snapshot::Snapshot,
        warnings: &mut Vec<String>,
    ) -> Vec<Link> {
        if self.opts.ifaces.is_empty() {
            let bridges: BTreeSet<String> =
                snapshot.networks.iter().filter_map(|n| n.bridge.clone()).collect();
            let trusted: Vec<String> =
                self.opts.trusted.iter().chain(&self.policy.trusted_interfaces).cloned().collect();
            return interfaces::select_uplinks(links, &bridges, &trusted);
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
        let removed = fs::read_dir(&dir)
            .map(|entries| entries.flatten().filter(|e| fs::remove_file(e.path()).is_ok()).count())
            .unwrap_or(0);
        let _ = fs::remove_dir(&dir);
        info!(dir = %dir.display(), maps = removed, "removed the maps of an older layout");
    }
}

/// Docker's bridges that exist right now: the bridge gate and its flow memory go on them.
fn docker_bridges(links: &[Link], snapshot: &crate::snapshot::Snapshot) -> Vec<Link> {
    let names: BTreeSet<&str> =
        snapshot.networks.iter().filter_map(|n| n.bridge.as_deref()).collect();
    links.iter().filter(|l| names.contains(l.name.as_str())).cloned().collect()
}

/// Pins the freshly loaded programs (replacing a previous agent's pins) so tools such as
/// `guard explain` can find the programs that are attached.
fn pin_programs(ebpf: &mut Ebpf, pins: &Pins) -> anyhow::Result<()> {
    for (hook, framing) in loader::PROGRAMS {
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

/// Wakes the reconciler on every container or network event; reconnects with backoff and
/// says so (`docker_back`) when the stream is up again, so the reconciler resyncs at once.
async fn follow_docker_events(wake: Arc<Notify>, docker_back: Arc<Notify>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match DockerClient::connect().await {
            Ok(client) => {
                backoff = Duration::from_secs(1);
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
            Err(e) => warn!("Docker event stream: {e}; retrying in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// When the next attempt may be made after failures: 1 s, doubling up to [`MAX_BACKOFF`].
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
async fn follow_interface_changes(wake: Arc<Notify>) {
    let socket = match interfaces::change_notifications() {
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

/// Reads drop events off the kernel's ring buffer: each becomes a log line naming the container
/// and port, and a record for `/drops`.
async fn consume_drop_events(ring: RingBuf<MapData>, shared: Arc<Shared>) {
    let clock = Clock::new();
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf, and
    // always reports that same fd.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return warn!("cannot watch the drop event ring: {e}; drops are still counted"),
    };
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => return warn!("drop event ring: {e}; drops are still counted"),
        };
        let ring = ready.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<DropEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole DropEvent; read_unaligned needs no alignment.
            let event: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let record = {
                let state = shared.state.lock().expect("not poisoned");
                DropRecord::from_event(&event, &state.names, &state.ifaces, &clock)
            };
            info!(target: "guard::drops", "{}", record.line());
            shared.drops.push(record);
        }
        ready.clear_ready();
    }
}

/// Logs a warning when it first appears, not on every reconcile while it persists.
#[derive(Default)]
struct Warnings {
    active: BTreeSet<String>,
}

impl Warnings {
    fn report(&mut self, current: Vec<String>) {
        let current: BTreeSet<String> = current.into_iter().collect();
        for message in current.difference(&self.active) {
            warn!("{message}");
        }
        self.active = current;
    }
}
