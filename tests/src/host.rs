//! Host-wide settings the scenarios need, put back as they were on drop.

use std::fs;
use std::thread;
use std::time::Duration;

use crate::cmd::{self, run, try_run};

/// Sysctls the routing host turns on.
const FORWARDING: [&str; 2] =
    ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"];
/// The key under which the iptables FORWARD policy is saved, next to the sysctl paths.
const FORWARD_POLICY: &str = "iptables FORWARD policy";
/// The original settings, written before anything is changed: a run killed before its drops
/// leaves this file, and the next run's leftover cleanup restores from it. Under /run, so a
/// reboot (which resets the settings anyway) forgets it.
const SAVED: &str = "/run/guard-e2e-host-settings";

/// The host as a router for the outside hosts, the way the hosts are set up:
/// forwarding on for both families and the iptables FORWARD policy ACCEPT. Docker 20.10
/// sets that policy to DROP when it turns forwarding on itself; on a host that forwarded
/// before Docker came, it stays ACCEPT, and then even unpublished container ports are
/// reachable by routing. The test bed reproduces that, the worse case.
///
/// rp_filter needs no change, even strict: every route of the test bed is symmetric (each
/// outside host's subnet is connected on the veth its packets arrive on).
pub struct RoutingHost {
    saved: Vec<(String, String)>,
}

impl RoutingHost {
    pub fn enable() -> Self {
        let mut saved = vec![(FORWARD_POLICY.to_owned(), forward_policy())];
        for path in FORWARDING {
            let old = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
            saved.push((path.to_owned(), old.trim().to_owned()));
        }
        let file: String = saved.iter().map(|(key, value)| format!("{key}={value}\n")).collect();
        fs::write(SAVED, file).unwrap_or_else(|e| panic!("write {SAVED}: {e}"));
        // From here on, drop restores whatever happens.
        let host = Self { saved };
        for path in FORWARDING {
            fs::write(path, "1").unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
        run("iptables", &["-P", "FORWARD", "ACCEPT"]);
        host
    }
}

impl Drop for RoutingHost {
    fn drop(&mut self) {
        restore(&self.saved);
    }
}

/// Puts every saved setting back; forgets the saved file only once all of them are back,
/// so that the next run retries what failed.
fn restore(saved: &[(String, String)]) {
    let mut all_restored = true;
    for (key, value) in saved {
        if let Err(e) = restore_one(key, value) {
            cmd::warn(format!("cleanup: restore {key} to {value}: {e} (kept in {SAVED})"));
            all_restored = false;
        }
    }
    if all_restored {
        let _ = fs::remove_file(SAVED);
    }
}

/// iptables can fail transiently while another program changes the ruleset (a benchmark, a
/// second test tier, dockerd itself), so it gets a few bounded tries.
fn restore_one(key: &str, value: &str) -> Result<(), String> {
    if key != FORWARD_POLICY {
        return fs::write(key, value).map_err(|e| e.to_string());
    }
    let mut error = String::new();
    for _ in 0..5 {
        match try_run("iptables", &["-w", "5", "-P", "FORWARD", value]) {
            Ok(_) => return Ok(()),
            Err(e) => error = e,
        }
        thread::sleep(Duration::from_millis(200));
    }
    Err(error)
}

/// Restores the settings a killed run left changed.
pub(crate) fn restore_leftover_settings() {
    let Ok(file) = fs::read_to_string(SAVED) else {
        return;
    };
    cmd::warn(format!("restoring host settings a killed run left changed ({SAVED})"));
    let saved: Vec<_> = file
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    restore(&saved);
}

/// The current policy of the filter table's FORWARD chain ("ACCEPT" or "DROP").
fn forward_policy() -> String {
    let rules = run("iptables", &["-S", "FORWARD"]);
    rules
        .lines()
        .find_map(|line| line.strip_prefix("-P FORWARD "))
        .unwrap_or_else(|| panic!("no FORWARD policy in `iptables -S FORWARD`: {rules}"))
        .trim()
        .to_owned()
}

/// The agent pins under /sys/fs/bpf, which a fresh machine may not have mounted. Mounting
/// bpffs is what every systemd host does at boot, so it is left mounted.
pub(crate) fn ensure_bpffs() {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.nth(1) == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    });
    if !mounted {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
}
