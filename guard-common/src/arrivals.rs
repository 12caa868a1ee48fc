//! Flows from outside that an opening let in, and the first packet of each: what a rate limit
//! counts and what the access log reports.
//!
//! A TCP connection announces itself: its SYN (without ACK) is its first packet, and nothing
//! needs remembering. UDP, SCTP and ICMP echo have no such mark here, so the first packet of
//! one of their flows is the one [`crate::maps::ARRIVALS`] does not hold yet (or held longer
//! ago than [`ARRIVAL_TIMEOUT_NS`]); the filter then writes it there. The map is an LRU keyed
//! like [`crate::maps::FLOWS`] but the other way round: as the packet arrives (remote is its
//! source), on the destination it was sent to (a published port's host address, before NAT).
//!
//! Only packets an opening let in are ever looked up or written here, so traffic that is not
//! container-bound, closed ports and replies pay nothing. A flood of spoofed sources at an open
//! UDP port evicts older arrivals: their next packet is then reported (and rate-limited) as a
//! new flow, which is the safe direction for both.

use crate::{
    decision::{L4, L4Kind, Packet},
    maps::FlowKey,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP},
};

/// How long a flow without a connection (UDP, SCTP, ICMP echo) stays known after its last
/// packet in: a packet after a longer silence starts a new flow. Conntrack's UDP timeout.
pub const ARRIVAL_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

/// Whether a packet an opening let in starts a flow, as far as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowStart {
    /// It does (a TCP SYN without ACK).
    Yes,
    /// It does not (a later TCP segment, an ICMP error, an echo reply, a packet without
    /// ports), or it cannot be told and does not matter.
    No,
    /// Only [`crate::maps::ARRIVALS`] can tell: it starts a flow if that holds no recent
    /// packet of it.
    IfUnseen(FlowKey),
}

/// What `pkt`'s header says about whether it starts a flow (see [`FlowStart`]).
#[inline(always)]
pub fn flow_start(pkt: &Packet) -> FlowStart {
    let l4: L4 = pkt.l4;
    if l4.kind != L4Kind::Ports || l4.quoted {
        return FlowStart::No;
    }
    if l4.proto == IPPROTO_TCP {
        return if l4.opens { FlowStart::Yes } else { FlowStart::No };
    }
    // An echo reply answers someone's request; only a request starts an ICMP flow.
    if (l4.proto == IPPROTO_ICMP || l4.proto == IPPROTO_ICMPV6) && !l4.opens {
        return FlowStart::No;
    }
    FlowStart::IfUnseen(pkt.flow())
}

/// Whether an arrival last seen at `seen` (if at all) is over, so a packet at `now` starts
/// a new flow.
#[inline(always)]
pub fn is_new(seen: Option<u64>, now: u64) -> bool {
    seen.is_none_or(|seen| now.saturating_sub(seen) >= ARRIVAL_TIMEOUT_NS)
}

/// Whether an arrival last written at `seen` should be written again at `now`: at most once a
/// second per flow, so a bulk flow does not pay a map write per packet.
#[inline(always)]
pub fn needs_refresh(seen: Option<u64>, now: u64) -> bool {
    seen.is_none_or(|seen| now.saturating_sub(seen) > 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr::Addr, parse::IPPROTO_UDP};

    fn packet(l4: L4) -> Packet {
        Packet { src: Addr::from_v4([203, 0, 113, 9]), dst: Addr::from_v4([10, 0, 0, 5]), l4 }
    }

    #[test]
    fn tcp_starts_with_its_syn_and_nothing_else() {
        assert_eq!(flow_start(&packet(L4::ports(IPPROTO_TCP, 40000, 443, true))), FlowStart::Yes);
        assert_eq!(flow_start(&packet(L4::ports(IPPROTO_TCP, 40000, 443, false))), FlowStart::No);
        let answer = L4 { accepts: true, ..L4::ports(IPPROTO_TCP, 40000, 443, false) };
        assert_eq!(flow_start(&packet(answer)), FlowStart::No);
    }

    #[test]
    fn udp_and_echo_requests_are_looked_up_as_they_arrive() {
        let FlowStart::IfUnseen(key) = flow_start(&packet(L4::ports(IPPROTO_UDP, 5000, 53, false)))
        else {
            panic!("udp needs memory");
        };
        assert_eq!(
            (key.remote, key.remote_port, key.local_port),
            (packet(L4::NO_PORTS).src, 5000, 53)
        );
        assert!(matches!(
            flow_start(&packet(L4::ports(IPPROTO_ICMP, 7, 0, true))),
            FlowStart::IfUnseen(_)
        ));
        assert_eq!(flow_start(&packet(L4::ports(IPPROTO_ICMP, 0, 7, false))), FlowStart::No);
    }

    #[test]
    fn errors_fragments_and_portless_packets_start_nothing() {
        let quoted = L4::standing_for(L4::ports(IPPROTO_UDP, 53, 5000, false));
        assert_eq!(flow_start(&packet(quoted)), FlowStart::No);
        assert_eq!(flow_start(&packet(L4::LATER_FRAGMENT)), FlowStart::No);
        assert_eq!(flow_start(&packet(L4::no_ports(47))), FlowStart::No);
    }

    #[test]
    fn an_arrival_is_new_after_its_timeout_and_refreshed_once_a_second() {
        assert!(is_new(None, 5));
        assert!(!is_new(Some(1_000), 1_000 + ARRIVAL_TIMEOUT_NS - 1));
        assert!(is_new(Some(1_000), 1_000 + ARRIVAL_TIMEOUT_NS));
        assert!(needs_refresh(None, 0));
        assert!(!needs_refresh(Some(0), 1_000_000_000));
        assert!(needs_refresh(Some(0), 1_000_000_001));
    }
}
