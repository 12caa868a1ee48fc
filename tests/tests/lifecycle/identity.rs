//! Identity, not IP; and the Docker daemon's restart under a running agent.

use super::*;

/// Policy follows the container, never its address: an unlabelled container that takes a
/// removed exposed container's address (and published port) is closed; a container keeps
/// its policy through `docker rename`, `docker restart` and a move to another network, where
/// the exposed port opens at the new address and the closed ones stay closed. A prober
/// connects to the closed ports, at the old and the new addresses, all along.
#[test]
fn policy_follows_container_identity_not_its_address() {
    const NET1: &str = "10.252.3.0/24";
    const NET2: &str = "10.252.4.0/24";
    let _exclusive = prepare_test_bed();
    let net1 = Network::create("guard-e2e-lc-ident1", NET1, None);
    let net2 = Network::create("guard-e2e-lc-ident2", NET2, None);
    let _routing = RoutingHost::enable();
    let a = outside_host("ident", 13, &[NET1, NET2]);
    let (agent, _) = Agent::start_with_metrics(&[a.host_end()], &[]);

    // An address changes hands.
    let reused: Ipv4Addr = "10.252.3.10".parse().unwrap();
    let exposed = serving(
        &net1,
        "ident-exposed",
        reused,
        &[("guard.expose", "80/tcp")],
        &["23080:80"],
        &[80],
        None,
    );
    wait_reachable(&a, "exposed container", sock(reused, 80), Duration::from_secs(10));
    check(
        &a,
        "exposed container",
        &[
            expect("exposed, direct", sock(reused, 80), true),
            expect("exposed, published", sock(a.host_v4(), 23080), true),
        ],
    );
    drop(exposed);
    let _heir = serving(&net1, "ident-heir", reused, &[], &["23080:80"], &[80], None);
    check(
        &a,
        "unlabelled heir, at once",
        &[
            expect("heir, direct", sock(reused, 80), false),
            expect("heir, published", sock(a.host_v4(), 23080), false),
        ],
    );

    // One exposed (80 open, 8080 closed) and one unlabelled container, renamed, restarted
    // and moved to the other network.
    let (x1, y1): (Ipv4Addr, Ipv4Addr) =
        ("10.252.3.20".parse().unwrap(), "10.252.3.21".parse().unwrap());
    let (x2, y2): (Ipv4Addr, Ipv4Addr) =
        ("10.252.4.20".parse().unwrap(), "10.252.4.21".parse().unwrap());
    let mut x =
        serving(&net1, "ident-x", x1, &[("guard.expose", "80/tcp")], &[], &[80, 8080], None);
    let mut y = serving(&net1, "ident-y", y1, &[], &[], &[80], None);
    wait_reachable(&a, "x:80", sock(x1, 80), Duration::from_secs(10));
    let closed = [sock(x1, 8080), sock(y1, 80), sock(x2, 8080), sock(y2, 80)];
    let prober = Prober::start(
        a.netns().path(),
        &closed,
        25,
        Duration::from_millis(1500),
        Duration::from_secs(120),
    );

    x.rename("ident-x-renamed");
    y.rename("ident-y-renamed");
    wait_until("guard status shows the new names", Duration::from_secs(10), || {
        observe::status_json(agent.pin_dir()).is_ok_and(|s| {
            let names = observe::status_containers(&s);
            names.contains(x.name()) && names.contains(y.name())
        })
    });
    check(
        &a,
        "renamed",
        &[
            expect("x:80 (exposed)", sock(x1, 80), true),
            expect("x:8080", sock(x1, 8080), false),
            expect("y:80", sock(y1, 80), false),
        ],
    );

    docker(&["restart", x.name(), y.name()]);
    let reopened = wait_reachable(&a, "x:80 after restart", sock(x1, 80), Duration::from_secs(10));
    println!("restart: x:80 reachable again {reopened:.2?} after `docker restart` returned");
    check(
        &a,
        "restarted",
        &[
            expect("x:80 (exposed)", sock(x1, 80), true),
            expect("x:8080", sock(x1, 8080), false),
            expect("y:80", sock(y1, 80), false),
        ],
    );

    for (c, net_ip) in [(&x, x2), (&y, y2)] {
        docker(&["network", "disconnect", net1.name(), c.name()]);
        docker(&["network", "connect", "--ip", &net_ip.to_string(), net2.name(), c.name()]);
    }
    let moved =
        wait_reachable(&a, "x:80 at its new address", sock(x2, 80), Duration::from_secs(10));
    println!("reconnect: x:80 reachable at {x2} {moved:.2?} after `docker network connect`");
    check(
        &a,
        "moved to the other network",
        &[
            expect("x:80 (exposed), new address", sock(x2, 80), true),
            expect("x:8080, new address", sock(x2, 8080), false),
            expect("y:80, new address", sock(y2, 80), false),
            expect("x:80, old address", sock(x1, 80), false),
        ],
    );
    let status = wait_in_sync(&agent, "guard-e2e-ident", None, Duration::from_secs(10));
    let x_addrs: Vec<&str> = status["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == x.name())
        .flat_map(|c| c["addresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str()))
        .collect();
    assert_eq!(x_addrs, [x2.to_string()], "guard status has the wrong addresses for {}", x.name());

    let report = prober.finish();
    let mut leaks = Vec::new();
    for (i, addr) in closed.iter().enumerate() {
        let attempts = report.window(i, Duration::ZERO, Duration::MAX);
        println!("closed {addr:<18} all along: {}", summarize(&attempts));
        let established = report.established(i);
        if !established.is_empty() {
            leaks.push(format!(
                "{addr}: {} connections, first at {:?}",
                established.len(),
                established[0].sent
            ));
        }
    }
    assert!(
        leaks.is_empty(),
        "closed ports reached during rename/restart/reconnect:\n{}",
        leaks.join("\n")
    );
    drop((x, y, net2));
}

/// dockerd is stopped (SIGTERM) and started again the way xtask starts it. While it is
/// away the agent keeps running, retries with a growing backoff and leaves the maps exactly
/// as they were: the kernel still drops the closed port and passes the exposed one (`guard
/// explain`, the loaded program's own verdict; live-restore is off, so the containers stop
/// with the daemon and an end-to-end probe would prove nothing). When it is back the agent
/// reconnects by itself, with nothing else happening, within 10 s (its backoff after an
/// outage of about 9 s is 8 s) and drops the entries of the containers that stopped; then
/// new containers are started and the old ones started again: `guard status` shows the maps
/// in sync with Docker, and the openings work from outside.
#[test]
fn docker_daemon_restart_keeps_protection_and_agent_resyncs() {
    const SUBNET: &str = "10.252.5.0/24";
    let _exclusive = prepare_test_bed();
    let net = Network::create("guard-e2e-lc-dockerd", SUBNET, None);
    let ip = |host: u8| Ipv4Addr::new(10, 252, 5, host);
    let run = |name: &str, host: u8, labels: &[(&str, &str)], publish: &[&str], port: u16| {
        serving(&net, name, ip(host), labels, publish, &[port], None)
    };
    let closed = run("dockerd-closed", 10, &[], &["25081:8080"], 8080);
    let exposed = run("dockerd-exposed", 11, &[("guard.expose", "80/tcp")], &["25080:80"], 80);
    let _routing = RoutingHost::enable();
    let a = outside_host("dockerd", 14, &[SUBNET]);
    require_exposure(&a, &[sock(ip(10), 8080), sock(a.host_v4(), 25081)]);
    let (mut agent, metrics) = Agent::start_with_metrics(&[a.host_end()], &[]);
    check(
        &a,
        "before the outage",
        &[
            expect("closed, direct", sock(ip(10), 8080), false),
            expect("closed, published", sock(a.host_v4(), 25081), false),
            expect("exposed, direct", sock(ip(11), 80), true),
            expect("exposed, published", sock(a.host_v4(), 25080), true),
        ],
    );
    const POLICY_MAPS: [&str; 7] = [
        "GUARD_ADDRS",
        "GUARD_NETWORKS",
        "GUARD_PUBLISHED",
        "GUARD_PORTS",
        "GUARD_SOURCES",
        "GUARD_IDENTS",
        "GUARD_UPLINKS",
    ];
    let dump = |pin_dir: &Path| -> Vec<serde_json::Value> {
        let layout =
            std::fs::read_dir(pin_dir.join("maps")).unwrap().flatten().next().unwrap().path();
        POLICY_MAPS
            .iter()
            .map(|m| {
                observe::bpftool(&["map", "dump", "pinned", &layout.join(m).to_string_lossy()])
            })
            .collect()
    };
    let maps_running = dump(agent.pin_dir());
    let targets = [
        ("closed, direct", sock(ip(10), 8080)),
        ("closed, published", sock(a.host_v4(), 25081)),
        ("exposed, direct", sock(ip(11), 80)),
        ("exposed, published", sock(a.host_v4(), 25080)),
    ];
    let verdicts = |pin_dir: &Path| -> Vec<String> {
        let src = a.v4().to_string();
        targets
            .iter()
            .map(|(_, dst)| {
                let dst = format!("{dst}/tcp");
                observe::explain(pin_dir, &src, &dst, Some(a.host_end())).0
            })
            .collect()
    };
    assert_eq!(verdicts(agent.pin_dir()), ["drop", "drop", "pass", "pass"], "kernel verdicts");

    let log_before = agent.log().len();
    let mut outage = DockerdOutage::begin();
    let down_at = Instant::now();
    println!("dockerd stopped");
    // The daemon stops the containers on its way out, and the agent may hear of that while
    // the API still answers: "unchanged" means unchanged from when Docker went away (give a
    // reconcile that was under way then a moment to finish).
    thread::sleep(Duration::from_secs(1));
    let maps_away = dump(agent.pin_dir());
    let verdicts_away = verdicts(agent.pin_dir());
    println!(
        "when Docker went away the maps {} the running containers' (verdicts {verdicts_away:?})",
        if maps_away == maps_running { "still held" } else { "no longer held" }
    );
    // Long enough for many retries and a periodic resync (5 s).
    thread::sleep(Duration::from_secs(7));
    assert!(agent.running(), "the agent exited while Docker was away:\n{}", agent.log());
    assert!(
        xdp_attached(a.host_end()),
        "the XDP program left {} while Docker was away",
        a.host_end()
    );
    assert_eq!(maps_away, dump(agent.pin_dir()), "the maps changed while Docker was away");
    let verdicts_later = verdicts(agent.pin_dir());
    for ((what, dst), verdict) in targets.iter().zip(&verdicts_later) {
        println!("Docker away: {what:<20} {dst:<20} kernel verdict {verdict}");
    }
    assert_eq!(verdicts_later, verdicts_away, "kernel verdicts changed while Docker was away");
    assert_eq!(verdicts_later[..2], ["drop", "drop"], "closed port while Docker was away");
    let scrape = observe::http_get(metrics, "/metrics").expect("metrics while Docker is away");
    assert_eq!(
        observe::metric(&scrape, "guard_docker_connected"),
        Some(0.0),
        "guard_docker_connected while Docker is away"
    );
    let outage_log = agent.log()[log_before..].to_owned();
    let retries = lines_with(&outage_log, &["retrying every"]);
    println!("while Docker was away the agent said:\n{}", retries.join("\n"));
    // Tried every 250 ms, said once: a log line per attempt would flood the journal.
    assert_eq!(
        retries.len(),
        1,
        "the agent did not say once that it keeps retrying while Docker was away:\n{outage_log}"
    );

    outage.end();
    let up_at = Instant::now();
    println!("dockerd back after {:.1?}", up_at - down_at);
    // First with nothing changing: the agent must come back by its own retries. The maps
    // still hold the containers that stopped with the daemon; a resync removes them.
    let reconnected = poll(Duration::from_secs(45), || {
        let connected = observe::http_get(metrics, "/metrics")
            .is_ok_and(|m| observe::metric(&m, "guard_docker_connected") == Some(1.0));
        connected
            && observe::status_json(agent.pin_dir()).is_ok_and(|s| {
                observe::pending_changes(&s) == Some(0)
                    && !observe::status_containers(&s)
                        .iter()
                        .any(|n| n.starts_with("guard-e2e-dockerd"))
            })
    });
    println!(
        "agent reconnected and resynced {reconnected:.1?} after dockerd answered again (no change meanwhile)"
    );
    // Then changes: new containers, and the old ones started again (they stopped with the
    // daemon).
    let changed_at = Instant::now();
    let new_exposed =
        run("dockerd-new-exposed", 20, &[("guard.expose", "80/tcp")], &["25082:80"], 80);
    let new_closed = run("dockerd-new-closed", 21, &[], &["25083:80"], 80);
    docker(&["start", closed.name(), exposed.name()]);
    let want: BTreeSet<String> = [&closed, &exposed, &new_exposed, &new_closed]
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let status = wait_in_sync(&agent, "guard-e2e-dockerd", Some(&want), Duration::from_secs(60));
    let resynced = changed_at.elapsed();
    println!(
        "in sync {resynced:.1?} after the changes: {} containers, pending_changes {:?}",
        observe::status_containers(&status).len(),
        observe::pending_changes(&status)
    );
    wait_reachable(&a, "new exposed container", sock(ip(20), 80), Duration::from_secs(10));
    wait_reachable(&a, "old exposed container", sock(ip(11), 80), Duration::from_secs(10));
    check(
        &a,
        "after the outage",
        &[
            expect("new exposed, direct", sock(ip(20), 80), true),
            expect("new exposed, published", sock(a.host_v4(), 25082), true),
            expect("new closed, direct", sock(ip(21), 80), false),
            expect("new closed, published", sock(a.host_v4(), 25083), false),
            expect("old exposed, direct", sock(ip(11), 80), true),
            expect("old exposed, published", sock(a.host_v4(), 25080), true),
            expect("old closed, direct", sock(ip(10), 8080), false),
            expect("old closed, published", sock(a.host_v4(), 25081), false),
        ],
    );
    let scrape = observe::http_get(metrics, "/metrics").expect("metrics after the outage");
    assert_eq!(
        observe::metric(&scrape, "guard_docker_connected"),
        Some(1.0),
        "guard_docker_connected after the outage"
    );
    assert!(agent.running(), "the agent exited:\n{}", agent.log());
    // The agent tries every 250 ms; until it is back the maps keep the stopped containers'
    // entries and `guard_docker_connected` says 0.
    assert!(
        reconnected.is_some_and(|t| t <= RESYNC_BOUND),
        "the agent reconnected {reconnected:.1?} after dockerd answered again (outage {:.1?}; \
         None: not within 45 s), not within {RESYNC_BOUND:?}",
        up_at - down_at,
    );
    drop((new_closed, new_exposed, outage));
}

/// How soon after dockerd answers again the maps must hold Docker's state: the agent tries
/// every 250 ms, and a resync takes a moment (generous on a loaded 2-core machine).
const RESYNC_BOUND: Duration = Duration::from_secs(3);
