//! Ban lists from the tools operators already run (issue 16): a real fail2ban banning through
//! deploy/fail2ban's action, and a real CrowdSec local API followed by `guard run
//! --crowdsec-url`. A banned outside host reaches no exposed container port, by published
//! port or by address, while another outside host still does; lifting the ban restores it.
//! Two harness checks run without an agent: fail2ban runs the action with the arguments
//! `guard ban` expects, and the bouncer client follows a real LAPI through its restart.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use guard_userspace::{
    crowdsec::{self, Bans, CrowdSec},
    policy::Cidr,
};
use tests::{
    Exclusive,
    agent::{Agent, guard_bin},
    crowdsec::Lapi,
    daemon::ScratchDir,
    docker::{Container, ContainerSpec, Network},
    fail2ban::{self, Fail2ban, Jail},
    host::RoutingHost,
    netns::OutsideHost,
    prepare_test_bed,
    probe::{PATIENT, QUICK},
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
    a: OutsideHost,
    b: OutsideHost,
    web: Container,
    _net: Network,
    /// The container's `/log`.
    logs: ScratchDir,
    _routing: RoutingHost,
    _exclusive: Exclusive,
}

impl Bed {
    fn new() -> Self {
        let exclusive = prepare_test_bed();
        let logs = ScratchDir::new("bans-log");
        let net = Network::create("guard-e2e-bans", SUBNET_V4, None);
        let volume = format!("{}:/log", logs.path().display());
        let web = Container::run(ContainerSpec {
            name: "bans-web",
            network: Some(&net),
            ip: Some(WEB_IP.parse().unwrap()),
            labels: &[("guard.expose", "80/tcp,443/tcp")],
            publish: &["20080:80", "20443:443"],
            command: "touch /log/auth.log && httpd -p 443 -h /www && exec httpd -f -p 80 -h /www",
            listens_on: &[80, 443],
            volumes: &[&volume],
            ..Default::default()
        });
        let routing = RoutingHost::enable();
        let a = OutsideHost::new("bans-a", 36);
        let b = OutsideHost::new("bans-b", 37);
        for host in [&a, &b] {
            host.route_via_host(SUBNET_V4);
        }
        Bed { a, b, web, _net: net, logs, _routing: routing, _exclusive: exclusive }
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        Agent::start_with(&[self.a.host_end(), self.b.host_end()], extra)
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
        let deadline = Instant::now() + tests::patience(TAKES_EFFECT);
        loop {
            let timeout = if open { PATIENT } else { QUICK };
            let reached = self.reached(&self.a, timeout);
            let done =
                if open { reached.len() == self.doors(&self.a).len() } else { reached.is_empty() };
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: A reaches {reached:?} after {TAKES_EFFECT:?}\n{}",
                agent.log()
            );
        }
        let b_reached = self.reached(&self.b, PATIENT);
        assert_eq!(b_reached, self.doors(&self.b), "{what}: B must reach every exposed port");
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
    let a = bed.a.v4().to_string();
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
    let a = bed.a.v4().to_string();
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
    let deadline = Instant::now() + Duration::from_secs(10);
    let recorded = loop {
        let recorded = fs::read_to_string(&calls).unwrap_or_default();
        if recorded.lines().count() >= want.len() || Instant::now() > deadline {
            break recorded;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(recorded.lines().collect::<Vec<_>>(), want, "\n{}", f2b.log());
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
    let in_an_hour = guard_userspace::bans::now() + 3600;
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
    let deadline = Instant::now() + tests::patience(TAKES_EFFECT);
    loop {
        let bans = receiver.borrow().clone();
        if check(&bans) {
            return bans;
        }
        assert!(Instant::now() < deadline, "no {what} within {TAKES_EFFECT:?}: {bans:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
