//! Random policies and random frames for the differential test. A small SplitMix64 keeps the
//! test free of dependencies and makes every run replayable from its seed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use guard_common::{addr::Addr, maps::FlowKey};
use guard_userspace::{
    policy::Proto,
    policy::file::{self as policy_file, PolicyFile},
    policy::snapshot::{ApiListener, Container, EngineDoors, Network, Published, Snapshot, Swarm},
};

use guard_common::parse::{MAX_V6_EXTENSIONS, MAX_VLAN_TAGS};
use guard_userspace::kernel::frames::{Ext, Frame, Transport};

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn port(&mut self) -> u16 {
        1 + self.below(65535) as u16
    }
}

/// A random Docker world: networks, containers with labels and published ports, host
/// addresses; plus the addresses worth aiming frames at.
pub struct World {
    pub snapshot: Snapshot,
    pub host: Vec<IpAddr>,
    pub subnets: Vec<(IpAddr, u8)>,
    /// Ports that matter (published, opened): frames aim at these most of the time.
    pub ports: Vec<u16>,
    /// Sources named in allow labels (and addresses inside them).
    pub sources: Vec<IpAddr>,
    pub flows: Vec<FlowKey>,
    pub policy: PolicyFile,
}

/// An address inside `net/len` (host part random).
fn inside(rng: &mut Rng, net: IpAddr, len: u8) -> IpAddr {
    match net {
        IpAddr::V4(v4) => {
            let host_bits = 32 - u32::from(len);
            let mask = if host_bits == 32 { u32::MAX } else { (1u32 << host_bits) - 1 };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) | (rng.next() as u32 & mask)))
        }
        IpAddr::V6(v6) => {
            let host_bits = 128 - u32::from(len);
            let mask = if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            let r = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) | (r & mask)))
        }
    }
}

impl World {
    pub fn random(rng: &mut Rng, index: usize) -> World {
        let mut subnets = Vec::new();
        let mut networks = Vec::new();
        for n in 0..=(rng.below(3) as u8) {
            let v4_len = *rng.pick(&[12u8, 16, 20, 24, 28]);
            let v4 = IpAddr::V4(Ipv4Addr::new(172, 16 + n * 4, 0, 0));
            let v6_len = *rng.pick(&[48u8, 56, 64]);
            let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x30 + u16::from(n), 0, 0, 0, 0, 0, 0));
            subnets.extend([(v4, v4_len), (v6, v6_len)]);
            networks.push(Network {
                id: format!("net{n}"),
                name: format!("net{n}"),
                bridge: Some(format!("br-net{n}")),
                subnets: vec![
                    format!("{v4}/{v4_len}").parse().unwrap(),
                    format!("{v6}/{v6_len}").parse().unwrap(),
                ],
                gateways: vec![inside(rng, v4, v4_len), inside(rng, v6, v6_len)],
            });
        }
        let host: Vec<IpAddr> = vec![
            "198.18.0.1".parse().unwrap(),
            // The broadcast address of the host's subnet, as interfaces::host_addresses lists it.
            "198.18.0.255".parse().unwrap(),
            "2001:db8:18::1".parse().unwrap(),
            inside(rng, "198.19.0.0".parse().unwrap(), 16),
        ];
        let mut ports = Vec::new();
        let mut sources = Vec::new();
        let mut containers = Vec::new();
        for c in 0..=rng.below(12) {
            let mut addresses = Vec::new();
            for _ in 0..=rng.below(3) {
                let (net, len) = *rng.pick(&subnets);
                addresses.push(inside(rng, net, len));
            }
            let mut published = Vec::new();
            for _ in 0..rng.below(4) {
                let container_port = rng.port();
                let host_port = if rng.chance(30) { container_port } else { rng.port() };
                let host_ip = match rng.below(5) {
                    0 => "127.0.0.1".parse().unwrap(),
                    1 => *rng.pick(&host),
                    2 => "::".parse().unwrap(),
                    _ => "0.0.0.0".parse().unwrap(),
                };
                let proto = *rng.pick(&[Proto::Tcp, Proto::Tcp, Proto::Udp, Proto::Sctp]);
                ports.extend([container_port, host_port]);
                published.push(Published { host_ip, host_port, container_port, proto });
            }
            let mut labels = std::collections::BTreeMap::new();
            let port_spec = |rng: &mut Rng, ports: &mut Vec<u16>| -> String {
                let port =
                    if !ports.is_empty() && rng.chance(70) { *rng.pick(ports) } else { rng.port() };
                ports.push(port);
                match rng.below(8) {
                    0 => "*".into(),
                    1 => format!("{port}-{}/tcp", port.saturating_add(rng.below(5) as u16)),
                    2 => format!("{port}/udp"),
                    3 => format!("{port}/sctp"),
                    // Every port of one protocol, alone or beside a port of another.
                    4 => format!("*/{}", rng.pick(&["tcp", "udp", "sctp"])),
                    5 => format!("*/{},{port}", rng.pick(&["tcp", "udp", "sctp"])),
                    _ => format!("{port}"),
                }
            };
            if rng.chance(40) {
                labels.insert("guard.expose".into(), port_spec(rng, &mut ports));
            }
            for a in 0..rng.below(3) {
                let spec = port_spec(rng, &mut ports);
                let mut cidrs = Vec::new();
                for _ in 0..=rng.below(3) {
                    let (net, len) = if rng.chance(60) {
                        ("198.51.100.0".parse::<IpAddr>().unwrap(), *rng.pick(&[24u8, 28, 32]))
                    } else {
                        ("2001:db8:51::".parse::<IpAddr>().unwrap(), *rng.pick(&[48u8, 64, 128]))
                    };
                    let net = inside(rng, net, len);
                    sources.push(net);
                    cidrs.push(format!("{net}/{len}"));
                }
                labels.insert(
                    format!("guard.allow.a{a}"),
                    format!("{spec} from {}", cidrs.join(", ")),
                );
            }
            if rng.chance(5) {
                labels.insert("guard.expose".into(), "443/tpc".into()); // rejected: stays closed
            }
            containers.push(Container {
                id: format!("{:016x}{:016x}{:016x}{:016x}", index, c, rng.next(), rng.next()),
                name: format!("c{index}-{c}"),
                image: "busybox".into(),
                labels,
                addresses,
                published,
            });
        }
        let doors = random_doors(rng, &host, &mut sources, &mut ports);
        let mut world = World {
            snapshot: Snapshot { networks, containers, doors },
            host,
            subnets,
            ports,
            sources,
            flows: Vec::new(),
            policy: PolicyFile::default(),
        };
        world.policy = world.random_policy(rng);
        for _ in 0..rng.below(6) {
            let frame = world.frame(rng);
            if let Some(flow) = reply_flow(&frame) {
                world.flows.push(flow);
            }
        }
        world
    }

    /// A policy file: sometimes global audit, trusted and denied sources, rules that open
    /// ports, replace labels or audit one container. Written as TOML and parsed, like the operator's.
    fn random_policy(&self, rng: &mut Rng) -> PolicyFile {
        let mut text = String::new();
        if rng.chance(15) {
            text += "mode = \"audit\"\n";
        }
        if rng.chance(30) {
            let trusted = if rng.chance(50) { "203.0.113.0/26" } else { "2001:db8:77::/49" };
            text += &format!("trusted_sources = [\"{trusted}\"]\n");
        }
        // Often enough that a run's 40 worlds reach `Denied` a dozen times, not a handful (a
        // run that reached it in none failed its coverage check on 5.10, seed
        // 1796664913095560370).
        if rng.chance(60) {
            // Overlapping the trusted and allowed ranges: a denial outweighs both.
            let deny = rng.pick(&[
                "[\"203.0.113.5\", \"203.0.113.64/27\"]",
                "[\"203.0.113.0/28\", \"2001:db8:77::/50\"]",
                "[\"203.0.113.77\", \"203.0.113.200\", \"2001:db8:77:4000::/50\"]",
            ]);
            text += &format!("deny = {deny}\n");
        }
        if rng.chance(50) {
            text += &format!(
                "[management]\nenforce = {}\ncluster = [\"198.51.100.0/28\"]\nadmin = [\"2001:db8:51::/64\"]\n",
                rng.chance(85)
            );
        }
        for container in &self.snapshot.containers {
            match rng.below(8) {
                0 => {
                    text += &format!(
                        "[[rule]]\nmatch = {{ container = \"{}\" }}\nmode = \"audit\"\n",
                        container.name
                    );
                }
                1 => {
                    let port = if self.ports.is_empty() { 80 } else { *rng.pick(&self.ports) };
                    let replace = rng.chance(50);
                    text += &format!(
                        "[[rule]]\nmatch = {{ container = \"{}\" }}\nexpose = [\"{port}\"]\nreplace = {replace}\n",
                        container.name
                    );
                }
                2 => {
                    let ports = rng.pick(&["*", "*/udp", "*/tcp"]);
                    text += &format!(
                        "[[rule]]\nmatch = {{ image = \"busy*\", container = \"{}\" }}\nallow = [{{ ports = \"{ports}\", from = [\"203.0.113.0/25\"] }}]\n",
                        container.name
                    );
                }
                _ => {}
            }
        }
        policy_file::parse(&text, "random.toml")
            .unwrap_or_else(|e| panic!("generated policy: {e}\n{text}"))
    }

    fn destination(&self, rng: &mut Rng) -> IpAddr {
        let containers: Vec<IpAddr> =
            self.snapshot.containers.iter().flat_map(|c| c.addresses.iter().copied()).collect();
        let gateways: Vec<IpAddr> =
            self.snapshot.networks.iter().flat_map(|n| n.gateways.iter().copied()).collect();
        match rng.below(10) {
            0..=2 => *rng.pick(&containers),
            3..=4 => *rng.pick(&self.host),
            5 => *rng.pick(&gateways),
            6 => {
                let (net, len) = *rng.pick(&self.subnets);
                inside(rng, net, len)
            }
            7 => *rng.pick(&["127.0.0.1", "127.9.9.9", "::1"].map(|s| s.parse().unwrap())),
            8 if rng.chance(50) => {
                // Broadcast and multicast: docker-proxy's wildcard sockets receive them.
                let groups = ["255.255.255.255", "224.0.0.1", "239.1.2.3", "ff02::1", "ff05::1:3"];
                rng.pick(&groups).parse().unwrap()
            }
            _ => {
                // Routed through the host, or near a Docker network without being in it.
                let far = ["192.0.2.0", "10.0.0.0", "2001:db8:99::", "fd00:31::"];
                let net: IpAddr = rng.pick(&far).parse().unwrap();
                inside(rng, net, if net.is_ipv4() { 24 } else { 64 })
            }
        }
    }

    fn source(&self, rng: &mut Rng, v6: bool) -> IpAddr {
        let same_family: Vec<IpAddr> =
            self.sources.iter().copied().filter(|s| s.is_ipv6() == v6).collect();
        if !same_family.is_empty() && rng.chance(50) {
            *rng.pick(&same_family)
        } else if v6 {
            inside(rng, "2001:db8:77::".parse().unwrap(), 48)
        } else {
            inside(rng, "203.0.113.0".parse().unwrap(), 24)
        }
    }

    /// A random frame aimed at this world.
    pub fn frame(&self, rng: &mut Rng) -> Frame {
        let mut dst = self.destination(rng);
        // Keep the two ends of one family.
        let v6 = dst.is_ipv6();
        let mut src = self.source(rng, v6);
        if src.is_ipv6() != dst.is_ipv6() {
            dst = src;
        }
        // Now and then a forged source: one of the world's containers.
        let containers: Vec<IpAddr> = self
            .snapshot
            .containers
            .iter()
            .flat_map(|c| c.addresses.iter().copied())
            .filter(|a| a.is_ipv6() == dst.is_ipv6())
            .collect();
        if !containers.is_empty() && rng.chance(3) {
            src = *rng.pick(&containers);
        }
        let port = if !self.ports.is_empty() && rng.chance(75) {
            *rng.pick(&self.ports)
        } else {
            rng.port()
        };
        let transport = match rng.below(10) {
            0..=3 => Transport::Tcp(port),
            4..=5 => Transport::Udp(port),
            6 => Transport::Sctp(port),
            7 => Transport::Icmp,
            8 if rng.chance(50) => Transport::Esp,
            _ => Transport::Echo { reply: rng.chance(50), id: port },
        };
        // A reply to one of the flows started inside, now and then; or an ICMP error about it.
        if !self.flows.is_empty() && rng.chance(15) {
            let flow = *rng.pick(&self.flows);
            let (remote, local) = (IpAddr::from(flow.remote), IpAddr::from(flow.local));
            let reply = match flow.proto {
                6 => Transport::Tcp(flow.local_port),
                17 => Transport::Udp(flow.local_port),
                1 | 58 => Transport::Echo { reply: true, id: flow.local_port },
                50 => Transport::Esp,
                _ => Transport::Sctp(flow.local_port),
            };
            let frame = Frame::new(&remote.to_string(), &local.to_string(), reply.clone())
                .sport(flow.remote_port);
            if rng.chance(25) {
                // What the flow's own packet looked like on the way out, quoted by a router.
                let out = match reply {
                    Transport::Echo { id, .. } => Transport::Echo { reply: false, id },
                    Transport::Tcp(_) => Transport::Tcp(flow.remote_port),
                    Transport::Udp(_) => Transport::Udp(flow.remote_port),
                    _ => Transport::Sctp(flow.remote_port),
                };
                let quoted =
                    Frame::new(&local.to_string(), &remote.to_string(), out).sport(flow.local_port);
                let router = self.source(rng, local.is_ipv6());
                return Frame::new(
                    &router.to_string(),
                    &local.to_string(),
                    Transport::IcmpError(Box::new(quoted)),
                );
            }
            return if rng.chance(30) { frame } else { frame.syn_ack() };
        }
        let mut frame = Frame::new(&src.to_string(), &dst.to_string(), transport).sport(rng.port());
        match rng.below(4) {
            0 => frame = frame.established(),
            1 => frame = frame.syn_ack(),
            _ => {}
        }
        if rng.chance(20) {
            // Mostly one or two tags; now and then a stack up to past the parser's walk.
            let tags =
                if rng.chance(70) { 1 + rng.below(2) } else { rng.below(MAX_VLAN_TAGS as u64 + 3) };
            frame = frame.vlans(&vec![0; tags as usize]);
        }
        if rng.chance(10) {
            frame = frame.l3();
        }
        if v6 && rng.chance(3) {
            // An IPv4-mapped source.
            frame.src = IpAddr::V4(Ipv4Addr::new(198, 51, 100, rng.below(256) as u8));
        }
        if !v6 && rng.chance(15) {
            frame = frame.ip_options(4 * (1 + rng.below(10) as usize));
        }
        if !v6 && rng.chance(8) {
            frame = frame.later_fragment();
        } else if !v6 && rng.chance(8) {
            frame = frame.first_fragment();
        }
        if v6 && rng.chance(20) {
            let choices = [Ext::HopByHop, Ext::Routing, Ext::DestOpts, Ext::Fragment { offset: 0 }];
            let mut exts: Vec<Ext> = (0..=rng.below(3)).map(|_| *rng.pick(&choices)).collect();
            if rng.chance(25) {
                exts.push(Ext::Fragment { offset: 1 + rng.below(100) as u16 });
            }
            if rng.chance(15) {
                // From two below the filter's walk to two past it.
                exts = vec![Ext::HopByHop; MAX_V6_EXTENSIONS - 2 + rng.below(5) as usize];
            }
            frame = frame.v6_extensions(&exts);
        }
        if frame.frag_offset == 0 && rng.chance(8) {
            let whole = frame.bytes().len() as u64;
            let start = if rng.chance(50) { whole.saturating_sub(24) } else { 0 };
            // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
            frame = frame.truncate((start + rng.below(whole - start)).max(14) as usize);
        }
        frame
    }
}

/// The flow (as the egress program records it) that `frame` would be a reply to, if it has
/// ports.
fn reply_flow(frame: &Frame) -> Option<FlowKey> {
    if frame.src.is_ipv4() != frame.dst.is_ipv4() {
        return None;
    }
    let (proto, remote_port, local_port) = match frame.transport {
        Transport::Tcp(p) => (6, frame.sport, p),
        Transport::Udp(p) => (17, frame.sport, p),
        Transport::Sctp(p) => (132, frame.sport, p),
        // An echo request the local end sent with this identifier.
        Transport::Echo { id, .. } => (if frame.dst.is_ipv6() { 58 } else { 1 }, 0, id),
        // A security association between two addresses, remembered like a UDP flow.
        Transport::Esp => (50, 0, 0),
        Transport::Icmp | Transport::IcmpError(_) => return None,
    };
    Some(FlowKey {
        remote: Addr::from(frame.src),
        local: Addr::from(frame.dst),
        remote_port,
        local_port,
        proto,
        _pad: [0; 3],
    })
}

/// Sometimes a swarm node (some of `sources` its peers) and an API on tcp: the engine's doors.
fn random_doors(
    rng: &mut Rng,
    host: &[IpAddr],
    sources: &mut Vec<IpAddr>,
    ports: &mut Vec<u16>,
) -> EngineDoors {
    let mut doors = EngineDoors::default();
    if rng.chance(60) {
        let data_path_port = if rng.chance(80) { 4789 } else { rng.port() };
        let control_port = rng.chance(50).then_some(2377);
        let mut nodes: std::collections::BTreeSet<IpAddr> = [*rng.pick(host)].into();
        for _ in 0..rng.below(3) {
            let peer = inside(rng, "198.51.100.0".parse().unwrap(), 24);
            sources.push(peer);
            nodes.insert(peer);
        }
        ports.extend([data_path_port, 7946, 2377]);
        doors.swarm =
            Some(Swarm { data_path_port, control_port, nodes, encrypted: rng.chance(40) });
    }
    if rng.chance(30) {
        let bound = *rng.pick(&["0.0.0.0", "::", "127.0.0.1"].map(|a| a.parse().unwrap()));
        let bound = if rng.chance(30) { *rng.pick(host) } else { bound };
        let port = *rng.pick(&[2375, 2376]);
        ports.push(port);
        doors
            .api
            .push(ApiListener { addr: std::net::SocketAddr::new(bound, port), plain_text: true });
    }
    doors
}
