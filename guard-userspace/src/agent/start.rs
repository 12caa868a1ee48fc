//! Start-up: everything that can be wrong with the arguments is checked before anything is
//! loaded; then the program is loaded and pinned, the maps adopted, the HTTP endpoint and the
//! tasks beside the loop started.

use aya::maps::RingBuf;

use crate::{
    telemetry::events::{self, recent::Recent},
    telemetry::http::{self, Shared},
    telemetry::metrics::AgentState,
};
use std::{
    fs,
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::Ebpf;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::{
    cli::bans::{BanStore, DenySources},
    host::engine_doors::EngineDoorsWatch,
    host::interfaces::{self, Framing},
    host::state_dir::{Saved, StateDir},
    kernel::attach::Attachments,
    kernel::features as kernel,
    kernel::hook::Hook,
    kernel::loader,
    kernel::maps::PolicyMaps,
    kernel::pins::Pins,
    kernel::repin::MapHandles,
    policy::file::{self as policy_file, PolicyFile},
    state::reconcile::Reconciler,
};

use super::{
    RunOptions,
    supervisor::MAX_BACKOFF,
    sync::{Agent, Warnings},
    watchers::{follow_docker_events, follow_interface_changes, renew_event_budgets, watch_pins},
};

/// What the loop starts from.
pub(super) struct Started {
    pub(super) agent: Agent,
    /// Notified when anything should wake the loop.
    pub(super) wake: Arc<Notify>,
    /// Notified when Docker's event stream is up again.
    pub(super) docker_back: Arc<Notify>,
    /// CrowdSec's decisions, when followed.
    pub(super) crowdsec_changes: Option<tokio::sync::watch::Receiver<crate::host::crowdsec::Bans>>,
}

pub(super) fn start(opts: RunOptions) -> anyhow::Result<Started> {
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
        let kept = crate::cli::bans::saved_crowdsec(&opts.state_dir);
        let (decisions, follower) = tokio::sync::watch::channel(kept);
        tokio::spawn(crate::host::crowdsec::follow(config, decisions));
        crowdsec_decisions = Some(follower);
    }
    let crowdsec_changes = crowdsec_decisions.clone();
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
    let reconciler = Reconciler::adopt(pinned.identities);
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
    let webhook = opts.alert_url.clone().and_then(crate::telemetry::webhook::Webhook::start_or_say);
    let scans = crate::telemetry::alerts::ScanOptions {
        pins: opts.pins.clone(),
        config: opts.config.clone(),
        state_dir: opts.state_dir.clone(),
        interval: opts.scan_interval,
    };
    tokio::spawn(crate::telemetry::alerts::keep_current(scans, shared.exposures.clone(), webhook));
    info!(addr = %opts.metrics_addr, "serving /metrics, /healthz, /drops and /access");
    let known = saved.map(|s| s.snapshot).unwrap_or_default();
    let agent = Agent {
        ebpf,
        _owner: owner,
        handles,
        maps,
        reconciler,
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
    Ok(Started { agent, wake, docker_back, crowdsec_changes })
}

/// The policy the agent starts with. A file that does not parse never means no protection:
/// the last file that parsed (kept in the state directory) is used, or, without one,
/// everything stays closed; either way the error is logged with its line and column,
/// `guard_config_valid` is 0 and `/readyz` is not ready until the file is fixed.
pub(super) struct StartPolicy {
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

pub(super) fn read_policy_text(path: &std::path::Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the policy file {}", path.display())),
    }
}

/// The policy from the file's text (None: the defaults), with `--mode` applied.
pub(super) fn parse_policy(opts: &RunOptions, text: Option<&str>) -> anyhow::Result<PolicyFile> {
    let mut policy = match text {
        Some(text) => policy_file::parse(text, &opts.config.display().to_string())?,
        None => PolicyFile::default(),
    };
    if let Some(mode) = opts.mode {
        policy.mode = mode;
    }
    Ok(policy)
}

/// Pins the freshly loaded programs (replacing a previous agent's pins) so tools such as
/// `guard explain` can find the programs that are attached.
pub(super) fn pin_programs(ebpf: &mut Ebpf, pins: &Pins) -> anyhow::Result<()> {
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

pub(super) fn remove_old_pin(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        fs::remove_file(path).with_context(|| format!("removing old pin {}", path.display()))?;
    }
    Ok(())
}
