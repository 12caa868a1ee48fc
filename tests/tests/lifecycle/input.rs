//! A storm of starts and removals, and bad input: malformed labels, a full map.

use super::*;

/// 100 containers (a third exposed, a third allowed to one source, a third closed; a
/// quarter with a published port) are started and removed by 10 threads at once, next to 5
/// containers that stay. Afterwards the maps equal Docker's state (`guard status`:
/// pending_changes 0, exactly the remaining containers; the identities map holds one entry
/// per running container), the remaining containers' openings are right, and the agent's
/// resident memory has not grown beyond noise.
#[test]
fn storm_of_starts_and_removals_leaves_maps_equal_to_docker() {
    const SUBNET: &str = "10.252.6.0/24";
    const THREADS: usize = 10;
    const PER_THREAD: usize = 10;
    let _exclusive = prepare_test_bed();
    let net = Network::create("guard-e2e-lc-storm", SUBNET, None);
    let _routing = RoutingHost::enable();
    let a = outside_host("storm", 15, &[SUBNET]);
    let allow_a = format!("80/tcp from {}", a.v4());
    let labels_for = |i: usize| -> Vec<(&str, &str)> {
        match i % 3 {
            0 => vec![("guard.expose", "80/tcp")],
            1 => vec![("guard.allow.partner", allow_a.as_str())],
            _ => vec![],
        }
    };
    let keep: Vec<Container> = (0..5)
        .map(|i| {
            serving(
                &net,
                &format!("storm-keep-{i}"),
                Ipv4Addr::new(10, 252, 6, 200 + i as u8),
                &labels_for(i),
                &[],
                &[80],
                None,
            )
        })
        .collect();
    let (agent, _) = Agent::start_with_metrics(&[a.host_end()], &[]);
    let keep_names: BTreeSet<String> = keep.iter().map(|c| c.name().to_owned()).collect();
    wait_in_sync(&agent, "guard-e2e-storm", Some(&keep_names), Duration::from_secs(10));
    // Let the allocator settle after the first syncs before taking the baseline.
    thread::sleep(Duration::from_secs(1));
    let rss_before = observe::rss_kib(agent.pid());

    let started = Instant::now();
    thread::scope(|scope| {
        for t in 0..THREADS {
            let (net, labels_for) = (&net, &labels_for);
            scope.spawn(move || {
                let batch: Vec<Container> = (0..PER_THREAD)
                    .map(|k| {
                        let i = t * PER_THREAD + k;
                        let publish = format!("{}:80", 26000 + i);
                        let publish: &[&str] =
                            if i.is_multiple_of(4) { &[publish.as_str()] } else { &[] };
                        Container::run(ContainerSpec {
                            name: &format!("storm-{i}"),
                            network: Some(net),
                            labels: &labels_for(i),
                            publish,
                            command: "exec sleep 1000000",
                            ..Default::default()
                        })
                    })
                    .collect();
                // Dropping removes them (`docker rm -f`), one after the other, while other
                // threads are still starting theirs.
                drop(batch);
            });
        }
    });
    let storm_took = started.elapsed();
    let settled = Instant::now();
    let status =
        wait_in_sync(&agent, "guard-e2e-storm", Some(&keep_names), Duration::from_secs(30));
    println!(
        "storm: {} containers started and removed by {THREADS} threads in {storm_took:.1?}; in sync {:.1?} later",
        THREADS * PER_THREAD,
        settled.elapsed()
    );
    // Every container the agent reports is one Docker runs, and vice versa; the kernel's
    // identities map has exactly one entry per running container.
    let running = docker_ps_names();
    assert_eq!(observe::status_containers(&status), running, "guard status vs docker ps");
    let idents = observe::map_entry_count(agent.pin_dir(), "GUARD_IDENTS");
    assert_eq!(
        idents,
        running.len(),
        "GUARD_IDENTS holds {idents} entries for {} running containers",
        running.len()
    );
    let failed = lines_with(&agent.log(), &["maps updated"])
        .into_iter()
        .filter(|l| !l.contains("failed=0"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(failed.is_empty(), "map updates failed during the storm:\n{}", failed.join("\n"));

    check(
        &a,
        "after the storm",
        &[
            expect("keep-0 (exposed)", sock(Ipv4Addr::new(10, 252, 6, 200), 80), true),
            expect("keep-1 (allowed to this host)", sock(Ipv4Addr::new(10, 252, 6, 201), 80), true),
            expect("keep-2 (closed)", sock(Ipv4Addr::new(10, 252, 6, 202), 80), false),
        ],
    );

    thread::sleep(Duration::from_secs(1));
    let rss_after = observe::rss_kib(agent.pid());
    println!(
        "storm: rss before={rss_before}KiB after={rss_after}KiB (growth {}KiB)",
        rss_after as i64 - rss_before as i64
    );
    assert!(
        rss_after < rss_before + 20 * 1024,
        "agent RSS grew from {rss_before} KiB to {rss_after} KiB over the storm"
    );
    drop(keep);
}

/// Each malformed label form is rejected whole (every one below also names a good port, 80,
/// which must stay closed too): one warning naming the container and the label, however
/// many reconciles pass (every second here), a `guard_label_errors` series, and a closed
/// port by address and through the published port. The agent keeps running. Half of the
/// containers are there when the agent starts, half are started while it runs.
#[test]
fn malformed_labels_are_reported_and_leave_the_container_closed() {
    const SUBNET: &str = "10.252.7.0/24";
    let _exclusive = prepare_test_bed();
    let net = Network::create("guard-e2e-lc-labels", SUBNET, None);
    let huge = "80,".repeat(1500) + "80";
    let bad_cidr = "80/tcp from 10.251.16.0/33".to_owned();
    let cases: [(&str, &str, String, &str); 6] = [
        ("label-bad-port", "guard.expose", "80,70000".into(), "bad port"),
        ("label-bad-range", "guard.expose", "80,9000-8000".into(), "bad range"),
        ("label-bad-cidr", "guard.allow.office", bad_cidr, "10.251.16.0/33"),
        ("label-bad-proto", "guard.expose", "80/tcp,81/icmp".into(), "unknown protocol"),
        ("label-empty", "guard.expose", String::new(), "empty value"),
        ("label-huge", "guard.expose", huge, "bytes long"),
    ];
    let _routing = RoutingHost::enable();
    let a = outside_host("labels", 16, &[SUBNET]);
    // Half of the containers exist when the agent starts (its first sync), half come later
    // (Docker events).
    let mut agent_and_metrics = None;
    let mut containers = Vec::new();
    for (i, (name, key, value, _)) in cases.iter().enumerate() {
        if i == cases.len() / 2 {
            agent_and_metrics =
                Some(Agent::start_with_metrics(&[a.host_end()], &["--resync-interval", "1"]));
        }
        let publish = format!("{}:80", 27080 + i);
        containers.push(Container::run(ContainerSpec {
            name,
            network: Some(&net),
            ip: Some(Ipv4Addr::new(10, 252, 7, 10 + i as u8)),
            labels: &[(key, value.as_str())],
            publish: &[publish.as_str()],
            command: &serve(&[80]),
            listens_on: &[80],
            ..Default::default()
        }));
    }
    let (mut agent, metrics) = agent_and_metrics.expect("agent started");
    let good = serving(
        &net,
        "label-good",
        Ipv4Addr::new(10, 252, 7, 30),
        &[("guard.expose", "80")],
        &[],
        &[80],
        None,
    );
    // A few reconciles: a warning must not repeat on each.
    thread::sleep(Duration::from_secs(3));

    let scrape = observe::http_get(metrics, "/metrics").expect("scrape /metrics");
    let log = agent.log();
    let mut expectations = vec![expect("good label (control)", sock(good.ip(), 80), true)];
    let mut wrong = Vec::new();
    for (i, ((name, key, _, problem), c)) in cases.iter().zip(&containers).enumerate() {
        let warnings = lines_with(
            &log,
            &["WARN", &format!("container {}:", c.name()), &format!("label {key}")],
        );
        println!(
            "{}: {} warning(s): {}",
            c.name(),
            warnings.len(),
            warnings.first().unwrap_or(&"")
        );
        if warnings.len() != 1 {
            wrong.push(format!(
                "{}: {} warnings naming it and {key}, expected 1",
                c.name(),
                warnings.len()
            ));
        } else if !warnings[0].contains(problem)
            || !warnings[0].contains("this label is ignored whole")
        {
            wrong.push(format!(
                "{}: the warning does not say {problem:?}: {}",
                c.name(),
                warnings[0]
            ));
        }
        let series = format!("guard_label_errors{{container=\"{}\",label=\"{key}\"}}", c.name());
        if observe::metric(&scrape, &series) != Some(1.0) {
            wrong.push(format!("no `{series} 1` in /metrics"));
        }
        expectations.push(expect(format!("{name}, direct"), sock(c.ip(), 80), false));
        let published = sock(a.host_v4(), 27080 + i as u16);
        expectations.push(expect(format!("{name}, published"), published, false));
    }
    check(&a, "malformed labels", &expectations);
    assert!(wrong.is_empty(), "{}\n--- metrics ---\n{scrape}", wrong.join("\n"));
    assert!(agent.running(), "the agent exited:\n{log}");
    observe::http_get(metrics, "/healthz").expect("/healthz after the bad labels");
}

/// The single-port map (PORTS, 65,536 entries) is filled past its capacity: 17 containers
/// each expose 1-4096/tcp (4,096 entries each). The agent reports a clear error and counts
/// it (`guard_map_update_errors_total{map="GUARD_PORTS"}`); an opening that did not fit is
/// closed (the kernel's verdict, and from outside), never a wrong one: ports nobody opened
/// stay closed everywhere. When a container goes away and makes room, the missing opening
/// is installed and the maps match Docker again.
#[test]
fn full_ports_map_is_reported_and_never_opens_the_wrong_port() {
    const SUBNET: &str = "10.252.8.0/24";
    let capacity = guard_common::maps::PORTS_CAPACITY as usize;
    // One map entry per port; the parser's limit of single ports per label.
    let per_container = guard_userspace::policy::labels::MAX_PORTS_PER_LABEL as usize;
    let count = capacity / per_container + 1;
    let _exclusive = prepare_test_bed();
    let net = Network::create("guard-e2e-lc-full", SUBNET, None);
    let range = format!("1-{per_container}/tcp");
    let ip = |i: usize| Ipv4Addr::new(10, 252, 8, 10 + i as u8);
    let nobody_ip = Ipv4Addr::new(10, 252, 8, 100);
    let _routing = RoutingHost::enable();
    let a = outside_host("full", 17, &[SUBNET]);
    let (agent, metrics) = Agent::start_with_metrics(&[a.host_end()], &["--resync-interval", "2"]);
    let mut fill: Vec<Option<Container>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .map(|i| {
                let (net, range) = (&net, &range);
                scope.spawn(move || {
                    serving(
                        net,
                        &format!("full-{i}"),
                        ip(i),
                        &[("guard.expose", range.as_str())],
                        &[],
                        &[80, 8080],
                        None,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| Some(h.join().expect("docker run thread"))).collect()
    });
    let _nobody = serving(&net, "full-nobody", nobody_ip, &[], &[], &[80], None);
    let series = "guard_map_update_errors_total{map=\"GUARD_PORTS\"}";
    wait_until("a GUARD_PORTS update error in /metrics", Duration::from_secs(30), || {
        observe::http_get(metrics, "/metrics")
            .is_ok_and(|m| observe::metric(&m, series).is_some_and(|n| n > 0.0))
    });
    let log = agent.log();
    let errors = lines_with(&log, &["GUARD_PORTS"]);
    println!(
        "map full: {} log line(s) name GUARD_PORTS, first: {}",
        errors.len(),
        errors.first().unwrap_or(&"")
    );
    assert!(
        errors.iter().any(|l| l.contains("WARN") && l.contains("capacity")),
        "no clear error about the full GUARD_PORTS map in the log:\n{log}"
    );
    let entries = observe::map_entry_count(agent.pin_dir(), "GUARD_PORTS");
    println!("map full: GUARD_PORTS holds {entries} entries (capacity {capacity})");
    assert_eq!(entries, capacity, "GUARD_PORTS is not full");

    // Which openings made it: ask the loaded program, then check from outside.
    let verdicts: Vec<String> = (0..count)
        .map(|i| {
            observe::explain(
                agent.pin_dir(),
                &a.v4().to_string(),
                &format!("{}:80/tcp", ip(i)),
                Some(a.host_end()),
            )
            .0
        })
        .collect();
    println!("map full: kernel verdict for port 80 of each container: {verdicts:?}");
    let missing: Vec<usize> = (0..count).filter(|i| verdicts[*i] == "drop").collect();
    let installed: Vec<usize> = (0..count).filter(|i| verdicts[*i] == "pass").collect();
    assert!(!missing.is_empty(), "every opening fits: the map did not overflow");
    assert!(!installed.is_empty(), "no opening was installed at all");
    let mut expectations = Vec::new();
    for (i, verdict) in verdicts.iter().enumerate() {
        let open = verdict == "pass";
        expectations.push(expect(format!("full-{i}:80 ({verdict})"), sock(ip(i), 80), open));
        expectations.push(expect(
            format!("full-{i}:8080 (nobody opened)"),
            sock(ip(i), 8080),
            false,
        ));
    }
    expectations.push(expect("full-nobody:80 (no label)", sock(nobody_ip, 80), false));
    check(&a, "map full", &expectations);
    let status = observe::status_json(agent.pin_dir()).expect("guard status");
    println!(
        "map full: pending_changes {:?} while openings do not fit",
        observe::pending_changes(&status)
    );

    // Room again: the missing opening comes.
    let freed = installed[0];
    fill[freed] = None;
    let waiting = missing[0];
    let took = wait_reachable(
        &a,
        &format!("full-{waiting}:80 once there is room"),
        sock(ip(waiting), 80),
        Duration::from_secs(20),
    );
    println!("map full: full-{waiting}:80 opened {took:.1?} after full-{freed} was removed");
    wait_in_sync(&agent, "guard-e2e-full", None, Duration::from_secs(20));
    drop(fill);
}
