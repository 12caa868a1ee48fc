//! `guard explain SRC DST[:PORT[/PROTO]]`: why a packet from SRC to DST gets its verdict.
//!
//! The decision is the kernel's: the pinned explain program (the filter's own code over the
//! pinned maps, in the framing of the interface the packet arrives on) runs on a synthesised
//! frame through BPF_PROG_TEST_RUN and returns its decision instead of acting on it, so asking
//! is never counted as traffic. The container and port come from the reference over the same
//! maps, the rule from the desired state, named through Docker.

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr, path::Path, str::FromStr};

use anyhow::{Context as _, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use guard_common::{
    decision::{Resolved, decide_parsed},
    maps::FlowKey,
    reason::{Decision, Reason, Verdict},
};
use serde::Serialize;

use crate::{
    host::docker::DockerClient,
    host::interfaces,
    host::interfaces::Framing,
    kernel::frames::{Frame, Transport},
    kernel::hook::Hook,
    kernel::maps::PolicyMaps,
    kernel::pins::Pins,
    policy::Proto,
    policy::file as policy_file,
    policy::rates::{self, Limit},
    state::desired::ContainerPolicy,
    state::doors,
    state::identities::encode_hex,
    state::openings,
    state::reconcile::{Inputs, Reconciler},
    state::tables::{TableSet, WithFlows},
};

/// What to explain: a source and a destination, with a port unless the packet is port-less
/// (then an ICMP echo is synthesised).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: Option<(u16, Proto)>,
}

/// Where a packet to explain goes: an address, or a container named as Docker names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Address(IpAddr),
    Container(String),
}

/// `DST[:PORT[/PROTO]]`, DST an address or a container's name; IPv6 with a port in brackets
/// (`[fd00::4]:443/tcp`).
pub fn parse_destination(s: &str) -> anyhow::Result<(Destination, Option<(u16, Proto)>)> {
    let bad = || {
        anyhow::anyhow!(
            "{s:?}: expected ADDRESS[:PORT[/PROTO]] or CONTAINER[:PORT[/PROTO]], e.g. 172.17.0.2:5432/tcp, [fd00::4]:443 or db:5432"
        )
    };
    let destination = |host: &str| match IpAddr::from_str(host) {
        Ok(ip) => Some(Destination::Address(ip)),
        // Docker's names: [a-zA-Z0-9][a-zA-Z0-9_.-]*
        Err(_) if is_container_name(host) => Some(Destination::Container(host.to_string())),
        Err(_) => None,
    };
    if let Some(whole) = destination(s) {
        return Ok((whole, None));
    }
    let (dst, port) = match s.strip_prefix('[') {
        // Brackets hold an IPv6 address, nothing else.
        Some(rest) => {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            let ip: std::net::Ipv6Addr = host.parse().map_err(|_| bad())?;
            (Destination::Address(ip.into()), port)
        }
        None => {
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            (destination(host).ok_or_else(bad)?, port)
        }
    };
    let (port, proto) = port.split_once('/').unwrap_or((port, "tcp"));
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let proto: Proto = proto
        .parse()
        .map_err(|()| anyhow::anyhow!("unknown protocol {proto:?}: expected tcp, udp or sctp"))?;
    Ok((dst, Some((port, proto))))
}

fn is_container_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The address of the container named `name` in the family of `src` (through Docker).
pub async fn container_address(name: &str, src: IpAddr) -> anyhow::Result<IpAddr> {
    let docker = DockerClient::connect().await?;
    let snapshot = docker.snapshot().await?;
    let container =
        snapshot.containers.iter().find(|c| c.name == name).ok_or_else(|| {
            anyhow::anyhow!("no running container named {name} (see `docker ps`)")
        })?;
    let family = if src.is_ipv4() { "IPv4" } else { "IPv6" };
    container.addresses.iter().copied().find(|a| a.is_ipv4() == src.is_ipv4()).ok_or_else(|| {
        anyhow::anyhow!(
            "container {name} has no {family} address, and the source {src} is {family}"
        )
    })
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The kernel's verdict: "pass" or "drop".
    pub verdict: &'static str,
    pub reason: &'static str,
    /// A drop waived by audit mode.
    pub audited: bool,
    /// The container the packet is bound for, if any.
    pub container: Option<String>,
    /// The rule that decided (a label, a file rule, trusted sources, flow memory, the default).
    pub rule: String,
    /// The limit on new flows per source the port puts on what it lets in
    /// (`100/s burst 200 (label guard.ratelimit)`), when the verdict opens it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// One sentence for people.
    pub detail: String,
}

pub async fn explain(
    pins: &Pins,
    config: &Path,
    query: Query,
    iface: Option<&str>,
) -> anyhow::Result<Explanation> {
    if query.src.is_ipv4() != query.dst.is_ipv4() {
        bail!("source and destination must be of one address family");
    }
    if !pins.exists() {
        bail!("guard is not loaded at {}: start it with `guard run`", pins.root().display());
    }
    let maps = PolicyMaps::from_pins(pins)?;
    let tables = maps.read()?;
    let flows = live_flows(&maps)?;

    let transport = match query.port {
        Some((port, Proto::Tcp)) => Transport::Tcp(port),
        Some((port, Proto::Udp)) => Transport::Udp(port),
        Some((port, Proto::Sctp)) => Transport::Sctp(port),
        None => Transport::Icmp,
    };
    let Arriving { ifindex, framing, unguarded } = interface(pins, iface)?;
    if let Some(name) = unguarded {
        return Ok(Explanation {
            verdict: "pass",
            reason: "not_guarded",
            audited: false,
            container: None,
            rule: format!("none: guard does not run on {name}"),
            limit: None,
            detail: format!(
                "{name} is not an interface guard protects (not an uplink, or trusted): nothing arriving on it is judged"
            ),
        });
    }
    let frame = Frame {
        src: query.src,
        dst: query.dst,
        framing,
        ..Frame::new("0.0.0.0", "0.0.0.0", transport)
    };
    let bytes = frame.bytes();
    let decision = run_pinned(pins, &bytes, ifindex, framing)?;

    // The container and port the packet resolves to, from the reference over the same maps
    // (the kernel returns only its decision).
    let parsed = guard_common::parse::parse(&bytes.as_slice(), frame.framing);
    let (reference, resolved) =
        decide_parsed(&WithFlows { tables: &tables, flows: &flows }, parsed);
    if reference.verdict() != decision.verdict() {
        bail!(
            "the kernel says {:?} ({}) but the maps say {:?} ({}): is an agent of another version running?",
            decision.verdict(),
            decision.reason.name(),
            reference.verdict(),
            reference.reason.name()
        );
    }

    // Name the container and the rule through Docker and the policy file (best effort: the
    // verdict above stands without them).
    let policy = if resolved.target == 0 {
        None
    } else {
        container_policy(&tables.identities, resolved.target, config).await.ok().flatten()
    };
    let door = doors::name(resolved.target);
    let container = door.map(String::from).or_else(|| {
        policy.as_ref().map(|p| p.container.name.clone()).or_else(|| {
            tables.identities.get(&resolved.target).map(|id| encode_hex(&id.0)[..12].to_string())
        })
    });
    let port = (resolved.port != 0).then(|| (resolved.port, Proto::from_number(resolved.proto)));
    let mut rule = rule_for(decision, resolved.target, policy.as_ref(), port, query.src);
    let published = resolved.published != 0 && door.is_none();
    // The limit a port puts on what its opening lets in: said when it opens, and when it
    // is what dropped.
    let limited =
        matches!(decision.reason, Reason::Exposed | Reason::AllowedSource | Reason::RateLimited);
    let limit = if limited { limit_at(&tables, &resolved, policy.as_ref()) } else { None };
    let sentence = limit.as_ref().map(|(limit, _)| limit.sentence(query.src.is_ipv6()));
    let detail = detail(decision, &query, container.as_deref(), port, published, sentence);
    let limit = limit.map(|(limit, said_by)| match said_by {
        Some(said_by) => format!("{limit} ({said_by})"),
        None => limit.to_string(),
    });
    if let (Reason::RateLimited, Some(limit)) = (decision.reason, &limit) {
        rule = format!("rate limit {limit}");
    }
    Ok(Explanation {
        verdict: if decision.verdict() == Verdict::Pass { "pass" } else { "drop" },
        reason: decision.reason.name(),
        audited: decision.audited,
        container,
        rule,
        limit,
        detail,
    })
}

/// The limit the kernel puts on new flows to the resolved port, in the words of the rule that
/// set it when the labels and policy file still say so.
fn limit_at(
    tables: &TableSet,
    resolved: &Resolved,
    policy: Option<&ContainerPolicy>,
) -> Option<(Limit, Option<String>)> {
    let (key, held) =
        rates::in_force(&tables.rates, resolved.target, resolved.proto, resolved.port)?;
    let port = (!key.is_every_port_of_proto()).then_some(resolved.port);
    let said = policy
        .zip(Proto::from_number(resolved.proto))
        .and_then(|(policy, proto)| rates::rule_for(&policy.limits, proto, port))
        .filter(|rule| rule.limit.to_kernel() == held);
    // In the operator's words when they are what the kernel holds (60/m is 1/s there).
    match said {
        Some(rule) => Some((rule.limit, Some(rule.rule.clone()))),
        None => Some((Limit::from_kernel(held), None)),
    }
}

/// Where an explained packet arrives, and how that link frames its packets.
struct Arriving {
    ifindex: u32,
    framing: Framing,
    /// The interface named, if guard does not run on it.
    unguarded: Option<String>,
}

/// The interface a packet is explained as arriving on: the one named, or the first guarded
/// uplink.
fn interface(pins: &Pins, iface: Option<&str>) -> anyhow::Result<Arriving> {
    let links = interfaces::links()?;
    let guarded = pins.pinned_ifindexes(Hook::Xdp)?;
    let link = match iface {
        Some(name) => Some(
            links
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| anyhow::anyhow!("no interface named {name} (see `ip link`)"))?,
        ),
        None => guarded.first().and_then(|ifindex| links.iter().find(|l| l.ifindex == *ifindex)),
    };
    let Some(link) = link else {
        return Ok(Arriving { ifindex: 0, framing: Framing::Ethernet, unguarded: None });
    };
    if !guarded.contains(&link.ifindex) {
        let unguarded = Some(link.name.clone());
        return Ok(Arriving { ifindex: link.ifindex, framing: Framing::Ethernet, unguarded });
    }
    let framing = link.framing().ok_or_else(|| {
        anyhow::anyhow!(
            "{} has link type {}, which guard cannot read: nothing on it is judged",
            link.name,
            link.link_type
        )
    })?;
    Ok(Arriving { ifindex: link.ifindex, framing, unguarded: None })
}

/// Runs the pinned explain program of `framing` once on `frame`, as if it arrived on
/// `ifindex`: the kernel's decision, returned instead of acted on (nothing is counted, no drop
/// event is emitted, so asking never looks like traffic).
fn run_pinned(
    pins: &Pins,
    frame: &[u8],
    ifindex: u32,
    framing: Framing,
) -> anyhow::Result<Decision> {
    test_run(&open_pinned(pins, framing)?, frame, ifindex)
}

/// The flows the egress programs remember that still count (TCP until the kernel evicts
/// them, the others for [`guard_common::maps::FLOW_TIMEOUT_NS`]), as the kernel's decision sees them.
pub(crate) fn live_flows(maps: &PolicyMaps) -> anyhow::Result<BTreeSet<FlowKey>> {
    let now = crate::host::clock::monotonic_ns();
    Ok(maps.flows()?.into_iter().filter(|(k, seen)| k.alive(*seen, now)).map(|(k, _)| k).collect())
}

/// The pinned explain program of `framing`.
pub(crate) fn open_pinned(pins: &Pins, framing: Framing) -> anyhow::Result<Xdp> {
    let path = pins.explain_program(framing);
    Xdp::from_pin(&path, aya_obj::programs::XdpAttachType::Interface).with_context(|| {
        format!(
            "opening the pinned program {} (an agent of this version pins it: restart `guard run`)",
            path.display()
        )
    })
}

/// Runs `program` (a pinned explain program) once on `frame` as if it arrived on `ifindex`.
pub(crate) fn test_run(program: &Xdp, frame: &[u8], ifindex: u32) -> anyhow::Result<Decision> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> =
        [0, frame.len() as u32, 0, ifindex, 0, 0].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let result = program
        .test_run(TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), ..Default::default() })
        .context("running the pinned program (BPF_PROG_TEST_RUN)")?;
    Decision::from_counter_slot(result.return_value).ok_or_else(|| {
        anyhow::anyhow!("the explain program returned {}, no decision", result.return_value)
    })
}

/// The desired-state view of the container behind `target`.
async fn container_policy(
    identities: &std::collections::BTreeMap<u32, guard_common::maps::ContainerId>,
    target: u32,
    config: &Path,
) -> anyhow::Result<Option<ContainerPolicy>> {
    let docker = DockerClient::connect().await?;
    let snapshot = docker.snapshot().await?;
    let policy = policy_file::load(config)?;
    let mut reconciler = Reconciler::adopt(identities.clone());
    let host = interfaces::host_addresses()?;
    let desired = reconciler.desired_state(&Inputs::new(&snapshot, &host, &policy));
    Ok(desired.containers.into_iter().find(|c| c.target == target))
}

/// The rule behind a decision.
fn rule_for(
    decision: Decision,
    target: u32,
    policy: Option<&ContainerPolicy>,
    port: Option<(u16, Option<Proto>)>,
    src: IpAddr,
) -> String {
    match decision.reason {
        Reason::Exposed | Reason::AllowedSource => {
            let openings = policy.map_or(&[][..], |p| &p.openings[..]);
            openings::rule(decision.reason, target, openings, port, src).unwrap_or_default()
        }
        Reason::Closed => "default: closed to outside".into(),
        Reason::UnassignedAddr => "default: Docker network addresses are closed".into(),
        Reason::UnseenNetwork => "default: networks guard has not seen are closed".into(),
        Reason::Reply => "flow memory".into(),
        Reason::TrustedSource => "policy file: trusted_sources".into(),
        Reason::LoopbackDst => "loopback is never reachable from an uplink".into(),
        Reason::Unreadable | Reason::MappedSource => "frames guard cannot read fail closed".into(),
        Reason::SpoofedSource => "a container's address never arrives on an uplink".into(),
        Reason::MalformedIp => "malformed frames are the kernel's to discard".into(),
        Reason::LaterFragment => "later fragments follow their first fragment".into(),
        Reason::NotContainerBound | Reason::NotIp => "none: not guard's business".into(),
        Reason::ManagementPort => {
            "default: the engine's doors are open to the swarm's nodes and [management] prefixes only".into()
        }
        Reason::Denied => "a ban (guard bans), the policy file's deny or a deny file".into(),
        Reason::RateLimited => "a rate limit (guard.ratelimit or the policy file)".into(),
    }
}

fn detail(
    decision: Decision,
    q: &Query,
    container: Option<&str>,
    port: Option<(u16, Option<Proto>)>,
    published: bool,
    limit: Option<String>,
) -> String {
    let mut s = String::new();
    let target = match (container, port) {
        (Some(c), Some((p, Some(proto)))) => format!("container {c} port {p}/{proto}"),
        (Some(c), _) => format!("container {c}"),
        (None, _) => format!("{}", q.dst),
    };
    let path = if published { " through a port Docker publishes" } else { "" };
    let _ = match decision.reason {
        Reason::Exposed => write!(s, "{target} is open to everyone{path}"),
        Reason::AllowedSource => write!(s, "{target} is open to {}{path}", q.src),
        Reason::Closed => write!(s, "no label or policy rule opens {target} to {}{path}", q.src),
        Reason::UnassignedAddr => {
            write!(s, "{} is in a Docker network but no container holds it", q.dst)
        }
        Reason::UnseenNetwork => {
            write!(s, "{} is behind a Docker bridge the agent has not listed", q.dst)
        }
        Reason::Reply => write!(s, "answers a flow that {target} started (flow memory){path}"),
        Reason::TrustedSource => write!(s, "{} is a trusted source: treated as inside", q.src),
        Reason::LoopbackDst => {
            write!(s, "{} is a loopback address; from an uplink it is an attack", q.dst)
        }
        Reason::NotContainerBound => write!(
            s,
            "{} is not bound for a container: the host's own traffic, or routed through it",
            q.dst
        ),
        Reason::Unreadable => write!(s, "the frame cannot be read far enough to judge"),
        Reason::SpoofedSource => {
            write!(s, "{} is a container on this host: from an uplink it is forged", q.src)
        }
        Reason::MappedSource => {
            write!(s, "{} is an IPv4-mapped IPv6 source, which no host sends from", q.src)
        }
        Reason::LaterFragment => {
            write!(s, "a later fragment is delivered only with its first, which is judged")
        }
        Reason::MalformedIp | Reason::NotIp => write!(s, "the frame is malformed"),
        Reason::ManagementPort => write!(
            s,
            "{target} is the engine's own door, and {} is neither a node of the swarm nor in the policy file's [management] prefixes",
            q.src
        ),
        Reason::Denied => {
            write!(s, "{} is denied every container port, whatever opens {target}", q.src)
        }
        Reason::RateLimited => {
            write!(s, "{} started new flows to {target} faster than its rate limit", q.src)
        }
    };
    if let Some(limit) = limit {
        let _ = write!(s, ", {limit}");
    }
    if decision.audited {
        s.push_str("; audit mode: it would be dropped, and passes");
    }
    s
}

/// The text output: the verdict alone on the first line, for scripts.
pub fn render(e: &Explanation) -> String {
    let mut out = format!(
        "{}\nreason: {}{}\n",
        e.verdict,
        e.reason,
        if e.audited { " (audit mode: would drop)" } else { "" }
    );
    if let Some(c) = &e.container {
        let _ = writeln!(out, "container: {c}");
    }
    let _ = writeln!(out, "rule: {}", e.rule);
    if let Some(limit) = &e.limit {
        let _ = writeln!(out, "limit: {limit}");
    }
    let _ = writeln!(out, "{}", e.detail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opened_port_s_limit_is_said_before_audit_mode() {
        let q = Query {
            src: "203.0.113.9".parse().unwrap(),
            dst: "172.17.0.2".parse().unwrap(),
            port: Some((80, Proto::Tcp)),
        };
        let limit = rates::parse_limit("10/s", Some(20)).unwrap();
        let say = |decision, published| {
            let port = Some((80, Some(Proto::Tcp)));
            detail(decision, &q, Some("web"), port, published, Some(limit.sentence(false)))
        };
        assert_eq!(
            say(Decision::enforced(Reason::Exposed), true),
            "container web port 80/tcp is open to everyone through a port Docker publishes, limited to 10 new flows/s per source, burst 20"
        );
        assert_eq!(
            say(Decision { reason: Reason::RateLimited, audited: true }, false),
            "203.0.113.9 started new flows to container web port 80/tcp faster than its rate limit, limited to 10 new flows/s per source, burst 20; audit mode: it would be dropped, and passes"
        );
    }

    #[test]
    fn destinations_parse() {
        let ip = |s: &str| Destination::Address(s.parse::<IpAddr>().unwrap());
        let name = |s: &str| Destination::Container(s.to_string());
        assert_eq!(parse_destination("172.17.0.2").unwrap(), (ip("172.17.0.2"), None));
        assert_eq!(
            parse_destination("172.17.0.2:5432").unwrap(),
            (ip("172.17.0.2"), Some((5432, Proto::Tcp)))
        );
        assert_eq!(
            parse_destination("10.0.0.1:53/udp").unwrap(),
            (ip("10.0.0.1"), Some((53, Proto::Udp)))
        );
        assert_eq!(
            parse_destination("[fd00::4]:443/tcp").unwrap(),
            (ip("fd00::4"), Some((443, Proto::Tcp)))
        );
        assert_eq!(parse_destination("fd00::4").unwrap(), (ip("fd00::4"), None));
        assert_eq!(parse_destination("db").unwrap(), (name("db"), None));
        assert_eq!(
            parse_destination("my_app-db.1:5432/tcp").unwrap(),
            (name("my_app-db.1"), Some((5432, Proto::Tcp)))
        );
        for bad in [
            "",
            "10.0.0.1:0",
            "10.0.0.1:99999",
            "10.0.0.1:80/icmp",
            "[fd00::4]443",
            "-db:80",
            "db/x:80",
            "[db]:80",
        ] {
            assert!(parse_destination(bad).is_err(), "{bad:?}");
        }
    }
}
