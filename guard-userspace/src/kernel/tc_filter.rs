//! TC programs on kernels without TCX (before 6.6): clsact filters, through netlink, in a
//! slot of guard's own.
//!
//! A netlink filter is not a bpf link: it cannot be pinned, and it needs no pin to outlive the
//! agent, because it stays on the interface's clsact qdisc until someone removes it. So the
//! kernel itself is the record: guard's filter is the one at [`PRIORITY`] and [`HANDLE`] whose
//! program has one of guard's names. A new agent adopts it by replacing the program in that
//! slot (cls_bpf swaps it atomically: no moment without a filter); `guard unload` removes
//! exactly that slot and leaves other tools' filters and the qdisc alone.
//!
//! aya attaches and replaces; listing and removing are done here, because aya keeps its filter
//! dump to itself and its removal cannot tell guard's slot from another tool's.

use std::{io, mem};

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};

use crate::{host::interfaces::Link, host::rtnetlink as netlink, kernel::hook::Hook};

/// Guard's filters run first (1 is the lowest priority number tc accepts from a user): a
/// filter ahead of them that returned "ok" would end the classification before guard saw
/// the packet.
pub const PRIORITY: u16 = 1;
/// Guard's handle in that priority ("gd"), so that the slot is its own beside other tools'.
pub const HANDLE: u32 = 0x0000_6764;

/// How TC programs are put on interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mechanism {
    /// TCX links (Linux 6.6 and later), pinned like the XDP links.
    Tcx,
    /// clsact filters through netlink, in guard's slot (any kernel guard supports).
    Netlink,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Tcx => "tcx",
            Mechanism::Netlink => "netlink",
        }
    }
}

/// Whether this kernel has TCX: asking which TCX programs `lo` runs fails where there is
/// none, and changes nothing where there is.
pub fn tcx_available() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

/// Where on the interface `hook` runs.
pub fn direction(hook: Hook) -> TcAttachType {
    hook.attach_point().tc_side()
}

/// Puts `program` in guard's slot on `link`: replaces the program there if the slot is taken
/// (an earlier agent's), else adds clsact if missing and creates the filter. Returns whether
/// it replaced one.
pub fn attach(program: &mut SchedClassifier, hook: Hook, link: &Link) -> Result<bool, String> {
    let direction = direction(hook);
    let slot = SchedClassifierLink::attached(
        &link.name,
        direction,
        PRIORITY,
        TcHandle::from(HANDLE),
        None,
    )
    .map_err(|e| e.to_string())?;
    let (id, replaced) = match program.attach_to_link(slot) {
        Ok(id) => (id, true),
        Err(_) => {
            // Nothing in the slot (or no clsact at all): create it. The qdisc is usually
            // there already; whether adding it failed matters only if the filter then fails.
            let qdisc = tc::qdisc_add_clsact(&link.name);
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                handle: TcHandle::from(HANDLE),
                classid: None,
            });
            let created = program.attach_with_options(&link.name, direction, options);
            let id = created.map_err(|e| match qdisc {
                Ok(()) => format!("netlink (clsact) filter: {e}"),
                Err(q) => format!("netlink (clsact) filter: {e} (adding the clsact qdisc: {q})"),
            })?;
            (id, false)
        }
    };
    // Dropping aya's handle would remove the filter: the filter is meant to outlive us.
    mem::forget(program.take_link(id).map_err(|e| e.to_string())?);
    Ok(replaced)
}

// The type is rtnetlink's (it is what a dump of filters returns); what guard's slot is, is ours.
pub use crate::host::rtnetlink::Filter;

impl Filter {
    /// In guard's slot, whoever put it there.
    pub fn in_guard_slot(&self) -> bool {
        self.priority == PRIORITY && self.handle == HANDLE
    }
}

/// The filter in guard's slot on `ifindex` at `hook`, if any.
pub fn in_slot(ifindex: u32, hook: Hook) -> io::Result<Option<Filter>> {
    Ok(filters(ifindex, direction(hook))?.into_iter().find(Filter::in_guard_slot))
}

/// Removes the filter in guard's slot on `ifindex` at `hook` if its program is one of
/// `names` (guard's programs of that hook: the uplink's recorder and a bridge's gate share a
/// side); returns whether one was removed.
pub fn remove_ours(ifindex: u32, hook: Hook, names: &[&str]) -> io::Result<bool> {
    let Some(filter) = in_slot(ifindex, hook)? else { return Ok(false) };
    if !names.contains(&filter.name.as_str()) {
        return Ok(false);
    }
    netlink::delete_filter(ifindex, parent(direction(hook)), PRIORITY, HANDLE)?;
    Ok(true)
}

/// Removes guard's filters (see [`remove_ours`]) from both sides of `ifindex`; then, if no
/// filter of any tool is left there, the clsact qdisc that guard added, so the interface is
/// as it was before guard. Returns how many filters were removed.
pub fn remove_all_ours(ifindex: u32, names: &[&str]) -> io::Result<usize> {
    let sides = [Hook::TcEgress, Hook::BridgeIngress];
    let mut removed = 0;
    for hook in sides {
        removed += usize::from(remove_ours(ifindex, hook, names)?);
    }
    if removed > 0 && netlink::dump_any_filter(ifindex)? == 0 {
        netlink::delete_clsact(ifindex)?;
    }
    Ok(removed)
}

/// Every bpf filter on `ifindex`'s clsact qdisc in `direction` (none without the qdisc).
pub fn filters(ifindex: u32, direction: TcAttachType) -> io::Result<Vec<Filter>> {
    match netlink::dump_filters(ifindex, parent(direction)) {
        Ok(filters) => Ok(filters),
        // No clsact qdisc there (or no interface any more): no filter.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) => {
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// The clsact qdisc's ingress or egress parent (TC_H_CLSACT with TC_H_MIN_INGRESS/EGRESS).
fn parent(direction: TcAttachType) -> u32 {
    match direction {
        TcAttachType::Ingress => 0xFFFF_FFF2,
        _ => 0xFFFF_FFF3,
    }
}
