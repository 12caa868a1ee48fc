//! `guard status`: every container, its ports, how they are published, and who outside may
//! reach each; plus whether the kernel's maps match that (they do while an agent runs).
//!
//! It works with or without a running agent: it reads Docker, the policy file and, if present,
//! the pins. One [`Report`] is built; the table and `--json` are two renderings of it.

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

use anyhow::Context as _;
use guard_common::maps::{CONFIG_AUDIT_ALL, IFACE_UPLINK};
use serde::Serialize;

mod kernel_view;
mod limits;
mod paths;

pub use limits::LimitReport;

use crate::{
    cli::reach::{Reach, Who},
    host::bridges,
    host::docker::DockerClient,
    host::engine_doors::EngineDoorsWatch,
    host::interfaces,
    host::rtnetlink::XdpAttached,
    host::state_dir::StateDir,
    kernel::hook::Hook,
    kernel::link_info::{self, PinnedLinkState},
    kernel::maps::PolicyMaps,
    kernel::pins::{PinError, Pins},
    policy::file::{self as policy_file, Mode, PolicyFile},
    policy::{Opening, PortSpec, Proto, Sources},
    state::desired::ContainerPolicy,
    state::doors,
    state::engine_paths::{self, EngineFirewall, PathReport},
    state::reconcile::{Inputs, Reconciler},
    state::tables::diff,
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub protection: Protection,
    /// The mode in force: the kernel's when loaded, else the policy file's.
    pub mode: String,
    /// Where the rules' names and the desired state come from: the running agent's policy,
    /// or the policy file given.
    pub policy: String,
    /// What could not be read (Docker, the policy file), and so is missing from the report.
    pub notes: Vec<String>,
    pub containers: Vec<ContainerReport>,
    /// The engine's own ports guard judges (Swarm's, the API on tcp), as the kernel holds them.
    pub engine_doors: Vec<DoorReport>,
    /// What leaves something unguarded: the engine's doors no policy makes safe (a
    /// plain-text API on tcp), networks without a bridge, hooks missing from an interface.
    pub errors: Vec<String>,
    /// Protection that holds, degraded: generic XDP.
    pub warnings: Vec<String>,
    /// Sources denied every container port, as the kernel holds them: (addresses, prefixes).
    pub denied: (usize, usize),
    /// The engine whose own rules decide which paths to an open port exist (`Docker 28.5.2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DoorReport {
    pub name: String,
    /// `4789/udp`, `7946/tcp`...
    pub ports: Vec<String>,
    pub outside: Outside,
}

#[derive(Debug, Serialize)]
pub struct Protection {
    pub loaded: bool,
    /// Whether an agent holds the pin directory (and so keeps the maps in sync).
    pub agent_running: bool,
    pub pin_dir: String,
    /// Interfaces with the XDP filter attached.
    pub interfaces: Vec<String>,
    /// Every program guard has on an interface, as the kernel holds it.
    pub hooks: Vec<HookReport>,
    /// Map entries that differ from Docker's state (0 while an agent keeps them in sync);
    /// absent when Docker does not answer.
    pub pending_changes: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct HookReport {
    pub hook: &'static str,
    pub iface: String,
    /// "xdp link", "tcx" or "netlink" (a clsact filter, on kernels without TCX).
    pub mechanism: &'static str,
    /// How XDP runs there, as the interface says: "native", or "generic" (skb mode: the
    /// driver has no native XDP, so packets are judged after the kernel built an skb).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct ContainerReport {
    pub name: String,
    pub id: String,
    pub addresses: Vec<String>,
    pub mode: String,
    pub ports: Vec<PortReport>,
    /// Who may reach every port not listed, and port-less traffic.
    pub other_ports: Outside,
    pub label_errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PortReport {
    /// 0 when `every_port` is set.
    pub port: u16,
    /// The row stands for every port of `proto` (`*/udp`) that has no row of its own.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub every_port: bool,
    /// The end of a range of opened ports (`port`-`last_port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_port: Option<u16>,
    pub proto: String,
    /// host address:port pairs Docker publishes it on.
    pub published: Vec<String>,
    pub outside: Outside,
    /// The limit on new flows per source that outside sources meet here, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitReport>,
    /// New flows dropped over that limit, every source and path together.
    #[serde(skip_serializing_if = "is_zero")]
    pub rate_limited: u64,
    /// The ways to it from outside, published and direct, and whether the engine's own rules
    /// let each through (guard's verdict, `outside`, is the same on all of them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathReport>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Who outside may reach a port (the shared [`Reach`]), and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Outside {
    pub reach: Reach,
    /// The labels and policy rules that open it.
    pub rules: Vec<String>,
    /// What Docker and the policy file ask for, where the kernel holds something else.
    pub differs: Option<String>,
}

impl Outside {
    fn new(reach: Reach) -> Self {
        Outside { reach, rules: Vec::new(), differs: None }
    }

    /// status's word for whom it lets in: "none" where scan says "nobody".
    fn who(&self) -> &'static str {
        match self.reach.who {
            Who::Nobody => "none",
            who => who.word(),
        }
    }
}

/// status's JSON, as it was before scan's [`Reach`] served both: its own word for nobody,
/// and `sources` even when empty.
impl Serialize for Outside {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            who: &'static str,
            sources: &'a [String],
            rules: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            differs: Option<&'a String>,
        }
        Json {
            who: self.who(),
            sources: &self.reach.sources,
            rules: &self.rules,
            differs: self.differs.as_ref(),
        }
        .serialize(serializer)
    }
}

pub async fn report(pins: &Pins, config: &Path, state_dir: &Path) -> anyhow::Result<Report> {
    let mut notes = Vec::new();
    let agent_running = pins.exists() && matches!(pins.claim(), Err(PinError::Owned { .. }));
    // Docker and the policy only add names and what is desired: the kernel answers without
    // them.
    let (mut policy, policy_source) = policy_in_force(agent_running, config, state_dir)
        .unwrap_or_else(|e| {
            notes.push(format!("{e}; rule names are not shown"));
            (PolicyFile::default(), "none (it does not load)".into())
        });
    let mut errors = Vec::new();
    let mut firewall: Option<EngineFirewall> = None;
    let snapshot = match DockerClient::connect().await {
        Ok(docker) => match docker.snapshot().await {
            Ok(mut snapshot) => {
                match docker.firewall().await {
                    Ok(f) => firewall = Some(f),
                    Err(e) => notes.push(format!("{e}; the paths the engine leaves are not shown")),
                }
                match EngineDoorsWatch::default().doors(&docker).await {
                    Ok(doors) => snapshot.doors = doors,
                    Err(e) => notes.push(format!("{e}; the swarm's members are not compared")),
                }
                errors = doors::unsafe_listeners(&snapshot.doors, &policy.management);
                Ok(snapshot)
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let snapshot = snapshot
        .map_err(|e| {
            notes.push(format!("Docker does not answer ({e:#}); containers are shown by id"));
        })
        .ok();
    let host_addrs = interfaces::host_addresses().context("listing host addresses")?;
    let maps = if pins.exists() { Some(PolicyMaps::from_pins(pins)?) } else { None };
    let current = maps.as_ref().map(PolicyMaps::read).transpose()?;
    let drops = maps.as_ref().map(PolicyMaps::drops).transpose()?.unwrap_or_default();
    if let Some(kernel) = &current {
        // The mode is the agent's to set (--mode overrides the file): the kernel knows it.
        policy.mode =
            if kernel.config.flags & CONFIG_AUDIT_ALL != 0 { Mode::Audit } else { Mode::Enforce };
    }

    let links = interfaces::links().unwrap_or_default();
    if let Some(snapshot) = &snapshot {
        let addrs = interfaces::interface_addresses().unwrap_or_default();
        let mut uncovered = Vec::new();
        bridges::resolved(snapshot, &links, &addrs, &mut uncovered);
        errors.extend(uncovered.into_iter().map(|u| format!("NOT COVERED: {u}")));
    }
    let protected = pins.pinned_ifindexes(Hook::Xdp)?;
    let desired = snapshot.as_ref().map(|snapshot| {
        // Use the agent's target ids, so the comparison with the maps is meaningful.
        let mut reconciler = Reconciler::adopt(current.iter().flat_map(|t| t.identities.clone()));
        let denied = crate::cli::bans::denied_by_files_and_bans(&policy, state_dir);
        // Interface roles are the agent's to decide (from its flags and the policy file):
        // taken as the kernel holds them, except that the interfaces it protects must be
        // uplinks.
        let mut roles = current.as_ref().map(|c| c.uplinks.clone()).unwrap_or_default();
        roles.extend(protected.iter().map(|i| (*i, IFACE_UPLINK)));
        reconciler.desired_state(&Inputs {
            interfaces: &roles,
            denied: &denied,
            ..Inputs::new(snapshot, &host_addrs, &policy)
        })
    });
    let interfaces = match &current {
        None => Vec::new(),
        Some(_) => protected.iter().map(|ifindex| name_of(&links, *ifindex)).collect(),
    };
    let hooks = hooks(pins, &links)?;
    if let Some(kernel) = &current {
        // Each hook the kernel's interface roles call for and no program fills: a way in that
        // nothing judges (the agent is not ready while one lasts).
        let (checks, _) = crate::cli::scan::hooks::check(pins, &kernel.uplinks, &links)?;
        errors.extend(checks.into_iter().filter(|c| c.state == "missing").map(|c| {
            format!(
                "NOT GUARDED: no {} program on {}: {}",
                c.hook,
                c.iface,
                c.opens.unwrap_or_default()
            )
        }));
    }
    // An L3 device's packets reach XDP in generic mode only: by design, not a degradation.
    let l3 = |iface: &str| {
        links.iter().any(|l| l.name == iface && l.framing() == Some(interfaces::Framing::Ip))
    };
    let warnings = hooks
        .iter()
        .filter(|h| h.xdp_mode == Some("generic") && !l3(&h.iface))
        .map(|h| {
            format!(
                "generic XDP on {}: its driver runs no native XDP, so packets are judged after \
                 the kernel built an skb (slower under a flood; the agent's log says why native \
                 failed)",
                h.iface
            )
        })
        .collect();
    let mode = policy.mode.to_string();
    let mut containers = match (&current, &desired) {
        (Some(kernel), _) => kernel_view::containers(kernel, desired.as_ref(), &drops),
        (None, Some(desired)) => desired.containers.iter().map(container_report).collect(),
        (None, None) => Vec::new(),
    };
    if let (Some(snapshot), Some(firewall)) = (&snapshot, &firewall) {
        paths::add(&mut containers, snapshot, firewall);
    }
    let engine_doors = current.as_ref().map(kernel_view::doors).unwrap_or_default();
    let pending_changes = match (&current, &desired) {
        (Some(kernel), Some(desired)) => Some(diff(kernel, &desired.tables).change_count()),
        _ => None,
    };
    Ok(Report {
        protection: Protection {
            loaded: current.is_some(),
            agent_running,
            pin_dir: pins.root().display().to_string(),
            interfaces,
            hooks,
            pending_changes,
        },
        mode,
        policy: policy_source,
        notes,
        containers,
        engine_doors,
        errors,
        warnings,
        denied: current.as_ref().map_or((0, 0), |k| (k.deny_exact.len(), k.deny_prefixes.len())),
        engine: firewall.map(|f| f.engine.name()),
    })
}

/// The policy the running agent enforces (the last that parsed, which it keeps in its state
/// directory), whatever file this command was given; without an agent, the file at `config`.
/// Returns it and where it came from.
pub(crate) fn policy_in_force(
    agent_running: bool,
    config: &Path,
    state_dir: &Path,
) -> anyhow::Result<(PolicyFile, String)> {
    let saved = if agent_running { StateDir::new(state_dir).load().ok().flatten() } else { None };
    match saved {
        Some(saved) => {
            let source = format!("the running agent's (kept in {})", state_dir.display());
            let policy = match saved.policy_text {
                Some(text) => policy_file::parse(&text, &source)?,
                None => PolicyFile::default(),
            };
            Ok((policy, source))
        }
        None => {
            let policy = policy_file::load(config)
                .map_err(|e| anyhow::anyhow!("the policy file does not load ({e})"))?;
            Ok((policy, config.display().to_string()))
        }
    }
}

/// Why `status --check` fails, if it does: nothing loaded, no agent keeping it in sync, or
/// the kernel's maps not what Docker and the policy file ask for.
pub fn check(report: &Report) -> Result<(), String> {
    let p = &report.protection;
    if !p.loaded {
        return Err(format!("not loaded: no pins at {}", p.pin_dir));
    }
    if !p.agent_running {
        return Err(format!(
            "no agent is running on {}: the pins protect as they were left, nothing follows Docker",
            p.pin_dir
        ));
    }
    if let Some(error) = report.errors.first() {
        return Err(error.clone());
    }
    match p.pending_changes {
        Some(0) => Ok(()),
        Some(n) => Err(format!(
            "out of sync: {n} map entries differ from what Docker and the policy ask for"
        )),
        None => Err("cannot tell whether the maps are in sync (Docker does not answer)".into()),
    }
}

/// The interface's name, or what it was if it is gone.
fn name_of(links: &[interfaces::Link], ifindex: u32) -> String {
    links
        .iter()
        .find(|l| l.ifindex == ifindex)
        .map_or(format!("ifindex {ifindex} (gone)"), |l| l.name.clone())
}

/// Guard's programs on interfaces: the pinned XDP and TCX links, and the clsact filters in
/// guard's slot (kernels without TCX), read from the kernel.
fn hooks(pins: &Pins, links: &[interfaces::Link]) -> anyhow::Result<Vec<HookReport>> {
    let mut hooks: Vec<HookReport> = pins
        .pinned_links()?
        .into_iter()
        // A pin outlives its link's attachment (`bpftool link detach`): only what runs counts.
        .filter_map(|(hook, _, path)| match link_info::pinned_link_state(&path) {
            Ok(PinnedLinkState::Attached { ifindex }) => Some((hook, ifindex)),
            _ => None,
        })
        .map(|(hook, ifindex)| HookReport {
            hook: hook.name(),
            iface: name_of(links, ifindex),
            mechanism: hook.link_kind(),
            xdp_mode: (hook == Hook::Xdp).then(|| xdp_mode(ifindex)),
        })
        .collect();
    let guard_programs = crate::kernel::hook::tc_program_names();
    for link in links {
        for hook in [Hook::TcEgress, Hook::BridgeIngress] {
            let Some(filter) = crate::kernel::tc_filter::in_slot(link.ifindex, hook)? else {
                continue;
            };
            if !guard_programs.contains(&filter.name.as_str()) {
                continue;
            }
            // Egress carries the uplink's recorder or a bridge's gate: the program says which.
            let hook = if filter.name == Hook::BridgeGate.program(interfaces::Framing::Ethernet) {
                Hook::BridgeGate
            } else {
                hook
            };
            hooks.push(HookReport {
                hook: hook.name(),
                iface: link.name.clone(),
                mechanism: "netlink",
                xdp_mode: None,
            });
        }
    }
    hooks.sort_by(|a, b| (a.hook, &a.iface).cmp(&(b.hook, &b.iface)));
    Ok(hooks)
}

/// "native" or "generic", as the interface reports its XDP program.
fn xdp_mode(ifindex: u32) -> &'static str {
    match crate::host::rtnetlink::xdp_attached(ifindex) {
        Ok((XdpAttached::Driver, _)) => "native",
        Ok((XdpAttached::Generic, _)) => "generic",
        Ok((XdpAttached::Offloaded, _)) => "offloaded",
        Ok((XdpAttached::Multi, _)) => "several modes",
        Ok((XdpAttached::None, _)) => "none",
        Err(_) => "unknown",
    }
}

fn container_report(policy: &ContainerPolicy) -> ContainerReport {
    let c = &policy.container;
    // One row per published or single opened port; a longer opened range gets one row of its
    // own (first-last), so nothing that is open goes unreported.
    let mut ports: BTreeSet<(u16, u16, Proto)> =
        c.published.iter().map(|p| (p.container_port, p.container_port, p.proto)).collect();
    for opening in &policy.openings {
        if let PortSpec::Range { proto, first, last } = opening.ports {
            if last - first < 16 {
                ports.extend((first..=last).map(|p| (p, p, proto)));
            } else {
                ports.insert((first, last, proto));
            }
        }
    }
    let ports = ports
        .into_iter()
        .map(|(first, last, proto)| PortReport {
            port: first,
            last_port: (last != first).then_some(last),
            proto: proto.name().into(),
            published: c
                .published
                .iter()
                .filter(|p| (first..=last).contains(&p.container_port) && p.proto == proto)
                .map(|p| match p.host_ip {
                    std::net::IpAddr::V6(v6) => format!("[{v6}]:{}", p.host_port),
                    v4 => format!("{v4}:{}", p.host_port),
                })
                .collect(),
            outside: reach(policy.openings.iter().filter(|o| o.ports.covers(proto, first))),
            limit: limits::wanted(policy, proto, Some(first)),
            rate_limited: 0,
            every_port: false,
            paths: Vec::new(),
        })
        .chain(every_port_protos(&policy.openings).into_iter().map(|proto| {
            let outside = reach(policy.openings.iter().filter(|o| covers_every_port(o, proto)));
            PortReport {
                limit: limits::wanted(policy, proto, None),
                ..PortReport::every_port(proto, outside)
            }
        }))
        .collect();
    ContainerReport {
        name: c.name.clone(),
        id: c.id.chars().take(12).collect(),
        addresses: c.addresses.iter().map(ToString::to_string).collect(),
        mode: policy.mode.to_string(),
        ports,
        other_ports: reach(policy.openings.iter().filter(|o| o.ports == PortSpec::All)),
        label_errors: policy.label_errors.iter().map(|e| e.warning(&c.name)).collect(),
    }
}

/// The protocols the openings open every port of (`*/udp`), each once.
fn every_port_protos(openings: &[Opening]) -> BTreeSet<Proto> {
    openings
        .iter()
        .filter_map(|o| match o.ports {
            PortSpec::EveryPortOf(proto) => Some(proto),
            _ => None,
        })
        .collect()
}

/// Whether the opening covers every port of `proto` (`*/proto` itself, or `*`).
fn covers_every_port(opening: &Opening, proto: Proto) -> bool {
    match opening.ports {
        PortSpec::All => true,
        PortSpec::EveryPortOf(p) => p == proto,
        PortSpec::Range { .. } => false,
    }
}

impl PortReport {
    /// The row of every port of `proto` (`*/udp`) without a row of its own.
    fn every_port(proto: Proto, outside: Outside) -> Self {
        PortReport {
            port: 0,
            every_port: true,
            last_port: None,
            proto: proto.name().into(),
            published: Vec::new(),
            outside,
            limit: None,
            rate_limited: 0,
            paths: Vec::new(),
        }
    }

    /// The PORT column: `443/tcp`, `8000-8010/tcp`, `*/udp`.
    fn label(&self) -> String {
        if self.every_port {
            return format!("*/{}", self.proto);
        }
        let range = self.last_port.map(|last| format!("-{last}")).unwrap_or_default();
        format!("{}{range}/{}", self.port, self.proto)
    }
}

/// Everyone wins over a source list; source lists add up.
fn reach<'a>(openings: impl Iterator<Item = &'a Opening>) -> Outside {
    let openings: Vec<&Opening> = openings.collect();
    let rules = |os: &[&Opening]| {
        os.iter().map(|o| o.rule.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    };
    let everyone: Vec<&Opening> =
        openings.iter().copied().filter(|o| o.sources == Sources::Everyone).collect();
    if !everyone.is_empty() {
        return Outside { rules: rules(&everyone), ..Outside::new(Reach::everyone()) };
    }
    let sources: BTreeSet<String> = openings
        .iter()
        .flat_map(|o| match &o.sources {
            Sources::Listed(cidrs) => cidrs.iter().map(ToString::to_string).collect(),
            Sources::Everyone => Vec::new(),
        })
        .collect();
    if sources.is_empty() {
        Outside::new(Reach::nobody())
    } else {
        Outside {
            rules: rules(&openings),
            ..Outside::new(Reach::listed(sources.into_iter().collect()))
        }
    }
}

impl Outside {
    fn text(&self) -> String {
        let rules = if self.rules.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.rules.join(", "))
        };
        let differs = self.differs.as_ref().map(|d| format!(" [desired: {d}]")).unwrap_or_default();
        let who = if self.reach.is_open() { self.reach.text() } else { self.who().to_owned() };
        format!("{who}{rules}{differs}")
    }
}

/// The table for people.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let p = &report.protection;
    let _ = match (p.loaded, p.pending_changes) {
        (false, _) => writeln!(
            out,
            "protection: NOT LOADED (no pins at {}); `guard run` starts it",
            p.pin_dir
        ),
        (true, pending) => {
            let on = if p.interfaces.is_empty() {
                "no interface".into()
            } else {
                p.interfaces.join(", ")
            };
            let _ =
                writeln!(out, "protection: loaded at {} on {on}; mode {}", p.pin_dir, report.mode);
            for hook in &p.hooks {
                let mode = hook.xdp_mode.map(|m| format!(", {m}")).unwrap_or_default();
                let _ =
                    writeln!(out, "  {:<15} {} ({}{mode})", hook.hook, hook.iface, hook.mechanism);
            }
            let _ = if p.agent_running {
                writeln!(out, "agent: running")
            } else {
                writeln!(
                    out,
                    "agent: NOT RUNNING: the pins protect as they were left; nothing follows Docker"
                )
            };
            match pending {
                Some(0) => writeln!(out, "maps: in sync with Docker and the policy file"),
                Some(n) => writeln!(
                    out,
                    "maps: {n} entries differ from what Docker and the policy file ask for"
                ),
                None => Ok(()),
            }
        }
    };
    let _ = writeln!(out, "policy: {}", report.policy);
    if report.denied != (0, 0) {
        let (addrs, prefixes) = report.denied;
        let _ = writeln!(
            out,
            "denied every container port: {addrs} addresses, {prefixes} prefix entries (`guard bans` lists them)"
        );
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out.push('\n');
    let mut rows = vec![
        ["CONTAINER", "ADDRESSES", "PORT", "PUBLISHED AS", "OUTSIDE", "LIMIT", "PATHS"]
            .map(String::from),
    ];
    for c in &report.containers {
        let name = if c.mode == "audit" { format!("{} (audit)", c.name) } else { c.name.clone() };
        let mut first = Some((name, c.addresses.join(" ")));
        let mut push = |port: String, published: String, outside: String, limit, paths: String| {
            let (name, addrs) = first.take().unwrap_or_default();
            rows.push([name, addrs, port, published, outside, limit, paths]);
        };
        for port in &c.ports {
            let published =
                if port.published.is_empty() { "-".into() } else { port.published.join(" ") };
            let paths = if !port.outside.reach.is_open() || port.paths.is_empty() {
                "-".into()
            } else {
                engine_paths::summary(&port.paths)
            };
            push(port.label(), published, port.outside.text(), limits::cell(port), paths);
        }
        push("other".into(), "-".into(), c.other_ports.text(), "-".into(), "-".into());
    }
    let widths: Vec<usize> =
        (0..7).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for row in &rows {
        let line: Vec<String> =
            row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str("\nlocal (the host) and bridge (other containers) may reach every port; OUTSIDE is everyone else.\n");
    if report.containers.iter().flat_map(|c| &c.ports).any(|p| p.limit.is_some()) {
        out.push_str("LIMIT: new flows from outside per source (an IPv6 source by its /64) that an opening lets in.\n");
    }
    // Why a path to an open port is not there: the engine's own rules, said once each.
    let closed: BTreeSet<&str> = report
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .filter(|p| p.outside.reach.is_open())
        .flat_map(|p| &p.paths)
        .filter(|path| !path.open)
        .map(|path| path.why.as_str())
        .collect();
    if let Some(engine) = &report.engine {
        let _ = writeln!(
            out,
            "PATHS: how outside reaches an open port on {engine}: by a published host port, or by routing to the container's address (direct)."
        );
    }
    for why in closed {
        let _ = writeln!(out, "  {why}");
    }
    if !report.engine_doors.is_empty() {
        out.push_str(
            "\nthe engine's own doors, open only to the swarm's nodes and [management] prefixes:\n",
        );
        for door in &report.engine_doors {
            let _ = writeln!(
                out,
                "  {:<22} {:<28} {}",
                door.name,
                door.ports.join(" "),
                door.outside.text()
            );
        }
    }
    for error in &report.errors {
        let _ = writeln!(out, "ERROR: {error}");
    }
    for warning in &report.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    for c in &report.containers {
        for error in &c.label_errors {
            let _ = writeln!(out, "warning: {error}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opening(ports: PortSpec, sources: Sources, rule: &str) -> Opening {
        Opening { ports, sources, rule: rule.into() }
    }

    #[test]
    fn reach_prefers_everyone_and_unions_lists() {
        let p5432 = PortSpec::Range { proto: Proto::Tcp, first: 5432, last: 5432 };
        let a = opening(
            p5432,
            Sources::Listed(vec!["10.0.0.0/8".parse().unwrap()]),
            "label guard.allow.a",
        );
        let b = opening(
            PortSpec::All,
            Sources::Listed(vec!["192.0.2.7".parse().unwrap()]),
            "file rule #1",
        );
        let all = opening(p5432, Sources::Everyone, "label guard.expose");
        let listed = reach([&a, &b].into_iter());
        assert_eq!(listed.reach.who, Who::Listed);
        assert_eq!(listed.reach.sources, ["10.0.0.0/8", "192.0.2.7/32"]);
        assert_eq!(listed.text(), "10.0.0.0/8, 192.0.2.7/32 (file rule #1, label guard.allow.a)");
        assert_eq!(reach([&a, &all].into_iter()).text(), "everyone (label guard.expose)");
        assert_eq!(reach(std::iter::empty()).text(), "none");
        assert!(
            b.ports.covers(Proto::Udp, 1)
                && a.ports.covers(Proto::Tcp, 5432)
                && !a.ports.covers(Proto::Udp, 5432)
        );
    }

    #[test]
    fn every_port_of_a_protocol_is_a_row_of_its_own_and_opens_that_protocol_only() {
        let udp = opening(
            PortSpec::EveryPortOf(Proto::Udp),
            Sources::Listed(vec!["10.0.0.0/8".parse().unwrap()]),
            "label guard.allow.lan",
        );
        let policy = ContainerPolicy {
            container: crate::policy::snapshot::Container {
                id: "ab".repeat(32),
                name: "dns".into(),
                image: "busybox".into(),
                labels: Default::default(),
                addresses: vec!["172.30.0.9".parse().unwrap()],
                published: vec![crate::policy::snapshot::Published {
                    host_ip: "0.0.0.0".parse().unwrap(),
                    host_port: 53,
                    container_port: 53,
                    proto: Proto::Tcp,
                }],
            },
            target: 1,
            openings: vec![udp],
            limits: vec![],
            label_errors: vec![],
            mode: Mode::Enforce,
        };
        let report = container_report(&policy);
        let rows: Vec<(String, String)> =
            report.ports.iter().map(|p| (p.label(), p.outside.text())).collect();
        assert_eq!(
            rows,
            [
                ("53/tcp".to_string(), "none".to_string()),
                ("*/udp".into(), "10.0.0.0/8 (label guard.allow.lan)".into())
            ]
        );
        assert_eq!(report.other_ports.text(), "none", "ICMP and other protocols stay closed");
        let json = serde_json::to_value(&report.ports[1]).unwrap();
        assert_eq!(json["every_port"], true);
    }

    #[test]
    fn who_reaches_a_port_keeps_its_words_and_its_json() {
        let none = Outside::new(Reach::nobody());
        let listed = Outside {
            rules: vec!["label guard.allow.lan".into()],
            differs: Some("everyone (label guard.expose)".into()),
            ..Outside::new(Reach::listed(vec!["10.0.0.0/8".into(), "192.0.2.7/32".into()]))
        };
        let everyone =
            Outside { rules: vec!["label guard.expose".into()], ..Outside::new(Reach::everyone()) };
        let json = |r: &Outside| serde_json::to_string(r).unwrap();
        assert_eq!(json(&none), r#"{"who":"none","sources":[],"rules":[]}"#);
        assert_eq!(
            json(&listed),
            r#"{"who":"listed","sources":["10.0.0.0/8","192.0.2.7/32"],"rules":["label guard.allow.lan"],"differs":"everyone (label guard.expose)"}"#
        );
        assert_eq!(
            json(&everyone),
            r#"{"who":"everyone","sources":[],"rules":["label guard.expose"]}"#
        );
        assert_eq!(none.text(), "none");
        assert_eq!(
            listed.text(),
            "10.0.0.0/8, 192.0.2.7/32 (label guard.allow.lan) [desired: everyone (label guard.expose)]"
        );
        assert_eq!(everyone.text(), "everyone (label guard.expose)");
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    fn report(errors: Vec<String>, doors: Vec<DoorReport>) -> Report {
        Report {
            protection: Protection {
                loaded: true,
                agent_running: true,
                pin_dir: "/sys/fs/bpf/guard".into(),
                interfaces: vec!["eth0".into()],
                hooks: vec![],
                pending_changes: Some(0),
            },
            mode: "enforce".into(),
            policy: "test".into(),
            notes: vec![],
            containers: vec![],
            engine_doors: doors,
            errors,
            warnings: vec![],
            denied: (0, 0),
            engine: None,
        }
    }

    #[test]
    fn what_no_policy_makes_safe_fails_the_check_and_is_printed() {
        assert_eq!(check(&report(vec![], vec![])), Ok(()));
        let uncovered =
            "NOT COVERED: network web (0123456789ab): no Linux bridge found".to_string();
        let failed = check(&report(vec![uncovered.clone()], vec![]));
        assert_eq!(failed, Err(uncovered.clone()));
        let overlay = DoorReport {
            name: "engine:swarm-overlay".into(),
            ports: vec!["4789/udp".into()],
            outside: Outside::new(Reach::listed(vec!["10.77.0.12/32".into()])),
        };
        let text = render(&report(vec![uncovered], vec![overlay]));
        assert!(text.contains("ERROR: NOT COVERED: network web"), "{text}");
        assert!(text.contains("engine:swarm-overlay") && text.contains("4789/udp"), "{text}");
        assert!(text.contains("10.77.0.12/32"), "{text}");
    }

    #[test]
    fn the_paths_column_and_the_engine_s_reasons() {
        let firewall = EngineFirewall {
            engine: crate::state::engine_paths::Engine::Docker { version: "28.5.2".into() },
            networks: vec![crate::state::engine_paths::NetworkRouting {
                name: "web".into(),
                driver: "bridge".into(),
                subnets: vec!["172.18.0.0/16".parse().unwrap()],
                mode_v4: crate::state::engine_paths::GatewayMode::Nat,
                mode_v6: crate::state::engine_paths::GatewayMode::Nat,
                trusted_interfaces: vec![],
            }],
        };
        let port = |port, reach, published: &[(std::net::IpAddr, u16)]| PortReport {
            port,
            every_port: false,
            last_port: None,
            proto: "tcp".into(),
            published: vec![],
            outside: Outside::new(reach),
            limit: None,
            rate_limited: 0,
            paths: firewall.paths(&["172.18.0.2".parse().unwrap()], port, published),
        };
        let any = "0.0.0.0".parse().unwrap();
        let mut report = report(vec![], vec![]);
        report.engine = Some(firewall.engine.name());
        report.containers.push(ContainerReport {
            name: "web".into(),
            id: "0123456789ab".into(),
            addresses: vec!["172.18.0.2".into()],
            mode: "enforce".into(),
            ports: vec![
                PortReport {
                    limit: Some(LimitReport {
                        rate: "10/s burst 20".into(),
                        rule: Some("label guard.ratelimit".into()),
                        differs: None,
                    }),
                    rate_limited: 3,
                    ..port(443, Reach::everyone(), &[(any, 8443)])
                },
                port(5432, Reach::nobody(), &[(any, 5432)]),
            ],
            other_ports: Outside::new(Reach::nobody()),
            label_errors: vec![],
        });
        let text = render(&report);
        let row = |p: &str| text.lines().find(|l| l.contains(p)).unwrap_or_default().to_string();
        assert!(row("443/tcp").ends_with("published only (engine drops direct)"), "{text}");
        assert!(row("5432/tcp").ends_with(" -"), "a closed port has no paths to name: {text}");
        assert!(
            row("443/tcp").contains("  10/s burst 20 (label guard.ratelimit); 3 rate-limited  "),
            "the limit beside the opening, and what it dropped: {text}"
        );
        assert!(text.contains("LIMIT: new flows from outside per source"), "{text}");
        assert!(
            text.contains("  Docker 28.5.2 drops it: network web (gateway mode nat)"),
            "{text}"
        );
    }
}
