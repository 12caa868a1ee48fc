//! Booting the VM with virtme-ng and reading its console until the guest is done.
//!
//! virtme-ng boots the kernel under qemu with the host's root file system shared read-only
//! over 9p, so the guest runs the host's dockerd, ip and the binaries built here, with no
//! image to build. /dev/kvm on this kind of machine cannot run a stock kernel, so qemu
//! emulates the CPU (TCG, one host thread per vCPU).
//!
//! vng starts virtme-run, which forks qemu: three processes. They run in a process group of
//! their own, killed as a whole on a timeout, on an error here, and on Ctrl-C or SIGTERM, so
//! that no qemu outlives the run.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::kernel::Kernel;
use super::marker::Marker;
use crate::show;

/// Memory and vCPUs of the VM: dockerd, a handful of containers and the agent fit in 4 GiB;
/// two vCPUs on a two-core host.
const MEMORY: &str = "4G";
const CPUS: &str = "2";
/// A Debian kernel reaches the guest's command in about 10 s under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// After the guest's last marker the VM powers off within seconds.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);

/// virtme-ng's `vng`, and the PATH it needs (it runs `virtme-run` from beside itself).
pub struct Vng {
    pub program: PathBuf,
    pub path: OsString,
}

/// One console line from the guest, once it started, and when it came (since the boot began).
pub struct Event {
    pub at: Duration,
    pub line: String,
    pub marker: Option<Marker>,
}

/// How the VM's run ended.
#[derive(Debug, PartialEq)]
pub enum Stop {
    /// The guest printed its end marker.
    Finished,
    /// No start marker within [`BOOT_TIMEOUT`] (or the whole timeout, if shorter).
    BootTimeout(Duration),
    /// The guest started but did not finish within the timeout.
    Timeout(Duration),
    /// The VM went away without the end marker (a panic, a crash, qemu failing).
    Vanished,
}

impl Stop {
    pub fn describe(&self) -> String {
        match self {
            Stop::Finished => "finished".to_owned(),
            Stop::BootTimeout(t) => format!("the VM did not boot within {} s", t.as_secs()),
            Stop::Timeout(t) => format!("the VM did not finish within {} s", t.as_secs()),
            Stop::Vanished => "the VM stopped before the guest finished".to_owned(),
        }
    }
}

/// Boots `kernel`, runs `guest_cmd` in it and returns the guest's console from its start
/// marker on. Every console line (boot messages included) goes to `log`; the guest's lines
/// are printed as they come, its markers as `xtask:` lines.
pub fn run(
    vng: &Vng,
    kernel: &Kernel,
    guest_cmd: &str,
    log_path: &Path,
    timeout: Duration,
) -> Result<(Vec<Event>, Stop)> {
    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let scratch = Scratch::new(&log_path.with_extension("tmp"))?;
    // One pipe for both: vng shows the console on stderr, its own messages on stdout.
    let (console, console_writer) = io::pipe().context("creating a pipe")?;
    let mut cmd = Command::new(&vng.program);
    cmd.arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--disable-kvm", "--force-9p", "--verbose"])
        .args(["-m", MEMORY, "-p", CPUS])
        // One flag with its value: a separate value starting with `-` would be taken for a flag.
        .arg("--qemu-opts=-accel tcg,thread=multi")
        .args(["--exec", guest_cmd])
        .env("PATH", &vng.path)
        .env("TMPDIR", &scratch.0)
        .stdin(Stdio::null())
        .stdout(console_writer.try_clone()?)
        .stderr(console_writer)
        .process_group(0);
    println!(
        "xtask: booting {} under qemu (software emulation, {CPUS} vCPUs, {MEMORY}; console log: {}) ...",
        kernel.release,
        log_path.display()
    );
    writeln!(log, "xtask: {}", show(&cmd))?;
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("running {}", show(&cmd)))?;
    let mut vm = VmGroup::new(child);
    // Our copies of the pipe's write end go with the command: the read end then sees the
    // end of the stream when the VM's processes are gone.
    drop(cmd);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(console);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });

    let mut events = Vec::new();
    let mut booted = false;
    let mut finished_at = None;
    let stop = loop {
        let deadline = match (booted, finished_at) {
            (_, Some(at)) => at + POWEROFF_TIMEOUT,
            (true, None) => start + timeout,
            (false, None) => start + BOOT_TIMEOUT.min(timeout),
        };
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) if finished_at.is_some() => break Stop::Finished,
            Err(RecvTimeoutError::Disconnected) => break Stop::Vanished,
            Err(RecvTimeoutError::Timeout) if finished_at.is_some() => {
                println!("xtask: the VM did not power off by itself: stopping it");
                break Stop::Finished;
            }
            Err(RecvTimeoutError::Timeout) if booted => break Stop::Timeout(timeout),
            Err(RecvTimeoutError::Timeout) => break Stop::BootTimeout(deadline - start),
        };
        writeln!(log, "{line}")?;
        let marker = Marker::parse(&line);
        let at = start.elapsed();
        match &marker {
            Some(Marker::Start { release }) => {
                booted = true;
                println!("xtask: {release} booted in {} s; the guest runs", at.as_secs());
            }
            Some(Marker::End) => finished_at = Some(Instant::now()),
            Some(other) => println!("xtask: [vm {} s] {}", at.as_secs(), describe(other)),
            None if booted => println!("{line}"),
            None => {}
        }
        if booted {
            events.push(Event { at, line, marker });
        }
    };
    vm.stop();
    drop(scratch);
    if stop != Stop::Finished {
        println!("xtask: {}; last console lines ({}):", stop.describe(), log_path.display());
        print_tail(log_path, 30);
    }
    Ok((events, stop))
}

fn describe(marker: &Marker) -> String {
    match marker {
        Marker::DockerdReady => "dockerd answers".to_owned(),
        Marker::TierStart(tier) => format!("tier {} starts", tier.name()),
        Marker::TierEnd { tier, code: Some(code) } => {
            format!("tier {} ended (exit code {code})", tier.name())
        }
        Marker::TierEnd { tier, code: None } => {
            format!("tier {} ended (killed by a signal)", tier.name())
        }
        Marker::Failed(why) => format!("the guest failed: {why}"),
        Marker::Start { .. } | Marker::End => String::new(),
    }
}

fn print_tail(path: &Path, n: usize) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(n)..] {
        println!("  {line}");
    }
}

/// virtme-ng's temporary files (`TMPDIR`), removed with whatever a killed vng left there.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path) -> Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The process group of the VM's processes, for the signal handler.
static VM_GROUP: AtomicI32 = AtomicI32::new(0);

/// vng and its descendants (one process group): killed together on drop unless they have
/// exited; Ctrl-C, SIGTERM and SIGHUP kill them too, then end xtask as the signal would.
struct VmGroup {
    child: Child,
    pgid: i32,
    reaped: bool,
}

impl VmGroup {
    fn new(child: Child) -> Self {
        let pgid = i32::try_from(child.id()).unwrap_or(0);
        VM_GROUP.store(pgid, Ordering::SeqCst);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: on_signal only calls async-signal-safe functions.
            unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        }
        Self { child, pgid, reaped: false }
    }

    /// Waits for vng after killing whatever of the group still runs (nothing, when the VM
    /// powered off by itself).
    fn stop(&mut self) {
        if self.reaped {
            return;
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            kill_group(self.pgid);
            let _ = self.child.wait();
        }
        // A qemu that outlived vng (vng waits for it, so only if vng itself was killed).
        kill_group(self.pgid);
        self.reaped = true;
    }
}

impl Drop for VmGroup {
    fn drop(&mut self) {
        self.stop();
        VM_GROUP.store(0, Ordering::SeqCst);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: restoring the default disposition has no preconditions.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
}

fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: killpg has no memory-safety preconditions; ESRCH (group gone) is fine.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    kill_group(VM_GROUP.load(Ordering::SeqCst));
    // SAFETY: signal and raise are async-signal-safe; re-raising with the default
    // disposition ends xtask the way the signal would have.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}
