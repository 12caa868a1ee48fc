//! `guard scan` and exposure alerts (issue 21), end to end against a real dockerd and an
//! outside host: the scan lists what the outside host reaches (checked by connecting from it),
//! exits 1 when a pinned map is altered or programs are detached behind the agent's back, and
//! 2 when the loaded program cannot be run; a container started with an exposing label gives
//! one WARN event and one webhook POST; the outside host's flows into opened ports are in the
//! access log, one record each, with the rule that opened them.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use guard_common::maps::OPEN_EVERYONE;
use guard_userspace::{
    host::interfaces::Framing,
    kernel::maps::PolicyMaps,
    kernel::pins::{Hook, Pins},
    state::tables::diff,
};
use serde_json::Value;
use tests::{
    agent::{Agent, guard_bin},
    bed::PolicyFile,
    boot::{bridge_of, started_at},
    docker::{Container, ContainerSpec},
    netns::OutsideHost,
    observe::{free_local_port, http_get, metric},
    probe::{Outcome, PATIENT, Proto, QUICK},
    wait::poll_every,
};

const SUBNET_V4: &str = "10.244.0.0/24";

/// One network with web (80 exposed by label and published as 28080; 8081 listening, neither
/// labelled nor published) and db (published as 25433, no label), a host service the test
/// listens on, and outside host A. Field order is drop order.
struct Bed {
    db: Container,
    web: Container,
    host_service: TcpListener,
    policy: PolicyFile,
    base: tests::bed::Bed,
}

tests::on_the_common_bed!(Bed);

impl Bed {
    fn new() -> Self {
        let base = tests::bed::Bed::nat_v4("guard-e2e-scan", SUBNET_V4, &[("scan", 21)]);
        let web = base.run(ContainerSpec {
            name: "scan-web",
            ip: Some("10.244.0.11".parse().unwrap()),
            labels: &[("guard.expose", "80/tcp")],
            publish: &["28080:80"],
            command: "httpd -p 8081 -h /www && exec httpd -f -p 80 -h /www",
            listens_on: &[80, 8081],
            ..Default::default()
        });
        let db = base.run(ContainerSpec {
            name: "scan-db",
            ip: Some("10.244.0.10".parse().unwrap()),
            publish: &["25433:5432"],
            command: "exec httpd -f -p 5432 -h /www",
            listens_on: &[5432],
            ..Default::default()
        });
        // A host service on every address: the kernel accepts its handshakes without accept().
        let host_service = TcpListener::bind("0.0.0.0:0").unwrap();
        Bed { db, web, host_service, policy: PolicyFile::new("scan"), base }
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let config = self.policy.arg();
        let mut args = vec!["--config", &config, "--resync-interval", "1"];
        args.extend_from_slice(extra);
        self.base.agent(&args)
    }

    fn host_port(&self) -> u16 {
        self.host_service.local_addr().unwrap().port()
    }
}

/// `guard scan --json` against the agent's pins: the exit status and the picture (Null when
/// it printed none), and what it said on stderr.
fn scan(agent: &Agent, config: &std::path::Path) -> (i32, Value, String) {
    let out = Command::new(guard_bin())
        .args(["scan", "--json", "--pin-dir"])
        .arg(agent.pin_dir())
        .arg("--state-dir")
        .arg(agent.state_dir())
        .arg("--config")
        .arg(config)
        .output()
        .expect("run guard scan");
    let picture = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), picture, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The TCP rows an outside host on the bed can aim at: on A's uplink, at the host's address
/// there or at the bed's containers.
fn bed_rows(bed: &Bed, picture: &Value) -> Vec<Value> {
    let host = bed.a().host_v4().to_string();
    picture["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["iface"] == bed.a().host_end() && r["proto"] == "tcp" && r["port"] != 0)
        .filter(|r| {
            r["address"] == host.as_str() || r["address"].as_str().unwrap().starts_with("10.244.0.")
        })
        .cloned()
        .collect()
}

fn endpoint(row: &Value) -> SocketAddr {
    let ip: IpAddr = row["address"].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, row["port"].as_u64().unwrap() as u16)
}

/// A row of `rows` at `addr`.
fn row_at(rows: &[Value], addr: SocketAddr) -> Option<&Value> {
    rows.iter().find(|r| endpoint(r) == addr)
}

/// Connects from A to every row and to `extra`: the rows A reaches must be exactly those the
/// scan says everyone reaches (A is named by no rule).
fn assert_scan_matches_connections(bed: &Bed, rows: &[Value], extra: &[SocketAddr]) {
    let mut targets: Vec<SocketAddr> = rows.iter().map(endpoint).collect();
    targets.extend(extra);
    let probes: Vec<(Proto, SocketAddr, Duration)> =
        targets.iter().map(|t| (Proto::Tcp, *t, PATIENT)).collect();
    let outcomes = bed.a().outcome_all(&probes);
    for (target, outcome) in targets.iter().zip(outcomes) {
        let said = row_at(rows, *target).map(|r| r["reach"]["who"].as_str().unwrap().to_owned());
        let reached = outcome == Outcome::Answered;
        let says_reached = said.as_deref() == Some("everyone");
        assert_eq!(
            reached,
            says_reached,
            "{target}: A {} it, the scan says {said:?}\n{rows:#?}",
            if reached { "reaches" } else { "does not reach" }
        );
    }
}

#[test]
fn scan_lists_exactly_what_the_outside_host_reaches() {
    let bed = Bed::new();
    let agent = bed.agent(&[]);
    let (code, picture, stderr) = scan(&agent, bed.policy.path());
    assert_eq!(code, 0, "a synced agent is not in drift: {stderr}\n{picture:#}");
    let rows = bed_rows(&bed, &picture);
    let host = IpAddr::from(bed.a().host_v4());
    let at = |ip: IpAddr, port| row_at(&rows, SocketAddr::new(ip, port));
    let web = IpAddr::from(bed.web.ip());
    let db = IpAddr::from(bed.db.ip());

    let published_web = at(host, 28080).expect("web's published port is listed");
    assert_eq!(published_web["kind"], "container");
    assert_eq!(published_web["name"], "guard-e2e-scan-web");
    assert_eq!(published_web["container_port"], 80);
    assert_eq!(published_web["reach"]["who"], "everyone");
    assert_eq!(published_web["why"], serde_json::json!(["label guard.expose"]));
    assert_eq!(at(web, 80).expect("web:80 by address")["reach"]["who"], "everyone");
    assert_eq!(at(host, 25433).expect("db's published port")["reach"]["who"], "nobody");
    assert_eq!(at(db, 5432).expect("db:5432 by address")["reach"]["who"], "nobody");
    let service = at(host, bed.host_port()).expect("the test's host service is listed");
    assert_eq!(service["kind"], "host_service");
    assert_eq!(service["why"], serde_json::json!(["host service, not judged"]));
    assert!(at(web, 8081).is_none(), "nothing names web:8081, so no row");
    let hooks: BTreeSet<(String, String)> = picture["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["hook"].as_str().unwrap().to_owned(), h["state"].as_str().unwrap().to_owned()))
        .collect();
    assert!(hooks.contains(&("xdp".into(), "xdp link".into())), "{hooks:?}");
    assert!(hooks.contains(&("bridge-gate".into(), "tcx".into())), "{hooks:?}");

    // What the scan says of each row is what A gets; web:8081, unlisted, is closed.
    let ours: Vec<Value> = rows
        .iter()
        .filter(|r| r["kind"] == "container" || endpoint(r).port() == bed.host_port())
        .cloned()
        .collect();
    assert_scan_matches_connections(&bed, &ours, &[SocketAddr::new(web, 8081)]);

    // The text form says the same.
    let text = Command::new(guard_bin())
        .args(["scan", "--pin-dir"])
        .arg(agent.pin_dir())
        .arg("--state-dir")
        .arg(agent.state_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("host service, not judged") && text.contains("no drift"), "{text}");
}

#[test]
fn scan_exits_1_on_an_altered_map_or_a_detached_program_and_2_when_it_cannot_run() {
    let bed = Bed::new();
    let mut agent = bed.agent(&[]);
    assert_eq!(scan(&agent, bed.policy.path()).0, 0);
    let db_published = SocketAddr::new(bed.a().host_v4().into(), 25433);
    let db_direct = SocketAddr::new(bed.db.ip().into(), 5432);
    agent.kill();

    // Someone with bpffs write access opens every port of db in the pinned maps.
    let pins = Pins::new(agent.pin_dir());
    let mut maps = PolicyMaps::from_pins(&pins).unwrap();
    let current = maps.read().unwrap();
    let mut altered = current.clone();
    let db = bed.db.ip();
    let target = altered
        .addrs
        .iter()
        .find(|(a, _)| IpAddr::from(**a) == IpAddr::from(db))
        .map(|(_, i)| i.target)
        .expect("db in the maps");
    for info in altered.addrs.values_mut().filter(|i| i.target == target) {
        info.all_ports = OPEN_EVERYONE;
    }
    for p in altered.published.values_mut().filter(|p| p.target == target) {
        p.all_ports = OPEN_EVERYONE;
    }
    assert!(maps.apply(&diff(&current, &altered)).is_empty());
    let (code, picture, stderr) = scan(&agent, bed.policy.path());
    assert_eq!(code, 1, "an altered map is drift: {stderr}\n{picture:#}");
    let rows = bed_rows(&bed, &picture);
    let row = row_at(&rows, db_published).expect("db's published port");
    assert_eq!(row["reach"]["who"], "everyone", "{row:#}");
    assert_eq!(row["policy"]["who"], "nobody", "{row:#}");
    assert!(row["drift"].is_string(), "{row:#}");
    assert_scan_matches_connections(
        &bed,
        &[row.clone(), row_at(&rows, db_direct).unwrap().clone()],
        &[],
    );

    // The agent puts the maps back; the scan is clean again.
    agent.restart();
    assert_eq!(scan(&agent, bed.policy.path()).0, 0, "the agent restored the maps");
    agent.kill();

    // Every program that judges db's traffic detached behind the agent's back: XDP and TC
    // egress (which judges containers' SYN-ACKs) on the uplink, the gate on db's bridge.
    let ifindex = |name: &str| -> u32 {
        fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let bridge = bridge_of(&bed.net);
    let detached = [
        (Hook::Xdp, bed.a().host_end()),
        (Hook::TcEgress, bed.a().host_end()),
        (Hook::BridgeGate, bridge.as_str()),
    ];
    for (hook, iface) in detached {
        let pin = pins.link(hook, ifindex(iface));
        let out = Command::new("bpftool")
            .arg("link")
            .arg("detach")
            .arg("pinned")
            .arg(&pin)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool link detach {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (code, picture, stderr) = scan(&agent, bed.policy.path());
    assert_eq!(code, 1, "detached programs are drift: {stderr}\n{picture:#}");
    let missing: Vec<(String, String)> = picture["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["state"] == "missing")
        .map(|h| (h["hook"].as_str().unwrap().to_owned(), h["iface"].as_str().unwrap().to_owned()))
        .collect();
    let expected: BTreeSet<(String, String)> = detached
        .iter()
        .map(|(hook, iface)| (hook.name().to_owned(), (*iface).to_owned()))
        .collect();
    assert_eq!(missing.into_iter().collect::<BTreeSet<_>>(), expected);
    let rows = bed_rows(&bed, &picture);
    let row = row_at(&rows, db_published).expect("db's published port");
    assert_eq!(
        (row["reach"]["who"].as_str(), row["policy"]["who"].as_str()),
        (Some("everyone"), Some("nobody"))
    );
    assert_scan_matches_connections(&bed, std::slice::from_ref(row), &[]);

    // A program that cannot be run: a clear error, exit 2.
    fs::remove_file(pins.explain_program(Framing::Ethernet)).unwrap();
    let (code, _, stderr) = scan(&agent, bed.policy.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("opening the pinned program"), "{stderr}");
    agent.restart();
}

/// A webhook receiver on loopback: every POST body it gets, with when it got it. It can be
/// stopped (the port then refuses) and started again on the same port.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<(SystemTime, Value)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn new(port: u16) -> Self {
        Receiver { port, got: Arc::default(), stop: Arc::default(), thread: None }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the receiver");
        listener.set_nonblocking(true).unwrap();
        self.stop.store(false, Ordering::Relaxed);
        let (got, stop) = (self.got.clone(), self.stop.clone());
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(body) = answer(stream) {
                            got.lock().unwrap().push((SystemTime::now(), body));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    /// The POSTs naming container `name`.
    fn naming(&self, name: &str) -> Vec<(SystemTime, Value)> {
        self.got.lock().unwrap().iter().filter(|(_, b)| b["name"] == name).cloned().collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one HTTP request and answers 204; the body as JSON.
fn answer(mut stream: std::net::TcpStream) -> Option<Value> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let (head_end, length) = loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while request.len() < head_end + length {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
    }
    stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").ok()?;
    serde_json::from_slice(&request[head_end..head_end + length]).ok()
}

/// The agent's JSON log events about exposure changes of container `name`.
fn warn_events(agent: &Agent, name: &str) -> Vec<Value> {
    agent
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["fields"]["event"] == "exposure_changed" && e["fields"]["target"] == name)
        .collect()
}

/// Polls `check` every 50 ms until it holds or `within` has passed.
fn wait_until(within: Duration, check: impl FnMut() -> bool) -> bool {
    poll_every(Duration::from_millis(50), within, check).is_some()
}

const METRICS: &str = "127.0.0.1:19186";

#[test]
fn an_exposing_container_gives_one_warn_event_and_one_webhook_post() {
    let bed = Bed::new();
    let mut receiver = Receiver::new(free_local_port());
    receiver.start();
    let url = receiver.url();
    let agent =
        bed.agent(&["--log-format", "json", "--metrics-addr", METRICS, "--alert-url", &url]);
    let metrics: SocketAddr = METRICS.parse().unwrap();
    // The first picture is the baseline: what was open before is not a change.
    assert!(
        wait_until(Duration::from_secs(10), || http_get(metrics, "/exposure")
            .is_ok_and(|b| b.contains("\"rows\""))),
        "no /exposure picture:\n{}",
        agent.log()
    );
    assert!(receiver.got.lock().unwrap().is_empty(), "the baseline alerted");

    let opened = |spec_name: &str, port: &str, publish: &str| {
        bed.run(ContainerSpec {
            name: spec_name,
            labels: &[("guard.expose", port)],
            publish: &[publish],
            command: "exec httpd -f -p 8080 -h /www",
            listens_on: &[8080],
            ..Default::default()
        })
    };
    let new = opened("scan-new", "8080/tcp", "28090:8080");
    let started = started_at(new.name());
    assert!(
        wait_until(Duration::from_secs(5), || !receiver.naming(new.name()).is_empty()),
        "no POST for {}:\n{}",
        new.name(),
        agent.log()
    );
    // Later scans must not say it again.
    std::thread::sleep(Duration::from_millis(2500));
    let posts = receiver.naming(new.name());
    assert_eq!(posts.len(), 1, "{posts:#?}");
    let (at, body) = &posts[0];
    let late = at.duration_since(started).unwrap_or_default();
    assert!(late <= Duration::from_secs(2), "the POST came {late:?} after the start");
    assert_eq!(body["direction"], "opened");
    assert_eq!(body["kind"], "container");
    assert_eq!(body["port"], 8080);
    assert_eq!(body["reach"]["who"], "everyone");
    assert_eq!(body["rules"], serde_json::json!(["label guard.expose"]));
    let events = warn_events(&agent, new.name());
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["level"], "WARN");
    assert_eq!(events[0]["fields"]["direction"], "opened");
    assert!(events[0]["fields"]["rules"].as_str().unwrap().contains("label guard.expose"));

    // The receiver is down when the next one starts, and comes back: the POST arrives then.
    receiver.stop();
    let late_one = opened("scan-late", "8080/tcp", "28091:8080");
    assert!(
        wait_until(Duration::from_secs(5), || warn_events(&agent, late_one.name()).len() == 1),
        "no WARN event for {}:\n{}",
        late_one.name(),
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    receiver.start();
    assert!(
        wait_until(Duration::from_secs(20), || receiver.naming(late_one.name()).len() == 1),
        "the change made while the receiver was down never arrived:\n{}",
        agent.log()
    );
    let text = http_get(metrics, "/metrics").unwrap();
    let value = |series: &str| metric(&text, series).unwrap_or(0.0);
    assert!(value("guard_exposure_changes_total{direction=\"opened\"}") >= 2.0, "{text}");
    assert!(value("guard_alert_webhook_total{result=\"sent\"}") >= 2.0, "{text}");
    assert!(value("guard_exposed_targets{scope=\"everyone\"}") >= 3.0, "{text}");

    // Removing it closes it: one closed event.
    drop(late_one);
    assert!(
        wait_until(Duration::from_secs(5), || {
            receiver.naming("guard-e2e-scan-late").iter().any(|(_, b)| b["direction"] == "closed")
        }),
        "no closed POST:\n{}",
        agent.log()
    );
}

const ACCESS_METRICS: &str = "127.0.0.1:19187";

/// Connects from A to `addr`: the source port of the flow, if the handshake completed.
fn connect_from(a: &OutsideHost, addr: SocketAddr) -> Option<u16> {
    a.netns().run(|| {
        let stream = TcpStream::connect_timeout(&addr, PATIENT).ok()?;
        Some(stream.local_addr().unwrap().port())
    })
}

/// `guard KIND --json` against the agent at [`ACCESS_METRICS`]: one JSON record per line.
fn records(agent: &Agent, kind: &str) -> Vec<Value> {
    let out = agent.guard(&[kind, "--json", "--metrics-addr", ACCESS_METRICS]).unwrap_or_default();
    out.lines().map(|l| serde_json::from_str(l).expect("a JSON record")).collect()
}

/// The records of `all` for A's flow from `sport` to `dport`/`proto`.
fn flow<'a>(
    all: &'a [Value],
    a: &OutsideHost,
    sport: u16,
    dport: u16,
    proto: &str,
) -> Vec<&'a Value> {
    let src = a.v4().to_string();
    all.iter()
        .filter(|r| r["src"] == src.as_str() && r["sport"] == sport && r["dport"] == dport)
        .filter(|r| r["proto"] == proto)
        .collect()
}

/// `guard access --follow --json`, its lines gathered by a thread; killed on drop.
struct Follower {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    fn start() -> Self {
        let mut child = Command::new(guard_bin())
            .args(["access", "--follow", "--json", "--metrics-addr", ACCESS_METRICS])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run guard access --follow");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// The next line within `within`.
    fn next(&self, within: Duration) -> Option<Value> {
        let line = self.lines.recv_timeout(within).ok()?;
        Some(serde_json::from_str(&line).expect("a JSON access record"))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_access_log_has_one_record_per_flow_with_its_rule() {
    let bed = Bed::new();
    // A UDP port open to A alone (by address), beside web's 80/tcp open to everyone.
    let a_v4 = bed.a().v4().to_string();
    let allow = format!("5353/udp from {a_v4}");
    let dns = bed.run(ContainerSpec {
        name: "scan-dns",
        ip: Some("10.244.0.12".parse().unwrap()),
        labels: &[("guard.allow.a", &allow)],
        command: "exec sleep 3600",
        ..Default::default()
    });
    let echo = dns.udp_echo("0.0.0.0:5353".parse().unwrap(), Duration::from_secs(120));
    let agent = bed.agent(&["--metrics-addr", ACCESS_METRICS]);
    let host = IpAddr::from(bed.a().host_v4());
    let web = IpAddr::from(bed.web.ip());

    // A's flows: web by its published port and by its address, and two datagrams of one UDP
    // flow to dns, each echoed (so each went through).
    let published = connect_from(bed.a(), SocketAddr::new(host, 28080)).expect("web published");
    let direct = connect_from(bed.a(), SocketAddr::new(web, 80)).expect("web by address");
    let dns_addr = SocketAddr::new(dns.ip().into(), 5353);
    let (udp_sport, echoed) = bed.a().netns().run(|| {
        let socket = UdpSocket::bind((bed.a().v4(), 0)).unwrap();
        socket.set_read_timeout(Some(PATIENT)).unwrap();
        let mut buf = [0u8; 64];
        let echoed = (0..2)
            .filter(|_| {
                socket.send_to(b"x", dns_addr).is_ok() && socket.recv_from(&mut buf).is_ok()
            })
            .count();
        (socket.local_addr().unwrap().port(), echoed)
    });
    assert_eq!(echoed, 2, "both datagrams reach dns and come back");
    assert_eq!(echo.peers().len(), 2);
    // A closed port: a drop, not an access.
    let closed = SocketAddr::new(host, 25433);
    assert_eq!(bed.a().tcp_outcome(closed, QUICK), Outcome::Silent);

    // Once the drop is told, every event before it has been read.
    let told = wait_until(Duration::from_secs(10), || {
        records(&agent, "drops").iter().any(|r| r["src"] == a_v4.as_str() && r["dport"] == 25433)
    });
    assert!(told, "no drop record for {closed}:\n{}", agent.log());
    let access = records(&agent, "access");
    let one = |sport, dport, proto| -> Value {
        let found = flow(&access, bed.a(), sport, dport, proto);
        assert_eq!(found.len(), 1, "one record for {sport}->{dport}/{proto}: {access:#?}");
        found[0].clone()
    };
    let web_name = "guard-e2e-scan-web";
    let r = one(published, 28080, "tcp");
    assert_eq!(
        (&r["dst"], &r["container"], &r["container_port"], &r["path"], &r["reason"], &r["rule"]),
        (
            &host.to_string().into(),
            &web_name.into(),
            &80.into(),
            &"published".into(),
            &"exposed".into(),
            &"label guard.expose (80/tcp)".into()
        ),
        "{r:#}"
    );
    assert_eq!(r["iface"], bed.a().host_end());
    let r = one(direct, 80, "tcp");
    assert_eq!((&r["dst"], &r["path"]), (&web.to_string().into(), &"direct".into()), "{r:#}");
    assert_eq!(
        (&r["container"], &r["rule"]),
        (&web_name.into(), &"label guard.expose (80/tcp)".into())
    );
    let r = one(udp_sport, 5353, "udp");
    assert_eq!(
        (&r["container"], &r["container_port"], &r["path"], &r["reason"], &r["rule"]),
        (
            &dns.name().into(),
            &5353.into(),
            &"direct".into(),
            &"allowed_source".into(),
            &"label guard.allow.a (5353/udp)".into()
        ),
        "{r:#}"
    );
    assert!(
        !access.iter().any(|r| r["dport"] == 25433 || r["container"] == "guard-e2e-scan-db"),
        "a closed port is no access: {access:#?}"
    );
    // /access serves the same records.
    let metrics: SocketAddr = ACCESS_METRICS.parse().unwrap();
    let served = http_get(metrics, "/access").expect("/access");
    assert_eq!(served.lines().count(), access.len(), "{served}");
    // The log line: the sentence, then the fields log shippers split.
    let line = format!(
        "guard::access: let in tcp {a_v4}:{published} -> {host}:28080 (container {web_name} 80/tcp, published) on {iface}: label guard.expose (80/tcp) src={a_v4} sport={published} dst={host} dport=28080 proto=tcp container={web_name} port=80 path=published reason=exposed rule=\"label guard.expose (80/tcp)\" iface={iface}",
        iface = bed.a().host_end()
    );
    assert!(agent.log().contains(&line), "no line\n{line}\nin\n{}", agent.log());

    // Following: what was kept, then a new connection as it happens.
    let follower = Follower::start();
    for _ in 0..access.len() {
        assert!(follower.next(Duration::from_secs(10)).is_some(), "the kept records first");
    }
    let later = connect_from(bed.a(), SocketAddr::new(host, 28080)).expect("web again");
    let followed = std::iter::from_fn(|| follower.next(Duration::from_secs(10)))
        .find(|r| r["sport"] == later && r["src"] == a_v4.as_str());
    let followed = followed.expect("guard access --follow shows the new connection");
    assert_eq!(
        (&followed["container"], &followed["path"]),
        (&web_name.into(), &"published".into())
    );
    drop(follower);

    let text = http_get(metrics, "/metrics").unwrap();
    let reported = metric(&text, "guard_access_events_total{outcome=\"reported\"}");
    assert!(reported.is_some_and(|n| n >= 4.0), "{text}");
    assert!(
        metric(&text, "guard_drop_events_total{outcome=\"reported\"}").is_some_and(|n| n >= 1.0)
    );
}
