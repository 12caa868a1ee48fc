//! Listening sockets, as the kernel's sock_diag netlink family lists them (what `ss -ltun`
//! reads): TCP listeners and bound, unconnected UDP sockets, both families. Which process owns
//! a socket is found by its inode among the processes' open files.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::host::netlink::{self, NLM_F_DUMP, attrs, header, receive, send};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The attribute an IPv6 socket's message carries with its IPV6_V6ONLY setting.
const INET_DIAG_SKV6ONLY: u16 = 11;
const TCP_LISTEN: u32 = 10;
/// The state of a UDP socket that is bound and not connected: it takes datagrams from anyone
/// (a connected one only from its peer, so it is not a service).
const TCP_CLOSE: u32 = 7;
/// struct inet_diag_msg: family, state, timer, retrans, inet_diag_sockid (48), expires,
/// rqueue, wqueue, uid, inode.
const INET_DIAG_MSG_LEN: usize = 72;

/// The transport a listening socket serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn number(self) -> u8 {
        match self {
            Transport::Tcp => libc::IPPROTO_TCP as u8,
            Transport::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    /// The states in which a socket of this transport takes new peers.
    fn listening_states(self) -> u32 {
        match self {
            Transport::Tcp => 1 << TCP_LISTEN,
            Transport::Udp => 1 << TCP_CLOSE,
        }
    }
}

/// A listening TCP socket (or a bound, unconnected UDP socket) of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub inode: u32,
    /// An IPv6 socket that takes IPv6 alone; without IPV6_V6ONLY (Linux's default, and Go's
    /// for `[::]` and `0.0.0.0` alike) one bound to `::` takes IPv4 too.
    pub v6_only: bool,
}

impl Listener {
    /// The addresses it takes connections on: a dual-stack `[::]` socket's IPv4 wildcard too.
    pub fn bound(&self) -> Vec<SocketAddr> {
        let mut bound = vec![self.addr];
        if self.addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && !self.v6_only {
            bound.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.addr.port()));
        }
        bound
    }
}

/// Every listening TCP socket of the calling thread's network namespace, both families.
pub fn tcp_listeners() -> io::Result<Vec<Listener>> {
    listeners(Transport::Tcp)
}

/// Every socket of `transport` that takes new peers (TCP listeners, bound and unconnected UDP
/// sockets) in the calling thread's network namespace, both families.
pub fn listeners(transport: Transport) -> io::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        listeners.extend(dump(family, transport)?);
    }
    Ok(listeners)
}

/// The name (`/proc/PID/comm`) of a process holding each socket inode in `wanted`; sockets of
/// processes that end while they are read are left out.
pub fn owners(wanted: &std::collections::BTreeSet<u32>) -> std::collections::BTreeMap<u32, String> {
    let mut owners = std::collections::BTreeMap::new();
    let Ok(procs) = fs::read_dir("/proc") else { return owners };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(inodes) = socket_inodes(pid) else { continue };
        let mine: Vec<u32> = inodes.into_iter().filter(|i| wanted.contains(i)).collect();
        if mine.is_empty() {
            continue;
        }
        let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else { continue };
        for inode in mine {
            owners.entry(inode).or_insert_with(|| comm.trim().to_string());
        }
    }
    owners
}

/// The addresses process `pid` listens on for TCP (see [`Listener::bound`]).
pub fn tcp_listeners_of(pid: u32) -> io::Result<Vec<SocketAddr>> {
    let inodes = socket_inodes(pid)?;
    let listeners = tcp_listeners()?.into_iter().filter(|l| inodes.contains(&l.inode));
    Ok(listeners.flat_map(|l| l.bound()).collect())
}

/// The inodes of the sockets among `pid`'s open files (`socket:[N]` links in /proc/PID/fd).
fn socket_inodes(pid: u32) -> io::Result<Vec<u32>> {
    let mut inodes = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = fs::read_link(entry?.path()) else { continue };
        let target = target.to_string_lossy();
        if let Some(n) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'))
            && let Ok(inode) = n.parse()
        {
            inodes.push(inode);
        }
    }
    Ok(inodes)
}

fn dump(family: u8, transport: Transport) -> io::Result<Vec<Listener>> {
    let fd = netlink::socket(libc::NETLINK_SOCK_DIAG)?;
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (zero:
    // every socket).
    let mut msg = header(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP);
    msg.extend_from_slice(&[family, transport.number(), 0, 0]);
    msg.extend_from_slice(&transport.listening_states().to_ne_bytes());
    msg.extend_from_slice(&[0; 48]);
    send(&fd, msg)?;
    let mut listeners = Vec::new();
    receive(&fd, SOCK_DIAG_BY_FAMILY, |body| listeners.extend(listener(transport, body)))?;
    Ok(listeners)
}

fn listener(transport: Transport, msg: &[u8]) -> Option<Listener> {
    if msg.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let src: [u8; 16] = msg[8..24].try_into().unwrap();
    let ip = if msg[0] == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(src))
    };
    let inode = u32::from_ne_bytes(msg[68..72].try_into().unwrap());
    let v6_only = attrs(&msg[INET_DIAG_MSG_LEN..])
        .any(|(kind, value)| kind == INET_DIAG_SKV6ONLY && value.first() == Some(&1));
    Some(Listener { transport, addr: SocketAddr::new(ip, port), inode, v6_only })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_this_process_listens_on_is_found_as_its_own() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mine = tcp_listeners_of(std::process::id()).unwrap();
        assert!(mine.contains(&addr), "{addr} among {mine:?}");
        let v6 = std::net::TcpListener::bind("[::1]:0");
        if let Ok(v6) = v6 {
            let addr6 = v6.local_addr().unwrap();
            assert!(tcp_listeners_of(std::process::id()).unwrap().contains(&addr6));
        }
        // A dual-stack wildcard (how Go binds tcp://0.0.0.0:PORT) takes IPv4 too.
        if let Ok(any) = std::net::TcpListener::bind("[::]:0") {
            let port = any.local_addr().unwrap().port();
            let mine = tcp_listeners_of(std::process::id()).unwrap();
            let v4: SocketAddr = (Ipv4Addr::UNSPECIFIED, port).into();
            assert!(mine.contains(&any.local_addr().unwrap()) && mine.contains(&v4), "{mine:?}");
        }
        drop(listener);
        assert!(!tcp_listeners_of(std::process::id()).unwrap().contains(&addr));
    }

    #[test]
    fn bound_udp_sockets_are_listed_and_connected_ones_are_not() {
        let bound = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(bound.local_addr().unwrap()).unwrap();
        let udp = listeners(Transport::Udp).unwrap();
        let listed = |addr| udp.iter().any(|l| l.addr == addr && l.transport == Transport::Udp);
        assert!(listed(bound.local_addr().unwrap()), "{udp:?}");
        assert!(!listed(connected.local_addr().unwrap()), "{udp:?}");
        let inode = udp.iter().find(|l| l.addr == bound.local_addr().unwrap()).unwrap().inode;
        let owners = owners(&[inode].into());
        let me = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(owners.get(&inode).map(String::as_str), Some(me.trim()));
    }
}
