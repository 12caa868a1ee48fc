//! `xtask vm-guest`: what runs inside the VM, started there from the host's own xtask
//! binary (the guest sees the host's root file system read-only over 9p).
//!
//! It prepares the guest as `cargo xtask setup` prepares the host (bpffs, dockerd, the test
//! image), with the same code, then runs the test binaries the host built, with the
//! environment the host tiers give them, and brackets every step with a [`Marker`].
//!
//! Nothing here may write to the host: virtme-ng already lays memory-backed overlays over
//! /etc, /usr, /var, /tmp and the rest, and a fresh tmpfs on /run; this adds fresh tmpfs
//! mounts where Docker keeps its state, so that the guest's dockerd neither builds its
//! overlay2 layers on an overlay (unsupported) nor sees the host's containers and images
//! in the lower layer and tries to restore them.

use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::marker::Marker;
use crate::daemon::detached;
use crate::docker::{self, TEST_IMAGE};
use crate::test::Tier;
use crate::{setup, sh};

/// Writable scratch for the guest: dockerd's log, the tests' CARGO_TARGET_DIR.
const SCRATCH: &str = "/tmp/guard-vm";

/// dockerd answers in 40 to 70 s under TCG (each of its iptables calls is a slow process
/// start, the first ones load netfilter modules over 9p); on the host it takes a few.
const DOCKERD_TIMEOUT: Duration = Duration::from_secs(300);

/// Where dockerd looks for a running containerd.
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// Where Docker keeps state; each gets a fresh tmpfs.
const DOCKER_STATE: &[&str] = &["/var/lib/docker", "/var/lib/containerd"];

/// Kernel messages at this level and below go to the console: errors and worse. The rest
/// (veths coming and going, bridge ports) would interleave with the test output the host
/// parses; warnings are printed at the end when a tier failed.
const CONSOLE_LOGLEVEL: &str = "4";

#[derive(Args)]
pub struct GuestArgs {
    /// The agent binary the tests run (GUARD_BIN).
    #[arg(long, value_name = "PATH")]
    guard_bin: PathBuf,
    /// The verdict tier's test binary.
    #[arg(long, value_name = "PATH")]
    verdict: Option<PathBuf>,
    /// The e2e tier's test binary.
    #[arg(long, value_name = "PATH")]
    e2e: Option<PathBuf>,
    /// Passed to every test binary, after `--`.
    #[arg(last = true, value_name = "TEST_ARGS")]
    args: Vec<String>,
}

/// Runs the guest's part; a failure of its own preparation is reported as a marker (the
/// host cannot see our exit status).
pub fn run(args: &GuestArgs) -> Result<bool> {
    refuse_outside_a_vm()?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Marker::Start { release: release.trim().to_owned() }.print();
    let result = prepare_and_test(args);
    if let Err(e) = &result {
        Marker::Failed(format!("{e:#}")).print();
    }
    Marker::End.print();
    result
}

/// This command mounts tmpfs over /var/lib/docker: on the host that would hide its Docker
/// state. The kernel command line virtme-ng gives its guests says where we are.
fn refuse_outside_a_vm() -> Result<()> {
    let cmdline = fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    if !cmdline.split_whitespace().any(|arg| arg.starts_with("virtme_")) {
        bail!("vm-guest runs only inside the VM that `cargo xtask test --kernel` boots");
    }
    Ok(())
}

fn prepare_and_test(args: &GuestArgs) -> Result<bool> {
    let _ = fs::write("/proc/sys/kernel/printk", CONSOLE_LOGLEVEL);
    fs::create_dir_all(SCRATCH)?;
    for dir in DOCKER_STATE {
        fs::create_dir_all(dir)?;
        println!("xtask: mounting a tmpfs on {dir} (Docker's state, fresh in the VM) ...");
        sh(Command::new("mount").args(["-t", "tmpfs", "tmpfs", dir]))?;
    }
    setup::bpffs()?;
    // The verdict tier needs no Docker, and dockerd is a minute or more of an emulated CPU.
    if args.e2e.is_some() {
        let started = Instant::now();
        start_containerd()?;
        docker::ensure_daemon_within(Path::new(SCRATCH), DOCKERD_TIMEOUT)?;
        println!("xtask: dockerd answered after {} s", started.elapsed().as_secs());
        Marker::DockerdReady.print();
        docker::ensure_test_image()?;
    }

    let tiers = [(Tier::Verdict, &args.verdict), (Tier::E2e, &args.e2e)];
    let mut all_passed = true;
    for (tier, bin) in tiers {
        if let Some(bin) = bin {
            all_passed &= run_tier(tier, bin, args)?;
        }
    }
    if !all_passed {
        kernel_warnings();
    }
    Ok(all_passed)
}

/// containerd, started before dockerd and waited for without a deadline of dockerd's: a
/// dockerd that starts containerd itself gives up when it is not up within its fixed timeout,
/// which an emulated CPU on a busy host can exceed (seen on 6.1). dockerd uses a containerd
/// that already serves /run/containerd/containerd.sock.
fn start_containerd() -> Result<()> {
    let log_path = Path::new(SCRATCH).join("containerd.log");
    println!("xtask: starting containerd in the background (log: {}) ...", log_path.display());
    let log = File::create(&log_path)?;
    let mut cmd = Command::new("containerd");
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let mut child = detached(&mut cmd).spawn().context("starting containerd")?;
    let deadline = Instant::now() + DOCKERD_TIMEOUT;
    while UnixStream::connect(CONTAINERD_SOCKET).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("containerd exited ({status}); see {}", log_path.display());
        }
        if Instant::now() >= deadline {
            bail!("containerd did not serve {CONTAINERD_SOCKET} within {DOCKERD_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// One test binary, as `cargo test` runs it (from its package's directory) and with the
/// environment `cargo xtask test` gives it on the host.
/// The seed scenario's tests a VM runs unless told otherwise: guard enforcing on that kernel,
/// and its programs outliving a stopped agent until an unload that leaves nothing. The third
/// (without the agent) shows the exposure and says nothing about the kernel; under emulation
/// each test takes minutes.
const E2E_TESTS: [&str; 2] = [
    "with_agent_outside_hosts_reach_only_what_labels_open",
    "stopped_agent_keeps_protection_until_unloaded",
];

/// Verdict tests that set the packet's ingress interface (`__sk_buff.ingress_ifindex`) for
/// BPF_PROG_TEST_RUN, which Linux 5.10 refuses (EINVAL; 6.1 takes it): they cannot run on
/// 5.10 and are skipped there, said aloud. What they check runs on 5.10 with real traffic in
/// the seed scenario, and as they are on the host and on 6.1.
const NEED_TEST_RUN_INGRESS: [&str; 8] = [
    "a_network_the_agent_has_not_seen_is_closed_at_the_gate_replies_excepted",
    "a_container_accepts_a_connection_from_outside_only_where_the_policy_opened_it",
    "answers_to_trusted_or_audited_sources_are_not_remembered",
    "in_audit_mode_an_unseen_container_s_answer_passes_and_is_counted",
    "recorders_remember_only_flows_started_inside_whose_replies_would_drop",
    "the_gate_judges_what_arrived_on_an_uplink_and_nothing_else",
    "in_audit_mode_a_probe_xdp_counted_is_not_counted_again_at_the_gate",
    "flows_to_denied_sources_are_remembered",
];

/// What this kernel cannot run of `tier`, said on the console.
fn unrunnable(tier: Tier) -> Vec<&'static str> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if tier != Tier::Verdict || !release.starts_with("5.10.") {
        return Vec::new();
    }
    println!(
        "xtask: Linux {}: skipping {} verdict tests that need BPF_PROG_TEST_RUN to take an ingress interface, which this kernel refuses: {}",
        release.trim(),
        NEED_TEST_RUN_INGRESS.len(),
        NEED_TEST_RUN_INGRESS.join(", ")
    );
    NEED_TEST_RUN_INGRESS.to_vec()
}

fn run_tier(tier: Tier, bin: &Path, args: &GuestArgs) -> Result<bool> {
    Marker::TierStart(tier).print();
    let package_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests");
    let mut selection: Vec<&str> = match tier {
        Tier::E2e if args.args.is_empty() => std::iter::once("--exact").chain(E2E_TESTS).collect(),
        _ => args.args.iter().map(String::as_str).collect(),
    };
    for name in unrunnable(tier) {
        selection.extend(["--skip", name]);
    }
    let status = Command::new(bin)
        // The console is a terminal: libtest would colour `ok`, in the lines the host reads.
        .arg("--color=never")
        .args(tier.harness_args())
        .args(&selection)
        .current_dir(package_dir)
        .env("GUARD_BIN", &args.guard_bin)
        .env("GUARD_TEST_IMAGE", TEST_IMAGE)
        // Software emulation runs processes several times slower: the test bed waits longer
        // (what the tests assert is unchanged).
        .env("GUARD_TEST_SLOWDOWN", "6")
        // The target directory is read-only in here; the tests that restart dockerd log to
        // `$CARGO_TARGET_DIR/dockerd.log`.
        .env("CARGO_TARGET_DIR", SCRATCH)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    Marker::TierEnd { tier, code: status.code() }.print();
    Ok(status.success())
}

/// The kernel's warnings and errors (a verifier splat, a WARN_ON), kept off the console
/// while the tests ran.
fn kernel_warnings() {
    let Ok(out) = Command::new("dmesg").args(["--level=emerg,alert,crit,err,warn"]).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    println!("xtask: the guest kernel's last warnings and errors:");
    for line in &lines[lines.len().saturating_sub(40)..] {
        println!("  {line}");
    }
}
