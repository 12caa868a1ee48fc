//! Host-wide settings the scenarios need, put back as they were on drop.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cmd::{run, try_run};

/// The host as a router for the outside hosts, the way the hosts are set up:
/// forwarding on for both families and the iptables FORWARD policy ACCEPT. Docker 20.10
/// sets that policy to DROP when it turns forwarding on itself; on a host that forwarded
/// before Docker came, it stays ACCEPT, and then even unpublished container ports are
/// reachable by routing. The test bed reproduces that, the worse case.
pub struct RoutingHost {
    forward_policy: String,
    sysctls: Vec<(PathBuf, String)>,
}

const FORWARDING: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

impl RoutingHost {
    pub fn enable() -> Self {
        let forward_policy = forward_policy();
        let mut saved = Self {
            forward_policy,
            sysctls: Vec::new(),
        };
        for path in FORWARDING {
            let path = Path::new(path);
            let old =
                fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            // Record before writing, so drop restores even if the write half-failed.
            saved.sysctls.push((path.to_owned(), old.trim().to_owned()));
            fs::write(path, "1").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        run("iptables", &["-P", "FORWARD", "ACCEPT"]);
        saved
    }
}

impl Drop for RoutingHost {
    fn drop(&mut self) {
        if let Err(e) = try_run("iptables", &["-P", "FORWARD", &self.forward_policy]) {
            eprintln!("cleanup: {e}");
        }
        for (path, value) in self.sysctls.iter().rev() {
            if let Err(e) = fs::write(path, value) {
                eprintln!("cleanup: restore {} to {value}: {e}", path.display());
            }
        }
    }
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
