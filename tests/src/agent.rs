//! The `guard` agent under test, run as a child process with its own pin directory.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd;

/// The line the agent logs once the maps hold the first full Docker state.
pub const READY_MARKER: &str = "initial sync complete";
/// What `guard run` logs once it guards with what it last knew, before Docker has answered.
pub const GUARDING_MARKER: &str = "guarding before Docker answers";
/// Loading, attaching and the first Docker sync take well under a second here; the margin
/// is for a cold, loaded machine.
/// How long the agent may take to say it is ready, and to stop (see [`crate::patience`]).
fn ready_timeout() -> Duration {
    crate::patience(Duration::from_secs(30))
}

fn stop_timeout() -> Duration {
    crate::patience(Duration::from_secs(10))
}
/// Pin directories are `/sys/fs/bpf/guard-e2e-<pid>-<n>`: the pid says whether the run that
/// made one is still alive.
const PIN_PREFIX: &str = "guard-e2e-";

/// The agent binary: `$GUARD_BIN` (set by `cargo xtask test`), else `guard` next to the
/// test executable's `deps/` directory, where `cargo build` leaves it.
pub fn guard_bin() -> PathBuf {
    find_guard_bin().expect("build guard first: run `cargo xtask test` (or set GUARD_BIN)")
}

fn find_guard_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("GUARD_BIN") {
        return Some(bin.into());
    }
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("guard");
    bin.is_file().then_some(bin)
}

/// Where an agent runs when not on the machine itself: inside a network namespace (a swarm
/// node's), entered with `nsenter --net` (`ip netns exec` would remount /sys), against the
/// engine that `DOCKER_HOST` names. Its other commands (`status`, `explain`, `unload`) run
/// the same way, so that they see the interfaces it guards.
#[derive(Clone, Debug)]
pub struct Place {
    /// `/run/netns/NAME`.
    pub netns: PathBuf,
    /// `unix:///…/docker.sock`.
    pub docker_host: String,
}

impl Place {
    /// `guard` in this place: `nsenter --net=NETNS guard` with DOCKER_HOST set. Once the
    /// namespace is gone (a test dropped it first), plain `guard`: what is left to do then is
    /// bpffs's (unpinning), which is the same in every namespace.
    fn guard(&self) -> Command {
        if !self.netns.exists() {
            return Command::new(guard_bin());
        }
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.netns.display()))
            .arg(guard_bin())
            .env("DOCKER_HOST", &self.docker_host);
        command
    }
}

/// `guard` on the machine, or in `place`.
fn guard_command(place: Option<&Place>) -> Command {
    place.map_or_else(|| Command::new(guard_bin()), Place::guard)
}

/// Runs `guard args` (in `place`); stdout, or the failure with stderr.
fn run_guard(place: Option<&Place>, args: &[&str]) -> Result<String, String> {
    cmd::try_command(guard_command(place).args(args), &format!("guard {}", args.join(" ")))
}

/// A running `guard run`. Drop stops it and unloads everything it pinned, so a failing test
/// leaves no XDP program behind; on a failing test, drop also prints the agent's log.
pub struct Agent {
    child: Option<Child>,
    pin_dir: PathBuf,
    /// `--state-dir`, one per agent (kept across [`Agent::restart`], removed on unload).
    state_dir: PathBuf,
    /// `guard run` arguments other than `--pin-dir`, kept for [`Agent::restart`].
    args: Vec<String>,
    log: Arc<Mutex<String>>,
    /// Where the current process's output starts in `log` (a restart appends to it).
    log_start: usize,
    unloaded: bool,
    /// Where it runs, if not on the machine itself.
    place: Option<Place>,
}

impl Agent {
    /// Starts `guard run` guarding `ifaces` and waits until it reports the initial sync.
    pub fn start(ifaces: &[&str]) -> Self {
        Self::start_with(ifaces, &[])
    }

    /// Like [`Agent::start`], with more `guard run` arguments (`--metrics-addr`,
    /// `--resync-interval`, ...). No `ifaces` means no `--iface` at all: the agent then guards
    /// every uplink of the machine, its real ones included.
    pub fn start_with(ifaces: &[&str], extra: &[&str]) -> Self {
        Self::start_at(None, ifaces, extra)
    }

    /// Like [`Agent::start_with`], with `/metrics` on a free loopback port (never the default
    /// one, which an agent the operator runs on this machine may hold): the agent, and that
    /// address.
    pub fn start_with_metrics(ifaces: &[&str], extra: &[&str]) -> (Self, SocketAddr) {
        let metrics = SocketAddr::from(([127, 0, 0, 1], crate::observe::free_local_port()));
        let metrics_arg = metrics.to_string();
        let mut args = vec!["--metrics-addr", metrics_arg.as_str()];
        args.extend_from_slice(extra);
        (Self::start_with(ifaces, &args), metrics)
    }

    /// Like [`Agent::start_with`], inside `place` (a swarm node's namespace, against its
    /// engine). The pin and state directories are named as for any agent; `--metrics-addr`
    /// binds in the namespace.
    pub fn start_in(place: Place, ifaces: &[&str], extra: &[&str]) -> Self {
        Self::start_at(Some(place), ifaces, extra)
    }

    fn start_at(place: Option<Place>, ifaces: &[&str], extra: &[&str]) -> Self {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{PIN_PREFIX}{}-{}",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        );
        let pin_dir = Path::new("/sys/fs/bpf").join(&name);
        let state_dir = std::env::temp_dir().join(name);
        let mut args = Vec::new();
        for iface in ifaces {
            args.extend(["--iface".to_owned(), (*iface).to_owned()]);
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let log = Arc::new(Mutex::new(String::new()));
        let mut agent = Self {
            child: None,
            pin_dir,
            state_dir,
            args,
            log,
            log_start: 0,
            unloaded: false,
            place,
        };
        agent.spawn();
        agent
    }

    /// Runs `guard run` with this agent's arguments and pin directory, and waits until it
    /// reports the initial sync.
    fn spawn(&mut self) {
        self.spawn_until(READY_MARKER);
    }

    /// Runs `guard run` and waits until its log says `marker`.
    fn spawn_until(&mut self, marker: &str) {
        let mut command = guard_command(self.place.as_ref());
        command
            .arg("run")
            .args(&self.args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir);
        // If the test process is killed outright, take the agent down with it rather than
        // leave it running against a vanished test bed; its pins are then leftovers that
        // the next run unloads. (The signal fires when the spawning thread exits; the agent
        // never outlives the test thread that owns it anyway.)
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| Ok(set_pdeathsig(Signal::SIGTERM)?));
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        self.log_start = self.log.lock().unwrap().len();
        collect_lines(child.stdout.take(), &self.log);
        collect_lines(child.stderr.take(), &self.log);
        self.child = Some(child);
        self.wait_for(marker);
    }

    /// The agent's process id (it must be running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Whether the agent process is still alive (it has not exited or been killed).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILL, as a crash would: no cleanup runs in the agent; the pins stay.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let pid = Pid::from_raw(child.id() as i32);
        // The child is ours and not yet reaped, so the pid cannot have been reused.
        let _ = kill(pid, Signal::SIGKILL);
        let status = cmd::wait_bounded(&mut child, stop_timeout());
        assert!(status.is_some(), "guard run survived SIGKILL for {:?}", stop_timeout());
    }

    /// Starts `guard run` again on the same pin directory, with the same arguments, after
    /// [`Agent::kill`] or [`Agent::terminate`]; waits until the new process reports its
    /// initial sync.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: the agent still runs");
        self.spawn();
    }

    /// What a reboot leaves of a stopped agent: no pins (bpffs is memory), its state
    /// directory on disk.
    pub fn lose_pins(&mut self) {
        assert!(self.child.is_none(), "lose_pins: the agent still runs");
        if let Err(e) = unload_pins(self.place.as_ref(), &self.pin_dir) {
            panic!("{e}\nagent log:\n{}", self.log());
        }
    }

    /// Starts the stopped agent again and waits only until it guards (Docker may be down).
    pub fn boot(&mut self) {
        assert!(self.child.is_none(), "boot: the agent still runs");
        self.spawn_until(GUARDING_MARKER);
    }

    /// What the current (last started) agent process has logged so far.
    pub fn log_of_current_run(&self) -> String {
        self.log.lock().unwrap()[self.log_start..].to_owned()
    }

    /// Waits until the current agent has logged `marker`.
    pub fn wait_for(&mut self, marker: &str) {
        let within = ready_timeout();
        let logged = crate::wait::poll_every(Duration::from_millis(50), within, || {
            if self.log_of_current_run().contains(marker) {
                return true;
            }
            if let Ok(Some(status)) = self.child.as_mut().expect("agent running").try_wait() {
                panic!("guard run exited ({status}) before `{marker}`:\n{}", self.log());
            }
            false
        });
        assert!(
            logged.is_some(),
            "guard run did not log `{marker}` within {within:?}:\n{}",
            self.log()
        );
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Everything the agent has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `guard status` for this agent's pins, or why it failed.
    pub fn status(&self) -> String {
        self.status_with(&[])
    }

    /// `guard status --json` for this agent's pins.
    pub fn status_json(&self) -> String {
        self.status_with(&["--json"])
    }

    fn status_with(&self, extra: &[&str]) -> String {
        let pin_dir = self.pin_dir.to_string_lossy();
        // Its --state-dir holds the policy it enforces (read in place of --config).
        let state_dir = self.state_dir.to_string_lossy();
        let mut args = vec!["status", "--pin-dir", &pin_dir, "--state-dir", &state_dir];
        args.extend(extra);
        match run_guard(self.place.as_ref(), &args) {
            Ok(out) | Err(out) => out,
        }
    }

    /// `guard ARGS` where this agent runs (its namespace and engine, if it has a
    /// [`Place`]); `--pin-dir` is the caller's to pass ([`Agent::pin_dir`]).
    pub fn guard(&self, args: &[&str]) -> Result<String, String> {
        run_guard(self.place.as_ref(), args)
    }

    /// `guard explain SRC DST --json` against this agent's pins (and `--config`, if it was
    /// started with one), where it runs: the kernel's verdict and the reason.
    pub fn explain(&self, src: &str, dst: &str) -> (String, String) {
        let pin_dir = self.pin_dir.to_string_lossy().into_owned();
        let mut args = vec!["explain", src, dst, "--json", "--pin-dir", &pin_dir];
        if let Some(config) = self.args.iter().position(|a| a == "--config") {
            args.extend(["--config", &self.args[config + 1]]);
        }
        let out = self.guard(&args).unwrap_or_else(|e| panic!("{e}"));
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("parse `guard explain --json`: {e}: {out}"));
        let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        (field("verdict"), field("reason"))
    }

    /// Sends SIGTERM and waits (bounded) for the agent to exit; the pinned programs stay.
    /// Panics, with the log, unless it exits cleanly in time.
    pub fn terminate(&mut self) {
        let status = self.stop_child();
        match status {
            Some(status) if status.success() => {}
            Some(status) => panic!("guard run exited with {status} on SIGTERM:\n{}", self.log()),
            None => {
                panic!("guard run ignored SIGTERM for {:?}:\n{}", stop_timeout(), self.log())
            }
        }
    }

    /// Stops the agent if it still runs, then `guard unload`; asserts the pin directory is
    /// gone.
    pub fn unload(mut self) {
        if self.child.is_some() {
            self.terminate();
        }
        if let Err(e) = self.try_unload() {
            panic!("{e}\nagent log:\n{}", self.log());
        }
    }

    /// SIGTERM, then SIGKILL if it does not exit within [`stop_timeout`]; `None` if it had to
    /// be killed.
    fn stop_child(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is ours and not yet reaped, so the pid cannot have been reused.
        let _ = kill(pid, Signal::SIGTERM);
        cmd::wait_bounded(&mut child, stop_timeout())
    }

    fn try_unload(&mut self) -> Result<(), String> {
        self.unloaded = true;
        let _ = std::fs::remove_dir_all(&self.state_dir);
        unload_pins(self.place.as_ref(), &self.pin_dir)
    }

    /// Where this agent keeps what it last knew.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let failing = thread::panicking();
        if failing {
            eprintln!("--- guard status ---\n{}", self.status());
        }
        let stopped = self.stop_child();
        if failing {
            eprintln!("--- guard log (stopped: {stopped:?}) ---\n{}", self.log());
        }
        if !self.unloaded
            && let Err(e) = self.try_unload()
        {
            // Panicking during an unwind aborts the test binary; report instead.
            if failing {
                cmd::warn(format!("cleanup: {e}"));
            } else {
                panic!("{e}\nagent log:\n{}", self.log());
            }
        }
    }
}

/// `guard unload --pin-dir DIR` (in `place`), then checks that DIR is gone.
fn unload_pins(place: Option<&Place>, pin_dir: &Path) -> Result<(), String> {
    let dir = pin_dir.to_string_lossy();
    run_guard(place, &["unload", "--pin-dir", &dir])?;
    if pin_dir.exists() {
        return Err(format!("`guard unload` left {dir} behind"));
    }
    Ok(())
}

/// Appends each line read from `pipe` to `log`, on a thread, until the pipe closes; also
/// echoes it to stderr so `--nocapture` runs show the agent live.
fn collect_lines(pipe: Option<impl Read + Send + 'static>, log: &Arc<Mutex<String>>) {
    let Some(pipe) = pipe else { return };
    let log = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("[guard] {line}");
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}

/// Unloads pin directories of earlier runs whose process is gone (killed before `Agent`'s
/// drop ran); falls back to deleting the pins if no `guard` binary is at hand.
pub(crate) fn remove_leftover_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PIN_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if pid.is_empty() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        cmd::warn(format!("removing leftover pins {}", entry.path().display()));
        let unloaded = find_guard_bin().is_some() && unload_pins(None, &entry.path()).is_ok();
        if !unloaded {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    remove_leftover_state_dirs();
}

/// Removes the `--state-dir`s (`$TMPDIR/guard-e2e-<pid>-<n>`) of agents whose run is gone:
/// unloading removes an agent's own, a killed run's stay.
fn remove_leftover_state_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, n)) = name.strip_prefix(PIN_PREFIX).and_then(|r| r.split_once('-')) else {
            continue;
        };
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !numeric(pid) || !numeric(n) || Path::new("/proc").join(pid).exists() {
            continue;
        }
        cmd::warn(format!("removing leftover state directory {}", entry.path().display()));
        let _ = std::fs::remove_dir_all(entry.path());
    }
}
