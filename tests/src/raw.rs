//! Raw Ethernet frames from an outside host: what a neighbour on the same L2 segment can put on
//! the wire (priority tags, fragments, extension-header chains, spoofed sources, broadcast and
//! multicast destinations), built byte by byte and sent from an AF_PACKET socket in an outside
//! namespace. This kernel has no vlan devices, so tags exist only inside the frames we build;
//! the receiving kernel strips VID-0 tags in its core receive path all the same.
//!
//! Replies are read from the same socket (it sees every frame the namespace receives), so a
//! probe tells a SYN-ACK ([`Outcome::Answered`]) from a RST or an ICMP error
//! ([`Outcome::Refused`]) from nothing at all ([`Outcome::Silent`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

pub use crate::frames::{Mac, TCP_SYN};
use crate::frames::{TCP_ACK, checksum};
use crate::netns::Netns;
use crate::probe::Outcome;

// The numbers guard's own parser reads frames by.
pub use guard_common::parse::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

const TCP_RST: u8 = 0x04;

pub const BROADCAST_MAC: Mac = [0xff; 6];

/// The Ethernet address an IP multicast group maps to (RFC 1112 section 6.4, RFC 2464 section 7).
pub fn multicast_mac(group: IpAddr) -> Mac {
    match group {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
        }
        IpAddr::V6(ip) => {
            let o = ip.octets();
            [0x33, 0x33, o[12], o[13], o[14], o[15]]
        }
    }
}

/// An Ethernet frame carrying `payload`, under one VID-0 priority tag per entry of `tags` (the
/// TPIDs, outermost first).
pub fn ethernet(dst: Mac, src: Mac, tags: &[u16], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    for tpid in tags {
        // TCI 0: priority 0, VID 0.
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The pseudo-header of a transport checksum (RFC 793, RFC 8200 section 8.1).
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("pseudo-header: {src} and {dst} are of different families"),
    }
    p
}

/// A TCP segment without options (20 bytes) and with a valid checksum.
pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, seq: u32) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&0u32.to_be_bytes()); // ack
    seg.extend_from_slice(&[5 << 4, flags]); // data offset 5 words
    seg.extend_from_slice(&64240u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let sum = checksum(&[&pseudo_header(src.ip(), dst.ip(), IPPROTO_TCP, seg.len()), &seg]);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// A UDP datagram with a valid checksum (mandatory over IPv6).
pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut dgram = Vec::with_capacity(len);
    dgram.extend_from_slice(&src.port().to_be_bytes());
    dgram.extend_from_slice(&dst.port().to_be_bytes());
    dgram.extend_from_slice(&(len as u16).to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.extend_from_slice(payload);
    let sum = checksum(&[&pseudo_header(src.ip(), dst.ip(), IPPROTO_UDP, len), &dgram]);
    // A computed 0 is sent as all ones (RFC 768).
    let sum = if sum == 0 { 0xffff } else { sum };
    dgram[6..8].copy_from_slice(&sum.to_be_bytes());
    dgram
}

/// Where a fragment sits in its datagram: byte offset (a multiple of 8) and "more fragments".
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    pub id: u32,
    pub offset: usize,
    pub more: bool,
}

/// An IPv4 packet (20-byte header, DF unless it is a fragment, TTL 64) with a valid header
/// checksum.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    fragment: Option<Fragment>,
    payload: &[u8],
) -> Vec<u8> {
    let (id, flags_offset) = match fragment {
        Some(f) => {
            assert!(
                f.offset.is_multiple_of(8),
                "fragment offset {} is not a multiple of 8",
                f.offset
            );
            (f.id as u16, (f.offset / 8) as u16 | if f.more { 0x2000 } else { 0 })
        }
        None => (0, 0x4000),
    };
    let mut p = Vec::with_capacity(20 + payload.len());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags_offset.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&[&p]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet (hop limit 64); `next` names the first header of `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An 8-byte Destination Options header (one PadN option, which every receiver skips) whose
/// next header is `next`.
pub fn v6_dest_options(next: u8) -> [u8; 8] {
    [next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 Fragment header whose next header is `next`.
pub fn v6_fragment(next: u8, f: Fragment) -> [u8; 8] {
    assert!(f.offset.is_multiple_of(8), "fragment offset {} is not a multiple of 8", f.offset);
    let offset_flags = (f.offset as u16) | u16::from(f.more);
    let mut h = [next, 0, 0, 0, 0, 0, 0, 0];
    h[2..4].copy_from_slice(&offset_flags.to_be_bytes());
    h[4..8].copy_from_slice(&f.id.to_be_bytes());
    h
}

/// An IP packet of `src`'s family carrying `l4` (protocol `proto`), and its EtherType.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> (u16, Vec<u8>) {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (ETH_P_IP, ipv4(s, d, proto, None, l4)),
        (IpAddr::V6(s), IpAddr::V6(d)) => (ETH_P_IPV6, ipv6(s, d, proto, l4)),
        _ => panic!("ip_packet: {src} and {dst} are of different families"),
    }
}

/// A received IP packet, as far as the probes care.
#[derive(Debug)]
pub struct Received<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The upper-layer protocol, after any IPv6 extension headers.
    pub proto: u8,
    /// The upper-layer bytes (of a first fragment, or of a whole packet).
    pub l4: &'a [u8],
}

/// Parses an Ethernet frame (tags skipped) down to its transport layer.
pub fn parse_frame(frame: &[u8]) -> Option<Received<'_>> {
    let mut offset = 12;
    loop {
        let ether_type = u16::from_be_bytes(frame.get(offset..offset + 2)?.try_into().ok()?);
        offset += 2;
        match ether_type {
            ETH_P_8021Q | ETH_P_8021AD => offset += 2,
            ETH_P_IP | ETH_P_IPV6 => return parse_ip(frame.get(offset..)?),
            _ => return None,
        }
    }
}

/// Parses an IP packet (or the start of one, as quoted in an ICMP error).
pub fn parse_ip(p: &[u8]) -> Option<Received<'_>> {
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            Some(Received { src: src.into(), dst: dst.into(), proto: p[9], l4: p.get(ihl..)? })
        }
        6 => {
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            let (mut next, mut offset) = (p[6], 40);
            // Bounded: a quoted packet is at most a few hundred bytes.
            for _ in 0..16 {
                let len = match next {
                    0 | 43 | IPPROTO_DSTOPTS => (usize::from(*p.get(offset + 1)?) + 1) * 8,
                    IPPROTO_FRAGMENT => 8,
                    _ => break,
                };
                next = *p.get(offset)?;
                offset += len;
            }
            Some(Received { src: src.into(), dst: dst.into(), proto: next, l4: p.get(offset..)? })
        }
        _ => None,
    }
}

/// What `received` says about a TCP SYN sent from `from` to `to`, if it is an answer to it: a
/// SYN-ACK, a RST, or an ICMP error that quotes it.
pub fn syn_answer(received: &Received, from: SocketAddr, to: SocketAddr) -> Option<Outcome> {
    if received.dst != from.ip() {
        return None;
    }
    let ports = |l4: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes(l4.get(0..2)?.try_into().ok()?),
            u16::from_be_bytes(l4.get(2..4)?.try_into().ok()?),
        ))
    };
    match received.proto {
        IPPROTO_TCP => {
            if received.src != to.ip() || ports(received.l4)? != (to.port(), from.port()) {
                return None;
            }
            let flags = *received.l4.get(13)?;
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                Some(Outcome::Answered)
            } else if flags & TCP_RST != 0 {
                Some(Outcome::Refused)
            } else {
                None
            }
        }
        // Destination unreachable (v4 type 3), or v6 unreachable (1) and parameter problem (4);
        // the quoted packet starts 8 bytes in.
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let kind = *received.l4.first()?;
            let error =
                if received.proto == IPPROTO_ICMP { kind == 3 } else { kind == 1 || kind == 4 };
            let quoted = parse_ip(received.l4.get(8..)?)?;
            let ours = quoted.proto == IPPROTO_TCP
                && quoted.src == from.ip()
                && ports(quoted.l4) == Some((from.port(), to.port()));
            (error && ours).then_some(Outcome::Refused)
        }
        _ => None,
    }
}

/// An AF_PACKET socket on one interface of an outside namespace. It stays in that namespace
/// whichever thread uses it afterwards, so the test thread sends and reads with it directly.
pub struct RawLink {
    fd: OwnedFd,
    ifindex: i32,
    /// The interface's own address: the source of every frame an honest host would send.
    pub mac: Mac,
}

impl RawLink {
    pub fn open(netns: &Netns, ifname: &str) -> Self {
        let mac = mac_of(&netns.ip(&["-j", "link", "show", "dev", ifname]), ifname);
        let name = ifname.to_owned();
        let (fd, ifindex) = netns.run(move || {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                .unwrap_or_else(|e| panic!("if_nametoindex({name}): {e}"));
            // SAFETY: plain syscalls on values we own; the fd is wrapped at once.
            let fd = unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                );
                assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
                OwnedFd::from_raw_fd(fd)
            };
            let ifindex = ifindex as i32;
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex;
            // SAFETY: `addr` is a valid sockaddr_ll for the duration of the call.
            let bound = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert!(bound == 0, "bind AF_PACKET to {name}: {}", std::io::Error::last_os_error());
            (fd, ifindex)
        });
        Self { fd, ifindex, mac }
    }

    /// Puts `frame` on the wire as it is.
    pub fn send(&self, frame: &[u8]) {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for the duration of the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert!(
            sent == frame.len() as isize,
            "AF_PACKET send of {} bytes: {}",
            frame.len(),
            std::io::Error::last_os_error()
        );
    }

    /// Reads every frame the interface receives (not those it sends) until `within` has
    /// passed or `f` returns `true`; returns whether it did.
    pub fn watch(&self, within: Duration, mut f: impl FnMut(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut pfd =
                libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let wait = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&raw mut pfd, 1, wait) } <= 0 {
                continue;
            }
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for the duration of the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &raw mut len,
                )
            };
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if f(&buf[..n as usize]) {
                return true;
            }
        }
    }
}

/// The `address` of `ifname` in `ip -j link show` output.
fn mac_of(json: &str, ifname: &str) -> Mac {
    let links: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("parse `ip -j link`: {e}: {json}"));
    parse_mac(links[0]["address"].as_str().unwrap_or_else(|| panic!("no address for {ifname}")))
}

/// "02:42:0a:f8:00:0a" → bytes.
pub fn parse_mac(text: &str) -> Mac {
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}")))
        .collect();
    bytes.try_into().unwrap_or_else(|_| panic!("MAC {text} is not 6 bytes"))
}

/// The MAC address of `ifname` in the root namespace.
pub fn host_mac(ifname: &str) -> Mac {
    let path = format!("/sys/class/net/{ifname}/address");
    parse_mac(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}")))
}

/// A small deterministic generator (xorshift64*) for spoofed sources and ports: a flood needs
/// variety, not quality, and a fixed seed makes a failing run repeatable.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }
}

/// A TCP SYN from `from` to `to`, framed from `src_mac` to `dst_mac` under VID-0 `tags`.
pub fn syn_frame(
    dst_mac: Mac,
    src_mac: Mac,
    tags: &[u16],
    from: SocketAddr,
    to: SocketAddr,
) -> Vec<u8> {
    let segment = tcp(from, to, TCP_SYN, 0x1000_0000 | u32::from(from.port()));
    let (ether_type, packet) = ip_packet(from.ip(), to.ip(), IPPROTO_TCP, &segment);
    ethernet(dst_mac, src_mac, tags, ether_type, &packet)
}

/// A SYN-bearing frame (or fragments of one) to send raw, named for the report, with the
/// endpoints its answer would come back between.
pub struct SynProbe {
    pub what: String,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub frames: Vec<Vec<u8>>,
}

/// Sends every probe's frames, then reads what comes back for `within`, or less once every
/// probe has its answer: per probe, the first answer, or [`Outcome::Silent`].
pub fn probe_syns(link: &RawLink, probes: &[SynProbe], within: Duration) -> Vec<Outcome> {
    let mut outcomes = vec![Outcome::Silent; probes.len()];
    for frame in probes.iter().flat_map(|p| &p.frames) {
        link.send(frame);
    }
    let mut unanswered = probes.len();
    link.watch(within, |frame| {
        let Some(received) = parse_frame(frame) else { return false };
        for (probe, outcome) in probes.iter().zip(outcomes.iter_mut()) {
            if *outcome == Outcome::Silent
                && let Some(answer) = syn_answer(&received, probe.from, probe.to)
            {
                *outcome = answer;
                unanswered -= 1;
            }
        }
        unanswered == 0
    });
    outcomes
}
