//! Network namespaces, veth pairs and the outside hosts built from them.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::cmd::{self, run, try_run};
use crate::probe::{self, EchoServer, Outcome, Proto};

/// Prefix of every namespace the test bed creates.
pub const NETNS_PREFIX: &str = "guard-e2e-";
/// Prefix of every host-side interface the test bed creates (IFNAMSIZ leaves no room for
/// the longer namespace prefix).
pub const LINK_PREFIX: &str = "ge2e-";

/// Runs `f` inside the network namespace at `ns` (a `/run/netns/NAME` or `/proc/PID/ns/net`
/// file) and returns its result.
///
/// `setns(CLONE_NEWNET)` switches only the calling thread, so `f` runs on a fresh thread
/// that is thrown away afterwards: the test thread itself never leaves the root namespace,
/// and `f` can use plain std sockets (with their timeouts) instead of shelling out to
/// `ip netns exec`.
pub fn in_netns<R: Send>(ns: &Path, f: impl FnOnce() -> R + Send) -> R {
    let file =
        File::open(ns).unwrap_or_else(|e| panic!("open network namespace {}: {e}", ns.display()));
    thread::scope(|scope| {
        let worker = scope.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {}: {e}", ns.display()));
            f()
        });
        // Re-raise a panic of `f` with its own message rather than a generic one.
        worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        assert!(name.starts_with(NETNS_PREFIX), "namespace {name} lacks the test prefix");
        run("ip", &["netns", "add", name]);
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME args`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` inside this namespace (see [`in_netns`]).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&self.path(), f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = try_run("ip", &["netns", "del", &self.name]) {
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}

/// A veth pair whose `host` end stays in the root namespace and whose `peer` end lives in a
/// namespace. Deleting either end deletes both, so drop only needs the host end; it may
/// already be gone if the namespace went first.
pub struct Veth {
    host: String,
    peer: String,
}

impl Veth {
    pub fn new(host: &str, peer: &str, peer_ns: &Netns) -> Self {
        assert!(host.starts_with(LINK_PREFIX), "interface {host} lacks the test prefix");
        run(
            "ip",
            &["link", "add", host, "type", "veth", "peer", "name", peer, "netns", peer_ns.name()],
        );
        let veth = Self { host: host.to_owned(), peer: peer.to_owned() };
        run("ip", &["link", "set", host, "up"]);
        peer_ns.ip(&["link", "set", peer, "up"]);
        veth
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        if link_exists(&self.host)
            && let Err(e) = try_run("ip", &["link", "del", &self.host])
        {
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether an XDP program is attached to `ifname` (root namespace), in any mode.
pub fn xdp_attached(ifname: &str) -> bool {
    let json = run("ip", &["-j", "link", "show", "dev", ifname]);
    let links: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("parse `ip -j link`: {e}: {json}"));
    links[0].get("xdp").is_some()
}

/// A machine on the network outside the host: a namespace joined to the host by a veth,
/// like a neighbour on the LAN that routes the Docker subnets via the host (which is all it
/// takes to reach containers directly).
///
/// Addresses live in 10.251.N.0/24 and fd00:251:N::/64 (host end .1 / ::1, outside end .2 /
/// ::2): outside Docker's default pools (172.17-31/16, 192.168/16), so they cannot clash
/// with a network dockerd allocates. The namespace gets no default route: it can only send
/// to its own link and to the subnets it is explicitly given, never to a real network.
pub struct OutsideHost {
    // Field order is drop order: the veth goes before its namespace.
    veth: Veth,
    netns: Netns,
    n: u8,
}

impl OutsideHost {
    /// Creates outside host `name` (a short tag such as "a") numbered `n` (the third octet of
    /// its subnet).
    pub fn new(name: &str, n: u8) -> Self {
        let netns = Netns::new(&format!("{NETNS_PREFIX}{name}"));
        let veth = Veth::new(&format!("{LINK_PREFIX}{name}-h"), "uplink0", &netns);
        let host = Self { veth, netns, n };
        run("ip", &["addr", "add", &format!("{}/24", host.host_v4()), "dev", host.host_end()]);
        // nodad: an address is unusable while duplicate detection runs (about a second),
        // and nothing else can hold it on a point-to-point veth.
        run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/64", host.host_v6()),
                "dev",
                host.host_end(),
                "nodad",
            ],
        );
        let peer = host.veth.peer().to_owned();
        host.netns.ip(&["addr", "add", &format!("{}/24", host.v4()), "dev", &peer]);
        host.netns.ip(&["-6", "addr", "add", &format!("{}/64", host.v6()), "dev", &peer, "nodad"]);
        // The probes' worth rests on running inside the namespace (the root namespace reaches
        // every container anyway): only there can a socket bind the host's own addresses.
        let (v4, v6) = (host.v4(), host.v6());
        let bound = host.netns.run(|| UdpSocket::bind((v4, 0)).and(UdpSocket::bind((v6, 0))));
        bound.unwrap_or_else(|e| panic!("cannot bind {v4} / {v6} in {}: {e}", host.netns.name()));
        host
    }

    /// The interface in the root namespace this host's traffic arrives on: the uplink the
    /// agent guards.
    pub fn host_end(&self) -> &str {
        self.veth.host()
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// This host's own address.
    pub fn v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.n, 2)
    }

    pub fn v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x251, self.n.into(), 0, 0, 0, 0, 2)
    }

    /// The host's address on this link (what the outside host would use to reach a published
    /// port).
    pub fn host_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 251, self.n, 1)
    }

    pub fn host_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x251, self.n.into(), 0, 0, 0, 0, 1)
    }

    /// Routes `subnet` (v4 or v6 CIDR) via the host end: the Docker subnets, which makes
    /// their containers, and their bridge gateway, one hop away.
    pub fn route_via_host(&self, subnet: &str) {
        let via = if subnet.contains(':') {
            IpAddr::from(self.host_v6())
        } else {
            IpAddr::from(self.host_v4())
        };
        self.netns.ip(&["route", "add", subnet, "via", &via.to_string()]);
    }

    /// Whether a TCP handshake from this host to `addr` completes within `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> bool {
        self.netns.run(|| probe::tcp_connect(addr, timeout))
    }

    /// [`probe::tcp_outcome`] from this host: answered, refused or silent.
    pub fn tcp_outcome(&self, addr: SocketAddr, timeout: Duration) -> Outcome {
        self.netns.run(|| probe::tcp_outcome(addr, timeout))
    }

    /// [`probe::outcome`] for many targets at once, in parallel: a dropped packet costs the
    /// full timeout, and the scenarios probe dozens of closed ports.
    pub fn outcome_all(&self, targets: &[(Proto, SocketAddr, Duration)]) -> Vec<Outcome> {
        thread::scope(|scope| {
            let probes: Vec<_> = targets
                .iter()
                .map(|&(proto, addr, timeout)| {
                    scope.spawn(move || self.netns.run(|| probe::outcome(proto, addr, timeout)))
                })
                .collect();
            probes.into_iter().map(|p| p.join().expect("probe thread panicked")).collect()
        })
    }

    /// A TCP echo server on `addr` inside this host, serving for at most `lifetime`.
    pub fn tcp_echo(&self, addr: SocketAddr, lifetime: Duration) -> EchoServer {
        EchoServer::tcp(self.netns.path(), addr, lifetime)
    }

    /// A UDP echo server on `addr` inside this host, serving for at most `lifetime`.
    pub fn udp_echo(&self, addr: SocketAddr, lifetime: Duration) -> EchoServer {
        EchoServer::udp(self.netns.path(), addr, lifetime)
    }
}

/// Deletes test namespaces and host-side test links left by a run that never reached its
/// drops.
pub(crate) fn remove_leftovers() {
    for line in run("ip", &["netns", "list"]).lines() {
        // Lines look like "guard-e2e-a (id: 3)" or just "guard-e2e-a".
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(NETNS_PREFIX) {
            cmd::warn(format!("removing leftover namespace {name}"));
            let _ = try_run("ip", &["netns", "del", name]);
        }
    }
    let Ok(links) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for link in links.flatten() {
        let name = link.file_name().to_string_lossy().into_owned();
        if name.starts_with(LINK_PREFIX) {
            cmd::warn(format!("removing leftover interface {name}"));
            let _ = try_run("ip", &["link", "del", &name]);
        }
    }
}

/// The index of the host's interface `ifname` (the test's own namespace).
pub fn ifindex(ifname: &str) -> u32 {
    let path = std::path::Path::new("/sys/class/net").join(ifname).join("ifindex");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.trim().parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
