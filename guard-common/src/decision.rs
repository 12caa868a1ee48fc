//! The policy decision, written once.
//!
//! [`decide`] is generic over [`Tables`]: the XDP program instantiates it with BPF map lookups,
//! the agent with its desired state. Both therefore share one definition of the rules (README,
//! "What it protects"), and user space can test and explain verdicts
//! against exactly what the kernel runs.
//!
//! The order of the lookups is the order of their cost and of how often they settle a packet:
//! the prefilter (a bit test) clears most traffic, a closed container costs one hash lookup,
//! longest-prefix matches are reached only for source lists and unassigned addresses, and flow
//! memory only on the would-drop path.

use crate::{
    addr::Addr,
    maps::{
        AddrInfo, FlowKey, OPEN_EVERYONE, OPEN_LISTED, OPEN_NONE, PORT_RULES_PER_PROTO,
        PORT_RULES_SINGLE, PortKey, PortRule, PublishedKey, PublishedTarget, TARGET_AUDIT, door,
    },
    reason::{Decision, Reason, Verdict},
};

/// What the decision needs to know about a packet that arrived on an uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub l4: L4,
}

impl Packet {
    /// The flow this packet belongs to, keyed as it arrives: its source is the remote end.
    /// A reply's key is the one flow memory holds for the flow it answers.
    #[inline(always)]
    pub fn flow(&self) -> FlowKey {
        FlowKey {
            remote: self.src,
            local: self.dst,
            remote_port: self.l4.sport,
            local_port: self.l4.dport,
            proto: self.l4.proto,
            _pad: [0; 3],
        }
    }
}

/// What kind of transport layer a packet has, as far as the decision cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Kind {
    /// TCP, UDP or SCTP with its ports; or an ICMP echo, its identifier as the local port
    /// (see [`crate::parse`]).
    Ports,
    /// A protocol without ports (other ICMP, GRE, ...): only a container's all-ports rule can
    /// open it.
    NoPorts,
    /// A later fragment. It passes: the kernel delivers nothing of a fragmented packet until it
    /// is reassembled with its first fragment, which carries the ports and is judged, and it
    /// discards overlapping fragments (Linux 4.19 on, both families), so a later fragment
    /// cannot rewrite the ports its first fragment was judged by. Dropping them would break
    /// every large reply.
    LaterFragment,
    /// A transport header (or extension-header chain) that cannot be read far enough to judge:
    /// dropped (see [`crate::parse`]).
    Unreadable,
}

/// The transport layer. A plain struct rather than an enum with fields on purpose: every
/// field is always initialised, so the compiler never fills an unused field of a packed enum
/// with whatever a register held (a packet pointer, once), which the BPF verifier rejects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4 {
    pub kind: L4Kind,
    pub proto: u8,
    /// Host byte order; 0 unless `kind` is [`L4Kind::Ports`].
    pub sport: u16,
    pub dport: u16,
    /// The packet opens a flow (a TCP SYN without ACK, an ICMP echo request): never a reply.
    pub opens: bool,
    /// These are the ports of the flow an ICMP error quotes, not of the packet itself (see
    /// [`crate::parse`]): judged like that flow's reply, never remembered as a flow.
    pub quoted: bool,
    /// The packet accepts a connection (a TCP SYN with ACK): its sender is the server.
    pub accepts: bool,
}

impl L4 {
    pub const NO_PORTS: L4 = L4::without_ports(L4Kind::NoPorts);
    pub const LATER_FRAGMENT: L4 = L4::without_ports(L4Kind::LaterFragment);
    pub const UNREADABLE: L4 = L4::without_ports(L4Kind::Unreadable);

    /// A packet of protocol `proto` without ports (other ICMP, GRE, ...): the protocol only
    /// names it in drop events.
    #[inline(always)]
    pub const fn no_ports(proto: u8) -> L4 {
        L4 { proto, ..L4::NO_PORTS }
    }

    const fn without_ports(kind: L4Kind) -> L4 {
        L4 { kind, proto: 0, sport: 0, dport: 0, opens: false, quoted: false, accepts: false }
    }

    #[inline(always)]
    pub const fn ports(proto: u8, sport: u16, dport: u16, opens: bool) -> L4 {
        L4 { kind: L4Kind::Ports, proto, sport, dport, opens, quoted: false, accepts: false }
    }

    /// The reply an ICMP error about a flow with `quoted` ports stands for.
    #[inline(always)]
    pub const fn standing_for(quoted: L4) -> L4 {
        L4 {
            kind: L4Kind::Ports,
            proto: quoted.proto,
            sport: quoted.dport,
            dport: quoted.sport,
            opens: false,
            quoted: true,
            accepts: false,
        }
    }
}

/// Read access to the policy tables. Implementations must be pure lookups.
pub trait Tables {
    /// Prefilter: `false` proves no container and no Docker network holds `dst`.
    fn may_hold_container(&self, dst: &Addr) -> bool;
    /// Prefilter: `false` proves Docker publishes `port` on no address and protocol.
    fn may_be_published(&self, port: u16) -> bool;
    fn published(&self, key: &PublishedKey) -> Option<PublishedTarget>;
    fn addr_info(&self, addr: &Addr) -> Option<AddrInfo>;
    /// Whether `addr` lies in any Docker network's subnet.
    fn in_docker_network(&self, addr: &Addr) -> bool;
    fn port_rule(&self, key: &PortKey) -> Option<PortRule>;
    /// Whether `src` lies in a prefix listed for the opened port `key`.
    fn source_listed(&self, key: &PortKey, src: &Addr) -> bool;
    /// Whether a flow the host or a container started left through an uplink with `key`
    /// (and, for protocols without connection state, recently enough).
    fn flow_seen(&self, key: &FlowKey) -> bool;
    /// Whether the policy file trusts `src` (treats it as inside). Consulted only before a drop.
    fn source_trusted(&self, src: &Addr) -> bool;
    /// Whether the operator denied `src` every container port (bans, deny lists and files).
    /// Consulted only for container-bound packets.
    fn source_denied(&self, src: &Addr) -> bool;
    /// Whether the whole host is in audit mode.
    fn audit_all(&self) -> bool;
    /// Whether the host would keep a unicast packet for `dst` rather than forward it: one of
    /// its addresses, broadcast or anycast ones, or a local route (AnyIP), including any the
    /// agent has not listed yet. Asked only on the would-pass path of a published port.
    fn delivered_locally(&self, dst: &Addr) -> bool;
    /// Whether the packet is judged where it can only be bound for a container: at a Docker
    /// bridge, or as the connection a container's answer accepts. A destination the tables do
    /// not list is then a container or network the agent has not seen (closed), not the
    /// host's business.
    fn behind_bridge(&self) -> bool {
        false
    }
}

/// The container a container-bound packet is for, as the decision resolved it. Plain fields
/// (no `Option`), for the same reason as [`L4`]: the kernel never sees undefined bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The target id; 0 when the packet is not bound for a container.
    pub target: u32,
    /// The container port (host byte order); 0 for port-less packets.
    pub port: u16,
    pub proto: u8,
    /// 1 if it came through a port Docker publishes, 0 if routed to the container directly.
    pub published: u8,
    /// The target's `TARGET_*` flags.
    pub flags: u8,
}

/// The decision for a packet that arrived on an uplink.
#[inline(always)]
pub fn decide<T: Tables>(tables: &T, pkt: &Packet) -> Decision {
    decide_resolved(tables, pkt).0
}

/// The decision for a frame as [`crate::parse`] left it: a packet, or the reason parsing
/// stopped. Audit mode waives a parse-time drop like any other.
#[inline(always)]
pub fn decide_parsed<T: Tables>(
    tables: &T,
    parsed: Result<Packet, Reason>,
) -> (Decision, Resolved) {
    match parsed {
        Ok(pkt) => decide_resolved(tables, &pkt),
        Err(reason) => {
            let audited = reason.verdict() == Verdict::Drop && tables.audit_all();
            (Decision { reason, audited }, Resolved::default())
        }
    }
}

/// [`decide`], and the container it resolved (for `guard explain`). First [`classify`] under
/// the rules alone, then what the policy file says about would-drops: trusted sources pass,
/// audit mode counts and passes.
#[inline(always)]
pub fn decide_resolved<T: Tables>(tables: &T, pkt: &Packet) -> (Decision, Resolved) {
    let (reason, resolved) = classify(tables, pkt);
    if reason.verdict() == Verdict::Pass {
        return (Decision::enforced(reason), resolved);
    }
    // Trust lets in no denied source either.
    if reason.closes_by_default()
        && tables.source_trusted(&pkt.src)
        && !denied(tables, resolved.target, &pkt.src)
    {
        return (Decision::enforced(Reason::TrustedSource), resolved);
    }
    let audited = resolved.flags & TARGET_AUDIT != 0 || tables.audit_all();
    (Decision { reason, audited }, resolved)
}

/// The reason for a packet's verdict under the rules alone, and the container it is bound for.
#[inline(always)]
pub fn classify<T: Tables>(tables: &T, pkt: &Packet) -> (Reason, Resolved) {
    let none = Resolved::default();
    if pkt.dst.is_loopback() {
        return (Reason::LoopbackDst, none);
    }
    // A container's own packets leave through an uplink; one arriving on it with a
    // container's address is forged. Checked for every packet, container-bound or not: sent
    // through the host to the forger itself, it would reach a Docker bridge's flow memory
    // (a physical port enslaved to a bridge) as a flow the container started. The prefilter
    // bit keeps this to a bit test for sources outside Docker's address buckets.
    if tables.may_hold_container(&pkt.src)
        && tables.addr_info(&pkt.src).is_some_and(|info| info.kind == AddrInfo::CONTAINER)
    {
        return (Reason::SpoofedSource, none);
    }
    let l4 = pkt.l4;
    match l4.kind {
        L4Kind::LaterFragment => return (Reason::LaterFragment, none),
        L4Kind::Unreadable => return (Reason::Unreadable, none),
        L4Kind::Ports | L4Kind::NoPorts => {}
    }
    // Plain booleans, not an Option of the port: LLVM once spilled the undefined payload of a
    // `None` to the stack, which the verifier rejects (`!read_ok`), as with `L4`.
    let port_published = l4.kind == L4Kind::Ports && tables.may_be_published(l4.dport);
    let dst_may_hold = tables.may_hold_container(&pkt.dst);
    if !dst_may_hold && !port_published {
        return (not_listed(tables, pkt), none);
    }

    // Published: a host address (gateways included) and a port Docker publishes on it.
    if port_published && let Some(p) = published_target(tables, &pkt.dst, l4.proto, l4.dport) {
        let proto = l4.proto;
        let resolved =
            Resolved { target: p.target, port: p.port, proto, published: 1, flags: p.flags };
        let rules = Some(PortRules {
            port: (PortKey::new(p.target, proto, p.port), p.rule),
            proto: (PortKey::every_port_of(p.target, proto), p.proto_rule),
        });
        let reason = match judge(tables, pkt, p.target, rules, p.all_ports) {
            Reason::Closed if door::is_door(p.target) => Reason::ManagementPort,
            reason => reason,
        };
        return (reason, resolved);
    }
    if !dst_may_hold {
        return (not_listed(tables, pkt), none);
    }

    // Direct: a container's address, or an address in a Docker network.
    match tables.addr_info(&pkt.dst) {
        Some(info) if info.kind == AddrInfo::CONTAINER => {
            let mut resolved = Resolved { target: info.target, flags: info.flags, ..none };
            let rules = (l4.kind == L4Kind::Ports).then(|| {
                resolved.port = l4.dport;
                resolved.proto = l4.proto;
                let rule = |key: PortKey, flag: u8| {
                    let rule = if info.port_rules & flag != 0 {
                        tables.port_rule(&key).map_or(OPEN_NONE, |r| r.open_to)
                    } else {
                        OPEN_NONE
                    };
                    (key, rule)
                };
                PortRules {
                    port: rule(PortKey::new(info.target, l4.proto, l4.dport), PORT_RULES_SINGLE),
                    proto: rule(
                        PortKey::every_port_of(info.target, l4.proto),
                        PORT_RULES_PER_PROTO,
                    ),
                }
            });
            (judge(tables, pkt, info.target, rules, info.all_ports), resolved)
        }
        // One of the host's own addresses, not on a published port: the host's business.
        Some(_) => (not_listed(tables, pkt), none),
        // A container the agent has not learnt of yet: closed, but its replies pass.
        None if tables.in_docker_network(&pkt.dst) => {
            (if is_reply(tables, pkt) { Reason::Reply } else { Reason::UnassignedAddr }, none)
        }
        None => (not_listed(tables, pkt), none),
    }
}

/// A destination the tables do not list as a container's: the host's business on an uplink;
/// behind a bridge, a container or network the agent has not seen (closed, replies pass).
#[inline(always)]
fn not_listed<T: Tables>(tables: &T, pkt: &Packet) -> Reason {
    if !tables.behind_bridge() {
        Reason::NotContainerBound
    } else if is_reply(tables, pkt) {
        Reason::Reply
    } else {
        Reason::UnseenNetwork
    }
}

/// The container port behind (`dst`, `proto`, `port`), if Docker publishes it there. A port
/// published on `0.0.0.0` or `::` is listed under every host address the agent knows, and
/// under the wildcard address of its family. Any other destination the host keeps for itself
/// reaches that wildcard socket too (docker-proxy relays from it, and Docker's DNAT takes
/// every local address): broadcast and multicast, and unicast the kernel's FIB calls local
/// though the agent has not listed it (an AnyIP route, an address added since its last pass).
/// Those are looked up as the wildcard address. The FIB is asked only here, after the exact
/// lookup missed on a published port, so ordinary traffic never pays for it.
#[inline(always)]
fn published_target<T: Tables>(
    tables: &T,
    dst: &Addr,
    proto: u8,
    port: u16,
) -> Option<PublishedTarget> {
    let key = PublishedKey { addr: *dst, port, proto, _pad: 0 };
    if let Some(p) = tables.published(&key) {
        return Some(p);
    }
    if !dst.is_group() && !tables.delivered_locally(dst) {
        return None;
    }
    tables.published(&PublishedKey { addr: dst.wildcard(), port, proto, _pad: 0 })
}

/// The rules that can open a packet with ports, each with the key its sources are listed
/// under: the port's own, and the one for every port of its protocol (`*/udp`).
#[derive(Clone, Copy)]
struct PortRules {
    port: (PortKey, u8),
    proto: (PortKey, u8),
}

/// Container-bound: open to this source through the port's rule, its protocol's every-port
/// rule or the all-ports rule, a reply to a flow started from inside, or closed. Port-less
/// packets (`rules` is `None`) are opened by the all-ports rule alone: `*/udp` never opens
/// ICMP, and the protocol in the key keeps it from opening TCP or SCTP.
#[inline(always)]
fn judge<T: Tables>(
    tables: &T,
    pkt: &Packet,
    target: u32,
    rules: Option<PortRules>,
    all_ports: u8,
) -> Reason {
    let mut opened = None;
    if let Some(rules) = rules {
        for (key, rule) in [rules.port, rules.proto] {
            if opened.is_none() {
                opened = opening(tables, rule, &key, &pkt.src);
            }
        }
    }
    if opened.is_none() {
        opened = opening(tables, all_ports, &PortKey::all_ports(target), &pkt.src);
    }
    // What opens a port opens it to no denied source; asked only then, so a closed port, the
    // common case, pays nothing for the deny sets. Its replies to what was started inside
    // still pass.
    let denied = opened.is_some() && denied(tables, target, &pkt.src);
    if let Some(reason) = opened
        && !denied
    {
        return reason;
    }
    if is_reply(tables, pkt) {
        Reason::Reply
    } else if denied {
        Reason::Denied
    } else {
        Reason::Closed
    }
}

/// Whether the operator denied `src` the container `target` (bans, deny lists and files). The
/// engine's doors are not container ports: banning a swarm node must not split the cluster.
#[inline(always)]
fn denied<T: Tables>(tables: &T, target: u32, src: &Addr) -> bool {
    !door::is_door(target) && tables.source_denied(src)
}

/// Whether the packet answers a flow the host or a container started (flow memory).
#[inline(always)]
fn is_reply<T: Tables>(tables: &T, pkt: &Packet) -> bool {
    let l4 = pkt.l4;
    if l4.kind != L4Kind::Ports || l4.opens {
        return false;
    }
    tables.flow_seen(&pkt.flow())
}

#[inline(always)]
fn opening<T: Tables>(tables: &T, rule: u8, key: &PortKey, src: &Addr) -> Option<Reason> {
    if rule == OPEN_EVERYONE {
        Some(Reason::Exposed)
    } else if rule == OPEN_LISTED && tables.source_listed(key, src) {
        Some(Reason::AllowedSource)
    } else {
        None
    }
}

/// The flow an outbound packet (one the host or a container sends) belongs to, keyed as its
/// replies will arrive, if flow memory must remember it: only when those replies would
/// otherwise be dropped, enforced. A packet to a source the policy lets in (an opened port, a
/// trusted source, a container in audit mode) answers it and needs no memory; remembering it
/// anyway would let an outsider flood such a port with spoofed SYNs and evict, with the
/// answers, the entries real replies need. An ICMP echo reply answers someone else's request,
/// and an ICMP error someone else's packet: neither is ever remembered. Nor is a SYN-ACK: it
/// accepts a connection someone else started, and one the policy did not open (whose SYN
/// slipped in before the agent named a new bridge) must not become "a flow started inside"
/// by being answered.
#[inline(always)]
pub fn flow_to_remember<T: Tables>(tables: &T, outbound: &Packet) -> Option<FlowKey> {
    let l4 = outbound.l4;
    if l4.kind != L4Kind::Ports || l4.quoted || l4.accepts || (is_icmp(l4.proto) && !l4.opens) {
        return None;
    }
    // The reply, judged as a new flow (no flow memory).
    let reply = Packet {
        src: outbound.dst,
        dst: outbound.src,
        l4: L4::ports(l4.proto, l4.dport, l4.sport, true),
    };
    let (decision, _) = decide_resolved(tables, &reply);
    let enforced_drop = decision.verdict() == Verdict::Drop;
    // A denied source's replies to what was started inside pass like anyone's.
    let judged = decision.reason.closes_by_default() || decision.reason == Reason::Denied;
    (enforced_drop && judged).then_some(reply.flow())
}

#[inline(always)]
fn is_icmp(proto: u8) -> bool {
    proto == crate::parse::IPPROTO_ICMP || proto == crate::parse::IPPROTO_ICMPV6
}
