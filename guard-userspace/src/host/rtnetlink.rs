//! The few rtnetlink requests guard makes itself (aya keeps its own to itself): list the
//! links of the agent's network namespace, list and delete a clsact qdisc's filters, delete
//! the qdisc, and read the mode of an interface's XDP program.

use std::{io, os::fd::OwnedFd};

use crate::host::netlink::{self, NLM_F_DUMP, NLMSG_DONE, attrs, header, receive, send};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_DELQDISC: u16 = 37;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const RTM_NEWTFILTER: u16 = 44;
const NLM_F_ACK: u16 = 0x4;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFINFOMSG_LEN: usize = 16;
const TCMSG_LEN: usize = 20;
/// htons(ETH_P_ALL): the protocol guard's filters (aya's) match.
const ETH_P_ALL_BE: u32 = (libc::ETH_P_ALL as u16).to_be() as u32;

fn socket() -> io::Result<OwnedFd> {
    netlink::socket(libc::NETLINK_ROUTE)
}

/// nlmsghdr + tcmsg, for the traffic-control requests.
fn request(kind: u16, flags: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut msg = header(kind, flags);
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&handle.to_ne_bytes());
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&info.to_ne_bytes());
    msg
}

fn push_attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    msg.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

fn c_string(payload: &[u8]) -> String {
    let end = payload.iter().position(|b| *b == 0).unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

pub fn dump_filters(ifindex: u32, parent: u32) -> io::Result<Vec<Filter>> {
    let fd = socket()?;
    send(&fd, request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, 0))?;
    let mut filters = Vec::new();
    receive(&fd, RTM_NEWTFILTER, |body| {
        if body.len() < TCMSG_LEN {
            return;
        }
        let handle = u32::from_ne_bytes(body[8..12].try_into().unwrap());
        let info = u32::from_ne_bytes(body[16..20].try_into().unwrap());
        let mut kind = String::new();
        let (mut name, mut program_id) = (String::new(), 0);
        for (attr, payload) in attrs(&body[TCMSG_LEN..]) {
            match attr {
                TCA_KIND => kind = c_string(payload),
                TCA_OPTIONS => {
                    for (option, value) in attrs(payload) {
                        match option {
                            TCA_BPF_NAME => name = c_string(value),
                            TCA_BPF_ID if value.len() >= 4 => {
                                program_id = u32::from_ne_bytes(value[..4].try_into().unwrap());
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        // Handle 0 is the chain's own entry for a priority, not a filter.
        if kind == "bpf" && handle != 0 {
            filters.push(Filter { priority: (info >> 16) as u16, handle, name, program_id });
        }
    })?;
    Ok(filters)
}

/// How many filters of any kind both sides of `ifindex`'s clsact qdisc hold.
pub fn dump_any_filter(ifindex: u32) -> io::Result<usize> {
    let mut count = 0;
    for parent in [0xFFFF_FFF2, 0xFFFF_FFF3] {
        let fd = socket()?;
        send(&fd, request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, 0))?;
        receive(&fd, RTM_NEWTFILTER, |body| {
            // Handle 0 is a priority's own entry, not a filter.
            if body.len() >= TCMSG_LEN && body[8..12] != [0; 4] {
                count += 1;
            }
        })?;
    }
    Ok(count)
}

/// Deletes the clsact qdisc of `ifindex` (TC_H_CLSACT).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let fd = socket()?;
    let mut msg = request(RTM_DELQDISC, NLM_F_ACK, ifindex, 0xFFFF_0000, 0xFFFF_FFF1, 0);
    push_attr(&mut msg, TCA_KIND, b"clsact\0");
    send(&fd, msg)?;
    receive(&fd, NLMSG_DONE, |_| {})
}

pub fn delete_filter(ifindex: u32, parent: u32, priority: u16, handle: u32) -> io::Result<()> {
    let fd = socket()?;
    let info = (u32::from(priority) << 16) | ETH_P_ALL_BE;
    let mut msg = request(RTM_DELTFILTER, NLM_F_ACK, ifindex, handle, parent, info);
    push_attr(&mut msg, TCA_KIND, b"bpf\0");
    send(&fd, msg)?;
    receive(&fd, NLMSG_DONE, |_| {})
}

/// How an interface runs its XDP program (IFLA_XDP_ATTACHED: XDP_ATTACHED_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttached {
    None,
    Driver,
    Generic,
    Offloaded,
    /// More than one mode at once.
    Multi,
}

/// One link of the namespace, as RTM_GETLINK describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkRecord {
    pub ifindex: u32,
    pub name: String,
    /// ARPHRD_* (ifinfomsg's type).
    pub link_type: u16,
    /// The ifindex of the bridge or bond it is enslaved to.
    pub master: Option<u32>,
    /// The driver's kind ("veth", "bridge", "vxlan"...); None for a physical device.
    pub kind: Option<String>,
}

/// Every link of the calling thread's network namespace. Read over rtnetlink rather than
/// /sys/class/net, which shows the namespace sysfs was mounted in: `nsenter --net` changes
/// the one and not the other.
pub fn dump_links() -> io::Result<Vec<LinkRecord>> {
    let fd = socket()?;
    let mut msg = header(RTM_GETLINK, NLM_F_DUMP);
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&[0; 12]);
    send(&fd, msg)?;
    let mut links = Vec::new();
    receive(&fd, RTM_NEWLINK, |body| {
        if body.len() < IFINFOMSG_LEN {
            return;
        }
        let link_type = u16::from_ne_bytes([body[2], body[3]]);
        let ifindex = i32::from_ne_bytes(body[4..8].try_into().unwrap()) as u32;
        let mut link =
            LinkRecord { ifindex, name: String::new(), link_type, master: None, kind: None };
        for (attr, payload) in attrs(&body[IFINFOMSG_LEN..]) {
            match attr {
                IFLA_IFNAME => link.name = c_string(payload),
                IFLA_MASTER if payload.len() >= 4 => {
                    link.master = Some(u32::from_ne_bytes(payload[..4].try_into().unwrap()));
                }
                IFLA_LINKINFO => {
                    link.kind = attrs(payload)
                        .find(|(field, _)| *field == IFLA_INFO_KIND)
                        .map(|(_, kind)| c_string(kind));
                }
                _ => {}
            }
        }
        links.push(link);
    })?;
    Ok(links)
}

/// The mode and program id of `ifindex`'s XDP program, as the kernel reports them.
pub fn xdp_attached(ifindex: u32) -> io::Result<(XdpAttached, u32)> {
    let fd = socket()?;
    // Acknowledged, so that the answer ends like a dump's (here with the ack after the link).
    let mut msg = header(RTM_GETLINK, NLM_F_ACK);
    // struct ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&[0; 8]);
    send(&fd, msg)?;
    let (mut attached, mut program) = (XdpAttached::None, 0);
    receive(&fd, RTM_NEWLINK, |body| {
        let Some(attributes) = body.get(IFINFOMSG_LEN..) else { return };
        for (attr, payload) in attrs(attributes) {
            if attr != IFLA_XDP {
                continue;
            }
            for (field, value) in attrs(payload) {
                if field == IFLA_XDP_PROG_ID && value.len() >= 4 {
                    program = u32::from_ne_bytes(value[..4].try_into().unwrap());
                }
                if field == IFLA_XDP_ATTACHED && !value.is_empty() {
                    attached = match value[0] {
                        1 => XdpAttached::Driver,
                        2 => XdpAttached::Generic,
                        3 => XdpAttached::Offloaded,
                        4 => XdpAttached::Multi,
                        _ => XdpAttached::None,
                    };
                }
            }
        }
    })?;
    Ok((attached, program))
}

/// A bpf filter found on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The name the program was attached with.
    pub name: String,
    pub program_id: u32,
}
