//! The two helper programs of the flood measurement, loaded straight from BPF instructions with
//! bpf(2): they are measuring instruments, not part of guard, so they stay out of guard-ebpf
//! and out of the product object.
//!
//! - the generator: `return bpf_redirect(IFINDEX, 0)` (after restoring the TTL, see
//!   [`generator_program`]), run by BPF_PROG_TEST_RUN with
//!   BPF_F_TEST_XDP_LIVE_FRAMES, sends every test frame out of interface IFINDEX (the
//!   mechanism of xdp-tools' xdp-trafficgen);
//! - the limit: `return XDP_DROP`, the cheapest thing an XDP program can do with a frame.
//!
//! aya's `TestRun` needs an aya-loaded program, so the live-frames run is issued here too.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// Helper id of `long bpf_redirect(u32 ifindex, u64 flags)`.
const BPF_FUNC_REDIRECT: i32 = 23;

pub const XDP_DROP: i32 = 1;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// `rD = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
const fn mov64_imm(dst: u8, imm: i32) -> Insn {
    Insn { code: 0xb7, regs: dst, off: 0, imm }
}
/// `rD = rS` (BPF_ALU64 | BPF_MOV | BPF_X).
const fn mov64_reg(dst: u8, src: u8) -> Insn {
    Insn { code: 0xbf, regs: dst | src << 4, off: 0, imm: 0 }
}
/// `rD += imm` (BPF_ALU64 | BPF_ADD | BPF_K).
const fn add64_imm(dst: u8, imm: i32) -> Insn {
    Insn { code: 0x07, regs: dst, off: 0, imm }
}
/// `rD = *(u32 *)(rS + off)` (BPF_LDX | BPF_MEM | BPF_W).
const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    Insn { code: 0x61, regs: dst | src << 4, off, imm: 0 }
}
/// `*(u8 *)(rD + off) = imm` (BPF_ST | BPF_MEM | BPF_B).
const fn st_b(dst: u8, off: i16, imm: u8) -> Insn {
    Insn { code: 0x72, regs: dst, off, imm: imm as i32 }
}
/// `*(u16 *)(rD + off) = imm` (BPF_ST | BPF_MEM | BPF_H).
const fn st_h(dst: u8, off: i16, imm: u16) -> Insn {
    Insn { code: 0x6a, regs: dst, off, imm: imm as i32 }
}
/// `if rD > rS goto +off` (BPF_JMP | BPF_JGT | BPF_X).
const fn jgt_reg(dst: u8, src: u8, off: i16) -> Insn {
    Insn { code: 0x2d, regs: dst | src << 4, off, imm: 0 }
}
/// `call helper` (BPF_JMP | BPF_CALL).
const fn call(helper: i32) -> Insn {
    Insn { code: 0x85, regs: 0, off: 0, imm: helper }
}
/// `exit` (BPF_JMP | BPF_EXIT): returns r0.
const fn exit() -> Insn {
    Insn { code: 0x95, regs: 0, off: 0, imm: 0 }
}

/// The generator: restores the frame's IPv4 TTL and header checksum, then returns
/// `bpf_redirect(ifindex, 0)`.
///
/// Live frames are recycled with whatever the stack wrote into them, and forwarding decrements
/// the TTL in place: without the restore, a forwarded frame would run out of TTL after 63
/// trips and die in ip_forward() before reaching the FORWARD chain. `ttl` and `csum` are the
/// frame's own bytes at offsets 22 and 24..26 (Ethernet + IPv4 without options).
pub fn generator_program(ifindex: u32, ttl: u8, csum: [u8; 2]) -> io::Result<OwnedFd> {
    load_xdp(
        "gbench_gen",
        &[
            ldx_w(2, 1, 0),  // r2 = ctx->data
            ldx_w(3, 1, 4),  // r3 = ctx->data_end
            mov64_reg(4, 2), // r4 = data + 34: the end of the IPv4 header
            add64_imm(4, 34),
            jgt_reg(4, 3, 2), // too short (cannot happen with our frame): skip the restore
            st_b(2, 22, ttl),
            // A u16 store writes its low byte first (little-endian), the checksum is big-endian.
            st_h(2, 24, u16::from_le_bytes(csum)),
            mov64_imm(1, ifindex as i32), // r1, r2: the helper's arguments
            mov64_imm(2, 0),
            call(BPF_FUNC_REDIRECT), // r0 = XDP_REDIRECT
            exit(),
        ],
    )
}

/// `return XDP_DROP`.
pub fn drop_program() -> io::Result<OwnedFd> {
    load_xdp("gbench_drop", &[mov64_imm(0, XDP_DROP), exit()])
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr` (fields up to expected_attach_type).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn load_xdp(name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL"; // bpf_redirect is GPL-only
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    attr.prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let log = String::from_utf8_lossy(&log);
        io::Error::new(
            e.kind(),
            format!("BPF_PROG_LOAD {name}: {e}; verifier: {}", log.trim_end_matches('\0')),
        )
    })?;
    // SAFETY: BPF_PROG_LOAD returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `BPF_PROG_TEST_RUN` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs `prog` on `repeat` live copies of `frame`, `batch` at a time, and returns the wall
/// time of the call. The frames really leave: whatever the program redirects is transmitted.
/// Must be called from the network namespace the program's ifindex belongs to.
pub fn run_live_frames(
    prog: &OwnedFd,
    frame: &[u8],
    repeat: u32,
    batch: u32,
) -> io::Result<Duration> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: batch,
        ..Default::default()
    };
    let start = Instant::now();
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(start.elapsed())
}

/// Why this kernel will not run live frames, if it will not: some sandboxes refuse
/// BPF_F_TEST_XDP_LIVE_FRAMES (EPERM) to anyone, root included, since it puts frames on a
/// link. Asked with [`drop_program`] on one frame, so nothing leaves.
pub fn live_frames_refused() -> Option<String> {
    let probe = || -> io::Result<()> {
        run_live_frames(&drop_program()?, &[0u8; 64], 1, 1)?;
        Ok(())
    };
    probe().err().map(|e| format!("this kernel refuses BPF_F_TEST_XDP_LIVE_FRAMES ({e})"))
}

/// The `BPF_LINK_CREATE` part of `union bpf_attr` (no target-specific fields for XDP).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// Attaches an XDP program in native (driver) mode with a bpf_link. The link lives as long as
/// the returned descriptor: dropping it (or the process dying) detaches the program.
pub fn attach_xdp_native(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`, zero-initialised
    // past the fields we set, and every pointer in it outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<T>(attr),
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as i32) }
}
