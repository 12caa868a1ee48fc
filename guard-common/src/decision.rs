//! The policy decision, written once.
//!
//! [`decide`] is generic over [`Tables`]: the XDP program instantiates it with BPF map lookups,
//! the agent with its desired state. Both therefore share one definition of DESIGN.md's rules,
//! and user space can test and explain verdicts against exactly what the kernel runs.

use crate::{
    addr::Addr,
    maps::{AddrInfo, PortKey, PortRule, PublishedKey, PublishedTarget},
    reason::Reason,
};

/// What the decision needs to know about a packet that arrived on an uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub l4: L4,
}

/// The transport layer as far as the decision cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP or SCTP with its destination port (host byte order).
    Ports { proto: u8, dport: u16 },
    /// A protocol without ports (ICMP, ...) or a later fragment: only a container's all-ports
    /// rule can open it.
    NoPorts,
    /// A ported protocol whose header is cut short.
    Truncated,
}

/// Read access to the policy tables. Implementations must be pure lookups.
pub trait Tables {
    fn addr_info(&self, addr: &Addr) -> Option<AddrInfo>;
    /// Whether `addr` lies in any Docker network's subnet.
    fn in_docker_network(&self, addr: &Addr) -> bool;
    fn published(&self, key: &PublishedKey) -> Option<PublishedTarget>;
    fn port_rule(&self, key: &PortKey) -> Option<PortRule>;
    /// Whether `src` lies in a prefix listed for the opened port `key`.
    fn source_listed(&self, key: &PortKey, src: &Addr) -> bool;
}

/// The verdict (through its reason) for a packet that arrived on an uplink.
#[inline(always)]
pub fn decide<T: Tables>(tables: &T, pkt: &Packet) -> Reason {
    if pkt.dst.is_loopback() {
        return Reason::LoopbackDst;
    }
    // Resolve the two paths to one target: (container, protocol, container port).
    let (target, port) = match tables.addr_info(&pkt.dst) {
        Some(info) if info.kind == AddrInfo::CONTAINER => match pkt.l4 {
            L4::Ports { proto, dport } => (info.target, Some((proto, dport))),
            L4::NoPorts => (info.target, None),
            L4::Truncated => return Reason::MalformedL4,
        },
        // One of the host's own addresses: container-bound only through a published port.
        Some(_) => {
            let L4::Ports { proto, dport } = pkt.l4 else {
                return Reason::NotContainerBound;
            };
            let key = PublishedKey {
                addr: pkt.dst,
                port: dport,
                proto,
                _pad: 0,
            };
            match tables.published(&key) {
                Some(p) => (p.target, Some((proto, p.port))),
                None => return Reason::NotContainerBound,
            }
        }
        None if tables.in_docker_network(&pkt.dst) => return Reason::UnassignedAddr,
        None => return Reason::NotContainerBound,
    };

    if let Some((proto, port)) = port {
        if let Some(reason) = opening(tables, &PortKey::new(target, proto, port), &pkt.src) {
            return reason;
        }
    }
    match opening(tables, &PortKey::all_ports(target), &pkt.src) {
        Some(reason) => reason,
        None => Reason::Closed,
    }
}

#[inline(always)]
fn opening<T: Tables>(tables: &T, key: &PortKey, src: &Addr) -> Option<Reason> {
    let rule = tables.port_rule(key)?;
    if rule.open_to == PortRule::EVERYONE {
        Some(Reason::Exposed)
    } else if rule.open_to == PortRule::LISTED && tables.source_listed(key, src) {
        Some(Reason::AllowedSource)
    } else {
        None
    }
}
