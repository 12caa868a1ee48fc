//! The filter as an attacker on the LAN tries it, and as a container's user relies on it
//! (issue 9): raw frames from an outside host on the same L2 segment (priority tags,
//! broadcast and multicast, IPv4-mapped sources, tiny first fragments, long extension-header
//! chains, a spoofed-SYN flood), and the replies that must never be dropped (ping, path-MTU
//! discovery through a router, fragmented UDP replies, an idle connection through a flood).
//!
//! Every attack is first shown to reach its target without the agent (the test bed reproduces
//! the hole, or the later silence would prove nothing), then must be silent with it: dropped,
//! not refused. Two shapes Linux refuses by itself (an IPv4-mapped IPv6 source, an IPv6 first
//! fragment without the whole TCP header) are still held to guard's own verdict. Every reply
//! case must work without the agent and with it, in enforce mode.
//!
//! Needs root, a running dockerd and the busybox test image; `cargo xtask test --tier e2e`
//! provides all three and runs the tests one at a time. Addresses: the Docker network is
//! 10.247.0.0/24 and fd00:247::/64, outside hosts 10.251.41-43.0/24, the far side of the
//! router 10.246.43.0/24, spoofed flood sources 10.245.0.0/16 (routed to an outside
//! namespace, so not one packet leaves the test bed).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use guard_common::parse::MAX_V6_EXTENSIONS;
use tests::agent::Agent;
use tests::bed::{BedSpec, outside_host};
use tests::cmd::run;
use tests::docker::{Container, ContainerSpec, Network};
use tests::netns::{Netns, OutsideHost, in_netns};
use tests::observe::http_get;
use tests::probe::{EchoServer, Outcome, PATIENT, Proto, QUICK, udp_roundtrip};
use tests::raw::{
    self, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Fragment, IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT, IPPROTO_TCP, IPPROTO_UDP, RawLink, SynProbe, TCP_SYN, XorShift, probe_syns,
    syn_frame,
};
use tests::wait::poll;

const NET_V4: &str = "10.247.0.0/24";
const NET_V6: &str = "fd00:247::/64";
/// Long enough for any one test; servers stop with their test anyway.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

fn v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 247, 0, host)
}

fn v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x247, 0, 0, 0, 0, 0, host.into())
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A fresh source port for every raw probe: a probe must never be taken for the answer to an
/// earlier one, nor meet the conntrack entry an earlier one left.
fn source_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(20_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A container at `v4(host)` / `v6(host)` on `net`.
fn container(
    net: &Network,
    name: &str,
    host: u8,
    labels: &[(&str, &str)],
    publish: &[&str],
    command: &str,
    listens_on: &[u16],
) -> Container {
    Container::run(ContainerSpec {
        name,
        network: Some(net),
        ip: Some(v4(host)),
        ip6: Some(v6(host)),
        labels,
        publish,
        command,
        listens_on,
        ..Default::default()
    })
}

/// Outside host `name` numbered `n`, a neighbour that routes the test network via the host.
fn outside(name: &str, n: u8) -> OutsideHost {
    outside_host(name, n, &[NET_V4, NET_V6])
}

/// The agent on `uplinks`, enforce mode, with its metrics on a free loopback port.
fn agent(uplinks: &[&str]) -> (Agent, SocketAddr) {
    Agent::start_with_metrics(uplinks, &[])
}

/// A raw link on `host`'s side of its veth, and the MAC its frames are addressed to (the
/// host's end).
fn raw_link(host: &OutsideHost) -> (RawLink, raw::Mac) {
    (RawLink::open(host.netns(), "uplink0"), raw::host_mac(host.host_end()))
}

/// What every test here starts from: the test bed held, the host routing, the test network,
/// and outside host A with a raw link onto its segment. Field order is drop order; the
/// containers a test adds are locals declared after it, so they go first.
struct Bed {
    link: RawLink,
    /// The host's MAC on A's segment: where A's unicast frames go.
    host_mac: raw::Mac,
    base: tests::bed::Bed,
}

tests::on_the_common_bed!(Bed);

impl Bed {
    fn new() -> Self {
        let base = tests::bed::Bed::new(BedSpec {
            network: "guard-e2e-adv",
            subnet_v4: NET_V4,
            subnet_v6: Some(NET_V6),
            outside: &[("adv-a", 41)],
            ..Default::default()
        });
        let (link, host_mac) = raw_link(base.a());
        Self { link, host_mac, base }
    }

    /// A database published the way compose files do (16379 -> 6379), no label: closed.
    fn closed_db(&self) -> Container {
        let serve = "exec httpd -f -p 6379 -h /www";
        container(&self.net, "adv-db", 10, &[], &["16379:6379"], serve, &[6379])
    }

    /// A web server open to everyone by label (80/tcp, published 10080 -> 80).
    fn exposed_web(&self) -> Container {
        let (label, serve) = (("guard.expose", "80/tcp"), "exec httpd -f -p 80 -h /www");
        container(&self.net, "adv-web", 13, &[label], &["10080:80"], serve, &[80])
    }

    /// A SYN from A to `to`, under `tags`.
    fn syn(&self, what: &str, tags: &[u16], to: SocketAddr) -> SynProbe {
        syn_probe(what, &self.link, self.host_mac, self.a(), tags, to)
    }

    /// A container at `host` that serves nothing, for outbound traffic.
    fn idle(&self, name: &str, host: u8) -> Container {
        container(&self.net, name, host, &[], &[], "exec sleep 1000", &[])
    }
}

/// `host`'s own address of `to`'s family, with a fresh source port.
fn from_host(host: &OutsideHost, to: SocketAddr) -> SocketAddr {
    let ip: IpAddr = if to.is_ipv4() { host.v4().into() } else { host.v6().into() };
    sock(ip, source_port())
}

/// A SYN from `host` (its own address of `to`'s family) to `to`, under `tags`.
fn syn_probe(
    what: &str,
    link: &RawLink,
    dst_mac: raw::Mac,
    host: &OutsideHost,
    tags: &[u16],
    to: SocketAddr,
) -> SynProbe {
    let from = from_host(host, to);
    let frame = syn_frame(dst_mac, link.mac, tags, from, to);
    SynProbe { what: what.to_owned(), from, to, frames: vec![frame] }
}

/// Sends `probes` and panics, with the whole table, unless each one's outcome is `expected`.
/// Waits `PATIENT` for answers that must come, `QUICK` for silence.
fn expect_syns(context: &str, link: &RawLink, probes: &[SynProbe], expected: Outcome) {
    expect_syns_on(context, &[(link, probes)], expected);
}

/// [`expect_syns`] for probes sent from several links; every link's table is printed before
/// any verdict.
fn expect_syns_on(context: &str, groups: &[(&RawLink, &[SynProbe])], expected: Outcome) {
    let within = if expected == Outcome::Answered { PATIENT } else { QUICK };
    let mut wrong = Vec::new();
    for (link, probes) in groups {
        let outcomes = probe_syns(link, probes, within);
        for (probe, outcome) in probes.iter().zip(outcomes) {
            let line = format!(
                "{context}: {:<58} {} -> {:<26} {outcome}",
                probe.what, probe.from, probe.to
            );
            println!("{line}");
            if outcome != expected {
                wrong.push(format!("{line}, expected {expected}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{context}: wrong outcomes:\n{}", wrong.join("\n"));
}

/// The sum of `guard_packets_total` over every reason with the given verdict.
fn packets_with_verdict(metrics: SocketAddr, verdict: &str) -> f64 {
    let text = http_get(metrics, "/metrics").unwrap_or_else(|e| panic!("scrape: {e}"));
    let label = format!("verdict=\"{verdict}\"");
    text.lines()
        .filter(|l| l.starts_with("guard_packets_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// Attacks
// ---------------------------------------------------------------------------------------

/// Priority-tagged SYNs (VID 0, which the receiving kernel strips in its core receive path,
/// with no vlan device, up to 8 deep here) to a port Docker publishes without any label
/// (docker-proxy serves it on [::]), to a closed container's own addresses, and to a closed
/// container on a macvlan network (no bridge gate behind the XDP filter there). Untagged
/// frames are the control.
#[test]
fn priority_tagged_syns_reach_no_closed_port() {
    let bed = Bed::new();
    let (a, a_link, a_dst) = (bed.a(), &bed.link, bed.host_mac);
    let db = bed.closed_db();
    let m = OutsideHost::new("adv-m", 42);
    let mv_net = Network::create_macvlan("guard-e2e-adv-mv", "10.251.42.0/24", m.host_end());
    let mv_ip = Ipv4Addr::new(10, 251, 42, 10);
    let mv = Container::run(ContainerSpec {
        name: "adv-mv",
        network: Some(&mv_net),
        ip: Some(mv_ip),
        command: "exec httpd -f -p 6379 -h /www",
        ..Default::default()
    });
    let mv_mac = raw::parse_mac(&mv.mac(&mv_net));
    let m_link = RawLink::open(m.netns(), "uplink0");

    // The kernel here delivers frames under up to 8 stacked VID-0 tags (9 and more go
    // unanswered even without the agent), so 8 is the deepest stack that can attack, and
    // more than a filter should walk; 12 only shows that deeper stacks stay harmless.
    let framings: [(&str, Vec<u16>); 5] = [
        ("untagged", vec![]),
        ("3 x 802.1Q VID 0", vec![ETH_P_8021Q; 3]),
        ("802.1ad + 2 x 802.1Q VID 0", vec![ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q]),
        ("8 x 802.1Q VID 0", vec![ETH_P_8021Q; 8]),
        ("12 x 802.1Q VID 0", vec![ETH_P_8021Q; 12]),
    ];
    let targets = [
        ("published 16379, host v6 (docker-proxy)", sock(a.host_v6(), 16379)),
        ("published 16379, host v4", sock(a.host_v4(), 16379)),
        ("closed container v4", sock(db.ip(), 6379)),
        ("closed container v6", sock(db.ip6(), 6379)),
    ];
    let probes = |framings: &[(&str, Vec<u16>)]| {
        let mut on_a = Vec::new();
        let mut on_m = Vec::new();
        for (framing, tags) in framings {
            for (target, to) in targets {
                let what = format!("SYN {framing} to {target}");
                on_a.push(syn_probe(&what, a_link, a_dst, a, tags, to));
            }
            let what = format!("SYN {framing} to closed macvlan container");
            on_m.push(syn_probe(&what, &m_link, mv_mac, &m, tags, sock(mv_ip, 6379)));
        }
        (on_a, on_m)
    };

    let (on_a, on_m) = probes(&framings[..4]);
    expect_syns_on("without agent", &[(a_link, &on_a), (&m_link, &on_m)], Outcome::Answered);

    let (agent, _) = agent(&[a.host_end(), m.host_end()]);
    let (on_a, on_m) = probes(&framings);
    expect_syns_on("with agent", &[(a_link, &on_a), (&m_link, &on_m)], Outcome::Silent);
    agent.unload();
}

/// UDP to broadcast and multicast destinations on a published UDP port of a container that
/// is not exposed. Docker does not NAT these, but docker-proxy listens on the wildcard
/// address, takes them and relays them to the container. Unicast to the published port is
/// the control.
#[test]
fn broadcast_and_multicast_udp_reach_no_closed_container() {
    let bed = Bed::new();
    let (a, link, host_mac) = (bed.a(), &bed.link, bed.host_mac);
    let udp = container(&bed.net, "adv-udp", 11, &[], &["15353:5353/udp"], "exec sleep 1000", &[]);
    // docker-proxy relays to the container's v4 address, whichever family it took; listen on
    // both anyway.
    let listeners = [
        udp.udp_echo(sock(udp.ip(), 5353), SERVER_LIFETIME),
        udp.udp_echo(sock(udp.ip6(), 5353), SERVER_LIFETIME),
    ];
    let received = || listeners.iter().map(|l| l.peers().len()).sum::<usize>();

    // The host's address on A's link is added without `brd`, as `ip addr add` does by default:
    // the kernel still routes 10.251.41.255 as that subnet's broadcast (a `broadcast` route in
    // its local table), though the address carries no broadcast attribute to read. A second
    // address names its broadcast address itself, off the subnet's usual one: the kernel
    // routes that one as a broadcast too. It goes with A's veth.
    let custom_brd = Ipv4Addr::new(10, 251, 44, 77);
    run(
        "ip",
        &["addr", "add", "10.251.44.1/24", "brd", &custom_brd.to_string(), "dev", a.host_end()],
    );
    let datagrams = || {
        let cases: [(&str, raw::Mac, IpAddr, IpAddr); 6] = [
            ("unicast to the host v4 (control)", host_mac, a.v4().into(), a.host_v4().into()),
            (
                "subnet broadcast 10.251.41.255",
                raw::BROADCAST_MAC,
                a.v4().into(),
                Ipv4Addr::new(10, 251, 41, 255).into(),
            ),
            ("limited broadcast", raw::BROADCAST_MAC, a.v4().into(), Ipv4Addr::BROADCAST.into()),
            (
                "configured broadcast 10.251.44.77",
                raw::BROADCAST_MAC,
                a.v4().into(),
                custom_brd.into(),
            ),
            (
                "all-hosts 224.0.0.1",
                raw::multicast_mac(Ipv4Addr::new(224, 0, 0, 1).into()),
                a.v4().into(),
                Ipv4Addr::new(224, 0, 0, 1).into(),
            ),
            (
                "all-nodes ff02::1",
                raw::multicast_mac(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).into()),
                a.v6().into(),
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).into(),
            ),
        ];
        cases.map(|(what, mac, src, dst)| {
            let (from, to) = (sock(src, source_port()), sock(dst, 15353));
            let dgram = raw::udp(from, to, b"adversary");
            let (ether_type, packet) = raw::ip_packet(src, dst, IPPROTO_UDP, &dgram);
            (format!("UDP {what} :15353"), raw::ethernet(mac, link.mac, &[], ether_type, &packet))
        })
    };
    // Sends each datagram alone and reports whether the container's listener got it.
    let deliveries = |within: Duration| -> Vec<(String, bool)> {
        datagrams()
            .into_iter()
            .map(|(what, frame)| {
                let before = received();
                link.send(&frame);
                poll(within, || received() != before);
                (what, received() > before)
            })
            .collect()
    };
    let check = |context: &str, within: Duration, expected: bool| {
        let mut wrong = Vec::new();
        for (what, got) in deliveries(within) {
            let line = format!(
                "{context}: {what:<50} {}",
                if got { "reached the container" } else { "not received" }
            );
            println!("{line}");
            if got != expected {
                wrong.push(line);
            }
        }
        assert!(wrong.is_empty(), "{context}: wrong deliveries:\n{}", wrong.join("\n"));
    };

    check("without agent", PATIENT, true);
    let (agent, _) = agent(&[a.host_end()]);
    check("with agent", QUICK, false);
    agent.unload();
}

/// `guard.expose=*/udp`: every UDP port of the container opens, by its addresses (both
/// families) and through the port Docker publishes, with one rule; its TCP ports, published or
/// not, stay closed. Without the agent all of them answer (the hole, else the silence would
/// prove nothing); with it, UDP still answers (or is refused where nothing listens: it got
/// through) and TCP is silent.
#[test]
fn expose_every_udp_port_opens_udp_and_keeps_tcp_closed() {
    let bed = Bed::new();
    let a = bed.a();
    let serve_tcp = "exec httpd -f -p 6300 -h /www";
    let publish = ["15300:5300/udp", "16300:6300"];
    let label = ("guard.expose", "*/udp");
    let c = container(&bed.net, "adv-every-udp", 14, &[label], &publish, serve_tcp, &[6300]);
    let _echoes = [
        c.udp_echo(sock(c.ip(), 5300), SERVER_LIFETIME),
        c.udp_echo(sock(c.ip(), 40123), SERVER_LIFETIME),
        c.udp_echo(sock(c.ip6(), 5300), SERVER_LIFETIME),
    ];
    let udp = [
        ("udp 5300, v4", sock(c.ip(), 5300)),
        ("udp 40123, v4", sock(c.ip(), 40123)),
        ("udp 5300, v6", sock(c.ip6(), 5300)),
        ("udp published 15300", sock(a.host_v4(), 15300)),
    ];
    let tcp = [
        ("tcp 6300, v4", sock(c.ip(), 6300)),
        ("tcp 6300, v6", sock(c.ip6(), 6300)),
        ("tcp published 16300", sock(a.host_v4(), 16300)),
    ];
    let check = |context: &str, udp_answers: Outcome, tcp_answers: Outcome| {
        let probes: Vec<(&str, Proto, SocketAddr, Outcome)> = udp
            .iter()
            .map(|(what, to)| (*what, Proto::Udp, *to, udp_answers))
            .chain(tcp.iter().map(|(what, to)| (*what, Proto::Tcp, *to, tcp_answers)))
            .collect();
        let targets: Vec<_> = probes.iter().map(|p| (p.1, p.2, PATIENT)).collect();
        let outcomes = a.outcome_all(&targets);
        let mut wrong = Vec::new();
        for ((what, _, to, expected), got) in probes.iter().zip(outcomes) {
            let line = format!("{context}: {what:<22} -> {to:<26} {got}");
            println!("{line}");
            if got != *expected {
                wrong.push(format!("{line}, expected {expected}"));
            }
        }
        assert!(wrong.is_empty(), "{context}: wrong outcomes:\n{}", wrong.join("\n"));
    };
    check("without agent", Outcome::Answered, Outcome::Answered);
    let (agent, _) = agent(&[a.host_end()]);
    check("with agent", Outcome::Answered, Outcome::Silent);
    // A UDP port nothing listens on is refused, not dropped: the datagram reached the stack.
    let no_listener = sock(c.ip(), 40999);
    let refused = a.outcome_all(&[(Proto::Udp, no_listener, PATIENT)]);
    assert_eq!(refused, [Outcome::Refused], "udp to {no_listener} must get through");
    let status = agent.status();
    assert!(
        status.lines().any(|l| l.contains("*/udp") && l.contains("everyone")),
        "status names the rule as written:\n{status}"
    );
    agent.unload();
}

/// An IPv6 packet whose source is IPv4-mapped (::ffff:<a v4 source the allow-list names>) to
/// the allow-listed port, by the container's address and by the published port. Linux drops
/// such sources in ip6_rcv_core on its own, so no answer comes back either way; what matters
/// is guard's own verdict, read from its counters: such a source is no allowed source, and
/// guard must drop it, not pass it on the strength of the v4 allow-list.
#[test]
fn ipv4_mapped_source_is_no_allowed_source() {
    let bed = Bed::new();
    let (a, link, host_mac) = (bed.a(), &bed.link, bed.host_mac);
    let allow = format!("7000/tcp from {}", a.v4());
    let partner = container(
        &bed.net,
        "adv-partner",
        12,
        &[("guard.allow.a", &allow)],
        &["17000:7000"],
        "exec httpd -f -p 7000 -h /www",
        &[7000],
    );
    let (agent, metrics) = agent(&[a.host_end()]);

    // Controls: the listed v4 source gets in; A's own v6 address is not listed.
    let listed = [bed.syn("SYN from the listed v4 source", &[], sock(partner.ip(), 7000))];
    expect_syns("with agent", link, &listed, Outcome::Answered);
    let unlisted = [bed.syn("SYN from A's v6 (not listed)", &[], sock(partner.ip6(), 7000))];
    expect_syns("with agent", link, &unlisted, Outcome::Silent);

    let mapped = a.v4().to_ipv6_mapped();
    let mapped_probes = || {
        [
            ("allow-listed container v6", sock(partner.ip6(), 7000)),
            ("published 17000, host v6", sock(a.host_v6(), 17000)),
        ]
        .map(|(what, to)| {
            let from = sock(mapped, source_port());
            let frame = syn_frame(host_mac, link.mac, &[], from, to);
            SynProbe { what: format!("SYN from {mapped} to {what}"), from, to, frames: vec![frame] }
        })
    };
    const ROUNDS: usize = 5;
    let drops_before = packets_with_verdict(metrics, "drop");
    let passes_before = packets_with_verdict(metrics, "pass");
    let probes: Vec<SynProbe> = (0..ROUNDS).flat_map(|_| mapped_probes()).collect();
    expect_syns("with agent", link, &probes, Outcome::Silent);
    let dropped = packets_with_verdict(metrics, "drop") - drops_before;
    let passed = packets_with_verdict(metrics, "pass") - passes_before;
    let sent = (ROUNDS * 2) as f64;
    assert!(
        dropped >= sent,
        "guard passed IPv6 SYNs from the IPv4-mapped {mapped} to a port allow-listed for {}: \
         {sent} sent, {dropped} dropped, {passed} passed (the kernel's ip6_rcv_core dropped \
         them after guard let them through)",
        a.v4()
    );
    agent.unload();
}

/// The SYN to `to` from `from`, split after its first 8 transport bytes into two fragments:
/// the first holds the ports but not the flags, the second the rest. 8 is the least a first
/// fragment can carry: the kernel throws away a non-final fragment shorter than 8 bytes.
fn tiny_fragment_syn(
    dst_mac: raw::Mac,
    src_mac: raw::Mac,
    from: SocketAddr,
    to: SocketAddr,
) -> Vec<Vec<u8>> {
    let segment = raw::tcp(from, to, TCP_SYN, 0x2000_0000 | u32::from(from.port()));
    let (head, tail) = segment.split_at(8);
    let id = 0x4000 | u32::from(from.port());
    let first = Fragment { id, offset: 0, more: true };
    let second = Fragment { id, offset: 8, more: false };
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [(first, head), (second, tail)]
            .map(|(f, part)| {
                raw::ethernet(
                    dst_mac,
                    src_mac,
                    &[],
                    ETH_P_IP,
                    &raw::ipv4(s, d, IPPROTO_TCP, Some(f), part),
                )
            })
            .to_vec(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [(first, head), (second, tail)]
            .map(|(f, part)| {
                let mut payload = raw::v6_fragment(IPPROTO_TCP, f).to_vec();
                payload.extend_from_slice(part);
                raw::ethernet(
                    dst_mac,
                    src_mac,
                    &[],
                    ETH_P_IPV6,
                    &raw::ipv6(s, d, IPPROTO_FRAGMENT, &payload),
                )
            })
            .to_vec(),
        _ => panic!("{from} and {to} are of different families"),
    }
}

/// A SYN whose first fragment carries only 8 bytes of the TCP header (the ports, no flags),
/// to closed ports by every path; a fragmented SYN to an exposed port must still be answered
/// (the ports are in the first fragment, so it can be judged).
#[test]
fn tiny_first_fragments_reach_no_closed_port() {
    let bed = Bed::new();
    let (a, link, host_mac) = (bed.a(), &bed.link, bed.host_mac);
    let db = bed.closed_db();
    let _web = bed.exposed_web();
    let fragmented = |what: &str, to: SocketAddr| {
        let from = from_host(a, to);
        let frames = tiny_fragment_syn(host_mac, link.mac, from, to);
        SynProbe { what: format!("fragmented SYN (8 bytes first) to {what}"), from, to, frames }
    };
    let closed = || {
        vec![
            fragmented("published 16379, host v4", sock(a.host_v4(), 16379)),
            fragmented("published 16379, host v6 (docker-proxy)", sock(a.host_v6(), 16379)),
            fragmented("closed container v4", sock(db.ip(), 6379)),
            fragmented("closed container v6", sock(db.ip6(), 6379)),
        ]
    };
    let exposed = || [fragmented("exposed published 10080, host v4", sock(a.host_v4(), 10080))];

    // Without the agent: the v4 fragments are reassembled and answered. Linux refuses an
    // IPv6 first fragment without the whole TCP header by itself (RFC 8200 4.5: ICMPv6
    // parameter problem), so those are only printed.
    let probes = closed();
    let outcomes = probe_syns(link, &probes, PATIENT);
    for (probe, outcome) in probes.iter().zip(outcomes) {
        println!("without agent: {:<60} {outcome}", probe.what);
        assert!(
            probe.to.is_ipv6() || outcome == Outcome::Answered,
            "test bed broken: {} is {outcome} without the agent, expected answered",
            probe.what
        );
    }
    expect_syns("without agent", link, &exposed(), Outcome::Answered);

    let (agent, _) = agent(&[a.host_end()]);
    expect_syns("with agent", link, &exposed(), Outcome::Answered);
    expect_syns("with agent", link, &closed(), Outcome::Silent);
    agent.unload();
}

/// SYNs under chains of Destination Options headers to a published port on the host's v6
/// address (docker-proxy) and to a closed container's v6 address: a chain longer than the
/// filter walks must be dropped (RFC 9098 lets a filter do so), never taken for "no ports"
/// and passed; a short chain to an exposed port still gets in.
#[test]
fn long_extension_header_chains_reach_no_closed_port() {
    let bed = Bed::new();
    let (a, link, host_mac) = (bed.a(), &bed.link, bed.host_mac);
    let db = bed.closed_db();
    let web = bed.exposed_web();
    let chained = |headers: usize, what: &str, to: SocketAddr| {
        let from = sock(a.v6(), source_port());
        let IpAddr::V6(dst) = to.ip() else { unreachable!() };
        let mut payload = Vec::new();
        for i in 0..headers {
            let next = if i + 1 == headers { IPPROTO_TCP } else { IPPROTO_DSTOPTS };
            payload.extend_from_slice(&raw::v6_dest_options(next));
        }
        payload.extend_from_slice(&raw::tcp(
            from,
            to,
            TCP_SYN,
            0x3000_0000 | u32::from(from.port()),
        ));
        let first = if headers == 0 { IPPROTO_TCP } else { IPPROTO_DSTOPTS };
        let frame = raw::ethernet(
            host_mac,
            link.mac,
            &[],
            ETH_P_IPV6,
            &raw::ipv6(a.v6(), dst, first, &payload),
        );
        SynProbe {
            what: format!("SYN after {headers} dest-options headers to {what}"),
            from,
            to,
            frames: vec![frame],
        }
    };
    // Linux delivers a SYN after up to 12 such headers here (13 and more go unanswered even
    // without the agent). The filter walks MAX_V6_EXTENSIONS: two and one below that, one
    // past it; 16 only shows that longer chains stay harmless.
    let walk = MAX_V6_EXTENSIONS;
    let closed = |lengths: &[usize]| {
        let mut probes = Vec::new();
        for &headers in lengths {
            probes.push(chained(
                headers,
                "published 16379, host v6 (docker-proxy)",
                sock(a.host_v6(), 16379),
            ));
            probes.push(chained(headers, "closed container v6", sock(db.ip6(), 6379)));
        }
        probes
    };
    let exposed = || {
        [
            chained(2, "exposed published 10080, host v6", sock(a.host_v6(), 10080)),
            chained(2, "exposed container v6", sock(web.ip6(), 80)),
        ]
    };

    let lengths = [2, walk - 2, walk - 1, walk + 1, 12];
    expect_syns("without agent", link, &closed(&lengths), Outcome::Answered);
    let (agent, _) = agent(&[a.host_end()]);
    expect_syns("with agent", link, &exposed(), Outcome::Answered);
    let lengths = [2, walk - 2, walk - 1, walk + 1, 12, 16];
    expect_syns("with agent", link, &closed(&lengths), Outcome::Silent);
    agent.unload();
}

// ---------------------------------------------------------------------------------------
// Replies that must never be dropped
// ---------------------------------------------------------------------------------------

/// `ping -c 3` from `from` to `to`: how many replies came back, and the output.
fn ping(from: &Container, to: IpAddr) -> (u32, String) {
    let to = to.to_string();
    let out = from.exec(&["timeout", "10", "ping", "-c", "3", "-W", "2", &to]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let received = text
        .lines()
        .find_map(|l| l.split(", ").find_map(|f| f.strip_suffix(" packets received")?.parse().ok()))
        .unwrap_or(0);
    (received, text)
}

/// A container's ping to an outside host gets its replies, over both families (v4
/// masqueraded, so the replies are judged again at the bridge gate after NAT; v6 routed to
/// the container's own address, judged at XDP).
#[test]
fn container_ping_gets_replies() {
    let bed = Bed::new();
    let a = bed.a();
    let pinger = bed.idle("adv-pinger", 14);
    let check = |context: &str| {
        let mut wrong = Vec::new();
        for to in [IpAddr::from(a.v4()), a.v6().into()] {
            let (received, output) = ping(&pinger, to);
            println!("{context}: ping -c 3 {to}: {received} replies");
            if received != 3 {
                wrong.push(format!("ping -c 3 {to}: {received} replies:\n{output}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{context}: a container's ping lost replies:\n{}",
            wrong.join("\n")
        );
    };
    check("without agent");
    let (agent, _) = agent(&[a.host_end()]);
    check("with agent");
    agent.unload();
}

/// A router between the host and a far host, whose far link has the smaller MTU: the host
/// side is 1500, the router's end of the far link 1280 (the far host's own end stays at
/// 1500, so it advertises an MSS of 1460 and TCP does not dodge the bottleneck). Routes and
/// links go with the namespaces and the host's veth.
struct NarrowPath {
    // Drop order: the far namespace (and the veth into it), then the router.
    far: Netns,
    router: OutsideHost,
}

const FAR_MTU: &str = "1280";

impl NarrowPath {
    fn new() -> Self {
        let router = outside("adv-r", 43);
        let far = Netns::new("guard-e2e-adv-far");
        router.netns().ip(&[
            "link",
            "add",
            "r1",
            "mtu",
            FAR_MTU,
            "type",
            "veth",
            "peer",
            "name",
            "f0",
            "netns",
            far.name(),
        ]);
        let path = Self { far, router };
        let (r, f) = (path.router.netns(), &path.far);
        r.ip(&["link", "set", "r1", "up"]);
        f.ip(&["link", "set", "f0", "up"]);
        r.ip(&["addr", "add", "10.246.43.1/24", "dev", "r1"]);
        r.ip(&["-6", "addr", "add", "fd00:246:43::1/64", "dev", "r1", "nodad"]);
        for n in [2, 3] {
            f.ip(&["addr", "add", &format!("10.246.43.{n}/24"), "dev", "f0"]);
            f.ip(&["-6", "addr", "add", &format!("fd00:246:43::{n}/64"), "dev", "f0", "nodad"]);
        }
        r.run(|| {
            for key in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
                std::fs::write(key, "1").unwrap_or_else(|e| panic!("router: write {key}: {e}"));
            }
        });
        // The host reaches the far subnet through the router; masqueraded v4 comes back to
        // the host's address on the router link, container v6 to the container itself.
        let host = path.router.host_end().to_owned();
        run(
            "ip",
            &["route", "add", "10.246.43.0/24", "via", &path.router.v4().to_string(), "dev", &host],
        );
        run(
            "ip",
            &[
                "-6",
                "route",
                "add",
                "fd00:246:43::/64",
                "via",
                &path.router.v6().to_string(),
                "dev",
                &host,
            ],
        );
        f.ip(&["route", "add", "10.251.43.0/24", "via", "10.246.43.1"]);
        f.ip(&["-6", "route", "add", NET_V6, "via", "fd00:246:43::1"]);
        path
    }

    /// The far host's address number `n` (2 or 3) of `family`'s kind: every phase of a test
    /// uses its own, because a learnt path MTU is cached per destination.
    fn far(n: u16, v6: bool) -> IpAddr {
        if v6 {
            Ipv6Addr::new(0xfd00, 0x246, 0x43, 0, 0, 0, 0, n).into()
        } else {
            Ipv4Addr::new(10, 246, 43, n as u8).into()
        }
    }
}

/// A server on `addr` in `netns` that takes one connection and counts what it receives until
/// the peer closes or `within` passes.
fn byte_sink(netns: PathBuf, addr: SocketAddr, within: Duration) -> JoinHandle<usize> {
    let (bound_tx, bound_rx) = mpsc::channel();
    let sink = thread::spawn(move || {
        in_netns(&netns, || {
            let listener =
                TcpListener::bind(addr).unwrap_or_else(|e| panic!("sink bind {addr}: {e}"));
            listener.set_nonblocking(true).expect("nonblocking listener");
            bound_tx.send(()).unwrap();
            let deadline = Instant::now() + within;
            let mut conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                    Err(_) => return 0,
                }
            };
            conn.set_nonblocking(false).expect("blocking connection");
            let mut total = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return total;
                }
                conn.set_read_timeout(Some(left)).expect("read timeout");
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        })
    });
    bound_rx.recv_timeout(Duration::from_secs(5)).expect("byte sink did not start");
    sink
}

/// Writes `bytes` to `to` within `within`, from the calling thread's namespace; how many the
/// socket took (the sink's count is the truth), or why it could not connect.
fn upload(to: SocketAddr, bytes: usize, within: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + within;
    let mut conn = TcpStream::connect_timeout(&to, PATIENT).map_err(|e| format!("connect: {e}"))?;
    let chunk = vec![0x5au8; 16384];
    let mut sent = 0;
    while sent < bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        conn.set_write_timeout(Some(left)).expect("write timeout");
        match conn.write(&chunk[..chunk.len().min(bytes - sent)]) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
    Ok(sent)
}

/// Path-MTU discovery: a container uploads 512 KB to a far host behind a router whose far
/// link has a smaller MTU. Its 1500-byte segments only get through once it has heard the
/// router's ICMP "fragmentation needed" (v4) or "packet too big" (v6): those are replies, and
/// the whole upload must arrive.
#[test]
fn path_mtu_discovery_through_a_narrow_router() {
    const BYTES: usize = 512 * 1024;
    const WITHIN: Duration = Duration::from_secs(20);
    let bed = Bed::new();
    let uploader = bed.idle("adv-uploader", 14);
    let path = NarrowPath::new();
    // Both families at once: a stalled upload costs the full deadline.
    let check = |context: &str, far: u16| {
        let results: Vec<(SocketAddr, Result<usize, String>, usize)> = thread::scope(|scope| {
            let uploads: Vec<_> = [false, true]
                .map(|v6| {
                    let to = sock(NarrowPath::far(far, v6), 7300);
                    let sink = byte_sink(path.far.path(), to, WITHIN);
                    let netns = uploader.netns_path();
                    scope.spawn(move || {
                        let taken = in_netns(&netns, || upload(to, BYTES, WITHIN));
                        (to, taken, sink.join().expect("byte sink panicked"))
                    })
                })
                .into_iter()
                .collect();
            uploads.into_iter().map(|u| u.join().expect("upload panicked")).collect()
        });
        let mut wrong = Vec::new();
        for (to, taken, got) in results {
            let line = format!(
                "upload of {BYTES} bytes to {to} through MTU {FAR_MTU}: {got} arrived \
                 (the socket took {taken:?})"
            );
            println!("{context}: {line}");
            if got != BYTES {
                wrong.push(format!("{line}, not all within {WITHIN:?}"));
            }
        }
        assert!(wrong.is_empty(), "{context}: path-MTU discovery failed:\n{}", wrong.join("\n"));
    };
    check("without agent", 2);
    let (agent, _) = agent(&[path.router.host_end()]);
    check("with agent", 3);
    agent.unload();
}

/// A container's UDP request to an outside server gets a 4000-byte answer, which arrives in
/// three fragments over the 1500-byte link (v4: masqueraded, reassembled by conntrack and
/// fragmented again towards the bridge; v6: fragmented by the server, addressed to the
/// container itself). Later fragments carry no ports, and must pass all the same.
#[test]
fn fragmented_udp_reply_reaches_the_container() {
    let bed = Bed::new();
    let a = bed.a();
    let client = bed.idle("adv-client", 14);
    let _servers: Vec<EchoServer> = [IpAddr::from(a.v4()), a.v6().into()]
        .map(|ip| a.udp_echo(sock(ip, 7400), SERVER_LIFETIME))
        .into();
    let request = vec![0x42u8; 4000];
    let check = |context: &str| {
        let mut wrong = Vec::new();
        for server in [IpAddr::from(a.v4()), a.v6().into()] {
            let remote = sock(server, 7400);
            let local = sock(tests::probe::unspecified(remote), 0);
            let reply =
                in_netns(&client.netns_path(), || udp_roundtrip(local, remote, &request, PATIENT));
            let got = reply.as_ref().map_or(0, Vec::len);
            println!(
                "{context}: {} byte UDP reply from {remote}: {got} bytes arrived",
                request.len()
            );
            if reply.as_deref() != Some(&request[..]) {
                wrong.push(format!("UDP reply from {remote}: {got} of {} bytes", request.len()));
            }
        }
        assert!(wrong.is_empty(), "{context}: fragmented replies lost:\n{}", wrong.join("\n"));
    };
    check("without agent");
    let (agent, _) = agent(&[a.host_end()]);
    check("with agent");
    agent.unload();
}

/// An idle TCP connection from `client` (its namespace) to a server `host` runs on `addr`:
/// (client end, server end), after one message from the server has arrived.
fn idle_connection(
    client: &Container,
    host: &OutsideHost,
    addr: SocketAddr,
) -> (TcpStream, TcpStream) {
    let listener =
        host.netns().run(|| TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let client_end = in_netns(&client.netns_path(), || TcpStream::connect_timeout(&addr, PATIENT))
        .unwrap_or_else(|e| panic!("{} cannot connect to {addr}: {e}", client.name()));
    // The handshake completed, so the connection is in the accept queue.
    let (server_end, _) = listener.accept().expect("accept the idle connection");
    (client_end, server_end)
}

/// Sends `message` from the server end and reads it at the client end (bounded).
fn server_says(ends: &mut (TcpStream, TcpStream), message: &[u8]) -> Result<(), String> {
    ends.1.write_all(message).map_err(|e| format!("server write: {e}"))?;
    ends.0.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    let mut got = vec![0u8; message.len()];
    ends.0.read_exact(&mut got).map_err(|e| format!("client read: {e}"))?;
    if got == message { Ok(()) } else { Err(format!("client read {got:?}")) }
}

/// A spoofed-SYN flood at an exposed published port (random sources, each SYN-ACK the
/// container answers is an outbound flow) while a container holds idle outbound connections
/// to an outside server, over both families: after the flood the server's next message still
/// reaches the container. Outsiders must not be able to evict what real replies need.
///
/// Every spoofed SYN goes out twice, as a client's retransmission would: the container
/// answers both, so whatever remembers its SYN-ACKs sees each flood flow used again, the way
/// a real flow is. That is what pushes real entries out of a least-recently-used memory; a
/// flood of flows seen once only evicts its own kind.
#[test]
fn spoofed_syn_flood_does_not_cut_idle_connections() {
    const FLOWS: u32 = 40_000;
    let bed = Bed::new();
    let (a, link, host_mac) = (bed.a(), &bed.link, bed.host_mac);
    let _web = bed.exposed_web();
    let idle = bed.idle("adv-idle", 14);
    // The spoofed sources live behind A: every SYN-ACK goes to A, which drops it (it does
    // not forward), and nothing leaves the test bed. The route goes with A's veth.
    run("ip", &["route", "add", "10.245.0.0/16", "via", &a.v4().to_string(), "dev", a.host_end()]);
    let (agent, _) = agent(&[a.host_end()]);

    let mut connections: Vec<(SocketAddr, (TcpStream, TcpStream))> =
        [IpAddr::from(a.v4()), a.v6().into()]
            .map(|ip| sock(ip, 7500))
            .map(|addr| (addr, idle_connection(&idle, a, addr)))
            .into();
    for (addr, ends) in &mut connections {
        server_says(ends, b"before the flood\n")
            .unwrap_or_else(|e| panic!("idle connection to {addr} broken before any flood: {e}"));
    }

    // The flood: FLOWS spoofed SYNs, each sent twice, at about 10,000 frames a second.
    let target = sock(a.host_v4(), 10080);
    let mut rng = XorShift::new(0x5eed);
    let started = Instant::now();
    for i in 0..FLOWS {
        let r = rng.next_u32();
        let src = Ipv4Addr::new(10, 245, (r >> 8) as u8, r as u8);
        let from = sock(src, 1024 + (r >> 16) as u16 % 60_000);
        let frame = syn_frame(host_mac, link.mac, &[], from, target);
        link.send(&frame);
        link.send(&frame);
        if i % 250 == 249 {
            thread::sleep(Duration::from_millis(50));
        }
    }
    let took = started.elapsed();
    println!("flood: {FLOWS} spoofed SYNs, each twice, to {target} in {took:.1?}");
    thread::sleep(Duration::from_secs(1));

    let mut wrong = Vec::new();
    for (addr, ends) in &mut connections {
        let result = server_says(ends, b"after the flood\n");
        println!("idle connection to {addr} after the flood: {result:?}");
        if let Err(e) = result {
            wrong.push(format!("server {addr}'s message after the flood did not arrive: {e}"));
        }
    }
    assert!(wrong.is_empty(), "a spoofed-SYN flood cut idle connections:\n{}", wrong.join("\n"));
    drop(connections);
    agent.unload();
}
