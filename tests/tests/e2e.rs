//! End to end, the scenario: a compose-like project on a real dockerd, two outside
//! hosts on their own links, and the `guard` agent on the host ends of those links. The
//! project, the outside hosts and every check live in `tests::seed`, which the containerised
//! agent's tests (container.rs) run too.
//!
//! Needs root, a running dockerd and the busybox test image; `cargo xtask test` provides all
//! three and runs these tests one at a time (`--test-threads=1`): they share the dockerd,
//! the addresses below and the host's forwarding settings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tests::agent::Agent;
use tests::bed::{Bed, BedSpec, Gateway};
use tests::docker::{Container, ContainerSpec, Engine};
use tests::netns::{OutsideHost, in_netns};
use tests::probe::Outcome::{Answered, Silent};
use tests::probe::{PATIENT, Proto, QUICK, tcp_roundtrip, udp_roundtrip};
use tests::seed::SeedBed;

/// Step 1 of the issue: without the agent, the test bed must show the exposure, or the
/// other tests prove nothing. On Docker 20.10 outside hosts reach every container port,
/// published or not, by container address and through every host address; Docker 28 drops
/// direct routing to containers itself, and every published port stays open to everyone
/// through every host address.
#[test]
fn without_agent_outside_hosts_reach_every_container_port() {
    let bed = SeedBed::new();
    bed.check_outside(false);
    bed.check_inside();
}

/// Step 2: with the agent on the uplinks, outside hosts reach only what the labels open
/// (web:443/tcp and dns:53/udp for everyone, reports:9000 for A), by any path and over both
/// families, while the host, the containers and the containers' outbound connections are
/// untouched. Step 3: unloading leaves no pins and no XDP program.
#[test]
fn with_agent_outside_hosts_reach_only_what_labels_open() {
    let bed = SeedBed::new();
    let db = bed.db_exposed_to_a();
    assert!(
        bed.a.tcp_connect(db, PATIENT),
        "test bed broken: A cannot reach {db} before the agent runs"
    );

    let agent = Agent::start(&bed.uplinks());
    bed.check_outside(true);
    bed.check_status_paths(&agent.status_json());
    bed.check_inside();

    let pin_dir = agent.pin_dir().to_owned();
    agent.unload();
    assert!(!pin_dir.exists(), "{} survived guard unload", pin_dir.display());
    bed.check_no_xdp();
}

/// Docker 28's gateway mode `nat-unprotected` (NAT, but no drop of what is routed straight
/// to a container): without the agent outside hosts reach every container port by address
/// and every published port, as on 20.10; with it, only what the labels open. Guard is the
/// only protection there, and closed stays the default. On 20.10 every network is like this.
#[test]
fn on_a_nat_unprotected_network_the_agent_alone_closes_what_labels_do_not_open() {
    let bed = SeedBed::guard_only();
    bed.check_outside(false);
    let agent = Agent::start(&bed.uplinks());
    bed.check_outside(true);
    bed.check_status_paths(&agent.status_json());
    bed.check_inside();
    agent.unload();
}

/// Lifecycle: a stopped agent leaves its pinned protection in force; `guard unload` then
/// removes everything and the host is back to how it was found (exposed, here).
#[test]
fn stopped_agent_keeps_protection_until_unloaded() {
    let bed = SeedBed::new();
    let db = SocketAddr::new(bed.project.db.ip().into(), 5432);

    let mut agent = Agent::start(&bed.uplinks());
    assert_eq!(bed.a.tcp_outcome(db, QUICK), Silent, "{db} not dropped while the agent runs");
    agent.terminate();
    bed.check_stopped_agent_protects();

    agent.unload();
    bed.check_unloaded();
}

/// Docker 28's gateway mode `routed` for IPv4, in DESIGN terms: no NAT, so the exposure is
/// the container's address and port (Docker maps no host port; it opens the published
/// container ports to direct routing from any source and drops the rest), and containers'
/// outbound connections are not masqueraded, so their replies arrive on an uplink addressed
/// to the container itself, which the agent must let through (its TC egress program remembers
/// the flows). Without the agent outside host A reaches both published ports; with it, only
/// the labelled one, and api's outbound TCP and UDP still get their replies. On 20.10, which
/// has no gateway modes, the network is an ordinary NAT one: every direct path is open without
/// the agent and outbound connections are masqueraded.
#[test]
fn on_a_routed_network_only_labelled_container_ports_are_open_and_replies_pass() {
    const SUBNET: &str = "10.249.60.0/24";
    let routed = Engine::current().has_gateway_modes();
    let bed = Bed::new(BedSpec {
        network: "guard-e2e-routed",
        subnet_v4: SUBNET,
        outside: &[("rt", 60)],
        gateway: Gateway::Routed,
        ..Default::default()
    });
    let ip = |host| Ipv4Addr::new(10, 249, 60, host);
    let _web = bed.run(ContainerSpec {
        name: "rt-web",
        ip: Some(ip(10)),
        labels: &[("guard.expose", "443/tcp")],
        publish: &["20443:443", "20444:8443"],
        command: "httpd -p 443 -h /www && exec httpd -f -p 8443 -h /www",
        listens_on: &[443, 8443],
        ..Default::default()
    });
    let api = bed.run(ContainerSpec {
        name: "rt-api",
        ip: Some(ip(11)),
        command: "exec httpd -f -p 8080 -h /www",
        listens_on: &[8080],
        ..Default::default()
    });
    let a = bed.a();

    // (what, address, open without the agent, open with it)
    let targets = [
        ("web:443 published, labelled", SocketAddr::from((ip(10), 443)), true, true),
        ("web:8443 published", SocketAddr::from((ip(10), 8443)), true, false),
        ("api:8080 unpublished", SocketAddr::from((ip(11), 8080)), !routed, false),
    ];
    let mut wrong = Vec::new();
    for (phase, guarded) in [("without the agent", false), ("with the agent", true)] {
        let agent = guarded.then(|| Agent::start(&[a.host_end()]));
        for (what, addr, open_unguarded, open_guarded) in targets {
            let open = if guarded { open_guarded } else { open_unguarded };
            let expected = if open { Answered } else { Silent };
            let outcome = a.tcp_outcome(addr, if open { PATIENT } else { QUICK });
            let line = format!("{phase}: A -> {what:<28} {addr:<18} {outcome}");
            println!("{line}");
            if outcome != expected {
                wrong.push(format!("{line}, expected {expected}"));
            }
        }
        wrong.extend(outbound_from(&api, a, if routed { ip(11) } else { a.host_v4() }));
        if let Some(agent) = agent {
            agent.unload();
        }
    }
    assert!(wrong.is_empty(), "on the routed network:\n{}", wrong.join("\n"));
}

/// `from`'s outbound TCP and UDP to outside host A: A must see them from `seen_as`, and
/// the replies must come back. Returns what went wrong.
fn outbound_from(from: &Container, a: &OutsideHost, seen_as: Ipv4Addr) -> Vec<String> {
    let remote = SocketAddr::from((a.v4(), 7000));
    let local = SocketAddr::from(([0, 0, 0, 0], 0));
    let payload = b"e2e-routed-outbound";
    let mut wrong = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let (echo, reply) = match proto {
            Proto::Tcp => {
                let echo = a.tcp_echo(remote, Duration::from_secs(30));
                let reply =
                    in_netns(&from.netns_path(), || tcp_roundtrip(local, remote, payload, PATIENT));
                (echo, reply)
            }
            Proto::Udp => {
                let echo = a.udp_echo(remote, Duration::from_secs(30));
                let reply =
                    in_netns(&from.netns_path(), || udp_roundtrip(local, remote, payload, PATIENT));
                (echo, reply)
            }
        };
        let peers = echo.peers();
        let seen = peers.first().map_or("nothing".into(), ToString::to_string);
        let answered = reply.as_deref() == Some(payload.as_slice());
        println!(
            "{} {proto} to {remote} (A saw {seen}): {}",
            from.name(),
            if answered { "reply received" } else { "NO REPLY" }
        );
        if peers.first().map(SocketAddr::ip) != Some(IpAddr::from(seen_as)) {
            wrong.push(format!("{proto}: A saw {peers:?}, expected {seen_as}"));
        }
        if !answered {
            wrong.push(format!("{proto} to {remote} (A saw {seen}): no reply"));
        }
    }
    wrong
}
