//! report.json, report.md and report.png, all from the figures of one run.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use crate::{
    FLOOD_SCALE, Params, SCALES,
    cases::{CaseResult, FLOOR},
    chart,
    flood::{FloodResult, Variant},
    world::{ALLOW_ENTRIES, MapSizes},
};

/// Every decision may cost at most this much above the floor.
pub const MAX_ABOVE_FLOOR_NS: f64 = 25.0;
/// From 10 to 10,000 containers, a decision may grow at most this much.
pub const MAX_GROWTH_PCT: f64 = 10.0;
pub const MIN_GUARD_OVER_XDP_DROP: f64 = 0.9;
pub const MIN_GUARD_OVER_IPTABLES_RAW: f64 = 2.5;

pub struct Machine {
    pub kernel: String,
    pub nproc: usize,
    pub cpu: String,
    pub bpf_jit_enable: u32,
    pub timestamp: String,
    pub git: Option<(String, bool)>,
}

impl Machine {
    pub fn probe() -> Result<Machine> {
        let read = |p: &str| fs::read_to_string(p).with_context(|| format!("reading {p}"));
        let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
            .map_or("unknown".into(), |(_, m)| m.trim().to_string());
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let commit = git(&["rev-parse", "--short=12", "HEAD"]);
        let dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        Ok(Machine {
            kernel: read("/proc/sys/kernel/osrelease")?.trim().to_string(),
            nproc: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu,
            bpf_jit_enable: read("/proc/sys/net/core/bpf_jit_enable")?.trim().parse()?,
            timestamp: utc_now(),
            git: commit.map(|c| (c, dirty)),
        })
    }
}

pub struct Report<'a> {
    pub params: &'a Params,
    pub machine: Machine,
    pub sizes: Vec<(usize, MapSizes)>,
    pub per_packet: Vec<CaseResult>,
    pub flood: Vec<FloodResult>,
    /// Why there are no flood figures, if there are none.
    pub flood_not_run: Option<String>,
    pub elapsed: Duration,
}

/// A figure against its target.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

impl Report<'_> {
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.json())?;
        fs::write(dir.join("report.json"), json + "\n")?;
        fs::write(dir.join("report.md"), self.markdown())?;
        chart::draw(self, &dir.join("report.png")).context("drawing report.png")?;
        Ok(())
    }

    fn floor(&self, scale: usize) -> Option<f64> {
        self.case(FLOOR)?.per_scale[scale].as_ref().map(super::cases::Sample::median_ns)
    }

    pub fn case(&self, name: &str) -> Option<&CaseResult> {
        self.per_packet.iter().find(|c| c.name == name)
    }

    /// Median ns/packet of a case at scale index `s`.
    pub fn ns(&self, case: &CaseResult, s: usize) -> Option<f64> {
        case.per_scale[s].as_ref().map(super::cases::Sample::median_ns)
    }

    pub fn above_floor(&self, case: &CaseResult, s: usize) -> Option<f64> {
        Some(self.ns(case, s)? - self.floor(s)?)
    }

    /// Growth of ns/packet from the smallest to the largest scale, in %.
    pub fn growth_pct(&self, case: &CaseResult) -> Option<f64> {
        let first = self.ns(case, 0)?;
        let last = self.ns(case, SCALES.len() - 1)?;
        Some((last - first) / first * 100.0)
    }

    pub fn flood(&self, v: Variant) -> Option<&FloodResult> {
        self.flood.iter().find(|f| f.variant == v)
    }

    /// (name, numerator, denominator, minimum) of the flood ratios.
    fn ratio_defs() -> [(&'static str, Variant, Variant, f64); 2] {
        [
            (
                "guard_over_xdp_drop_only",
                Variant::Guard,
                Variant::XdpDropOnly,
                MIN_GUARD_OVER_XDP_DROP,
            ),
            (
                "guard_over_iptables_raw",
                Variant::Guard,
                Variant::IptablesRaw,
                MIN_GUARD_OVER_IPTABLES_RAW,
            ),
        ]
    }

    /// (generated-based, receiver-verified) ratio.
    pub fn ratio(&self, a: Variant, b: Variant) -> Option<(f64, f64)> {
        let (a, b) = (self.flood(a)?, self.flood(b)?);
        Some((a.mpps() / b.mpps(), a.dropped_mpps() / b.dropped_mpps()))
    }

    fn json(&self) -> Value {
        let m = &self.machine;
        let mid = FLOOD_SCALE;
        let mut test_run_ns = Map::new();
        for case in &self.per_packet {
            test_run_ns.insert(case.name.into(), json!(self.ns(case, mid)));
        }
        let mut scales = Map::new();
        for (s, (containers, sizes)) in self.sizes.iter().enumerate() {
            let mut cases = Map::new();
            for case in &self.per_packet {
                let value = match &case.per_scale[s] {
                    None => json!({ "ns": null }),
                    Some(sample) => json!({
                        "ns": sample.median_ns(),
                        "above_floor_ns": self.above_floor(case, s),
                        "rounds_ns": sample.rounds_ns,
                        "wall_ns": sample.median_wall_ns(),
                    }),
                };
                cases.insert(case.name.into(), value);
            }
            scales.insert(
                containers.to_string(),
                json!({
                    "containers": containers,
                    "map_entries": {
                        "addrs": sizes.addrs,
                        "networks": sizes.networks,
                        "published": sizes.published,
                        "ports": sizes.ports,
                        "sources": sizes.sources,
                        "flows": sizes.flows,
                    },
                    "cases": cases,
                }),
            );
        }
        let mut growth = Map::new();
        let mut targets_met = Map::new();
        for case in &self.per_packet {
            growth.insert(case.name.into(), json!(self.growth_pct(case)));
            if case.per_scale.iter().all(Option::is_none) {
                continue;
            }
            if case.name != FLOOR {
                let above: Vec<bool> = (0..SCALES.len())
                    .filter_map(|s| self.above_floor(case, s))
                    .map(|ns| ns <= MAX_ABOVE_FLOOR_NS)
                    .collect();
                targets_met.insert(
                    format!("{}_above_floor", case.name),
                    json!(above.iter().all(|&ok| ok)),
                );
            }
            if let Some(g) = self.growth_pct(case).filter(|_| case.name != FLOOR) {
                targets_met.insert(format!("{}_growth", case.name), json!(g <= MAX_GROWTH_PCT));
            }
        }
        let mut flood_mpps = Map::new();
        let mut flood = Map::new();
        for f in &self.flood {
            flood_mpps.insert(f.variant.name().into(), json!(f.mpps()));
            let runs: Vec<Value> = f
                .runs
                .iter()
                .map(|r| {
                    json!({
                        "wall_s": r.wall.as_secs_f64(),
                        "generated": r.generated,
                        "received": r.received,
                        "ring_full": r.ring_full,
                        "dropped": r.dropped,
                        "mpps": r.mpps(),
                        "dropped_mpps": r.dropped_mpps(),
                    })
                })
                .collect();
            flood.insert(
                f.variant.name().into(),
                json!({
                    "how": f.variant.what(),
                    "mpps": f.mpps(),
                    "dropped_mpps": f.dropped_mpps(),
                    "dropped_share": f.dropped_share(),
                    "receiver_counter": f.variant.counter(),
                    "notes": f.notes,
                    "runs": runs,
                }),
            );
        }
        let mut ratios = Map::new();
        for (name, a, b, min) in Self::ratio_defs() {
            if let Some((r, verified)) = self.ratio(a, b) {
                ratios.insert(name.into(), json!(r));
                ratios.insert(format!("{name}_dropped"), json!(verified));
                targets_met.insert(name.into(), json!(r >= min));
            }
        }
        json!({
            "timestamp": m.timestamp,
            "command": self.params.command(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "machine": {
                "kernel": m.kernel,
                "nproc": m.nproc,
                "cpu": m.cpu,
                "bpf_jit_enable": m.bpf_jit_enable,
                "jit": m.bpf_jit_enable == 1,
            },
            "git": m.git.as_ref().map(|(c, dirty)| json!({ "commit": c, "dirty": dirty })),
            "parameters": {
                "repeat": self.params.repeat,
                "rounds": self.params.rounds,
                "flood_repeat": self.params.flood_repeat,
                "flood_rounds": self.params.flood_rounds,
                "batch": self.params.batch,
                "scales": SCALES,
                "allow_entries": ALLOW_ENTRIES,
                "test_run_ns_scale": SCALES[mid],
                "flood_scale": SCALES[mid],
            },
            "test_run_ns": test_run_ns,
            "scales": scales,
            "growth_pct": growth,
            "flood_mpps": flood_mpps,
            "flood": flood,
            "flood_not_run": self.flood_not_run,
            "ratios": ratios,
            "targets": {
                "above_floor_ns_max": MAX_ABOVE_FLOOR_NS,
                "growth_pct_max": MAX_GROWTH_PCT,
                "guard_over_xdp_drop_only_min": MIN_GUARD_OVER_XDP_DROP,
                "guard_over_iptables_raw_min": MIN_GUARD_OVER_IPTABLES_RAW,
                "met": targets_met,
            },
        })
    }

    fn markdown(&self) -> String {
        let m = &self.machine;
        let p = self.params;
        let mut md = String::new();
        let w = &mut md;
        let _ = writeln!(w, "# container-guard data-path benchmark\n");
        let git = m.git.as_ref().map_or("unknown".into(), |(c, dirty)| {
            format!("{c}{}", if *dirty { " (with uncommitted changes)" } else { "" })
        });
        let _ = writeln!(
            w,
            "{} · kernel {} · {} CPUs ({}) · BPF JIT {} (`net.core.bpf_jit_enable = {}`) · \
             commit {git} · {:.0} s\n",
            m.timestamp,
            m.kernel,
            m.nproc,
            m.cpu,
            if m.bpf_jit_enable == 1 { "on" } else { "OFF" },
            m.bpf_jit_enable,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(w, "Reproduce (as root): `{}`\n", p.command());
        let _ = writeln!(
            w,
            "The machine is shared and noisy: compare figures within this report, not across \
             runs.\n"
        );

        // a.
        let _ = writeln!(w, "## a. Per-packet cost (BPF_PROG_TEST_RUN)\n");
        let _ = writeln!(
            w,
            "guard's XDP program as built, maps filled by the agent's `desired_state` from a \
             synthetic Docker host at each scale, always with {} allow entries. \
             Each figure: the kernel's average over repeat = {} runs (whole ns), median of {} \
             rounds. Every round loads guard afresh at every scale (in a rotating order: the \
             first load of a batch tends to run every path 10-15 ns slower, the floor \
             included) and runs all cases and scales round-robin. Every run checked: verdict, \
             the reason counter moved by exactly `repeat`, and access events (a case marked \
             as an access: by `repeat`, reported or suppressed; any other: not at all). \
             \"above floor\" subtracts the floor measured at the same scale.\n",
            thousands(ALLOW_ENTRIES as u64),
            thousands(u64::from(p.repeat)),
            p.rounds
        );
        let _ = writeln!(
            w,
            "Targets: every decision ≤ {MAX_ABOVE_FLOOR_NS} ns above the floor; ≤ \
             {MAX_GROWTH_PCT} % growth from {} to {} containers.\n",
            thousands(SCALES[0] as u64),
            thousands(SCALES[SCALES.len() - 1] as u64)
        );
        let scale_heads: Vec<String> = SCALES.iter().map(|s| thousands(*s as u64)).collect();
        let _ = writeln!(
            w,
            "| case | ns/packet @ {} | @ {} | @ {} | above floor @ {} | @ {} | @ {} | growth {} → {} |",
            scale_heads[0],
            scale_heads[1],
            scale_heads[2],
            scale_heads[0],
            scale_heads[1],
            scale_heads[2],
            scale_heads[0],
            scale_heads[2]
        );
        let _ = writeln!(w, "|---|--:|--:|--:|--:|--:|--:|--:|");
        for case in &self.per_packet {
            let mut row = format!("| {} ", case.name);
            for s in 0..SCALES.len() {
                row += &format!("| {} ", fmt_ns(self.ns(case, s)));
            }
            for s in 0..SCALES.len() {
                if case.name == FLOOR {
                    row += "| – ";
                } else {
                    let above = self.above_floor(case, s);
                    row += &format!(
                        "| {} {} ",
                        fmt_ns(above),
                        above.map_or("", |a| verdict(a <= MAX_ABOVE_FLOOR_NS))
                    );
                }
            }
            // The floor is the method's, not a decision: no target.
            let growth = self.growth_pct(case);
            let target = match growth {
                Some(g) if case.name != FLOOR => verdict(g <= MAX_GROWTH_PCT),
                _ => "",
            };
            row += &format!("| {} {target} |", growth.map_or("–".into(), |g| format!("{g:+.1} %")));
            let _ = writeln!(w, "{row}");
        }
        let _ = writeln!(w, "\nCases:\n");
        for case in &self.per_packet {
            let _ = writeln!(w, "- `{}`: {}", case.name, case.what);
        }
        let _ = writeln!(w, "\nMap entries as written:\n");
        let _ =
            writeln!(w, "| containers | addrs | networks | published | ports | sources | flows |");
        let _ = writeln!(w, "|--:|--:|--:|--:|--:|--:|--:|");
        for (containers, s) in &self.sizes {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} |",
                thousands(*containers as u64),
                thousands(s.addrs as u64),
                thousands(s.networks as u64),
                thousands(s.published as u64),
                thousands(s.ports as u64),
                thousands(s.sources as u64),
                thousands(s.flows as u64)
            );
        }

        // b.
        let _ = writeln!(w, "\n## b. Flood drop rate (live frames, one core)\n");
        if let Some(why) = &self.flood_not_run {
            let _ = writeln!(w, "Not measured: {why}.\n\n![chart](report.png)");
            return md;
        }
        let _ = writeln!(
            w,
            "An XDP program returning `bpf_redirect(gbo0)`, run with BPF_PROG_TEST_RUN + \
             BPF_F_TEST_XDP_LIVE_FRAMES (batch {}) from inside namespace gbench-out, sends {} \
             TCP SYNs per flood from the outside address to a container address on a closed \
             port; they arrive on the host veth gbh0, where each variant drops them. Variants \
             run one after another with the same generator, {} rounds round-robin, median \
             reported. Mpps = frames generated / wall time of the run (generation, veth and drop \
             on one CPU); \"dropped\" is the receiver's own count, and its Mpps = dropped / wall \
             time. Only drop-path figures are valid (live frames are recycled with the stack's \
             edits). gbh0 has GRO on, as NICs have by default (a veth only takes redirected \
             frames when its peer runs NAPI: with GRO or an XDP program); guard is loaded \
             afresh for each flood.\n",
            p.batch,
            thousands(u64::from(p.flood_repeat)),
            p.flood_rounds
        );
        let _ = writeln!(
            w,
            "| variant | Mpps (generated) | dropped at receiver | Mpps (dropped) | counted by | how |"
        );
        let _ = writeln!(w, "|---|--:|--:|--:|---|---|");
        for f in &self.flood {
            let notes = if f.notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", f.notes.join("; "))
            };
            let _ = writeln!(
                w,
                "| {} | {:.2} | {:.1} % | {:.2} | {} | {}{notes} |",
                f.variant.name(),
                f.mpps(),
                f.dropped_share() * 100.0,
                f.dropped_mpps(),
                f.variant.counter(),
                f.variant.what()
            );
        }
        let _ = writeln!(w, "\n| ratio | value (generated) | value (dropped) | target |");
        let _ = writeln!(w, "|---|--:|--:|---|");
        for (_, a, b, min) in Self::ratio_defs() {
            if let Some((r, verified)) = self.ratio(a, b) {
                let _ = writeln!(
                    w,
                    "| {} / {} | {r:.2} {} | {verified:.2} | ≥ {min} |",
                    a.name(),
                    b.name(),
                    verdict(r >= min)
                );
            }
        }
        let _ = writeln!(
            w,
            "\nPer flood (generated / received by gbh0 / ring full / dropped, wall s):\n"
        );
        for f in &self.flood {
            let runs: Vec<String> = f
                .runs
                .iter()
                .map(|r| {
                    format!(
                        "{}/{}/{}/{} in {:.3}",
                        r.generated,
                        r.received,
                        r.ring_full,
                        r.dropped,
                        r.wall.as_secs_f64()
                    )
                })
                .collect();
            let _ = writeln!(w, "- {}: {}", f.variant.name(), runs.join(", "));
        }
        let _ = writeln!(w, "\n![chart](report.png)");
        md
    }
}

fn fmt_ns(ns: Option<f64>) -> String {
    match ns {
        Some(ns) if ns.fract() == 0.0 => format!("{ns:.0}"),
        Some(ns) => format!("{ns:.1}"),
        None => "–".into(),
    }
}

/// 10000 -> "10,000".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The current time as RFC 3339 UTC, e.g. 2025-01-31T12:00:00.000Z.
fn utc_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    guard_userspace::telemetry::events::utc(now.map_or(0.0, |d| d.as_secs_f64()))
}
