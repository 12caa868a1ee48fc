//! How soon an exposed port opens after a reboot: the agent boots before dockerd (as the
//! systemd unit orders it), dockerd brings back a `--restart=always` container exposed by
//! label, and an outside host connects to it (by address and through its published port) 200
//! times a second. Each run measures from the container's start (Docker's clock) to the first
//! handshake that completed. N runs (GUARD_BENCH_OPEN_RUNS, default 20); p50, p99 and max
//! are printed and written to `<target>/bench/open-latency.md` (GUARD_BENCH_OUT).
//!
//! Needs what the e2e tier needs (root, dockerd, the test image, GUARD_BIN): run it with
//! `cargo xtask bench --open-latency`, which provides them. Every run restarts dockerd.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, SystemTime};

use tests::agent::Agent;
use tests::boot;
use tests::docker::{Container, ContainerSpec, Network};
use tests::host::RoutingHost;
use tests::netns::OutsideHost;
use tests::observe;
use tests::prepare_test_bed;
use tests::prober::Prober;

const SUBNET: &str = "10.252.30.0/24";
const RATE: u32 = 200;

fn main() -> ExitCode {
    let runs: usize = std::env::var("GUARD_BENCH_OPEN_RUNS")
        .ok()
        .map_or(20, |v| v.parse().expect("GUARD_BENCH_OPEN_RUNS: a number"))
        .clamp(1, 200);
    let _exclusive = prepare_test_bed();
    let net = Network::create("guard-e2e-bench-open", SUBNET, None);
    let ip = Ipv4Addr::new(10, 252, 30, 10);
    let container = Container::run(ContainerSpec {
        name: "bench-open",
        network: Some(&net),
        ip: Some(ip),
        labels: &[("guard.expose", "80/tcp")],
        publish: &["25300:80"],
        command: "trap 'exit 0' TERM; httpd -p 80 -h /www; sleep 1000000 & wait",
        listens_on: &[80],
        restart: Some("always"),
        ..Default::default()
    });
    let _routing = RoutingHost::enable();
    let outside = OutsideHost::new("bopen", 30);
    outside.route_via_host(SUBNET);
    let targets = [SocketAddr::from((ip, 80)), SocketAddr::from((outside.host_v4(), 25300))];
    let metrics = SocketAddr::from(([127, 0, 0, 1], observe::free_local_port())).to_string();
    let mut agent = Agent::start_with(&[outside.host_end()], &["--metrics-addr", &metrics]);

    let mut samples: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for run in 1..=runs {
        let mut outage = boot::power_off(&mut agent, &[&net]);
        agent.boot();
        let prober = Prober::start(
            outside.netns().path(),
            &targets,
            RATE,
            Duration::from_secs(1),
            Duration::from_secs(90),
        );
        let origin = SystemTime::now();
        outage.end();
        let opened = (0..300).any(|_| {
            thread::sleep(Duration::from_millis(100));
            outside.tcp_connect(targets[0], Duration::from_millis(200))
        });
        thread::sleep(Duration::from_millis(300));
        let report = prober.finish();
        assert!(opened, "run {run}: the exposed port did not open within 30 s:\n{}", agent.log());
        let started = boot::started_at(container.name());
        for (i, sample) in samples.iter_mut().enumerate() {
            let first = boot::first_completed(&report, i, origin).expect("a handshake completed");
            sample.push(first.duration_since(started).unwrap_or_default());
        }
        println!(
            "run {run}/{runs}: open {:.0?} (direct), {:.0?} (published) after the container started",
            samples[0][run - 1],
            samples[1][run - 1]
        );
        drop(outage);
    }
    agent.unload();

    let mut report = format!(
        "# Time from a container's start to its exposed port open, after a reboot\n\n\
         {runs} runs, an outside host connecting {RATE} times a second (`cargo xtask bench --open-latency`).\n\n\
         | path | p50 | p99 | max |\n|---|---|---|---|\n"
    );
    for (path, sample) in ["by address", "published port"].iter().zip(samples.iter_mut()) {
        sample.sort();
        let at = |q: f64| sample[((sample.len() - 1) as f64 * q).round() as usize];
        report += &format!(
            "| {path} | {:.0?} | {:.0?} | {:.0?} |\n",
            at(0.5),
            at(0.99),
            sample[sample.len() - 1]
        );
    }
    println!("{report}");
    let out = std::env::var_os("GUARD_BENCH_OUT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        PathBuf::from,
    );
    let _ = std::fs::create_dir_all(&out);
    let path = out.join("open-latency.md");
    match std::fs::write(&path, &report) {
        Ok(()) => println!("written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    ExitCode::SUCCESS
}
