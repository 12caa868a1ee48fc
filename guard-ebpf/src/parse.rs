//! Frame → [`Packet`]: just enough of Ethernet, IP and the transport header to decide.
//!
//! Every read is bounds-checked against `data_end` (the verifier insists, and so do we: a
//! frame cut short must never be read past its end). What cannot be parsed is reported as a
//! [`Reason`] so the caller can count it; whether a cut-short *transport* header is dropped is
//! the decision's call ([`L4::Truncated`]), because only the decision knows if the packet is
//! container-bound.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
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

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// Bounds-checked pointer to a `T` at `offset` bytes into the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::NotIp)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;

    // 802.1Q, and 802.1ad outer tags (QinQ): at most two, a bounded loop for the verifier.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, offset).ok_or(Reason::NotIp)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        offset += VlanHdr::LEN;
    }

    match ether_type {
        ETH_P_IP => parse_v4(ctx, offset),
        ETH_P_IPV6 => parse_v6(ctx, offset),
        _ => Err(Reason::NotIp),
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, offset: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset).ok_or(Reason::MalformedIp)?;
    let ip = unsafe { &*ip };
    let header_len = ((ip.vihl & 0x0f) as usize) * 4;
    if header_len < Ipv4Hdr::LEN {
        return Err(Reason::MalformedIp);
    }
    let frag_offset = u16::from_be_bytes(ip.frags) & 0x1fff;
    let l4 = if frag_offset != 0 {
        // A later fragment carries no ports.
        L4::NoPorts
    } else {
        parse_l4(ctx, offset + header_len, ip.proto)
    };
    Ok(Packet { src: Addr::from_v4(ip.src_addr), dst: Addr::from_v4(ip.dst_addr), l4 })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, offset: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset).ok_or(Reason::MalformedIp)?;
    let ip = unsafe { &*ip };
    // Extension headers are not walked yet: a packet that has them is decided as port-less,
    // which can only close, never open, a port.
    let l4 = parse_l4(ctx, offset + Ipv6Hdr::LEN, ip.next_hdr);
    Ok(Packet { src: Addr::from_v6(ip.src_addr), dst: Addr::from_v6(ip.dst_addr), l4 })
}

/// Source and destination port: the first four bytes of TCP, UDP and SCTP alike.
#[repr(C)]
struct Ports {
    _src: [u8; 2],
    dst: [u8; 2],
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, proto: u8) -> L4 {
    // The minimal header each protocol must carry to be well formed.
    let min_len = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_SCTP => 12,
        _ => return L4::NoPorts,
    };
    if ctx.data() + offset + min_len > ctx.data_end() {
        return L4::Truncated;
    }
    match ptr_at::<Ports>(ctx, offset) {
        Some(ports) => L4::Ports { proto, dport: u16::from_be_bytes(unsafe { (*ports).dst }) },
        None => L4::Truncated,
    }
}
