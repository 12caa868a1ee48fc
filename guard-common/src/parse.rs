//! Frame → [`Packet`]: just enough of the link layer, IP and the transport header to decide.
//!
//! Written once, like the decision: the kernel programs parse packet memory through
//! [`Bytes`] pointers, the agent parses byte slices (`guard explain`, the reference in the
//! tests, the fuzz and property tests), so user space reads a frame exactly as the kernel does.
//!
//! Every exit has a named fail behaviour, decided here and nowhere else:
//!
//! | what the frame is | result | verdict |
//! |---|---|---|
//! | not IP (ARP, LLDP, ...) | [`Reason::NotIp`] | pass: not ours |
//! | IP header cut short, or longer than its total length | [`Reason::MalformedIp`] | pass: the kernel discards it too |
//! | more VLAN tags than [`MAX_VLAN_TAGS`] | [`Reason::Unreadable`] | drop |
//! | IPv6 from an IPv4-mapped source | [`Reason::MappedSource`] | drop |
//! | IPv6 extension headers past [`MAX_V6_EXTENSIONS`] | [`L4Kind::Unreadable`] | drop |
//! | TCP/UDP/SCTP with fewer than the 4 bytes of its ports | [`L4Kind::Unreadable`] | drop |
//! | a later fragment | [`L4Kind::LaterFragment`] | pass (see [`L4Kind`]) |
//! | ICMP error quoting a flow of this host | the reply it stands for | as that reply |
//!
//! Transport bytes are read up to the end of the IP packet, never into link-layer padding.
//!
//! The drops hold whatever the destination: the receive path walks any number of VID-0
//! priority tags (`__netif_receive_skb_core`), reassembles any fragment and follows any
//! extension-header chain, so a frame the filter cannot read to the end may reach a container
//! or docker-proxy. None of these shapes is ordinary traffic (RFC 7112 wants the whole header
//! chain in the first fragment; RFC 9098 lets a filter drop long chains), so nothing ordinary
//! pays for failing closed.

use crate::{
    addr::Addr,
    decision::{L4, Packet},
    reason::Reason,
};

const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPsec ESP: no ports, but a flow (a security association) between two hosts, and the
/// transport of Swarm's encrypted overlays.
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_SCTP: u8 = 132;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// VLAN tags (802.1Q and 802.1ad, in any mix) walked before the frame is called unreadable.
/// Real networks use one or two; the kernel strips any number of VID-0 priority tags.
pub const MAX_VLAN_TAGS: usize = 8;
/// IPv6 extension headers walked before the packet is called unreadable. Real traffic carries
/// one or two.
pub const MAX_V6_EXTENSIONS: usize = 8;

/// The bytes of one frame, read through bounds-checked windows.
///
/// The kernel's implementation hands out packet pointers: the verifier accepts a read only
/// through a pointer whose bounds were checked, so every field is read through the window
/// [`Bytes::window`] returned for its header, never at an offset computed separately. The
/// reads take offsets inside the window; reading outside it is a bug (the verifier rejects it
/// in the kernel, a slice index panics in user space, which is how the property tests find it).
pub trait Bytes {
    type Window: Copy;
    /// `len` bytes at `offset`, if the frame holds them.
    fn window(&self, offset: usize, len: usize) -> Option<Self::Window>;
    fn u8_at(&self, window: Self::Window, at: usize) -> u8;
    /// Two bytes as they are in memory (network order kept).
    fn u16_at(&self, window: Self::Window, at: usize) -> u16;
    /// Four bytes as they are in memory (network order kept).
    fn u32_at(&self, window: Self::Window, at: usize) -> u32;
}

/// A byte slice, for user space. Windows are offsets into it.
impl Bytes for &[u8] {
    type Window = usize;

    fn window(&self, offset: usize, len: usize) -> Option<usize> {
        (offset.checked_add(len)? <= self.len()).then_some(offset)
    }
    fn u8_at(&self, window: usize, at: usize) -> u8 {
        self[window + at]
    }
    fn u16_at(&self, window: usize, at: usize) -> u16 {
        u16::from_ne_bytes([self[window + at], self[window + at + 1]])
    }
    fn u32_at(&self, window: usize, at: usize) -> u32 {
        let b = &self[window + at..window + at + 4];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// A frame cut where its IP packet ends, as the kernel trims it (`ip_rcv_core`, `ipv6_rcv`):
/// link-layer padding after the packet is never read as transport bytes. (A first fragment
/// may carry as little as the 8 bytes of ports and sequence number; the padding after it is
/// the sender's to choose, and must not pass for its TCP flags.)
struct Clamped<'a, B> {
    frame: &'a B,
    end: usize,
}

impl<B: Bytes> Bytes for Clamped<'_, B> {
    type Window = B::Window;

    #[inline(always)]
    fn window(&self, offset: usize, len: usize) -> Option<B::Window> {
        if offset + len > self.end {
            return None;
        }
        self.frame.window(offset, len)
    }
    #[inline(always)]
    fn u8_at(&self, window: B::Window, at: usize) -> u8 {
        self.frame.u8_at(window, at)
    }
    #[inline(always)]
    fn u16_at(&self, window: B::Window, at: usize) -> u16 {
        self.frame.u16_at(window, at)
    }
    #[inline(always)]
    fn u32_at(&self, window: B::Window, at: usize) -> u32 {
        self.frame.u32_at(window, at)
    }
}

/// How a link frames its packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Ethernet, optionally VLAN-tagged.
    Ethernet,
    /// The IP header first (tun, WireGuard, ipip, sit, GRE, PPP: generic XDP starts there).
    Ip,
}

impl Framing {
    pub const ALL: [Framing; 2] = [Framing::Ethernet, Framing::Ip];
}

#[inline(always)]
pub fn parse<B: Bytes>(frame: &B, framing: Framing) -> Result<Packet, Reason> {
    match framing {
        Framing::Ethernet => parse_ethernet(frame),
        Framing::Ip => parse_ip(frame),
    }
}

#[inline(always)]
pub fn parse_ethernet<B: Bytes>(frame: &B) -> Result<Packet, Reason> {
    let eth = frame.window(0, ETH_HLEN).ok_or(Reason::NotIp)?;
    let mut ether_type = u16::from_be(frame.u16_at(eth, 12));
    let mut offset = ETH_HLEN;
    // A bounded walk for the verifier; whatever is still tagged after it cannot be read.
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let tag = frame.window(offset, 4).ok_or(Reason::NotIp)?;
        ether_type = u16::from_be(frame.u16_at(tag, 2));
        offset += 4;
    }
    match ether_type {
        ETH_P_IP => parse_v4(frame, offset),
        ETH_P_IPV6 => parse_v6(frame, offset),
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::Unreadable),
        _ => Err(Reason::NotIp),
    }
}

/// A frame that starts with the IP header: the version nibble names the family.
#[inline(always)]
pub fn parse_ip<B: Bytes>(frame: &B) -> Result<Packet, Reason> {
    // The shortest IP header: a one-byte window compiles to a comparison (`data >= end`) from
    // which the verifier learns no range.
    let ip = frame.window(0, 20).ok_or(Reason::MalformedIp)?;
    match frame.u8_at(ip, 0) >> 4 {
        4 => parse_v4(frame, 0),
        6 => parse_v6(frame, 0),
        // The receive path of an L3 link hands nothing else to IP either.
        _ => Err(Reason::NotIp),
    }
}

#[inline(always)]
fn parse_v4<B: Bytes>(frame: &B, offset: usize) -> Result<Packet, Reason> {
    let ip = frame.window(offset, 20).ok_or(Reason::MalformedIp)?;
    let header_len = ((frame.u8_at(ip, 0) & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(Reason::MalformedIp);
    }
    let src = Addr::from_v4_word(frame.u32_at(ip, 12));
    let dst = Addr::from_v4_word(frame.u32_at(ip, 16));
    let frag_offset = u16::from_be(frame.u16_at(ip, 6)) & 0x1fff;
    let proto = frame.u8_at(ip, 9);
    if frag_offset != 0 {
        return Ok(Packet { src, dst, l4: L4::LATER_FRAGMENT });
    }
    let total_len = u16::from_be(frame.u16_at(ip, 2)) as usize;
    if total_len < header_len {
        // ip_rcv_core discards it.
        return Err(Reason::MalformedIp);
    }
    let frame = &Clamped { frame, end: offset + total_len };
    let l4_offset = offset + header_len;
    if proto == IPPROTO_ICMP
        && let Some(quoted) = icmp_error_quote(frame, l4_offset, false)
    {
        return Ok(stands_for(frame, quoted, src, dst));
    }
    Ok(Packet { src, dst, l4: parse_l4(frame, l4_offset, proto) })
}

#[inline(always)]
fn parse_v6<B: Bytes>(frame: &B, offset: usize) -> Result<Packet, Reason> {
    let ip = frame.window(offset, 40).ok_or(Reason::MalformedIp)?;
    let (src, dst) = v6_addresses(frame, ip);
    // IPv4 addresses are stored IPv4-mapped, so such a source would pass for an IPv4 one (and
    // match IPv4 allow-lists). No host sends from one on the wire (RFC 4291 2.5.5.2).
    if src.is_v4() {
        return Err(Reason::MappedSource);
    }
    let first = frame.u8_at(ip, 6);
    let payload_len = u16::from_be(frame.u16_at(ip, 4)) as usize;
    // A zero payload length behind a hop-by-hop header announces a jumbogram (RFC 2675),
    // whose length the kernel takes from the option: read to the frame's end.
    let end = if payload_len == 0 && first == IPPROTO_HOPOPTS {
        usize::MAX
    } else {
        offset + 40 + payload_len
    };
    let frame = &Clamped { frame, end };
    let (next, l4_offset, l4) = walk_v6_extensions(frame, first, offset + 40);
    if let Some(l4) = l4 {
        return Ok(Packet { src, dst, l4 });
    }
    if next == IPPROTO_ICMPV6
        && let Some(quoted) = icmp_error_quote(frame, l4_offset, true)
    {
        return Ok(stands_for(frame, quoted, src, dst));
    }
    Ok(Packet { src, dst, l4: parse_l4(frame, l4_offset, next) })
}

/// (source, destination) of the 40-byte IPv6 header in `ip`.
#[inline(always)]
fn v6_addresses<B: Bytes>(frame: &B, ip: B::Window) -> (Addr, Addr) {
    let word = |at| frame.u32_at(ip, at);
    (Addr([word(8), word(12), word(16), word(20)]), Addr([word(24), word(28), word(32), word(36)]))
}

/// Follows the extension headers. Returns the next header and its offset, or the verdict on
/// the transport layer when the chain itself settles it (a later fragment, a chain cut short
/// or longer than the walk).
#[inline(always)]
fn walk_v6_extensions<B: Bytes>(frame: &B, first: u8, offset: usize) -> (u8, usize, Option<L4>) {
    let mut next = first;
    let mut offset = offset;
    // One more round than headers walked, so that a chain of exactly MAX_V6_EXTENSIONS
    // headers still reaches its transport header.
    for _ in 0..=MAX_V6_EXTENSIONS {
        let length_unit = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => 8,
            IPPROTO_AH => 4,
            IPPROTO_FRAGMENT => 0,
            _ => return (next, offset, None),
        };
        // Every extension header starts with (next header, length).
        let Some(ext) = frame.window(offset, 4) else {
            return (next, offset, Some(L4::UNREADABLE));
        };
        next = frame.u8_at(ext, 0);
        let len = frame.u8_at(ext, 1) as usize;
        offset += match length_unit {
            // Fragment header: fixed 8 bytes.
            0 => {
                if u16::from_be(frame.u16_at(ext, 2)) >> 3 != 0 {
                    return (next, offset, Some(L4::LATER_FRAGMENT));
                }
                8
            }
            // AH counts 4-byte units minus 2; the others 8-byte units minus 1.
            4 => (len + 2) * 4,
            _ => (len + 1) * 8,
        };
    }
    (next, offset, Some(L4::UNREADABLE))
}

/// The transport header. Only the first four bytes (the ports, in TCP, UDP and SCTP alike) are
/// needed to judge; a first fragment may carry no more (DESIGN: "tiny first fragments"). A TCP
/// header too short to show its flags is taken for a connection attempt, never a reply.
#[inline(always)]
fn parse_l4<B: Bytes>(frame: &B, offset: usize, proto: u8) -> L4 {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let Some(ports) = frame.window(offset, 4) else {
                return L4::UNREADABLE;
            };
            let sport = u16::from_be(frame.u16_at(ports, 0));
            let dport = u16::from_be(frame.u16_at(ports, 2));
            // SYN without ACK opens a connection, SYN with ACK accepts one.
            let syn_ack = match frame.window(offset, 14) {
                Some(tcp) if proto == IPPROTO_TCP => frame.u8_at(tcp, 13) & 0x12,
                Some(_) => 0,
                None => 0x02,
            };
            let tcp = proto == IPPROTO_TCP;
            let opens = tcp && syn_ack == 0x02;
            L4 { accepts: tcp && syn_ack == 0x12, ..L4::ports(proto, sport, dport, opens) }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => echo(frame, offset, proto == IPPROTO_ICMPV6),
        // Port 0 both ways: judged as a flow between two addresses (its replies remembered
        // like UDP's), and listed as an engine's door on port 0, which no container publishes.
        IPPROTO_ESP => L4::ports(IPPROTO_ESP, 0, 0, false),
        _ => L4::no_ports(proto),
    }
}

/// ICMP echo as a flow: the identifier is the local end's "port". A request is
/// `(sport = id, dport = 0)` and opens the flow; its reply is `(sport = 0, dport = id)`, keyed
/// in flow memory as the request left. No container port is ever opened for port 0 or for the
/// ICMP protocol, so an echo is judged by a container's all-ports rule, as before.
#[inline(always)]
fn echo<B: Bytes>(frame: &B, offset: usize, v6: bool) -> L4 {
    let proto = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    let Some(icmp) = frame.window(offset, 8) else {
        return L4::no_ports(proto);
    };
    let kind = frame.u8_at(icmp, 0);
    let id = u16::from_be(frame.u16_at(icmp, 4));
    let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
    if kind == request {
        L4::ports(proto, id, 0, true)
    } else if kind == reply {
        L4::ports(proto, 0, id, false)
    } else {
        L4::no_ports(proto)
    }
}

/// The packet an ICMP error quotes: the offset of its IP header, and its family.
#[derive(Clone, Copy)]
struct Quote {
    offset: usize,
    v6: bool,
}

/// If the ICMP message at `offset` is an error (destination unreachable, with "fragmentation
/// needed"; packet too big; time exceeded; parameter problem), where its quoted packet starts.
#[inline(always)]
fn icmp_error_quote<B: Bytes>(frame: &B, offset: usize, v6: bool) -> Option<Quote> {
    let icmp = frame.window(offset, 8)?;
    let kind = frame.u8_at(icmp, 0);
    let is_error = if v6 { (1..=4).contains(&kind) } else { matches!(kind, 3 | 11 | 12) };
    is_error.then_some(Quote { offset: offset + 8, v6 })
}

/// An ICMP error is judged as the reply it stands for: from the far end of the quoted flow, to
/// its near end, with the quoted ports swapped, never opening anything. That is how its router
/// (anyone on the path) gets a "fragmentation needed" through to a flow the host or a
/// container started, and nothing else: the quoted packet must have left from the address the
/// error is sent to, or the error is judged as the port-less ICMP message it is.
#[inline(always)]
fn stands_for<B: Bytes>(frame: &B, quote: Quote, src: Addr, dst: Addr) -> Packet {
    let icmp = if quote.v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    let plain = Packet { src, dst, l4: L4::no_ports(icmp) };
    let Some((quoted_src, quoted_dst, proto, l4_offset)) = quoted_header(frame, quote) else {
        return plain;
    };
    if quoted_src != dst {
        return plain;
    }
    let quoted = match proto {
        // ESP too: an IPsec tunnel's path-MTU discovery is an ICMP error about it.
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ICMP | IPPROTO_ICMPV6 | IPPROTO_ESP => {
            parse_l4(frame, l4_offset, proto)
        }
        _ => L4::NO_PORTS,
    };
    if quoted.kind != crate::decision::L4Kind::Ports {
        return plain;
    }
    Packet { src: quoted_dst, dst, l4: L4::standing_for(quoted) }
}

/// (source, destination, protocol, transport offset) of a quoted IP header. Of the extension
/// headers a quoted IPv6 packet may carry only a first fragment's is followed; an error
/// quoting any other chain is judged as the plain ICMP message it is.
#[inline(always)]
fn quoted_header<B: Bytes>(frame: &B, quote: Quote) -> Option<(Addr, Addr, u8, usize)> {
    if quote.v6 {
        let ip = frame.window(quote.offset, 40)?;
        let (src, dst) = v6_addresses(frame, ip);
        let next = frame.u8_at(ip, 6);
        if next != IPPROTO_FRAGMENT {
            return Some((src, dst, next, quote.offset + 40));
        }
        // "Packet too big" about a fragmented datagram quotes its first fragment: step over
        // the fragment header to the ports.
        let fragment = frame.window(quote.offset + 40, 8)?;
        if u16::from_be(frame.u16_at(fragment, 2)) >> 3 != 0 {
            return None;
        }
        Some((src, dst, frame.u8_at(fragment, 0), quote.offset + 48))
    } else {
        let ip = frame.window(quote.offset, 20)?;
        let header_len = ((frame.u8_at(ip, 0) & 0x0f) as usize) * 4;
        // A quoted later fragment carries no ports.
        if header_len < 20 || u16::from_be(frame.u16_at(ip, 6)) & 0x1fff != 0 {
            return None;
        }
        let src = Addr::from_v4_word(frame.u32_at(ip, 12));
        let dst = Addr::from_v4_word(frame.u32_at(ip, 16));
        Some((src, dst, frame.u8_at(ip, 9), quote.offset + header_len))
    }
}
