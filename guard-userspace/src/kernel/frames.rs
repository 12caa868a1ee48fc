//! Synthesised frames: Ethernet (optionally under any stack of VLAN tags) or a bare IP packet
//! (L3 links), IPv4 (optionally with options or as a fragment) or IPv6 (optionally with
//! extension headers), and a transport header, an ICMP echo or an ICMP error quoting another
//! frame. `guard explain` runs the loaded program on one; the verdict tests on thousands.
//! Checksums are left zero: XDP never checks them, and neither does guard.
//!
//! [`Frame::packet`] and [`Frame::parse_failure`] say, from the recipe and independently of
//! [`guard_common::parse`], what the parser must make of the bytes: the tests hold the kernel
//! to that.

use std::net::IpAddr;

use guard_common::{
    addr::Addr,
    decision::{L4, Packet},
    parse::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Framing, IPPROTO_ESP, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, MAX_V6_EXTENSIONS, MAX_VLAN_TAGS,
    },
    reason::Reason,
};

#[derive(Clone, Debug)]
pub enum Transport {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    /// An ICMP echo request with identifier 1 (the frame's source port is not used).
    Icmp,
    /// An ICMP echo request or reply with this identifier.
    Echo {
        reply: bool,
        id: u16,
    },
    /// An ICMP error (destination unreachable / "fragmentation needed" for IPv4, "packet too
    /// big" for IPv6) quoting the IP header and first 8 transport bytes of `quoted`.
    IcmpError(Box<Frame>),
    /// IPsec ESP (SPI 1, sequence 1): no ports.
    Esp,
}

impl Transport {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            Transport::Tcp(_) => IPPROTO_TCP,
            Transport::Udp(_) => IPPROTO_UDP,
            Transport::Sctp(_) => IPPROTO_SCTP,
            Transport::Esp => IPPROTO_ESP,
            Transport::Icmp | Transport::Echo { .. } | Transport::IcmpError(_) if v6 => {
                IPPROTO_ICMPV6
            }
            Transport::Icmp | Transport::Echo { .. } | Transport::IcmpError(_) => IPPROTO_ICMP,
        }
    }

    fn header(&self, sport: u16, tcp_flags: u8, v6: bool) -> Vec<u8> {
        let with_port = |len: usize, port: u16| {
            let mut h = vec![0u8; len];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&port.to_be_bytes());
            h
        };
        match *self {
            Transport::Tcp(port) => {
                let mut h = with_port(20, port);
                h[12] = 5 << 4; // data offset
                h[13] = tcp_flags;
                h
            }
            Transport::Udp(port) => with_port(8, port),
            Transport::Sctp(port) => with_port(12, port),
            Transport::Icmp => Transport::Echo { reply: false, id: 1 }.header(sport, 0, v6),
            Transport::Esp => vec![0, 0, 0, 1, 0, 0, 0, 1],
            Transport::Echo { reply, id } => {
                let kind = match (v6, reply) {
                    (false, false) => 8,
                    (false, true) => 0,
                    (true, false) => 128,
                    (true, true) => 129,
                };
                let mut h = vec![kind, 0, 0, 0, 0, 0, 0, 1];
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h
            }
            Transport::IcmpError(ref quoted) => {
                let mut h = if v6 {
                    vec![2, 0, 0, 0, 0, 0, 0x05, 0x00]
                } else {
                    vec![3, 4, 0, 0, 0, 0, 0x05, 0x00]
                };
                // The IP header, its extension headers and 8 bytes of what follows.
                let headers = quoted.transport_start() - quoted.link_len();
                let quoted = quoted.ip_packet();
                h.extend_from_slice(&quoted[..quoted.len().min(headers + 8)]);
                h
            }
        }
    }
}

/// An IPv6 extension header to put before the transport header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// A fragment header; a non-zero offset makes a later fragment.
    Fragment {
        offset: u16,
    },
}

impl Ext {
    /// The header's length in the frames made here.
    fn len(self) -> usize {
        match self {
            Ext::HopByHop | Ext::Fragment { .. } => 8,
            Ext::Routing => 24,
            Ext::DestOpts => 16,
        }
    }
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    pub vlans: Vec<u16>,
    /// IPv4 option bytes (a multiple of 4).
    pub ip_options: usize,
    /// IPv4 fragment offset in 8-byte units; non-zero makes a later fragment.
    pub frag_offset: u16,
    /// Cut the frame to this many bytes.
    pub truncate: Option<usize>,
    pub sport: u16,
    pub tcp_flags: u8,
    pub v6_extensions: Vec<Ext>,
    /// IPv4 "more fragments": with offset 0, a first fragment.
    pub more_fragments: bool,
    pub framing: Framing,
    /// Keep only this many bytes of the transport header inside the IP packet (its length
    /// fields say so), unlike `truncate`, which cuts the frame short of what they say.
    pub transport_cut: Option<usize>,
    /// Link-layer padding after the IP packet (short Ethernet frames are padded to 60 bytes
    /// with whatever the sender puts there).
    pub padding: Vec<u8>,
}

impl Frame {
    pub fn new(src: &str, dst: &str, transport: Transport) -> Self {
        Frame {
            src: src.parse().expect("source address"),
            dst: dst.parse().expect("destination address"),
            transport,
            vlans: Vec::new(),
            ip_options: 0,
            frag_offset: 0,
            truncate: None,
            sport: 40000,
            tcp_flags: TCP_SYN,
            v6_extensions: Vec::new(),
            more_fragments: false,
            framing: Framing::Ethernet,
            transport_cut: None,
            padding: Vec::new(),
        }
    }

    /// Keeps `len` bytes of the transport header inside the IP packet.
    #[must_use]
    pub fn transport_cut(mut self, len: usize) -> Self {
        self.transport_cut = Some(len);
        self
    }

    /// Pads the frame after its IP packet with `bytes`.
    #[must_use]
    pub fn padding(mut self, bytes: &[u8]) -> Self {
        self.padding = bytes.to_vec();
        self
    }

    /// A bare IP packet, as generic XDP sees it on an L3 link (tun, WireGuard).
    #[must_use]
    pub fn l3(mut self) -> Self {
        self.framing = Framing::Ip;
        self
    }

    /// An IPv4 first fragment (more fragments to come, offset 0).
    #[must_use]
    pub fn first_fragment(mut self) -> Self {
        self.more_fragments = true;
        self
    }

    /// From this source port.
    #[must_use]
    pub fn sport(mut self, port: u16) -> Self {
        self.sport = port;
        self
    }

    /// A TCP segment of an established connection (ACK), not a connection attempt.
    #[must_use]
    pub fn established(mut self) -> Self {
        self.tcp_flags = TCP_ACK;
        self
    }

    /// A TCP SYN-ACK: the answer to a connection attempt.
    #[must_use]
    pub fn syn_ack(mut self) -> Self {
        self.tcp_flags = TCP_SYN | TCP_ACK;
        self
    }

    #[must_use]
    pub fn v6_extensions(mut self, exts: &[Ext]) -> Self {
        self.v6_extensions = exts.to_vec();
        self
    }

    #[must_use]
    pub fn vlans(mut self, tags: &[u16]) -> Self {
        self.vlans = tags.to_vec();
        self
    }

    #[must_use]
    pub fn ip_options(mut self, len: usize) -> Self {
        self.ip_options = len;
        self
    }

    #[must_use]
    pub fn later_fragment(mut self) -> Self {
        self.frag_offset = 185;
        self
    }

    #[must_use]
    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut f = match self.framing {
            Framing::Ethernet => self.link_header(),
            Framing::Ip => Vec::new(),
        };
        f.extend_from_slice(&self.ip_packet());
        f.extend_from_slice(&self.padding);
        if let Some(len) = self.truncate {
            f.truncate(len);
        }
        f
    }

    /// Ethernet, then the VLAN tags: one tag is 802.1Q; a stack starts 802.1ad, then 802.1Q.
    fn link_header(&self) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        let mut ether_types: Vec<u16> = match self.vlans.len() {
            0 => vec![],
            1 => vec![ETH_P_8021Q],
            n => std::iter::once(ETH_P_8021AD)
                .chain(std::iter::repeat_n(ETH_P_8021Q, n - 1))
                .collect(),
        };
        ether_types.push(if self.dst.is_ipv6() { ETH_P_IPV6 } else { ETH_P_IP });
        f.extend_from_slice(&ether_types[0].to_be_bytes());
        for (i, vid) in self.vlans.iter().enumerate() {
            f.extend_from_slice(&vid.to_be_bytes());
            f.extend_from_slice(&ether_types[i + 1].to_be_bytes());
        }
        f
    }

    /// The IP header and everything after it, uncut.
    fn ip_packet(&self) -> Vec<u8> {
        let v6 = self.dst.is_ipv6();
        let mut f = Vec::new();
        let mut payload = if self.frag_offset != 0 {
            vec![0u8; 16]
        } else {
            self.transport.header(self.sport, self.tcp_flags, v6)
        };
        if let Some(len) = self.transport_cut {
            payload.truncate(len);
        }
        let mut proto = self.transport.proto(v6);
        // Extension headers are chained back to front: each names the one after it.
        for ext in self.v6_extensions.iter().rev() {
            let mut header = vec![0u8; ext.len()];
            let kind = match *ext {
                Ext::HopByHop => 0u8,
                Ext::Routing => 43,
                Ext::DestOpts => 60,
                Ext::Fragment { offset } => {
                    header[2..4].copy_from_slice(&(offset << 3).to_be_bytes());
                    44
                }
            };
            header[0] = proto;
            if !matches!(ext, Ext::Fragment { .. }) {
                header[1] = (header.len() / 8 - 1) as u8;
            }
            header.extend_from_slice(&payload);
            payload = header;
            proto = kind;
        }
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ihl = 5 + self.ip_options / 4;
                let total = (ihl * 4 + payload.len()) as u16;
                let flags_offset = self.frag_offset | if self.more_fragments { 0x2000 } else { 0 };
                f.push(0x40 | ihl as u8);
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0, 1]);
                f.extend_from_slice(&flags_offset.to_be_bytes());
                f.extend_from_slice(&[64, proto, 0, 0]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                // Options: NOPs, which any parser must skip by IHL, not by reading them.
                f.extend(std::iter::repeat_n(1u8, self.ip_options));
            }
            (src, IpAddr::V6(dst)) => {
                // An IPv4 source with an IPv6 destination makes an IPv4-mapped IPv6 source.
                let src = match src {
                    IpAddr::V6(src) => src,
                    IpAddr::V4(src) => src.to_ipv6_mapped(),
                };
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                f.extend_from_slice(&[proto, 64]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
            }
            _ => panic!("an IPv6 source needs an IPv6 destination"),
        }
        f.extend_from_slice(&payload);
        f
    }

    /// Bytes before the IP header.
    fn link_len(&self) -> usize {
        match self.framing {
            Framing::Ethernet => 14 + 4 * self.vlans.len(),
            Framing::Ip => 0,
        }
    }

    fn ip_header_len(&self) -> usize {
        if self.dst.is_ipv6() { 40 } else { 20 + self.ip_options }
    }

    /// Where the transport header starts.
    fn transport_start(&self) -> usize {
        let exts: usize = self.v6_extensions.iter().copied().map(Ext::len).sum();
        self.link_len() + self.ip_header_len() + exts
    }

    /// The bytes of the transport header the frame holds.
    /// Padding after the IP packet is not part of it.
    fn transport_bytes(&self) -> usize {
        let whole = self.link_len() + self.ip_packet().len();
        self.truncate.unwrap_or(whole).min(whole).saturating_sub(self.transport_start())
    }

    /// The reason the parser stops with, if it stops before the transport layer.
    pub fn parse_failure(&self) -> Option<Reason> {
        let len = self.truncate.unwrap_or(usize::MAX);
        if self.framing == Framing::Ethernet {
            // Cut inside the link header: the EtherType is unknown, so it is not IP.
            let walked = 14 + 4 * self.vlans.len().min(MAX_VLAN_TAGS);
            if len < walked {
                return Some(Reason::NotIp);
            }
            if self.vlans.len() > MAX_VLAN_TAGS {
                // Still tagged after the walk: the last tag walked names another tag.
                return Some(Reason::Unreadable);
            }
        }
        if len < self.link_len() + if self.dst.is_ipv6() { 40 } else { 20 } {
            return Some(Reason::MalformedIp);
        }
        if self.dst.is_ipv6() && self.src.is_ipv4() {
            return Some(Reason::MappedSource);
        }
        None
    }

    /// What the parser must make of the frame, if it gets past the IP header.
    pub fn packet(&self) -> Packet {
        let (src, dst) = (Addr::from(self.src), Addr::from(self.dst));
        let packet = |l4| Packet { src, dst, l4 };
        if self.frag_offset != 0 {
            return packet(L4::LATER_FRAGMENT);
        }
        // The walk, header by header: it needs the first four bytes of each, stops at a later
        // fragment, and gives up on a chain longer than it walks.
        let cut = self.truncate.unwrap_or(usize::MAX);
        let mut start = self.link_len() + self.ip_header_len();
        for (walked, ext) in self.v6_extensions.iter().enumerate() {
            if walked > MAX_V6_EXTENSIONS {
                break;
            }
            if cut < start + 4 {
                return packet(L4::UNREADABLE);
            }
            if matches!(ext, Ext::Fragment { offset } if *offset != 0) {
                return packet(L4::LATER_FRAGMENT);
            }
            start += ext.len();
        }
        if self.v6_extensions.len() > MAX_V6_EXTENSIONS {
            return packet(L4::UNREADABLE);
        }
        let have = self.transport_bytes();
        let v6 = self.dst.is_ipv6();
        let proto = self.transport.proto(v6);
        match &self.transport {
            Transport::Tcp(p) | Transport::Udp(p) | Transport::Sctp(p) => {
                if have < 4 {
                    return packet(L4::UNREADABLE);
                }
                let is_tcp = matches!(self.transport, Transport::Tcp(_));
                let flags = self.tcp_flags & (TCP_SYN | TCP_ACK);
                let opens = is_tcp && (have < 14 || flags == TCP_SYN);
                let accepts = is_tcp && have >= 14 && flags == TCP_SYN | TCP_ACK;
                packet(L4 { accepts, ..L4::ports(proto, self.sport, *p, opens) })
            }
            // Judged by its addresses alone, however short.
            Transport::Esp => packet(L4::ports(proto, 0, 0, false)),
            _ if have < 8 => packet(L4::no_ports(proto)),
            Transport::Icmp => packet(L4::ports(proto, 1, 0, true)),
            Transport::Echo { reply: false, id } => packet(L4::ports(proto, *id, 0, true)),
            Transport::Echo { reply: true, id } => packet(L4::ports(proto, 0, *id, false)),
            Transport::IcmpError(quoted) => {
                // Judged as the reply it stands for, if it quotes a flow from this destination.
                let q = quoted.packet();
                // Of a quoted chain, only a first fragment's header is followed.
                let followed =
                    matches!(quoted.v6_extensions.as_slice(), [] | [Ext::Fragment { offset: 0 }]);
                let from_here = q.src == dst && followed;
                if from_here && q.l4.kind == guard_common::decision::L4Kind::Ports {
                    Packet { src: q.dst, dst, l4: L4::standing_for(q.l4) }
                } else {
                    packet(L4::no_ports(proto))
                }
            }
        }
    }
}
