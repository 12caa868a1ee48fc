//! What the XDP filter does after an opening let a packet in: the first packet of each flow
//! meets its port's per-source rate limit and, admitted, is reported as an access.
//!
//! The limits are written into the maps here as the agent writes them (the entry and the
//! target's flag), refilled once an hour, so no case depends on the clock.

use aya::maps::{HashMap as KernelHash, Map, MapData, MapError, PerCpuArray, RingBuf};
use guard_common::{
    events::{
        DROP_RATE_LIMITED, EVENTS_EMITTED, EVENTS_PER_SECOND_PER_CPU, EVENTS_SUPPRESSED,
        PacketEvent, STREAM_ACCESS, STREAM_DROPS, event_stat_slot,
    },
    maps::{
        ADDRS, AddrInfo, EVENT_STATS, EVENTS, PUBLISHED, PortKey, PublishedKey, PublishedTarget,
        RATE_LIMITS, TARGET_RATE_LIMITED,
    },
    ratelimit::RateLimit,
};

use super::*;

const HOUR_NS: u64 = 3600 * 1_000_000_000;

/// A pinned map of the loaded program, opened as the agent's CLI opens it.
pub(super) fn pinned(pins: &Pins, name: &str) -> Map {
    let data = MapData::from_pin(pins.map(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    Map::from_map_data(data).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn hash<K: aya::Pod, V: aya::Pod>(pins: &Pins, name: &str) -> KernelHash<MapData, K, V> {
    KernelHash::try_from(pinned(pins, name)).unwrap_or_else(|e: MapError| panic!("{name}: {e}"))
}

impl Loaded {
    /// Limits new flows per source to `key` (a port, or every port of a protocol) to `burst`,
    /// with one more an hour: the maps' entry, and the flag on the container's addresses and
    /// published ports that makes the filter look.
    fn rate_limit(&mut self, key: PortKey, burst: u32) {
        let limit = RateLimit::new(1, HOUR_NS, burst).unwrap();
        hash::<PortKey, RateLimit>(&self.pins, RATE_LIMITS).insert(key, limit, 0).unwrap();
        let mut addrs = hash::<Addr, AddrInfo>(&self.pins, ADDRS);
        for (addr, info) in &self.desired.tables.addrs {
            if info.target == key.target {
                let flagged = AddrInfo { flags: info.flags | TARGET_RATE_LIMITED, ..*info };
                addrs.insert(addr, flagged, 0).unwrap();
            }
        }
        let mut published = hash::<PublishedKey, PublishedTarget>(&self.pins, PUBLISHED);
        for (at, p) in &self.desired.tables.published {
            if p.target == key.target {
                let flagged = PublishedTarget { flags: p.flags | TARGET_RATE_LIMITED, ..*p };
                published.insert(at, flagged, 0).unwrap();
            }
        }
    }

    /// The events the kernel reported since the last call (drops and accesses).
    fn events(&self) -> Vec<PacketEvent> {
        let mut ring = RingBuf::try_from(pinned(&self.pins, EVENTS)).unwrap();
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            assert!(item.len() >= std::mem::size_of::<PacketEvent>());
            // SAFETY: the kernel wrote a whole PacketEvent.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        events
    }

    /// The accesses among [`Loaded::events`], as (source, container port, reason) triples.
    fn accesses(&self) -> Vec<(String, u16, Reason)> {
        self.events()
            .into_iter()
            .map(|e| (e, Reason::from_u32(u32::from(e.reason)).unwrap()))
            .filter(|(_, reason)| reason.verdict() == Verdict::Pass)
            .map(|(e, reason)| (IpAddr::from(e.src).to_string(), e.container_port, reason))
            .collect()
    }

    /// Runs `frame` `times` times in the kernel in one go; returns the last XDP action.
    fn run_repeated(&mut self, frame: &Frame, times: u32) -> u32 {
        let bytes = frame.bytes();
        loader::xdp_program(&mut self.ebpf)
            .unwrap()
            .test_run(TestRunOptions { data_in: Some(&bytes), repeat: times, ..Default::default() })
            .expect("BPF_PROG_TEST_RUN")
            .return_value
    }

    /// What became of `stream`'s events (emitted, suppressed), summed over CPUs.
    fn event_outcomes(&self, stream: u32) -> (u64, u64) {
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(pinned(&self.pins, EVENT_STATS)).unwrap();
        let read = |outcome| stats.get(&event_stat_slot(stream, outcome), 0).unwrap().iter().sum();
        (read(EVENTS_EMITTED), read(EVENTS_SUPPRESSED))
    }

    fn counter_audited(&self, reason: Reason) -> u64 {
        let audited = Decision { reason, audited: true };
        self.maps.counters().unwrap().into_iter().find(|(d, _)| *d == audited).unwrap().1
    }

    fn target_of(&self, name: &str) -> u32 {
        self.desired.containers.iter().find(|c| c.container.name == name).unwrap().target
    }

    /// Runs the frame through the kernel and checks the verdict and the counted reason only:
    /// a rate limit is a count over time, which the reference decision does not model.
    fn check_admission(&mut self, name: &str, frame: &Frame, expected: Reason) {
        let before = self.counter(expected);
        let action = self.run(&frame.bytes(), frame.framing);
        let want = if expected.verdict() == Verdict::Pass { XDP_PASS } else { XDP_DROP };
        assert_eq!(action, want, "{name}: kernel verdict (expected {expected:?})");
        assert_eq!(self.counter(expected) - before, 1, "{name}: counted as {expected:?}");
    }
}

#[test]
fn new_connections_over_a_port_s_limit_are_dropped_per_source() {
    let mut g = Loaded::seed();
    let web = g.target_of("web");
    g.rate_limit(PortKey::new(web, 6, 443), 3);
    use Reason::*;
    let syn =
        |src: &str, dst: &str, port: u16, sport: u16| Frame::new(src, dst, Tcp(port)).sport(sport);
    for sport in 40001..40004 {
        g.check_admission("within the burst", &syn(OUTSIDE_A, WEB, 443, sport), Exposed);
    }
    g.check_admission("over the burst", &syn(OUTSIDE_A, WEB, 443, 40004), RateLimited);
    g.check_admission(
        "the same port through its publish shares the bucket",
        &syn(OUTSIDE_A, HOST, 10443, 40005),
        RateLimited,
    );
    let established = Frame::new(OUTSIDE_A, WEB, Tcp(443)).sport(40001).established();
    g.check_admission("an admitted connection goes on", &established, Exposed);
    // A router's "packet too big" about that connection is its reply, never a new flow: path
    // MTU discovery must not meet the limit.
    let too_big = Frame::new(
        OUTSIDE_A,
        WEB,
        IcmpError(Box::new(Frame::new(WEB, OUTSIDE_A, Tcp(40001)).sport(443))),
    );
    g.check_admission("an ICMP error about it, over the burst", &too_big, Exposed);
    g.check_admission(
        "another source has its own bucket",
        &syn(OUTSIDE_B, WEB, 443, 40001),
        Exposed,
    );
    g.check_admission("a port without a limit", &Frame::new(OUTSIDE_A, WEB, Udp(53)), Exposed);
    g.check_admission("a closed port stays closed", &syn(OUTSIDE_A, API, 8080, 40006), Closed);
    // An IPv6 host is counted by its /64: its neighbours share its bucket.
    for (src, expected) in [
        ("2001:db8:1::2", Exposed),
        ("2001:db8:1::3", Exposed),
        ("2001:db8:1::ffff", Exposed),
        ("2001:db8:1::4", RateLimited),
        ("2001:db8:2::4", Exposed),
    ] {
        g.check_admission(src, &syn(src, WEB6, 443, 40001), expected);
    }
    let drops = g.maps.drops().unwrap();
    let limited = |flags| {
        let key = DropKey { target: web, port: 443, proto: 6, flags };
        drops.iter().find(|(k, _)| *k == key).map_or(0, |(_, n)| *n)
    };
    assert_eq!(limited(DROP_RATE_LIMITED), 2, "counted per container port, direct");
    assert_eq!(limited(DROP_RATE_LIMITED | DROP_PUBLISHED), 1, "and published");
    let reported: Vec<Reason> = g
        .events()
        .iter()
        .map(|e| Reason::from_u32(u32::from(e.reason)).unwrap())
        .filter(|r| r.verdict() == Verdict::Drop)
        .collect();
    assert_eq!(reported, [RateLimited, RateLimited, Closed, RateLimited], "drop events");
}

#[test]
fn a_flow_without_connections_meets_the_limit_with_its_first_packet_until_admitted() {
    let mut g = Loaded::empty();
    let policy =
        policy_file::parse("trusted_sources = [\"198.18.2.0/24\"]\n", "test.toml").unwrap();
    let host: Vec<IpAddr> = [HOST, HOST6].iter().map(|a| a.parse().unwrap()).collect();
    g.install(&seed_snapshot(), &host, &policy);
    let web = g.target_of("web");
    // Every UDP port of the container, as `*/udp` would: one budget for all of them.
    g.rate_limit(PortKey::every_port_of(web, 17), 2);
    use Reason::*;
    let datagram = |src: &str, sport: u16| Frame::new(src, WEB, Udp(53)).sport(sport);
    for _ in 0..3 {
        g.check_admission("one flow's packets", &datagram(OUTSIDE_A, 5000), Exposed);
    }
    g.check_admission("a second flow", &datagram(OUTSIDE_A, 5001), Exposed);
    for _ in 0..2 {
        // Not remembered as arrived: each packet of a limited flow meets the limit again.
        g.check_admission("a third flow, over", &datagram(OUTSIDE_A, 5002), RateLimited);
    }
    g.check_admission("the first flow goes on", &datagram(OUTSIDE_A, 5000), Exposed);
    for sport in 6000..6004 {
        g.check_admission("a trusted source is not limited", &datagram(OUTSIDE_B, sport), Exposed);
    }
    g.audit_all(true);
    // Applying the desired state again cleared the flags this test set by hand.
    g.rate_limit(PortKey::every_port_of(web, 17), 2);
    let before = g.counter_audited(RateLimited);
    assert_eq!(g.run(&datagram(OUTSIDE_A, 5003).bytes(), Framing::Ethernet), XDP_PASS, "audit");
    assert_eq!(g.counter_audited(RateLimited) - before, 1, "counted as a would-drop");
}

#[test]
fn the_first_packet_of_each_flow_an_opening_let_in_is_reported_as_an_access() {
    let mut g = Loaded::seed();
    // Each step's frame, and the accesses it must report: (source, container port, reason).
    type Reported = &'static [(&'static str, u16, Reason)];
    let steps: [(&str, Frame, Reported); 10] = [
        (
            "a connection",
            Frame::new(OUTSIDE_A, WEB, Tcp(443)).sport(40001),
            &[(OUTSIDE_A, 443, Reason::Exposed)],
        ),
        ("its next segment", Frame::new(OUTSIDE_A, WEB, Tcp(443)).sport(40001).established(), &[]),
        (
            "through the publish",
            Frame::new(OUTSIDE_B, HOST, Tcp(10443)).sport(40002),
            &[(OUTSIDE_B, 443, Reason::Exposed)],
        ),
        (
            "a datagram",
            Frame::new(OUTSIDE_A, WEB, Udp(53)).sport(5000),
            &[(OUTSIDE_A, 53, Reason::Exposed)],
        ),
        ("the same flow's next", Frame::new(OUTSIDE_A, WEB, Udp(53)).sport(5000), &[]),
        (
            "a listed source",
            Frame::new(OUTSIDE_A, PARTNER, Tcp(9000)).sport(40003),
            &[(OUTSIDE_A, 9000, Reason::AllowedSource)],
        ),
        (
            "a ping `*` allows",
            Frame::new(OUTSIDE_A, VPN_ONLY, Icmp),
            &[(OUTSIDE_A, 0, Reason::AllowedSource)],
        ),
        ("the same ping again", Frame::new(OUTSIDE_A, VPN_ONLY, Icmp), &[]),
        ("a closed port", Frame::new(OUTSIDE_A, API, Tcp(8080)).sport(40004), &[]),
        ("the host's own service", Frame::new(OUTSIDE_A, HOST, Tcp(22)).sport(40005), &[]),
    ];
    for (name, frame, expected) in steps {
        g.run(&frame.bytes(), frame.framing);
        let want: Vec<(String, u16, Reason)> =
            expected.iter().map(|(src, port, reason)| (src.to_string(), *port, *reason)).collect();
        assert_eq!(g.accesses(), want, "{name}");
    }
}

#[test]
fn access_events_have_a_budget_of_their_own() {
    let mut g = Loaded::seed();
    let burst = EVENTS_PER_SECOND_PER_CPU + 20;
    // One CPU, within a second: the stream's budget, and the rest counted as suppressed.
    let syn = Frame::new(OUTSIDE_A, WEB, Tcp(443)).sport(40001);
    assert_eq!(g.run_repeated(&syn, burst), XDP_PASS);
    let (emitted, suppressed) = g.event_outcomes(STREAM_ACCESS);
    assert_eq!((emitted, suppressed), (u64::from(EVENTS_PER_SECOND_PER_CPU), 20));
    assert_eq!(g.accesses().len(), EVENTS_PER_SECOND_PER_CPU as usize);
    // A spent access budget leaves drops theirs.
    assert_eq!(g.run(&Frame::new(OUTSIDE_A, API, Tcp(8080)).bytes(), Framing::Ethernet), XDP_DROP);
    assert_eq!(g.event_outcomes(STREAM_DROPS), (1, 0));
}
