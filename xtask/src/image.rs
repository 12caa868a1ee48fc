//! `cargo xtask image`: a static `guard` in a `FROM scratch` image tagged `container-guard:dev`.
//!
//! 1. `cargo build --release -p guard-userspace --target x86_64-unknown-linux-gnu` with
//!    `-C target-feature=+crt-static` for that target only (the nested eBPF build that
//!    guard-userspace/build.rs runs through aya-build targets bpfel and is left alone). The
//!    workspace has no C dependency, so glibc's static-pie is all it takes.
//! 2. The binary must have no ELF interpreter (a scratch image has no loader) and must run.
//! 3. It is copied to `target/image/guard`, and `docker build` runs with the repository root
//!    as context: `.dockerignore` admits only that file, the `Dockerfile` copies it to /guard.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{Ctx, capture, docker, setup, sh};

/// The tag `cargo xtask image` builds (and the tests run).
pub const IMAGE: &str = "container-guard:dev";
/// The target the static binary is built for.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Target-scoped, so neither host tools (build scripts, proc macros) nor the eBPF build see it.
const RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";
const RUSTFLAGS: &str = "-C target-feature=+crt-static";
/// Where the binary goes for `docker build`: the Dockerfile's COPY source, relative to the
/// repository root (the build context).
const CONTEXT_BIN: &str = "target/image/guard";

#[derive(Args)]
pub struct ImageArgs {
    /// Tag the image with this name instead.
    #[arg(long, default_value = IMAGE)]
    tag: String,
}

pub fn image(ctx: &Ctx, args: &ImageArgs) -> Result<()> {
    setup::prerequisites()?;
    docker::ensure_daemon(&ctx.target_dir)?;
    let bin = build_static(ctx)?;
    // Where the Dockerfile copies it from, whatever CARGO_TARGET_DIR says.
    let staged = Path::new(CONTEXT_BIN);
    fs::create_dir_all(staged.parent().context("no parent")?)?;
    // Copy via a temporary name: docker never sees a half-written binary.
    let tmp = staged.with_extension("tmp");
    fs::copy(&bin, &tmp)
        .with_context(|| format!("copying {} to {}", bin.display(), tmp.display()))?;
    fs::rename(&tmp, staged)?;
    let root = std::env::current_dir()?;
    println!(
        "xtask: building image {} with docker build (context: {}) ...",
        args.tag,
        root.display()
    );
    sh(docker::docker().args(["build", "--tag", &args.tag, "--file", "Dockerfile", "."]))?;
    let size = capture(docker::docker().args(["image", "inspect", "-f", "{{.Size}}", &args.tag]))?;
    let size: u64 = size.trim().parse().with_context(|| format!("image size {size:?}"))?;
    println!("xtask: image {} is {size} bytes ({:.1} MiB)", args.tag, size as f64 / 1_048_576.0);
    Ok(())
}

/// Builds the static binary and checks it: no interpreter, and `guard --version` runs.
pub fn build_static(ctx: &Ctx) -> Result<PathBuf> {
    println!(
        "xtask: building a static guard with {RUSTFLAGS_VAR}=\"{RUSTFLAGS}\" cargo build --release \
         -p guard-userspace --target {TARGET} ..."
    );
    sh(Command::new("cargo")
        .args(["build", "--release", "-p", "guard-userspace", "--target", TARGET])
        .env(RUSTFLAGS_VAR, RUSTFLAGS))?;
    let bin = ctx.target_dir.join(TARGET).join("release/guard");
    if let Some(interp) = elf_interpreter(&bin)? {
        bail!(
            "{} is dynamically linked (interpreter {interp}): a FROM scratch image cannot run it",
            bin.display()
        );
    }
    let version = capture(Command::new(&bin).arg("--version"))?;
    println!("xtask: {} is static and runs: {}", bin.display(), version.trim());
    Ok(bin)
}

/// The PT_INTERP of an ELF64 little-endian executable, `None` for a static one. (`ldd` says
/// the same, "statically linked" or "not a dynamic executable", but is a script of glibc's
/// that runs the binary's loader; reading the program headers needs nothing.)
fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let elf = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let not_elf = || anyhow::anyhow!("{} is not an ELF64 little-endian file", path.display());
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(not_elf());
    }
    let u16_at = |at: usize| -> Result<usize> {
        let bytes = elf.get(at..at + 2).ok_or_else(not_elf)?;
        Ok(u16::from_le_bytes(bytes.try_into()?) as usize)
    };
    let u64_at = |at: usize| -> Result<usize> {
        let bytes = elf.get(at..at + 8).ok_or_else(not_elf)?;
        Ok(u64::from_le_bytes(bytes.try_into()?) as usize)
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = elf.get(ph..ph + 4).ok_or_else(not_elf)?;
        if u32::from_le_bytes(kind.try_into()?) == PT_INTERP {
            let (offset, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let name = elf.get(offset..offset + size).ok_or_else(not_elf)?;
            let name = String::from_utf8_lossy(name).trim_end_matches('\0').to_owned();
            return Ok(Some(name));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_has_an_interpreter() {
        // This test binary is built the ordinary (dynamic) way.
        let me = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&me).unwrap().expect("a dynamic test binary");
        assert!(interp.contains("ld-linux"), "{interp}");
    }

    #[test]
    fn not_elf_is_an_error() {
        assert!(elf_interpreter(Path::new("Cargo.toml")).is_err());
    }
}
