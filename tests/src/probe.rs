//! Reachability probes and echo servers: std sockets with short timeouts, tiny payloads.
//! They run in whatever network namespace the calling thread is in (see
//! [`crate::netns::in_netns`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::netns::in_netns;

/// The timeout of a probe that expects silence, i.e. what a silent drop costs. Everything
/// is one veth hop away: an answer takes well under a millisecond on an idle machine.
pub const QUICK: Duration = Duration::from_secs(1);
/// The timeout of a probe that must get through: it outlasts the first SYN retransmission
/// (at 1 s), which a loaded 2-core machine occasionally needs (seen once: a forking busybox
/// httpd missed a 1 s handshake while the outside hosts probed it).
pub const PATIENT: Duration = Duration::from_secs(3);

/// A transport protocol, for probes and echo servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// What came back to a probe. Silence and refusal are different findings: a RST or an ICMP
/// error means the packet got through to a stack (nothing listens there), only silence means
/// it was dropped on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handshake completed, or the UDP echo came back.
    Answered,
    /// A RST or an ICMP error (port, host or network unreachable) came back.
    Refused,
    /// Nothing came back within the timeout.
    Silent,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Silent => "silent",
        })
    }
}

/// The outcome of a socket error: which errors mean something came back, which mean nothing
/// did; anything else is a broken test bed, not a finding.
fn error_outcome(e: &std::io::Error, what: &str) -> Outcome {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Silent,
        ErrorKind::ConnectionRefused
        | ErrorKind::ConnectionReset
        | ErrorKind::HostUnreachable
        | ErrorKind::NetworkUnreachable => Outcome::Refused,
        _ => panic!("{what}: {e}"),
    }
}

/// Whether a TCP handshake to `addr` completes within `timeout`.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> bool {
    tcp_outcome(addr, timeout) == Outcome::Answered
}

/// A TCP handshake to `addr`: completed, refused (RST or ICMP error) or unanswered within
/// `timeout`.
pub fn tcp_outcome(addr: SocketAddr, timeout: Duration) -> Outcome {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => Outcome::Answered,
        Err(e) => error_outcome(&e, &format!("TCP connect to {addr}")),
    }
}

/// A probe of `addr`: a TCP handshake, or for UDP a datagram echoed back (the test bed's UDP
/// listeners are echo servers), within `timeout`.
pub fn outcome(proto: Proto, addr: SocketAddr, timeout: Duration) -> Outcome {
    match proto {
        Proto::Tcp => tcp_outcome(addr, timeout),
        Proto::Udp => udp_outcome(addr, timeout),
    }
}

/// Whether `addr` answers (see [`outcome`]).
pub fn reachable(proto: Proto, addr: SocketAddr, timeout: Duration) -> bool {
    outcome(proto, addr, timeout) == Outcome::Answered
}

/// [`outcome`] for many targets in parallel (a silent drop costs the full timeout), from the
/// caller's namespace: threads start in the namespace of the thread that creates them.
pub fn outcome_all(targets: &[(Proto, SocketAddr, Duration)]) -> Vec<Outcome> {
    thread::scope(|scope| {
        let probes: Vec<_> = targets
            .iter()
            .map(|&(proto, addr, timeout)| scope.spawn(move || outcome(proto, addr, timeout)))
            .collect();
        probes.into_iter().map(|p| p.join().expect("probe thread panicked")).collect()
    })
}

/// A datagram to `addr` from an unconnected socket (docker-proxy may answer from another
/// address than the one asked, see [`udp_roundtrip`]) that reports ICMP errors: with
/// IP_RECVERR even an unconnected socket's next receive fails with the error an ICMP port or
/// host unreachable carried.
fn udp_outcome(addr: SocketAddr, timeout: Duration) -> Outcome {
    let any = SocketAddr::new(unspecified(addr), 0);
    let socket = UdpSocket::bind(any).unwrap_or_else(|e| panic!("bind UDP {any}: {e}"));
    let (level, option) = match addr {
        SocketAddr::V4(_) => (libc::SOL_IP, libc::IP_RECVERR),
        SocketAddr::V6(_) => (libc::SOL_IPV6, libc::IPV6_RECVERR),
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int-sized option value for the duration of the call.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert!(set == 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
    socket.set_read_timeout(Some(timeout)).expect("set UDP read timeout");
    socket.send_to(b"probe", addr).unwrap_or_else(|e| panic!("UDP send to {addr}: {e}"));
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) if &buf[..n] == b"probe" => Outcome::Answered,
        Ok((n, from)) => panic!("UDP probe of {addr}: {from} sent {n} bytes that are no echo"),
        Err(e) => error_outcome(&e, &format!("UDP probe of {addr}")),
    }
}

/// The wildcard address of `addr`'s family.
pub fn unspecified(addr: SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Waits (bounded) until `addr` accepts TCP connections: containers start their listeners a
/// moment after `docker run` returns.
pub fn wait_for_tcp(addr: SocketAddr, within: Duration) {
    let accepted =
        crate::wait::poll_every(Duration::from_millis(100), within, || tcp_connect(addr, QUICK));
    assert!(accepted.is_some(), "{addr} does not accept connections after {within:?}");
}

/// Sends `payload` from a UDP socket bound to `local` to `remote` and returns the first
/// datagram that comes back within `timeout`, if any. From any address:
/// docker-proxy, which serves published ports on v6, answers a datagram sent to one host
/// address (a bridge gateway) from whichever address routing picks (the link's).
pub fn udp_roundtrip(
    local: SocketAddr,
    remote: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind UDP {local}: {e}"));
    socket.set_read_timeout(Some(timeout)).expect("set UDP read timeout");
    socket.send_to(payload, remote).ok()?;
    // Room for any datagram: large replies arrive fragmented and are reassembled first.
    let mut buf = vec![0u8; 65536];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Connects from `local` (a fixed source port, which std's `TcpStream` cannot do) to
/// `remote`, sends `payload` and returns what comes back before the peer closes or
/// `timeout` passes; `None` if the handshake does not complete within `timeout`.
pub fn tcp_roundtrip(
    local: SocketAddr,
    remote: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let family = if local.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("TCP socket");
    // The same source port is used again by later checks; a TIME_WAIT must not stop it.
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local))
        .unwrap_or_else(|e| panic!("bind TCP {local}: {e}"));
    // SO_SNDTIMEO bounds a blocking connect() on Linux.
    let connect_timeout = TimeVal::milliseconds(timeout.as_millis() as i64);
    setsockopt(&fd, sockopt::SendTimeout, &connect_timeout).expect("SO_SNDTIMEO");
    connect(fd.as_raw_fd(), &SockaddrStorage::from(remote)).ok()?;
    let mut stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(timeout)).expect("TCP read timeout");
    stream.write_all(payload).ok()?;
    let mut reply = Vec::new();
    // A timeout after part of the reply still returns that part.
    let _ = stream.read_to_end(&mut reply);
    Some(reply)
}

/// An echo server running inside a namespace on its own thread, for a bounded time: it
/// sends every TCP connection's first read, or every UDP datagram, back to its sender, and
/// records who the senders were (after any NAT on the way).
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

/// How often the serving loop looks at its stop flag and deadline.
const POLL: Duration = Duration::from_millis(20);

impl EchoServer {
    pub fn tcp(netns: PathBuf, addr: SocketAddr, lifetime: Duration) -> Self {
        Self::start(netns, addr, lifetime, Proto::Tcp)
    }

    pub fn udp(netns: PathBuf, addr: SocketAddr, lifetime: Duration) -> Self {
        Self::start(netns, addr, lifetime, Proto::Udp)
    }

    fn start(netns: PathBuf, addr: SocketAddr, lifetime: Duration, proto: Proto) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (bound_tx, bound_rx) = mpsc::channel();
        let thread = {
            let (stop, peers) = (stop.clone(), peers.clone());
            thread::spawn(move || {
                in_netns(&netns, || {
                    let deadline = Instant::now() + lifetime;
                    let running = || !stop.load(Ordering::Relaxed) && Instant::now() < deadline;
                    match proto {
                        Proto::Tcp => {
                            let listener = TcpListener::bind(addr);
                            let listener = match listener {
                                Ok(l) => l,
                                Err(e) => return bound_tx.send(Err(e)).unwrap(),
                            };
                            listener.set_nonblocking(true).expect("nonblocking listener");
                            bound_tx.send(Ok(())).unwrap();
                            serve_tcp(&listener, &peers, running);
                        }
                        Proto::Udp => {
                            let socket = match UdpSocket::bind(addr) {
                                Ok(s) => s,
                                Err(e) => return bound_tx.send(Err(e)).unwrap(),
                            };
                            socket.set_read_timeout(Some(POLL)).expect("UDP read timeout");
                            bound_tx.send(Ok(())).unwrap();
                            serve_udp(&socket, &peers, running);
                        }
                    }
                });
            })
        };
        // Return only once the socket is bound, so a client cannot race the server.
        match bound_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("echo server cannot bind {addr}: {e}"),
            Err(e) => panic!("echo server on {addr} did not start: {e}"),
        }
        Self { stop, peers, thread: Some(thread) }
    }

    /// The source addresses of everything echoed so far, as the server saw them.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

fn serve_tcp(listener: &TcpListener, peers: &Mutex<Vec<SocketAddr>>, running: impl Fn() -> bool) {
    while running() {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                peers.lock().unwrap().push(peer);
                // One read is enough for the tiny payloads the tests send; closing afterwards
                // ends the client's read.
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(PATIENT));
                let mut buf = [0u8; 512];
                if let Ok(n) = conn.read(&mut buf) {
                    let _ = conn.write_all(&buf[..n]);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) => panic!("echo accept: {e}"),
        }
    }
}

fn serve_udp(socket: &UdpSocket, peers: &Mutex<Vec<SocketAddr>>, running: impl Fn() -> bool) {
    // Any datagram, echoed whole: a large request makes a large (fragmented) reply.
    let mut buf = vec![0u8; 65536];
    while running() {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                peers.lock().unwrap().push(peer);
                let _ = socket.send_to(&buf[..n], peer);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("echo recv: {e}"),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // Already bounded by the poll interval; a panic inside shows in the test output.
            let _ = thread.join();
        }
    }
}
