//! The XDP program, embedded in the binary at build time, loaded with its maps pinned.

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{ProgramError, Xdp},
};

use crate::pins::{PinError, Pins};

/// The object guard-userspace/build.rs built from guard-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

/// Name of the XDP entry point in guard-ebpf.
pub const XDP_PROGRAM: &str = "guard_xdp";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("loading the eBPF object failed (are you root, with CAP_BPF and CAP_NET_ADMIN?): {0}")]
    Object(#[from] EbpfError),
    #[error("the eBPF object has no XDP program {XDP_PROGRAM}: the build is broken")]
    MissingProgram,
    #[error("the kernel rejected the XDP program {XDP_PROGRAM}: {0}")]
    Program(#[from] ProgramError),
}

/// Loads the object, reusing (or creating and pinning) the maps under `pins`, and loads the
/// XDP program into the kernel. Nothing is attached yet.
pub fn load(pins: &Pins) -> Result<Ebpf, LoadError> {
    pins.create()?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.maps_dir())
        .load(OBJECT)?;
    xdp_program(&mut ebpf)?.load()?;
    Ok(ebpf)
}

pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let program = ebpf
        .program_mut(XDP_PROGRAM)
        .ok_or(LoadError::MissingProgram)?;
    Ok(program.try_into()?)
}
