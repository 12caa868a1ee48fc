//! Listening sockets, as the kernel's sock_diag netlink family lists them (what `ss -ltn`
//! reads): which process owns a listener is found by its inode among the process's open files.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::netlink::{self, NLM_F_DUMP, attrs, header, receive, send};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// The attribute an IPv6 socket's message carries with its IPV6_V6ONLY setting.
const INET_DIAG_SKV6ONLY: u16 = 11;
const TCP_LISTEN: u32 = 10;
/// struct inet_diag_msg: family, state, timer, retrans, inet_diag_sockid (48), expires,
/// rqueue, wqueue, uid, inode.
const INET_DIAG_MSG_LEN: usize = 72;

/// A listening TCP socket of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
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
    let mut listeners = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        listeners.extend(dump(family)?);
    }
    Ok(listeners)
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

fn dump(family: u8) -> io::Result<Vec<Listener>> {
    let fd = netlink::socket(libc::NETLINK_SOCK_DIAG)?;
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (zero:
    // every socket).
    let mut msg = header(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP);
    msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    msg.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    msg.extend_from_slice(&[0; 48]);
    send(&fd, msg)?;
    let mut listeners = Vec::new();
    receive(&fd, SOCK_DIAG_BY_FAMILY, |body| listeners.extend(listener(body)))?;
    Ok(listeners)
}

fn listener(msg: &[u8]) -> Option<Listener> {
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
    Some(Listener { addr: SocketAddr::new(ip, port), inode, v6_only })
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
}
