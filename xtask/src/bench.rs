//! `cargo xtask bench`: the data-path benchmark (tests/benches/datapath), one run, its report
//! printed; with `--open-latency`, how soon an exposed port opens after a reboot
//! (tests/benches/open_latency.rs) instead.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::docker::TEST_IMAGE;
use crate::{Ctx, setup, sh, show};

/// Debian packages only the benchmark needs: ethtool reads the veth's XDP drop counters,
/// DejaVu Sans draws the chart's text.
const BENCH_PACKAGES: &[&str] = &["ethtool", "fonts-dejavu-core"];

/// Every option is the benchmark's environment variable of the same name
/// (`--flood-repeat` is GUARD_BENCH_FLOOD_REPEAT); unset ones keep their defaults.
#[derive(Args)]
pub struct BenchArgs {
    /// BPF_PROG_TEST_RUN repeat per per-packet run [default: 1000000]
    #[arg(long)]
    repeat: Option<u64>,
    /// Per-packet rounds; the median is reported [default: 5]
    #[arg(long)]
    rounds: Option<u64>,
    /// Frames per flood [default: 10000000]
    #[arg(long)]
    flood_repeat: Option<u64>,
    /// Floods per variant; the median is reported [default: 3]
    #[arg(long)]
    flood_rounds: Option<u64>,
    /// Live-frames batch size [default: 64]
    #[arg(long)]
    batch: Option<u64>,
    /// Per-packet cases to run, comma-separated (the floor always runs) [default: all]
    #[arg(long)]
    cases: Option<String>,
    /// Instead of the data path: time from a container's start to its exposed port open,
    /// after a reboot staged with the real dockerd (restarted once per run)
    #[arg(long)]
    open_latency: bool,
    /// Reboots for --open-latency [default: 20]
    #[arg(long, requires = "open_latency")]
    open_runs: Option<u64>,
}

/// Installs what is missing, runs `cargo bench -p tests --bench datapath` and prints
/// `<target>/bench/report.md`.
pub fn bench(ctx: &Ctx, args: &BenchArgs) -> Result<()> {
    if args.open_latency {
        return open_latency(ctx, args.open_runs);
    }
    setup::prerequisites()?;
    setup::bpffs()?;
    setup::apt_install(BENCH_PACKAGES)?;

    let out = ctx.target_dir.join("bench");
    // A failed run must not leave the previous run's report looking current.
    for file in ["report.md", "report.json", "report.png"] {
        let _ = fs::remove_file(out.join(file));
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["bench", "-p", "tests", "--bench", "datapath"]).env("GUARD_BENCH_OUT", &out);
    for (name, value) in [
        ("GUARD_BENCH_REPEAT", args.repeat),
        ("GUARD_BENCH_ROUNDS", args.rounds),
        ("GUARD_BENCH_FLOOD_REPEAT", args.flood_repeat),
        ("GUARD_BENCH_FLOOD_ROUNDS", args.flood_rounds),
        ("GUARD_BENCH_BATCH", args.batch),
    ] {
        if let Some(value) = value {
            cmd.env(name, value.to_string());
        }
    }
    if let Some(cases) = &args.cases {
        cmd.env("GUARD_BENCH_CASES", cases);
    }
    println!("xtask: running {} (a few minutes at the defaults) ...", show(&cmd));
    sh(&mut cmd)?;

    let report = out.join("report.md");
    let md =
        fs::read_to_string(&report).with_context(|| format!("reading {}", report.display()))?;
    println!("{md}");
    println!("xtask: report.md, report.json and report.png are in {}", out.display());
    Ok(())
}

/// `cargo bench -p tests --bench open_latency` on a machine prepared as for the e2e tier.
fn open_latency(ctx: &Ctx, runs: Option<u64>) -> Result<()> {
    setup::machine(ctx)?;
    println!("xtask: building guard with cargo build -p guard-userspace ...");
    sh(Command::new("cargo").args(["build", "-p", "guard-userspace"]))?;
    let mut cmd = Command::new("cargo");
    cmd.args(["bench", "-p", "tests", "--bench", "open_latency"])
        .env("GUARD_BIN", ctx.target_dir.join("debug/guard"))
        .env("GUARD_TEST_IMAGE", TEST_IMAGE)
        .env("GUARD_BENCH_OUT", ctx.target_dir.join("bench"));
    if let Some(runs) = runs {
        cmd.env("GUARD_BENCH_OPEN_RUNS", runs.to_string());
    }
    println!("xtask: running {} (about 15 s per run) ...", show(&cmd));
    sh(&mut cmd)
}
