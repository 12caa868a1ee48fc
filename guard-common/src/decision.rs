//! The policy decision, written once.
//!
//! [`decide`] is generic over [`Tables`]: the XDP program instantiates it with BPF map lookups,
//! the agent with its desired state. Both therefore share one definition of DESIGN.md's rules,
//! and user space can test and explain verdicts against exactly what the kernel runs.
//!
//! The order of the lookups is the order of their cost and of how often they settle a packet:
//! the prefilter (a bit test) clears most traffic, a closed container costs one hash lookup,
//! longest-prefix matches are reached only for source lists and unassigned addresses, and flow
//! memory only on the would-drop path.

use crate::{
    addr::Addr,
    maps::{
        AddrInfo, FlowKey, OPEN_EVERYONE, OPEN_LISTED, OPEN_NONE, PortKey, PortRule, PublishedKey,
        PublishedTarget, TARGET_AUDIT,
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

/// What kind of transport layer a packet has, as far as the decision cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Kind {
    /// TCP, UDP or SCTP, with its ports.
    Ports,
    /// A protocol without ports (ICMP, ...) or a later fragment: only a container's all-ports
    /// rule can open it.
    NoPorts,
    /// A ported protocol whose header is cut short.
    Truncated,
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
    /// A TCP segment that opens a connection (SYN without ACK): never a reply.
    pub syn_only: bool,
}

impl L4 {
    pub const NO_PORTS: L4 =
        L4 { kind: L4Kind::NoPorts, proto: 0, sport: 0, dport: 0, syn_only: false };
    pub const TRUNCATED: L4 =
        L4 { kind: L4Kind::Truncated, proto: 0, sport: 0, dport: 0, syn_only: false };

    #[inline(always)]
    pub const fn ports(proto: u8, sport: u16, dport: u16, syn_only: bool) -> L4 {
        L4 { kind: L4Kind::Ports, proto, sport, dport, syn_only }
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
    /// Whether the whole host is in audit mode.
    fn audit_all(&self) -> bool;
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

/// [`decide`], and the container it resolved (for `guard explain`). First [`classify`] under
/// the rules alone, then what the policy file says about would-drops: trusted sources pass,
/// audit mode counts and passes.
#[inline(always)]
pub fn decide_resolved<T: Tables>(tables: &T, pkt: &Packet) -> (Decision, Resolved) {
    let (reason, resolved) = classify(tables, pkt);
    if reason.verdict() == Verdict::Pass {
        return (Decision::enforced(reason), resolved);
    }
    if matches!(reason, Reason::Closed | Reason::UnassignedAddr) && tables.source_trusted(&pkt.src)
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
    let l4 = pkt.l4;
    let published_port = (l4.kind == L4Kind::Ports && tables.may_be_published(l4.dport))
        .then_some((l4.proto, l4.dport));
    let dst_may_hold = tables.may_hold_container(&pkt.dst);
    if !dst_may_hold && published_port.is_none() {
        return (Reason::NotContainerBound, none);
    }

    // Published: a host address (gateways included) and a port Docker publishes on it.
    if let Some((proto, dport)) = published_port {
        let key = PublishedKey { addr: pkt.dst, port: dport, proto, _pad: 0 };
        if let Some(p) = tables.published(&key) {
            let resolved =
                Resolved { target: p.target, port: p.port, proto, published: 1, flags: p.flags };
            let port = Some((PortKey::new(p.target, proto, p.port), p.rule));
            return (judge(tables, pkt, p.target, port, p.all_ports), resolved);
        }
    }
    if !dst_may_hold {
        return (Reason::NotContainerBound, none);
    }

    // Direct: a container's address, or an address in a Docker network.
    match tables.addr_info(&pkt.dst) {
        Some(info) if info.kind == AddrInfo::CONTAINER => {
            let mut resolved = Resolved { target: info.target, flags: info.flags, ..none };
            let port = match l4.kind {
                L4Kind::Ports => {
                    resolved.port = l4.dport;
                    resolved.proto = l4.proto;
                    let key = PortKey::new(info.target, l4.proto, l4.dport);
                    let rule = if info.has_port_rules != 0 {
                        tables.port_rule(&key).map_or(OPEN_NONE, |r| r.open_to)
                    } else {
                        OPEN_NONE
                    };
                    Some((key, rule))
                }
                L4Kind::NoPorts => None,
                L4Kind::Truncated => return (Reason::MalformedL4, resolved),
            };
            (judge(tables, pkt, info.target, port, info.all_ports), resolved)
        }
        // One of the host's own addresses, not on a published port: the host's business.
        Some(_) => (Reason::NotContainerBound, none),
        None if tables.in_docker_network(&pkt.dst) => (Reason::UnassignedAddr, none),
        None => (Reason::NotContainerBound, none),
    }
}

/// Container-bound: open to this source through the port's rule or the all-ports rule, a
/// reply to a flow started from inside, or closed.
#[inline(always)]
fn judge<T: Tables>(
    tables: &T,
    pkt: &Packet,
    target: u32,
    port: Option<(PortKey, u8)>,
    all_ports: u8,
) -> Reason {
    if let Some((key, rule)) = port
        && let Some(reason) = opening(tables, rule, &key, &pkt.src)
    {
        return reason;
    }
    if let Some(reason) = opening(tables, all_ports, &PortKey::all_ports(target), &pkt.src) {
        return reason;
    }
    let l4 = pkt.l4;
    if l4.kind != L4Kind::Ports || l4.syn_only {
        return Reason::Closed;
    }
    let flow = FlowKey {
        remote: pkt.src,
        local: pkt.dst,
        remote_port: l4.sport,
        local_port: l4.dport,
        proto: l4.proto,
        _pad: [0; 3],
    };
    if tables.flow_seen(&flow) { Reason::Reply } else { Reason::Closed }
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
