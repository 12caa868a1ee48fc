//! Frame → [`Packet`]: just enough of Ethernet, IP and the transport header to decide.
//!
//! Works on any `[data, data_end)` window, so the XDP program and the TC egress program share
//! it. Every read is bounds-checked against `data_end` (the verifier insists, and so do we: a
//! frame cut short must never be read past its end). What cannot be parsed is reported as a
//! [`Reason`] so the caller can count it; whether a cut-short *transport* header is dropped is
//! the decision's call ([`L4Kind::Truncated`]), because only the decision knows if the packet is
//! container-bound.

use core::mem::size_of;

use guard_common::{
    addr::Addr,
    decision::{L4, Packet},
    reason::Reason,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;

/// IPv6 extension headers walked before giving up. Real traffic carries one or two; a packet
/// with more is decided as port-less, which can only close a port, never open one.
const MAX_V6_EXTENSIONS: usize = 6;

/// The bytes of one frame.
#[derive(Clone, Copy)]
pub struct Frame {
    pub data: usize,
    pub data_end: usize,
}

impl Frame {
    /// Bounds-checked pointer to a `T` at `offset` bytes into the frame.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Option<*const T> {
        if self.data + offset + size_of::<T>() > self.data_end {
            return None;
        }
        Some((self.data + offset) as *const T)
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: ptr_at checked that size_of::<T>() bytes lie inside the frame.
        self.ptr_at::<T>(offset).map(|p| unsafe { p.read_unaligned() })
    }
}

#[inline(always)]
pub fn parse(frame: Frame) -> Result<Packet, Reason> {
    let eth: EthHdr = frame.read(0).ok_or(Reason::NotIp)?;
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = EthHdr::LEN;

    // 802.1Q, and 802.1ad outer tags (QinQ): at most two, a bounded loop for the verifier.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: VlanHdr = frame.read(offset).ok_or(Reason::NotIp)?;
        ether_type = u16::from_be(vlan.ether_type);
        offset += VlanHdr::LEN;
    }

    match ether_type {
        ETH_P_IP => parse_v4(frame, offset),
        ETH_P_IPV6 => parse_v6(frame, offset),
        _ => Err(Reason::NotIp),
    }
}

#[inline(always)]
fn parse_v4(frame: Frame, offset: usize) -> Result<Packet, Reason> {
    let ip: Ipv4Hdr = frame.read(offset).ok_or(Reason::MalformedIp)?;
    let header_len = ((ip.vihl & 0x0f) as usize) * 4;
    if header_len < Ipv4Hdr::LEN {
        return Err(Reason::MalformedIp);
    }
    let frag_offset = u16::from_be_bytes(ip.frags) & 0x1fff;
    let l4 = if frag_offset != 0 {
        // A later fragment carries no ports.
        L4::NO_PORTS
    } else {
        parse_l4(frame, offset + header_len, ip.proto)
    };
    Ok(Packet { src: Addr::from_v4(ip.src_addr), dst: Addr::from_v4(ip.dst_addr), l4 })
}

#[inline(always)]
fn parse_v6(frame: Frame, offset: usize) -> Result<Packet, Reason> {
    let ip: Ipv6Hdr = frame.read(offset).ok_or(Reason::MalformedIp)?;
    let packet =
        |l4| Packet { src: Addr::from_v6(ip.src_addr), dst: Addr::from_v6(ip.dst_addr), l4 };

    let mut next = ip.next_hdr;
    let mut offset = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_V6_EXTENSIONS {
        // Every extension header starts with (next header, length).
        let len_unit = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => 8,
            IPPROTO_AH => 4,
            IPPROTO_FRAGMENT => 0,
            _ => return Ok(packet(parse_l4(frame, offset, next))),
        };
        let Some(head) = frame.read::<[u8; 4]>(offset) else {
            return Ok(packet(L4::TRUNCATED));
        };
        next = head[0];
        offset += match len_unit {
            // Fragment header: fixed 8 bytes; a later fragment carries no ports.
            0 => {
                if u16::from_be_bytes([head[2], head[3]]) >> 3 != 0 {
                    return Ok(packet(L4::NO_PORTS));
                }
                8
            }
            // AH counts 4-byte units minus 2; the others 8-byte units minus 1.
            4 => (head[1] as usize + 2) * 4,
            _ => (head[1] as usize + 1) * 8,
        };
    }
    // Too many extension headers to follow: decided as port-less.
    Ok(packet(L4::NO_PORTS))
}

/// The transport header, read as one block of its minimal well-formed length: one bounds
/// check covers every field (the verifier does not carry a check over to a pointer computed
/// separately, even at the same offset).
#[inline(always)]
fn parse_l4(frame: Frame, offset: usize, proto: u8) -> L4 {
    let (head, syn_only) = match proto {
        IPPROTO_TCP => match frame.read::<[u8; 20]>(offset) {
            // Flags are byte 13: SYN without ACK opens a connection.
            Some(h) => ([h[0], h[1], h[2], h[3]], h[13] & 0x12 == 0x02),
            None => return L4::TRUNCATED,
        },
        IPPROTO_UDP => match frame.read::<[u8; 8]>(offset) {
            Some(h) => ([h[0], h[1], h[2], h[3]], false),
            None => return L4::TRUNCATED,
        },
        IPPROTO_SCTP => match frame.read::<[u8; 12]>(offset) {
            Some(h) => ([h[0], h[1], h[2], h[3]], false),
            None => return L4::TRUNCATED,
        },
        _ => return L4::NO_PORTS,
    };
    let sport = u16::from_be_bytes([head[0], head[1]]);
    let dport = u16::from_be_bytes([head[2], head[3]]);
    L4::ports(proto, sport, dport, syn_only)
}
