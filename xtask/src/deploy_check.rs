//! deploy/container-guard.service, checked offline (systemd need not be running):
//! `systemd-analyze verify` in a scratch root that holds the unit and a stand-in for each
//! binary it executes, and the unit's promises (before dockerd, state directory, bpffs
//! writable) as the README states them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = "container-guard.service";

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(UNIT);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A directory of its own under the temp directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("guard-unit-check-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every `[section] key=value` line (comments and blank lines left out), in order.
fn directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        assert!(!line.ends_with('\\'), "keep directives on one line: {line}");
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
        out.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
    }
    out
}

/// The absolute paths the unit executes (the first word of each Exec*= line, prefixes such
/// as `-` and `+` removed): `systemd-analyze verify` requires them to be executable.
fn executables(text: &str) -> Vec<String> {
    directives(text)
        .into_iter()
        .filter(|(_, key, _)| key.starts_with("Exec"))
        .filter_map(|(_, _, value)| {
            let exe = value.trim_start_matches(['-', '@', ':', '+', '!']);
            exe.split_whitespace().next().filter(|w| w.starts_with('/')).map(str::to_owned)
        })
        .collect()
}

/// `systemd-analyze verify --root=SCRATCH container-guard.service` on `text`, with a stand-in
/// shell script at each path the unit executes. Ok only if it exits 0 and prints nothing:
/// it reports an unknown key or a value it cannot parse on stderr and still exits 0.
fn verify(name: &str, text: &str) -> Result<(), String> {
    let root = Scratch::new(name);
    let units = root.0.join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    fs::write(units.join(UNIT), text).unwrap();
    for exe in executables(text) {
        let stand_in = root.0.join(exe.trim_start_matches('/'));
        fs::create_dir_all(stand_in.parent().unwrap()).unwrap();
        fs::write(&stand_in, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&stand_in, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").arg(format!("--root={}", root.0.display())).arg(UNIT);
    cmd.env("SYSTEMD_LOG_COLOR", "0");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("running systemd-analyze: {e} (it is in Debian's systemd package; `cargo xtask setup` installs it)")
    });
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("systemd-analyze verify: {}\n{said}", out.status))
    }
}

#[test]
fn the_unit_verifies_cleanly() {
    if let Err(e) = verify("clean", &unit_text()) {
        panic!("deploy/{UNIT} does not verify:\n{e}");
    }
}

/// The check above would pass a unit systemd partly ignores if it only looked at the exit
/// status: these mistakes exit 0 with a warning.
#[test]
fn a_broken_unit_fails_the_check() {
    let unit = unit_text();
    // Each `from` is a whole line of the unit (a comment may mention the same words).
    let mutants = [
        ("RestartSec=2s", "RestartSecs=2s", "Unknown key"),
        ("ProtectSystem=strict", "ProtectSystem=strickt", "Failed to parse"),
        (
            "Before=network-pre.target docker.service",
            "Before=network-pre.target docker.servic",
            "Failed to add dependency",
        ),
    ];
    for (i, (from, to, expect)) in mutants.into_iter().enumerate() {
        let lines: Vec<&str> = unit.lines().collect();
        assert_eq!(
            lines.iter().filter(|l| **l == from).count(),
            1,
            "the unit should have the line {from:?} once: update this test"
        );
        let broken: String = lines
            .iter()
            .map(|l| if *l == from { to } else { l })
            .map(|l| format!("{l}\n"))
            .collect();
        match verify(&format!("broken-{i}"), &broken) {
            Ok(()) => panic!("{from:?} -> {to:?} passed the check"),
            Err(e) => assert!(e.contains(expect), "{from:?} -> {to:?}: {e}"),
        }
    }
}

/// What the README says the unit does.
#[test]
fn the_unit_keeps_its_promises() {
    let all = directives(&unit_text());
    let values = |section: &str, key: &str| -> Vec<String> {
        all.iter()
            .filter(|(s, k, _)| s == section && k == key)
            .flat_map(|(_, _, v)| v.split_whitespace().map(str::to_owned))
            .collect()
    };
    let has = |section: &str, key: &str, want: &str| {
        assert!(
            values(section, key).iter().any(|v| v == want),
            "[{section}] {key}= should include {want}"
        );
    };

    let exec: Vec<&String> = all
        .iter()
        .filter(|(s, k, _)| s == "Service" && k == "ExecStart")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(exec, ["/usr/local/bin/guard run --state-dir /var/lib/container-guard"]);
    has("Service", "StateDirectory", "container-guard");

    // From boot, before dockerd and before the network, without depending on Docker.
    has("Install", "WantedBy", "multi-user.target");
    has("Unit", "Before", "docker.service");
    has("Unit", "Before", "network-pre.target");
    has("Unit", "Wants", "network-pre.target");
    has("Unit", "RequiresMountsFor", "/sys/fs/bpf");
    for key in ["Requires", "Requisite", "BindsTo", "Wants", "PartOf", "Upholds"] {
        let docker: Vec<String> =
            values("Unit", key).into_iter().filter(|v| v.contains("docker")).collect();
        assert!(docker.is_empty(), "[Unit] {key}={docker:?}: the agent must not depend on Docker");
    }

    // Stopping leaves the pins; a failure restarts it.
    assert_eq!(values("Service", "KillSignal"), ["SIGTERM"]);
    let restart = values("Service", "Restart");
    assert!(restart == ["always"] || restart == ["on-failure"], "Restart={restart:?}");

    // What the agent needs through the hardening.
    has("Service", "ReadWritePaths", "/sys/fs/bpf");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        has("Service", "CapabilityBoundingSet", cap);
    }
    for family in ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"] {
        has("Service", "RestrictAddressFamilies", family);
    }
    // ProtectKernelTunables= mounts /sys/fs/bpf read-only, whatever ReadWritePaths= says;
    // PrivateNetwork= would hide the host's interfaces.
    for key in ["ProtectKernelTunables", "PrivateNetwork"] {
        let v = values("Service", key);
        assert!(v.is_empty() || v == ["no"], "{key}={v:?} breaks the agent");
    }
}
