//! What the kernel says about a pinned bpf link: is it still attached, and to which interface.
//!
//! A pin outlives the attachment it names: `bpftool link detach` (BPF_LINK_DETACH) or the
//! interface going away leaves the pin and the link, but the link runs nowhere. aya 0.14's
//! `LinkInfo` gives the link's type and ids, not the interface, so the two bpf(2) calls are
//! made here: BPF_OBJ_GET on the pin, BPF_OBJ_GET_INFO_BY_FD on the link.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type};

/// Where a pinned link stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedLinkState {
    /// No pin at that path.
    Missing,
    /// An XDP or TCX link attached to this interface.
    Attached { ifindex: u32 },
    /// The link exists but runs nowhere (detached, or its interface is gone).
    Detached,
}

/// Reads the state of the XDP or TCX link pinned at `path`.
pub fn pinned_link_state(path: &Path) -> io::Result<PinnedLinkState> {
    let fd = match open_pin(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PinnedLinkState::Missing),
        Err(e) => return Err(e),
    };
    let info = link_info(&fd)?;
    // SAFETY: the kernel filled the union member of the link's type; both members read here
    // start with the interface index, and the union was zeroed before the call.
    let ifindex = unsafe {
        match info.type_ {
            t if t == bpf_link_type::BPF_LINK_TYPE_XDP as u32 => info.__bindgen_anon_1.xdp.ifindex,
            t if t == bpf_link_type::BPF_LINK_TYPE_TCX as u32 => info.__bindgen_anon_1.tcx.ifindex,
            other => {
                return Err(io::Error::other(format!(
                    "{} is a bpf link of type {other}, not XDP or TCX",
                    path.display()
                )));
            }
        }
    };
    Ok(if ifindex == 0 { PinnedLinkState::Detached } else { PinnedLinkState::Attached { ifindex } })
}

fn bpf(cmd: bpf_cmd, attr: &mut [u8]) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised buffer of the length given, alive for the call;
    // the kernel reads at most that much and writes only through pointers it contains.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_int, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// BPF_OBJ_GET: an fd for the object pinned at `path`.
fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a pin path"))?;
    // union bpf_attr, BPF_OBJ_* part: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u8; 16];
    attr[..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_GET_INFO_BY_FD on a link.
fn link_info(fd: &OwnedFd) -> io::Result<bpf_link_info> {
    // SAFETY: bpf_link_info is plain integers and a union of them; all-zero is valid.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    // union bpf_attr, info part: bpf_fd (u32), info_len (u32), info (u64 pointer).
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(std::mem::size_of::<bpf_link_info>() as u32).to_ne_bytes());
    attr[8..].copy_from_slice(&((&raw mut info) as u64).to_ne_bytes());
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_pin_is_missing() {
        let state = pinned_link_state(Path::new("/sys/fs/bpf/guard-no-such-pin/xdp-1"));
        // Without bpffs or root the answer is still "not there".
        assert_eq!(state.expect("a missing pin is not an error"), PinnedLinkState::Missing);
    }
}
