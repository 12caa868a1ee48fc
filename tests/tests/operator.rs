//! Operator experience (issue 5), end to end against a real dockerd and an outside host:
//! the policy file (rules, reload on SIGHUP, a broken file keeps the policy in force), audit
//! mode, `guard explain` against what real traffic does, drop events and their rate limit,
//! `/metrics` and `/healthz`, `guard status --json` with and without a running agent, JSON
//! logs, and `guard check-config`.

use std::{
    fs,
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use guard_userspace::{kernel::maps::PolicyMaps, kernel::pins::Pins};
use nix::{sys::signal::Signal, unistd::Pid};
use tests::{
    agent::{Agent, guard_bin},
    bed::PolicyFile,
    cmd::try_run,
    docker::{Container, ContainerSpec, docker},
    netns::ifindex,
    observe::{http_response, metric},
    probe::{
        Outcome::{self, Silent},
        PATIENT, QUICK,
    },
    wait::poll_every,
};

const SUBNET_V4: &str = "10.249.0.0/24";
const METRICS: &str = "127.0.0.1:19184";

/// One network with a database (published, no label) and a web server (443 exposed by label,
/// 8443 not), outside host A, and a policy file of the test's own. Field order is drop order.
struct Bed {
    db: Container,
    web: Container,
    policy: PolicyFile,
    base: tests::bed::Bed,
}

tests::on_the_common_bed!(Bed);

impl Bed {
    fn new() -> Self {
        let base = tests::bed::Bed::nat_v4("guard-e2e-op", SUBNET_V4, &[("op", 5)]);
        let db = base.run(ContainerSpec {
            name: "op-db",
            ip: Some("10.249.0.10".parse().unwrap()),
            publish: &["25432:5432"],
            command: "exec httpd -f -p 5432 -h /www",
            listens_on: &[5432],
            ..Default::default()
        });
        let web = base.run(ContainerSpec {
            name: "op-web",
            ip: Some("10.249.0.11".parse().unwrap()),
            labels: &[("guard.expose", "443/tcp")],
            publish: &["20443:443", "28443:8443"],
            command: "httpd -p 443 -h /www && exec httpd -f -p 8443 -h /www",
            listens_on: &[443, 8443],
            ..Default::default()
        });
        Bed { db, web, policy: PolicyFile::new("op"), base }
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let config = self.policy.arg();
        let mut args =
            vec!["--config", &config, "--metrics-addr", METRICS, "--resync-interval", "1"];
        args.extend_from_slice(extra);
        self.base.agent(&args)
    }

    fn db(&self) -> SocketAddr {
        SocketAddr::new(self.db.ip().into(), 5432)
    }

    fn db_published(&self) -> SocketAddr {
        SocketAddr::new(self.a().host_v4().into(), 25432)
    }

    /// Writes a policy file whose rule opens db to A, and waits until A reaches it.
    fn open_db_to_a_by_rule(&self, agent: &Agent) {
        let rule = format!(
            "[[rule]]\nname = \"a reaches db\"\nmatch = {{ container = \"guard-e2e-op-db\" }}\nallow = [{{ ports = \"5432/tcp\", from = [\"{}\"] }}]\n",
            self.a().v4()
        );
        self.write_policy(agent, &rule);
        assert!(
            eventually(Duration::from_secs(10), || self.a().tcp_connect(self.db(), QUICK)),
            "the file rule did not open db to A:\n{}",
            agent.log()
        );
    }

    /// Rewrites the policy file and tells the agent to reload it.
    fn write_policy(&self, agent: &Agent, text: &str) {
        fs::write(self.policy.path(), text).unwrap();
        nix::sys::signal::kill(Pid::from_raw(agent.pid() as i32), Signal::SIGHUP).unwrap();
    }
}

/// Polls `check` every 100 ms until it holds or `within` has passed.
fn eventually(within: Duration, check: impl FnMut() -> bool) -> bool {
    poll_every(Duration::from_millis(100), within, check).is_some()
}

/// GET `path` from the agent's HTTP endpoint: (status line, body).
fn http_get(path: &str) -> (String, String) {
    http_response(METRICS.parse().unwrap(), path).unwrap_or_else(|e| panic!("{e}"))
}

fn guard(args: &[&str]) -> std::process::Output {
    Command::new(guard_bin()).args(args).output().expect("run guard")
}

#[test]
fn policy_file_rules_reload_and_audit_mode() {
    let bed = Bed::new();
    let agent = bed.agent(&[]);
    assert_eq!(bed.a().tcp_outcome(bed.db(), QUICK), Silent, "db is not dropped before any rule");

    // A rule opens db to A, without recreating anything.
    bed.open_db_to_a_by_rule(&agent);
    assert!(
        bed.a().tcp_connect(bed.db_published(), PATIENT),
        "db's published port stays closed to A"
    );

    // A broken file is reported with line and column; the rule in force stays.
    bed.write_policy(&agent, "mode = \"permissive\"\n");
    assert!(
        eventually(Duration::from_secs(10), || {
            let log = agent.log();
            log.contains(".toml:1:") && log.contains("keeping the policy in force")
        }),
        "no line:column error for the broken file:\n{}",
        agent.log()
    );
    assert!(bed.a().tcp_connect(bed.db(), PATIENT), "a broken file closed what the rule opened");
    let (_, metrics) = http_get("/metrics");
    assert!(
        metric(&metrics, "guard_config_reloads_total{result=\"error\"}") >= Some(1.0),
        "{metrics}"
    );

    // Audit mode: nothing is dropped, the would-drops are counted as such.
    bed.write_policy(&agent, "mode = \"audit\"\n");
    let audited = "guard_packets_total{reason=\"closed\",verdict=\"pass\",audited=\"true\"}";
    let web_8443 = SocketAddr::new(bed.web.ip().into(), 8443);
    assert!(
        eventually(Duration::from_secs(10), || bed.a().tcp_connect(web_8443, QUICK)),
        "audit mode still drops web:8443:\n{}",
        agent.log()
    );
    let before = metric(&http_get("/metrics").1, audited).unwrap_or(0.0);
    assert!(bed.a().tcp_connect(bed.db(), PATIENT), "audit mode: A cannot reach db");
    let after = metric(&http_get("/metrics").1, audited).unwrap_or(0.0);
    assert!(after > before, "the would-drop counter did not grow ({before} -> {after})");
    assert!(http_get("/metrics").1.contains("guard_audit_mode 1"));

    // Back to enforce: closed again.
    bed.write_policy(&agent, "mode = \"enforce\"\n");
    assert!(
        eventually(Duration::from_secs(10), || bed.a().tcp_outcome(web_8443, QUICK) == Silent),
        "enforce mode did not close web:8443 again"
    );
    agent.unload();
}

#[test]
fn explain_agrees_with_real_traffic() {
    let bed = Bed::new();
    let agent = bed.agent(&[]);
    let a = bed.a().v4().to_string();
    let web = bed.web.ip();
    let cases = [
        (bed.db(), "closed"),
        (bed.db_published(), "closed"),
        (SocketAddr::new(web.into(), 443), "exposed"),
        (SocketAddr::new(bed.a().host_v4().into(), 20443), "exposed"),
        (SocketAddr::new(web.into(), 8443), "closed"),
        (SocketAddr::new(bed.a().host_v4().into(), 28443), "closed"),
    ];
    let pin_dir = agent.pin_dir().to_string_lossy().into_owned();
    for (target, reason) in cases {
        let outcome =
            bed.a().tcp_outcome(target, if reason == "exposed" { PATIENT } else { QUICK });
        let out =
            guard(&["explain", &a, &format!("{target}/tcp"), "--pin-dir", &pin_dir, "--json"]);
        assert!(out.status.success(), "explain {target}: {}", String::from_utf8_lossy(&out.stderr));
        let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("explain --json");
        // A drop is silence; a RST or ICMP error would mean the packet got through.
        let verdict = match outcome {
            Outcome::Answered => "pass",
            Outcome::Silent => "drop",
            Outcome::Refused => panic!("{target}: refused, so neither dropped nor served"),
        };
        assert_eq!(e["verdict"], verdict, "explain {target} disagrees with real traffic: {e}");
        assert_eq!(e["reason"], reason, "explain {target}: {e}");
        assert!(e["container"].as_str().is_some_and(|c| c.starts_with("guard-e2e-op-")), "{e}");
        assert!(e["rule"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
    }
    // The text form: the verdict alone on the first line.
    let out = guard(&["explain", &a, &format!("{}/tcp", bed.db()), "--pin-dir", &pin_dir]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().next(), Some("drop"));

    // A container's name stands for its address.
    let by_name = |dst: String| {
        let out = guard(&["explain", &a, &dst, "--pin-dir", &pin_dir, "--json"]);
        assert!(out.status.success(), "explain {dst}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("explain --json")
    };
    let named = by_name(format!("{}:5432/tcp", bed.db.name()));
    let addressed = by_name(format!("{}/tcp", bed.db()));
    assert_eq!(named, addressed, "explain by name and by address");
    let out = guard(&["explain", &a, "guard-e2e-op-nosuch:80", "--pin-dir", &pin_dir]);
    assert!(!out.status.success(), "an unknown container is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running container named"));

    // Asking is not traffic: no drop is counted, per reason or per container port.
    let maps = PolicyMaps::from_pins(&Pins::new(agent.pin_dir())).expect("the agent's maps");
    let drops = |maps: &PolicyMaps| {
        let closed = maps
            .counters()
            .unwrap()
            .into_iter()
            .find(|(d, _)| d.reason == guard_common::reason::Reason::Closed && !d.audited);
        (closed, maps.drops().unwrap())
    };
    let before = drops(&maps);
    for _ in 0..3 {
        let out = guard(&["explain", &a, &format!("{}/tcp", bed.db()), "--pin-dir", &pin_dir]);
        assert!(out.status.success(), "explain: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(drops(&maps), before, "explain moved the drop counters");

    // An interface guard does not run on is said to be one.
    let out = guard(&[
        "explain",
        &a,
        &format!("{}/tcp", bed.db()),
        "--iface",
        "lo",
        "--pin-dir",
        &pin_dir,
        "--json",
    ]);
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("explain --json");
    assert_eq!(
        (e["verdict"].as_str(), e["reason"].as_str()),
        (Some("pass"), Some("not_guarded")),
        "{e}"
    );
    agent.unload();
}

#[test]
fn drops_metrics_status_and_json_logs() {
    let bed = Bed::new();
    let mut agent = bed.agent(&["--log-format", "json"]);
    let pin_dir = agent.pin_dir().to_string_lossy().into_owned();

    // A few connection attempts, then a bounded UDP burst to a closed port: far over the
    // kernel's event budget (50 per CPU and second), so some events must be suppressed.
    assert_eq!(bed.a().tcp_outcome(bed.db(), QUICK), Silent);
    assert_eq!(bed.a().tcp_outcome(bed.db_published(), QUICK), Silent);
    let target = SocketAddr::new(bed.db.ip().into(), 5999);
    let sent = bed.a().netns().run(|| {
        let socket = UdpSocket::bind((bed.a().v4(), 0)).unwrap();
        (0..2000).filter(|_| socket.send_to(b"x", target).is_ok()).count()
    });
    assert_eq!(sent, 2000);

    // Drop events name the container and port.
    let drops = guard(&["drops", "--json", "--metrics-addr", METRICS]);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&drops.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON drop record"))
        .collect();
    assert!(
        records.iter().any(|r| r["container"] == "guard-e2e-op-db"
            && r["container_port"] == 5432
            && r["path"] == "published"),
        "no published drop of db:5432 in {records:?}"
    );
    assert!(records.iter().any(|r| r["container_port"] == 5432 && r["path"] == "direct"));
    let text = guard(&["drops", "--metrics-addr", METRICS]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("(container guard-e2e-op-db port 5432/tcp"), "{text}");
    // Each line starts with its UTC time; --limit keeps the last ones, --since the recent.
    let stamped = text.lines().all(|l| l.len() > 24 && &l[10..11] == "T" && &l[23..24] == "Z");
    assert!(stamped, "lines without a timestamp:\n{text}");
    let last = guard(&["drops", "--json", "--limit", "3", "--metrics-addr", METRICS]);
    let last: Vec<&str> = std::str::from_utf8(&last.stdout).unwrap().lines().collect();
    let all: Vec<&str> = std::str::from_utf8(&drops.stdout).unwrap().lines().collect();
    assert_eq!(last.len(), 3, "{last:?}");
    assert!(all.len() >= 3 && all.ends_with(&last[..]), "--limit 3 is not the last three");
    let future = guard(&["drops", "--since", "0s", "--metrics-addr", METRICS]);
    assert!(future.stdout.is_empty(), "{}", String::from_utf8_lossy(&future.stdout));
    assert!(String::from_utf8_lossy(&future.stderr).contains("no drops in the last"));

    // Metrics, scraped while it runs; the build they come from is one of them, and the one
    // `guard version` names.
    let (status, metrics) = http_get("/metrics");
    assert!(status.contains("200"), "{status}");
    // The reference parser reads it, and no series appears twice (Prometheus would reject
    // the scrape).
    let samples = tests::observe::parse_exposition(&metrics).unwrap_or_else(|e| panic!("{e}"));
    let mut seen = std::collections::BTreeSet::new();
    for (name, labels, _) in &samples {
        assert!(seen.insert((name, labels)), "{name}{labels:?} appears twice in\n{metrics}");
    }
    println!("/metrics: {} samples, each series once", samples.len());
    let version = String::from_utf8_lossy(&guard(&["version"]).stdout).into_owned();
    let commit = version.split("commit ").nth(1).and_then(|v| v.split(',').next());
    let commit = commit.unwrap_or_else(|| panic!("no commit in `guard version`: {version}"));
    assert!(
        metrics.contains(&format!(
            "guard_build_info{{version=\"{}\",commit=\"{commit}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "no guard_build_info for {version} in {metrics}"
    );
    for needle in [
        "guard_container_drops_total{container=\"guard-e2e-op-db\",port=\"5432\",proto=\"tcp\",path=\"published\",stage=\"xdp\",audited=\"false\"}",
        "guard_docker_connected 1",
        "guard_synced 1",
        "guard_sync_duration_seconds_count",
        "guard_map_entries{map=\"GUARD_ADDRS\"}",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}:\n{metrics}");
    }
    assert!(
        metric(
            &metrics,
            "guard_packets_total{reason=\"closed\",verdict=\"drop\",audited=\"false\"}"
        ) >= Some(2000.0)
    );
    assert!(
        metric(&metrics, "guard_drop_events_total{outcome=\"suppressed\"}") > Some(0.0),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("guard_attached{{hook=\"xdp\",iface=\"{}\"", bed.a().host_end()))
    );
    assert!(http_get("/healthz").0.contains("200"));

    // Status, while the agent runs and after it stopped: it reads the pins and Docker.
    for running in [true, false] {
        if !running {
            agent.terminate();
        }
        let out = guard(&["status", "--json", "--pin-dir", &pin_dir, "--config", "/nonexistent"]);
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
        assert_eq!(report["protection"]["loaded"], true);
        assert_eq!(report["protection"]["pending_changes"], 0, "{report}");
        let db = report["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "guard-e2e-op-db")
            .unwrap_or_else(|| panic!("db missing from {report}"));
        assert_eq!(db["ports"][0]["port"], 5432);
        assert_eq!(db["ports"][0]["outside"]["who"], "none");
        let table = guard(&["status", "--pin-dir", &pin_dir, "--config", "/nonexistent"]);
        assert!(String::from_utf8_lossy(&table.stdout).contains("guard-e2e-op-web"));
    }

    // A drop while no agent runs is told by the next one once it has synced, with the
    // container's and the interface's names (the pins dropped it; its event waited).
    assert_eq!(bed.a().tcp_outcome(bed.db(), QUICK), Silent);
    agent.restart();
    agent.wait_for(&format!(
        "(container guard-e2e-op-db port 5432/tcp, direct) on {}",
        bed.a().host_end()
    ));

    // Every log line the agent wrote is JSON.
    let log = agent.log();
    assert!(log.lines().count() > 3, "{log}");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    agent.unload();
}

#[test]
fn check_config_validates_without_touching_anything() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/guard.toml");
    let ok = guard(&["check-config", example]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains(": ok (mode enforce, 5 rules"));

    let bad = std::env::temp_dir().join(format!("guard-e2e-bad-{}.toml", std::process::id()));
    fs::write(&bad, "[[rule]]\nmatch = { container = \"db\" }\nexpose = [\"443/icmp\"]\n").unwrap();
    let out = guard(&["check-config", &bad.to_string_lossy()]);
    fs::remove_file(&bad).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".toml:3:") && err.contains("icmp"), "{err}");

    // A deny file with a line that is no address fails the check, naming file and line.
    let deny = std::env::temp_dir().join(format!("guard-e2e-deny-{}.txt", std::process::id()));
    fs::write(&deny, "192.0.2.7\n# fine\nexample.com\n").unwrap();
    fs::write(&bad, format!("deny_files = [\"{}\"]\n", deny.display())).unwrap();
    let out = guard(&["check-config", &bad.to_string_lossy()]);
    let _ = (fs::remove_file(&bad), fs::remove_file(&deny));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".txt:3: `example.com`"), "{err}");
}

/// What the operator is told at start, and what a vanished file changes: an interface both
/// guarded and trusted is refused before anything is loaded; a --config path with no file and
/// a --trust-iface that names no interface are warned about; once synced, one line says what
/// is guarded; a policy file that vanishes keeps its rules in force, with a warning.
#[test]
fn the_start_says_what_is_guarded_and_what_was_ignored() {
    let bed = Bed::new();
    let iface = bed.a().host_end();
    let conflict_pins = format!("/sys/fs/bpf/guard-e2e-op-conflict-{}", std::process::id());
    let refused = guard(&[
        "run",
        "--iface",
        iface,
        "--trust-iface",
        iface,
        "--pin-dir",
        &conflict_pins,
        "--metrics-addr",
        METRICS,
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "guarded and trusted at once was accepted: {stderr}");
    assert!(stderr.contains("both --iface") && stderr.contains(iface), "{stderr}");
    assert!(!std::path::Path::new(&conflict_pins).exists(), "the refused start pinned something");

    let missing =
        std::env::temp_dir().join(format!("guard-e2e-op-absent-{}.toml", std::process::id()));
    let missing = missing.to_string_lossy().into_owned();
    let args = ["--config", &missing, "--metrics-addr", METRICS, "--resync-interval", "1"];
    let agent = Agent::start_with(&[iface], &[&args[..], &["--trust-iface", "nosuch0"]].concat());
    let log = agent.log();
    for needle in ["no policy file at this --config path", "--trust-iface names no interface"] {
        assert!(log.contains(needle), "no warning `{needle}`:\n{log}");
    }
    let summary = log.lines().find(|l| l.contains("guarding") && l.contains("uplinks="));
    let summary = summary.unwrap_or_else(|| panic!("no start-up summary:\n{log}"));
    println!("{summary}");
    assert!(summary.contains(&format!("{iface} (native)")), "{summary}");
    assert!(summary.contains("containers=") && summary.contains("mode=enforce"), "{summary}");
    agent.unload();

    // A rule in force outlives its file's disappearance.
    let agent = bed.agent(&[]);
    bed.open_db_to_a_by_rule(&agent);
    fs::remove_file(bed.policy.path()).unwrap();
    nix::sys::signal::kill(Pid::from_raw(agent.pid() as i32), Signal::SIGHUP).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || agent.log().contains("the policy file is gone")),
        "no warning for the vanished file:\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(bed.a().tcp_connect(bed.db(), PATIENT), "the vanished file took its rule with it");
    fs::write(bed.policy.path(), "").unwrap();
    agent.unload();
}

/// `guard status` answers from the kernel in each case where it used to answer from its own
/// arguments: without the agent's --config it shows the agent's rule and mode (audit, set on
/// the command line); with Docker unreachable or a broken file it still shows what the kernel
/// holds, by container id; a container the agent has not synced is shown closed, with what is
/// wanted for it. `--check` fails on nothing loaded, on maps out of sync and on no agent.
#[test]
fn status_is_the_kernels_truth_in_every_disagreement() {
    let bed = Bed::new();
    let never = format!("/sys/fs/bpf/guard-e2e-never-{}", std::process::id());
    let out = guard(&["status", "--check", "--pin-dir", &never]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("not loaded"), "{stderr}");

    let mut agent = bed.agent(&["--mode", "audit"]);
    bed.open_db_to_a_by_rule(&agent);
    let pin_dir = agent.pin_dir().to_string_lossy().into_owned();
    let state_dir = agent.state_dir().to_string_lossy().into_owned();
    let status = |extra: &[&str], docker_host: Option<&str>| {
        let mut cmd = Command::new(guard_bin());
        cmd.args(["status", "--pin-dir", &pin_dir, "--state-dir", &state_dir]).args(extra);
        if let Some(host) = docker_host {
            cmd.env("DOCKER_HOST", host);
        }
        cmd.output().expect("run guard status")
    };
    let json = |out: &std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json")
    };
    let port_of = |report: &serde_json::Value, container: &str| {
        let found = report["containers"].as_array().unwrap().iter().find(|c| {
            c["name"] == container || c["id"].as_str().is_some_and(|id| container.starts_with(id))
        });
        let c = found.unwrap_or_else(|| panic!("{container} missing from {report}")).clone();
        c["ports"][0]["outside"].clone()
    };
    let a = format!("{}/32", bed.a().v4());

    // Without the agent's --config: its rule (by name) and its mode, and in sync. (In audit
    // mode A reaches db before the rule is in force: wait for the agent to say it is.)
    let in_force = eventually(Duration::from_secs(10), || {
        let out = status(&["--json", "--config", "/nonexistent", "--check"], None);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|r| port_of(&r, "guard-e2e-op-db")["who"] == "listed")
    });
    assert!(in_force, "the rule never showed in force:\n{}", agent.log());
    let report = json(&status(&["--json", "--config", "/nonexistent", "--check"], None));
    assert_eq!(report["mode"], "audit", "{report}");
    assert_eq!(report["protection"]["agent_running"], true, "{report}");
    assert_eq!(report["protection"]["pending_changes"], 0, "{report}");
    let db = port_of(&report, "guard-e2e-op-db");
    assert_eq!(db["who"], "listed", "{db}");
    assert_eq!(db["sources"], serde_json::json!([a]), "{db}");
    assert!(db["rules"].to_string().contains("a reaches db"), "{db}");

    // Docker unreachable: the kernel's view, by container id, and a note that says why.
    let db_id = docker(&["inspect", "-f", "{{.Id}}", "guard-e2e-op-db"]);
    let report = json(&status(&["--json"], Some("unix:///nonexistent.sock")));
    assert!(report["notes"].to_string().contains("Docker does not answer"), "{report}");
    assert_eq!(port_of(&report, db_id.trim())["sources"], serde_json::json!([a]), "{report}");
    let unsure = status(&["--check"], Some("unix:///nonexistent.sock"));
    assert_eq!(unsure.status.code(), Some(1), "--check passed without Docker");

    // A container the agent has not synced (it is frozen) is closed, and out of sync.
    let pid = Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    let late = bed.run(ContainerSpec {
        name: "op-late",
        labels: &[("guard.expose", "80/tcp")],
        command: "exec httpd -f -p 80 -h /www",
        listens_on: &[80],
        ..Default::default()
    });
    let out = status(&["--json", "--check"], None);
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(out.status.code(), Some(1), "--check passed out of sync");
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of sync"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let late_port = port_of(&report, "guard-e2e-op-late");
    assert_eq!(late_port["who"], "none", "{report}");
    assert!(late_port["differs"].to_string().contains("everyone"), "{late_port}");
    drop(late);

    // A hook detached behind the frozen agent's back: the way in it leaves is an error, and
    // --check fails, until the agent puts it back. XDP on a veth runs native, and says so.
    let in_sync = || status(&["--check"], None).status.success();
    assert!(eventually(Duration::from_secs(10), in_sync), "never in sync:\n{}", agent.log());
    let report = json(&status(&["--json"], None));
    let uplink = bed.a().host_end();
    let xdp = report["protection"]["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hook"] == "xdp" && h["iface"] == uplink);
    assert_eq!(xdp.map(|h| h["xdp_mode"].clone()), Some("native".into()), "{report}");
    let pin = agent.pin_dir().join(format!("links/xdp-{}", ifindex(uplink)));
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    let detached = try_run("bpftool", &["link", "detach", "pinned", &pin.to_string_lossy()]);
    let out = status(&["--json", "--check"], None);
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    detached.unwrap_or_else(|e| panic!("bpftool link detach pinned {}: {e}", pin.display()));
    let missing = format!("NOT GUARDED: no xdp program on {uplink}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains(&missing), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert!(report["errors"].to_string().contains(&missing), "{report}");
    assert!(eventually(Duration::from_secs(10), in_sync), "not restored:\n{}", agent.log());

    // The agent stopped, a broken file given: the kernel's view, the reason, and --check
    // says no agent runs.
    agent.terminate();
    fs::write(bed.policy.path(), "[rule]\n").unwrap();
    let config = bed.policy.path().to_string_lossy().into_owned();
    let out = status(&["--json", "--config", &config], None);
    let report = json(&out);
    assert!(report["notes"].to_string().contains("does not load"), "{report}");
    assert_eq!(port_of(&report, "guard-e2e-op-db")["sources"], serde_json::json!([a]));
    let out = status(&["--check", "--config", &config], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("no agent is running"), "{stderr}");
    agent.unload();
}

/// `guard ban` closes every exposed port to a source at once (by address and published port),
/// with or without a pass of the agent, keeps `status --check` in sync, says why in `explain`,
/// ends on time, survives a crash and restart of the agent (pins and state directory), and
/// `guard unban` lifts it. The policy file's deny files do the same, a broken one keeping its
/// last good entries.
#[test]
fn bans_close_every_exposed_port_to_a_source_and_end_on_time() {
    let bed = Bed::new();
    let mut agent = bed.agent(&[]);
    let pin_dir = agent.pin_dir().to_string_lossy().into_owned();
    let state_dir = agent.state_dir().to_string_lossy().into_owned();
    let a = bed.a().v4().to_string();
    let web = SocketAddr::new(bed.web.ip().into(), 443);
    let web_published = SocketAddr::new(bed.a().host_v4().into(), 20443);
    let reaches = |addr| bed.a().tcp_connect(addr, PATIENT);
    let silent = |addr| bed.a().tcp_outcome(addr, QUICK) == Silent;
    assert!(reaches(web) && reaches(web_published), "A must reach web:443 before any ban");
    let guard_ok = |agent: &Agent, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--pin-dir", &pin_dir, "--state-dir", &state_dir]);
        agent.guard(&all).unwrap_or_else(|e| panic!("guard {args:?}: {e}"))
    };

    // In force as soon as the command returns.
    let said = guard_ok(&agent, &["ban", &a, "--for", "8s", "--reason", "too many logins"]);
    assert!(said.contains(&format!("banned {a}/32 until")), "{said}");
    assert!(silent(web) && silent(web_published), "the banned source still reaches web:443");
    let listed = guard_ok(&agent, &["bans", "--json", "--config", "/nonexistent"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("bans --json");
    assert_eq!(listed["bans"][0]["source"], format!("{a}/32"), "{listed}");
    assert_eq!(listed["bans"][0]["from"], "cli", "{listed}");
    assert_eq!(listed["bans"][0]["reason"], "too many logins", "{listed}");
    let (verdict, reason) = agent.explain(&a, &web.to_string());
    assert_eq!((verdict.as_str(), reason.as_str()), ("drop", "denied"));
    // The agent's passes keep it (it reads the ban), and the maps stay in sync.
    std::thread::sleep(Duration::from_secs(2));
    assert!(silent(web), "an agent pass lifted the ban");
    let check =
        agent.guard(&["status", "--check", "--pin-dir", &pin_dir, "--state-dir", &state_dir]);
    assert!(check.is_ok(), "status --check with a ban: {check:?}");
    assert!(agent.status().contains("denied every container port: 1 addresses"));
    let (_, metrics) = http_get("/metrics");
    assert!(metrics.contains("guard_denied_sources{from=\"cli\"} 1"), "{metrics}");

    // It ends on time.
    assert!(
        eventually(Duration::from_secs(15), || bed.a().tcp_connect(web, QUICK)),
        "the ban did not end:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("ban ended"), "the end of the ban is not logged");

    // Without an end, it survives a crash and restart; unban lifts it.
    guard_ok(&agent, &["ban", &a]);
    assert!(silent(web_published), "a second ban is not in force");
    agent.kill();
    assert!(silent(web_published), "the ban fell with the agent");
    agent.restart();
    std::thread::sleep(Duration::from_secs(2));
    assert!(silent(web_published), "the restarted agent lifted the ban");
    guard_ok(&agent, &["unban", &a]);
    assert!(reaches(web_published), "unban did not lift the ban");
    let again = agent.guard(&["unban", &a, "--pin-dir", &pin_dir, "--state-dir", &state_dir]);
    assert!(again.is_err_and(|e| e.contains("is not banned")), "a second unban must say so");

    // A deny file named by the policy file; a broken edit keeps its last good entries.
    let deny_file = std::env::temp_dir().join(format!("guard-e2e-deny-{}.txt", std::process::id()));
    fs::write(&deny_file, format!("# abusers\n{a}\n")).unwrap();
    bed.write_policy(&agent, &format!("deny_files = [\"{}\"]\n", deny_file.display()));
    assert!(
        eventually(Duration::from_secs(10), || silent(web)),
        "the deny file did not deny A:\n{}",
        agent.log()
    );
    fs::write(&deny_file, format!("{a}\nnot-an-address\n")).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(silent(web), "a broken deny file lifted its last good entries");
    assert!(agent.log().contains("not-an-address"), "the bad line is not named in the log");
    fs::write(&deny_file, "# nobody\n").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || bed.a().tcp_connect(web, QUICK)),
        "emptying the deny file did not lift its entry:\n{}",
        agent.log()
    );
    let _ = fs::remove_file(&deny_file);
    agent.unload();
}
