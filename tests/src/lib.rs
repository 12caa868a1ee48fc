//! Test-bed helpers shared by the privileged test tiers.
//!
//! Every resource a test creates (namespace, veth, Docker network, container, agent, host
//! setting) is an RAII guard that undoes itself on drop, so a failing assertion leaves the
//! machine as it was. Names carry the `guard-e2e-` / `ge2e-` prefixes so that leftovers of a
//! run that was killed outright (no drops) can be found and removed by
//! [`prepare_test_bed`] at the start of the next one.

pub mod agent;
pub mod bed;
pub mod boot;
pub mod cmd;
pub mod container_agent;
pub mod crowdsec;
pub mod daemon;
pub mod docker;
pub mod dockerd;
pub mod fail2ban;
pub mod frames;
pub mod host;
pub mod netns;
pub mod observe;
pub mod probe;
pub mod prober;
pub mod raw;
pub mod seed;
pub mod swarm;
pub mod tun;
pub mod wait;

use std::fs::{File, OpenOptions};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Exclusive use of the test bed, held for a test's whole life (drop it last).
///
/// The tests share fixed names, addresses and host settings, and each run removes whatever
/// carries the test prefixes as leftovers of a crashed run: two tests must never overlap,
/// neither two threads (someone forgot `--test-threads=1`) nor two processes (two people or
/// tiers running the suite at once). An flock does both: every caller opens the file anew,
/// and the kernel drops the lock when a killed run's file is closed.
pub struct Exclusive {
    _lock: Flock<File>,
}

const LOCK_PATH: &str = "/run/guard-e2e.lock";
/// Names another lock file. `cargo xtask test --engine` holds [`LOCK_PATH`] itself for the
/// whole time it has swapped the machine's dockerd for another engine (so that no other run
/// meets the wrong daemon), and hands its own tests a private lock through this variable.
pub const LOCK_PATH_VAR: &str = "GUARD_TEST_LOCK";
/// A whole run takes well under a minute; anything longer is a stuck run to look at.
const LOCK_WAIT: Duration = Duration::from_secs(300);

fn lock_test_bed() -> Exclusive {
    let path = std::env::var(LOCK_PATH_VAR).unwrap_or_else(|_| LOCK_PATH.to_owned());
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Exclusive { _lock: lock },
            Err((_, Errno::EWOULDBLOCK)) => {
                assert!(
                    Instant::now() < deadline,
                    "another end-to-end run has held {path} for {LOCK_WAIT:?}"
                );
                thread::sleep(Duration::from_millis(200));
            }
            Err((_, e)) => panic!("flock {path}: {e}"),
        }
    }
}

/// Checks what the privileged tiers need, takes the test bed for this test, and removes
/// leftovers of crashed runs. Call it first in every test and keep the returned guard until
/// the test's resources are gone: a test bed that is not there must fail loudly, never skip.
pub fn prepare_test_bed() -> Exclusive {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (namespaces, veths, XDP): run them with `cargo xtask test`"
    );
    let exclusive = lock_test_bed();
    for tool in ["ip", "iptables"] {
        assert!(
            cmd::find_in_path(tool).is_some(),
            "`{tool}` not found: apt-get install -y iproute2 iptables"
        );
    }
    docker::require_daemon_and_image();
    host::ensure_bpffs();
    remove_leftovers();
    exclusive
}

/// Removes what a run killed before its drops ran may have left: containers and networks
/// first (they hold the bridge), then swarm nodes' daemons (in namespaces of their own), then
/// namespaces, host-side veths, agent pin dirs, and the host settings it changed.
fn remove_leftovers() {
    docker::remove_leftovers();
    swarm::remove_leftovers();
    netns::remove_leftovers();
    agent::remove_leftover_pins();
    host::restore_leftover_settings();
}

/// `bound`, stretched on a slow machine: times GUARD_TEST_SLOWDOWN (a whole number, default
/// 1), which a run under software emulation sets (a VM there runs processes several times
/// slower). For bounds on how long the test bed waits, never for what a test asserts.
pub fn patience(bound: std::time::Duration) -> std::time::Duration {
    let factor = std::env::var("GUARD_TEST_SLOWDOWN").ok().and_then(|v| v.parse().ok());
    bound * factor.unwrap_or(1u32).max(1)
}
