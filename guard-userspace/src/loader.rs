//! The eBPF object (XDP filter, TC egress flow memory), embedded in the binary at build time,
//! loaded with its maps pinned.

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{ProgramError, SchedClassifier, Xdp},
};

use crate::pins::{PinError, Pins};

/// The object guard-userspace/build.rs built from guard-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

/// Entry points in guard-ebpf.
pub const XDP_PROGRAM: &str = "guard_xdp";
pub const TC_EGRESS_PROGRAM: &str = "guard_tc_egress";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("loading the eBPF object failed (are you root, with CAP_BPF and CAP_NET_ADMIN?): {0}")]
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
    xdp_program(&mut ebpf)?.load()?;
    tc_egress_program(&mut ebpf)?.load()?;
    Ok(ebpf)
}

pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let name = XDP_PROGRAM;
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}

pub fn tc_egress_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    let name = TC_EGRESS_PROGRAM;
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}
