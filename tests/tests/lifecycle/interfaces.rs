//! Interfaces: uplinks found, added and removed; another tool's XDP program; L3 and
//! generic-XDP uplinks.

use super::*;

/// The agent runs *without* `--iface`: it discovers the uplinks itself, every interface
/// that is not loopback, a Docker bridge or a container veth, the way an operator runs it by
/// default. Interfaces that already exist when the test starts and are not its own (the
/// VM's real uplink eth0, and root-namespace veths of whatever else runs on the machine: a
/// benchmark, another session's test bed) are passed as `--trust-iface`, so the agent
/// leaves them alone; that changes nothing about discovery, which is what is under test.
/// (Guarding eth0 as well would be harmless, the filter only drops container-bound packets
/// from outside, but attaching XDP to a virtio NIC reconfigures its queues, and other work
/// on the machine has no business with this test's agent.) An interface created by someone
/// else *during* the test would still be guarded by this agent until it stops.
///
/// - A new uplink (a veth to a new outside host) is protected within a second.
/// - A host address added later counts for published-port matching: a published closed port
///   on it is closed from outside at once (bridge gate) and, once the agent has seen it, at
///   XDP already (the kernel's verdict names the port as closed).
/// - An interface removed does no harm: the agent runs on, forgets its link, and the others
///   keep their protection.
#[test]
fn new_uplinks_and_addresses_are_protected_and_removed_ones_do_no_harm() {
    const SUBNET: &str = "10.252.9.0/24";
    let _exclusive = prepare_test_bed();
    let net = Network::create("guard-e2e-lc-iface", SUBNET, None);
    let ip: Ipv4Addr = "10.252.9.10".parse().unwrap();
    let _app = serving(
        &net,
        "iface-app",
        ip,
        &[("guard.expose", "80/tcp")],
        &["29080:80", "29081:8080"],
        &[80, 8080],
        None,
    );
    let _routing = RoutingHost::enable();
    let a = outside_host("iface", 18, &[SUBNET]);
    let trust = trust_foreign_interfaces(&[a.host_end()]);
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let (mut agent, _) = Agent::start_with_metrics(&[], &trust);
    assert!(xdp_attached(a.host_end()), "the agent without --iface did not guard {}", a.host_end());
    let mut gaps = Vec::new();

    // A new uplink: how long until it is guarded, and what got through meanwhile.
    // The clock starts before the veth exists: the time to protection is an upper bound.
    let appeared = Instant::now();
    let b = outside_host("ifnew", 19, &[SUBNET]);
    let prober = Prober::start(
        b.netns().path(),
        &[sock(ip, 8080)],
        50,
        Duration::from_millis(500),
        Duration::from_secs(15),
    );
    let attached =
        poll(Duration::from_secs(12), || xdp_attached(b.host_end())).map(|_| appeared.elapsed());
    thread::sleep(Duration::from_millis(600));
    let report = prober.finish();
    let leaks = report.established(0);
    println!(
        "new uplink {}: XDP attached after {attached:.2?}; meanwhile {}; last connection to the \
         closed port at {:?}",
        b.host_end(),
        summarize(&report.window(0, Duration::ZERO, Duration::MAX)),
        leaks.last().map(|l| l.sent)
    );
    match attached {
        Some(t) if t <= Duration::from_secs(1) => {}
        other => gaps.push(format!(
            "new uplink {} guarded after {other:?}, not within 1 s ({} connections to a closed \
             port got through in the meantime)",
            b.host_end(),
            leaks.len()
        )),
    }
    if attached.is_some() {
        check(
            &b,
            "new uplink, guarded",
            &[
                expect("closed, direct", sock(ip, 8080), false),
                expect("exposed, direct", sock(ip, 80), true),
            ],
        );
    }
    // A host address added later, on the first link.
    let extra: Ipv4Addr = Ipv4Addr::new(10, 251, 18, 3);
    run("ip", &["addr", "add", &format!("{extra}/24"), "dev", a.host_end()]);
    check(
        &a,
        "new host address, at once",
        &[
            expect("closed, published on the new address", sock(extra, 29081), false),
            expect("exposed, published on the new address", sock(extra, 29080), true),
        ],
    );
    let dst = format!("{extra}:29081/tcp");
    let src = a.v4().to_string();
    let matched = poll(Duration::from_secs(12), || {
        observe::explain(agent.pin_dir(), &src, &dst, Some(a.host_end()))
            == ("drop".into(), "closed".into())
    });
    println!("new host address {extra}: XDP matches its published ports after {matched:.2?}");
    if matched.is_none() {
        let now = observe::explain(agent.pin_dir(), &src, &dst, Some(a.host_end()));
        gaps.push(format!(
            "published port on the added address {extra} not matched at XDP: kernel says {now:?}"
        ));
    }
    check(
        &a,
        "new host address, later",
        &[
            expect("closed, published on the new address", sock(extra, 29081), false),
            expect("exposed, published on the new address", sock(extra, 29080), true),
        ],
    );

    // An interface removed.
    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", b.host_end()))
        .expect("ifindex of the new uplink")
        .trim()
        .to_owned();
    run("ip", &["link", "del", b.host_end()]);
    let pin = agent.pin_dir().join("links").join(format!("xdp-{ifindex}"));
    let forgotten = poll(Duration::from_secs(12), || !pin.exists());
    println!("removed uplink: pin {} gone after {forgotten:.2?}", pin.display());
    assert!(agent.running(), "the agent exited after an interface was removed:\n{}", agent.log());
    if forgotten.is_none() {
        gaps.push(format!("the link pin {} of the removed interface stayed", pin.display()));
    }
    let status = observe::status_json(agent.pin_dir()).expect("guard status after the removal");
    println!("status interfaces after the removal: {}", status["protection"]["interfaces"]);
    wait_in_sync(&agent, "guard-e2e-iface", None, Duration::from_secs(12));
    check(
        &a,
        "after the removal",
        &[
            expect("closed, direct", sock(ip, 8080), false),
            expect("closed, published", sock(a.host_v4(), 29081), false),
            expect("exposed, direct", sock(ip, 80), true),
        ],
    );
    assert!(gaps.is_empty(), "interface handling:\n{}", gaps.join("\n"));
    drop(b);
}

/// Interfaces of the root namespace that are neither `ours` nor Docker's (bridges, container
/// veths) nor loopback.
fn foreign_interfaces(ours: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = all_interfaces()
        .into_iter()
        .filter(|n| n != "lo" && !n.starts_with("veth") && !engine_bridge(n))
        .filter(|n| !ours.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

/// `--trust-iface` for each of the [`foreign_interfaces`], said on stdout.
fn trust_foreign_interfaces(ours: &[&str]) -> Vec<String> {
    let foreign = foreign_interfaces(ours);
    println!("trusted (not this test's): {foreign:?}");
    foreign.into_iter().flat_map(|iface| ["--trust-iface".to_owned(), iface]).collect()
}

/// An engine's bridge by its name, the way Docker and Podman name them: never trusted by
/// these tests, since how the agent treats them is under test.
fn engine_bridge(name: &str) -> bool {
    let podman = name.strip_prefix("podman");
    name == "docker0"
        || name == "docker_gwbridge"
        || name.starts_with("br-")
        || podman.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Without `--iface`, on any engine (Docker 20.10, 28, Podman), with several networks: XDP
/// goes on the uplink and nowhere else (no engine bridge, no container veth), the gate on
/// every network's bridge, and a container on two networks keeps every path it had: to a
/// published port of the host (whose answer comes back through the other network's bridge,
/// which once dropped it as "closed, direct") and to the other containers by address. The
/// outside host reaches the exposed port only.
#[test]
fn default_mode_guards_the_uplinks_only_and_a_container_on_two_networks_keeps_its_paths() {
    const SUBNET1: &str = "10.252.11.0/24";
    const SUBNET2: &str = "10.252.12.0/24";
    let _exclusive = prepare_test_bed();
    let net1 = Network::create("guard-e2e-lc-two1", SUBNET1, None);
    let net2 = Network::create("guard-e2e-lc-two2", SUBNET2, None);
    let web_ip: Ipv4Addr = "10.252.11.10".parse().unwrap();
    let web = serving(
        &net1,
        "two-web",
        web_ip,
        &[("guard.expose", "80/tcp")],
        &["29180:80", "29181:8080"],
        &[80, 8080],
        None,
    );
    let multi = serving(&net2, "two-multi", "10.252.12.20".parse().unwrap(), &[], &[], &[80], None);
    multi.connect(&net1, "10.252.11.20".parse().unwrap());
    let _routing = RoutingHost::enable();
    let a = outside_host("two", 21, &[SUBNET1, SUBNET2]);
    let trust = trust_foreign_interfaces(&[a.host_end()]);
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let xdp_before: BTreeSet<String> =
        all_interfaces().into_iter().filter(|n| xdp_attached(n)).collect();
    let (agent, _) = Agent::start_with_metrics(&[], &trust);
    wait_in_sync(&agent, "guard-e2e-two-multi", None, Duration::from_secs(20));

    let xdp_now: BTreeSet<String> =
        all_interfaces().into_iter().filter(|n| xdp_attached(n)).collect();
    let added: Vec<&String> = xdp_now.difference(&xdp_before).collect();
    assert_eq!(added, [a.host_end()], "XDP must go on the uplink only\n{}", agent.status());
    let status: serde_json::Value =
        serde_json::from_str(&agent.status_json()).expect("guard status --json");
    let hooks = status["protection"]["hooks"].as_array().cloned().unwrap_or_default();
    let on =
        |hook: &str, iface: &str| hooks.iter().any(|h| h["hook"] == hook && h["iface"] == iface);
    for bridge in [net1.bridge(), net2.bridge()] {
        assert!(on("bridge-gate", &bridge), "no gate on {bridge}: {status}");
        assert!(!on("xdp", &bridge), "XDP on the bridge {bridge}: {status}");
        // The kernel's own word too.
        assert!(
            observe::runs_at_egress(&bridge, "guard_tc_gate"),
            "the kernel runs no gate on {bridge}"
        );
    }
    assert!(status["errors"].as_array().is_some_and(Vec::is_empty), "{status}");

    // The container on two networks: the host's published port (on A's link address and on
    // net1's gateway) and web's address; web reaches it back on net1.
    let published = [sock(a.host_v4(), 29180), sock(net1.gateway_v4, 29181), sock(web_ip, 8080)];
    for addr in published {
        let reached = in_netns(&multi.netns_path(), || probe::reachable(Proto::Tcp, addr, PATIENT));
        assert!(reached, "two-multi (on two networks) cannot reach {addr}\n{}", agent.log());
    }
    let back = web.exec(&["timeout", "3", "wget", "-q", "-O", "-", "http://10.252.11.20:80/"]);
    assert_eq!(String::from_utf8_lossy(&back.stdout).trim(), "ok", "web cannot reach two-multi");

    check(
        &a,
        "default mode",
        &[
            expect("web:80 published", sock(a.host_v4(), 29180), true),
            expect("web:8080 published", sock(a.host_v4(), 29181), false),
            expect("multi:80 direct", sock(Ipv4Addr::new(10, 252, 12, 20), 80), false),
        ],
    );
    agent.unload();
}

/// Every interface of the test's namespace.
fn all_interfaces() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .expect("read /sys/class/net")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// An `--iface` that already runs another tool's XDP program (here: a second agent's, on other
/// pins) is not guarded by this agent, which says so as an ERROR naming the program and what
/// to do, and is not ready (`/readyz` 503, naming the interface) until it can attach; once
/// the other program is gone, it attaches within a pass and is ready.
#[test]
fn another_xdp_program_on_an_uplink_is_named_and_keeps_the_agent_unready() {
    let bed = AppBed::start("otherxdp", 45, 45, &[], &[80]);
    let (a, app) = (&bed.a, &bed.app);
    let (other, _) = Agent::start_with_metrics(&[a.host_end()], &[]);
    let (agent, metrics) = Agent::start_with_metrics(&[a.host_end()], &["--resync-interval", "1"]);

    let readyz = || observe::http_get(metrics, "/readyz");
    let unready = readyz().expect_err("ready while another program holds the uplink");
    assert!(unready.contains("not guarded") && unready.contains(a.host_end()), "{unready}");
    let log = agent.log();
    let said =
        lines_with(&log, &["ERROR", "another XDP program (id", a.host_end(), "--trust-iface"]);
    assert!(!said.is_empty(), "no ERROR naming the other program:\n{log}");
    println!("{}\n/readyz: {unready}", said[0]);

    other.unload();
    let took =
        wait_until("the agent attached and ready", Duration::from_secs(10), || readyz().is_ok());
    println!("attached and ready {took:.1?} after the other program left");
    check(a, "guarded now", &[expect("closed", sock(app.ip, 80), false)]);
    agent.unload();
}

/// An L3 uplink (a tun, like wireguard or ipip: no link header) gets the IP-framed XDP entry
/// point: a SYN arriving on it for a closed container port is dropped, one for an exposed port
/// is answered.
#[test]
fn an_l3_uplink_is_guarded_from_its_ip_header_on() {
    let _exclusive = prepare_test_bed();
    let app = App::start("tun", 42, &[("guard.expose", "8080/tcp")], &[80, 8080]);
    let ip = app.ip;
    let _routing = RoutingHost::enable();
    let tun = Tun::new(&format!("{LINK_PREFIX}tun"));
    run("ip", &["addr", "add", "10.251.42.1/24", "dev", tun.name()]);
    run("ip", &["link", "set", tun.name(), "up"]);
    // An outside host behind the tun: the host routes the answer back through it.
    let outside_ip: Ipv4Addr = "10.251.42.2".parse().unwrap();
    let mut next_sport = 41_000;
    let mut answered = |port: u16, within: Duration| {
        next_sport += 1;
        let syn = Tcp { src: outside_ip, dst: ip, sport: next_sport, dport: port, flags: TCP_SYN };
        tun.send(&syn.packet());
        let from = SocketAddrV4::new(ip, port);
        tun.receive_until(within, |p| frames::is_syn_ack(p, from, next_sport))
    };
    assert!(answered(80, PATIENT), "test bed broken: no SYN-ACK through the tun without the agent");

    let (agent, metrics) = Agent::start_with_metrics(&[tun.name()], &[]);
    assert!(xdp_attached(tun.name()), "no XDP program on {}:\n{}", tun.name(), agent.log());
    let text = observe::http_get(metrics, "/metrics").expect("the agent serves /metrics");
    let series =
        format!("guard_attached{{hook=\"xdp\",iface=\"{}\",mode=\"generic/ip\"}}", tun.name());
    assert_eq!(observe::metric(&text, &series), Some(1.0), "{series} in:\n{text}");

    let closed = "guard_packets_total{reason=\"closed\",verdict=\"drop\",audited=\"false\"}";
    let drops_before = observe::metric(&text, closed).unwrap_or(0.0);
    assert!(!answered(80, QUICK), "a SYN to a closed port got through the tun:\n{}", agent.log());
    assert!(answered(8080, PATIENT), "a SYN to an exposed port was dropped on the tun");
    let text = observe::http_get(metrics, "/metrics").expect("the agent serves /metrics");
    let drops = observe::metric(&text, closed).unwrap_or(0.0);
    assert!(
        drops > drops_before,
        "the closed-port drop was not counted ({drops_before} -> {drops})"
    );
    agent.unload();
}

/// An uplink whose driver has no native XDP (macvlan) runs guard in generic mode: the agent
/// says so with the kernel's reason, and `guard status` shows the mode and a warning. (An L3
/// uplink runs generic by design, above: no warning there.)
#[test]
fn a_generic_xdp_fallback_is_said_with_its_cause_and_shown_in_status() {
    let _exclusive = prepare_test_bed();
    let host = OutsideHost::new("gen", 43);
    // Removed with its parent, the outside host's link.
    let macvlan = format!("{LINK_PREFIX}mvl");
    run(
        "ip",
        &["link", "add", &macvlan, "link", host.host_end(), "type", "macvlan", "mode", "bridge"],
    );
    run("ip", &["link", "set", &macvlan, "up"]);
    let (agent, _) = Agent::start_with_metrics(&[&macvlan], &[]);
    assert!(xdp_attached(&macvlan), "no XDP program on {macvlan}:\n{}", agent.log());
    let log = agent.log();
    let said = lines_with(
        &log,
        &["WARN", "native XDP unavailable", "does not support XDP in native mode"],
    );
    assert!(!said.is_empty(), "no warning with the kernel's reason:\n{log}");
    let status = agent.status();
    assert!(status.contains(&format!("{macvlan} (xdp link, generic)")), "{status}");
    assert!(status.contains(&format!("warning: generic XDP on {macvlan}")), "{status}");
    agent.unload();

    // The tun of the test above runs generic by design: no warning.
    let tun = Tun::new(&format!("{LINK_PREFIX}tun"));
    run("ip", &["link", "set", tun.name(), "up"]);
    let (agent, _) = Agent::start_with_metrics(&[tun.name()], &[]);
    let status = agent.status();
    assert!(status.contains(&format!("{} (xdp link, generic)", tun.name())), "{status}");
    assert!(!status.contains("warning: generic XDP"), "{status}");
    agent.unload();
}
