//! End to end, the scenario: a compose-like project on a real dockerd, two outside
//! hosts on their own links, and the `guard` agent on the host ends of those links. The
//! project, the outside hosts and every check live in `tests::seed`, which the containerised
//! agent's tests (container.rs) run too.
//!
//! Needs root, a running dockerd and the busybox test image; `cargo xtask test` provides all
//! three and runs these tests one at a time (`--test-threads=1`): they share the dockerd,
//! the addresses below and the host's forwarding settings.

use std::net::SocketAddr;

use tests::agent::Agent;
use tests::netns::xdp_attached;
use tests::probe::Outcome::Silent;
use tests::probe::{PATIENT, QUICK};
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
    bed.check_inside();

    let pin_dir = agent.pin_dir().to_owned();
    agent.unload();
    assert!(!pin_dir.exists(), "{} survived guard unload", pin_dir.display());
    for uplink in bed.uplinks() {
        assert!(!xdp_attached(uplink), "an XDP program is still attached to {uplink}");
    }
}

/// Lifecycle: a stopped agent leaves its pinned protection in force; `guard unload` then
/// removes everything and the host is back to how it was found (exposed, here).
#[test]
fn stopped_agent_keeps_protection_until_unloaded() {
    let bed = SeedBed::new();
    let db = SocketAddr::new(bed.project.db.ip().into(), 5432);
    let db_published = SocketAddr::new(bed.a.host_v4().into(), 5432);

    let mut agent = Agent::start(&bed.uplinks());
    assert_eq!(bed.a.tcp_outcome(db, QUICK), Silent, "{db} not dropped while the agent runs");
    agent.terminate();
    assert_eq!(
        bed.a.tcp_outcome(db, QUICK),
        Silent,
        "{db} not dropped once the agent stopped: protection lost"
    );
    assert_eq!(
        bed.a.tcp_outcome(db_published, QUICK),
        Silent,
        "{db_published} not dropped once the agent stopped: protection lost"
    );
    for uplink in bed.uplinks() {
        assert!(xdp_attached(uplink), "the stopped agent took its XDP program off {uplink}");
    }

    agent.unload();
    for uplink in bed.uplinks() {
        assert!(!xdp_attached(uplink), "an XDP program is still attached to {uplink}");
    }
    let exposed = bed.db_exposed_to_a();
    assert!(
        bed.a.tcp_connect(exposed, PATIENT),
        "after unload A reaches {exposed} again, as before the agent"
    );
}
