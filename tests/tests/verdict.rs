//! Verdict tier: the real XDP program, loaded by this kernel, run with BPF_PROG_TEST_RUN on
//! crafted frames. Every case checks three things: the verdict the kernel returned, the
//! reason it counted (its per-CPU counter moved by exactly one), and that both equal the
//! reference decision computed in user space from the same tables.
//!
//! Needs root (CAP_BPF) and bpffs; run through `cargo xtask test`.

#[path = "verdict/admission.rs"]
mod admission;
#[path = "verdict/drop_counters.rs"]
mod drop_counters;
#[path = "verdict/random.rs"]
mod random;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use guard_common::{
    addr::Addr,
    decision::{decide, decide_parsed},
    events::{DROP_AT_GATE, DROP_AUDITED, DROP_PUBLISHED, DropKey},
    maps::{FLOW_TIMEOUT_NS, FlowKey, IFACE_DOCKER, IFACE_INSIDE, IFACE_UPLINK},
    parse::{Framing, MAX_V6_EXTENSIONS, MAX_VLAN_TAGS, parse},
    reason::{Decision, Reason, Verdict},
};
use guard_userspace::host::clock::monotonic_ns;
use guard_userspace::kernel::frames::{Ext, Frame, Transport::*};
use guard_userspace::kernel::pins::Hook;
use guard_userspace::{
    kernel::loader,
    kernel::maps::PolicyMaps,
    kernel::pins::Pins,
    kernel::unload::unload,
    policy::Proto,
    policy::file::{self as policy_file, Mode, PolicyFile},
    policy::snapshot::Snapshot,
    state::desired::Desired,
    state::reconcile::{Inputs, Reconciler},
    state::tables::{WithFlows, diff},
    testing::{
        API, DB, GATEWAY, HOST, OUTSIDE_A, OUTSIDE_B, PARTNER, VPN_ONLY, WEB, WEB6, container,
        publish, seed_snapshot,
    },
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const HOST6: &str = "2001:db8:18::1";
/// The broadcast address of HOST's subnet, a host address as interfaces::host_addresses lists it.
const HOST_BROADCAST: &str = "198.18.0.255";
const OUTSIDE6: &str = "2001:db8:1::2";

/// The program loaded with its maps pinned in a directory of its own, filled with the seed
/// scenario's desired state; everything is unloaded on drop, even when a case fails.
struct Loaded {
    ebpf: Ebpf,
    maps: PolicyMaps,
    /// The target ids and desired state, as the agent keeps them.
    reconciler: Reconciler,
    /// What the desired state is computed from: the last install's world and the
    /// interfaces' roles the test gave.
    world_in: (Snapshot, Vec<IpAddr>, PolicyFile),
    interfaces: BTreeMap<u32, u32>,
    desired: Desired,
    /// The flows put into flow memory (and still fresh), for the reference.
    flows: BTreeSet<FlowKey>,
    /// The random world installed by the differential test.
    world: Option<random::World>,
    pins: Pins,
}

impl Loaded {
    /// The program loaded into a fresh pin directory, with empty maps.
    fn empty() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the verdict tier needs root: run `cargo xtask test`"
        );
        isolate_network();
        // Tests run on parallel threads of one process: each loads into a directory of its own.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pins = Pins::new(format!("/sys/fs/bpf/guard-verdict-{}-{n}", std::process::id()));
        let mut ebpf = loader::load(&pins).expect("the kernel loads the programs");
        let maps = PolicyMaps::from_ebpf(&mut ebpf).expect("maps are in the object");
        Loaded {
            ebpf,
            maps,
            reconciler: Reconciler::default(),
            world_in: Default::default(),
            interfaces: BTreeMap::new(),
            desired: Desired::default(),
            flows: BTreeSet::new(),
            world: None,
            pins,
        }
    }

    /// The seed scenario's desired state, in the maps.
    fn seed() -> Self {
        let mut loaded = Self::empty();
        let host: Vec<IpAddr> =
            [HOST, HOST_BROADCAST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
        loaded.install(&seed_snapshot(), &host, &PolicyFile::default());
        loaded
    }

    /// Makes the maps hold the desired state of `snapshot`, the way the agent does (no
    /// interface named until the test names them).
    fn install(&mut self, snapshot: &Snapshot, host: &[IpAddr], policy: &PolicyFile) {
        self.world_in = (snapshot.clone(), host.to_vec(), policy.clone());
        self.interfaces.clear();
        self.sync();
        assert_eq!(
            self.maps.read().unwrap(),
            self.desired.tables,
            "the maps hold the desired state"
        );
    }

    /// Makes the maps hold the desired state of the installed world and the interfaces'
    /// roles as they are now.
    fn sync(&mut self) {
        let (snapshot, host, policy) = &self.world_in;
        self.desired = self.reconciler.desired_state(&Inputs {
            interfaces: &self.interfaces,
            ..Inputs::new(snapshot, host, policy)
        });
        let plan = diff(&self.maps.read().expect("read maps"), &self.desired.tables);
        let failures = self.maps.apply(&plan);
        assert!(failures.is_empty(), "map updates failed: {failures:?}");
    }

    /// Puts a flow into flow memory as the TC egress program would have, `age_ns` ago.
    fn remember(&mut self, flow: FlowKey, age_ns: u64) {
        let now = monotonic_ns();
        self.maps.remember_flow(&flow, now - age_ns).expect("insert flow");
        if flow.alive(now - age_ns, now) {
            self.flows.insert(flow);
        }
    }

    fn counter(&self, reason: Reason) -> u64 {
        let counters = self.maps.counters().expect("read counters");
        counters
            .into_iter()
            .find(|(d, _)| *d == Decision::enforced(reason))
            .map(|(_, n)| n)
            .unwrap()
    }

    /// Runs `bytes` through the XDP program for `framing` (the Ethernet one, or the one for
    /// links whose frames start with the IP header); returns the XDP action.
    fn run(&mut self, bytes: &[u8], framing: Framing) -> u32 {
        let program: &mut Xdp = match framing {
            Framing::Ethernet => loader::xdp_program(&mut self.ebpf).unwrap(),
            Framing::Ip => {
                let program: &mut Xdp =
                    self.ebpf.program_mut("guard_xdp_ip").unwrap().try_into().unwrap();
                if program.fd().is_err() {
                    program.load().expect("the kernel loads guard_xdp_ip");
                }
                program
            }
        };
        program
            .test_run(TestRunOptions { data_in: Some(bytes), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN")
            .return_value
    }

    /// What the frame's recipe says the parser and the decision must make of it, over the
    /// tables the maps hold: the reference, independent of the shared parser.
    fn reference(&self, frame: &Frame) -> Decision {
        let model = WithFlows { tables: &self.desired.tables, flows: &self.flows };
        match frame.parse_failure() {
            Some(reason) => decide_parsed(&model, Err(reason)).0,
            None => decide(&model, &frame.packet()),
        }
    }

    /// Runs the frame through the kernel; checks the verdict, the counted reason, the
    /// reference decision and the shared parser's reading of the bytes.
    fn check(&mut self, name: &str, frame: &Frame, expected: Reason) {
        let bytes = frame.bytes();
        let before = self.counter(expected);
        let action = self.run(&bytes, frame.framing);
        let want = match expected.verdict() {
            Verdict::Pass => XDP_PASS,
            Verdict::Drop => XDP_DROP,
        };
        assert_eq!(action, want, "{name}: kernel verdict (expected {expected:?})");
        assert_eq!(self.counter(expected) - before, 1, "{name}: counted as {expected:?}");
        assert_eq!(self.reference(frame), Decision::enforced(expected), "{name}: reference");
        let model = WithFlows { tables: &self.desired.tables, flows: &self.flows };
        let shared = decide_parsed(&model, parse(&bytes.as_slice(), frame.framing)).0;
        assert_eq!(shared, Decision::enforced(expected), "{name}: shared parser");
    }
}

/// Runs this test's thread in a network namespace of its own (it goes with the thread), whose
/// FIB forwards every unicast destination through a veth (default routes, forwarding on) and
/// keeps nothing local but loopback: the program's FIB lookups then see the host the reference
/// sees, whatever this machine's own routes and addresses are.
fn isolate_network() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a network namespace for this test thread");
    for args in [
        "link set lo up",
        "link add gv0 type veth peer name gv1",
        "link set gv0 up",
        "link set gv1 up",
        "addr add 100.64.0.1/30 dev gv0",
        "route add default via 100.64.0.2",
        "-6 addr add fd99::1/64 dev gv0 nodad",
        "-6 route add default via fd99::2",
    ] {
        ip(args);
    }
    for sysctl in ["ipv4/conf/all/forwarding", "ipv6/conf/all/forwarding"] {
        std::fs::write(format!("/proc/sys/net/{sysctl}"), "1")
            .unwrap_or_else(|e| panic!("net.{sysctl} = 1: {e}"));
    }
}

/// `ip ARGS` in this thread's network namespace.
fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .unwrap_or_else(|e| panic!("ip {args}: {e} (apt-get install -y iproute2)"));
    assert!(status.success(), "ip {args}: {status}");
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Err(e) = unload(&self.pins) {
            eprintln!("cleanup: unloading {}: {e}", self.pins.root().display());
        }
    }
}

#[test]
fn seed_scenario_direct_and_published_v4() {
    let mut g = Loaded::seed();
    use Reason::*;
    let cases = [
        ("exposed, direct", Frame::new(OUTSIDE_A, WEB, Tcp(443)), Exposed),
        ("exposed, published", Frame::new(OUTSIDE_B, HOST, Tcp(10443)), Exposed),
        ("exposed, published on the gateway", Frame::new(OUTSIDE_B, GATEWAY, Tcp(10443)), Exposed),
        ("exposed udp, published", Frame::new(OUTSIDE_B, HOST, Udp(10053)), Exposed),
        ("exposed sctp, direct", Frame::new(OUTSIDE_B, WEB, Sctp(9)), Exposed),
        ("unlabelled published db, direct", Frame::new(OUTSIDE_A, DB, Tcp(5432)), Closed),
        ("unlabelled published db, published", Frame::new(OUTSIDE_A, HOST, Tcp(5432)), Closed),
        ("published db via gateway", Frame::new(OUTSIDE_A, GATEWAY, Tcp(5432)), Closed),
        ("unpublished api", Frame::new(OUTSIDE_A, API, Tcp(8080)), Closed),
        ("web's other port, direct", Frame::new(OUTSIDE_A, WEB, Tcp(8443)), Closed),
        ("web's other port, published", Frame::new(OUTSIDE_A, HOST, Tcp(18443)), Closed),
        ("exposed port number but udp", Frame::new(OUTSIDE_A, WEB, Udp(443)), Closed),
        ("allowed source, direct", Frame::new(OUTSIDE_A, PARTNER, Tcp(9000)), AllowedSource),
        ("allowed source, published", Frame::new(OUTSIDE_A, HOST, Tcp(19000)), AllowedSource),
        ("other source, direct", Frame::new(OUTSIDE_B, PARTNER, Tcp(9000)), Closed),
        ("other source, published", Frame::new(OUTSIDE_B, HOST, Tcp(19000)), Closed),
        ("address nobody holds", Frame::new(OUTSIDE_A, "172.30.0.200", Tcp(80)), UnassignedAddr),
        ("host's own service", Frame::new(OUTSIDE_A, HOST, Tcp(22)), NotContainerBound),
        ("host service on the gateway", Frame::new(OUTSIDE_A, GATEWAY, Tcp(22)), NotContainerBound),
        (
            "routed through the host",
            Frame::new(OUTSIDE_A, "192.0.2.80", Tcp(5432)),
            NotContainerBound,
        ),
        ("loopback from an uplink", Frame::new(OUTSIDE_A, "127.0.0.1", Tcp(5432)), LoopbackDst),
        ("forged container source", Frame::new(DB, API, Tcp(8080)), SpoofedSource),
        (
            "forged container source, to the forger itself",
            Frame::new(DB, OUTSIDE_A, Udp(40000)).sport(5353),
            SpoofedSource,
        ),
        ("forged gateway source", Frame::new(GATEWAY, API, Tcp(8080)), Closed),
        // Only a container's own address is forged by definition; a neighbour numbered inside
        // a Docker subnet (a NIC bridged into it) still reaches the host.
        (
            "source in a Docker subnet where no container is",
            Frame::new("172.30.0.200", HOST, Tcp(22)),
            NotContainerBound,
        ),
        ("forged loopback source", Frame::new("127.0.0.1", DB, Tcp(5432)), Closed),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn seed_scenario_v6() {
    let mut g = Loaded::seed();
    use Reason::*;
    let cases = [
        ("exposed, direct v6", Frame::new(OUTSIDE6, WEB6, Tcp(443)), Exposed),
        ("closed, direct v6", Frame::new(OUTSIDE6, WEB6, Tcp(8443)), Closed),
        ("exposed, published v6", Frame::new(OUTSIDE6, HOST6, Tcp(10443)), Exposed),
        ("db published v6", Frame::new(OUTSIDE6, HOST6, Tcp(5432)), Closed),
        ("v6 address nobody holds", Frame::new(OUTSIDE6, "fd00:30::99", Tcp(80)), UnassignedAddr),
        ("v6 host service", Frame::new(OUTSIDE6, HOST6, Tcp(22)), NotContainerBound),
        ("v6 routed through", Frame::new(OUTSIDE6, "2001:db8:99::1", Tcp(443)), NotContainerBound),
        ("v6 loopback from an uplink", Frame::new(OUTSIDE6, "::1", Tcp(5432)), LoopbackDst),
        ("icmpv6 echo to a container", Frame::new(OUTSIDE6, WEB6, Icmp), Closed),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn port_less_traffic_and_fragments_follow_the_all_ports_rule() {
    let mut g = Loaded::seed();
    use Reason::*;
    let cases = [
        ("icmp to an exposed container", Frame::new(OUTSIDE_A, WEB, Icmp), Closed),
        ("icmp to a host address", Frame::new(OUTSIDE_A, HOST, Icmp), NotContainerBound),
        ("icmp from the allowed network", Frame::new(OUTSIDE_A, VPN_ONLY, Icmp), AllowedSource),
        ("icmp from elsewhere", Frame::new(OUTSIDE_B, VPN_ONLY, Icmp), Closed),
        (
            "any port from the allowed network",
            Frame::new(OUTSIDE_A, VPN_ONLY, Udp(5353)),
            AllowedSource,
        ),
        (
            "later fragment to a closed container",
            Frame::new(OUTSIDE_A, DB, Tcp(5432)).later_fragment(),
            LaterFragment,
        ),
        (
            "later fragment to an unassigned address",
            Frame::new(OUTSIDE_A, "172.30.0.200", Udp(53)).later_fragment(),
            LaterFragment,
        ),
        (
            "later fragment to the host",
            Frame::new(OUTSIDE_A, HOST, Tcp(22)).later_fragment(),
            LaterFragment,
        ),
        (
            "later fragment to loopback is still loopback",
            Frame::new(OUTSIDE_A, "127.0.0.1", Tcp(22)).later_fragment(),
            LoopbackDst,
        ),
        ("v6 all-ports source", Frame::new(OUTSIDE6, "fd00:30::4", Icmp), Closed),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn framing_vlan_options_and_malformed() {
    let mut g = Loaded::seed();
    use Reason::*;
    let arp = {
        let mut f = Frame::new(OUTSIDE_A, DB, Tcp(5432)).bytes();
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        f
    };
    let cases = [
        ("802.1Q, closed", Frame::new(OUTSIDE_A, DB, Tcp(5432)).vlans(&[10]), Closed),
        ("802.1Q, exposed", Frame::new(OUTSIDE_A, WEB, Tcp(443)).vlans(&[10]), Exposed),
        ("QinQ, closed", Frame::new(OUTSIDE_A, HOST, Tcp(5432)).vlans(&[100, 10]), Closed),
        ("QinQ v6, closed", Frame::new(OUTSIDE6, WEB6, Tcp(8443)).vlans(&[100, 10]), Closed),
        ("IPv4 options, closed", Frame::new(OUTSIDE_A, DB, Tcp(5432)).ip_options(12), Closed),
        ("IPv4 options, exposed", Frame::new(OUTSIDE_A, WEB, Tcp(443)).ip_options(40), Exposed),
        (
            "TCP cut to its ports, exposed",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)).truncate(14 + 20 + 4),
            Exposed,
        ),
        (
            "TCP cut to its ports, closed",
            Frame::new(OUTSIDE_A, DB, Tcp(5432)).truncate(14 + 20 + 10),
            Closed,
        ),
        (
            "TCP cut before its flags is no reply",
            Frame::new(OUTSIDE_A, HOST, Tcp(5432)).sport(9999).established().truncate(14 + 20 + 12),
            Closed,
        ),
        (
            "TCP cut inside its ports, container",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)).truncate(14 + 20 + 3),
            Unreadable,
        ),
        (
            "UDP cut inside its ports, published",
            Frame::new(OUTSIDE_A, HOST, Udp(10053)).truncate(14 + 20 + 2),
            Unreadable,
        ),
        (
            "TCP cut inside its ports, host service",
            Frame::new(OUTSIDE_A, HOST, Tcp(22)).truncate(14 + 20 + 1),
            Unreadable,
        ),
        (
            "TCP cut short, host",
            Frame::new(OUTSIDE_A, HOST, Tcp(22)).truncate(14 + 20 + 10),
            NotContainerBound,
        ),
        (
            "IPv4 header cut short",
            Frame::new(OUTSIDE_A, DB, Tcp(5432)).truncate(14 + 12),
            MalformedIp,
        ),
        (
            "IPv6 header cut short",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).truncate(14 + 30),
            MalformedIp,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
    // A frame that is not IP passes untouched and is counted as such.
    let before = g.counter(NotIp);
    let program = loader::xdp_program(&mut g.ebpf).unwrap();
    let result =
        program.test_run(TestRunOptions { data_in: Some(&arp), ..Default::default() }).unwrap();
    assert_eq!(result.return_value, XDP_PASS, "ARP passes");
    assert_eq!(g.counter(NotIp) - before, 1, "ARP counted as not_ip");
}

#[test]
fn bad_ihl_is_malformed_not_read_past() {
    let mut g = Loaded::seed();
    let mut frame = Frame::new(OUTSIDE_A, DB, Tcp(5432)).bytes();
    frame[14] = 0x43; // IHL 3: shorter than the fixed header
    let before = g.counter(Reason::MalformedIp);
    let program = loader::xdp_program(&mut g.ebpf).unwrap();
    let result =
        program.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() }).unwrap();
    assert_eq!(result.return_value, XDP_PASS);
    assert_eq!(g.counter(Reason::MalformedIp) - before, 1);
}

fn flow(remote: &str, remote_port: u16, local: &str, local_port: u16, proto: u8) -> FlowKey {
    let addr = |s: &str| Addr::from(s.parse::<IpAddr>().unwrap());
    FlowKey {
        remote: addr(remote),
        local: addr(local),
        remote_port,
        local_port,
        proto,
        _pad: [0; 3],
    }
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut g = Loaded::seed();
    use Reason::*;
    let hop = Ext::HopByHop;
    let cases = [
        (
            "hop-by-hop, exposed",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).v6_extensions(&[hop]),
            Exposed,
        ),
        ("hop-by-hop, closed", Frame::new(OUTSIDE6, WEB6, Tcp(8443)).v6_extensions(&[hop]), Closed),
        (
            "routing + destination options, exposed",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).v6_extensions(&[Ext::Routing, Ext::DestOpts]),
            Exposed,
        ),
        (
            "first fragment carries the ports",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).v6_extensions(&[Ext::Fragment { offset: 0 }]),
            Exposed,
        ),
        (
            "later fragment to a closed port",
            Frame::new(OUTSIDE6, WEB6, Tcp(8443)).v6_extensions(&[Ext::Fragment { offset: 100 }]),
            LaterFragment,
        ),
        (
            "as many extension headers as walked, closed",
            Frame::new(OUTSIDE6, WEB6, Tcp(8443)).v6_extensions(&[hop; MAX_V6_EXTENSIONS]),
            Closed,
        ),
        (
            "as many extension headers as walked, exposed",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).v6_extensions(&[hop; MAX_V6_EXTENSIONS]),
            Exposed,
        ),
        (
            "one more than walked, to docker-proxy's port",
            Frame::new(OUTSIDE6, HOST6, Tcp(5432)).v6_extensions(&[hop; MAX_V6_EXTENSIONS + 1]),
            Unreadable,
        ),
        (
            "one more than walked, to an exposed port",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).v6_extensions(&[hop; MAX_V6_EXTENSIONS + 1]),
            Unreadable,
        ),
        (
            "extension header cut short",
            Frame::new(OUTSIDE6, WEB6, Tcp(443))
                .v6_extensions(&[Ext::Routing])
                .truncate(14 + 40 + 2),
            Unreadable,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn replies_to_flows_started_inside_are_never_dropped() {
    let mut g = Loaded::seed();
    use Reason::*;
    // A masqueraded connection that got the host port Docker publishes for db (5432).
    g.remember(flow(OUTSIDE_A, 9999, HOST, 5432, 6), 0);
    // A container on a network without NAT asked an outside DNS server.
    g.remember(flow(OUTSIDE_A, 53, DB, 40001, 17), 0);
    // A UDP flow whose last packet left long ago.
    g.remember(flow(OUTSIDE_A, 123, DB, 40002, 17), FLOW_TIMEOUT_NS + 1_000_000_000);
    let cases = [
        (
            "SYN-ACK on the colliding published port",
            Frame::new(OUTSIDE_A, HOST, Tcp(5432)).sport(9999).syn_ack(),
            Reply,
        ),
        ("ACK on it", Frame::new(OUTSIDE_A, HOST, Tcp(5432)).sport(9999).established(), Reply),
        (
            "a new connection from the same remote port is not a reply",
            Frame::new(OUTSIDE_A, HOST, Tcp(5432)).sport(9999),
            Closed,
        ),
        (
            "another remote port",
            Frame::new(OUTSIDE_A, HOST, Tcp(5432)).sport(9998).established(),
            Closed,
        ),
        (
            "another remote host",
            Frame::new(OUTSIDE_B, HOST, Tcp(5432)).sport(9999).established(),
            Closed,
        ),
        ("UDP reply to a container", Frame::new(OUTSIDE_A, DB, Udp(40001)).sport(53), Reply),
        ("UDP reply, expired", Frame::new(OUTSIDE_A, DB, Udp(40002)).sport(123), Closed),
        (
            "UDP reply, wrong protocol",
            Frame::new(OUTSIDE_A, DB, Tcp(40001)).sport(53).established(),
            Closed,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

/// The loaded program against the reference decision on random worlds and random frames:
/// every path, both families, both framings, VLAN stacks, IPv4 options and fragments, IPv6
/// extension headers, ICMP echoes and errors, truncation, flow memory, and frames with bits
/// flipped at random (held to the shared parser). The kernel's reason (read from its counters) must equal the
/// reference's for every case. GUARD_DIFF_SEED replays a run; GUARD_DIFF_CASES scales it.
#[test]
fn differential_kernel_equals_reference() {
    let seed =
        std::env::var("GUARD_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                as u64
        });
    let cases: usize =
        std::env::var("GUARD_DIFF_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    eprintln!("differential: seed {seed}, {cases} cases (replay: GUARD_DIFF_SEED={seed})");
    let mut rng = random::Rng::new(seed);
    let mut g = Loaded::empty();
    const PER_WORLD: usize = 250;
    let mut differences = Vec::new();
    let mut seen = std::collections::BTreeMap::<Reason, usize>::new();
    let mut audited = 0;
    let mut before = g.maps.counters().unwrap();
    for case in 0..cases {
        if case % PER_WORLD == 0 {
            let world = random::World::random(&mut rng, case / PER_WORLD);
            g.install(&world.snapshot, &world.host, &world.policy);
            for flow in &world.flows {
                g.remember(*flow, 0);
            }
            before = g.maps.counters().unwrap();
            g.world = Some(world);
        }
        let frame = g.world.as_ref().unwrap().frame(&mut rng);
        let mut bytes = frame.bytes();
        // Now and then a few bits flipped anywhere: no recipe predicts those bytes, so the
        // kernel is held to the shared parser's reading of them.
        let mutated = rng.chance(10);
        if mutated {
            for _ in 0..=rng.below(3) {
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        let expected = if mutated {
            let model = WithFlows { tables: &g.desired.tables, flows: &g.flows };
            decide_parsed(&model, parse(&bytes.as_slice(), frame.framing)).0
        } else {
            g.reference(&frame)
        };
        let action = g.run(&bytes, frame.framing);
        let after = g.maps.counters().unwrap();
        let moved: Vec<Decision> = after
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((d, _), _)| *d)
            .collect();
        before = after;
        let want = if expected.verdict() == Verdict::Pass { XDP_PASS } else { XDP_DROP };
        if moved != [expected] || action != want {
            differences.push(format!(
                "case {case}: kernel counted {moved:?} returned {action}, reference {expected:?}\n  frame {frame:?}\n  bytes {}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ));
        }
        *seen.entry(expected.reason).or_default() += 1;
        audited += usize::from(expected.audited);
    }
    eprintln!("differential: reasons covered {seen:?}, {audited} waived by audit mode");
    assert!(
        differences.is_empty(),
        "{} of {cases} cases differ (seed {seed}); first ones:\n{}",
        differences.len(),
        differences.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    // A generator that stopped reaching a path would make this test vacuous there. XDP on an
    // uplink never sees a packet as behind a bridge: the gate and the answers test cover
    // UnseenNetwork. A rate limit is a count over time, not a rule the reference decides: the
    // rate-limit test covers RateLimited.
    let uplink_reasons = Reason::ALL
        .iter()
        .filter(|r| !matches!(r, Reason::NotIp | Reason::UnseenNetwork | Reason::RateLimited));
    for reason in uplink_reasons {
        assert!(
            seen.get(reason).copied().unwrap_or(0) > 0,
            "no case reached {reason:?} (seed {seed})"
        );
    }
}

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
/// The interface index the tests give the uplink (any index works: the map names it).
const UPLINK: u32 = 7;
/// A Docker bridge's interface index: not an uplink.
const BRIDGE: u32 = 9;
/// The bridge of a network the agent has not seen: not named in the maps.
const UNSEEN_BRIDGE: u32 = 10;
/// An uplink that came back under a new index while the agent was away: not named either.
const NEW_UPLINK: u32 = 11;

impl Loaded {
    /// Names the interfaces as the agent does: UPLINK is an uplink, BRIDGE the bridge of a
    /// Docker network it knows (UNSEEN_BRIDGE and NEW_UPLINK it has not named).
    fn with_uplink(mut self) -> Self {
        self.interfaces.insert(UPLINK, IFACE_UPLINK);
        self.interfaces.insert(BRIDGE, IFACE_DOCKER);
        self.sync();
        self
    }

    /// Runs a TC program on `bytes` as if the kernel had received the packet on
    /// `ingress_ifindex` (0: sent by the host itself), on the interface its hook is on (the
    /// known BRIDGE for the bridge hooks, UPLINK for egress); returns the TC action.
    fn run_tc(&mut self, hook: Hook, bytes: &[u8], ingress_ifindex: u32) -> u32 {
        let on = if matches!(hook, Hook::TcEgress) { UPLINK } else { BRIDGE };
        self.run_tc_on(hook, bytes, ingress_ifindex, on)
    }

    /// [`Loaded::run_tc`] with the program on interface `on` (BRIDGE, UNSEEN_BRIDGE or
    /// UPLINK). The kernel runs a test on a real device, so the program runs on lo, which
    /// is given `on`'s role for the run.
    fn run_tc_on(&mut self, hook: Hook, bytes: &[u8], ingress_ifindex: u32, on: u32) -> u32 {
        const LO: u32 = 1;
        match self.interfaces.get(&on).copied() {
            Some(role) => self.interfaces.insert(LO, role),
            None => self.interfaces.remove(&LO),
        };
        self.sync();
        // struct __sk_buff: ingress_ifindex at 36, ifindex at 40, the rest zero.
        let mut skb = [0u8; 192];
        skb[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        skb[40..44].copy_from_slice(&LO.to_ne_bytes());
        let program = loader::tc_program(&mut self.ebpf, hook).unwrap();
        program
            .test_run(TestRunOptions {
                data_in: Some(bytes),
                ctx_in: Some(&skb),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN of a TC program")
            .return_value
    }

    /// [`Loaded::run_tc`], and the gate counters (decisions) the run moved.
    fn run_tc_counted(&mut self, hook: Hook, bytes: &[u8], ingress: u32) -> (u32, Vec<Decision>) {
        let before = self.maps.gate_counters().expect("read gate counters");
        let action = self.run_tc(hook, bytes, ingress);
        let after = self.maps.gate_counters().expect("read gate counters");
        let moved =
            after.iter().zip(&before).filter(|((_, a), (_, b))| a != b).map(|((d, _), _)| *d);
        (action, moved.collect())
    }

    /// Switches the whole host's audit mode, as `guard run --mode` does.
    fn audit_all(&mut self, on: bool) {
        self.world_in.2.mode = if on { Mode::Audit } else { Mode::Enforce };
        self.sync();
    }

    fn gate_counter(&self, reason: Reason) -> u64 {
        let counters = self.maps.gate_counters().expect("read gate counters");
        counters.into_iter().find(|(d, _)| *d == Decision::enforced(reason)).unwrap().1
    }

    fn remembered(&self) -> BTreeSet<FlowKey> {
        self.maps.flows().expect("read flow memory").into_iter().map(|(k, _)| k).collect()
    }
}

#[test]
fn stacked_vlan_tags_are_walked_and_past_the_walk_dropped() {
    let mut g = Loaded::seed();
    use Reason::*;
    let tags = |n: usize| vec![0u16; n];
    let cases = [
        // docker-proxy listens on [::] for every published port: the attack.
        (
            "3 priority tags, v6 published",
            Frame::new(OUTSIDE6, HOST6, Tcp(5432)).vlans(&tags(3)),
            Closed,
        ),
        (
            "3 priority tags, v4 published",
            Frame::new(OUTSIDE_A, HOST, Tcp(5432)).vlans(&tags(3)),
            Closed,
        ),
        ("3 priority tags, direct", Frame::new(OUTSIDE_A, DB, Tcp(5432)).vlans(&tags(3)), Closed),
        ("3 priority tags, exposed", Frame::new(OUTSIDE_A, WEB, Tcp(443)).vlans(&tags(3)), Exposed),
        (
            "as many tags as walked",
            Frame::new(OUTSIDE_A, DB, Tcp(5432)).vlans(&tags(MAX_VLAN_TAGS)),
            Closed,
        ),
        (
            "one tag more than walked, to a container",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)).vlans(&tags(MAX_VLAN_TAGS + 1)),
            Unreadable,
        ),
        (
            "twelve tags, to the host's own service",
            Frame::new(OUTSIDE_A, HOST, Tcp(22)).vlans(&tags(12)),
            Unreadable,
        ),
        (
            "tagged host traffic passes",
            Frame::new(OUTSIDE_A, HOST, Tcp(22)).vlans(&[100, 0, 0]),
            NotContainerBound,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn broadcast_and_multicast_are_judged_by_the_wildcard_publish() {
    let mut g = Loaded::seed();
    use Reason::*;
    let cases = [
        (
            "limited broadcast, closed port",
            Frame::new(OUTSIDE_A, "255.255.255.255", Udp(15353)),
            Closed,
        ),
        (
            "subnet broadcast, closed port",
            Frame::new(OUTSIDE_A, HOST_BROADCAST, Udp(15353)),
            Closed,
        ),
        (
            "all-hosts multicast, closed port",
            Frame::new(OUTSIDE_A, "224.0.0.1", Udp(15353)),
            Closed,
        ),
        (
            "v6 all-nodes multicast, closed port",
            Frame::new(OUTSIDE6, "ff02::1", Udp(15353)),
            Closed,
        ),
        ("broadcast, exposed port", Frame::new(OUTSIDE_A, "255.255.255.255", Udp(10053)), Exposed),
        // web publishes 10053 on 0.0.0.0 only: nothing listens on [::]:10053.
        (
            "v6 multicast, v4-only publish",
            Frame::new(OUTSIDE6, "ff02::1", Udp(10053)),
            NotContainerBound,
        ),
        ("v6 unicast, v4-only publish", Frame::new(OUTSIDE6, HOST6, Udp(10053)), NotContainerBound),
        // 15354 is bound to HOST alone.
        (
            "broadcast, port bound to one address",
            Frame::new(OUTSIDE_A, "255.255.255.255", Udp(15354)),
            NotContainerBound,
        ),
        ("unicast, port bound to one address", Frame::new(OUTSIDE_A, HOST, Udp(15354)), Closed),
        (
            "multicast, unpublished port",
            Frame::new(OUTSIDE_A, "224.0.0.251", Udp(5353)),
            NotContainerBound,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn icmp_echo_and_errors_are_judged_as_the_replies_they_are() {
    let mut g = Loaded::seed();
    use Reason::*;
    const ROUTER: &str = "198.18.9.9";
    const ROUTER6: &str = "2001:db8:9::9";
    // db pinged OUTSIDE_A (identifier 77) and asked OUTSIDE_A's DNS server from port 40001,
    // both from a network without NAT; a masqueraded flow got db's published host port.
    g.remember(flow(OUTSIDE_A, 0, DB, 77, 1), 0);
    g.remember(flow(OUTSIDE_A, 53, DB, 40001, 17), 0);
    g.remember(flow(OUTSIDE_A, 9999, HOST, 5432, 6), 0);
    g.remember(flow(OUTSIDE6, 53, WEB6, 40001, 17), 0);
    let echo = |reply, id| Echo { reply, id };
    let error =
        |router: &str, to: &str, quoted: Frame| Frame::new(router, to, IcmpError(Box::new(quoted)));
    let cases = [
        ("echo reply to db's ping", Frame::new(OUTSIDE_A, DB, echo(true, 77)), Reply),
        ("echo reply, other identifier", Frame::new(OUTSIDE_A, DB, echo(true, 78)), Closed),
        ("echo reply from another host", Frame::new(OUTSIDE_B, DB, echo(true, 77)), Closed),
        ("echo request to db", Frame::new(OUTSIDE_A, DB, echo(false, 77)), Closed),
        (
            "echo request, all-ports source",
            Frame::new(OUTSIDE_A, VPN_ONLY, echo(false, 1)),
            AllowedSource,
        ),
        (
            "fragmentation needed for db's DNS query",
            error(ROUTER, DB, Frame::new(DB, OUTSIDE_A, Udp(53)).sport(40001)),
            Reply,
        ),
        (
            "fragmentation needed for a flow db never started",
            error(ROUTER, DB, Frame::new(DB, OUTSIDE_B, Udp(53)).sport(40001)),
            Closed,
        ),
        (
            "an error quoting another address's flow is plain ICMP",
            error(ROUTER, DB, Frame::new(API, OUTSIDE_A, Udp(53)).sport(40001)),
            Closed,
        ),
        (
            "unreachable for db's ping",
            error(ROUTER, DB, Frame::new(DB, OUTSIDE_A, echo(false, 77))),
            Reply,
        ),
        (
            "fragmentation needed on the masqueraded flow",
            error(ROUTER, HOST, Frame::new(HOST, OUTSIDE_A, Tcp(9999)).sport(5432).established()),
            Reply,
        ),
        (
            "packet too big for web's answer from an exposed port",
            error(ROUTER6, WEB6, Frame::new(WEB6, OUTSIDE6, Tcp(50000)).sport(443).syn_ack()),
            Exposed,
        ),
        (
            "packet too big for web's fragmented DNS query",
            error(
                ROUTER6,
                WEB6,
                Frame::new(WEB6, OUTSIDE6, Udp(53))
                    .sport(40001)
                    .v6_extensions(&[Ext::Fragment { offset: 0 }]),
            ),
            Reply,
        ),
        (
            "packet too big quoting a later fragment is plain ICMP",
            error(
                ROUTER6,
                WEB6,
                Frame::new(WEB6, OUTSIDE6, Udp(53))
                    .sport(40001)
                    .v6_extensions(&[Ext::Fragment { offset: 9 }]),
            ),
            Closed,
        ),
        (
            "packet too big for a closed port's flow nobody started",
            error(ROUTER6, WEB6, Frame::new(WEB6, OUTSIDE6, Tcp(50000)).sport(8443)),
            Closed,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn tiny_first_fragments_and_mapped_sources() {
    let mut g = Loaded::seed();
    // An established connection: its segments are replies, a first fragment without flags
    // is not.
    g.remember(flow(OUTSIDE_A, 41000, DB, 5432, 6), 0);
    use Reason::*;
    let tcp_at = 14 + 20;
    let cases = [
        (
            "first fragment with only the ports, closed",
            Frame::new(OUTSIDE_A, HOST, Tcp(5432)).first_fragment().truncate(tcp_at + 8),
            Closed,
        ),
        (
            "first fragment with only the ports, exposed",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)).first_fragment().truncate(tcp_at + 8),
            Exposed,
        ),
        (
            "first fragment too short for the ports, published",
            Frame::new(OUTSIDE_A, HOST, Tcp(5432)).first_fragment().truncate(tcp_at + 3),
            Unreadable,
        ),
        (
            "a first fragment's flags are not read from the link padding",
            Frame::new(OUTSIDE_A, DB, Tcp(5432))
                .sport(41000)
                .established()
                .first_fragment()
                .transport_cut(8)
                .padding(&[0x10; 26]),
            Closed,
        ),
        (
            "IPv4-mapped source to a v6 published port",
            Frame::new(OUTSIDE_A, HOST6, Tcp(5432)),
            MappedSource,
        ),
        (
            "IPv4-mapped source of an allowed network, all ports",
            Frame::new(OUTSIDE_A, "fd00:30::6", Tcp(22)),
            MappedSource,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

#[test]
fn l3_links_are_read_from_the_ip_header() {
    let mut g = Loaded::seed();
    use Reason::*;
    let cases = [
        ("l3, closed", Frame::new(OUTSIDE_A, DB, Tcp(5432)).l3(), Closed),
        ("l3, published", Frame::new(OUTSIDE_A, HOST, Tcp(5432)).l3(), Closed),
        ("l3, exposed", Frame::new(OUTSIDE_A, WEB, Tcp(443)).l3(), Exposed),
        ("l3 v6, published", Frame::new(OUTSIDE6, HOST6, Tcp(5432)).l3(), Closed),
        ("l3, host service", Frame::new(OUTSIDE_A, HOST, Tcp(22)).l3(), NotContainerBound),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
    // The same bytes through the Ethernet program are "not IP": why L3 links need their own.
    let bytes = Frame::new(OUTSIDE_A, DB, Tcp(5432)).l3().bytes();
    let before = g.counter(NotIp);
    assert_eq!(g.run(&bytes, Framing::Ethernet), XDP_PASS);
    assert_eq!(g.counter(NotIp) - before, 1, "an IP packet read as Ethernet is not IP");
}

#[test]
fn replies_reach_containers_the_agent_has_not_learnt_of() {
    let mut g = Loaded::seed();
    use Reason::*;
    const NEWCOMER: &str = "172.30.0.200";
    g.remember(flow(OUTSIDE_A, 53, NEWCOMER, 40000, 17), 0);
    g.check("reply", &Frame::new(OUTSIDE_A, NEWCOMER, Udp(40000)).sport(53), Reply);
    g.check("not a reply", &Frame::new(OUTSIDE_A, NEWCOMER, Udp(40001)).sport(53), UnassignedAddr);
    g.check(
        "SYN is never a reply",
        &Frame::new(OUTSIDE_A, NEWCOMER, Tcp(40000)).sport(53),
        UnassignedAddr,
    );
}

#[test]
fn openings_hold_by_hand_written_expectations() {
    // Expectations written by hand, not by the shared decision: these are the mutations the
    // rest of the suite let live.
    let mut g = Loaded::empty();
    let mut web = container(3, "web", &[WEB, WEB6], &[("guard.expose", "443/tcp")]);
    web.published = vec![publish("0.0.0.0", 10443, 443, Proto::Tcp)];
    let any6 = container(
        6,
        "any6",
        &["172.30.0.7", "fd00:30::7"],
        &[("guard.allow.v6", "8080 from ::/0")],
    );
    let snapshot = Snapshot {
        networks: seed_snapshot().networks,
        containers: vec![web, any6],
        doors: Default::default(),
    };
    // A later source list on an exposed port must not narrow it.
    let policy = policy_file::parse(
        "[[rule]]\nmatch = { container = \"web\" }\nallow = [{ ports = \"443\", from = [\"198.18.1.0/24\"] }]\n",
        "test.toml",
    )
    .unwrap();
    let host: Vec<IpAddr> = [HOST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
    g.install(&snapshot, &host, &policy);
    let cases: [(&str, Frame, u32); 8] = [
        ("exposed stays open to others", Frame::new(OUTSIDE_B, WEB, Tcp(443)), XDP_PASS),
        ("exposed, published", Frame::new(OUTSIDE_B, HOST, Tcp(10443)), XDP_PASS),
        ("0.0.0.0 publish binds no v6 address", Frame::new(OUTSIDE6, HOST6, Tcp(10443)), XDP_PASS),
        ("::/0 opens to v6", Frame::new(OUTSIDE6, "fd00:30::7", Tcp(8080)), XDP_PASS),
        ("::/0 does not open to v4", Frame::new(OUTSIDE_A, "172.30.0.7", Tcp(8080)), XDP_DROP),
        ("unassigned v4 in the subnet", Frame::new(OUTSIDE_A, "172.30.0.99", Tcp(1)), XDP_DROP),
        ("unassigned v6 in the subnet", Frame::new(OUTSIDE6, "fd00:30::99", Tcp(1)), XDP_DROP),
        ("just outside the subnet", Frame::new(OUTSIDE_A, "172.30.1.1", Tcp(1)), XDP_PASS),
    ];
    for (name, frame, want) in &cases {
        assert_eq!(g.run(&frame.bytes(), Framing::Ethernet), *want, "{name}");
    }
}

#[test]
fn the_gate_judges_what_arrived_on_an_uplink_and_nothing_else() {
    let mut g = Loaded::seed().with_uplink();
    g.remember(flow(OUTSIDE_A, 0, DB, 77, 1), 0);
    g.remember(flow(OUTSIDE_A, 53, DB, 40001, 17), 0);
    let error = IcmpError(Box::new(Frame::new(DB, OUTSIDE_A, Udp(53)).sport(40001)));
    // (name, frame, ingress interface, action, reason counted at the gate)
    let cases = [
        (
            "closed, from an uplink",
            Frame::new(OUTSIDE_A, DB, Tcp(5432)),
            UPLINK,
            TC_ACT_SHOT,
            Some(Reason::Closed),
        ),
        (
            "exposed, from an uplink",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)),
            UPLINK,
            TC_ACT_UNSPEC,
            Some(Reason::Exposed),
        ),
        (
            "unknown container, from an uplink",
            Frame::new(OUTSIDE_A, "172.30.0.200", Tcp(80)),
            UPLINK,
            TC_ACT_SHOT,
            Some(Reason::UnassignedAddr),
        ),
        (
            "echo reply, from an uplink",
            Frame::new(OUTSIDE_A, DB, Echo { reply: true, id: 77 }),
            UPLINK,
            TC_ACT_UNSPEC,
            Some(Reason::Reply),
        ),
        (
            "frag needed, from an uplink",
            Frame::new("198.18.9.9", DB, error),
            UPLINK,
            TC_ACT_UNSPEC,
            Some(Reason::Reply),
        ),
        (
            "later fragment, from an uplink",
            Frame::new(OUTSIDE_A, DB, Udp(40001)).later_fragment(),
            UPLINK,
            TC_ACT_UNSPEC,
            Some(Reason::LaterFragment),
        ),
        ("closed, from the host", Frame::new(HOST, DB, Tcp(5432)), 0, TC_ACT_UNSPEC, None),
        (
            "closed, from an uplink back under a new index",
            Frame::new(OUTSIDE_A, DB, Tcp(5432)),
            NEW_UPLINK,
            TC_ACT_SHOT,
            Some(Reason::Closed),
        ),
        (
            "exposed, from an uplink back under a new index",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)),
            NEW_UPLINK,
            TC_ACT_UNSPEC,
            Some(Reason::Exposed),
        ),
        (
            "routed through a container (a subnet router), from an uplink",
            Frame::new(OUTSIDE_A, "192.168.77.5", Tcp(22)),
            UPLINK,
            TC_ACT_UNSPEC,
            Some(Reason::NotContainerBound),
        ),
        (
            "closed, from another bridge",
            Frame::new(API, DB, Tcp(5432)),
            BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
    ];
    for (name, frame, ingress, action, counted) in cases {
        let (acted, moved) = g.run_tc_counted(Hook::BridgeGate, &frame.bytes(), ingress);
        assert_eq!(acted, action, "{name}: action");
        let counted: Vec<Decision> = counted.into_iter().map(Decision::enforced).collect();
        assert_eq!(moved, counted, "{name}: gate counters");
    }
}

/// An interface the agent names as inside (trusted, or left out by `--iface`).
const INSIDE: u32 = 5;
/// An address in a network the agent has not seen (created while it was away).
const UNSEEN: &str = "10.99.0.5";

#[test]
fn a_network_the_agent_has_not_seen_is_closed_at_the_gate_replies_excepted() {
    let mut g = Loaded::seed().with_uplink();
    // The unseen container's own connection out, through its bridge: remembered, because its
    // reply will be judged behind the bridge.
    let out = Frame::new(UNSEEN, OUTSIDE_A, Tcp(443)).sport(40100);
    let on = UNSEEN_BRIDGE;
    assert_eq!(g.run_tc_on(Hook::BridgeIngress, &out.bytes(), on, on), TC_ACT_UNSPEC);
    assert!(g.remembered().contains(&flow(OUTSIDE_A, 443, UNSEEN, 40100, 6)), "not remembered");
    let cases = [
        ("a new connection", Frame::new(OUTSIDE_A, UNSEEN, Tcp(80)), TC_ACT_SHOT, UnseenNetwork),
        ("udp", Frame::new(OUTSIDE_A, UNSEEN, Udp(53)).sport(5353), TC_ACT_SHOT, UnseenNetwork),
        (
            "the reply to its connection out",
            Frame::new(OUTSIDE_A, UNSEEN, Tcp(40100)).sport(443).established(),
            TC_ACT_UNSPEC,
            Reply,
        ),
        (
            "a forged reply from another host",
            Frame::new(OUTSIDE_B, UNSEEN, Tcp(40100)).sport(443).established(),
            TC_ACT_SHOT,
            UnseenNetwork,
        ),
    ];
    use Reason::*;
    for (name, frame, action, reason) in cases {
        let before = g.gate_counter(reason);
        let action_now = g.run_tc_on(Hook::BridgeGate, &frame.bytes(), UPLINK, on);
        assert_eq!(action_now, action, "{name}: action");
        assert_eq!(g.gate_counter(reason), before + 1, "{name}: counted as {reason:?}");
    }
}

#[test]
fn a_container_accepts_a_connection_from_outside_only_where_the_policy_opened_it() {
    let mut g = Loaded::seed().with_uplink();
    g.interfaces.insert(INSIDE, IFACE_INSIDE);
    g.sync();
    use Reason::*;
    // (name, SYN-ACK or other packet leaving an uplink, where it arrived, action, counted)
    let cases = [
        (
            "an unseen container's answer on a port Docker publishes",
            Frame::new(HOST, OUTSIDE_A, Tcp(50000)).sport(12345).syn_ack(),
            UNSEEN_BRIDGE,
            TC_ACT_SHOT,
            Some(UnseenNetwork),
        ),
        (
            "an unseen container's answer to direct routing",
            Frame::new(UNSEEN, OUTSIDE_A, Tcp(50000)).sport(80).syn_ack(),
            UNSEEN_BRIDGE,
            TC_ACT_SHOT,
            Some(UnseenNetwork),
        ),
        (
            "the same answer with ECE and PSH set too",
            Frame {
                tcp_flags: 0x12 | 0x40 | 0x08,
                ..Frame::new(UNSEEN, OUTSIDE_A, Tcp(50000)).sport(80)
            },
            UNSEEN_BRIDGE,
            TC_ACT_SHOT,
            Some(UnseenNetwork),
        ),
        (
            "an unseen container's answer over IPv6",
            Frame::new("fd99::5", OUTSIDE6, Tcp(50000)).sport(80).syn_ack(),
            UNSEEN_BRIDGE,
            TC_ACT_SHOT,
            Some(UnseenNetwork),
        ),
        (
            "a closed container's answer",
            Frame::new(DB, OUTSIDE_A, Tcp(50000)).sport(5432).syn_ack(),
            UNSEEN_BRIDGE,
            TC_ACT_SHOT,
            Some(Closed),
        ),
        (
            "the closed container's answer through its published port",
            Frame::new(HOST, OUTSIDE_A, Tcp(50000)).sport(5432).syn_ack(),
            UNSEEN_BRIDGE,
            TC_ACT_SHOT,
            Some(Closed),
        ),
        (
            "an exposed container's answer through its published port",
            Frame::new(HOST, OUTSIDE_B, Tcp(50000)).sport(10443).syn_ack(),
            UNSEEN_BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "an exposed container's answer to direct routing",
            Frame::new(WEB, OUTSIDE_B, Tcp(50000)).sport(443).syn_ack(),
            UNSEEN_BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "an answer from a known network's bridge, port not published",
            Frame::new(HOST, OUTSIDE_A, Tcp(50000)).sport(12345).syn_ack(),
            BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
        // The SYN slipped in before the gate was on the bridge (Podman creates a network's
        // bridge with its first container): the answer is judged where the port is known.
        (
            "a known network's closed container answering through its published port",
            Frame::new(HOST, OUTSIDE_A, Tcp(50000)).sport(5432).syn_ack(),
            BRIDGE,
            TC_ACT_SHOT,
            Some(Closed),
        ),
        (
            "a known network's closed container answering direct routing",
            Frame::new(DB, OUTSIDE_A, Tcp(50000)).sport(5432).syn_ack(),
            BRIDGE,
            TC_ACT_SHOT,
            Some(Closed),
        ),
        (
            "a known network's exposed container answering",
            Frame::new(HOST, OUTSIDE_B, Tcp(50000)).sport(10443).syn_ack(),
            BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "an answer from behind a container routing a subnet of its own (a VPN)",
            Frame::new("192.168.77.9", OUTSIDE_A, Tcp(50000)).sport(22).syn_ack(),
            BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "the host's own answer",
            Frame::new(HOST, OUTSIDE_A, Tcp(50000)).sport(12345).syn_ack(),
            0,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "an answer from behind an inside interface",
            Frame::new("192.168.50.9", OUTSIDE_A, Tcp(50000)).sport(80).syn_ack(),
            INSIDE,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "an answer forwarded from another uplink",
            Frame::new("192.168.50.9", OUTSIDE_A, Tcp(50000)).sport(80).syn_ack(),
            UPLINK,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "an unseen container's connection out",
            Frame::new(UNSEEN, OUTSIDE_A, Tcp(443)).sport(40200),
            UNSEEN_BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
        (
            "an unseen container's data on an established connection",
            Frame::new(UNSEEN, OUTSIDE_A, Tcp(443)).sport(40200).established(),
            UNSEEN_BRIDGE,
            TC_ACT_UNSPEC,
            None,
        ),
    ];
    for (name, frame, ingress, action, counted) in cases {
        let (acted, moved) = g.run_tc_counted(Hook::TcEgress, &frame.bytes(), ingress);
        assert_eq!(acted, action, "{name}: action");
        let counted: Vec<Decision> = counted.into_iter().map(Decision::enforced).collect();
        assert_eq!(moved, counted, "{name}: counted");
    }
}

#[test]
fn in_audit_mode_an_unseen_container_s_answer_passes_and_is_counted() {
    let mut g = Loaded::seed().with_uplink();
    g.audit_all(true);
    let answer = Frame::new(UNSEEN, OUTSIDE_A, Tcp(50000)).sport(80).syn_ack();
    let (action, moved) = g.run_tc_counted(Hook::TcEgress, &answer.bytes(), UNSEEN_BRIDGE);
    assert_eq!(action, TC_ACT_UNSPEC, "audit mode drops nothing");
    assert_eq!(moved, [Decision { reason: Reason::UnseenNetwork, audited: true }]);
    // A known network's closed answer: its SYN was counted on the uplink, not twice.
    let known = Frame::new(HOST, OUTSIDE_A, Tcp(50000)).sport(5432).syn_ack();
    let (action, moved) = g.run_tc_counted(Hook::TcEgress, &known.bytes(), BRIDGE);
    assert_eq!((action, moved), (TC_ACT_UNSPEC, vec![]));
}

#[test]
fn recorders_remember_only_flows_started_inside_whose_replies_would_drop() {
    let mut g = Loaded::seed().with_uplink();
    // (name, hook, frame, ingress interface, remembered as)
    let cases = [
        (
            "masqueraded flow on db's published port, from the host",
            Hook::TcEgress,
            Frame::new(HOST, OUTSIDE_A, Tcp(9999)).sport(5432).established(),
            0,
            Some(flow(OUTSIDE_A, 9999, HOST, 5432, 6)),
        ),
        (
            "a container's flow without NAT, through a bridge",
            Hook::TcEgress,
            Frame::new(DB, OUTSIDE_A, Udp(53)).sport(40001),
            BRIDGE,
            Some(flow(OUTSIDE_A, 53, DB, 40001, 17)),
        ),
        (
            "the same packet forwarded from another uplink",
            Hook::TcEgress,
            Frame::new(DB, OUTSIDE_B, Udp(53)).sport(40002),
            UPLINK,
            None,
        ),
        (
            "web answering on its exposed published port",
            Hook::TcEgress,
            Frame::new(HOST, OUTSIDE_B, Tcp(50000)).sport(10443).syn_ack(),
            0,
            None,
        ),
        (
            "the host's own ssh",
            Hook::TcEgress,
            Frame::new(HOST, OUTSIDE_B, Tcp(50000)).sport(22),
            0,
            None,
        ),
        (
            "a container's ping",
            Hook::BridgeIngress,
            Frame::new(DB, OUTSIDE_A, Echo { reply: false, id: 91 }),
            BRIDGE,
            Some(flow(OUTSIDE_A, 0, DB, 91, 1)),
        ),
        (
            "a container's echo reply",
            Hook::BridgeIngress,
            Frame::new(DB, OUTSIDE_A, Echo { reply: true, id: 92 }),
            BRIDGE,
            None,
        ),
        (
            "an exposed container's SYN-ACK",
            Hook::BridgeIngress,
            Frame::new(WEB, OUTSIDE_B, Tcp(50001)).sport(443).syn_ack(),
            BRIDGE,
            None,
        ),
        (
            "a closed container's SYN-ACK (its SYN slipped in before the gate was there)",
            Hook::BridgeIngress,
            Frame::new(DB, OUTSIDE_A, Tcp(50002)).sport(5432).syn_ack(),
            BRIDGE,
            None,
        ),
        (
            "a closed container's SYN-ACK through its published port, from the host",
            Hook::TcEgress,
            Frame::new(HOST, OUTSIDE_A, Tcp(50003)).sport(12345).syn_ack(),
            0,
            None,
        ),
        (
            "a container's port-unreachable about a probe",
            Hook::BridgeIngress,
            Frame::new(
                DB,
                OUTSIDE_A,
                IcmpError(Box::new(Frame::new(OUTSIDE_A, DB, Udp(5353)).sport(40000))),
            ),
            BRIDGE,
            None,
        ),
        (
            "a closed container's connection out",
            Hook::BridgeIngress,
            Frame::new(DB, OUTSIDE_B, Tcp(443)).sport(40003),
            BRIDGE,
            Some(flow(OUTSIDE_B, 443, DB, 40003, 6)),
        ),
    ];
    for (name, hook, frame, ingress, expected) in cases {
        let before = g.remembered();
        assert_eq!(g.run_tc(hook, &frame.bytes(), ingress), TC_ACT_UNSPEC, "{name}: never drops");
        let added: Vec<FlowKey> = g.remembered().difference(&before).copied().collect();
        assert_eq!(added, expected.into_iter().collect::<Vec<_>>(), "{name}: remembered");
    }
}

/// A denied source reaches no container port, whatever opens it: an exposed port (by address
/// and published), a port allowed to it, trust (a closed port is closed, as for anyone). Its replies to what was started
/// inside still pass, the engine's doors are not container ports, a source next to it is not
/// denied, and an IPv6 prefix around the IPv4-mapped range denies no IPv4 source.
#[test]
fn denied_sources_reach_no_container_port_and_their_replies_pass() {
    let mut g = Loaded::empty();
    let policy = policy_file::parse(
        "trusted_sources = [\"198.18.3.0/24\"]\ndeny = [\"198.18.1.2\", \"198.18.3.0/28\", \"2001:db8:1::/64\", \"::/1\"]\n",
        "test.toml",
    )
    .unwrap();
    let host: Vec<IpAddr> = [HOST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
    g.install(&seed_snapshot(), &host, &policy);
    g.remember(flow(OUTSIDE_A, 53, DB, 40001, 17), 0);
    use Reason::*;
    let cases = [
        ("exposed port, direct", Frame::new(OUTSIDE_A, WEB, Tcp(443)), Denied),
        ("exposed port, published", Frame::new(OUTSIDE_A, HOST, Tcp(10443)), Denied),
        ("the port allowed to it", Frame::new(OUTSIDE_A, PARTNER, Tcp(9000)), Denied),
        ("the port allowed to it, published", Frame::new(OUTSIDE_A, HOST, Tcp(19000)), Denied),
        ("trust lets in no denied source", Frame::new("198.18.3.7", API, Tcp(8080)), Closed),
        ("a trusted source not denied", Frame::new("198.18.3.77", API, Tcp(8080)), TrustedSource),
        (
            "its reply to a flow started inside",
            Frame::new(OUTSIDE_A, DB, Udp(40001)).sport(53),
            Reply,
        ),
        ("its ping, which `*` allowed it", Frame::new(OUTSIDE_A, VPN_ONLY, Icmp), Denied),
        ("a port nothing opens stays closed", Frame::new(OUTSIDE_A, API, Tcp(8080)), Closed),
        ("the host's own service", Frame::new(OUTSIDE_A, HOST, Tcp(22)), NotContainerBound),
        ("the neighbour of a denied address", Frame::new("198.18.1.3", WEB, Tcp(443)), Exposed),
        ("a denied IPv6 prefix", Frame::new(OUTSIDE6, WEB6, Tcp(443)), Denied),
        ("::/1 does not deny IPv4", Frame::new(OUTSIDE_B, WEB, Tcp(443)), Exposed),
        // Its later fragment passes: the kernel delivers nothing without the first, which
        // carries the ports and is denied above.
        ("its later fragment", Frame::new(OUTSIDE_A, WEB, Udp(53)).later_fragment(), LaterFragment),
        // Its "port unreachable" about a flow started inside is that flow's reply (path-MTU
        // discovery and errors must reach the container); about nothing remembered, denied.
        (
            "its ICMP error about a flow started inside",
            Frame::new(
                OUTSIDE_A,
                DB,
                IcmpError(Box::new(Frame::new(DB, OUTSIDE_A, Udp(53)).sport(40001))),
            ),
            Reply,
        ),
        (
            "its ICMP error about an exposed port's flow nobody started",
            Frame::new(
                OUTSIDE_A,
                WEB,
                IcmpError(Box::new(Frame::new(WEB, OUTSIDE_A, Udp(5000)).sport(53))),
            ),
            Denied,
        ),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

/// A flow a container starts to a denied source is remembered (its replies would be denied,
/// and replies are never dropped).
#[test]
fn flows_to_denied_sources_are_remembered() {
    let mut g = Loaded::empty();
    let policy = policy_file::parse("deny = [\"198.18.1.2\"]\n", "test.toml").unwrap();
    let host: Vec<IpAddr> = [HOST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
    g.install(&seed_snapshot(), &host, &policy);
    let mut g = g.with_uplink();
    let before = g.remembered();
    let out = Frame::new(DB, OUTSIDE_A, Tcp(443)).sport(40005);
    g.run_tc(Hook::BridgeIngress, &out.bytes(), BRIDGE);
    let added: Vec<FlowKey> = g.remembered().difference(&before).copied().collect();
    assert_eq!(added, [flow(OUTSIDE_A, 443, DB, 40005, 6)], "a flow to a denied source");
}

#[test]
fn answers_to_trusted_or_audited_sources_are_not_remembered() {
    // A source the policy file trusts, or a container in audit mode, is let in: its answers
    // need no memory, and remembering them would let spoofed SYNs churn flow memory.
    let mut g = Loaded::empty();
    let policy = policy_file::parse(
        "trusted_sources = [\"198.18.3.0/24\"]\n[[rule]]\nmatch = { container = \"api\" }\nmode = \"audit\"\n",
        "test.toml",
    )
    .unwrap();
    let host: Vec<IpAddr> = [HOST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
    g.install(&seed_snapshot(), &host, &policy);
    let mut g = g.with_uplink();
    let cases = [
        (
            "db answering a trusted source",
            Frame::new(DB, "198.18.3.7", Tcp(50000)).sport(5432).syn_ack(),
            None,
        ),
        (
            "the audited api answering anyone",
            Frame::new(API, OUTSIDE_B, Tcp(50000)).sport(8080).syn_ack(),
            None,
        ),
        (
            "db's own connection out",
            Frame::new(DB, OUTSIDE_B, Tcp(443)).sport(40004),
            Some(flow(OUTSIDE_B, 443, DB, 40004, 6)),
        ),
    ];
    for (name, frame, expected) in cases {
        let before = g.remembered();
        g.run_tc(Hook::BridgeIngress, &frame.bytes(), BRIDGE);
        let added: Vec<FlowKey> = g.remembered().difference(&before).copied().collect();
        assert_eq!(added, expected.into_iter().collect::<Vec<_>>(), "{name}: remembered");
    }
}

#[test]
fn local_routes_the_agent_never_listed_reach_the_wildcard_publish() {
    // The kernel keeps for itself whatever its FIB calls local, listed by the agent or not:
    // an AnyIP route here. docker-proxy's wildcard socket (and Docker's DNAT for local
    // addresses) receives those packets, so they are judged by the port's rule. Written by
    // hand: the reference knows only the addresses the agent listed.
    let mut g = Loaded::seed();
    ip("route add local 198.18.200.0/24 dev lo");
    ip("-6 route add local 2001:db8:200::/64 dev lo");
    let cases = [
        (
            "AnyIP v4, db's published port",
            Frame::new(OUTSIDE_A, "198.18.200.7", Tcp(5432)),
            Reason::Closed,
        ),
        (
            "AnyIP v6, db's published port",
            Frame::new(OUTSIDE6, "2001:db8:200::7", Tcp(5432)),
            Reason::Closed,
        ),
        (
            "AnyIP v4, web's exposed port",
            Frame::new(OUTSIDE_A, "198.18.200.7", Tcp(10443)),
            Reason::Exposed,
        ),
        (
            "AnyIP v4, an unpublished port",
            Frame::new(OUTSIDE_A, "198.18.200.7", Tcp(22)),
            Reason::NotContainerBound,
        ),
        (
            "routed on, a published port number",
            Frame::new(OUTSIDE_A, "192.0.2.80", Tcp(5432)),
            Reason::NotContainerBound,
        ),
    ];
    for (name, frame, expected) in &cases {
        let before = g.counter(*expected);
        let want = if expected.verdict() == Verdict::Pass { XDP_PASS } else { XDP_DROP };
        assert_eq!(g.run(&frame.bytes(), Framing::Ethernet), want, "{name}: kernel verdict");
        assert_eq!(g.counter(*expected) - before, 1, "{name}: counted as {expected:?}");
    }
}

/// The engine's doors (README, "What it protects"), judged by the kernel: a swarm
/// node's VXLAN, gossip and control ports and its API on tcp, open to the swarm's nodes and
/// the policy file's `[management]` prefixes, and every other host service untouched.
#[test]
fn the_engine_s_doors_open_to_the_swarm_s_nodes_and_the_operator_s_prefixes_only() {
    use guard_userspace::policy::snapshot::{ApiListener, EngineDoors, Swarm};
    let mut g = Loaded::seed();
    let peer = "198.18.0.2";
    let joining = "198.18.7.3";
    let admin = "198.18.9.9";
    let mut snapshot = seed_snapshot();
    snapshot.doors = EngineDoors {
        swarm: Some(Swarm {
            data_path_port: 4789,
            control_port: Some(2377),
            nodes: [HOST, peer, HOST6].map(|a| a.parse().unwrap()).into(),
            encrypted: true,
        }),
        api: vec![ApiListener { addr: "0.0.0.0:2375".parse().unwrap(), plain_text: true }],
    };
    let policy = policy_file::parse(
        &format!("[management]\ncluster = [\"198.18.7.0/24\"]\nadmin = [\"{admin}\"]\n"),
        "test",
    )
    .unwrap();
    let host: Vec<IpAddr> =
        [HOST, HOST_BROADCAST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
    g.install(&snapshot, &host, &policy);
    use Reason::*;
    let vxlan = |src: &str, dst: &str| Frame::new(src, dst, Udp(4789)).sport(51000);
    let cases = [
        ("vxlan from outside", vxlan(OUTSIDE_A, HOST), ManagementPort),
        ("vxlan from outside, to broadcast", vxlan(OUTSIDE_A, "255.255.255.255"), ManagementPort),
        ("vxlan from outside, v6", vxlan(OUTSIDE6, HOST6), ManagementPort),
        ("vxlan from a node", vxlan(peer, HOST), AllowedSource),
        ("vxlan from a cluster prefix", vxlan(joining, HOST), AllowedSource),
        ("vxlan from an admin", vxlan(admin, HOST), ManagementPort),
        ("gossip tcp from outside", Frame::new(OUTSIDE_A, HOST, Tcp(7946)), ManagementPort),
        ("gossip udp from outside", Frame::new(OUTSIDE_A, HOST, Udp(7946)), ManagementPort),
        ("gossip udp from a node", Frame::new(peer, HOST, Udp(7946)), AllowedSource),
        ("control from outside", Frame::new(OUTSIDE_B, HOST, Tcp(2377)), ManagementPort),
        ("control from an admin", Frame::new(admin, HOST, Tcp(2377)), AllowedSource),
        ("api from outside", Frame::new(OUTSIDE_A, HOST, Tcp(2375)), ManagementPort),
        ("api from a node", Frame::new(peer, HOST, Tcp(2375)), ManagementPort),
        ("api from an admin", Frame::new(admin, HOST, Tcp(2375)), AllowedSource),
        ("esp from outside", Frame::new(OUTSIDE_A, HOST, Esp), ManagementPort),
        ("esp from a node", Frame::new(peer, HOST, Esp), AllowedSource),
        ("esp routed through", Frame::new(OUTSIDE_A, "192.0.2.80", Esp), NotContainerBound),
        ("esp to a container", Frame::new(OUTSIDE_A, DB, Esp), Closed),
        ("ssh stays the host's", Frame::new(OUTSIDE_A, HOST, Tcp(22)), NotContainerBound),
        ("vxlan's number over tcp", Frame::new(OUTSIDE_A, HOST, Tcp(4789)), NotContainerBound),
        ("routed through to vxlan", vxlan(OUTSIDE_A, "192.0.2.80"), NotContainerBound),
        // The containers keep their rules.
        ("exposed container, published", Frame::new(OUTSIDE_B, HOST, Tcp(10443)), Exposed),
        ("closed container, published", Frame::new(OUTSIDE_A, HOST, Tcp(5432)), Closed),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
    assert!(g.counter(ManagementPort) > 0, "drops at the doors have their own counter");
}

/// A container open on every UDP port (`*/udp`) and, to one network, on every TCP port.
const DNS: &str = "172.30.0.20";
const DNS6: &str = "fd00:30::20";

fn every_port_snapshot() -> Snapshot {
    let mut snapshot = seed_snapshot();
    let mut dns = container(
        6,
        "dns",
        &[DNS, DNS6],
        &[("guard.expose", "*/udp"), ("guard.allow.lan", "*/tcp from 198.18.1.0/24")],
    );
    dns.published = vec![
        publish("0.0.0.0", 20053, 53, Proto::Udp),
        publish("0.0.0.0", 20080, 80, Proto::Tcp),
        publish("0.0.0.0", 20868, 3868, Proto::Sctp),
    ];
    snapshot.containers.push(dns);
    snapshot
}

#[test]
fn every_port_of_one_protocol_opens_that_protocol_and_nothing_else() {
    let mut g = Loaded::empty();
    let host: Vec<IpAddr> = [HOST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
    g.install(&every_port_snapshot(), &host, &PolicyFile::default());
    let target = g.desired.containers.iter().find(|c| c.container.name == "dns").unwrap().target;
    let ports: Vec<_> = g.desired.tables.ports.keys().filter(|k| k.target == target).collect();
    assert_eq!(ports.len(), 2, "one PORTS entry per protocol: {ports:?}");
    // The container's own TCP connection out: its replies pass, whatever the rules.
    g.remember(flow(OUTSIDE_B, 443, DNS, 41000, 6), 0);
    use Reason::*;
    let udp_at = 14 + 20;
    let cases = [
        ("udp, a low port", Frame::new(OUTSIDE_B, DNS, Udp(53)), Exposed),
        ("udp, a high port", Frame::new(OUTSIDE_B, DNS, Udp(65535)), Exposed),
        ("udp, v6", Frame::new(OUTSIDE6, DNS6, Udp(4500)), Exposed),
        ("udp, tagged", Frame::new(OUTSIDE_B, DNS, Udp(123)).vlans(&[10]), Exposed),
        ("udp, published", Frame::new(OUTSIDE_B, HOST, Udp(20053)), Exposed),
        ("udp, first fragment", Frame::new(OUTSIDE_B, DNS, Udp(53)).first_fragment(), Exposed),
        (
            "udp, first fragment without its ports",
            Frame::new(OUTSIDE_B, DNS, Udp(53)).first_fragment().truncate(udp_at + 3),
            Unreadable,
        ),
        (
            "udp, later fragment",
            Frame::new(OUTSIDE_B, DNS, Udp(53)).later_fragment(),
            LaterFragment,
        ),
        ("tcp, same port number", Frame::new(OUTSIDE_B, DNS, Tcp(53)), Closed),
        ("tcp, v6", Frame::new(OUTSIDE6, DNS6, Tcp(53)), Closed),
        ("tcp, published", Frame::new(OUTSIDE_B, HOST, Tcp(20080)), Closed),
        ("tcp, from the listed network", Frame::new(OUTSIDE_A, DNS, Tcp(22)), AllowedSource),
        (
            "tcp, published, from the listed network",
            Frame::new(OUTSIDE_A, HOST, Tcp(20080)),
            AllowedSource,
        ),
        ("sctp", Frame::new(OUTSIDE_B, DNS, Sctp(53)), Closed),
        ("sctp, published", Frame::new(OUTSIDE_A, HOST, Sctp(20868)), Closed),
        ("icmp echo", Frame::new(OUTSIDE_B, DNS, Icmp), Closed),
        ("icmp echo, from the listed network", Frame::new(OUTSIDE_A, DNS, Icmp), Closed),
        ("icmpv6 echo", Frame::new(OUTSIDE6, DNS6, Icmp), Closed),
        (
            "a reply to the container's own tcp connection",
            Frame::new(OUTSIDE_B, DNS, Tcp(41000)).sport(443).established(),
            Reply,
        ),
        // Its neighbours are untouched.
        ("db's closed udp port", Frame::new(OUTSIDE_B, HOST, Udp(15353)), Closed),
        ("web's exposed udp port", Frame::new(OUTSIDE_B, HOST, Udp(10053)), Exposed),
    ];
    for (name, frame, expected) in &cases {
        g.check(name, frame, *expected);
    }
}

/// Per-container-port drop counters and drop events, as the agent reads them.
fn recorded(g: &Loaded) -> (BTreeSet<(DropKey, u64)>, u64) {
    let drops = g.maps.drops().expect("read drop counters").into_iter().collect();
    let events = g
        .maps
        .event_stats(guard_common::events::STREAM_DROPS)
        .expect("read event stats")
        .iter()
        .sum();
    (drops, events)
}

/// What moved between two [`recorded`] readings: the counters that grew (without their path
/// at the gate: the tests' ingress indexes name no real interface, so the gate's FIB lookup
/// fails and a published port's number reads as the wildcard publish, as it must for a
/// destination it cannot prove is forwarded; which path is not the point here), and events.
fn recorded_since(
    before: &(BTreeSet<(DropKey, u64)>, u64),
    after: &(BTreeSet<(DropKey, u64)>, u64),
) -> (Vec<DropKey>, u64) {
    let grown = after.0.difference(&before.0).map(|(key, _)| {
        let path = if key.flags & DROP_AT_GATE != 0 { DROP_PUBLISHED } else { 0 };
        DropKey { flags: key.flags & !path, ..*key }
    });
    (grown.collect(), after.1 - before.1)
}

#[test]
fn in_audit_mode_a_probe_xdp_counted_is_not_counted_again_at_the_gate() {
    let mut g = Loaded::seed().with_uplink();
    g.audit_all(true);
    let db = g.desired.containers.iter().find(|c| c.container.name == "db").unwrap().target;
    let audited_closed = Decision { reason: Reason::Closed, audited: true };
    let at = |flags| DropKey { target: db, port: 5432, proto: 6, flags };

    // Routed to the container: XDP and the gate see the same packet.
    let probe = Frame::new(OUTSIDE_A, DB, Tcp(5432));
    let before = recorded(&g);
    assert_eq!(g.run(&probe.bytes(), Framing::Ethernet), XDP_PASS, "audit mode drops nothing");
    let after_xdp = recorded(&g);
    assert_eq!(recorded_since(&before, &after_xdp), (vec![at(DROP_AUDITED)], 1));
    let (action, moved) = g.run_tc_counted(Hook::BridgeGate, &probe.bytes(), UPLINK);
    assert_eq!((action, moved), (TC_ACT_UNSPEC, vec![audited_closed]), "the gate still judges");
    assert_eq!(recorded_since(&after_xdp, &recorded(&g)), (vec![], 0), "counted once, at XDP");

    // Through a published port: XDP sees the host's address, the gate the container's.
    let before = recorded(&g);
    assert_eq!(g.run(&Frame::new(OUTSIDE_A, HOST, Tcp(5432)).bytes(), Framing::Ethernet), XDP_PASS);
    let after_xdp = recorded(&g);
    let published = at(DROP_AUDITED | DROP_PUBLISHED);
    assert_eq!(recorded_since(&before, &after_xdp), (vec![published], 1));
    let (action, _) = g.run_tc_counted(Hook::BridgeGate, &probe.bytes(), UPLINK);
    assert_eq!(action, TC_ACT_UNSPEC);
    assert_eq!(recorded_since(&after_xdp, &recorded(&g)), (vec![], 0), "counted once, at XDP");

    // What XDP did not count, the gate does. A port Docker published before the agent listed
    // its container: XDP saw the host's business, the gate an address no container holds.
    let early = Frame::new(OUTSIDE_A, HOST, Tcp(7777));
    let before = recorded(&g);
    assert_eq!(g.run(&early.bytes(), Framing::Ethernet), XDP_PASS);
    assert_eq!(recorded_since(&before, &recorded(&g)), (vec![], 0));
    let dnat = Frame::new(OUTSIDE_A, "172.30.0.200", Tcp(7777));
    let before = recorded(&g);
    assert_eq!(g.run_tc(Hook::BridgeGate, &dnat.bytes(), UPLINK), TC_ACT_UNSPEC);
    assert_eq!(recorded_since(&before, &recorded(&g)), (vec![], 1), "its drop event");
    // An uplink back under a new index (no XDP on it yet).
    let before = recorded(&g);
    assert_eq!(g.run_tc(Hook::BridgeGate, &probe.bytes(), NEW_UPLINK), TC_ACT_UNSPEC);
    let gate = at(DROP_AUDITED | DROP_AT_GATE);
    assert_eq!(recorded_since(&before, &recorded(&g)), (vec![gate], 1));
    // Behind a bridge the agent has not seen.
    let before = recorded(&g);
    let unseen = Frame::new(OUTSIDE_A, UNSEEN, Tcp(80));
    assert_eq!(
        g.run_tc_on(Hook::BridgeGate, &unseen.bytes(), UPLINK, UNSEEN_BRIDGE),
        TC_ACT_UNSPEC
    );
    assert_eq!(recorded_since(&before, &recorded(&g)), (vec![], 1));

    // Enforced, whatever reaches the gate slipped past XDP: dropped and counted there.
    g.audit_all(false);
    let before = recorded(&g);
    assert_eq!(g.run_tc(Hook::BridgeGate, &probe.bytes(), UPLINK), TC_ACT_SHOT);
    assert_eq!(recorded_since(&before, &recorded(&g)), (vec![at(DROP_AT_GATE)], 1));
}
