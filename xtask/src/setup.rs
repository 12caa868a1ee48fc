//! Build and test prerequisites: nightly rust-src, clippy for both toolchains, Debian packages,
//! bpf-linker, bpffs, systemd-analyze.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{Ctx, ban_tools, docker, sh};

/// Debian packages the build (llvm-22-dev), the agent (docker.io) and the tests need
/// (docker-compose validates and runs deploy/compose.yaml, and brings python3-yaml; fail2ban
/// and crowdsec are the ban tools the bans tests drive, see [`ban_tools`]).
const APT_PACKAGES: &[&str] = &[
    "docker.io",
    "llvm-22-dev",
    "busybox-static",
    "iptables",
    "iproute2",
    "bpftool",
    "nftables",
    "docker-compose",
    "fail2ban",
    "crowdsec",
];

/// PyPI packages the tests need: kubernetes-validate checks deploy/daemonset.yaml offline
/// (it ships the Kubernetes schemas).
const PIP_PACKAGES: &[(&str, &str)] =
    &[("kubernetes-validate", "kubernetes_validate"), ("prometheus-client", "prometheus_client")];

/// bpf-linker built against Debian's LLVM 22: its BTF is accepted by the kernel.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Everything `cargo xtask setup` does; `cargo xtask test` does it first too.
pub fn machine(ctx: &Ctx) -> Result<()> {
    prerequisites()?;
    pip_packages()?;
    systemd_analyze()?;
    bpffs()?;
    docker::ensure_daemon(&ctx.target_dir)?;
    docker::ensure_test_image()
}

/// What building the workspace needs.
pub fn prerequisites() -> Result<()> {
    rust_src()?;
    clippy()?;
    apt_install(APT_PACKAGES)?;
    bpf_linker()
}

fn pip_packages() -> Result<()> {
    for (package, module) in PIP_PACKAGES {
        let present = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            println!("xtask: python package present: {package}");
            continue;
        }
        println!(
            "xtask: installing {package} with pip (the tests validate deploy/ and /metrics with it)"
        );
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", package])
            .status()
            .is_ok_and(|s| s.success());
        anyhow::ensure!(ok, "python3 -m pip install {package} failed");
    }
    Ok(())
}

/// The unit tier verifies deploy/container-guard.service with `systemd-analyze verify`
/// (offline: it needs no running systemd); Debian ships it in the `systemd` package.
fn systemd_analyze() -> Result<()> {
    let present = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        println!("xtask: systemd-analyze present");
        return Ok(());
    }
    println!("xtask: systemd-analyze missing (the unit tier verifies the systemd unit with it)");
    apt_install(&["systemd"])
}

fn rust_src() -> Result<()> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !sysroot.status.success() {
        println!("xtask: installing the nightly toolchain with rust-src with rustup ...");
        return sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let src =
        PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib/rustlib/src");
    if src.is_dir() {
        println!("xtask: nightly rust-src present");
        return Ok(());
    }
    println!("xtask: adding rust-src to the nightly toolchain with rustup ...");
    sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Clippy for the default toolchain and for nightly: the unit tier lints the host crates
/// with the one and guard-ebpf with the other, with warnings as errors. A toolchain installed
/// with rustup's minimal profile (as [`rust_src`] installs nightly) has none.
fn clippy() -> Result<()> {
    let toolchains: [(&str, &[&str], &[&str]); 2] = [
        ("the default toolchain", &["cargo", "clippy", "--version"], &[]),
        (
            "nightly",
            &["rustup", "run", "nightly", "cargo", "clippy", "--version"],
            &["--toolchain", "nightly"],
        ),
    ];
    for (name, probe, toolchain) in toolchains {
        let present =
            Command::new(probe[0]).args(&probe[1..]).output().is_ok_and(|out| out.status.success());
        if present {
            println!("xtask: clippy present for {name}");
            continue;
        }
        println!("xtask: adding clippy to {name} with rustup (the unit tier lints with it) ...");
        sh(Command::new("rustup").args(["component", "add", "clippy"]).args(toolchain))?;
    }
    Ok(())
}

/// Installs whichever of `packages` dpkg does not report installed (one `apt-get update`
/// first, only when something is missing).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("xtask: apt packages present: {}", packages.join(" "));
        return Ok(());
    }
    println!("xtask: installing {} with apt-get ...", missing.join(" "));
    let quiet = ban_tools::before_install(&missing)?;
    let apt = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    sh(apt().args(["update"]))?;
    sh(apt().args(["install", "-y"]).args(&missing))?;
    drop(quiet);
    if missing.iter().any(|p| ban_tools::PACKAGES.contains(p)) {
        ban_tools::keep_services_stopped();
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout == b"install ok installed")
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    if version.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
        println!("xtask: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 with cargo install \
         (about 75 s) ..."
    );
    sh(Command::new("cargo")
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
        .args(["--locked", "--force", "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
}

/// Mount bpffs on /sys/fs/bpf unless it already is (the agent pins there).
pub fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        println!("xtask: bpffs mounted on /sys/fs/bpf");
        return Ok(());
    }
    println!("xtask: mounting bpffs on /sys/fs/bpf ...");
    sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
