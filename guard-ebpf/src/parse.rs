//! Frame → [`Packet`]: just enough of Ethernet, IP and the transport header to decide.
//!
//! Works on any `[data, data_end)` window, so the XDP program and the TC egress program share
//! it. Every read is bounds-checked against `data_end` (the verifier insists, and so do we: a
//! frame cut short must never be read past its end). What cannot be parsed is reported as a
//! [`Reason`] so the caller can count it; whether a cut-short *transport* header is dropped is
//! the decision's call ([`L4Kind::Truncated`]), because only the decision knows if the packet is
//! container-bound.

use guard_common::{
    addr::Addr,
    decision::{L4, Packet},
    reason::Reason,
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
    /// Pointer to `len` bytes at `offset`, if the frame holds them. Each header is checked
    /// once, and every field is read through the pointer this returns: the verifier does not
    /// carry a bounds check over to a pointer computed separately, even at the same offset.
    #[inline(always)]
    fn header(&self, offset: usize, len: usize) -> Option<usize> {
        let start = self.data + offset;
        if start + len > self.data_end {
            return None;
        }
        Some(start)
    }
}

/// Loads a field of a header that [`Frame::header`] bounds-checked.
///
/// Typed loads, not byte arrays: LLVM splits loads of `[u8; N]` into N byte loads. Packet
/// fields need not be aligned for the BPF target (the verifier permits unaligned packet access
/// unless BPF_F_STRICT_ALIGNMENT is asked for, and the JITs of the architectures guard runs on
/// handle it), so a plain typed load is both valid there and the cheapest.
macro_rules! load {
    ($ty:ty, $header:expr, $offset:expr) => {
        // SAFETY: `$header` was bounds-checked to cover `$offset + size_of::<$ty>()` bytes.
        unsafe { core::ptr::read(($header + $offset) as *const $ty) }
    };
}

#[inline(always)]
pub fn parse(frame: Frame) -> Result<Packet, Reason> {
    let eth = frame.header(0, 14).ok_or(Reason::NotIp)?;
    let mut ether_type = u16::from_be(load!(u16, eth, 12));
    let mut offset = 14;

    // 802.1Q, and 802.1ad outer tags (QinQ): at most two, a bounded loop for the verifier.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan = frame.header(offset, 4).ok_or(Reason::NotIp)?;
        ether_type = u16::from_be(load!(u16, vlan, 2));
        offset += 4;
    }

    match ether_type {
        ETH_P_IP => parse_v4(frame, offset),
        ETH_P_IPV6 => parse_v6(frame, offset),
        _ => Err(Reason::NotIp),
    }
}

#[inline(always)]
fn parse_v4(frame: Frame, offset: usize) -> Result<Packet, Reason> {
    let ip = frame.header(offset, 20).ok_or(Reason::MalformedIp)?;
    let header_len = ((load!(u8, ip, 0) & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(Reason::MalformedIp);
    }
    let src = Addr::from_v4_word(load!(u32, ip, 12));
    let dst = Addr::from_v4_word(load!(u32, ip, 16));
    let frag_offset = u16::from_be(load!(u16, ip, 6)) & 0x1fff;
    let l4 = if frag_offset != 0 {
        // A later fragment carries no ports.
        L4::NO_PORTS
    } else {
        parse_l4(frame, offset + header_len, load!(u8, ip, 9))
    };
    Ok(Packet { src, dst, l4 })
}

#[inline(always)]
fn parse_v6(frame: Frame, offset: usize) -> Result<Packet, Reason> {
    let ip = frame.header(offset, 40).ok_or(Reason::MalformedIp)?;
    let word = |at: usize| load!(u32, ip, at);
    let src = Addr([word(8), word(12), word(16), word(20)]);
    let dst = Addr([word(24), word(28), word(32), word(36)]);
    let packet = |l4| Packet { src, dst, l4 };

    let mut next = load!(u8, ip, 6);
    let mut offset = offset + 40;
    for _ in 0..MAX_V6_EXTENSIONS {
        // Every extension header starts with (next header, length).
        let len_unit = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => 8,
            IPPROTO_AH => 4,
            IPPROTO_FRAGMENT => 0,
            _ => return Ok(packet(parse_l4(frame, offset, next))),
        };
        let Some(ext) = frame.header(offset, 4) else {
            return Ok(packet(L4::TRUNCATED));
        };
        next = load!(u8, ext, 0);
        let len = load!(u8, ext, 1) as usize;
        offset += match len_unit {
            // Fragment header: fixed 8 bytes; a later fragment carries no ports.
            0 => {
                if u16::from_be(load!(u16, ext, 2)) >> 3 != 0 {
                    return Ok(packet(L4::NO_PORTS));
                }
                8
            }
            // AH counts 4-byte units minus 2; the others 8-byte units minus 1.
            4 => (len + 2) * 4,
            _ => (len + 1) * 8,
        };
    }
    // Too many extension headers to follow: decided as port-less.
    Ok(packet(L4::NO_PORTS))
}

/// The transport header, checked for its minimal well-formed length (one check per protocol,
/// so each path's check covers the bytes it reads): TCP, UDP and SCTP all start with the two
/// ports; TCP's flags are byte 13.
#[inline(always)]
fn parse_l4(frame: Frame, offset: usize, proto: u8) -> L4 {
    let (l4, syn_only) = match proto {
        IPPROTO_TCP => match frame.header(offset, 20) {
            // SYN without ACK opens a connection.
            Some(l4) => (l4, load!(u8, l4, 13) & 0x12 == 0x02),
            None => return L4::TRUNCATED,
        },
        IPPROTO_UDP => match frame.header(offset, 8) {
            Some(l4) => (l4, false),
            None => return L4::TRUNCATED,
        },
        IPPROTO_SCTP => match frame.header(offset, 12) {
            Some(l4) => (l4, false),
            None => return L4::TRUNCATED,
        },
        _ => return L4::NO_PORTS,
    };
    let sport = u16::from_be(load!(u16, l4, 0));
    let dport = u16::from_be(load!(u16, l4, 2));
    L4::ports(proto, sport, dport, syn_only)
}
