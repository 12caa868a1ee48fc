//! Lifecycle and faults (issue 4), one module per concern: crash and restart (`crash`), the
//! start race (`start_race`), identity and the Docker daemon's restart (`identity`), a storm
//! and bad input (`input`), interfaces (`interfaces`), unload (`unload`), boot and the agent
//! away (`reboot`); the pieces they share are here. Each test runs against the real dockerd
//! and outside hosts in network namespaces, through the test-bed library in tests/src. One
//! binary, not one per module: each test binary costs a link of the whole test bed.
//!
//! Needs root, a running dockerd and the busybox test image; `cargo xtask test --tier e2e`
//! provides all three and runs the tests one at a time. Every test has its own Docker
//! network (10.252.N.0/24), its own outside host (10.251.N.0/24, N = 11..) and its own agent
//! pin directory, and every wait is bounded.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use tests::agent::Agent;
use tests::bed::outside_host;
use tests::boot;
use tests::cmd::{run, try_run};
use tests::docker::{Container, ContainerSpec, Network, docker};
use tests::dockerd::DockerdOutage;
use tests::frames::{self, TCP_SYN, Tcp};
use tests::host::RoutingHost;
use tests::netns::{LINK_PREFIX, OutsideHost, ifindex, in_netns, xdp_attached};
use tests::observe::{self, GuardObjects};
use tests::probe::{self, PATIENT, Proto, QUICK};
use tests::prober::{Attempt, Outcome, ProbeReport, Prober, summarize};
use tests::tun::Tun;
use tests::wait::{poll, wait_until};
use tests::{Exclusive, prepare_test_bed};

mod crash;
mod identity;
mod input;
mod interfaces;
mod reboot;
mod start_race;
mod unload;

// ---------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------

/// A container command serving busybox httpd on `ports` that also stops at once on SIGTERM
/// (`docker restart`, a daemon shutdown): a shell as PID 1 ignores SIGTERM unless it traps
/// it, and Docker would wait its full 10 s grace period for every container.
fn serve(ports: &[u16]) -> String {
    let mut command = String::from("trap 'exit 0' TERM; ");
    for port in ports {
        command.push_str(&format!("httpd -p {port} -h /www; "));
    }
    command.push_str("sleep 1000000 & wait");
    command
}

/// A container on `net` at `ip` serving `ports` (waited for), with its labels, `-p` arguments
/// and restart policy.
fn serving(
    net: &Network,
    name: &str,
    ip: Ipv4Addr,
    labels: &[(&str, &str)],
    publish: &[&str],
    ports: &[u16],
    restart: Option<&str>,
) -> Container {
    Container::run(ContainerSpec {
        name,
        network: Some(net),
        ip: Some(ip),
        labels,
        publish,
        command: &serve(ports),
        listens_on: ports,
        restart,
        ..Default::default()
    })
}

/// One container on a Docker network of its own: network `guard-e2e-lc-NAME`, 10.252.N.0/24,
/// container `NAME-app` at 10.252.N.10 serving `ports`.
struct App {
    // Field order is drop order: the container goes before its network.
    _container: Container,
    net: Network,
    ip: Ipv4Addr,
}

impl App {
    fn start(name: &str, n: u8, labels: &[(&str, &str)], ports: &[u16]) -> Self {
        let net =
            Network::create(&format!("guard-e2e-lc-{name}"), &format!("10.252.{n}.0/24"), None);
        let ip = Ipv4Addr::new(10, 252, n, 10);
        let container = serving(&net, &format!("{name}-app"), ip, labels, &[], ports, None);
        App { _container: container, net, ip }
    }

    fn subnet(&self) -> &str {
        &self.net.subnet_v4
    }
}

/// What most tests here start from: the test bed held, one [`App`] named `name` on
/// 10.252.N.0/24, the host routing, and outside host A (`name` too, numbered `outside_n`)
/// that routes the App's subnet via the host. Field order is drop order.
struct AppBed {
    a: OutsideHost,
    _routing: RoutingHost,
    app: App,
    _exclusive: Exclusive,
}

impl AppBed {
    fn start(name: &str, n: u8, outside_n: u8, labels: &[(&str, &str)], ports: &[u16]) -> Self {
        let exclusive = prepare_test_bed();
        let app = App::start(name, n, labels, ports);
        let routing = RoutingHost::enable();
        let a = outside_host(name, outside_n, &[app.subnet()]);
        AppBed { a, _routing: routing, app, _exclusive: exclusive }
    }
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// One TCP reachability expectation from an outside host.
struct Expect {
    what: String,
    addr: SocketAddr,
    open: bool,
}

fn expect(what: impl Into<String>, addr: SocketAddr, open: bool) -> Expect {
    Expect { what: what.into(), addr, open }
}

/// Probes every expectation from `from` at once (silence costs the full timeout, so they run
/// in parallel); prints each line and panics listing the ones that went the wrong way. Open
/// means answered; closed means silent (dropped), never refused (a RST got through).
fn check(from: &OutsideHost, context: &str, expectations: &[Expect]) {
    let targets: Vec<_> = expectations
        .iter()
        .map(|e| (Proto::Tcp, e.addr, if e.open { PATIENT } else { QUICK }))
        .collect();
    let outcomes = from.outcome_all(&targets);
    let mut wrong = Vec::new();
    for (e, outcome) in expectations.iter().zip(outcomes) {
        let line = format!("{context}: {:<40} {:<22} {outcome}", e.what, e.addr.to_string());
        println!("{line}");
        let expected = if e.open { probe::Outcome::Answered } else { probe::Outcome::Silent };
        if outcome != expected {
            wrong.push(format!("{line}, expected {expected}"));
        }
    }
    assert!(wrong.is_empty(), "outside reachability is wrong:\n{}", wrong.join("\n"));
}

/// Before the agent runs, `from` must reach `closed` (the test bed reproduces the exposure),
/// or "blocked" later proves nothing.
fn require_exposure(from: &OutsideHost, closed: &[SocketAddr]) {
    for addr in closed {
        assert!(
            from.tcp_connect(*addr, PATIENT),
            "test bed broken: {addr} is not reachable from outside even without the agent"
        );
    }
}

/// Waits (bounded) until `from` completes a handshake with `addr`: an opening that must come.
fn wait_reachable(from: &OutsideHost, what: &str, addr: SocketAddr, within: Duration) -> Duration {
    wait_until(format!("{what} ({addr}) reachable from outside"), within, || {
        from.tcp_connect(addr, Duration::from_millis(300))
    })
}

/// The lines of `log` that mention every one of `needles`.
fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines().filter(|l| needles.iter().all(|n| l.contains(n))).collect()
}

/// Waits until `guard status --json` reports maps in sync (pending_changes 0) and, if given,
/// exactly `containers` (names) among those whose name starts with `prefix`; returns the
/// last report.
fn wait_in_sync(
    agent: &Agent,
    prefix: &str,
    containers: Option<&BTreeSet<String>>,
    within: Duration,
) -> serde_json::Value {
    let mut last = None;
    let synced = poll(within, || {
        let Ok(status) = observe::status_json(agent.pin_dir()) else { return false };
        let names: BTreeSet<String> = observe::status_containers(&status)
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect();
        let ok = observe::pending_changes(&status) == Some(0)
            && containers.is_none_or(|want| *want == names);
        last = Some(status);
        ok
    });
    let last = last.unwrap_or_default();
    assert!(
        synced.is_some(),
        "guard status did not settle within {within:?} (pending_changes 0{}):\n{last:#}",
        containers.map_or(String::new(), |c| format!(", containers {c:?}"))
    );
    last
}

/// Names of running containers (all of them, not only the test's).
fn docker_ps_names() -> BTreeSet<String> {
    docker(&["ps", "--format", "{{.Names}}"]).lines().map(str::to_owned).collect()
}
