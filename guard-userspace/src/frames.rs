//! Synthesised frames: Ethernet (optionally VLAN-tagged), IPv4 (optionally with options or as
//! a later fragment) or IPv6 (optionally with extension headers), and a transport header.
//! `guard explain` runs the loaded program on one; the verdict tests on thousands.
//! Checksums are left zero: XDP never checks them, and neither does guard.

use std::net::IpAddr;

use guard_common::{
    decision::{L4, Packet},
    reason::Reason,
};

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    Icmp,
}

impl Transport {
    fn proto(self, v6: bool) -> u8 {
        match self {
            Transport::Tcp(_) => 6,
            Transport::Udp(_) => 17,
            Transport::Sctp(_) => 132,
            Transport::Icmp if v6 => 58,
            Transport::Icmp => 1,
        }
    }

    fn header(self, sport: u16, tcp_flags: u8) -> Vec<u8> {
        let with_port = |len: usize, port: u16| {
            let mut h = vec![0u8; len];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&port.to_be_bytes());
            h
        };
        match self {
            Transport::Tcp(port) => {
                let mut h = with_port(20, port);
                h[12] = 5 << 4; // data offset
                h[13] = tcp_flags;
                h
            }
            Transport::Udp(port) => with_port(8, port),
            Transport::Sctp(port) => with_port(12, port),
            Transport::Icmp => vec![8, 0, 0, 0, 0, 1, 0, 1], // echo request
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
        }
    }

    /// From this source port.
    pub fn sport(mut self, port: u16) -> Self {
        self.sport = port;
        self
    }

    /// A TCP segment of an established connection (ACK), not a connection attempt.
    pub fn established(mut self) -> Self {
        self.tcp_flags = TCP_ACK;
        self
    }

    /// A TCP SYN-ACK: the answer to a connection attempt.
    pub fn syn_ack(mut self) -> Self {
        self.tcp_flags = TCP_SYN | TCP_ACK;
        self
    }

    pub fn v6_extensions(mut self, exts: &[Ext]) -> Self {
        self.v6_extensions = exts.to_vec();
        self
    }

    pub fn vlans(mut self, tags: &[u16]) -> Self {
        self.vlans = tags.to_vec();
        self
    }

    pub fn ip_options(mut self, len: usize) -> Self {
        self.ip_options = len;
        self
    }

    pub fn later_fragment(mut self) -> Self {
        self.frag_offset = 185;
        self
    }

    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let v6 = self.dst.is_ipv6();
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        let mut ether_types: Vec<u16> = match self.vlans.len() {
            0 => vec![],
            1 => vec![0x8100],
            _ => vec![0x88a8, 0x8100],
        };
        ether_types.push(if v6 { 0x86dd } else { 0x0800 });
        f.extend_from_slice(&ether_types[0].to_be_bytes());
        for (i, vid) in self.vlans.iter().enumerate() {
            f.extend_from_slice(&vid.to_be_bytes());
            f.extend_from_slice(&ether_types[i + 1].to_be_bytes());
        }
        let mut payload = if self.frag_offset != 0 {
            vec![0u8; 16]
        } else {
            self.transport.header(self.sport, self.tcp_flags)
        };
        let mut proto = self.transport.proto(v6);
        // Extension headers are chained back to front: each names the one after it.
        for ext in self.v6_extensions.iter().rev() {
            let (kind, mut header) = match *ext {
                Ext::HopByHop => (0u8, vec![0u8; 8]),
                Ext::Routing => (43, vec![0u8; 24]),
                Ext::DestOpts => (60, vec![0u8; 16]),
                Ext::Fragment { offset } => {
                    let mut h = vec![0u8; 8];
                    h[2..4].copy_from_slice(&(offset << 3).to_be_bytes());
                    (44, h)
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
                f.push(0x40 | ihl as u8);
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0, 1]);
                f.extend_from_slice(&self.frag_offset.to_be_bytes());
                f.extend_from_slice(&[64, proto, 0, 0]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
                // Options: NOPs, which any parser must skip by IHL, not by reading them.
                f.extend(std::iter::repeat_n(1u8, self.ip_options));
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                f.extend_from_slice(&[proto, 64]);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&dst.octets());
            }
            _ => panic!("source and destination must be of one family"),
        }
        f.extend_from_slice(&payload);
        if let Some(len) = self.truncate {
            f.truncate(len);
        }
        f
    }

    /// The reason the parser stops with, for frames cut before the end of the IP header (the
    /// reference decision starts where parsing succeeded).
    pub fn parse_failure(&self) -> Option<Reason> {
        let ip_start = 14 + 4 * self.vlans.len();
        let ip_end = ip_start + if self.dst.is_ipv6() { 40 } else { 20 };
        match self.truncate? {
            // Cut inside the VLAN tags: the EtherType is unknown, so it is not IP.
            len if len < ip_start => Some(Reason::NotIp),
            len if len < ip_end => Some(Reason::MalformedIp),
            _ => None,
        }
    }

    /// What the reference decision should be given for this frame, if it parses.
    pub fn packet(&self) -> Packet {
        let whole = Frame { truncate: None, ..self.clone() }.bytes().len();
        let truncated = self.truncate.is_some_and(|len| len < whole);
        // More extension headers than the program walks: decided as port-less.
        let too_many_extensions = self.v6_extensions.len() > 6;
        let later_fragment = too_many_extensions
            || self.frag_offset != 0
            || self
                .v6_extensions
                .iter()
                .any(|e| matches!(e, Ext::Fragment { offset } if *offset != 0));
        let l4 = match self.transport {
            _ if later_fragment => L4::NO_PORTS,
            Transport::Icmp => L4::NO_PORTS,
            _ if truncated => L4::TRUNCATED,
            Transport::Tcp(p) | Transport::Udp(p) | Transport::Sctp(p) => L4::ports(
                self.transport.proto(false),
                self.sport,
                p,
                matches!(self.transport, Transport::Tcp(_))
                    && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
            ),
        };
        Packet { src: self.src.into(), dst: self.dst.into(), l4 }
    }
}
