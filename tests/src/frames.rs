//! Frames that real stacks accept: Ethernet + IPv4 + TCP with valid checksums (the bench's
//! flood goes through the kernel's stack in the iptables and nftables variants, and conntrack
//! checks the TCP checksum; a SYN written into a tun reaches a container's stack), and an ARP
//! request for the bench's floor.

use std::net::Ipv4Addr;

use guard_common::parse::ETH_P_IP;

pub type Mac = [u8; 6];

/// Locally administered placeholders, for frames that never meet a real interface.
pub const MAC_A: Mac = [0x02, 0, 0, 0, 0, 1];
pub const MAC_B: Mac = [0x02, 0, 0, 0, 0, 2];

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Minimum Ethernet frame without FCS: shorter frames are padded, as a NIC would.
const MIN_FRAME: usize = 60;

#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

impl Tcp {
    pub fn syn(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Self {
        Tcp { src, dst, sport: 40_000, dport, flags: TCP_SYN }
    }

    pub fn frame(&self, src_mac: Mac, dst_mac: Mac) -> Vec<u8> {
        let mut f = Vec::with_capacity(MIN_FRAME);
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.extend_from_slice(&self.packet());
        f.resize(MIN_FRAME, 0);
        f
    }

    /// The IPv4 packet alone (what an L3 link such as a tun carries).
    pub fn packet(&self) -> Vec<u8> {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes()); // total length: IP + TCP, no payload
        ip[4..6].copy_from_slice(&1u16.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        let sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(checksum(&[&ip]), 0, "IPv4 header checksum");

        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&self.sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes()); // sequence number
        if self.flags & TCP_ACK != 0 {
            tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
        }
        tcp[12] = 5 << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes()); // window
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&self.src.octets());
        pseudo[4..8].copy_from_slice(&self.dst.octets());
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());

        [ip.as_slice(), tcp.as_slice()].concat()
    }
}

/// Whether `packet` (IPv4, from its IP header on) is a TCP SYN-ACK from `from` to local port
/// `to_port`: the answer of a listening socket, so the SYN got through.
pub fn is_syn_ack(packet: &[u8], from: std::net::SocketAddrV4, to_port: u16) -> bool {
    let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
    let Some(tcp) = packet.get(ihl..ihl + 20) else { return false };
    packet[0] >> 4 == 4
        && packet[9] == 6
        && packet[12..16] == from.ip().octets()
        && tcp[0..2] == from.port().to_be_bytes()
        && tcp[2..4] == to_port.to_be_bytes()
        && tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
}

/// An ARP request: not IP, so guard passes it after looking at the EtherType only.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(MIN_FRAME, 0);
    f
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts` (each of even length
/// but the last).
pub(crate) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
