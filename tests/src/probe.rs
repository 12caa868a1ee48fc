//! Reachability probes and echo servers: std sockets with short timeouts, tiny payloads.
//! They run in whatever network namespace the calling thread is in (see
//! [`crate::netns::in_netns`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
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

/// How long a probe waits for an answer. Everything is one veth hop away, so an answer
/// takes well under a millisecond; a silent drop costs this much.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a TCP handshake to `addr` completes within [`PROBE_TIMEOUT`].
pub fn tcp_connect(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok()
}

/// [`tcp_connect`] to many targets in parallel, from the caller's namespace (the root one:
/// threads inherit the namespace of the thread that creates them).
pub fn tcp_connect_all(addrs: &[SocketAddr]) -> Vec<bool> {
    thread::scope(|scope| {
        let probes: Vec<_> = addrs
            .iter()
            .map(|&addr| scope.spawn(move || tcp_connect(addr)))
            .collect();
        probes
            .into_iter()
            .map(|p| p.join().expect("probe thread panicked"))
            .collect()
    })
}

/// Waits (bounded) until `addr` accepts TCP connections: containers start their listeners a
/// moment after `docker run` returns.
pub fn wait_for_tcp(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while !tcp_connect(addr) {
        assert!(
            Instant::now() < deadline,
            "{addr} does not accept connections after {within:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `payload` from a UDP socket bound to `local` to `remote` and returns the first
/// datagram that comes back from `remote` within [`PROBE_TIMEOUT`], if any.
pub fn udp_roundtrip(local: SocketAddr, remote: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind UDP {local}: {e}"));
    socket
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .expect("set UDP read timeout");
    socket
        .send_to(payload, remote)
        .unwrap_or_else(|e| panic!("send UDP to {remote}: {e}"));
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) if from == remote => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Connects from `local` (a fixed source port, which std's `TcpStream` cannot do) to
/// `remote`, sends `payload` and returns what comes back before the peer closes or
/// [`PROBE_TIMEOUT`] passes; `None` if the handshake does not complete in time.
pub fn tcp_roundtrip(local: SocketAddr, remote: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let family = if local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("TCP socket");
    // The same source port is used again by later checks; a TIME_WAIT must not stop it.
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local))
        .unwrap_or_else(|e| panic!("bind TCP {local}: {e}"));
    // SO_SNDTIMEO bounds a blocking connect() on Linux.
    let timeout = TimeVal::milliseconds(PROBE_TIMEOUT.as_millis() as i64);
    setsockopt(&fd, sockopt::SendTimeout, &timeout).expect("SO_SNDTIMEO");
    connect(fd.as_raw_fd(), &SockaddrStorage::from(remote)).ok()?;
    let mut stream = TcpStream::from(fd);
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .expect("TCP read timeout");
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

#[derive(Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
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
                            listener
                                .set_nonblocking(true)
                                .expect("nonblocking listener");
                            bound_tx.send(Ok(())).unwrap();
                            serve_tcp(&listener, &peers, running);
                        }
                        Proto::Udp => {
                            let socket = match UdpSocket::bind(addr) {
                                Ok(s) => s,
                                Err(e) => return bound_tx.send(Err(e)).unwrap(),
                            };
                            socket
                                .set_read_timeout(Some(POLL))
                                .expect("UDP read timeout");
                            bound_tx.send(Ok(())).unwrap();
                            serve_udp(&socket, &peers, running);
                        }
                    }
                })
            })
        };
        // Return only once the socket is bound, so a client cannot race the server.
        match bound_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("echo server cannot bind {addr}: {e}"),
            Err(e) => panic!("echo server on {addr} did not start: {e}"),
        }
        Self {
            stop,
            peers,
            thread: Some(thread),
        }
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
                // One read is enough for the one-line payloads the tests send; closing
                // afterwards lets a client like busybox nc exit.
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(PROBE_TIMEOUT));
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
    let mut buf = [0u8; 512];
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
