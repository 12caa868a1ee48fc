//! Part b: drop rate under a flood, guard against the kernel's other places to drop, side by
//! side in one run.
//!
//! The generator (see [`crate::rawbpf`]) runs in namespace gbench-out and sends live TCP SYNs
//! out of gbo0, from the outside address to a container address on a closed port (the direct
//! path). They arrive on gbh0, where each variant drops them its own way. Generation, the veth
//! and the drop all run on the generator's CPU (veth's NAPI runs in the softirq that follows
//! each batch), so the rate is that of one core, generation included.
//!
//! Only drop-path figures are valid: live frames are recycled with whatever the stack wrote
//! into them, so a frame that passed would not stay the frame we built.

use std::{fs::File, net::Ipv4Addr, os::fd::OwnedFd, rc::Rc, thread, time::Duration};

use anyhow::{Context, Result, bail};
use aya::programs::xdp::{XdpLink, XdpMode};
use guard_common::reason::Reason;
use nix::sched::{CloneFlags, setns};
use tests::frames::Tcp;

use crate::{
    Params,
    cases::median,
    rawbpf,
    testbed::{
        self, Bed, COMMENT, HOST_IF, NFT_TABLE, OUT_IF, OUT_NS, USER_CHAIN, Undo, UndoStack, run,
    },
    world::{CLOSED_PORT, CONTAINER_SUPERNET, Guard, OUTSIDE, World},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Guard,
    XdpDropOnly,
    IptablesRaw,
    NftIngress,
    ForwardConntrack,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::Guard,
        Variant::XdpDropOnly,
        Variant::IptablesRaw,
        Variant::NftIngress,
        Variant::ForwardConntrack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Guard => "guard",
            Variant::XdpDropOnly => "xdp_drop_only",
            Variant::IptablesRaw => "iptables_raw",
            Variant::NftIngress => "nft_ingress",
            Variant::ForwardConntrack => "forward_conntrack",
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            Variant::Guard => "guard's XDP program (native) on gbh0, maps of 1,000 containers",
            Variant::XdpDropOnly => "a bare `return XDP_DROP` (native) on gbh0: the limit",
            Variant::IptablesRaw => {
                "no XDP; `iptables -t raw -I PREROUTING -i gbh0 -d DST -j DROP` (Docker 28's \
                 mechanism)"
            }
            Variant::NftIngress => {
                "no XDP; nftables netdev ingress hook on gbh0: `ip daddr DST counter drop`"
            }
            Variant::ForwardConntrack => {
                "no XDP; forwarded with conntrack on, DROP in a DOCKER-USER-like chain jumped to \
                 from FORWARD (ufw-docker's mechanism)"
            }
        }
    }

    /// Where the receiver-side count comes from.
    pub fn counter(self) -> &'static str {
        match self {
            Variant::Guard => "guard's `closed` counter",
            Variant::XdpDropOnly => "gbh0's xdp_drops (ethtool -S)",
            Variant::IptablesRaw => "the raw rule's packet counter",
            Variant::NftIngress => "the nft rule's counter",
            Variant::ForwardConntrack => "the DROP rule's packet counter",
        }
    }
}

/// One flood of one variant.
#[derive(Clone, Debug)]
pub struct FloodRun {
    pub wall: Duration,
    pub generated: u64,
    /// Frames gbh0's NAPI received (its rx_packets).
    pub received: u64,
    /// Frames the veth could not take (its ring was full): gbh0's rx_dropped.
    pub ring_full: u64,
    /// Frames the variant's own counter says it dropped.
    pub dropped: u64,
}

impl FloodRun {
    pub fn mpps(&self) -> f64 {
        self.generated as f64 / self.wall.as_secs_f64() / 1e6
    }
    pub fn dropped_mpps(&self) -> f64 {
        self.dropped as f64 / self.wall.as_secs_f64() / 1e6
    }
}

pub struct FloodResult {
    pub variant: Variant,
    pub runs: Vec<FloodRun>,
    /// Anything worth knowing about how the variant ran (e.g. conntrack state).
    pub notes: Vec<String>,
}

impl FloodResult {
    pub fn mpps(&self) -> f64 {
        median(self.runs.iter().map(FloodRun::mpps).collect())
    }
    pub fn dropped_mpps(&self) -> f64 {
        median(self.runs.iter().map(FloodRun::dropped_mpps).collect())
    }
    /// Dropped by the variant / generated, over all runs.
    pub fn dropped_share(&self) -> f64 {
        let generated: u64 = self.runs.iter().map(|r| r.generated).sum();
        let dropped: u64 = self.runs.iter().map(|r| r.dropped).sum();
        dropped as f64 / generated as f64
    }
}

pub fn measure(world: &Rc<World>, params: &Params) -> Result<Vec<FloodResult>> {
    let bed = Bed::create(CONTAINER_SUPERNET)?;
    let out_ifindex: u32 =
        run("ip", &["netns", "exec", OUT_NS, "cat", &format!("/sys/class/net/{OUT_IF}/ifindex")])?
            .trim()
            .parse()?;
    let dst = world.probe_addr();
    let frame = Tcp::syn(OUTSIDE, dst, CLOSED_PORT).frame(bed.out_mac, bed.host_mac);
    let generator = rawbpf::generator_program(out_ifindex, frame[22], [frame[24], frame[25]])
        .context("loading the generator")?;

    let mut results: Vec<FloodResult> = Variant::ALL
        .iter()
        .map(|&variant| FloodResult { variant, runs: Vec::new(), notes: Vec::new() })
        .collect();
    for round in 0..params.flood_rounds {
        for result in &mut results {
            let variant = result.variant;
            eprintln!(
                "bench: flood round {}/{}: {} ({} frames)",
                round + 1,
                params.flood_rounds,
                variant.name(),
                params.flood_repeat
            );
            let armed = Armed::arm(variant, world, &bed, dst)?;
            if round == 0 {
                result.notes.extend(armed.notes());
            }
            let dropped_before = armed.dropped()?;
            let received_before = testbed::link_stat(HOST_IF, "rx_packets")?;
            let ring_full_before = testbed::link_stat(HOST_IF, "rx_dropped")?;
            let wall = generate(&generator, &frame, params.flood_repeat, params.batch)?;
            // Let the last softirq (or ksoftirqd) finish before reading the counters.
            thread::sleep(Duration::from_millis(200));
            let run = FloodRun {
                wall,
                generated: u64::from(params.flood_repeat),
                received: testbed::link_stat(HOST_IF, "rx_packets")? - received_before,
                ring_full: testbed::link_stat(HOST_IF, "rx_dropped")? - ring_full_before,
                dropped: armed.dropped()? - dropped_before,
            };
            drop(armed);
            eprintln!(
                "bench:   {:.2} Mpps generated, {} of {} dropped by {} ({:.2} Mpps)",
                run.mpps(),
                run.dropped,
                run.generated,
                variant.counter(),
                run.dropped_mpps()
            );
            result.runs.push(run);
        }
    }
    Ok(results)
}

/// Issues the live-frames run from a thread inside gbench-out, so that the generator's
/// ifindex is gbo0's and the frames leave through it.
fn generate(generator: &OwnedFd, frame: &[u8], repeat: u32, batch: u32) -> Result<Duration> {
    thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(format!("/run/netns/{OUT_NS}"))
                .context("opening the outside namespace")?;
            // Only this thread moves; it ends right after the run.
            setns(ns, CloneFlags::CLONE_NEWNET).context("setns into the outside namespace")?;
            rawbpf::run_live_frames(generator, frame, repeat, batch)
                .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?
    })
}

/// A variant in place on gbh0; dropping it removes it.
struct Armed {
    variant: Variant,
    held: Held,
}

/// What keeps a variant in place.
enum Held {
    /// A fresh load per flood (see [`crate::cases::measure`] on why). The owned bpf_link
    /// detaches when dropped, before guard is unloaded (fields drop in order).
    Guard {
        _link: XdpLink,
        guard: Box<Guard>,
    },
    /// Likewise; the program goes with its last descriptor.
    Raw {
        _link: OwnedFd,
        _prog: OwnedFd,
    },
    Rules {
        _undo: UndoStack,
    },
}

impl Armed {
    fn arm(variant: Variant, world: &Rc<World>, bed: &Bed, dst: Ipv4Addr) -> Result<Armed> {
        let dst32 = format!("{dst}/32");
        // The iptables variants' drop of what is addressed to the container, commented so
        // that iptables_counter finds it.
        let drop_dst = ["-d", &dst32, "-m", "comment", "--comment", COMMENT, "-j", "DROP"];
        let held = match variant {
            Variant::Guard => {
                let mut guard = Guard::load(world)?;
                let program = guard.program()?;
                let id = program
                    .attach(HOST_IF, XdpMode::Driver)
                    .context("attaching guard's XDP program to gbh0 (native)")?;
                Held::Guard { _link: program.take_link(id)?, guard: Box::new(guard) }
            }
            Variant::XdpDropOnly => {
                let prog = rawbpf::drop_program().context("loading the XDP_DROP program")?;
                let link = rawbpf::attach_xdp_native(&prog, bed.host_ifindex)
                    .context("attaching the XDP_DROP program to gbh0 (native)")?;
                Held::Raw { _link: link, _prog: prog }
            }
            Variant::IptablesRaw => {
                let rule = [&["PREROUTING", "-i", HOST_IF][..], &drop_dst].concat();
                let mut undo = UndoStack::default();
                undo.push(iptables_rule(&["-t", "raw", "-I"], &["-t", "raw", "-D"], &rule)?);
                Held::Rules { _undo: undo }
            }
            Variant::NftIngress => {
                let mut undo = UndoStack::default();
                // Deleting the table takes its chain and rule along.
                undo.push(Undo::apply(
                    "nft",
                    &["add", "table", "netdev", NFT_TABLE],
                    &["delete", "table", "netdev", NFT_TABLE],
                )?);
                let hook = format!(
                    "{{ type filter hook ingress device \"{HOST_IF}\" priority -500 ; policy \
                     accept ; }}"
                );
                run("nft", &["add", "chain", "netdev", NFT_TABLE, "ingress", &hook])?;
                let dst = dst.to_string();
                let rule = ["ip", "daddr", &dst, "counter", "drop"];
                run(
                    "nft",
                    &[&["add", "rule", "netdev", NFT_TABLE, "ingress"][..], &rule].concat(),
                )?;
                Held::Rules { _undo: undo }
            }
            Variant::ForwardConntrack => {
                let mut undo = UndoStack::default();
                undo.push(Undo::apply("iptables", &["-N", USER_CHAIN], &["-X", USER_CHAIN])?);
                // ufw-docker's shape: established traffic returns, new traffic to the container
                // is dropped. The conntrack match also makes sure conntrack runs in this
                // namespace whether or not Docker's NAT rules are loaded.
                let established =
                    ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"];
                let drop_rule = [&["-p", "tcp"][..], &drop_dst].concat();
                for rule in [&established[..], &drop_rule[..]] {
                    undo.push(iptables_rule(&["-A", USER_CHAIN], &["-D", USER_CHAIN], rule)?);
                }
                let jump = [
                    "FORWARD",
                    "-i",
                    HOST_IF,
                    "-m",
                    "comment",
                    "--comment",
                    COMMENT,
                    "-j",
                    USER_CHAIN,
                ];
                undo.push(iptables_rule(&["-I"], &["-D"], &jump)?);
                Held::Rules { _undo: undo }
            }
        };
        Ok(Armed { variant, held })
    }

    fn notes(&self) -> Vec<String> {
        match self.variant {
            Variant::ForwardConntrack => {
                let loaded =
                    std::path::Path::new("/proc/sys/net/netfilter/nf_conntrack_count").exists();
                vec![if loaded { "conntrack loaded" } else { "conntrack NOT loaded" }.into()]
            }
            _ => Vec::new(),
        }
    }

    /// The variant's own count of dropped frames so far.
    fn dropped(&self) -> Result<u64> {
        match (&self.held, self.variant) {
            (Held::Guard { guard, .. }, _) => guard.counter(Reason::Closed),
            (_, Variant::Guard) => bail!("guard's variant without guard"),
            (_, Variant::XdpDropOnly) => testbed::ethtool_stat(HOST_IF, "xdp_drops"),
            (_, Variant::IptablesRaw) => iptables_counter("raw", "PREROUTING"),
            (_, Variant::NftIngress) => {
                let out = run("nft", &["list", "chain", "netdev", NFT_TABLE, "ingress"])?;
                let words: Vec<&str> = out.split_whitespace().collect();
                let at = words
                    .windows(2)
                    .position(|w| w == ["counter", "packets"])
                    .context("no counter in the nft chain")?;
                Ok(words[at + 2].parse()?)
            }
            (_, Variant::ForwardConntrack) => iptables_counter("filter", USER_CHAIN),
        }
    }
}

/// iptables `rule`, added with the `add` arguments and undone with the `delete` ones.
fn iptables_rule(add: &[&str], delete: &[&str], rule: &[&str]) -> Result<Undo> {
    Undo::apply("iptables", &[add, rule].concat(), &[delete, rule].concat())
}

/// The packet counter of our (commented) rule in `table`/`chain`.
fn iptables_counter(table: &str, chain: &str) -> Result<u64> {
    let out = run("iptables", &["-t", table, "-L", chain, "-n", "-v", "-x"])?;
    let marker = format!("/* {COMMENT} */");
    let Some(line) = out.lines().find(|l| l.contains(&marker)) else {
        bail!("no {COMMENT} rule in iptables -t {table} -L {chain}");
    };
    let packets = line.split_whitespace().next().context("empty rule line")?;
    packets.parse().with_context(|| format!("rule line {line:?}"))
}
