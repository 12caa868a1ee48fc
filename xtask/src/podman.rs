//! The e2e tests against rootful Podman 4.3.1 (Debian bookworm's podman with conmon, netavark,
//! aardvark-dns and containers-common), unpacked into a cache, never installed: the package
//! would upgrade login and passwd (libsubid4), and the system's configuration under
//! /etc/containers stays untouched.
//!
//! Why it is done this way:
//! - Pinned versions with SHA256 checks, fetched with a private apt configuration (bookworm and
//!   bookworm-security at the machine's mirror), as for Docker 28 (see [`crate::engines`]).
//! - Podman runs beside the system's dockerd 20.10: it has its own bridges (`podman0`,
//!   `podman1`…) and iptables chains (NETAVARK_*), and serves the Docker API on a private
//!   socket (`podman system service --time=0 unix://SOCK`). The tests' docker CLI and the
//!   agent reach it through DOCKER_HOST; nothing is swapped.
//! - It still changes the machine's networks and firewall, so the run holds the test-bed lock
//!   throughout, hands its tests a private one, and afterwards removes its containers,
//!   networks and bridges and puts the firewall back as it found it.
//! - Its configuration is private (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, HOME for the
//!   signature policy): cgroupfs, file events, and `default_ulimits` at the hard limits the
//!   running service holds, read from /proc after it starts (restarted once with them if they
//!   are lower than xtask's own). Podman's default, 1048576 open files and processes, is more
//!   than a process without CAP_SYS_RESOURCE may set, and runc then refuses every container;
//!   and Podman 4.3.1 lowers its own RLIMIT_NPROC to 32768 at start, below a shell's usual
//!   hard limit, so xtask's limits alone are not the bound.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::daemon::detached;
use crate::docker::TEST_IMAGE;
use crate::engines::{Firewall, TestBedLock, cache_dir, selected_by, sha256_of};
use crate::private_apt::PrivateApt;
use crate::test::{Outcome, run_counted};
use crate::{sh, show};

/// What `podman version` reports.
const PODMAN_VERSION: &str = "4.3.1";
/// The packages, their pinned Debian versions and the SHA256 of their amd64 `.deb`s.
const PODMAN_DEBS: &[(&str, &str, &str)] = &[
    (
        "podman",
        "4.3.1+ds1-8+deb12u1+b3",
        "881ab556a1df5b911359c83a647597eb36c156a8615e754436e520a6ae0661ab",
    ),
    ("conmon", "2.1.6+ds1-1", "2d4111853199dd8c7cbcda3da04f37d9b7f3a7b08dc1cee546a1e5518de8a596"),
    ("netavark", "1.4.0-3", "e5d6c9efec8b050009cae14b7c740d3d9430e87047003dbad8498324f89516f7"),
    ("aardvark-dns", "1.4.0-3", "e60c3f659a014fab3afa76fcd9776dbc77bd108f43d1c48b9b66585d7c0d4bc8"),
    (
        "golang-github-containers-common",
        "0.50.1+ds1-4",
        "39d5c31902c4ce55bd419286946d0b291383169585f1b3509000f6bf57454181",
    ),
    (
        "libgpgme11",
        "1.18.0-3+deb12u1",
        "a93427c0083c3b8dae9dbad875e78e0da6a8a51f7d191d4f5ad745717d1e19d3",
    ),
    (
        "libsubid4",
        "1:4.13+dfsg1-1+deb12u2",
        "5c1c214484e57bcfaff4136e6cdbe4e8108776c7159ce7c9087218896a5eb12d",
    ),
    (
        "libyajl2",
        "2.1.0-3+deb12u2",
        "b512a6efbe735e7c731185a1b3ea477ff306f0c3f6aa2970e85b12f01fe8063b",
    ),
];
/// bookworm at the machine's own mirror, and its security suite (libgpgme11's update).
const APT_SOURCES: &str = "deb http://deb.debian.org/debian bookworm main\n\
                           deb http://deb.debian.org/debian-security bookworm-security main\n";

/// The tests run against Podman, as (test binary, exact name with its module path): the seed scenario, the start
/// race, and the agent's own choice of uplinks beside Podman's bridges. Podman creates a network's bridge with its first container, so the race there
/// is won after the SYNs: a container's SYN-ACK leaving the uplink is judged (from a bridge the
/// agent has not named yet, and from one it has, where a SYN slipped in before the gate).
const PODMAN_TESTS: &[(&str, &str)] = &[
    ("e2e", "without_agent_outside_hosts_reach_every_container_port"),
    ("e2e", "with_agent_outside_hosts_reach_only_what_labels_open"),
    ("e2e", "stopped_agent_keeps_protection_until_unloaded"),
    ("lifecycle", "start_race::start_race_accepts_nothing_and_openings_follow_docker_run"),
    ("lifecycle", "start_race::start_race_accepts_nothing_on_twenty_starts_in_a_row"),
    (
        "lifecycle",
        "interfaces::default_mode_guards_the_uplinks_only_and_a_container_on_two_networks_keeps_its_paths",
    ),
];

/// Podman's state during a run: a fixed path, so a killed run's leftovers are found.
const SCRATCH: &str = "/var/tmp/container-guard-podman";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The service's pid, under [`SCRATCH`], for the next run to stop it if this one is killed.
const PID_FILE: &str = "service.pid";

/// Undoes what a Podman run that was killed left behind (its service, containers, bridges and
/// firewall rules, [`SCRATCH`]), before any tier runs beside it.
pub fn recover_killed_run() -> Result<()> {
    if !Path::new(SCRATCH).exists() {
        return Ok(());
    }
    let _lock = TestBedLock::take()?;
    if !Path::new(SCRATCH).exists() {
        return Ok(()); // another run's, finished while we waited
    }
    undo_leftover_run(&cache_dir().join(format!("podman_{PODMAN_VERSION}/root")))
}

/// [`recover_killed_run`]'s work, with the test bed's lock held.
fn undo_leftover_run(root: &Path) -> Result<()> {
    println!("xtask: {SCRATCH} is left from a Podman run that was killed: undoing it");
    let mut leftover = Service { root: root.to_owned(), child: None };
    leftover.kill_leftover();
    leftover.stop()
}

/// Fetches Podman if needed, starts its API service beside dockerd 20.10, runs
/// [`PODMAN_TESTS`] against it and removes everything it made.
pub fn run_podman(extra: &[String], guard_bin: &Path) -> Result<Outcome> {
    let started = Instant::now();
    let label = format!("e2e[podman {PODMAN_VERSION}]");
    let names = selected(extra);
    if names.is_empty() {
        println!("xtask: no Podman test matches {extra:?}: Podman is not started");
        return Ok(Outcome::none(label));
    }
    let root = fetch()?;
    let mut build = Command::new("cargo");
    build.args(["test", "--no-run", "-p", "tests"]);
    for binary in binaries(&names) {
        build.args(["--test", binary]);
    }
    sh(&mut build)?;
    let _lock = TestBedLock::take()?;
    let mut service = Service::start(&root)?;
    let outcome = service.import_image().and_then(|()| run_tests(&label, &names, extra, guard_bin));
    let stopped = service.stop();
    let mut outcome = outcome?;
    stopped?;
    outcome.secs = Some(started.elapsed().as_secs());
    Ok(outcome)
}

/// The tests with DOCKER_HOST on Podman's socket and a private test-bed lock.
fn run_tests(label: &str, names: &[&str], extra: &[String], guard_bin: &Path) -> Result<Outcome> {
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--no-fail-fast", "-p", "tests"]);
    for binary in binaries(names) {
        cmd.args(["--test", binary]);
    }
    cmd.args(["--", "--test-threads=1", "--exact"])
        .args(extra.iter().filter(|a| a.starts_with('-')))
        .args(names)
        .env("DOCKER_HOST", format!("unix://{SCRATCH}/podman.sock"))
        .env("GUARD_BIN", guard_bin)
        .env("GUARD_TEST_IMAGE", TEST_IMAGE)
        .env("GUARD_TEST_LOCK", Path::new(SCRATCH).join("e2e.lock"));
    run_counted(label.to_owned(), cmd)
}

/// The tests of [`PODMAN_TESTS`] `extra`'s filters select (all of them without a filter).
fn selected(extra: &[String]) -> Vec<&'static str> {
    PODMAN_TESTS.iter().map(|(_, n)| *n).filter(|n| selected_by(n, extra)).collect()
}

/// The test binaries that hold `names`, each once.
fn binaries(names: &[&str]) -> Vec<&'static str> {
    let mut binaries: Vec<&str> =
        PODMAN_TESTS.iter().filter(|(_, n)| names.contains(n)).map(|(b, _)| *b).collect();
    binaries.sort_unstable();
    binaries.dedup();
    binaries
}

// ---------------------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------------------

/// The unpacked packages, downloading and checking them first unless cached.
fn fetch() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("podman_{PODMAN_VERSION}"));
    let root = dir.join("root");
    if root.join(".complete").exists() {
        println!("xtask: Podman {PODMAN_VERSION} cached in {}", root.display());
        return Ok(root);
    }
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    sh(apt()?.arg("update")).context("apt-get update of bookworm failed")?;
    let tmp = dir.join("root.tmp");
    let _ = fs::remove_dir_all(&tmp);
    for (package, version, sha256) in PODMAN_DEBS {
        let pinned = format!("{package}={version}");
        let fetched = apt()?.args(["download", &pinned]).current_dir(&debs).status()?;
        ensure!(
            fetched.success(),
            "bookworm no longer has {pinned}: pin the version it has now in PODMAN_DEBS \
             (xtask/src/podman.rs), with its SHA256"
        );
        let deb = debs.join(format!("{package}_{}_amd64.deb", version.replace(':', "%3a")));
        let deb = if deb.exists() {
            deb
        } else {
            deb.with_file_name(format!("{package}_{}_all.deb", version.replace(':', "%3a")))
        };
        let got = sha256_of(&deb)?;
        if got != *sha256 {
            let _ = fs::remove_file(&deb);
            bail!(
                "{} has SHA256 {got}, not the pinned {sha256}: check it and update PODMAN_DEBS",
                deb.display()
            );
        }
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    }
    fs::write(tmp.join(".complete"), PODMAN_VERSION)?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root)?;
    Ok(root)
}

/// apt-get with a configuration of its own (bookworm's index in the cache).
fn apt() -> Result<Command> {
    Ok(PrivateApt::new(&cache_dir().join("apt-bookworm"), APT_SOURCES)?.command())
}

// ---------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------

/// `podman system service` on [`SCRATCH`]/podman.sock. [`Service::stop`] (or drop, after a
/// panic) removes its containers and networks, stops it, and restores the firewall.
struct Service {
    root: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn start(root: &Path) -> Result<Self> {
        if Path::new(SCRATCH).exists() {
            undo_leftover_run(root)?;
        }
        fs::create_dir_all(Path::new(SCRATCH).join("home/.config/containers"))?;
        Firewall::save_in(Path::new(SCRATCH))?;
        let mut service = Service { root: root.to_owned(), child: None };
        let asked = Limits::of(None)?;
        write_config(root, asked)?;
        let pid = service.spawn()?;
        // What runc may give a container is what the service itself holds, and Podman sets
        // its own limits at start: 4.3.1 lowers RLIMIT_NPROC to 32768 where it can. Ask for
        // more and runc fails ("error setting rlimit type 6: operation not permitted"), as it
        // cannot raise a hard limit without CAP_SYS_RESOURCE (not in the bounding set here).
        let held = Limits::of(Some(pid))?;
        if held.below(asked) {
            println!(
                "xtask: podman holds {held} (xtask {asked}): restarting it with these as \
                 its containers' default_ulimits"
            );
            service.kill()?;
            write_config(root, held)?;
            let pid = service.spawn()?;
            let now = Limits::of(Some(pid))?;
            ensure!(!now.below(held), "podman lowered its limits again, to {now}");
        }
        Ok(service)
    }

    /// Starts `podman system service` and waits until it answers; returns its pid.
    fn spawn(&mut self) -> Result<u32> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(Path::new(SCRATCH).join("service.log"))?;
        let mut cmd = self.podman();
        cmd.args(["system", "service", "--time=0", &format!("unix://{SCRATCH}/podman.sock")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("xtask: starting {} ...", show(&cmd));
        // Detached: Ctrl-C must not stop it before the clean-up.
        let child = detached(&mut cmd).spawn().context("starting podman system service")?;
        let pid = child.id();
        fs::write(Path::new(SCRATCH).join(PID_FILE), pid.to_string())?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.docker(&["version"]).output().is_ok_and(|o| o.status.success()) {
            ensure!(Instant::now() < deadline, "podman did not answer within {START_TIMEOUT:?}");
            sleep(Duration::from_millis(200));
        }
        Ok(pid)
    }

    /// Stops the service process (SIGTERM) and reaps it.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    /// The podman binary with the private configuration.
    fn podman(&self) -> Command {
        let mut cmd = Command::new(self.root.join("usr/bin/podman"));
        let scratch = Path::new(SCRATCH);
        cmd.env("LD_LIBRARY_PATH", self.root.join("usr/lib/x86_64-linux-gnu"))
            .env("CONTAINERS_CONF", scratch.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", scratch.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", scratch.join("registries.conf"))
            .env("HOME", scratch.join("home"));
        cmd
    }

    /// The docker CLI on Podman's socket.
    fn docker(&self, args: &[&str]) -> Command {
        let mut cmd = crate::docker::docker();
        cmd.args(args).env("DOCKER_HOST", format!("unix://{SCRATCH}/podman.sock"));
        cmd
    }

    /// The busybox test image, imported through the Docker API as on dockerd.
    fn import_image(&self) -> Result<()> {
        let host = format!("unix://{SCRATCH}/podman.sock");
        // SAFETY: xtask is single-threaded; the docker CLI it spawns reads the variable.
        unsafe { std::env::set_var("DOCKER_HOST", &host) };
        let imported = crate::docker::ensure_test_image();
        // SAFETY: as above.
        unsafe { std::env::remove_var("DOCKER_HOST") };
        imported
    }

    /// Stops the service a killed run left (its pid in [`PID_FILE`]), if it still runs.
    fn kill_leftover(&self) {
        let pid = fs::read_to_string(Path::new(SCRATCH).join(PID_FILE)).unwrap_or_default();
        let Ok(pid) = pid.trim().parse::<i32>() else { return };
        // Gone, or the pid reused by another process, unless its command line names SCRATCH.
        let ours = || {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(SCRATCH)
        };
        if !ours() {
            return;
        }
        println!("xtask: stopping the leftover podman service (pid {pid})");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while ours() && Instant::now() < deadline {
            sleep(Duration::from_millis(100));
        }
        if ours() {
            // SAFETY: as above; it ignored SIGTERM for 10 s.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Removes every container and network it made, stops it and restores the firewall.
    fn stop(&mut self) -> Result<()> {
        let _ = self.podman().args(["rm", "-a", "-f", "-t", "0"]).status();
        let _ = self.podman().args(["network", "prune", "-f"]).status();
        self.kill()?;
        for link in podman_bridges() {
            let _ = sh(Command::new("ip").args(["link", "delete", &link]));
        }
        let restored = Firewall::restore_from(Path::new(SCRATCH));
        unmount_scratch();
        let removed = fs::remove_dir_all(SCRATCH).with_context(|| format!("removing {SCRATCH}"));
        restored.and(removed)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("xtask: cleaning up after Podman failed: {e:#}");
        }
    }
}

/// The bridges netavark makes, `podman0`, `podman1`…, that are still there.
fn podman_bridges() -> Vec<String> {
    let Ok(links) = fs::read_dir("/sys/class/net") else { return Vec::new() };
    links
        .filter_map(|l| l.ok()?.file_name().into_string().ok())
        .filter(|name| {
            name.strip_prefix("podman")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// Unmounts whatever is still mounted under [`SCRATCH`] (the storage's overlay mounts of a
/// service that died), deepest first, so that the directory can be removed.
fn unmount_scratch() {
    let Ok(points) = crate::engines::mounts_under(Path::new(SCRATCH)) else { return };
    for point in points {
        let _ = sh(Command::new("umount").arg(point));
    }
}

/// containers.conf, storage.conf, registries.conf and the signature policy, all private.
/// `limits` become the containers' `default_ulimits`: Podman would otherwise ask runc for
/// 1048576 open files and processes.
fn write_config(root: &Path, limits: Limits) -> Result<()> {
    let scratch = Path::new(SCRATCH);
    let Limits { nofile, nproc } = limits;
    let conf = format!(
        "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         [network]\nnetwork_backend = \"netavark\"\nnetwork_config_dir = \"{s}/networks\"\n\
         [engine]\nconmon_path = [\"{r}/usr/bin/conmon\"]\nhelper_binaries_dir = [\"{r}/usr/lib/podman\"]\n\
         runtime = \"runc\"\ntmp_dir = \"{s}/tmp\"\nevents_logger = \"file\"\n\
         events_logfile_path = \"{s}/events.log\"\ncgroup_manager = \"cgroupfs\"\n",
        s = SCRATCH,
        r = root.display()
    );
    fs::write(scratch.join("containers.conf"), conf)?;
    fs::write(
        scratch.join("storage.conf"),
        format!(
            "[storage]\ndriver = \"overlay\"\nrunroot = \"{SCRATCH}/run\"\ngraphroot = \"{SCRATCH}/storage\"\n"
        ),
    )?;
    fs::write(scratch.join("registries.conf"), "unqualified-search-registries = []\n")?;
    fs::write(
        scratch.join("home/.config/containers/policy.json"),
        "{\"default\": [{\"type\": \"insecureAcceptAnything\"}]}\n",
    )?;
    Ok(())
}

/// Hard limits of open files and processes: what a process without CAP_SYS_RESOURCE may give
/// its children, and so the most a container may ask of runc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Limits {
    nofile: u64,
    nproc: u64,
}

impl Limits {
    /// Podman's own default for both; also what stands in for "unlimited", which
    /// containers.conf cannot say.
    const PODMAN_DEFAULT: u64 = 1_048_576;

    /// The hard limits of process `pid` (from /proc/PID/limits), or of this process.
    fn of(pid: Option<u32>) -> Result<Limits> {
        let path = pid.map_or("/proc/self/limits".into(), |p| format!("/proc/{p}/limits"));
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let limits = Limits::parse(&text).with_context(|| format!("{path}: no hard limits"))?;
        Ok(limits)
    }

    /// `Max processes  96367  96367  processes` and `Max open files …` (soft, hard, unit).
    fn parse(text: &str) -> Option<Limits> {
        let hard = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
            let value = match *fields.get(1)? {
                "unlimited" => Limits::PODMAN_DEFAULT,
                n => n.parse::<u64>().ok()?,
            };
            Some(value.min(Limits::PODMAN_DEFAULT))
        };
        Some(Limits { nofile: hard("Max open files")?, nproc: hard("Max processes")? })
    }

    /// Whether either limit is below `other`'s.
    fn below(self, other: Limits) -> bool {
        self.nofile < other.nofile || self.nproc < other.nproc
    }
}

impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nofile {} nproc {}", self.nofile, self.nproc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hard_limits_and_caps_unlimited() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             32768                unlimited            processes \n\
                    Max open files            1024                 20000                files     \n";
        assert_eq!(
            Limits::parse(text),
            Some(Limits { nofile: 20000, nproc: Limits::PODMAN_DEFAULT })
        );
        assert_eq!(Limits::parse("Max processes 1 2 processes\n"), None);
    }

    #[test]
    fn filters_pick_among_the_podman_tests() {
        let args = |a: &[&str]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(selected(&args(&[])).len(), PODMAN_TESTS.len());
        assert_eq!(selected(&args(&["--nocapture"])).len(), PODMAN_TESTS.len());
        assert_eq!(
            selected(&args(&["start_race"])),
            [
                "start_race::start_race_accepts_nothing_and_openings_follow_docker_run",
                "start_race::start_race_accepts_nothing_on_twenty_starts_in_a_row"
            ]
        );
        assert_eq!(
            selected(&args(&["with_agent"])),
            ["with_agent_outside_hosts_reach_only_what_labels_open"]
        );
    }

    #[test]
    fn one_lower_limit_is_below() {
        let asked = Limits { nofile: 20000, nproc: 96367 };
        assert!(Limits { nofile: 20000, nproc: 32768 }.below(asked));
        assert!(!asked.below(asked));
    }
}
