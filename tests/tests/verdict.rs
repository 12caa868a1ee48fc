//! Verdict tier: the real XDP program, loaded by this kernel, run with BPF_PROG_TEST_RUN on
//! crafted frames. Every case checks three things: the verdict the kernel returned, the
//! reason it counted (its per-CPU counter moved by exactly one), and that both equal the
//! reference decision computed in user space from the same tables.
//!
//! Needs root (CAP_BPF) and bpffs; run through `cargo xtask test`.

#[path = "verdict/random.rs"]
mod random;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use guard_common::{
    addr::Addr,
    decision::decide,
    maps::{FLOW_TIMEOUT_NS, FlowKey},
    reason::{Decision, Reason, Verdict},
};
use guard_userspace::frames::{Ext, Frame, Transport::*};
use guard_userspace::{
    desired::{Desired, desired_state},
    identities::Identities,
    loader,
    maps::PolicyMaps,
    pins::Pins,
    policy::Proto,
    policy_file::PolicyFile,
    snapshot::{Container, Network, Published, Snapshot},
    tables::{WithFlows, diff},
    unload::unload,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const HOST: &str = "198.18.0.1";
const HOST6: &str = "2001:db8:18::1";
const GATEWAY: &str = "172.30.0.1";
const OUTSIDE_A: &str = "198.18.1.2";
const OUTSIDE_B: &str = "198.18.2.2";
const OUTSIDE6: &str = "2001:db8:1::2";
const DB: &str = "172.30.0.2";
const API: &str = "172.30.0.3";
const WEB: &str = "172.30.0.4";
const WEB6: &str = "fd00:30::4";
const PARTNER: &str = "172.30.0.5";
const VPN_ONLY: &str = "172.30.0.6";

/// The program loaded with its maps pinned in a directory of its own, filled with the seed
/// scenario's desired state; everything is unloaded on drop, even when a case fails.
struct Loaded {
    ebpf: Ebpf,
    maps: PolicyMaps,
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
        // Tests run on parallel threads of one process: each loads into a directory of its own.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pins = Pins::new(format!("/sys/fs/bpf/guard-verdict-{}-{n}", std::process::id()));
        let mut ebpf = loader::load(&pins).expect("the kernel loads the programs");
        let maps = PolicyMaps::from_ebpf(&mut ebpf).expect("maps are in the object");
        Loaded {
            ebpf,
            maps,
            desired: Desired::default(),
            flows: BTreeSet::new(),
            world: None,
            pins,
        }
    }

    /// The seed scenario's desired state, in the maps.
    fn seed() -> Self {
        let mut loaded = Self::empty();
        let host: Vec<IpAddr> = [HOST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
        loaded.install(&seed_snapshot(), &host, &PolicyFile::default());
        loaded
    }

    /// Makes the maps hold the desired state of `snapshot`, the way the agent does.
    fn install(&mut self, snapshot: &Snapshot, host: &[IpAddr], policy: &PolicyFile) {
        let mut ids = Identities::adopt(self.desired.tables.identities.clone());
        let targets = ids.assign(snapshot.containers.iter().map(|c| c.id.as_str()));
        self.desired = desired_state(snapshot, host, &targets, policy);
        let plan = diff(&self.maps.read().expect("read maps"), &self.desired.tables);
        let failures = self.maps.apply(&plan);
        assert!(failures.is_empty(), "map updates failed: {failures:?}");
        assert_eq!(
            self.maps.read().unwrap(),
            self.desired.tables,
            "the maps hold the desired state"
        );
    }

    /// Puts a flow into flow memory as the TC egress program would have, `age_ns` ago.
    fn remember(&mut self, flow: FlowKey, age_ns: u64) {
        self.maps.remember_flow(&flow, monotonic_ns() - age_ns).expect("insert flow");
        if flow.proto == 6 || age_ns < FLOW_TIMEOUT_NS {
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

    /// Runs the frame through the kernel; checks the verdict, the counted reason and the
    /// reference decision.
    fn check(&mut self, name: &str, frame: &Frame, expected: Reason) {
        let bytes = frame.bytes();
        let before = self.counter(expected);
        let program = loader::xdp_program(&mut self.ebpf).unwrap();
        let result = program
            .test_run(TestRunOptions { data_in: Some(&bytes), ..Default::default() })
            .unwrap_or_else(|e| panic!("{name}: BPF_PROG_TEST_RUN failed: {e}"));
        let want = match expected.verdict() {
            Verdict::Pass => XDP_PASS,
            Verdict::Drop => XDP_DROP,
        };
        assert_eq!(result.return_value, want, "{name}: kernel verdict (expected {expected:?})");
        assert_eq!(self.counter(expected) - before, 1, "{name}: counted as {expected:?}");
        if !matches!(expected, Reason::NotIp | Reason::MalformedIp) {
            let model = WithFlows { tables: &self.desired.tables, flows: &self.flows };
            let reference = decide(&model, &frame.packet());
            assert_eq!(reference, Decision::enforced(expected), "{name}: reference decision");
        }
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Err(e) = unload(&self.pins) {
            eprintln!("cleanup: unloading {}: {e}", self.pins.root().display());
        }
    }
}

fn container(n: u8, name: &str, addrs: &[&str], labels: &[(&str, &str)]) -> Container {
    Container {
        id: format!("{n:02x}").repeat(32),
        name: name.into(),
        image: "busybox".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        published: vec![],
    }
}

fn publish(host_ip: &str, host_port: u16, container_port: u16, proto: Proto) -> Published {
    Published { host_ip: host_ip.parse().unwrap(), host_port, container_port, proto }
}

/// The seed scenario plus a container open to one network on all ports.
fn seed_snapshot() -> Snapshot {
    let mut db = container(1, "db", &[DB], &[]);
    db.published =
        vec![publish("0.0.0.0", 5432, 5432, Proto::Tcp), publish("::", 5432, 5432, Proto::Tcp)];
    let api = container(2, "api", &[API], &[]);
    let mut web = container(3, "web", &[WEB, WEB6], &[("guard.expose", "443/tcp,53/udp,9/sctp")]);
    web.published = vec![
        publish("0.0.0.0", 10443, 443, Proto::Tcp),
        publish("0.0.0.0", 18443, 8443, Proto::Tcp),
        publish("::", 10443, 443, Proto::Tcp),
        publish("0.0.0.0", 10053, 53, Proto::Udp),
    ];
    let mut partner = container(
        4,
        "partner",
        &[PARTNER],
        &[("guard.allow.partner", "9000/tcp from 198.18.1.0/24")],
    );
    partner.published = vec![publish("0.0.0.0", 19000, 9000, Proto::Tcp)];
    let vpn = container(
        5,
        "vpn-only",
        &[VPN_ONLY],
        &[("guard.allow.vpn", "* from 198.18.1.2, 2001:db8:1::/64")],
    );
    Snapshot {
        networks: vec![Network {
            id: "n1".into(),
            name: "project".into(),
            bridge: Some("br-n1".into()),
            subnets: vec!["172.30.0.0/24".parse().unwrap(), "fd00:30::/64".parse().unwrap()],
            gateways: vec![GATEWAY.parse().unwrap(), "fd00:30::1".parse().unwrap()],
        }],
        containers: vec![db, api, web, partner, vpn],
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
        ("forged container source", Frame::new(DB, API, Tcp(8080)), Closed),
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
        ("icmpv6 to a container", Frame::new(OUTSIDE6, WEB6, Icmp), Closed),
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
            "later fragment to exposed port",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)).later_fragment(),
            Closed,
        ),
        (
            "later fragment, all-ports source",
            Frame::new(OUTSIDE_A, VPN_ONLY, Tcp(1)).later_fragment(),
            AllowedSource,
        ),
        (
            "later fragment to the host",
            Frame::new(OUTSIDE_A, HOST, Tcp(22)).later_fragment(),
            NotContainerBound,
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
            "TCP cut short, container",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)).truncate(14 + 20 + 10),
            MalformedL4,
        ),
        (
            "UDP cut short, container",
            Frame::new(OUTSIDE_A, WEB, Udp(53)).truncate(14 + 20 + 4),
            MalformedL4,
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

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
            "later fragment to an exposed port",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).v6_extensions(&[Ext::Fragment { offset: 100 }]),
            Closed,
        ),
        (
            "later fragment to the host",
            Frame::new(OUTSIDE6, HOST6, Tcp(22)).v6_extensions(&[Ext::Fragment { offset: 100 }]),
            NotContainerBound,
        ),
        (
            "more extension headers than walked: port-less",
            Frame::new(OUTSIDE6, WEB6, Tcp(443)).v6_extensions(&[hop; 7]),
            Closed,
        ),
        (
            "extension header cut short",
            Frame::new(OUTSIDE6, WEB6, Tcp(443))
                .v6_extensions(&[Ext::Routing])
                .truncate(14 + 40 + 2),
            MalformedL4,
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
/// every path, both families, VLAN tags, IPv4 options and fragments, IPv6 extension headers,
/// truncation, flow memory. The kernel's reason (read from its counters) must equal the
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
        let expected = frame.parse_failure().map(Decision::enforced).unwrap_or_else(|| {
            decide(&WithFlows { tables: &g.desired.tables, flows: &g.flows }, &frame.packet())
        });
        let bytes = frame.bytes();
        let program = loader::xdp_program(&mut g.ebpf).unwrap();
        let result = program
            .test_run(TestRunOptions { data_in: Some(&bytes), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        let after = g.maps.counters().unwrap();
        let moved: Vec<Decision> = after
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((d, _), _)| *d)
            .collect();
        before = after;
        let want = if expected.verdict() == Verdict::Pass { XDP_PASS } else { XDP_DROP };
        if moved != [expected] || result.return_value != want {
            differences.push(format!(
                "case {case}: kernel counted {moved:?} returned {}, reference {expected:?}\n  frame {frame:?}\n  bytes {}",
                result.return_value,
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
    // A generator that stopped reaching a path would make this test vacuous there.
    for reason in Reason::ALL.iter().filter(|r| **r != Reason::NotIp) {
        assert!(
            seen.get(reason).copied().unwrap_or(0) > 0,
            "no case reached {reason:?} (seed {seed})"
        );
    }
}
