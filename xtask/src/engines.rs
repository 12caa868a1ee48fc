//! The e2e tests against another engine than the machine's Docker 20.10: Docker Engine 28.5.2,
//! Debian sid's `docker.io` and `docker-cli`, unpacked (never installed over the system's
//! docker.io) into a cache.
//!
//! Why it is done this way:
//! - sid moves, so the version is pinned and each `.deb`'s SHA256 is checked against the value
//!   below (apt already checks the archive's signature; the pin guards against sid replacing
//!   the package). A version sid no longer has is a loud failure that says what to update,
//!   never a silent skip.
//! - Docker 28 and the system's 20.10 cannot run side by side: both want docker0 and the same
//!   iptables chains. Running 28 in a network namespace of its own would not show the tests
//!   what they check (they read the host's /sys/class/net and /sys/fs/bpf, and build outside
//!   hosts against the host's stack), so the run swaps daemons: it stops 20.10, starts 28 on
//!   the default socket (the tests' 20.10 CLI, docker-compose and the agent reach it
//!   unchanged; 28 accepts API 1.41), runs the tests, stops 28, puts the firewall back as 20.10
//!   left it and starts 20.10 again.
//! - Everyone's e2e tests take /run/guard-e2e.lock. The swap holds it from stopping 20.10
//!   until 20.10 answers again, so no other run meets the wrong daemon; its own tests get a
//!   private lock through GUARD_TEST_LOCK.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;

use crate::daemon::detached;
use crate::docker::{TEST_IMAGE, docker, ensure_daemon, ensure_test_image};
use crate::private_apt::PrivateApt;
use crate::test::{Outcome, run_counted};
use crate::{Ctx, capture, image, sh, show};

/// An engine the e2e tier runs against.
#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Engine {
    /// The machine's own dockerd (Debian 12's docker.io 20.10): every e2e test.
    Docker20,
    /// Docker Engine 28.5.2 from Debian sid, unpacked into ~/.cache/container-guard/engines:
    /// the seed scenario, its gateway modes, the start race, crash and restart, and the agent
    /// as a container.
    Docker28,
    /// Rootful Podman 4.3.1 from Debian bookworm, unpacked into the same cache, serving the
    /// Docker API beside dockerd 20.10: the seed scenario.
    Podman,
}

/// Debian's version of the packages, pinned.
const DOCKER28_VERSION: &str = "28.5.2+dfsg4-5";
/// What `docker version` reports for it.
pub(crate) const DOCKER28_SERVER: &str = "28.5.2";
/// The packages and the SHA256 of their amd64 `.deb`s (from sid's Packages index, checked on
/// download).
const DOCKER28_DEBS: &[(&str, &str)] = &[
    ("docker.io", "69a59cc77a1fb8ee9ad6859abc2e6de5d76b70887405595c2b1307818fecf682"),
    ("docker-cli", "8ea2428acdda666f41263f5a0d3a85681a696491361574eb7bd721a1194939b9"),
];
/// The mirror the machine's own apt sources use, and the suite that has Docker 28.
const APT_SOURCE: &str = "deb http://deb.debian.org/debian sid main";

/// The tests run against Docker 28, as (test binary, exact name with its module path).
const DOCKER28_TESTS: &[(&str, &str)] = &[
    ("e2e", "without_agent_outside_hosts_reach_every_container_port"),
    ("e2e", "with_agent_outside_hosts_reach_only_what_labels_open"),
    ("e2e", "stopped_agent_keeps_protection_until_unloaded"),
    ("e2e", "on_a_nat_unprotected_network_the_agent_alone_closes_what_labels_do_not_open"),
    ("e2e", "on_a_routed_network_only_labelled_container_ports_are_open_and_replies_pass"),
    ("lifecycle", "start_race::start_race_accepts_nothing_and_openings_follow_docker_run"),
    ("lifecycle", "start_race::start_race_accepts_nothing_on_twenty_starts_in_a_row"),
    (
        "lifecycle",
        "crash::crash_and_restart_keep_closed_ports_closed_and_swap_programs_in_pinned_links",
    ),
    (
        "lifecycle",
        "interfaces::default_mode_guards_the_uplinks_only_and_a_container_on_two_networks_keeps_its_paths",
    ),
    ("container", "containerised_agent_passes_the_seed_scenario"),
];

/// Every e2e run's lock (tests/src/lib.rs), and the variable that points tests elsewhere.
const TEST_BED_LOCK: &str = "/run/guard-e2e.lock";
const TEST_LOCK_VAR: &str = "GUARD_TEST_LOCK";
/// How long to wait for another e2e run to finish before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(60 * 60);

/// The system's dockerd: its binary and pidfile (Debian's docker.io, started by
/// `cargo xtask setup` without options).
const SYSTEM_DOCKERD: &str = "/usr/sbin/dockerd";
const SYSTEM_PIDFILE: &str = "/var/run/docker.pid";
const SOCKET: &str = "unix:///var/run/docker.sock";
/// Where Docker 28 keeps its state during a run: a fixed path, so that what a killed run
/// left (daemon, mounts, firewall snapshot) is found and undone by the next one.
const SCRATCH: &str = "/var/tmp/container-guard-docker28";
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The engines `--engine` names, or both.
pub fn selected(args: &[Engine]) -> Vec<Engine> {
    let mut engines =
        if args.is_empty() { vec![Engine::Docker20, Engine::Docker28] } else { args.to_vec() };
    engines.sort();
    engines.dedup();
    engines
}

/// Fetches Docker 28 if needed, swaps it in for the system's dockerd, runs [`DOCKER28_TESTS`]
/// (those `extra`'s filters leave) and swaps back. The summary names the engine.
pub fn run_docker28(ctx: &Ctx, extra: &[String], guard_bin: &Path) -> Result<Outcome> {
    let started = Instant::now();
    let names: Vec<&str> =
        DOCKER28_TESTS.iter().map(|(_, name)| *name).filter(|n| selected_by(n, extra)).collect();
    if names.is_empty() {
        println!("xtask: no Docker 28 test matches {extra:?}: Docker 28 is not started");
        return Ok(Outcome::none(format!("e2e[docker {DOCKER28_SERVER}]")));
    }
    let root = fetch_docker28()?;
    prebuild(ctx, &names)?;
    let _lock = TestBedLock::take()?;
    let mut swap = Swap::start(ctx, &root)?;
    let label = format!("e2e[docker {}]", swap.version);
    let outcome = run_tests(&label, &names, extra, guard_bin);
    let restored = swap.finish();
    let mut outcome = outcome?;
    restored?;
    outcome.secs = Some(started.elapsed().as_secs());
    Ok(outcome)
}

/// Undoes what a Docker 28 run killed before it could swap back left behind (Docker 28 on
/// the default socket, its mounts and firewall, no 20.10), so that nothing else runs against
/// the wrong daemon. Waits for the test-bed lock only when there is something to undo.
pub fn recover_killed_run(ctx: &Ctx) -> Result<()> {
    if !Path::new(SCRATCH).exists() {
        return Ok(());
    }
    let _lock = TestBedLock::take()?;
    if !Path::new(SCRATCH).exists() {
        return Ok(()); // another run's, finished while we waited
    }
    undo_leftover_run()?;
    ensure_daemon(&ctx.target_dir)
}

/// Builds what the tests would otherwise build while the machine's dockerd is swapped out
/// (minutes on two cores, cold): the test binaries and, for the containerised agent, the
/// static release binary that its `cargo xtask image` puts into Docker 28's image store (the
/// system's dockerd's images are left alone).
fn prebuild(ctx: &Ctx, names: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--no-run", "-p", "tests"]);
    for binary in ["e2e", "lifecycle", "container"] {
        cmd.args(["--test", binary]);
    }
    println!("xtask: building the e2e tests before the swap: {} ...", show(&cmd));
    sh(&mut cmd)?;
    let container_test =
        DOCKER28_TESTS.iter().any(|(binary, name)| *binary == "container" && names.contains(name));
    if container_test {
        image::build_static(ctx)?;
    }
    Ok(())
}

/// Whether the user's test filters (the arguments after `--` that are not flags) leave `name`.
pub(crate) fn selected_by(name: &str, extra: &[String]) -> bool {
    let filters: Vec<&String> = extra.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// `cargo test` of the engine's tests `names`, with a private test-bed lock and the flags
/// among `extra`. Ctrl-C reaches the tests (xtask itself ignores it while swapped, so that
/// it still swaps back).
pub(crate) fn run_tests(
    label: &str,
    names: &[&str],
    extra: &[String],
    guard_bin: &Path,
) -> Result<Outcome> {
    let flags = extra.iter().filter(|a| a.starts_with('-'));
    let mut binaries: Vec<&str> = DOCKER28_TESTS
        .iter()
        .filter(|(_, name)| names.contains(name))
        .map(|(binary, _)| *binary)
        .collect();
    binaries.dedup();
    let lock = Path::new(SCRATCH).join("e2e.lock");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--no-fail-fast", "-p", "tests"]);
    for binary in &binaries {
        cmd.args(["--test", binary]);
    }
    cmd.args(["--", "--test-threads=1", "--exact"])
        .args(flags)
        .args(names)
        .env("GUARD_BIN", guard_bin)
        .env("GUARD_TEST_IMAGE", TEST_IMAGE)
        .env(TEST_LOCK_VAR, &lock);
    // SAFETY: signal is async-signal-safe; it undoes the SIG_IGN the child would inherit.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    run_counted(label.to_owned(), cmd)
}

// ---------------------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------------------

/// ~/.cache/container-guard/engines (XDG_CACHE_HOME respected).
pub(crate) fn cache_dir() -> PathBuf {
    crate::cache_home().join("engines")
}

/// The unpacked packages (`ROOT/usr/sbin/dockerd` ...), downloading and checking them first
/// unless a complete unpack is cached.
pub(crate) fn fetch_docker28() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("docker.io_{DOCKER28_VERSION}"));
    let root = dir.join("root");
    if root.join(".complete").exists() {
        println!(
            "xtask: Docker {DOCKER28_SERVER} (docker.io {DOCKER28_VERSION}) cached in {}",
            root.display()
        );
        return Ok(root);
    }
    let started = Instant::now();
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    let mut updated = false;
    let mut files = Vec::new();
    for (package, sha256) in DOCKER28_DEBS {
        let deb =
            debs.join(format!("{package}_{}_amd64.deb", DOCKER28_VERSION.replace(':', "%3a")));
        if !(deb.exists() && sha256_of(&deb)? == *sha256) {
            if !updated {
                apt_update()?;
                updated = true;
            }
            apt_download(package, &debs)?;
        }
        let got = sha256_of(&deb)?;
        if got != *sha256 {
            let _ = fs::remove_file(&deb);
            bail!(
                "{} has SHA256 {got}, not the pinned {sha256}: sid rebuilt {package} \
                 {DOCKER28_VERSION}; check the new package and update DOCKER28_DEBS in \
                 xtask/src/engines.rs",
                deb.display()
            );
        }
        files.push(deb);
    }
    let tmp = dir.join("root.tmp");
    let _ = fs::remove_dir_all(&tmp);
    for deb in &files {
        sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    }
    fs::write(tmp.join(".complete"), DOCKER28_VERSION)?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root)?;
    println!(
        "xtask: fetched and unpacked Docker {DOCKER28_SERVER} into {} in {:.1} s",
        root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

pub(crate) fn sha256_of(path: &Path) -> Result<String> {
    let out = capture(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// apt-get with a configuration of its own: sid's index in the cache, the machine's sources,
/// lists and status untouched.
fn apt() -> Result<PrivateApt> {
    PrivateApt::new(&cache_dir().join("apt"), &format!("{APT_SOURCE}\n"))
}

fn apt_update() -> Result<()> {
    println!(
        "xtask: reading Debian sid's package index ({APT_SOURCE}) with a private apt configuration ..."
    );
    apt()?.update().context("apt-get update of Debian sid failed: is deb.debian.org reachable?")
}

/// `apt-get download PACKAGE=VERSION` into `dir`; if sid no longer has that version, say so
/// and what it has now.
fn apt_download(package: &str, dir: &Path) -> Result<()> {
    println!("xtask: downloading {package} {DOCKER28_VERSION} from Debian sid ...");
    let mut cmd = apt()?.command();
    cmd.args(["download", &format!("{package}={DOCKER28_VERSION}")]).current_dir(dir);
    if cmd.status().with_context(|| format!("running {}", show(&cmd)))?.success() {
        return Ok(());
    }
    let now = candidate_version(package).unwrap_or_else(|| "nothing".to_owned());
    bail!(
        "Debian sid no longer has {package} {DOCKER28_VERSION} (it has {now} now): the Docker 28 \
         tests cannot run. Pin the version sid has (DOCKER28_VERSION, DOCKER28_SERVER and the \
         SHA256s in xtask/src/engines.rs) and run `cargo xtask test --engine docker28`."
    )
}

/// The version of `package` sid offers now, from the private index.
fn candidate_version(package: &str) -> Option<String> {
    let out = apt()
        .ok()?
        .with_options("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_owned)
}

// ---------------------------------------------------------------------------------------
// The test bed's lock
// ---------------------------------------------------------------------------------------

/// An exclusive flock on [`TEST_BED_LOCK`], held while the machine's dockerd is not 20.10.
pub(crate) struct TestBedLock {
    _file: File,
}

impl TestBedLock {
    pub(crate) fn take() -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(TEST_BED_LOCK)
            .with_context(|| format!("opening {TEST_BED_LOCK}"))?;
        let deadline = Instant::now() + LOCK_WAIT;
        let mut said = false;
        loop {
            // SAFETY: flock on a descriptor we own; the lock goes with the file.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).context(format!("flock {TEST_BED_LOCK}"));
            }
            if !said {
                println!(
                    "xtask: waiting for {TEST_BED_LOCK}: another e2e run holds the test bed ..."
                );
                said = true;
            }
            ensure!(Instant::now() < deadline, "{TEST_BED_LOCK} stayed held for {LOCK_WAIT:?}");
            sleep(Duration::from_secs(1));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The swap
// ---------------------------------------------------------------------------------------

/// Docker 28 running in place of the system's dockerd. [`Swap::finish`] (or drop, after a
/// panic) stops it, restores the firewall and starts the system's dockerd again.
struct Swap {
    target_dir: PathBuf,
    daemon: Option<Child>,
    version: String,
    finished: bool,
}

impl Swap {
    fn start(ctx: &Ctx, root: &Path) -> Result<Self> {
        undo_leftover_run()?;
        println!(
            "xtask: stopping dockerd 20.10 for the Docker 28 run; it is started again afterwards"
        );
        stop_system_dockerd()?;
        set_sigint(libc::SIG_IGN);
        let mut swap = Swap {
            target_dir: ctx.target_dir.clone(),
            daemon: None,
            version: String::new(),
            finished: false,
        };
        // From here on, drop puts everything back.
        fs::create_dir_all(SCRATCH)?;
        Firewall::save()?;
        let started = Instant::now();
        swap.daemon = Some(start_docker28(root, &ctx.target_dir)?);
        swap.version = wait_for_version(&ctx.target_dir, DOCKER28_SERVER)?;
        println!(
            "xtask: Docker {} answers on {SOCKET} after {:.1} s",
            swap.version,
            started.elapsed().as_secs_f64()
        );
        ensure_test_image()?;
        Ok(swap)
    }

    /// Stops Docker 28, puts the firewall and docker0 back, removes the scratch directory and
    /// starts the system's dockerd.
    fn finish(&mut self) -> Result<()> {
        self.finished = true;
        println!("xtask: stopping Docker {} and starting dockerd 20.10 again ...", self.version);
        let stopped = stop_docker28(self.daemon.take());
        let cleaned = clean_up_after_docker28();
        let restarted = ensure_daemon(&self.target_dir);
        set_sigint(libc::SIG_DFL);
        stopped.and(cleaned).and(restarted)
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        if !self.finished
            && let Err(e) = self.finish()
        {
            eprintln!("xtask: error: putting dockerd 20.10 back: {e:#}");
        }
    }
}

/// While the daemons are swapped, Ctrl-C must stop the tests, not xtask: only xtask puts
/// 20.10 back.
fn set_sigint(disposition: libc::sighandler_t) {
    // SAFETY: SIG_IGN and SIG_DFL are valid dispositions; no handler function is involved.
    unsafe { libc::signal(libc::SIGINT, disposition) };
}

/// What a run killed outright left: its daemon, its mounts, its firewall. Found through the
/// fixed scratch directory (only ever used under the test-bed lock, which we hold).
fn undo_leftover_run() -> Result<()> {
    if !Path::new(SCRATCH).exists() {
        return Ok(());
    }
    println!("xtask: {SCRATCH} is left from a Docker 28 run that was killed: undoing it");
    stop_docker28(None)?;
    clean_up_after_docker28()
}

/// SIGTERM to the system's dockerd (the pid in /var/run/docker.pid, which must be
/// /usr/sbin/dockerd), and wait until it is gone.
fn stop_system_dockerd() -> Result<()> {
    let Some(pid) = read_pid(Path::new(SYSTEM_PIDFILE))? else {
        ensure!(
            !crate::succeeds_within(docker().arg("info"), Duration::from_secs(10)),
            "a dockerd answers on {SOCKET} but {SYSTEM_PIDFILE} names none: stop it first"
        );
        return Ok(());
    };
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    ensure!(
        exe == Path::new(SYSTEM_DOCKERD),
        "{SYSTEM_PIDFILE} names pid {pid} ({}), not {SYSTEM_DOCKERD}: stop it first",
        exe.display()
    );
    terminate(pid, "dockerd 20.10")
}

fn read_pid(pidfile: &Path) -> Result<Option<i32>> {
    match fs::read_to_string(pidfile) {
        Ok(text) => {
            let pid =
                text.trim().parse().with_context(|| format!("{}: {text:?}", pidfile.display()))?;
            Ok(Path::new(&format!("/proc/{pid}")).exists().then_some(pid))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", pidfile.display())),
    }
}

/// SIGTERM, then wait up to [`STOP_TIMEOUT`] for the process to go.
fn terminate(pid: i32, what: &str) -> Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error()).context(format!("kill -TERM {pid} ({what})"));
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Path::new(&format!("/proc/{pid}")).exists() {
        ensure!(
            Instant::now() < deadline,
            "{what} (pid {pid}) did not stop within {STOP_TIMEOUT:?}"
        );
        sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// dockerd 28 on the default socket, with its state, runtime files and containerd under
/// [`SCRATCH`], an empty configuration (whatever /etc/docker/daemon.json says is the system
/// daemon's) and its own docker-proxy. Its log goes to `<target>/dockerd-28.log`.
fn start_docker28(root: &Path, target_dir: &Path) -> Result<Child> {
    let scratch = Path::new(SCRATCH);
    let config = scratch.join("daemon.json");
    fs::write(&config, "{}\n")?;
    let log_path = target_dir.join("dockerd-28.log");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(root.join("usr/sbin/dockerd"));
    cmd.arg("--config-file")
        .arg(&config)
        .arg("--data-root")
        .arg(scratch.join("data"))
        .arg("--exec-root")
        .arg(scratch.join("exec"))
        .arg("--pidfile")
        .arg(scratch.join("docker.pid"))
        .args(["-H", SOCKET])
        .arg("--userland-proxy-path")
        .arg(root.join("usr/sbin/docker-proxy"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    println!("xtask: starting {} (log: {}) ...", show(&cmd), log_path.display());
    // Detached: Ctrl-C on xtask must not reach the daemon before the swap has put 20.10 back.
    detached(&mut cmd).spawn().context("starting dockerd 28")
}

/// Waits until `docker version` names a server starting with `want`; returns it.
fn wait_for_version(target_dir: &Path, want: &str) -> Result<String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let out = docker().args(["version", "--format", "{{.Server.Version}}"]).output();
        if let Ok(out) = out
            && out.status.success()
        {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            ensure!(version.starts_with(want), "the daemon on {SOCKET} is {version}, not {want}");
            return Ok(version.split('+').next().unwrap_or(&version).to_owned());
        }
        if Instant::now() >= deadline {
            let log = fs::read_to_string(target_dir.join("dockerd-28.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
            bail!("dockerd 28 did not answer within {START_TIMEOUT:?}");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Stops Docker 28: our child if we have it (reaped, or it would linger as a zombie), else
/// whatever its pidfile names.
fn stop_docker28(child: Option<Child>) -> Result<()> {
    let Some(mut child) = child else {
        return match read_pid(&Path::new(SCRATCH).join("docker.pid"))? {
            Some(pid) => terminate(pid, "dockerd 28"),
            None => Ok(()),
        };
    };
    let pid = child.id() as i32;
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet, so the
    // pid is still ours.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while child.try_wait()?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "dockerd 28 (pid {pid}) did not stop within {STOP_TIMEOUT:?}"
        );
        sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// After Docker 28 stopped: the firewall as 20.10 left it, no docker0 (20.10 makes its own),
/// no mounts or files under [`SCRATCH`].
fn clean_up_after_docker28() -> Result<()> {
    let restored = Firewall::restore();
    if Path::new("/sys/class/net/docker0").exists() {
        let _ = sh(Command::new("ip").args(["link", "delete", "docker0"]));
    }
    let unmounted = unmount_under(Path::new(SCRATCH));
    let removed = match fs::remove_dir_all(SCRATCH) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {SCRATCH}"))
        }
        _ => Ok(()),
    };
    restored.and(unmounted).and(removed)
}

/// Unmounts everything mounted below `dir` (network namespaces under exec-root/netns, the
/// overlay mounts of a daemon that died), deepest first.
fn unmount_under(dir: &Path) -> Result<()> {
    for point in mounts_under(dir).context("reading /proc/mounts")? {
        sh(Command::new("umount").arg(point))?;
    }
    Ok(())
}

/// The mount points below `dir`, deepest first (the order to unmount them in).
pub(crate) fn mounts_under(dir: &Path) -> std::io::Result<Vec<String>> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    Ok(points)
}

// ---------------------------------------------------------------------------------------
// The firewall
// ---------------------------------------------------------------------------------------

/// iptables and ip6tables as they were once 20.10 stopped, saved into [`SCRATCH`]. Docker
/// 28 uses the same chain names and more (DOCKER-FORWARD, DOCKER-BRIDGE, DOCKER-CT, raw-table
/// drops, ip6tables NAT) and removes none of them when it stops.
pub(crate) struct Firewall;

const FAMILIES: &[(&str, &str, &str)] =
    &[("iptables-save", "iptables-restore", "v4"), ("ip6tables-save", "ip6tables-restore", "v6")];

impl Firewall {
    fn save() -> Result<()> {
        Self::save_in(Path::new(SCRATCH))
    }

    /// Saves both families into `dir`.
    pub(crate) fn save_in(dir: &Path) -> Result<()> {
        for (save, _, family) in FAMILIES {
            let dump = capture(&mut Command::new(save))?;
            fs::write(dir.join(format!("firewall.{family}")), dump)?;
        }
        Ok(())
    }

    /// Each family's saved tables as they were, and every table that appeared since emptied
    /// (built-in chains ACCEPT, no rules, no chains of its own): what it was, absent.
    fn restore() -> Result<()> {
        Self::restore_from(Path::new(SCRATCH))
    }

    /// [`Firewall::restore`] from what [`Firewall::save_in`] put into `dir`.
    pub(crate) fn restore_from(dir: &Path) -> Result<()> {
        for (save, restore, family) in FAMILIES {
            let path = dir.join(format!("firewall.{family}"));
            let Ok(saved) = fs::read_to_string(&path) else {
                continue;
            };
            let now = capture(&mut Command::new(save))?;
            let input = restore_input(&saved, &now);
            let mut child = Command::new(restore)
                .stdin(Stdio::piped())
                .spawn()
                .with_context(|| format!("running {restore}"))?;
            io::Write::write_all(&mut child.stdin.take().context("no stdin")?, input.as_bytes())?;
            let status = child.wait()?;
            ensure!(status.success(), "{restore} of {} failed ({status})", path.display());
            println!("xtask: {family} firewall restored as dockerd 20.10 left it");
        }
        Ok(())
    }
}

/// The `*-restore` input that brings the firewall from `now` back to `saved`.
fn restore_input(saved: &str, now: &str) -> String {
    let saved_tables: Vec<&str> = saved.lines().filter_map(|l| l.strip_prefix('*')).collect();
    let mut input: String =
        saved.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    let mut table = None;
    for line in now.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = (!saved_tables.contains(&name)).then_some(name);
            if table.is_some() {
                input += &format!("*{name}\n");
            }
        } else if table.is_none() {
            continue;
        } else if line == "COMMIT" {
            input += "COMMIT\n";
        } else if let Some(chain) = line.strip_prefix(':')
            && let Some((name, policy)) = chain.split_once(' ')
            && !policy.starts_with('-')
        {
            input += &format!(":{name} ACCEPT [0:0]\n");
        }
    }
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_that_appeared_is_emptied_and_saved_ones_come_back() {
        let saved = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n\
                     :DOCKER - [0:0]\n-A FORWARD -j DOCKER\nCOMMIT\n";
        let now = "*raw\n:PREROUTING ACCEPT [1:2]\n:OUTPUT ACCEPT [0:0]\n\
                   -A PREROUTING -d 10.0.0.2/32 ! -i br-1 -j DROP\nCOMMIT\n\
                   *filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:DOCKER-CT - [0:0]\nCOMMIT\n";
        assert_eq!(
            restore_input(saved, now),
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:DOCKER - [0:0]\n\
             -A FORWARD -j DOCKER\nCOMMIT\n\
             *raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
        );
    }

    #[test]
    fn every_engine_test_names_a_test_binary_of_the_e2e_tier() {
        for (binary, name) in DOCKER28_TESTS {
            assert!(["e2e", "lifecycle", "container"].contains(binary), "{binary} {name}");
        }
    }
}
