//! A real multi-node Docker Swarm (Docker Engine 28 daemons in network namespaces on one LAN,
//! tests/src/swarm.rs) and the engine's own doors (issue 20): the overlay's VXLAN port, Swarm's
//! control ports and the Docker API on tcp are open to the swarm's nodes and the operator's
//! prefixes only, and the swarm keeps working with guard on every node.
//!
//! Run by `cargo xtask test` (and `--engine docker28`), which unpacks Docker 28 and names it in
//! GUARD_TEST_DOCKER28_ROOT.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use tests::agent::Agent;
use tests::observe::http_get;
use tests::probe::{self, Outcome};
use tests::swarm::{
    self, ADMIN, API_PORT, METRICS_ADDR, OUTSIDE, Swarm, SwarmOptions, VXLAN_PORT, node_addr,
};
use tests::{patience, prepare_test_bed};

/// An overlay container's fixed address, and the UDP port a test listens on in it.
const SINK_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 50);
const SINK_PORT: u16 = 9999;
/// The same on n2.
const SINK2_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 51);

/// What `guard explain` says of an engine door from a source outside the swarm.
fn drop_door() -> (String, String) {
    ("drop".to_owned(), "management_port".to_owned())
}

/// What it says of an engine door from a swarm member.
fn pass_member() -> (String, String) {
    ("pass".to_owned(), "allowed_source".to_owned())
}
/// How long an injection is repeated before it counts as delivered or not: delivery takes
/// milliseconds; the margin is for a loaded machine.
fn injection_window() -> Duration {
    patience(Duration::from_secs(4))
}

/// A policy file of the test's own (the machine's /etc/container-guard must not decide),
/// removed on drop.
struct Policy {
    path: PathBuf,
}

impl Policy {
    fn new(tag: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "{}{tag}-{}.toml",
            swarm::POLICY_PREFIX,
            std::process::id()
        ));
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        Self { path }
    }

    fn arg(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// `guard run --iface eth0` on `node` with the test's policy file, metrics on the node's own
/// loopback and a quick resync.
fn agent_on(swarm: &Swarm, node: &str, policy: &Policy, extra: &[&str]) -> Agent {
    let config = policy.arg();
    let mut args =
        vec!["--config", &config, "--metrics-addr", METRICS_ADDR, "--resync-interval", "1"];
    args.extend_from_slice(extra);
    Agent::start_in(swarm.node(node).place(), &["eth0"], &args)
}

/// The agent's /metrics, read inside `node`'s namespace.
fn metrics_of(swarm: &Swarm, node: &str) -> String {
    let addr: SocketAddr = METRICS_ADDR.parse().unwrap();
    swarm
        .node(node)
        .host()
        .run(|| http_get(addr, "/metrics"))
        .unwrap_or_else(|e| panic!("metrics of the agent on {node}: {e}"))
}

/// The sum of `guard_packets_total` over the series with `reason`.
fn packets_with_reason(metrics: &str, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("guard_packets_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `wget` from a task's container to another task's web server over the overlay; "ok" is
/// /www/index.html of the test image.
fn fetch_over_overlay(swarm: &Swarm, from: &swarm::Task, to: &swarm::Task) -> Result<(), String> {
    let url = format!("http://{}:8080/", to.overlay_ip);
    let node = swarm.node(&from.node);
    // busybox wget -T segfaults in this image: bound it with timeout instead.
    let out = node.docker_output(&[
        "exec",
        &from.container,
        "timeout",
        "5",
        "wget",
        "-q",
        "-O",
        "-",
        &url,
    ]);
    let body = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && body.trim() == "ok" {
        Ok(())
    } else {
        Err(format!(
            "{} on {} fetching {url} ({} on {}): {} {body:?} {}",
            from.container,
            from.node,
            to.container,
            to.node,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Retries [`fetch_over_overlay`] for a while: a new task's overlay peers reach the other
/// nodes by gossip within seconds.
fn wait_for_fetch(swarm: &Swarm, from: &swarm::Task, to: &swarm::Task) {
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    loop {
        match fetch_over_overlay(swarm, from, to) {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("over the overlay: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The web service the swarm tests run: busybox httpd on 8080 of each task.
const WEB: &str = "httpd -f -p 8080 -h /www";

#[test]
fn without_guard_a_vxlan_frame_from_outside_reaches_an_overlay_container() {
    let _bed = prepare_test_bed();
    let swarm = Swarm::start(SwarmOptions::default());
    let sink = swarm.run_on("n1", "sink", SINK_IP, "sleep 600");
    let n1 = swarm.node("n1");
    assert!(
        swarm.injection_delivered(swarm.outside(), n1, &sink, SINK_PORT, injection_window()),
        "a UDP datagram in VXLAN (VNI {}) from {OUTSIDE} to {}:{VXLAN_PORT} did not reach {} \
         ({SINK_IP}:{SINK_PORT}) on the overlay: the baseline the guard tests rest on is gone",
        swarm.vni(),
        n1.addr(),
        sink.name()
    );
}

#[test]
fn with_guard_the_overlay_is_closed_to_outside_and_the_swarm_keeps_working() {
    let _bed = prepare_test_bed();
    let mut swarm = Swarm::start(SwarmOptions::default());
    // n3 will join while guard runs: joining is a call to a manager's 2377, which is open to
    // the nodes and to [management] prefixes only, so the operator names where the new node
    // comes from. As `admin`, which admits it to 2377 and nothing else: its overlay and gossip
    // must be opened by the membership guard learns from the engine once it has joined.
    let n3_addr = node_addr(3);
    let policy = Policy::new("overlay", &format!("[management]\nadmin = [\"{n3_addr}/32\"]\n"));
    let sink = swarm.run_on("n1", "sink", SINK_IP, "sleep 600");
    let sink2 = swarm.run_on("n2", "sink2", SINK2_IP, "sleep 600");
    let web = swarm.service("web", 2, &[], WEB);
    let tasks = web.wait_for_tasks_on(&swarm, &["n1", "n2"], patience(Duration::from_secs(60)));
    let a1 = agent_on(&swarm, "n1", &policy, &[]);
    let a2 = agent_on(&swarm, "n2", &policy, &[]);
    let guarded_since = Instant::now();

    // The attacker's door: closed.
    let n1 = swarm.node("n1");
    assert!(
        !swarm.injection_delivered(swarm.outside(), n1, &sink, SINK_PORT, injection_window()),
        "with guard on n1, a VXLAN frame from {OUTSIDE} to {}:{VXLAN_PORT} still reached {} on \
         the overlay\n{}",
        n1.addr(),
        sink.name(),
        a1.status()
    );
    assert_eq!(
        a1.explain(&OUTSIDE.to_string(), &format!("{}:{VXLAN_PORT}/udp", n1.addr())),
        ("drop".to_owned(), "management_port".to_owned()),
        "explain of VXLAN from outside on n1"
    );
    assert_eq!(
        a1.explain(&node_addr(2).to_string(), &format!("{}:{VXLAN_PORT}/udp", n1.addr())),
        ("pass".to_owned(), "allowed_source".to_owned()),
        "explain of VXLAN from n2 on n1"
    );
    // Gossip and the manager's control port: the nodes' only.
    for door in ["7946/tcp", "7946/udp", "2377/tcp"] {
        let dst = format!("{}:{door}", n1.addr());
        let from_outside = a1.explain(&OUTSIDE.to_string(), &dst);
        assert_eq!(from_outside, drop_door(), "explain of {dst} from outside on n1");
        let from_n2 = a1.explain(&node_addr(2).to_string(), &dst);
        assert_eq!(from_n2, pass_member(), "explain of {dst} from n2 on n1");
    }
    // Each node guards its own: n2's overlay is closed to outside too.
    let n2 = swarm.node("n2");
    assert!(
        !swarm.injection_delivered(swarm.outside(), n2, &sink2, SINK_PORT, injection_window()),
        "with guard on n2, a VXLAN frame from {OUTSIDE} to {}:{VXLAN_PORT} still reached {}\n{}",
        n2.addr(),
        sink2.name(),
        a2.status()
    );

    // The swarm's own overlay: both ways.
    let (t1, t2) = (&tasks[0], &tasks[1]);
    wait_for_fetch(&swarm, t2, t1);
    wait_for_fetch(&swarm, t1, t2);

    // A third node joins while guard runs on n1 and n2, and takes a task.
    let vxlan_on_n1 = format!("{}:{VXLAN_PORT}/udp", node_addr(1));
    assert_eq!(
        a1.explain(&n3_addr.to_string(), &vxlan_on_n1),
        ("drop".to_owned(), "management_port".to_owned()),
        "explain of VXLAN from {n3_addr} on n1 before it joins"
    );
    let n3 = swarm.add_node("n3");
    swarm.join(&n3);
    swarm.adopt(n3);
    swarm.wait_until_ready(&["n1", "n2", "n3"], patience(Duration::from_secs(60)));
    // Learned from the engine within a second of its knowing the node (the agent asks every
    // second); a margin for a loaded machine.
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    loop {
        let verdict = a1.explain(&n3_addr.to_string(), &vxlan_on_n1);
        if verdict == ("pass".to_owned(), "allowed_source".to_owned()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VXLAN from {n3_addr} on n1 after it joined: {verdict:?}\n{}",
            a1.status()
        );
        thread::sleep(Duration::from_millis(200));
    }
    swarm.docker("n1", &["service", "scale", "--detach", &format!("{}=3", web.name())]);
    let tasks =
        web.wait_for_tasks_on(&swarm, &["n1", "n2", "n3"], patience(Duration::from_secs(60)));
    wait_for_fetch(&swarm, &tasks[2], &tasks[0]);
    wait_for_fetch(&swarm, &tasks[0], &tasks[2]);
    wait_for_fetch(&swarm, &tasks[2], &tasks[1]);

    // Gossip and raft: after 30 s of guard every node is still Ready (a node whose heartbeats
    // are dropped is Down within about 15 s).
    let settle = Duration::from_secs(30).saturating_sub(guarded_since.elapsed());
    thread::sleep(settle);
    let states = swarm.node_states();
    assert!(
        states.len() == 3 && states.iter().all(|(_, s)| s == "Ready"),
        "after 30 s of guard on n1 and n2, `docker node ls`: {states:?}\n{}\n{}",
        a1.log(),
        a2.log()
    );
    drop(web);
    a2.unload();
    a1.unload();
}

#[test]
fn docker_api_on_tcp_is_closed_from_outside_and_open_from_an_admin_prefix() {
    let _bed = prepare_test_bed();
    let swarm = Swarm::start(SwarmOptions { api_on_tcp: true });
    let n1 = swarm.node("n1");
    let api = SocketAddr::from((n1.addr(), API_PORT));
    let version = |from: &swarm::LanHost| from.run(|| http_get(api, "/version"));
    // The baseline: without guard, anyone on the LAN is root on n1.
    version(swarm.outside()).unwrap_or_else(|e| panic!("baseline, without guard: {e}"));

    let policy = Policy::new("api", &format!("[management]\nadmin = [\"{ADMIN}/32\"]\n"));
    let agent = agent_on(&swarm, "n1", &policy, &[]);
    let from_outside = swarm.outside().run(|| probe::tcp_outcome(api, Duration::from_secs(3)));
    assert_eq!(
        from_outside,
        Outcome::Silent,
        "{OUTSIDE} (not an admin) connecting to the plain-text API at {api}; explain says {:?}\n{}",
        agent.explain(&OUTSIDE.to_string(), &format!("{api}/tcp")),
        agent.status()
    );
    let body = version(swarm.admin())
        .unwrap_or_else(|e| panic!("{ADMIN} (admin) GET /version on {api}: {e}"));
    assert!(body.contains("ApiVersion"), "GET /version from {ADMIN}: {body}");
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains(&API_PORT.to_string())),
        "no ERROR naming the plain-text API listener on port {API_PORT}:\n{log}"
    );
    agent.unload();
}

#[test]
fn audit_mode_and_enforce_false_leave_the_doors_open_and_counted() {
    let _bed = prepare_test_bed();
    let swarm = Swarm::start(SwarmOptions::default());
    let sink = swarm.run_on("n1", "sink", SINK_IP, "sleep 600");
    let n1 = swarm.node("n1");
    let vxlan = format!("{}:{VXLAN_PORT}/udp", n1.addr());

    let empty = Policy::new("audit", "");
    let agent = agent_on(&swarm, "n1", &empty, &["--mode", "audit"]);
    assert!(
        swarm.injection_delivered(swarm.outside(), n1, &sink, SINK_PORT, injection_window()),
        "in audit mode a VXLAN frame from {OUTSIDE} was not delivered\n{}",
        agent.status()
    );
    let metrics = metrics_of(&swarm, "n1");
    assert!(
        packets_with_reason(&metrics, "management_port") >= 1.0,
        "audit mode did not count the VXLAN frames from outside as management_port:\n{metrics}"
    );
    agent.unload();

    let off = Policy::new("off", "[management]\nenforce = false\n");
    let agent = agent_on(&swarm, "n1", &off, &[]);
    assert!(
        swarm.injection_delivered(swarm.outside(), n1, &sink, SINK_PORT, injection_window()),
        "with [management] enforce = false a VXLAN frame from {OUTSIDE} was not delivered\n{}",
        agent.status()
    );
    assert_eq!(
        agent.explain(&OUTSIDE.to_string(), &vxlan),
        ("pass".to_owned(), "not_container_bound".to_owned()),
        "explain of VXLAN from outside with enforce = false"
    );
    agent.unload();
    // Keep the sink until the agents are gone (drop order).
    drop(sink);
}

/// Waits until `from` gets `want` connecting to `addr` (1 s per try); panics with `what` and
/// `context()`.
fn wait_for_outcome(
    from: &swarm::LanHost,
    addr: SocketAddr,
    want: Outcome,
    what: &str,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    loop {
        let got = from.run(|| probe::tcp_outcome(addr, Duration::from_secs(1)));
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {addr} from {}: {got}, not {want}\n{}",
            from.addr(),
            context()
        );
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_stack_runs_one_agent_per_node_and_each_protects_its_node() {
    let _bed = prepare_test_bed();
    // The agent's image, built on the machine's dockerd (`cargo xtask image`), then loaded
    // into every node.
    tests::container_agent::build_image();
    let swarm = Swarm::start(SwarmOptions::default());
    // Published in host mode (no ingress mesh here: no IP_VS) on port 18080 of the node that
    // runs each task, one task per node.
    let web = swarm.service("hweb", 2, &["--publish=mode=host,published=18080,target=8080"], WEB);
    web.wait_for_tasks_on(&swarm, &["n1", "n2"], patience(Duration::from_secs(60)));
    let published = |n: u8| SocketAddr::from((node_addr(n), 18080));
    for n in [1, 2] {
        wait_for_outcome(swarm.outside(), published(n), Outcome::Answered, "without guard", || {
            swarm.docker("n1", &["service", "ps", "--no-trunc", web.name()])
        });
    }

    let stack = swarm::AgentStack::deploy(&swarm);
    for node in swarm.nodes() {
        assert!(stack.container_on(node).is_some(), "no agent of the stack on {}", node.name());
    }
    for n in [1, 2] {
        let got = swarm.outside().run(|| probe::tcp_outcome(published(n), Duration::from_secs(3)));
        assert_eq!(
            got,
            Outcome::Silent,
            "the stack's agent on n{n} left the unlabelled host-mode port {} open:\n{}",
            published(n),
            stack.logs_on(swarm.node(&format!("n{n}")))
        );
    }

    // A label on the service's containers opens it on every node that runs a task.
    let label = format!("guard.allow.outside=8080/tcp from {OUTSIDE}");
    swarm.docker(
        "n1",
        &["service", "update", "--detach", "--container-label-add", &label, web.name()],
    );
    let context = || {
        let mut text = swarm.docker("n1", &["service", "ps", "--no-trunc", web.name()]);
        for node in swarm.nodes() {
            let ps = node.docker(&["ps", "--format", "{{.Names}} {{.Ports}} {{.Labels}}"]);
            text += &format!("--- {} ---\n{ps}{}\n", node.name(), stack.logs_on(node));
        }
        text
    };
    for n in [1, 2] {
        wait_for_outcome(swarm.outside(), published(n), Outcome::Answered, "labelled", context);
    }
    // Still closed to anyone the label does not name.
    let got = swarm.admin().run(|| probe::tcp_outcome(published(2), Duration::from_secs(3)));
    assert_eq!(got, Outcome::Silent, "{ADMIN}, not named by the label, reaching {}", published(2));
    // Nothing went wrong on the way: in particular an overlay's vxlan device, in the node's
    // namespace for a moment before Docker moves it into its sandbox, is no uplink to attach.
    for node in swarm.nodes() {
        let log = stack.logs_on(node);
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(
            errors.is_empty(),
            "the agent on {} logged errors:\n{}",
            node.name(),
            errors.join("\n")
        );
    }
    drop(stack);
}
