//! The data-path benchmark: what guard's XDP program costs per packet, and how fast it drops a
//! flood next to the kernel's other places to drop. One run writes `report.md`, `report.json`
//! and `report.png` into `<target>/bench/`.
//!
//! a. Per-packet cost ([`cases`]): guard's real program and maps, loaded three times (10, 1,000
//!    and 10,000 containers, 10,000 allow entries each, maps filled by the agent's own
//!    `desired_state`), run with BPF_PROG_TEST_RUN on one crafted frame per decision.
//! b. Flood ([`flood`]): an in-kernel live-frames generator floods a veth whose host end drops
//!    with guard, a bare XDP_DROP, iptables raw, nftables ingress, or forward + conntrack.
//!
//! Needs root, bpffs, `ip`, `iptables`, `nft` and `ethtool`: run it with `cargo xtask bench`,
//! which installs what is missing. Everything it creates is removed at the end, also on
//! failure; a run killed outright is cleaned up by the next one. Parameters (environment):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | GUARD_BENCH_REPEAT | 1000000 | BPF_PROG_TEST_RUN repeat per per-packet run |
//! | GUARD_BENCH_ROUNDS | 5 | per-packet rounds (the median is reported) |
//! | GUARD_BENCH_FLOOD_REPEAT | 10000000 | frames per flood |
//! | GUARD_BENCH_FLOOD_ROUNDS | 3 | floods per variant (the median is reported); 0: no flood |
//! | GUARD_BENCH_BATCH | 64 | live-frames batch size |
//! | GUARD_BENCH_OUT | `<target>/bench` | where the reports go |
//! | GUARD_BENCH_CASES | all | per-packet cases to run, comma-separated (the floor always runs) |

mod cases;
mod chart;
mod flood;
mod rawbpf;
mod report;
mod testbed;
mod world;

use std::{env, path::PathBuf, process::ExitCode, rc::Rc, time::Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::world::World;

/// Container counts of the per-packet scales; the flood uses the middle one.
pub const SCALES: [usize; 3] = [10, 1_000, 10_000];
pub const FLOOD_SCALE: usize = 1;

#[derive(Clone, Debug)]
pub struct Params {
    pub repeat: u32,
    pub rounds: usize,
    pub flood_repeat: u32,
    pub flood_rounds: usize,
    pub batch: u32,
}

/// (variable, default, lowest, highest): counts are bounded so a typo cannot run for hours.
const PARAMS: [(&str, u64, u64, u64); 5] = [
    ("GUARD_BENCH_REPEAT", 1_000_000, 1_000, 100_000_000),
    ("GUARD_BENCH_ROUNDS", 5, 1, 51),
    ("GUARD_BENCH_FLOOD_REPEAT", 10_000_000, 10_000, 100_000_000),
    ("GUARD_BENCH_FLOOD_ROUNDS", 3, 0, 21),
    ("GUARD_BENCH_BATCH", 64, 1, 256),
];

impl Params {
    fn from_env() -> Result<Params> {
        let mut values = [0u64; PARAMS.len()];
        for (value, (name, default, low, high)) in values.iter_mut().zip(PARAMS) {
            *value = match env::var(name) {
                Ok(s) => s
                    .replace('_', "")
                    .parse()
                    .with_context(|| format!("{name}={s:?} is not a number"))?,
                Err(_) => default,
            };
            ensure!((low..=high).contains(value), "{name} must be within {low}..={high}");
        }
        Ok(Params {
            repeat: values[0] as u32,
            rounds: values[1] as usize,
            flood_repeat: values[2] as u32,
            flood_rounds: values[3] as usize,
            batch: values[4] as u32,
        })
    }

    /// The parameters that differ from the defaults, as `cargo xtask bench` flags.
    pub fn command(&self) -> String {
        let values = [
            u64::from(self.repeat),
            self.rounds as u64,
            u64::from(self.flood_repeat),
            self.flood_rounds as u64,
            u64::from(self.batch),
        ];
        let mut cmd = String::from("cargo xtask bench");
        for (value, (name, default, ..)) in values.iter().zip(PARAMS) {
            if *value != default {
                let flag = name.trim_start_matches("GUARD_BENCH_").to_lowercase().replace('_', "-");
                cmd += &format!(" --{flag} {value}");
            }
        }
        if let Ok(cases) = env::var("GUARD_BENCH_CASES") {
            cmd += &format!(" --cases {cases}");
        }
        cmd
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    let start = Instant::now();
    let params = Params::from_env()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads XDP programs and builds a test bed: run it as root with `cargo xtask \
         bench`"
    );
    let out_dir = out_dir()?;
    let machine = report::Machine::probe()?;
    if machine.bpf_jit_enable != 1 {
        bail!(
            "BPF JIT is off (/proc/sys/net/core/bpf_jit_enable = {}): figures would be the \
             interpreter's; `sysctl net.core.bpf_jit_enable=1` first",
            machine.bpf_jit_enable
        );
    }
    world::remove_leftover_pins();
    testbed::remove_leftovers();

    let worlds: Vec<Rc<World>> = SCALES.iter().map(|&n| Rc::new(World::new(n))).collect();
    let (per_packet, sizes) = cases::measure(&worlds, &params)?;
    let flood_not_run = match params.flood_rounds {
        0 => Some("GUARD_BENCH_FLOOD_ROUNDS=0 (`--flood-rounds 0`)".to_string()),
        _ => rawbpf::live_frames_refused(),
    };
    let flood = match &flood_not_run {
        None => flood::measure(&worlds[FLOOD_SCALE], &params)?,
        Some(why) => {
            eprintln!("bench: no flood: {why}");
            Vec::new()
        }
    };
    let sizes = SCALES.iter().copied().zip(sizes).collect();

    let report = report::Report {
        params: &params,
        machine,
        sizes,
        per_packet,
        flood,
        flood_not_run,
        elapsed: start.elapsed(),
    };
    report.write(&out_dir)?;
    eprintln!("bench: wrote report.md, report.json and report.png to {}", out_dir.display());
    Ok(())
}

/// `GUARD_BENCH_OUT`, else `<cargo's target directory>/bench`.
fn out_dir() -> Result<PathBuf> {
    let dir = match env::var_os("GUARD_BENCH_OUT") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = std::process::Command::new(cargo)
                .args(["metadata", "--format-version", "1", "--no-deps"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .context("running cargo metadata to find the target directory")?;
            ensure!(out.status.success(), "cargo metadata failed: set GUARD_BENCH_OUT");
            let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let target = meta["target_directory"].as_str().context("no target_directory")?;
            PathBuf::from(target).join("bench")
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
