//! One pass: the policy reloaded, Docker's state (or what the agent last knew) turned into
//! the desired state, the maps and the attachments made to match, what happened reported.

use crate::telemetry::http::Shared;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use anyhow::Context as _;
use aya::Ebpf;
use guard_common::maps::{IFACE_DOCKER, IFACE_INSIDE, IFACE_UPLINK, door};
use tracing::{error, info, warn};

use crate::{
    cli::bans::{BanStore, DenySources},
    host::bridges,
    host::docker::{DockerClient, DockerError},
    host::engine_doors::EngineDoorsWatch,
    host::interfaces::{self, Link},
    host::state_dir::{Saved, StateDir},
    kernel::attach::Attachments,
    kernel::hook::{Class, Hook},
    kernel::maps::PolicyMaps,
    kernel::pins::Owner,
    kernel::repin::MapHandles,
    policy::file::PolicyFile,
    policy::snapshot::{EngineDoors, Snapshot, Swarm},
    state::doors,
    state::reconcile::{Inputs, Reconciler},
    state::tables::diff,
    telemetry::sync_report::SyncReport,
};

use super::{
    RunOptions,
    start::{parse_policy, pin_programs, read_policy_text},
};

/// Why a pass against Docker failed, sorted by what the loop does about it.
#[derive(Debug, thiserror::Error)]
pub(super) enum SyncError {
    /// Docker did not answer: the loop reconnects, and guards with what the agent last knew
    /// meanwhile.
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// Docker answered, but its state could not be put in force (the interfaces, the maps,
    /// the pins): the loop backs off and tries again.
    #[error(transparent)]
    Apply(#[from] anyhow::Error),
}

pub(super) struct Agent {
    pub(super) ebpf: Ebpf,
    /// The claim on the pin directory (taken again when the directory is restored).
    pub(super) _owner: Owner,
    /// What it takes to pin the maps again if their pins are removed under the agent.
    pub(super) handles: MapHandles,
    pub(super) maps: PolicyMaps,
    /// Target ids and the desired state (ids only grow while the agent runs).
    pub(super) reconciler: Reconciler,
    pub(super) attachments: Attachments,
    pub(super) opts: RunOptions,
    pub(super) warnings: Warnings,
    /// Interfaces and hooks that could not be attached, said once each while they last.
    pub(super) attach_errors: Warnings,
    pub(super) policy: PolicyFile,
    /// The file's text when `policy` was parsed from it (None: absent).
    pub(super) policy_text: Option<String>,
    /// No policy that parsed is known (a broken file at the first start): nothing is opened.
    pub(super) closed: bool,
    pub(super) state: StateDir,
    /// What was last written to the state directory (None: nothing yet by this agent).
    pub(super) last_saved: Option<Saved>,
    /// Whether writing the state failed last time (it is said once).
    pub(super) save_failing: bool,
    /// The text of the policy in force, as last saved.
    pub(super) saved_policy: Option<String>,
    /// Docker's state as last seen (from the state directory until the first sync).
    pub(super) known: Snapshot,
    /// Whether a previous agent's protection was in force at start (its links or maps).
    pub(super) adopted: bool,
    /// Whether the maps were a previous agent's, holding its last sync.
    pub(super) maps_adopted: bool,
    /// Whether the maps have held Docker's state since this agent started.
    pub(super) synced: bool,
    /// The deny files and bans, as last read.
    pub(super) deny: DenySources,
    /// `guard ban`'s bans, in the state directory.
    pub(super) bans: BanStore,
    /// Whether the last pass wrote a map entry or changed an attachment: only then can what
    /// the network reaches have changed (the exposure scan runs again).
    pub(super) changed: bool,
    /// What `/metrics` and the drop log read.
    pub(super) shared: Arc<Shared>,
    /// Finds the engine's own doors (its swarm, its API on tcp).
    pub(super) engine: EngineDoorsWatch,
    /// The engine would not say what its doors are (said once; the last known stand).
    pub(super) doors_unknown: bool,
    /// The engine's doors that are open beyond what the policy can fix, said once each.
    pub(super) door_errors: Warnings,
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

    pub(super) async fn reconcile(&mut self, docker: &DockerClient) -> Result<(), SyncError> {
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
    pub(super) fn apply_known(&mut self) -> anyhow::Result<()> {
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

        // The pins outlived the previous agent: its maps hold its last sync, more surely than
        // the state directory (which an upgrade from an agent without one lacks).
        let adopted = if !synced && self.maps_adopted { Some(self.maps.read()?) } else { None };
        let mut warnings = Vec::new();
        // Held until the maps are written: a `guard ban` made meanwhile is never undone.
        let (denied, ban_lock) =
            self.deny.gather(&self.policy.deny_files, &self.bans, &mut warnings);
        // Read under the lock, when there is one: what `guard ban` wrote is in it.
        let kernel = self.maps.read()?;

        // The engine's bridge names are a guess where it gives none (Podman): the kernel says.
        let iface_addrs = interfaces::interface_addresses().context("listing addresses")?;
        // A network without its bridge has no gate: said once, and not ready while it lasts.
        let mut uncovered = Vec::new();
        let resolved = &bridges::resolved(snapshot, &links, &iface_addrs, &mut uncovered);
        warnings.extend(uncovered.iter().cloned());
        let docker_bridges = docker_bridges(&links, resolved);
        let uplinks = self.uplinks(&links, &docker_bridges, &mut warnings);
        let bridges: Vec<Link> =
            links.iter().filter(|l| docker_bridges.contains(&l.name)).cloned().collect();
        let known_bridges: BTreeSet<String> =
            resolved.networks.iter().filter_map(|n| n.bridge.clone()).collect();
        let roles = interface_roles(&links, &uplinks, &docker_bridges, &known_bridges);

        let inputs = Inputs {
            snapshot,
            host_addrs: &host_addrs,
            policy: &self.policy,
            interfaces: &roles,
            denied: &denied,
            kernel_denials: ban_lock.is_none().then_some(&kernel),
            closed: !synced || self.closed,
        };
        let desired = match adopted {
            Some(tables) => self.reconciler.kept(tables, &inputs),
            None => self.reconciler.desired_state(&inputs),
        };
        for policy in &desired.containers {
            for error in &policy.label_errors {
                warnings.push(error.warning(&policy.container.name));
            }
        }

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
            .report_errors(doors::unsafe_listeners(&resolved.doors, &self.policy.management));
        // What could not be attached is not guarded: an error, and not ready, until it is.
        let unguarded: Vec<String> = errors.iter().map(ToString::to_string).collect();
        self.attach_errors.report_errors(unguarded.clone());

        let (in_files, banned, crowdsec) = self.deny.counts();
        let report = SyncReport {
            mode: self.policy.mode,
            desired: &desired,
            links: &links,
            attachments: &self.attachments,
            swarm: resolved.doors.swarm.as_ref(),
            denied: [
                ("policy", self.policy.deny.len()),
                ("file", in_files),
                ("cli", banned),
                ("crowdsec", crowdsec),
            ],
            unguarded: unguarded.into_iter().chain(uncovered).collect(),
            failures: &failures,
            restored: restoring.then_some(errors.is_empty()),
        };
        self.shared.state.lock().expect("not poisoned").record(&report);
        if restoring && errors.is_empty() {
            error!(pin_dir = %pins.root().display(), "protection restored: maps and programs pinned again, every link attached afresh");
        }
        Ok(())
    }

    /// One line, once synced, that says what the agent guards.
    pub(super) fn summarise(&self) {
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
pub(super) struct Warnings {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_pass_is_logged_with_its_causes_as_before() {
        let apply = || anyhow::anyhow!("no such device").context("listing interfaces");
        let logged = |e: SyncError| format!("{:#}", anyhow::Error::new(e));
        assert_eq!(logged(SyncError::Apply(apply())), format!("{:#}", apply()));
        let docker = || DockerError::Api {
            call: "list containers",
            source: bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message: "boom".into(),
            },
        };
        assert_eq!(
            logged(SyncError::Docker(docker())),
            format!("{:#}", anyhow::Error::new(docker()))
        );
    }
}
