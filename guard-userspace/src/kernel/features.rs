//! What the running kernel can do, probed once at start: guard refuses a kernel that lacks
//! what its programs need, naming the kernel, the feature and the oldest Linux that has it,
//! and picks how TC programs go on interfaces (TCX links, else clsact filters).

use aya::{maps::MapType, util::KernelVersion};
use tracing::info;

use crate::kernel::tc_filter::{self, Mechanism};

/// The oldest kernel guard is tested on (Debian 11's).
pub const OLDEST_TESTED: &str = "5.10";

/// The running kernel's release, as uname gives it.
pub fn release() -> String {
    nix::sys::utsname::uname()
        .map_or_else(|_| "unknown".into(), |u| u.release().to_string_lossy().into_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    #[error(
        "this kernel ({kernel}) lacks {feature} (Linux {since} and later); guard needs Linux {OLDEST_TESTED} or later"
    )]
    Missing { kernel: String, feature: &'static str, since: &'static str },
    #[error(
        "--tc-attach tcx: this kernel ({kernel}) has no TCX (Linux 6.6 and later); leave the flag out to use clsact filters"
    )]
    NoTcx { kernel: String },
}

/// Refuses a kernel without what the programs need: BPF ring buffers (the drop events) and
/// XDP links (pinned, so the filter outlives the agent).
pub fn require() -> Result<(), Unsupported> {
    let missing = |feature, since| Unsupported::Missing { kernel: release(), feature, since };
    if !aya::sys::is_map_supported(MapType::RingBuf).unwrap_or(true) {
        return Err(missing("BPF ring buffers", "5.8"));
    }
    if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(5, 9, 0)) {
        return Err(missing("XDP links", "5.9"));
    }
    Ok(())
}

/// How TC programs go on interfaces: as `requested`, else TCX where the kernel has it.
pub fn tc_mechanism(requested: Option<Mechanism>) -> Result<Mechanism, Unsupported> {
    let tcx = tc_filter::tcx_available();
    match requested {
        Some(Mechanism::Tcx) if !tcx => Err(Unsupported::NoTcx { kernel: release() }),
        Some(mechanism) => Ok(mechanism),
        None if tcx => Ok(Mechanism::Tcx),
        None => {
            info!(
                kernel = release().as_str(),
                "no TCX on this kernel (Linux 6.6 and later): TC programs run as clsact filters through netlink"
            );
            Ok(Mechanism::Netlink)
        }
    }
}

/// Before 5.11 BPF memory counts against RLIMIT_MEMLOCK, whose default (8 MiB or less) is too
/// small for guard's maps: there it is raised before anything is loaded.
pub fn make_room_for_maps() {
    if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(5, 11, 0)) {
        raise_memlock();
    }
}

/// RLIMIT_MEMLOCK to unlimited (root may; a container needs CAP_SYS_RESOURCE for it).
fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit only reads the struct passed.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        tracing::warn!(
            kernel = release().as_str(),
            "cannot raise RLIMIT_MEMLOCK ({}): kernels before 5.11 charge BPF maps to it, so loading may fail; give guard CAP_SYS_RESOURCE or run it with `ulimit -l unlimited`",
            std::io::Error::last_os_error()
        );
    }
}
