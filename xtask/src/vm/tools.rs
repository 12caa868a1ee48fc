//! What booting a VM needs on the host: qemu and kmod from Debian, virtme-ng from PyPI.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

use super::boot::Vng;
use crate::{capture, setup};

/// qemu runs the VM; kmod's depmod indexes a downloaded kernel's modules (and the guest's
/// modprobe loads them); virtme-ng reads a kernel's version with `file`.
const APT_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "file"];

/// virtme-ng boots a kernel with the host's root file system as the guest's.
const VIRTME_NG: &str = "virtme-ng";
const VIRTME_NG_MODULE: &str = "virtme_ng";

/// Installs what is missing; returns vng and the PATH to run it with.
pub fn ensure() -> Result<Vng> {
    setup::apt_install(APT_PACKAGES)?;
    if python_has(VIRTME_NG_MODULE) {
        println!("xtask: python package present: {VIRTME_NG}");
    } else {
        println!("xtask: installing {VIRTME_NG} with pip (it boots the test VMs) ...");
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", VIRTME_NG])
            .status()
            .is_ok_and(|s| s.success());
        ensure!(ok, "python3 -m pip install {VIRTME_NG} failed");
    }
    // pip puts vng into Python's scripts directory, which need not be on PATH; vng then runs
    // virtme-run from the same directory by name.
    let scripts = PathBuf::from(
        capture(
            Command::new("python3")
                .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]),
        )?
        .trim(),
    );
    let program = scripts.join("vng");
    ensure!(program.is_file(), "{VIRTME_NG} is installed but {} is missing", program.display());
    let path = env::var_os("PATH").unwrap_or_default();
    let path: OsString = env::join_paths(std::iter::once(scripts).chain(env::split_paths(&path)))
        .context("joining PATH")?;
    Ok(Vng { program, path })
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
