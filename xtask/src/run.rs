//! `cargo xtask run`: build the agent and hand the terminal over to it.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Result, anyhow};

use crate::{Ctx, docker, setup, sh};

/// Prepare, build `guard` (release) and exec `guard run ARGS`: guard gets Ctrl-C
/// directly and its exit code is ours.
pub fn run(ctx: &Ctx, args: &[String]) -> Result<()> {
    setup::prerequisites()?;
    setup::bpffs()?;
    docker::ensure_daemon(&ctx.target_dir)?;
    println!("xtask: building guard with cargo build --release -p guard-userspace ...");
    sh(Command::new("cargo").args(["build", "--release", "-p", "guard-userspace"]))?;
    let guard = ctx.target_dir.join("release/guard");
    println!("xtask: running {} run {}", guard.display(), args.join(" "));
    let err = Command::new(&guard).arg("run").args(args).exec();
    Err(anyhow!(err).context(format!("exec {}", guard.display())))
}
