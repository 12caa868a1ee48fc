//! `cargo xtask test`: the three tiers and their summary; with `--kernel`, the privileged
//! tiers inside a VM booted on another kernel (see `vm`).

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::docker::TEST_IMAGE;
use crate::engines::{self, Engine};
use crate::{Ctx, setup, sh, show, vm};

#[derive(Args)]
pub struct TestArgs {
    /// Run only this tier (repeatable), on the host only; default: unit, verdict and e2e, in
    /// that order, then verdict and the seed scenario on each of the kernels Debian 12 and 11
    /// run, in VMs (only e2e when --engine is given). With --kernel: verdict and e2e, where e2e is the seed
    /// scenario only (the `e2e` test binary), and unit is refused (it does not depend on the
    /// kernel).
    #[arg(long, value_enum)]
    tier: Vec<Tier>,
    /// Run the e2e tier against this engine (repeatable); default: docker20, docker28, then
    /// podman.
    #[arg(long, value_enum)]
    engine: Vec<Engine>,
    /// Run the tiers inside a VM (qemu, software emulation) booted on this kernel instead of
    /// on the host: a Debian kernel (`6.1`, `5.10`, `6.12`; downloaded once and cached under
    /// ~/.cache/container-guard/kernels) or a path to a vmlinuz. Repeatable, or comma-separated
    /// (`--kernel 6.1,5.10`): the kernels run one after the other.
    #[arg(long, value_name = "SPEC", value_delimiter = ',')]
    kernel: Vec<String>,
    /// Give up on a VM after this many seconds (boot included), and count its unfinished
    /// tiers as failed.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    vm_timeout: u64,
    /// Passed to every test binary, after `--` (e.g. a test name filter).
    #[arg(last = true, value_name = "TEST_ARGS")]
    args: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tier {
    /// Label parsing, desired state and the rest of the pure code; no root needed.
    Unit,
    /// The real XDP program run by the kernel (BPF_PROG_TEST_RUN) on crafted frames.
    Verdict,
    /// A real dockerd, real containers and outside hosts in network namespaces.
    E2e,
}

impl Tier {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Tier::Unit => "unit",
            Tier::Verdict => "verdict",
            Tier::E2e => "e2e",
        }
    }

    /// `cargo ARGS -- HARNESS_ARGS user-args`
    fn cargo_args(self) -> &'static [&'static str] {
        match self {
            // --no-fail-fast: a failing test binary must not hide the results of the others.
            Tier::Unit => &[
                "test",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "guard-ebpf",
                "--exclude",
                "tests",
            ],
            Tier::Verdict => &["test", "--no-fail-fast", "-p", "tests", "--test", "verdict"],
            // Everything with a real dockerd: the seed scenario, lifecycle and faults, the
            // agent as a container, attacks from an outside host and the replies they must
            // not break, bans from a real fail2ban and CrowdSec.
            Tier::E2e => &[
                "test",
                "--no-fail-fast",
                "-p",
                "tests",
                "--test",
                "e2e",
                "--test",
                "lifecycle",
                "--test",
                "operator",
                "--test",
                "container",
                "--test",
                "adversary",
                "--test",
                "scan",
                "--test",
                "bans",
            ],
        }
    }

    pub(crate) fn harness_args(self) -> &'static [&'static str] {
        match self {
            Tier::E2e => &["--test-threads=1"],
            _ => &[],
        }
    }
}

/// Sums of the libtest `test result:` lines of one tier.
#[derive(Default, Debug, PartialEq)]
pub(crate) struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

pub struct Outcome {
    /// The tier, and the engine or kernel where it is not the machine's own:
    /// `e2e[docker 28.5.2]`.
    pub label: String,
    pub counts: Counts,
    /// Why the runner itself failed (`cargo: exit status: 101`), `None` when it succeeded.
    pub runner_failure: Option<String>,
    /// How long it took (for an engine run, from fetching the engine to swapping back).
    pub secs: Option<u64>,
}

impl Outcome {
    /// A tier that had no test to run (it counts as failed, like one whose tests ran none).
    pub fn none(label: String) -> Self {
        Outcome { label, counts: Counts::default(), runner_failure: None, secs: None }
    }

    pub(crate) fn ok(&self) -> bool {
        self.runner_failure.is_none() && self.counts.failed == 0 && self.counts.passed > 0
    }

    /// `verdict 16 passed 2 failed 1 ignored (cargo: exit status: 101) in 31 s`
    pub(crate) fn describe(&self) -> String {
        let Counts { passed, failed, ignored } = self.counts;
        let mut s = format!("{} {passed} passed", self.label);
        if failed > 0 {
            s += &format!(" {failed} failed");
        }
        if ignored > 0 {
            s += &format!(" {ignored} ignored");
        }
        if let Some(failure) = &self.runner_failure {
            s += &format!(" ({failure})");
        } else if passed + failed == 0 {
            s += " (ran no test: FAILED)";
        }
        if let Some(secs) = self.secs {
            s += &format!(" in {secs} s");
        }
        s
    }
}

/// Returns whether every selected tier ran tests and all of them passed.
pub fn test(ctx: &Ctx, args: &TestArgs) -> Result<bool> {
    if !args.kernel.is_empty() {
        let tiers = selected(&args.tier, &[Tier::Verdict, Tier::E2e]);
        anyhow::ensure!(
            !tiers.contains(&Tier::Unit),
            "the unit tier does not depend on the kernel: run it without --kernel"
        );
        let timeout = Duration::from_secs(args.vm_timeout);
        return vm::test(ctx, &args.kernel, &tiers, &args.args, timeout);
    }
    let start = Instant::now();
    engines::recover_killed_run(ctx)?;
    crate::podman::recover_killed_run()?;
    setup::machine(ctx)?;
    build_guard()?;
    let guard_bin = ctx.target_dir.join("debug/guard");

    let tiers = if args.tier.is_empty() && !args.engine.is_empty() {
        vec![Tier::E2e]
    } else {
        selected(&args.tier, &[Tier::Unit, Tier::Verdict, Tier::E2e])
    };

    let mut outcomes = Vec::new();
    for tier in tiers {
        if tier != Tier::E2e {
            outcomes.push(run_tier(tier, &args.args, &guard_bin)?);
            continue;
        }
        for engine in engines_to_run(&args.engine, !args.tier.is_empty()) {
            outcomes.push(match engine {
                Engine::Docker20 => run_tier(tier, &args.args, &guard_bin)?,
                Engine::Docker28 => engines::run_docker28(ctx, &args.args, &guard_bin)?,
                Engine::Podman => crate::podman::run_podman(&args.args, &guard_bin)?,
            });
            // Docker 28 also runs a real multi-node Swarm, beside the machine's dockerd once
            // the swap is undone (crate::swarm says why it needs no swap).
            if engine == Engine::Docker28 {
                outcomes.push(crate::swarm::run_swarm(&args.args, &guard_bin)?);
            }
        }
    }

    // The whole matrix when nothing narrower was asked for: the kernels people run, in VMs.
    if args.tier.is_empty() && args.engine.is_empty() {
        let kernels: Vec<String> = vm::DEFAULT_KERNELS.iter().map(ToString::to_string).collect();
        let timeout = Duration::from_secs(args.vm_timeout);
        outcomes.extend(vm::run(ctx, &kernels, &[Tier::Verdict, Tier::E2e], &args.args, timeout)?);
    }

    println!("xtask test: {} (in {} s)", describe_all(&outcomes), start.elapsed().as_secs());
    print_totals(&outcomes);
    Ok(outcomes.iter().all(Outcome::ok))
}

/// The engines of the e2e tier: those asked for; with `--tier` alone, the host's own
/// Docker 20.10 (a host tier: nothing is fetched or swapped, so a targeted run never stops
/// the machine's dockerd under someone else's tests); with neither, every one, 20.10 first,
/// then Docker 28 and Podman.
fn engines_to_run(asked: &[Engine], tiers_named: bool) -> Vec<Engine> {
    match (asked.is_empty(), tiers_named) {
        (false, _) => engines::selected(asked),
        (true, true) => vec![Engine::Docker20],
        (true, false) => vec![Engine::Docker20, Engine::Docker28, Engine::Podman],
    }
}

/// The tiers asked for (or `default`), in tier order, each once.
fn selected(asked: &[Tier], default: &[Tier]) -> Vec<Tier> {
    let mut tiers = if asked.is_empty() { default.to_vec() } else { asked.to_vec() };
    tiers.sort();
    tiers.dedup();
    tiers
}

/// The debug `guard` the tiers run (GUARD_BIN).
pub(crate) fn build_guard() -> Result<()> {
    println!("xtask: building guard with cargo build -p guard-userspace ...");
    sh(Command::new("cargo").args(["build", "-p", "guard-userspace"]))
}

/// `verdict 16 passed, e2e 3 passed`
pub(crate) fn describe_all(outcomes: &[Outcome]) -> String {
    outcomes.iter().map(Outcome::describe).collect::<Vec<_>>().join(", ")
}

/// The closing line, `N passed, F failed`, over every outcome.
pub(crate) fn print_totals(outcomes: &[Outcome]) {
    let passed: u64 = outcomes.iter().map(|o| o.counts.passed).sum();
    let failed: u64 = outcomes.iter().map(|o| o.counts.failed).sum();
    println!("{passed} passed, {failed} failed");
}

/// Run one tier's cargo test, streaming its stdout to ours while keeping a copy to count.
/// The unit tier lints first (see [`lint`]); a lint that fails fails the tier, and its tests
/// still run.
fn run_tier(tier: Tier, extra: &[String], guard_bin: &Path) -> Result<Outcome> {
    let lint_failure = if tier == Tier::Unit { lint() } else { None };
    let mut cmd = Command::new("cargo");
    cmd.args(tier.cargo_args())
        .arg("--")
        .args(tier.harness_args())
        .args(extra)
        .env("GUARD_BIN", guard_bin)
        .env("GUARD_TEST_IMAGE", TEST_IMAGE);
    let mut outcome = run_counted(tier.name().to_owned(), cmd)?;
    if let Some(lint) = lint_failure {
        outcome.runner_failure = Some(match outcome.runner_failure {
            Some(tests) => format!("{tests}; {lint}"),
            None => lint,
        });
    }
    Ok(outcome)
}

/// Clippy with warnings as errors (the lints are in the workspace's Cargo.toml): the host
/// crates, then guard-ebpf on its own, for the BPF target with nightly, as aya-build builds
/// it (in the host workspace, feature unification would build its panic handler for the
/// host). Returns what failed, if anything.
fn lint() -> Option<String> {
    let mut host = Command::new("cargo");
    host.args(["clippy", "--workspace", "--exclude", "guard-ebpf", "--all-targets"]);
    let mut ebpf = Command::new("rustup");
    ebpf.args(["run", "nightly", "cargo", "clippy", "-p", "guard-ebpf", "--release"]).args([
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    let mut failures = Vec::new();
    for mut cmd in [host, ebpf] {
        cmd.args(["--", "-D", "warnings"]);
        println!("xtask: tier unit: lint: {} ...", show(&cmd));
        match cmd.status() {
            Ok(status) if status.success() => {}
            Ok(status) => failures.push(format!("{}: {status}", show(&cmd))),
            Err(e) => failures.push(format!("{}: {e}", show(&cmd))),
        }
    }
    (!failures.is_empty()).then(|| failures.join("; "))
}

/// Runs a `cargo test` command, streaming its stdout to ours while keeping a copy to count.
pub fn run_counted(label: String, mut cmd: Command) -> Result<Outcome> {
    cmd.stdout(Stdio::piped());
    let started = Instant::now();
    println!("xtask: tier {label}: {} ...", show(&cmd));
    let mut child = cmd.spawn().with_context(|| format!("running {}", show(&cmd)))?;
    let mut tee = Tee { out: io::stdout(), copy: Vec::new() };
    io::copy(child.stdout.as_mut().context("no stdout")?, &mut tee)?;
    let status = child.wait()?;
    let counts = parse_counts(&String::from_utf8_lossy(&tee.copy));
    let secs = Some(started.elapsed().as_secs());
    let runner_failure = (!status.success()).then(|| format!("cargo: {status}"));
    Ok(Outcome { label, counts, runner_failure, secs })
}

/// Writes through to stdout at once and keeps a copy.
struct Tee {
    out: io::Stdout,
    copy: Vec<u8>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write_all(buf)?;
        self.out.flush()?;
        self.copy.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Sum every `test result: ok. 41 passed; 0 failed; 2 ignored; ...` line.
pub(crate) fn parse_counts(output: &str) -> Counts {
    let mut counts = Counts::default();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        let Some((_, fields)) = rest.split_once(". ") else {
            continue;
        };
        for field in fields.split(';') {
            let mut words = field.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => counts.passed += n,
                "failed" => counts.failed += n,
                "ignored" => counts.ignored += n,
                _ => {}
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_result_line() {
        let out = "running 3 tests\n\
            test a ... ok\n\
            test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
            \n\
            test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.20s\n\
            test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n";
        assert_eq!(parse_counts(out), Counts { passed: 5, failed: 1, ignored: 1 });
    }

    #[test]
    fn no_result_line_means_nothing_ran() {
        assert_eq!(parse_counts("error: could not compile `tests`\n"), Counts::default());
    }
}
