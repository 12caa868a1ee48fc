//! Stopping and starting the Docker daemon itself, for the daemon-restart scenario. The
//! daemon is shared with every other test, so [`DockerdOutage`] brings it back on drop,
//! whatever happened in between.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd;
use crate::docker::docker_bin;

/// `docker info` answers within this on a healthy daemon (xtask's bound too).
const INFO_TIMEOUT: Duration = Duration::from_secs(10);
/// Stopping waits for the daemon to stop its containers; starting for it to come up. xtask
/// gives a start 60 s too.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the daemon answers `docker info`.
pub fn answers() -> bool {
    cmd::output(Command::new(docker_bin()).arg("info"), INFO_TIMEOUT)
        .is_ok_and(|out| out.status.success())
}

/// The Docker daemon, stopped for a while: [`DockerdOutage::begin`] stops it,
/// [`DockerdOutage::end`] (or drop) starts it again.
pub struct DockerdOutage {
    log_path: PathBuf,
}

impl DockerdOutage {
    /// SIGTERM to the running dockerd, then waits until it is gone and `docker info` fails.
    /// live-restore is off on the test bed, so the daemon stops every container on its way
    /// out (they do not come back by themselves: they have no restart policy).
    pub fn begin() -> Self {
        let pid = dockerd_pid().expect("no dockerd is running (pidfile and pidof found none)");
        let outage = Self { log_path: log_path() };
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .unwrap_or_else(|e| panic!("SIGTERM to dockerd ({pid}): {e}"));
        let stopped = crate::wait::poll_every(Duration::from_millis(100), STOP_TIMEOUT, || {
            !process_alive(pid) && !answers()
        });
        assert!(stopped.is_some(), "dockerd ({pid}) still runs {STOP_TIMEOUT:?} after SIGTERM");
        outage
    }

    /// Starts dockerd the way `cargo xtask` does (xtask/src/docker.rs): in its own session,
    /// its output in `<target>/dockerd.log` (appended); waits until `docker info` answers.
    pub fn end(&mut self) {
        if let Err(e) = start(&self.log_path) {
            panic!("{e}");
        }
    }
}

impl Drop for DockerdOutage {
    fn drop(&mut self) {
        if !answers()
            && let Err(e) = start(&self.log_path)
        {
            // Panicking while unwinding aborts; the next test's prepare_test_bed fails loudly.
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}

fn start(log_path: &PathBuf) -> Result<(), String> {
    if let Some(dir) = log_path.parent() {
        let _ = fs::create_dir_all(dir);
    }
    // Appended to, unlike xtask's first start: the log of the daemon that was stopped is
    // what explains a failure around the restart.
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let mut command = Command::new("dockerd");
    command.stdin(Stdio::null()).stdout(log).stderr(log_err);
    // SAFETY: setsid, close_range and fcntl are async-signal-safe. setsid detaches dockerd
    // from the test's session and process group, so nothing aimed at the test run reaches it.
    // Every descriptor above stderr is closed at exec: the test process inherits some without
    // close-on-exec, and one that holds a lock (`flock FILE cargo xtask test` hands its fd 3
    // down to the tests) would be held by the daemon for as long as it runs.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            let all_cloexec =
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            if all_cloexec == -1 {
                // Before Linux 5.11: one by one.
                for fd in 3..65_536 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    // Never waited for: it outlives the test process, like xtask's.
    let mut child = command.spawn().map_err(|e| format!("start dockerd: {e}"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if answers() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("dockerd exited ({status}); see {}", log_path.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "dockerd did not answer `docker info` within {START_TIMEOUT:?}; see {}",
                log_path.display()
            ));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// xtask's log file: `<target>/dockerd.log`, target being where this test binary was built
/// (`<target>/debug/deps/lifecycle-<hash>`).
fn log_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).or_else(|| {
        let exe = std::env::current_exe().ok()?;
        Some(exe.ancestors().nth(3)?.to_path_buf())
    });
    target.unwrap_or_else(|| PathBuf::from("/tmp")).join("dockerd.log")
}

fn dockerd_pid() -> Option<i32> {
    let from_file = fs::read_to_string("/var/run/docker.pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|pid| process_alive(*pid));
    from_file.or_else(|| {
        cmd::try_run("pidof", &["dockerd"]).ok()?.split_whitespace().next()?.parse().ok()
    })
}

/// Alive and not a zombie (a dockerd this test binary started is its child, and is not
/// reaped until the binary exits).
fn process_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
    })
}
