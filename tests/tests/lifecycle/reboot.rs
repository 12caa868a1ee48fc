//! Boot: closed before Docker, before the agent's first sync, and while it is away.

use super::*;

/// A reboot as an operator's boot order makes it: the agent (ordered before docker.service)
/// starts with no pins (bpffs is memory) and no Docker, only its state directory; then dockerd
/// starts and brings back two `--restart=always` containers, one exposed by label, one not,
/// each reachable by address and through a published port, on a bridge that dockerd creates
/// again. An outside host connects to all four at 25 attempts per second throughout. Not one
/// connection to the closed container completes, from the first packet on; the exposed one
/// opens within seconds of its container starting.
#[test]
fn reboot_accepts_nothing_closed_from_the_first_packet_and_opens_the_exposed_port_soon() {
    const SUBNET: &str = "10.252.9.0/24";
    let _exclusive = prepare_test_bed();
    let net = Network::create("guard-e2e-lc-boot", SUBNET, None);
    let ip = |host: u8| Ipv4Addr::new(10, 252, 9, host);
    let run = |name: &str, host: u8, labels: &[(&str, &str)], publish: &[&str], port: u16| {
        serving(&net, name, ip(host), labels, publish, &[port], Some("always"))
    };
    let closed = run("boot-closed", 10, &[], &["25191:8080"], 8080);
    let exposed = run("boot-exposed", 11, &[("guard.expose", "80/tcp")], &["25190:80"], 80);
    let _routing = RoutingHost::enable();
    let a = outside_host("boot", 19, &[SUBNET]);
    require_exposure(&a, &[sock(ip(10), 8080), sock(a.host_v4(), 25191)]);
    let targets = [
        ("closed, direct", sock(ip(10), 8080), false),
        ("closed, published", sock(a.host_v4(), 25191), false),
        ("exposed, direct", sock(ip(11), 80), true),
        ("exposed, published", sock(a.host_v4(), 25190), true),
    ];
    // The agent has run on this host before: its state directory knows the network.
    let (mut agent, _) = Agent::start_with_metrics(&[a.host_end()], &[]);
    check(&a, "before the reboot", &targets.map(|(w, addr, open)| expect(w, addr, open)));
    let mut outage = boot::power_off(&mut agent, &[&net]);
    assert!(
        !xdp_attached(a.host_end()),
        "test bed broken: the uplink is guarded before the agent starts"
    );

    agent.boot();
    println!("agent guarding without Docker:\n{}", agent.log_of_current_run());
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.1).collect();
    let prober = Prober::start(
        a.netns().path(),
        &addrs,
        25,
        Duration::from_secs(1),
        Duration::from_secs(90),
    );
    let probing_since = std::time::SystemTime::now();
    thread::sleep(Duration::from_secs(1));
    let dockerd_at = prober.elapsed();
    outage.end();
    let answers_at = prober.elapsed();
    let opened = poll(Duration::from_secs(30), || {
        a.tcp_connect(sock(ip(11), 80), Duration::from_millis(300))
    });
    thread::sleep(Duration::from_secs(2));
    let report = prober.finish();
    println!(
        "reboot: dockerd started at {dockerd_at:.2?}, answered at {answers_at:.2?} (prober time)"
    );
    for (i, (what, _, _)) in targets.iter().enumerate() {
        println!("{what:<20} {}", summarize(&report.window(i, Duration::ZERO, Duration::MAX)));
    }
    for (i, (what, addr, open)) in targets.iter().enumerate() {
        let established = report.established(i);
        if !open {
            assert!(
                established.is_empty(),
                "{what} ({addr}): {} connections completed during the boot, first at {:?}:\n{}",
                established.len(),
                established.first().map(|a| a.sent),
                agent.log()
            );
        }
    }
    assert!(
        opened.is_some(),
        "the exposed container never opened after the boot:\n{}",
        agent.log()
    );
    // From the container's start (Docker's clock) to the first connection that completed.
    let started = boot::started_at(exposed.name());
    for (i, (what, _, open)) in targets.iter().enumerate() {
        if !open {
            continue;
        }
        let first = boot::first_completed(&report, i, probing_since);
        let after = first.and_then(|t| t.duration_since(started).ok());
        println!("{what}: open {after:.2?} after its container started");
        assert!(
            after.is_some_and(|d| d < Duration::from_secs(10)),
            "{what}: not open within 10 s of its container starting ({after:?})"
        );
    }
    agent.unload();
    drop((closed, exposed, outage));
}

/// A network (and its containers) created while the agent is stopped is closed from its first
/// packet: the pinned programs close what the agent never listed, by address and through a
/// published port, the exposed container too, until the agent is back and has synced.
#[test]
fn a_network_created_while_the_agent_is_stopped_is_closed_until_it_syncs() {
    const SUBNET: &str = "10.252.10.0/24";
    let _exclusive = prepare_test_bed();
    let _routing = RoutingHost::enable();
    let a = outside_host("unseen", 20, &[SUBNET]);
    let (mut agent, _) = Agent::start_with_metrics(&[a.host_end()], &[]);
    agent.terminate();

    let net = Network::create("guard-e2e-lc-unseen", SUBNET, None);
    let ip = |host: u8| Ipv4Addr::new(10, 252, 10, host);
    let run = |name: &str, host: u8, labels: &[(&str, &str)], publish: &[&str], port: u16| {
        serving(&net, name, ip(host), labels, publish, &[port], None)
    };
    let _closed = run("unseen-closed", 10, &[], &["25201:8080"], 8080);
    let _exposed = run("unseen-exposed", 11, &[("guard.expose", "80/tcp")], &["25200:80"], 80);
    check(
        &a,
        "agent stopped",
        &[
            expect("closed, direct", sock(ip(10), 8080), false),
            expect("closed, published", sock(a.host_v4(), 25201), false),
            expect("exposed (not yet seen), direct", sock(ip(11), 80), false),
            expect("exposed (not yet seen), published", sock(a.host_v4(), 25200), false),
        ],
    );
    agent.restart();
    wait_reachable(&a, "exposed container", sock(ip(11), 80), Duration::from_secs(10));
    check(
        &a,
        "agent back",
        &[
            expect("closed, direct", sock(ip(10), 8080), false),
            expect("closed, published", sock(a.host_v4(), 25201), false),
            expect("exposed, direct", sock(ip(11), 80), true),
            expect("exposed, published", sock(a.host_v4(), 25200), true),
        ],
    );
    agent.unload();
}

/// A policy file that does not parse at start never means no protection: without an earlier
/// good file everything stays closed (labels too), with one the last good policy holds; either
/// way the error names line and column, `guard_config_valid` is 0 and `/readyz` is 503 until
/// the file is fixed.
#[test]
fn a_broken_policy_file_at_start_leaves_the_host_protected() {
    const SUBNET: &str = "10.252.11.0/24";
    let bed = AppBed::start("badfile", 11, 21, &[("guard.expose", "80/tcp")], &[80, 8080]);
    let (a, app) = (&bed.a, &bed.app);
    assert_eq!(app.subnet(), SUBNET);
    let dir = tempfile_dir("guard-e2e-badfile");
    let config = dir.join("guard.toml");
    let broken = "mode = \"enforce\"\n[rule]\nmatch = { container = \"x\" }\n";
    std::fs::write(&config, broken).unwrap();
    let config_arg = config.to_string_lossy().into_owned();
    let (mut agent, metrics) =
        Agent::start_with_metrics(&[a.host_end()], &["--config", &config_arg]);
    let valid = || {
        observe::metric(
            &observe::http_get(metrics, "/metrics").expect("metrics"),
            "guard_config_valid",
        )
    };
    let ready = || observe::http_get(metrics, "/readyz").is_ok();

    let log = agent.log();
    let errors = lines_with(&log, &["guard.toml:2:1"]);
    assert!(!errors.is_empty(), "the error does not point at the line:\n{}", agent.log());
    assert_eq!(valid(), Some(0.0), "guard_config_valid with a broken file");
    assert!(!ready(), "/readyz is ready with a broken file");
    check(
        a,
        "broken file, no earlier one",
        &[
            expect("exposed by label, all closed", sock(app.ip, 80), false),
            expect("closed", sock(app.ip, 8080), false),
        ],
    );

    std::fs::write(&config, "mode = \"enforce\"\n").unwrap();
    wait_until("the fixed file is in force", Duration::from_secs(15), || valid() == Some(1.0));
    wait_reachable(a, "exposed by label", sock(app.ip, 80), Duration::from_secs(10));
    assert!(ready(), "/readyz is not ready with a good file");

    agent.terminate();
    std::fs::write(&config, broken).unwrap();
    agent.restart();
    assert_eq!(valid(), Some(0.0), "guard_config_valid with a broken file again");
    assert!(!ready(), "/readyz is ready with a broken file again");
    let log = agent.log_of_current_run();
    let last_good = lines_with(&log, &["last policy file that parsed"]);
    assert!(!last_good.is_empty(), "the agent does not say it runs the last good file");
    check(
        a,
        "broken file, the last good one in force",
        &[
            expect("exposed by label", sock(app.ip, 80), true),
            expect("closed", sock(app.ip, 8080), false),
        ],
    );
    agent.unload();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A container recreated on its predecessor's static address while the agent is away (a
/// compose `ipv4_address`) does not keep the predecessor's openings once the agent is back.
#[test]
fn a_static_address_reused_while_the_agent_is_away_inherits_nothing() {
    let bed = AppBed::start("reuse", 12, 22, &[("guard.expose", "80/tcp")], &[80]);
    let a = &bed.a;
    let (mut agent, _) = Agent::start_with_metrics(&[a.host_end()], &[]);
    wait_reachable(a, "the first container", sock(bed.app.ip, 80), Duration::from_secs(10));
    agent.terminate();
    let App { _container: first, net, ip } = bed.app;
    drop(first);
    let _second = serving(&net, "reuse-second", ip, &[], &[], &[80], None);
    agent.restart();
    check(a, "agent back", &[expect("the second container, no label", sock(ip, 80), false)]);
    agent.unload();
}

/// A fresh directory under the temporary directory.
fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
