//! The eBPF object (see guard-ebpf for its four programs), embedded in the binary at build
//! time, loaded with its maps pinned.

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{ProgramError, SchedClassifier, Xdp},
};

use crate::{
    attach::{Hookable, Programs},
    interfaces::{Framing, Link},
    pins::{Hook, PinError, Pins},
};

/// The object guard-userspace/build.rs built from guard-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

/// The entry point in guard-ebpf that runs on each hook.
pub fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Xdp => xdp_program_name(Framing::Ethernet),
        Hook::TcEgress => "guard_tc_egress",
        Hook::BridgeGate => "guard_tc_gate",
        Hook::BridgeIngress => "guard_tc_bridge_in",
    }
}

/// The XDP entry point that reads packets of `framing`.
pub fn xdp_program_name(framing: Framing) -> &'static str {
    match framing {
        Framing::Ethernet => "guard_xdp",
        Framing::Ip => "guard_xdp_ip",
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
}

/// Loads the object, reusing (or creating and pinning) the maps under `pins`, and loads both
/// programs into the kernel. Nothing is attached yet.
pub fn load(pins: &Pins) -> Result<Ebpf, LoadError> {
    let fresh = !pins.exists();
    pins.create()?;
    let loaded = load_into(pins);
    if loaded.is_err() && fresh {
        // Leave nothing behind from a load that failed (the maps it pinned, the directories).
        let _ = crate::unload::unload(pins);
    }
    loaded
}

fn load_into(pins: &Pins) -> Result<Ebpf, LoadError> {
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins.maps_dir()).load(OBJECT)?;
    for framing in [Framing::Ethernet, Framing::Ip] {
        xdp_program_for(&mut ebpf, framing)?.load()?;
    }
    for hook in [Hook::TcEgress, Hook::BridgeGate, Hook::BridgeIngress] {
        tc_program(&mut ebpf, hook)?.load()?;
    }
    Ok(ebpf)
}

/// The XDP program for Ethernet uplinks.
pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    xdp_program_for(ebpf, Framing::Ethernet)
}

/// The XDP program that reads packets of `framing`.
pub fn xdp_program_for(ebpf: &mut Ebpf, framing: Framing) -> Result<&mut Xdp, LoadError> {
    let name = xdp_program_name(framing);
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}

/// The TC program of `hook` (any hook but [`Hook::Xdp`]).
pub fn tc_program(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, LoadError> {
    let name = program_name(hook);
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}

impl Programs for Ebpf {
    fn for_link(&mut self, hook: Hook, link: &Link) -> Result<&mut dyn Hookable, String> {
        if hook != Hook::Xdp {
            return Ok(tc_program(self, hook).map_err(|e| e.to_string())?);
        }
        let framing = link.framing().ok_or_else(|| {
            format!(
                "its link type (ARPHRD {}) is neither Ethernet nor IP, which guard cannot read: this uplink is NOT guarded (trust it with --trust-iface if that is intended)",
                link.link_type
            )
        })?;
        Ok(xdp_program_for(self, framing).map_err(|e| e.to_string())?)
    }
}
