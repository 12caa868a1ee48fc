//! The eBPF object (see guard-ebpf for its four programs), embedded in the binary at build
//! time, loaded with its maps pinned.

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{ProgramError, SchedClassifier, Xdp},
};

use crate::{
    host::interfaces::{Framing, Link},
    kernel::attach::{Hookable, Programs},
    kernel::hook::Hook,
    kernel::pins::{PinError, Pins},
};

/// The object guard-userspace/build.rs built from guard-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

/// The entry point `guard explain` runs for links of `framing`: the filter's decision,
/// returned instead of acted on (never attached, nothing counted).
pub fn explain_program_name(framing: Framing) -> &'static str {
    match framing {
        Framing::Ethernet => "guard_explain",
        Framing::Ip => "guard_explain_ip",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(
        "loading the eBPF object failed: {0} (guard needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root; in a Docker 20.10 container, --cap-add SYS_ADMIN: see the README)"
    )]
    Object(#[from] EbpfError),
    #[error("the eBPF object has no program {0}: the build is broken")]
    MissingProgram(&'static str),
    #[error("the kernel rejected a program: {0}")]
    Program(#[from] ProgramError),
    #[error("pinning a program: {0}")]
    PinProgram(#[from] aya::pin::PinError),
}

/// Loads the object, reusing (or creating and pinning) the maps under `pins`, and loads both
/// programs into the kernel. Nothing is attached yet.
pub fn load(pins: &Pins) -> Result<Ebpf, LoadError> {
    crate::kernel::features::make_room_for_maps();
    let fresh = !pins.exists();
    pins.create()?;
    let loaded = load_into(pins);
    if loaded.is_err() && fresh {
        // Leave nothing behind from a load that failed (the maps it pinned, the directories).
        let _ = crate::kernel::unload::unload(pins);
    }
    loaded
}

fn load_into(pins: &Pins) -> Result<Ebpf, LoadError> {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins.maps_dir()).load(OBJECT)?;
    for (hook, framing) in Hook::PROGRAMS {
        if hook.is_xdp() {
            retrying(|| xdp_program_for(&mut ebpf, framing)?.load().map_err(Into::into))?;
        } else {
            retrying(|| tc_program_for(&mut ebpf, hook, framing)?.load().map_err(Into::into))?;
        }
    }
    for framing in Framing::ALL {
        retrying(|| explain_program(&mut ebpf, framing)?.load().map_err(Into::into))?;
    }
    Ok(ebpf)
}

/// How often a load interrupted by a signal is tried (libbpf's PROG_LOAD_ATTEMPTS).
const LOAD_ATTEMPTS: u32 = 5;

/// Runs `load` again when the kernel gave up with EAGAIN: the verifier stops when a signal is
/// pending for the loading thread (`signal_pending()` in `do_check`), which says nothing about
/// the program. libbpf retries the same way.
fn retrying(mut load: impl FnMut() -> Result<(), LoadError>) -> Result<(), LoadError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(LoadError::Program(ProgramError::LoadError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                tracing::warn!(
                    attempt,
                    "the kernel's verifier was interrupted (EAGAIN): loading again"
                );
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The explain program for links of `framing` (an XDP program, never attached).
pub fn explain_program(ebpf: &mut Ebpf, framing: Framing) -> Result<&mut Xdp, LoadError> {
    let name = explain_program_name(framing);
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}

/// The XDP program for Ethernet uplinks.
pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    xdp_program_for(ebpf, Framing::Ethernet)
}

/// The XDP program that reads packets of `framing`.
pub fn xdp_program_for(ebpf: &mut Ebpf, framing: Framing) -> Result<&mut Xdp, LoadError> {
    let name = Hook::Xdp.program(framing);
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}

/// The TC program of `hook` (any hook but [`Hook::Xdp`]) for Ethernet links.
pub fn tc_program(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, LoadError> {
    tc_program_for(ebpf, hook, Framing::Ethernet)
}

/// The TC program of `hook` for links of `framing`.
pub fn tc_program_for(
    ebpf: &mut Ebpf,
    hook: Hook,
    framing: Framing,
) -> Result<&mut SchedClassifier, LoadError> {
    let name = hook.program(framing);
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}

/// Pins `hook`'s program of `framing` at `path`.
pub fn pin_program(
    ebpf: &mut Ebpf,
    hook: Hook,
    framing: Framing,
    path: &std::path::Path,
) -> Result<(), LoadError> {
    if hook.is_xdp() {
        xdp_program_for(ebpf, framing)?.pin(path)?;
    } else {
        tc_program_for(ebpf, hook, framing)?.pin(path)?;
    }
    Ok(())
}

impl Programs for Ebpf {
    fn for_link(&mut self, hook: Hook, link: &Link) -> Result<&mut dyn Hookable, String> {
        let framing = hook.framing_on(link).ok_or_else(|| {
            format!(
                "its link type (ARPHRD {}) is neither Ethernet nor IP, which guard cannot read: this uplink is NOT guarded (trust it with --trust-iface if that is intended)",
                link.link_type
            )
        })?;
        Ok(if hook.is_xdp() {
            xdp_program_for(self, framing).map_err(|e| e.to_string())?
        } else {
            tc_program_for(self, hook, framing).map_err(|e| e.to_string())?
        })
    }
}
