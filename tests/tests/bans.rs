//! Ban lists from the tools operators already run (issue 16): a real fail2ban banning through
//! deploy/fail2ban's action, and a real CrowdSec local API followed by `guard run
//! --crowdsec-url`. A banned outside host reaches no exposed container port, by published
//! port or by address, while another outside host still does; lifting the ban restores it.
//! Two harness checks run without an agent: fail2ban runs the action with the arguments
//! `guard ban` expects, and the bouncer client follows a real LAPI through its restart.
//! Per-source rate limits (`guard.ratelimit`): an outside host flooding SYNs at an exposed
//! port gets its burst and the rate, no more, while another outside host is served.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use guard_userspace::{
    host::crowdsec::{self, Bans, CrowdSec},
    policy::Cidr,
};
use tests::{
    agent::{Agent, guard_bin},
    crowdsec::Lapi,
    daemon::ScratchDir,
    docker::{Container, ContainerSpec},
    fail2ban::{self, Fail2ban, Jail},
    netns::OutsideHost,
    observe::{http_get, map_entry_count, metric},
    probe::{PATIENT, QUICK},
    raw::{self, RawLink},
    wait::{poll_every, poll_for},
};

const SUBNET_V4: &str = "10.236.0.0/24";
const WEB_IP: &str = "10.236.0.10";
/// The container's exposed ports and the host ports that publish them.
const PORTS: [(u16, u16); 2] = [(80, 20080), (443, 20443)];
/// How long a ban (or its lifting) may take to reach the kernel: fail2ban reads its log
/// every second and `guard ban` writes the maps at once; the CrowdSec test polls every
/// second.
const TAKES_EFFECT: Duration = Duration::from_secs(10);

/// A network with one container whose two ports are exposed by label and published, writing
/// its log to a scratch directory on the host; outside hosts A (to be banned) and B. Field
/// order is drop order.
struct Bed {
    web: Container,
    /// The container's `/log`.
    logs: ScratchDir,
    base: tests::bed::Bed,
}

tests::on_the_common_bed!(Bed);

impl Bed {
    fn new() -> Self {
        let base =
            tests::bed::Bed::nat_v4("guard-e2e-bans", SUBNET_V4, &[("bans-a", 36), ("bans-b", 37)]);
        let logs = ScratchDir::new("bans-log");
        let volume = format!("{}:/log", logs.path().display());
        let web = base.run(ContainerSpec {
            name: "bans-web",
            ip: Some(WEB_IP.parse().unwrap()),
            labels: &[("guard.expose", "80/tcp,443/tcp")],
            publish: &["20080:80", "20443:443"],
            command: "touch /log/auth.log && httpd -p 443 -h /www && exec httpd -f -p 80 -h /www",
            listens_on: &[80, 443],
            volumes: &[&volume],
            ..Default::default()
        });
        Bed { web, logs, base }
    }

    /// Every way `host` can reach an exposed port: each port by the container's address and
    /// through the host port that publishes it.
    fn doors(&self, host: &OutsideHost) -> Vec<SocketAddr> {
        let web: IpAddr = WEB_IP.parse().unwrap();
        PORTS
            .iter()
            .flat_map(|&(port, published)| {
                [SocketAddr::new(web, port), SocketAddr::new(host.host_v4().into(), published)]
            })
            .collect()
    }

    /// The doors `host` reaches now.
    fn reached(&self, host: &OutsideHost, timeout: Duration) -> Vec<SocketAddr> {
        self.doors(host).into_iter().filter(|door| host.tcp_connect(*door, timeout)).collect()
    }

    /// Waits until A reaches either every door (`open`) or none, and checks that B reaches
    /// every door all the while.
    fn wait_for_a(&self, open: bool, agent: &Agent, what: &str) {
        let mut reached = Vec::new();
        let done = poll_every(Duration::ZERO, tests::patience(TAKES_EFFECT), || {
            let timeout = if open { PATIENT } else { QUICK };
            reached = self.reached(self.a(), timeout);
            if open { reached.len() == self.doors(self.a()).len() } else { reached.is_empty() }
        });
        assert!(
            done.is_some(),
            "{what}: A reaches {reached:?} after {TAKES_EFFECT:?}\n{}",
            agent.log()
        );
        let b_reached = self.reached(self.b(), PATIENT);
        assert_eq!(b_reached, self.doors(self.b()), "{what}: B must reach every exposed port");
    }

    /// The container writes one failed login of `addr` to its log.
    fn fail_login(&self, addr: &str) {
        let line = format!("echo \"myapp: auth failure from {addr}\" >> /log/auth.log");
        let out = self.web.exec(&["sh", "-c", &line]);
        assert!(out.status.success(), "docker exec: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `--pin-dir P --state-dir S` of `agent`, for the commands fail2ban runs.
fn guard_opts(agent: &Agent) -> String {
    format!("--pin-dir {} --state-dir {}", agent.pin_dir().display(), agent.state_dir().display())
}

#[test]
fn fail2ban_bans_an_outside_host_from_every_exposed_port() {
    let bed = Bed::new();
    let agent = bed.agent(&[]);
    let a = bed.a().v4().to_string();
    bed.wait_for_a(true, &agent, "before any failure");

    let guard = guard_bin();
    let opts = guard_opts(&agent);
    let f2b = Fail2ban::start(Jail {
        guard: &guard,
        guard_opts: &opts,
        logpath: &bed.logs.path().join("auth.log"),
        bantime: 60,
    });
    for _ in 0..3 {
        bed.fail_login(&a);
    }
    f2b.wait_banned(&a);
    bed.wait_for_a(false, &agent, "after fail2ban banned A");
    let bans = agent.guard(&["bans", "--state-dir", &agent.state_dir().to_string_lossy()]);
    let bans = bans.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        bans.contains(&a) && bans.contains(&format!("fail2ban {}", fail2ban::JAIL)),
        "guard bans must list A with fail2ban's reason:\n{bans}"
    );

    f2b.unban(&a);
    bed.wait_for_a(true, &agent, "after fail2ban unbanned A");
    drop(f2b);
}

#[test]
fn crowdsec_decisions_ban_and_unban_an_outside_host() {
    let bed = Bed::new();
    let mut lapi = Lapi::start();
    let key = bed.logs.write("crowdsec.key", &format!("{}\n", lapi.add_bouncer("guard-e2e")));
    let url = lapi.url();
    let agent = bed.agent(&[
        "--crowdsec-url",
        &url,
        "--crowdsec-key-file",
        &key.to_string_lossy(),
        "--crowdsec-poll",
        "1s",
    ]);
    let a = bed.a().v4().to_string();
    bed.wait_for_a(true, &agent, "before any decision");

    lapi.ban(&a, "1h");
    bed.wait_for_a(false, &agent, "after `cscli decisions add -i A`");

    // Down long enough for several polls to fail, then back with the same database.
    lapi.stop();
    std::thread::sleep(Duration::from_secs(3));
    bed.wait_for_a(false, &agent, "while the LAPI is down");
    lapi.start_again();
    std::thread::sleep(Duration::from_secs(3));
    bed.wait_for_a(false, &agent, "after the LAPI restarted");
    let log = agent.log();
    assert!(log.contains("keeping the 1 bans it gave"), "no warning of the outage:\n{log}");
    assert!(log.contains("answers again"), "no word that the LAPI is back:\n{log}");

    lapi.unban(&a);
    bed.wait_for_a(true, &agent, "after `cscli decisions delete -i A`");
}

/// The action file as fail2ban runs it, with a stand-in `guard` that records its arguments:
/// the jail's bantime becomes `--for`, a permanent ban has none, unban follows fail2ban's.
#[test]
fn fail2ban_runs_the_action_with_guard_ban_arguments() {
    let dir = ScratchDir::new("f2b-action");
    let calls = dir.path().join("calls");
    let guard = dir.write("guard", &format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display()));
    make_executable(&guard);
    let log = dir.write("auth.log", "");
    let opts = "--pin-dir /sys/fs/bpf/x --state-dir /var/lib/x";
    let f2b = Fail2ban::start(Jail { guard: &guard, guard_opts: opts, logpath: &log, bantime: 60 });
    let line = "myapp: auth failure from 192.0.2.7\n";
    fs::write(&log, line.repeat(3)).unwrap();
    f2b.wait_banned("192.0.2.7");
    f2b.client(&["set", fail2ban::JAIL, "bantime", "-1"]).unwrap();
    f2b.ban("2001:db8::7");
    f2b.unban("192.0.2.7");
    let want = [
        format!("ban 192.0.2.7 --for 60s --reason fail2ban guard-test {opts}"),
        format!("ban 2001:db8::7 --reason fail2ban guard-test {opts}"),
        format!("unban 192.0.2.7 {opts}"),
    ];
    let mut recorded = String::new();
    poll_every(Duration::from_millis(100), Duration::from_secs(10), || {
        recorded = fs::read_to_string(&calls).unwrap_or_default();
        recorded.lines().count() >= want.len()
    });
    assert_eq!(recorded.lines().collect::<Vec<_>>(), want, "\n{}", f2b.log());
}

/// deploy/fail2ban's drops filter, through `fail2ban-regex`, no agent: a full drop line and a
/// summary with a ban reason are one failure each; a summary of rate-limited or audited drops
/// and the line of sources beyond the cap are none. The lines are the agent's, as its unit
/// tests pin them (guard-userspace/src/telemetry/events/drops.rs and summary.rs).
#[test]
fn fail2ban_drops_filter_counts_full_lines_and_summaries() {
    let filter = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/fail2ban/filter.d/container-guard-drops.conf"
    );
    let line = |time: &str, sentence: &str, fields: &str| {
        format!("2026-12-07T16:{time}.316657Z  INFO guard::drops: {sentence} {fields}\n")
    };
    let summary = |time, src: &str, reasons: &str, audited| {
        let sentence = format!(
            "dropped 3 more from {src} in 10s (destination ports: 2, first 23, last 23): x"
        );
        let fields = format!(
            "src={src} dst=10.0.0.5 proto=tcp container=db port=5432 path=published \
             reasons={reasons} audited={audited} iface=eth0 repeats=3 dports=2 first_dport=23 \
             last_dport=23"
        );
        line(time, &sentence, &fields)
    };
    let lines = [
        line(
            "06:49",
            "dropped tcp 203.0.113.9:40000 -> 10.0.0.5:5432 (container db port 5432/tcp, published) on eth0: closed",
            "src=203.0.113.9 sport=40000 dst=10.0.0.5 dport=5432 proto=tcp container=db \
             port=5432 path=published reason=closed audited=false iface=eth0",
        ),
        summary("06:59", "203.0.113.9", "closed,rate_limited", false),
        summary("07:00", "198.51.100.7", "rate_limited,denied", false),
        summary("07:01", "192.0.2.5", "rate_limited", false),
        summary("07:02", "192.0.2.6", "closed", true),
        line(
            "07:03",
            "517 more drops from 300 other sources in 10s, beyond the 256 summarised one by one (guard drops lists each)",
            "more_sources=300 repeats=517",
        ),
    ];
    let dir = ScratchDir::new("f2b-filter");
    let log = dir.write("guard.log", &lines.concat());
    let log = log.to_string_lossy();
    let matched = tests::cmd::try_run("fail2ban-regex", &["-o", "ip", &log, filter])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        matched.lines().collect::<Vec<_>>(),
        ["203.0.113.9", "203.0.113.9", "198.51.100.7"],
        "{}",
        lines.concat()
    );
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// guard's bouncer client against a real LAPI, no agent: a decision arrives within a poll,
/// survives the LAPI's restart, and its deletion ends the ban.
#[test]
fn crowdsec_stream_client_follows_a_real_lapi() {
    let mut lapi = Lapi::start();
    let config = CrowdSec {
        url: lapi.url(),
        key: lapi.add_bouncer("guard-client"),
        poll: Duration::from_millis(500),
    };
    // The client runs on the runtime's worker while this thread drives cscli and waits.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (sender, receiver) = tokio::sync::watch::channel(Bans::new());
    let follower = runtime.spawn(crowdsec::follow(config, sender));
    let source: Cidr = "192.0.2.7".parse().unwrap();
    let banned = |bans: &BTreeMap<Cidr, Option<u64>>| bans.contains_key(&source);

    lapi.ban("192.0.2.7", "1h");
    let until = wait_for(&receiver, "the decision", banned);
    let expiry = until[&source].expect("a 1h decision has an end");
    let in_an_hour = guard_userspace::cli::bans::now() + 3600;
    assert!(expiry.abs_diff(in_an_hour) < 30, "ends at {expiry}, not about {in_an_hour}");

    lapi.stop();
    std::thread::sleep(Duration::from_secs(2));
    assert!(banned(&receiver.borrow()), "an LAPI that is down lifts no ban");
    lapi.start_again();
    std::thread::sleep(Duration::from_secs(2));
    assert!(banned(&receiver.borrow()), "the restarted LAPI still has the decision");

    lapi.unban("192.0.2.7");
    wait_for(&receiver, "the deletion", |bans| !banned(bans));
    follower.abort();
}

/// Waits until the published bans satisfy `check`; them.
fn wait_for(
    receiver: &tokio::sync::watch::Receiver<Bans>,
    what: &str,
    check: impl Fn(&Bans) -> bool,
) -> Bans {
    let mut last = None;
    let found = poll_for(Duration::from_millis(100), tests::patience(TAKES_EFFECT), || {
        let bans = receiver.borrow().clone();
        if check(&bans) {
            return Some(bans);
        }
        last = Some(bans);
        None
    });
    found.unwrap_or_else(|| panic!("no {what} within {TAKES_EFFECT:?}: {last:?}"))
}

// ---------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------

const RATE_SUBNET: &str = "10.238.0.0/24";
const RATE_WEB: Ipv4Addr = Ipv4Addr::new(10, 238, 0, 10);
const RATE_BAD: Ipv4Addr = Ipv4Addr::new(10, 238, 0, 11);
/// The limit under test: a burst of 20 new flows per source, then 10 a second.
const RATE: (u32, u32) = (10, 20);
/// SYNs A sends, in rounds of [`ROUND`] back to back with [`ROUND_GAP`] between: about ten
/// times the rate, for about three seconds.
const FLOOD: u16 = 300;
const ROUND: u16 = 10;
const ROUND_GAP: Duration = Duration::from_millis(100);

/// An exposed web container limited to [`RATE`] per source, and one whose limit does not parse
/// (`10/h`); outside hosts A (the flood) and B, the agent with its metrics on loopback. Field
/// order is drop order.
struct RateBed {
    agent: Agent,
    metrics: SocketAddr,
    _web: Container,
    _bad: Container,
    base: tests::bed::Bed,
}

tests::on_the_common_bed!(RateBed);

impl RateBed {
    fn new() -> Self {
        let base = tests::bed::Bed::nat_v4(
            "guard-e2e-rate",
            RATE_SUBNET,
            &[("rate-a", 38), ("rate-b", 39)],
        );
        let limit = format!("80/tcp {}/s burst {}", RATE.0, RATE.1);
        let web = base.run(ContainerSpec {
            name: "rate-web",
            ip: Some(RATE_WEB),
            labels: &[("guard.expose", "80/tcp"), ("guard.ratelimit", &limit)],
            command: "exec httpd -f -p 80 -h /www",
            listens_on: &[80],
            ..Default::default()
        });
        let bad = base.run(ContainerSpec {
            name: "rate-bad",
            ip: Some(RATE_BAD),
            labels: &[("guard.expose", "80/tcp"), ("guard.ratelimit", "80/tcp 10/h")],
            command: "exec httpd -f -p 80 -h /www",
            listens_on: &[80],
            ..Default::default()
        });
        let (agent, metrics) = base.agent_with_metrics(&[]);
        RateBed { agent, metrics, _web: web, _bad: bad, base }
    }

    /// Port 80 of the web container in `guard status --json`.
    fn web_port_status(&self) -> serde_json::Value {
        let status: serde_json::Value = serde_json::from_str(&self.agent.status_json())
            .unwrap_or_else(|e| panic!("status --json: {e}"));
        status["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "guard-e2e-rate-web")
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .find(|p| p["port"] == 80)
            .unwrap_or_else(|| panic!("no port 80 of rate-web in {status}"))
    }

    /// `guard ARGS --pin-dir P` of this agent, or the test fails with its log.
    fn guard(&self, args: &[&str]) -> String {
        let pin_dir = self.agent.pin_dir().to_string_lossy().into_owned();
        let mut args = args.to_vec();
        args.extend(["--pin-dir", &pin_dir]);
        self.agent
            .guard(&args)
            .unwrap_or_else(|e| panic!("guard {args:?}: {e}\n{}", self.agent.log()))
    }
}

/// A's raw SYNs from [`FLOOD`] source ports to the web container, in rounds, reading SYN-ACKs
/// between them: the source ports that were answered, and how long the sending took.
fn flood_syns(a: &OutsideHost) -> (BTreeSet<u16>, Duration) {
    let link = RawLink::open(a.netns(), "uplink0");
    let host_mac = raw::host_mac(a.host_end());
    let to = SocketAddr::from((RATE_WEB, 80));
    let from = |port: u16| SocketAddr::from((a.v4(), port));
    let mut answered = BTreeSet::new();
    let mut record = |frame: &[u8]| {
        if let Some(received) = raw::parse_frame(frame) {
            answered.extend((0..FLOOD).map(|i| 20000 + i).filter(|&port| {
                raw::syn_answer(&received, from(port), to) == Some(tests::probe::Outcome::Answered)
            }));
        }
        false
    };
    let started = Instant::now();
    let mut sent = 0;
    while sent < FLOOD {
        for port in (sent..sent + ROUND).map(|i| 20000 + i) {
            link.send(&raw::syn_frame(host_mac, link.mac, &[], from(port), to));
        }
        sent += ROUND;
        if sent < FLOOD {
            link.watch(ROUND_GAP, &mut record);
        }
    }
    let sending = started.elapsed();
    // Late answers (none are retransmitted: A's own kernel resets every SYN-ACK it gets).
    link.watch(PATIENT, &mut record);
    (answered, sending)
}

#[test]
fn a_rate_limit_holds_a_syn_flood_to_its_burst_and_rate_while_another_host_is_served() {
    let mut bed = RateBed::new();
    let web = SocketAddr::from((RATE_WEB, 80));
    assert!(bed.b().tcp_connect(web, PATIENT), "B reaches the exposed port before the flood");

    // B connects one at a time all through A's flood.
    let (flood, b_outcomes) = std::thread::scope(|scope| {
        let b = scope.spawn(|| {
            let mut outcomes = Vec::new();
            for _ in 0..12 {
                outcomes.push(bed.b().tcp_connect(web, PATIENT));
                std::thread::sleep(Duration::from_millis(200));
            }
            outcomes
        });
        let flood = flood_syns(bed.a());
        (flood, b.join().expect("B's connections"))
    });
    let (answered, sending) = flood;
    assert!(b_outcomes.iter().all(|ok| *ok), "B's connections during the flood: {b_outcomes:?}");

    // The burst, the rate over the time it took, and a few more per CPU (the bucket is shared
    // by every CPU without a lock: see guard_common::ratelimit).
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let bound = f64::from(RATE.1) + f64::from(RATE.0) * sending.as_secs_f64() + 2.0 * cpus + 2.0;
    println!(
        "flood: {FLOOD} SYNs in {sending:?}, {} answered (bound {bound:.0}), B: {} of {} connected",
        answered.len(),
        b_outcomes.len(),
        b_outcomes.len()
    );
    assert!(
        answered.len() >= RATE.1 as usize,
        "the burst of {} must be let in, {} were:\n{}",
        RATE.1,
        answered.len(),
        bed.agent.log()
    );
    assert!(
        answered.len() as f64 <= bound,
        "{} of {FLOOD} SYNs answered in {sending:?}: over the limit's bound {bound:.0}\n{}",
        answered.len(),
        bed.agent.log()
    );

    // Counted per reason and per container port; sampled as drop events of their own reason.
    let text = http_get(bed.metrics, "/metrics").unwrap_or_else(|e| panic!("scrape: {e}"));
    let limited = metric(
        &text,
        "guard_packets_total{reason=\"rate_limited\",verdict=\"drop\",audited=\"false\"}",
    );
    assert!(limited.is_some_and(|n| n >= 1.0), "no rate_limited drops counted:\n{text}");
    let per_port = metric(
        &text,
        "guard_container_rate_limited_total{container=\"guard-e2e-rate-web\",port=\"80\",proto=\"tcp\",path=\"direct\",stage=\"xdp\",audited=\"false\"}",
    );
    assert!(per_port.is_some_and(|n| n >= 1.0), "no per-port rate-limited count:\n{text}");
    let metrics = bed.metrics.to_string();
    let drops = bed.agent.guard(&["drops", "--json", "--metrics-addr", &metrics]);
    let drops = drops.unwrap_or_else(|e| panic!("guard drops: {e}"));
    assert!(
        drops
            .lines()
            .any(|l| l.contains("\"reason\":\"rate_limited\"")
                && l.contains("\"container_port\":80")),
        "no rate_limited drop event at port 80:\n{drops}"
    );
    // The log is bounded: A's drops are its first in full and then a summary per 10 s
    // window, while `guard drops` keeps every one.
    let a_src = format!("\"src\":\"{}\"", bed.a().v4());
    let kept = drops.lines().filter(|l| l.contains(&a_src)).count();
    let log = bed.agent.log();
    let a_field = format!(" src={} ", bed.a().v4());
    let logged = log.lines().filter(|l| l.contains(" guard::drops: ") && l.contains(&a_field));
    let logged = logged.count();
    println!("A's drops: {kept} kept for guard drops, {logged} lines logged");
    assert!(
        kept >= 20 && (1..=kept / 10).contains(&logged),
        "{kept} drops of A kept, {logged} logged:\n{log}"
    );

    // `guard status` shows the limit beside the opening, and what it dropped.
    println!("{}", bed.agent.status());
    let port = bed.web_port_status();
    assert_eq!(port["limit"]["rate"], format!("{}/s burst {}", RATE.0, RATE.1), "{port}");
    assert!(port["rate_limited"].as_u64().is_some_and(|n| n >= 1), "{port}");
    // `guard explain` says the limit of the port it opens.
    let explained = bed.guard(&["explain", "198.51.100.7", &format!("{web}/tcp"), "--json"]);
    let explained: serde_json::Value = serde_json::from_str(&explained).expect("explain --json");
    let detail = explained["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!(
            "open to everyone, limited to {} new flows/s per source, burst {}",
            RATE.0, RATE.1
        )),
        "{explained}"
    );

    // After a pause the bucket has refilled: A is served again.
    std::thread::sleep(Duration::from_secs(1));
    assert!(bed.a().tcp_connect(web, PATIENT), "A after a pause\n{}", bed.agent.log());

    // A limit that does not parse is reported and limits nothing: the port stays as its
    // opening says.
    let log = bed.agent.log();
    assert!(
        log.contains("guard-e2e-rate-bad")
            && log.contains("guard.ratelimit")
            && log.contains("N/s"),
        "no warning naming the bad limit:\n{log}"
    );
    assert!(bed.b().tcp_connect(SocketAddr::from((RATE_BAD, 80)), PATIENT));

    // A new agent derives the limit again from the labels, flag and all.
    bed.agent.terminate();
    bed.agent.restart();
    let limits = map_entry_count(bed.agent.pin_dir(), guard_common::maps::RATE_LIMITS);
    assert_eq!(limits, 1, "GUARD_RATES after a restart");
    let port = bed.web_port_status();
    assert_eq!(port["limit"]["rate"], format!("{}/s burst {}", RATE.0, RATE.1), "{port}");
}
