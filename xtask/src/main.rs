//! `cargo xtask`: prepare this machine, run the agent, run the test tiers, benchmark the data path.
//!
//! Every step says what it does and does nothing when it is already satisfied.

mod ban_tools;
mod bench;
mod daemon;
#[cfg(test)]
mod deploy_check;
mod docker;
mod engines;
mod image;
mod install;
mod podman;
mod private_apt;
mod run;
mod setup;
mod swarm;
mod test;
mod vm;

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
/// Build, run and test container-guard on this machine (as root, on Debian).
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the agent (release) and run `guard run ARGS` as root, with dockerd up.
    Run {
        /// Arguments for `guard run`, after `--` (e.g. `-- --iface eth0`).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Install what is missing, then run the test tiers and print a summary.
    Test(test::TestArgs),
    /// Install the prerequisites, mount bpffs, start dockerd and build the test image.
    Setup,
    /// Install what is missing, run the data-path benchmark and print its report
    /// (target/bench/report.{md,json,png}).
    Bench(bench::BenchArgs),
    /// Build guard (release) and install it with its manual page and shell completions
    /// (default under /usr/local).
    Install(install::InstallArgs),
    /// Build a static guard and the FROM scratch image `container-guard:dev` (docker build);
    /// print its size.
    Image(image::ImageArgs),
    /// Inside the VM of `test --kernel` only: prepare the guest and run the test binaries.
    #[command(hide = true)]
    VmGuest(vm::guest::GuestArgs),
}

/// Where xtask keeps what it downloads once (kernels, engines): `$XDG_CACHE_HOME` or
/// `~/.cache`, under `container-guard/`.
pub fn cache_home() -> PathBuf {
    let base = env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
        PathBuf::from,
    );
    base.join("container-guard")
}

/// Where the workspace lives.
pub struct Ctx {
    /// Cargo's target directory (from `cargo metadata`).
    pub target_dir: PathBuf,
}

fn main() -> ExitCode {
    ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<bool> {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask has no parent directory")?;
    env::set_current_dir(root).with_context(|| format!("cd {}", root.display()))?;
    match cmd {
        Cmd::Run { args } => {
            require_root("run as root: the agent loads XDP programs")?;
            run::run(&ctx()?, &args).map(|()| true)
        }
        Cmd::Test(args) => {
            require_root("run as root: the tests load XDP programs and drive dockerd")?;
            test::test(&ctx()?, &args)
        }
        Cmd::Setup => {
            require_root("run as root: setup installs packages, mounts bpffs and starts dockerd")?;
            setup::machine(&ctx()?).map(|()| true)
        }
        Cmd::Bench(args) => {
            require_root("run as root: the benchmark loads XDP programs and builds a test bed")?;
            bench::bench(&ctx()?, &args).map(|()| true)
        }
        Cmd::Install(args) => {
            require_root("run as root: it installs under the prefix (default /usr/local)")?;
            install::install(&ctx()?, &args).map(|()| true)
        }
        Cmd::Image(args) => {
            require_root("run as root: the image is built by dockerd (started if it is down)")?;
            image::image(&ctx()?, &args).map(|()| true)
        }
        // No cargo in the guest: it has the host's files, read-only, and nothing to build.
        Cmd::VmGuest(args) => vm::guest::run(&args),
    }
}

fn ctx() -> Result<Ctx> {
    let out =
        capture(Command::new("cargo").args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: serde_json::Value = serde_json::from_str(&out).context("parsing cargo metadata")?;
    let target_dir =
        meta["target_directory"].as_str().context("cargo metadata has no target_directory")?;
    Ok(Ctx { target_dir: target_dir.into() })
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why}");
    }
    Ok(())
}

/// Put `$CARGO_HOME/bin` (default `~/.cargo/bin`) on PATH, for us and every child
/// (bpf-linker, rustup, cargo).
fn ensure_cargo_bin_on_path() {
    let cargo_home = match env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
    };
    let bin = cargo_home.join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    if let Ok(new) = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path))) {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { env::set_var("PATH", new) };
    }
}

/// The command line, for messages.
fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run with inherited stdio; fail unless it exits 0.
fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", show(cmd));
    }
    Ok(())
}

/// Run and return its stdout; fail unless it exits 0.
fn capture(cmd: &mut Command) -> Result<String> {
    let out =
        cmd.stderr(Stdio::inherit()).output().with_context(|| format!("running {}", show(cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({})", show(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether it exits 0 within `timeout` (killed otherwise); output discarded.
fn succeeds_within(cmd: &mut Command, timeout: Duration) -> bool {
    let Ok(mut child) =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}
