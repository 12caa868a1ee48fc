//! Part a: what one decision costs, measured with BPF_PROG_TEST_RUN on guard's loaded program.
//!
//! Every case runs at every scale; each round loads guard afresh at every scale and runs all
//! (case, scale) pairs round-robin, so a noisy neighbour (and the luck of a load's code
//! placement) hits them alike, and each figure is the median over the rounds. The
//! kernel reports the average run time of one round in whole nanoseconds. Every run is checked:
//! the verdict, the reason's counter moved by exactly `repeat`, and access events by `repeat` or
//! not at all, so a case measures the path it claims to.

use std::rc::Rc;

use anyhow::{Context, Result, ensure};
use aya::programs::{TestRun, TestRunOptions};
use guard_common::reason::{Reason, Verdict};
use guard_userspace::kernel::frames::{Frame, Transport};
use tests::frames::{self, MAC_A, MAC_B, TCP_ACK, Tcp};

use crate::{
    Params,
    world::{
        ALLOWED_PORT, CLOSED_PORT, DENIED, EXPOSED_PORT, Guard, HOST_SERVICE_PORT, LOCAL_PORT,
        MapSizes, OUTSIDE, REMOTE, REMOTE_PORT, UPLINK, VXLAN_PORT, World,
    },
};

pub struct Case {
    pub name: &'static str,
    pub what: &'static str,
    pub expect: Reason,
    pub frame: fn(&World) -> Vec<u8>,
    /// Prepares the maps of one loaded instance for this case, beyond the world's state.
    pub setup: Option<fn(&mut Guard) -> Result<()>>,
    /// Whether the program looks up the world's 100,000 denied sources (set before each run).
    pub deny_lookups: bool,
    /// Whether every run starts a flow an opening lets in, so reports an access event: in a
    /// run of a million, the first 50 are written to the ring and the rest counted as
    /// suppressed (the per-CPU budget), which is what a flood of new flows costs.
    pub access: bool,
}

pub const FLOOR: &str = "floor";

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: FLOOR,
            what: "ARP through guard's program: the floor of the method",
            expect: Reason::NotIp,
            frame: |_| frames::arp_request(OUTSIDE, UPLINK),
            setup: None,
            deny_lookups: true,
            access: false,
        },
        Case {
            name: "pass",
            what: "TCP to a host address, unpublished port (not container-bound)",
            expect: Reason::NotContainerBound,
            frame: |_| Tcp::syn(OUTSIDE, UPLINK, HOST_SERVICE_PORT).frame(MAC_A, MAC_B),
            setup: None,
            deny_lookups: true,
            access: false,
        },
        Case {
            name: "drop_door",
            what: "UDP to the host's VXLAN port (a swarm's data path) from outside the swarm",
            expect: Reason::ManagementPort,
            frame: |_| {
                let udp = Transport::Udp(VXLAN_PORT);
                Frame::new(&OUTSIDE.to_string(), &UPLINK.to_string(), udp).sport(40000).bytes()
            },
            setup: None,
            deny_lookups: true,
            access: false,
        },
        Case {
            name: "drop_direct",
            what: "TCP SYN to a container address, closed port",
            expect: Reason::Closed,
            frame: |w| Tcp::syn(OUTSIDE, w.probe_addr(), CLOSED_PORT).frame(MAC_A, MAC_B),
            setup: None,
            deny_lookups: true,
            access: false,
        },
        Case {
            name: "drop_published",
            what: "TCP SYN to a host address, port published for a closed container port",
            expect: Reason::Closed,
            frame: |w| Tcp::syn(OUTSIDE, UPLINK, w.probe_published_port()).frame(MAC_A, MAC_B),
            setup: None,
            deny_lookups: true,
            access: false,
        },
        Case {
            name: "pass_cidr",
            what: "TCP SYN to a container port allowed from a CIDR, source inside it (an access)",
            expect: Reason::AllowedSource,
            frame: |w| {
                Tcp::syn(w.probe_allowed_source(), w.probe_addr(), ALLOWED_PORT).frame(MAC_A, MAC_B)
            },
            setup: None,
            deny_lookups: true,
            access: true,
        },
        Case {
            name: "pass_flow",
            what: "TCP reply (ACK) to a connection a container opened, passed by flow memory",
            expect: Reason::Reply,
            frame: |w| {
                let reply = Tcp {
                    src: REMOTE,
                    dst: w.probe_addr(),
                    sport: REMOTE_PORT,
                    dport: LOCAL_PORT,
                    flags: TCP_ACK,
                };
                reply.frame(MAC_A, MAC_B)
            },
            setup: Some(Guard::remember_flows),
            deny_lookups: true,
            access: false,
        },
        Case {
            name: "pass_exposed_no_deny",
            what: "TCP SYN to an exposed container port (an access), the deny sets' lookups off",
            expect: Reason::Exposed,
            frame: |w| Tcp::syn(OUTSIDE, w.probe_addr(), EXPOSED_PORT).frame(MAC_A, MAC_B),
            setup: None,
            deny_lookups: false,
            access: true,
        },
        Case {
            name: "pass_exposed",
            what: "The same, past 100,000 denied sources (50,000 addresses, 50,000 /28s)",
            expect: Reason::Exposed,
            frame: |w| Tcp::syn(OUTSIDE, w.probe_addr(), EXPOSED_PORT).frame(MAC_A, MAC_B),
            setup: None,
            deny_lookups: true,
            access: true,
        },
        Case {
            name: "pass_exposed_ack",
            what: "The same port, a later segment of a flow (ACK): no access event",
            expect: Reason::Exposed,
            frame: |w| {
                let ack = Tcp { flags: TCP_ACK, ..Tcp::syn(OUTSIDE, w.probe_addr(), EXPOSED_PORT) };
                ack.frame(MAC_A, MAC_B)
            },
            setup: None,
            deny_lookups: true,
            access: false,
        },
        Case {
            name: "drop_denied",
            what: "TCP SYN to an exposed container port from a denied address",
            expect: Reason::Denied,
            frame: |w| Tcp::syn(DENIED, w.probe_addr(), EXPOSED_PORT).frame(MAC_A, MAC_B),
            setup: None,
            deny_lookups: true,
            access: false,
        },
    ]
}

/// The figures of one (case, scale) pair.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Kernel-reported average ns per run, one per round.
    pub rounds_ns: Vec<u32>,
    /// Wall time of each BPF_PROG_TEST_RUN call divided by `repeat` (syscall overhead and any
    /// preemption included): a cross-check of the kernel's figure.
    pub rounds_wall_ns: Vec<f64>,
}

impl Sample {
    pub fn median_ns(&self) -> f64 {
        median(self.rounds_ns.iter().map(|&n| f64::from(n)).collect())
    }
    pub fn median_wall_ns(&self) -> f64 {
        median(self.rounds_wall_ns.clone())
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty());
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) { f64::midpoint(v[mid - 1], v[mid]) } else { v[mid] }
}

pub struct CaseResult {
    pub name: &'static str,
    pub what: &'static str,
    /// One per scale, in the order of the guards.
    pub per_scale: Vec<Option<Sample>>,
}

/// The cases `GUARD_BENCH_CASES` names (comma-separated), and the floor; all without it.
fn selected(all: Vec<Case>) -> Result<Vec<Case>> {
    let Ok(names) = std::env::var("GUARD_BENCH_CASES") else { return Ok(all) };
    let names: Vec<&str> = names.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
    for name in &names {
        ensure!(
            all.iter().any(|c| c.name == *name),
            "GUARD_BENCH_CASES: no case {name:?}; the cases: {}",
            all.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(all.into_iter().filter(|c| c.name == FLOOR || names.contains(&c.name)).collect())
}

/// Measures every case at every scale. Returns the results and the map sizes per scale.
pub fn measure(worlds: &[Rc<World>], params: &Params) -> Result<(Vec<CaseResult>, Vec<MapSizes>)> {
    let cases = selected(cases())?;
    let mut results: Vec<CaseResult> = cases
        .iter()
        .map(|c| CaseResult { name: c.name, what: c.what, per_scale: vec![None; worlds.len()] })
        .collect();
    let frames: Vec<Vec<Vec<u8>>> =
        cases.iter().map(|case| worlds.iter().map(|w| (case.frame)(w)).collect()).collect();
    let mut sizes = Vec::new();

    for round in 0..params.rounds {
        eprintln!(
            "bench: per-packet round {}/{}: loading guard at every scale ...",
            round + 1,
            params.rounds
        );
        // A fresh load every round, in a rotating order. Code and map placement move these
        // figures: one load of each batch (in practice the first) runs every path ~10-15 ns
        // slower, the floor included. Rotating spreads that over the scales, and the median
        // over rounds (over loads, as over time) leaves it out.
        let mut loaded: Vec<Option<Guard>> = worlds.iter().map(|_| None).collect();
        for i in 0..worlds.len() {
            let s = (i + round) % worlds.len();
            let mut guard = Guard::load(&worlds[s])?;
            for case in &cases {
                if let Some(setup) = case.setup {
                    setup(&mut guard).with_context(|| format!("setting up case {}", case.name))?;
                }
            }
            loaded[s] = Some(guard);
        }
        let mut guards: Vec<Guard> = loaded.into_iter().flatten().collect();
        for (c, case) in cases.iter().enumerate() {
            for (s, guard) in guards.iter_mut().enumerate() {
                guard.set_deny_lookups(case.deny_lookups)?;
                let (ns, wall) = run(guard, case, &frames[c][s], params.repeat)?;
                let sample = results[c].per_scale[s].get_or_insert_with(|| Sample {
                    rounds_ns: Vec::new(),
                    rounds_wall_ns: Vec::new(),
                });
                sample.rounds_ns.push(ns);
                sample.rounds_wall_ns.push(wall);
            }
        }
        sizes = guards.iter().map(|g| g.sizes).collect();
    }
    Ok((results, sizes))
}

/// One BPF_PROG_TEST_RUN of `repeat` runs; checked. Returns (kernel ns/run, wall ns/run).
fn run(guard: &mut Guard, case: &Case, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let scale = guard.world.containers;
    let before = guard.counter(case.expect)?;
    let accesses_before = guard.access_events()?;
    let start = std::time::Instant::now();
    let result = guard
        .program()?
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })
        .with_context(|| format!("BPF_PROG_TEST_RUN of case {} at {scale}", case.name))?;
    let wall = start.elapsed().as_nanos() as f64 / f64::from(repeat);
    let want = match case.expect.verdict() {
        Verdict::Pass => XDP_PASS,
        Verdict::Drop => XDP_DROP,
    };
    ensure!(
        result.return_value == want,
        "case {} at {scale} containers: XDP verdict {} (expected {want} for {:?})",
        case.name,
        result.return_value,
        case.expect
    );
    let counted = guard.counter(case.expect)? - before;
    ensure!(
        counted == u64::from(repeat),
        "case {} at {scale} containers: {counted} of {repeat} runs counted as {:?}: the frame \
         takes another path than the case claims",
        case.name,
        case.expect
    );
    let accesses = guard.access_events()? - accesses_before;
    let want = if case.access { u64::from(repeat) } else { 0 };
    ensure!(
        accesses == want,
        "case {} at {scale} containers: {accesses} access events in {repeat} runs, {want} expected",
        case.name
    );
    Ok((result.duration.as_nanos() as u32, wall))
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
