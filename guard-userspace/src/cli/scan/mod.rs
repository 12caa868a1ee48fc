//! `guard scan`: what the network can reach on this host right now, judged by the loaded
//! programs.
//!
//! For every address of every interface guard guards, every host socket that takes new peers
//! (TCP listeners, bound UDP sockets: [`crate::host::sock_diag`]) and every container port behind a
//! published port or on a container's own address, the pinned explain program (the filter's
//! code over the pinned maps) runs on a synthesised first packet from an outside source that no
//! rule names and from one address of each prefix a rule names (BPF_PROG_TEST_RUN, as `guard
//! explain` does). The same packets go through the reference decision over the desired state
//! (Docker's labels and the policy in force): where the two disagree, or a hook the kernel's
//! interface roles call for is not attached ([`hooks`]), the picture is in drift.
//!
//! Without Docker the maps are taken as the policy (nothing to compare them with): the hooks
//! are still checked.

mod changes;
pub(crate) mod hooks;
mod picture;
mod sources;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use guard_common::{
    decision::decide_parsed,
    maps::{
        AddrInfo, CONFIG_AUDIT_ALL, FlowKey, IFACE_UPLINK, OPEN_NONE, PROTO_ANY, PortKey, door,
    },
    reason::{Reason, Verdict},
};

pub use changes::{Change, changes, exposed_targets};
pub use picture::{Exposure, HookCheck, Kind, Row, Unguarded, render};

pub use super::reach::Reach;

use crate::{
    cli::explain,
    host::docker::DockerClient,
    host::engine_doors::EngineDoorsWatch,
    host::interfaces::{self, Framing, Link},
    host::sock_diag,
    kernel::frames::{Frame, Transport},
    kernel::hook::Hook,
    kernel::maps::PolicyMaps,
    kernel::pins::{PinError, Pins},
    policy::Proto,
    policy::file::Mode,
    state::desired::{ContainerPolicy, Desired},
    state::doors,
    state::identities::encode_hex,
    state::reconcile::{Inputs, Reconciler},
    state::tables::{TableSet, WithFlows},
};

/// Scans what outside hosts can reach through the programs pinned at `pins`, compared with
/// the policy in force (the running agent's, kept in `state_dir`; else the file at `config`).
pub async fn scan(pins: &Pins, config: &Path, state_dir: &Path) -> anyhow::Result<Exposure> {
    if !pins.exists() {
        bail!("guard is not loaded at {}: start it with `guard run`", pins.root().display());
    }
    let mut notes = Vec::new();
    let maps = PolicyMaps::from_pins(pins)?;
    let kernel = maps.read()?;
    let flows = explain::live_flows(&maps)?;
    let agent_running = matches!(pins.claim(), Err(PinError::Owned { .. }));
    let (mut policy, policy_source) =
        crate::cli::status::policy_in_force(agent_running, config, state_dir)?;
    policy.mode =
        if kernel.config.flags & CONFIG_AUDIT_ALL != 0 { Mode::Audit } else { Mode::Enforce };

    let desired = match docker_snapshot().await {
        Ok(snapshot) => {
            let mut reconciler = Reconciler::adopt(kernel.identities.clone());
            let host = interfaces::host_addresses().context("listing host addresses")?;
            let denied = crate::cli::bans::denied_by_files_and_bans(&policy, state_dir);
            reconciler.desired_state(&Inputs {
                // Interface roles are the agent's to decide: taken as the kernel holds them.
                interfaces: &kernel.uplinks,
                denied: &denied,
                ..Inputs::new(&snapshot, &host, &policy)
            })
        }
        Err(e) => {
            notes.push(format!(
                "Docker does not answer ({e:#}): the pinned maps are taken as the policy, only the hooks are checked"
            ));
            Desired { tables: kernel.clone(), ..Desired::default() }
        }
    };

    let links = interfaces::links().context("listing interfaces")?;
    let (hooks, unguarded) = hooks::check(pins, &kernel.uplinks, &links)?;
    let mut listeners = sock_diag::listeners(sock_diag::Transport::Tcp)
        .and_then(|mut tcp| {
            tcp.extend(sock_diag::listeners(sock_diag::Transport::Udp)?);
            Ok(tcp)
        })
        .context("reading the host's listening sockets (sock_diag)")?;
    listeners.retain(|l| !l.addr.ip().is_loopback());
    let owners = sock_diag::owners(&listeners.iter().map(|l| l.inode).collect());
    let iface_addrs = interfaces::interface_addresses().context("listing addresses")?;

    let judge = Judge::new(pins, &kernel, &desired, &flows, &hooks, &links, &iface_addrs)?;
    let mut rows = BTreeMap::new();
    for link in links.iter().filter(|l| kernel.uplinks.get(&l.ifindex) == Some(&IFACE_UPLINK)) {
        let Some(framing) = link.framing() else {
            notes.push(format!(
                "{} has link type {}, which guard cannot read",
                link.name, link.link_type
            ));
            continue;
        };
        let addrs: Vec<IpAddr> = iface_addrs
            .iter()
            .filter(|(name, ip)| *name == link.name && !ip.is_loopback())
            .map(|(_, ip)| *ip)
            .collect();
        for dest in destinations(&kernel, &desired.tables, &addrs, &listeners, &owners) {
            let row = judge.row(link, framing, &dest)?;
            rows.entry((dest.addr, dest.proto_name(), dest.port, link.name.clone())).or_insert(row);
        }
    }
    let mut rows: Vec<Row> = rows.into_values().collect();
    rows.sort_by(|a, b| {
        (&a.iface, &a.kind, &a.name, a.port).cmp(&(&b.iface, &b.kind, &b.name, b.port))
    });
    Ok(Exposure {
        pin_dir: pins.root().display().to_string(),
        mode: policy.mode.to_string(),
        policy: policy_source,
        rows,
        hooks,
        unguarded,
        trusted_sources: kernel
            .trusted
            .keys()
            .map(|k| sources::prefix_text(&k.data, k.len))
            .collect(),
        notes,
    })
}

/// Docker's containers and the engine's doors, as `guard status` reads them.
async fn docker_snapshot() -> anyhow::Result<crate::policy::snapshot::Snapshot> {
    let docker = DockerClient::connect().await?;
    let mut snapshot = docker.snapshot().await?;
    if let Ok(doors) = EngineDoorsWatch::default().doors(&docker).await {
        snapshot.doors = doors;
    }
    Ok(snapshot)
}

/// An address, port and protocol an outside host can aim at on one interface.
#[derive(Clone, Debug)]
struct Destination {
    addr: IpAddr,
    proto: Proto,
    /// The port the probe goes to; with `any_port`, one no rule of its own names.
    port: u16,
    any_port: bool,
    path: &'static str,
    process: Option<String>,
}

impl Destination {
    fn proto_name(&self) -> &'static str {
        self.proto.name()
    }
}

/// Every destination on an interface holding `addrs`: the published ports on those addresses,
/// every container address with each port a rule or Docker names (and `*` where a container's
/// every port is open), and the host's sockets bound to those addresses or to the wildcard.
fn destinations(
    kernel: &TableSet,
    desired: &TableSet,
    addrs: &[IpAddr],
    listeners: &[sock_diag::Listener],
    owners: &BTreeMap<u32, String>,
) -> Vec<Destination> {
    let mut out: Vec<Destination> = Vec::new();
    let tables = [kernel, desired];
    let published: BTreeSet<_> = tables.iter().flat_map(|t| t.published.keys()).collect();
    for key in published {
        let addr = IpAddr::from(key.addr);
        let Some(proto) = Proto::from_number(key.proto) else { continue };
        if addrs.contains(&addr) {
            let dest = Destination {
                addr,
                proto,
                port: key.port,
                any_port: false,
                path: "published",
                process: None,
            };
            out.push(dest);
        }
    }
    let containers: BTreeMap<_, _> = tables
        .iter()
        .flat_map(|t| t.addrs.iter())
        .filter(|(_, info)| info.kind == AddrInfo::CONTAINER)
        .map(|(addr, info)| (*addr, info.target))
        .collect();
    for (addr, target) in containers {
        let mut ports: BTreeSet<(u8, u16)> = BTreeSet::new();
        for t in tables {
            ports.extend(
                t.ports
                    .keys()
                    .filter(|k| k.target == target && k.proto != PROTO_ANY)
                    .map(|k| (k.proto, k.port)),
            );
            ports.extend(
                t.published
                    .iter()
                    .filter(|(_, p)| p.target == target)
                    .map(|(k, p)| (k.proto, p.port)),
            );
        }
        let all_ports_open =
            tables.iter().any(|t| t.addrs.get(&addr).is_some_and(|i| i.all_ports != OPEN_NONE));
        let addr = IpAddr::from(addr);
        // A port no rule of its own names stands for every such port of its protocol.
        let unnamed = |proto: Proto| {
            (1..=u16::MAX)
                .rev()
                .find(|p| {
                    !tables
                        .iter()
                        .any(|t| t.ports.contains_key(&PortKey::new(target, proto.number(), *p)))
                })
                .unwrap_or(u16::MAX)
        };
        for (proto, port) in ports {
            let Some(proto) = Proto::from_number(proto) else { continue };
            // Port 0 holds the rule for every port of the protocol (`*/udp`).
            let any_port = port == 0;
            let port = if any_port { unnamed(proto) } else { port };
            out.push(Destination { addr, proto, port, any_port, path: "direct", process: None });
        }
        if all_ports_open {
            out.push(Destination {
                addr,
                proto: Proto::Tcp,
                port: unnamed(Proto::Tcp),
                any_port: true,
                path: "direct",
                process: None,
            });
        }
    }
    for l in listeners {
        let proto = match l.transport {
            sock_diag::Transport::Tcp => Proto::Tcp,
            sock_diag::Transport::Udp => Proto::Udp,
        };
        let bound = l.bound();
        let process = owners.get(&l.inode).cloned();
        for addr in addrs.iter().filter(|a| {
            bound
                .iter()
                .any(|b| b.ip() == **a || (b.ip().is_unspecified() && b.is_ipv4() == a.is_ipv4()))
        }) {
            let port = l.addr.port();
            match out
                .iter_mut()
                .find(|d| d.addr == *addr && d.port == port && d.proto == proto && !d.any_port)
            {
                // docker-proxy on a published port: the row is the container's.
                Some(d) => d.process = d.process.clone().or(process.clone()),
                None => out.push(Destination {
                    addr: *addr,
                    proto,
                    port,
                    any_port: false,
                    path: "host",
                    process: process.clone(),
                }),
            }
        }
    }
    out
}

/// Runs the probes of a destination through the kernel and through the policy.
struct Judge<'a> {
    kernel: &'a TableSet,
    desired: &'a Desired,
    flows: &'a BTreeSet<FlowKey>,
    programs: Vec<(Framing, Xdp)>,
    /// Interfaces whose XDP program is missing, bridges whose gate is.
    missing: BTreeSet<(String, String)>,
    /// Each container's bridge, found by the network that holds its address.
    bridges: BTreeMap<u32, String>,
    /// An outside source no rule names, per family.
    unnamed: (IpAddr, IpAddr),
}

impl<'a> Judge<'a> {
    fn new(
        pins: &Pins,
        kernel: &'a TableSet,
        desired: &'a Desired,
        flows: &'a BTreeSet<FlowKey>,
        hooks: &[HookCheck],
        links: &[Link],
        iface_addrs: &[(String, IpAddr)],
    ) -> anyhow::Result<Self> {
        let mut programs = Vec::new();
        for framing in Framing::ALL {
            programs.push((framing, explain::open_pinned(pins, framing)?));
        }
        let missing = hooks
            .iter()
            .filter(|h| h.missing())
            .map(|h| (h.hook.clone(), h.iface.clone()))
            .collect();
        let bridges = kernel
            .addrs
            .iter()
            .filter(|(_, i)| i.kind == AddrInfo::CONTAINER)
            .filter_map(|(addr, info)| {
                let net = kernel.networks.keys().find(|n| addr.in_prefix(&n.data, n.len))?;
                let (bridge, _) = iface_addrs.iter().find(|(name, ip)| {
                    guard_common::addr::Addr::from(*ip).in_prefix(&net.data, net.len)
                        && links.iter().any(|l| l.is_bridge && l.name == *name)
                })?;
                Some((info.target, bridge.clone()))
            })
            .collect();
        let unnamed = sources::unnamed(&[kernel, &desired.tables])?;
        Ok(Judge { kernel, desired, flows, programs, missing, bridges, unnamed })
    }

    fn row(&self, link: &Link, framing: Framing, dest: &Destination) -> anyhow::Result<Row> {
        let anyone = if dest.addr.is_ipv4() { self.unnamed.0 } else { self.unnamed.1 };
        let first = self.probe(link, framing, dest, anyone)?;
        let target = first.resolved_target;
        let kind = if target == 0 {
            Kind::HostService
        } else if door::is_door(target) {
            Kind::EngineDoor
        } else {
            Kind::Container
        };
        // Three programs judge a packet to a container: XDP on the uplink, the gate on the
        // container's bridge after NAT (the same decision over the same maps), and, for TCP,
        // the uplink's TC egress, which judges the SYN-ACK as the connection it accepts. The
        // engine's doors and host services are XDP's alone. What one of them drops is dropped;
        // with all of them missing, everything gets in.
        let present = |hook: Hook, iface: Option<&String>| {
            iface.is_some_and(|i| !self.missing.contains(&(hook.name().to_string(), i.clone())))
        };
        let container = kind == Kind::Container;
        let judged = present(Hook::Xdp, Some(&link.name))
            || container && present(Hook::BridgeGate, self.bridges.get(&target))
            || container && dest.proto == Proto::Tcp && present(Hook::TcEgress, Some(&link.name));
        let lets_in = |kernel_pass: bool| kernel_pass || !judged;

        let proto_number = dest.proto.number();
        let port_key = PortKey::new(target, proto_number, first.container_port);
        let prefixes: BTreeSet<(guard_common::addr::Addr, u32)> =
            [self.kernel, &self.desired.tables]
                .iter()
                .flat_map(|t| t.sources.keys())
                .filter(|s| s.data.port == port_key || s.data.port == PortKey::all_ports(target))
                .filter(|s| s.data.addr.is_v4() == dest.addr.is_ipv4())
                .map(|s| (s.data.addr, s.len - guard_common::maps::SourceKey::PORT_BITS))
                .collect();
        let (mut kernel_in, mut policy_in) = (Vec::new(), Vec::new());
        if target != 0 {
            for (addr, len) in &prefixes {
                let p = self.probe(link, framing, dest, sources::representative(addr, *len))?;
                let text = sources::prefix_text(addr, *len);
                if lets_in(p.kernel_pass) {
                    kernel_in.push(text.clone());
                }
                if p.policy_pass {
                    policy_in.push(text);
                }
            }
        }
        let reach = Reach::from_probes(lets_in(first.kernel_pass), kernel_in);
        let policy = Reach::from_probes(first.policy_pass, policy_in);
        let drift = (reach != policy).then(|| {
            format!(
                "the kernel lets in {} where the policy opens it to {}",
                reach.text(),
                policy.text()
            )
        });
        let container = self.container(target);
        let name = match kind {
            Kind::HostService => dest.process.clone().unwrap_or_else(|| "?".into()),
            Kind::EngineDoor => doors::name(target).unwrap_or("engine").into(),
            Kind::Container => {
                container.map_or_else(|| self.short_id(target), |c| c.container.name.clone())
            }
        };
        let why = match kind {
            Kind::HostService if first.reason == Reason::NotContainerBound => {
                vec!["host service, not judged".into()]
            }
            Kind::HostService => vec![format!("dropped: {}", first.reason.name())],
            Kind::EngineDoor => {
                vec!["the engine's door: the swarm's nodes and [management] prefixes".into()]
            }
            Kind::Container => {
                let rules: BTreeSet<String> = container
                    .into_iter()
                    .flat_map(|c| &c.openings)
                    .filter(|o| {
                        let every_port = o.ports == crate::policy::PortSpec::All
                            || o.ports == crate::policy::PortSpec::EveryPortOf(dest.proto);
                        dest.any_port && every_port
                            || !dest.any_port && o.ports.covers(dest.proto, first.container_port)
                    })
                    .map(|o| o.rule.clone())
                    .collect();
                // What is open may be rate-limited: the rule that says so, with its limit.
                let port = (!dest.any_port).then_some(first.container_port);
                let limit = container
                    .and_then(|c| crate::policy::rates::rule_for(&c.limits, dest.proto, port));
                if rules.is_empty() {
                    vec!["closed: no label or policy rule opens it".into()]
                } else {
                    rules.into_iter().chain(limit.map(|l| format!("{} ({l})", l.rule))).collect()
                }
            }
        };
        Ok(Row {
            iface: link.name.clone(),
            address: dest.addr.to_string(),
            port: if dest.any_port { 0 } else { dest.port },
            proto: dest.proto.name().into(),
            path: dest.path.into(),
            kind: kind.clone(),
            name,
            container_port: (kind == Kind::Container && !dest.any_port)
                .then_some(first.container_port),
            process: if kind == Kind::HostService { None } else { dest.process.clone() },
            reach,
            policy,
            why,
            drift,
        })
    }

    /// One synthesised first packet from `src` to `dest`, arriving on `link`: the kernel's
    /// verdict and the policy's.
    fn probe(
        &self,
        link: &Link,
        framing: Framing,
        dest: &Destination,
        src: IpAddr,
    ) -> anyhow::Result<Probe> {
        let transport = match dest.proto {
            Proto::Tcp => Transport::Tcp(dest.port),
            Proto::Udp => Transport::Udp(dest.port),
            Proto::Sctp => Transport::Sctp(dest.port),
        };
        let frame =
            Frame { src, dst: dest.addr, framing, ..Frame::new("0.0.0.0", "0.0.0.0", transport) };
        let bytes = frame.bytes();
        let program = self.programs.iter().find(|(f, _)| *f == framing).map(|(_, p)| p);
        let program = program.context("no explain program for that framing")?;
        let kernel = explain::test_run(program, &bytes, link.ifindex).with_context(|| {
            format!("judging {src} -> {}:{} on {}", dest.addr, dest.port, link.name)
        })?;
        let parsed = || guard_common::parse::parse(&bytes.as_slice(), framing);
        let (_, resolved) =
            decide_parsed(&WithFlows { tables: self.kernel, flows: self.flows }, parsed());
        let (policy, _) =
            decide_parsed(&WithFlows { tables: &self.desired.tables, flows: self.flows }, parsed());
        Ok(Probe {
            kernel_pass: kernel.verdict() == Verdict::Pass,
            policy_pass: policy.verdict() == Verdict::Pass,
            reason: kernel.reason,
            resolved_target: resolved.target,
            container_port: if resolved.port == 0 { dest.port } else { resolved.port },
        })
    }

    fn container(&self, target: u32) -> Option<&ContainerPolicy> {
        self.desired.containers.iter().find(|c| c.target == target)
    }

    fn short_id(&self, target: u32) -> String {
        self.kernel
            .identities
            .get(&target)
            .map_or_else(|| format!("target {target}"), |id| encode_hex(&id.0)[..12].to_string())
    }
}

struct Probe {
    kernel_pass: bool,
    policy_pass: bool,
    reason: Reason,
    resolved_target: u32,
    container_port: u16,
}
