//! `cargo xtask test --kernel SPEC`: the privileged tiers inside a VM booted on another
//! kernel, because the product must work on the kernels its users run (TCX only from 6.6,
//! older verifiers), and this machine runs only its own.
//!
//! The host builds everything (guard, the test binaries) and boots the kernel with
//! virtme-ng; the guest runs this same xtask binary (`xtask vm-guest`, in `guest`), which
//! prepares the guest as `cargo xtask setup` prepares a host, runs the test binaries and
//! brackets each step with a marker (`marker`); the host turns the markers and the libtest
//! result lines into the usual summary. A VM that does not boot, a guest that fails, a tier
//! that does not finish or runs no test: each is a failure, never a skip.

mod boot;
pub mod guest;
mod kernel;
mod marker;
mod tools;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::boot::{Event, Stop};
use self::kernel::Spec;
use self::marker::Marker;
use crate::test::{Counts, Outcome, Tier, build_guard, describe_all, parse_counts, print_totals};
use crate::{Ctx, setup, show};

/// The kernels `cargo xtask test` runs in VMs besides the host's: Debian 12's and Debian 11's,
/// the oldest guard supports (neither has TCX).
pub const DEFAULT_KERNELS: [&str; 2] = ["6.1", "5.10"];

/// Runs `tiers` on each kernel in turn; returns whether every tier on every kernel ran tests
/// and all of them passed.
pub fn test(
    ctx: &Ctx,
    specs: &[String],
    tiers: &[Tier],
    extra: &[String],
    timeout: Duration,
) -> Result<bool> {
    let all = run(ctx, specs, tiers, extra, timeout)?;
    print_totals(&all);
    Ok(all.iter().all(Outcome::ok))
}

/// Runs `tiers` on each kernel in turn and says how each went; returns every tier's outcome,
/// labelled with its kernel (`verdict[linux 6.1.0-57-amd64]`).
pub fn run(
    ctx: &Ctx,
    specs: &[String],
    tiers: &[Tier],
    extra: &[String],
    timeout: Duration,
) -> Result<Vec<Outcome>> {
    let start = Instant::now();
    let specs = specs.iter().map(|s| Spec::parse(s)).collect::<Result<Vec<_>>>()?;
    // The guest runs the host's binaries: the build's prerequisites also bring what the
    // guest needs (docker.io, busybox-static, iproute2, iptables).
    setup::prerequisites()?;
    let vng = tools::ensure()?;
    build_guard()?;
    let binaries = build_test_binaries(tiers)?;
    let guest_cmd = guest_command(&ctx.target_dir.join("debug/guard"), &binaries, extra)?;
    let log_dir = ctx.target_dir.join("vm");
    fs::create_dir_all(&log_dir)?;

    let mut runs = Vec::new();
    for spec in &specs {
        let kernel = kernel::get(spec)?;
        let log = log_dir.join(format!("{}.log", kernel.release));
        let (events, stop) = boot::run(&vng, &kernel, &guest_cmd, &log, timeout)?;
        let release = events
            .iter()
            .find_map(|e| match &e.marker {
                Some(Marker::Start { release }) => Some(release.clone()),
                _ => None,
            })
            .unwrap_or(kernel.release);
        let (outcomes, times) = outcomes(tiers, &events, &stop);
        runs.push(Run { release, outcomes, times });
    }

    for run in &runs {
        println!(
            "xtask test: {} (in {} s) on Linux {} in a VM",
            describe_all(&run.outcomes),
            run.times.total.as_secs(),
            run.release
        );
        println!("xtask: times on {}: {}", run.release, run.times.describe());
    }
    if runs.len() > 1 {
        println!("xtask: {} kernels in {} s", runs.len(), start.elapsed().as_secs());
    }
    Ok(runs
        .into_iter()
        .flat_map(|run| {
            let release = run.release;
            run.outcomes.into_iter().map(move |mut outcome| {
                outcome.label = format!("{}[linux {release}]", outcome.label);
                outcome
            })
        })
        .collect())
}

/// The results of one kernel.
struct Run {
    release: String,
    outcomes: Vec<Outcome>,
    times: Times,
}

/// The test binary a tier runs in the VM: the seed scenario only for e2e (the e2e tier on
/// the host also runs lifecycle, operator, container and adversary).
fn test_binary(tier: Tier) -> Result<&'static str> {
    match tier {
        Tier::Verdict => Ok("verdict"),
        Tier::E2e => Ok("e2e"),
        Tier::Unit => bail!("the unit tier does not run in a VM"),
    }
}

/// `cargo test --no-run` for the tiers' test binaries; returns each tier's executable.
fn build_test_binaries(tiers: &[Tier]) -> Result<Vec<(Tier, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--no-run", "-p", "tests", "--message-format=json-render-diagnostics"]);
    for tier in tiers {
        cmd.args(["--test", test_binary(*tier)?]);
    }
    println!("xtask: building the test binaries with {} ...", show(&cmd));
    let out = cmd.stderr(Stdio::inherit()).output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("{} failed ({})", show(&cmd), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    tiers
        .iter()
        .map(|&tier| {
            let name = test_binary(tier)?;
            let exe = test_executable(&stdout, name).with_context(|| {
                format!("cargo test --no-run reported no executable for {name}")
            })?;
            Ok((tier, exe))
        })
        .collect()
}

/// The executable of the test target `name` in cargo's JSON messages.
fn test_executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|msg| {
            let is_test = msg["target"]["kind"].as_array()?.iter().any(|k| k == "test");
            let matches =
                msg["reason"] == "compiler-artifact" && is_test && msg["target"]["name"] == name;
            matches.then(|| msg["executable"].as_str().map(PathBuf::from)).flatten()
        })
}

/// The guest's command line: this xtask binary (the guest sees the host's files at the same
/// paths) as `vm-guest`, quoted for the guest's shell.
fn guest_command(guard: &Path, binaries: &[(Tier, PathBuf)], extra: &[String]) -> Result<String> {
    let xtask = env::current_exe().context("finding the xtask binary")?;
    let mut words = vec![xtask.display().to_string(), "vm-guest".to_owned()];
    words.extend(["--guard-bin".to_owned(), guard.display().to_string()]);
    for (tier, bin) in binaries {
        words.extend([format!("--{}", tier.name()), bin.display().to_string()]);
    }
    words.push("--".to_owned());
    words.extend(extra.iter().cloned());
    Ok(words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" "))
}

fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Where the time of one kernel's run went.
#[derive(Debug, Default, PartialEq)]
struct Times {
    /// From starting vng to the guest's first marker.
    boot: Option<Duration>,
    /// From the guest's start to dockerd answering.
    dockerd: Option<Duration>,
    /// Each tier that finished, from its start to its end.
    tiers: Vec<(Tier, Duration)>,
    /// From starting vng to the last console line.
    total: Duration,
}

impl Times {
    /// `boot 9 s, dockerd 18 s, verdict 130 s, e2e 95 s, total 260 s`
    fn describe(&self) -> String {
        let secs = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{} s", d.as_secs()));
        let mut parts =
            vec![format!("boot {}", secs(self.boot)), format!("dockerd {}", secs(self.dockerd))];
        parts.extend(self.tiers.iter().map(|(t, d)| format!("{} {} s", t.name(), d.as_secs())));
        parts.push(format!("total {} s", self.total.as_secs()));
        parts.join(", ")
    }
}

/// Each asked tier's outcome from the guest's console, and the times.
fn outcomes(tiers: &[Tier], events: &[Event], stop: &Stop) -> (Vec<Outcome>, Times) {
    let at = |wanted: &dyn Fn(&Marker) -> bool| {
        events.iter().position(|e| e.marker.as_ref().is_some_and(wanted))
    };
    let started = at(&|m| matches!(m, Marker::Start { .. })).map(|i| events[i].at);
    let dockerd = at(&|m| *m == Marker::DockerdReady).map(|i| events[i].at);
    let guest_failure = events.iter().find_map(|e| match &e.marker {
        Some(Marker::Failed(why)) => Some(why.clone()),
        _ => None,
    });
    let mut times = Times {
        boot: started,
        dockerd: dockerd.zip(started).map(|(d, s)| d.checked_sub(s).unwrap()),
        tiers: Vec::new(),
        total: events.last().map_or(Duration::ZERO, |e| e.at),
    };

    let mut outcomes = Vec::new();
    for &tier in tiers {
        let begin = at(&|m| *m == Marker::TierStart(tier));
        let end = at(&|m| matches!(m, Marker::TierEnd { tier: t, .. } if *t == tier));
        let (counts, runner_failure) = match (begin, end) {
            (Some(b), Some(e)) if b < e => {
                let output: Vec<&str> = events[b..e].iter().map(|e| e.line.as_str()).collect();
                times.tiers.push((tier, events[e].at.checked_sub(events[b].at).unwrap()));
                let failure = match &events[e].marker {
                    Some(Marker::TierEnd { code: Some(0), .. }) => None,
                    Some(Marker::TierEnd { code: Some(code), .. }) => {
                        Some(format!("exit code {code} in the VM"))
                    }
                    _ => Some("killed by a signal in the VM".to_owned()),
                };
                (parse_counts(&output.join("\n")), failure)
            }
            (Some(b), _) => {
                let output: Vec<&str> = events[b..].iter().map(|e| e.line.as_str()).collect();
                (
                    parse_counts(&output.join("\n")),
                    Some(format!("did not finish: {}", stop.describe())),
                )
            }
            (None, _) => {
                let why = match (&guest_failure, stop) {
                    (Some(why), _) => format!("not run: the guest failed: {why}"),
                    (None, Stop::Finished) => "not run by the guest".to_owned(),
                    (None, stop) => format!("not run: {}", stop.describe()),
                };
                (Counts::default(), Some(why))
            }
        };
        let secs = times.tiers.iter().find(|(t, _)| *t == tier).map(|(_, d)| d.as_secs());
        outcomes.push(Outcome { label: tier.name().to_owned(), counts, runner_failure, secs });
    }
    (outcomes, times)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(lines: &[(u64, &str)]) -> Vec<Event> {
        lines
            .iter()
            .map(|&(secs, line)| Event {
                at: Duration::from_secs(secs),
                line: line.to_owned(),
                marker: Marker::parse(line),
            })
            .collect()
    }

    fn marker(m: Marker) -> String {
        m.line()
    }

    #[test]
    fn counts_and_times_per_tier() {
        let lines = [
            marker(Marker::Start { release: "6.1.0-57-amd64".into() }),
            marker(Marker::DockerdReady),
            marker(Marker::TierStart(Tier::Verdict)),
            "test result: ok. 40 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out".into(),
            marker(Marker::TierEnd { tier: Tier::Verdict, code: Some(0) }),
            marker(Marker::TierStart(Tier::E2e)),
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out".into(),
            marker(Marker::TierEnd { tier: Tier::E2e, code: Some(101) }),
            marker(Marker::End),
        ];
        let secs = [10, 30, 31, 150, 150, 151, 250, 250, 251];
        let timed: Vec<(u64, &str)> =
            secs.into_iter().zip(lines.iter().map(String::as_str)).collect();
        let (outcomes, times) =
            outcomes(&[Tier::Verdict, Tier::E2e], &events(&timed), &Stop::Finished);
        assert!(outcomes[0].ok());
        assert_eq!(outcomes[0].counts.passed, 40);
        assert!(!outcomes[1].ok());
        assert_eq!(outcomes[1].counts, Counts { passed: 1, failed: 2, ignored: 0 });
        assert_eq!(outcomes[1].runner_failure.as_deref(), Some("exit code 101 in the VM"));
        assert_eq!(
            times.describe(),
            "boot 10 s, dockerd 20 s, verdict 119 s, e2e 99 s, total 251 s"
        );
    }

    #[test]
    fn a_vm_that_never_booted_fails_every_tier() {
        let (outcomes, times) = outcomes(
            &[Tier::Verdict, Tier::E2e],
            &[],
            &Stop::BootTimeout(Duration::from_secs(300)),
        );
        assert!(outcomes.iter().all(|o| !o.ok()));
        assert_eq!(
            outcomes[0].describe(),
            "verdict 0 passed (not run: the VM did not boot within 300 s)"
        );
        assert_eq!(times.boot, None);
    }

    #[test]
    fn a_tier_cut_short_keeps_its_counts_and_fails() {
        let lines = [
            marker(Marker::Start { release: "5.10.0-46-amd64".into() }),
            marker(Marker::TierStart(Tier::Verdict)),
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out".into(),
        ];
        let timed: Vec<(u64, &str)> = lines.iter().map(|l| (1, l.as_str())).collect();
        let stop = Stop::Timeout(Duration::from_secs(60));
        let (outcomes, _) = outcomes(&[Tier::Verdict], &events(&timed), &stop);
        assert_eq!(outcomes[0].counts.passed, 3);
        assert!(!outcomes[0].ok());
    }

    #[test]
    fn a_guest_failure_is_named_for_the_tiers_it_kept_from_running() {
        let lines = [
            marker(Marker::Start { release: "6.12".into() }),
            marker(Marker::Failed("dockerd exited (exit status: 1)".into())),
            marker(Marker::End),
        ];
        let timed: Vec<(u64, &str)> = lines.iter().map(|l| (1, l.as_str())).collect();
        let (outcomes, _) = outcomes(&[Tier::E2e], &events(&timed), &Stop::Finished);
        assert_eq!(
            outcomes[0].runner_failure.as_deref(),
            Some("not run: the guest failed: dockerd exited (exit status: 1)")
        );
    }

    #[test]
    fn quoting_for_the_guest_shell() {
        assert_eq!(shell_quote("/work/target/debug/xtask"), "/work/target/debug/xtask");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
    }

    #[test]
    fn test_executable_from_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"tests"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"e2e"},"executable":"/t/debug/deps/e2e-1"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(test_executable(messages, "e2e"), Some(PathBuf::from("/t/debug/deps/e2e-1")));
        assert_eq!(test_executable(messages, "verdict"), None);
    }
}
