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

use crate::{interfaces::Link, pins::Hook};

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
    match hook {
        Hook::BridgeIngress => TcAttachType::Ingress,
        Hook::Xdp | Hook::TcEgress | Hook::BridgeGate => TcAttachType::Egress,
    }
}

/// Puts `program` in guard's slot on `link`: replaces the program there if the slot is taken
/// (an earlier agent's), else adds clsact if missing and creates the filter.
pub fn attach(program: &mut SchedClassifier, hook: Hook, link: &Link) -> Result<(), String> {
    let direction = direction(hook);
    let slot = SchedClassifierLink::attached(
        &link.name,
        direction,
        PRIORITY,
        TcHandle::from(HANDLE),
        None,
    )
    .map_err(|e| e.to_string())?;
    let id = match program.attach_to_link(slot) {
        Ok(id) => id,
        Err(_) => {
            // Nothing in the slot (or no clsact at all): create it. The qdisc is usually
            // there already; whether adding it failed matters only if the filter then fails.
            let qdisc = tc::qdisc_add_clsact(&link.name);
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                handle: TcHandle::from(HANDLE),
                classid: None,
            });
            program.attach_with_options(&link.name, direction, options).map_err(
                |e| match qdisc {
                    Ok(()) => format!("netlink (clsact) filter: {e}"),
                    Err(q) => {
                        format!("netlink (clsact) filter: {e} (adding the clsact qdisc: {q})")
                    }
                },
            )?
        }
    };
    // Dropping aya's handle would remove the filter: the filter is meant to outlive us.
    mem::forget(program.take_link(id).map_err(|e| e.to_string())?);
    Ok(())
}

/// A bpf filter found on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The name the program was attached with.
    pub name: String,
    pub program_id: u32,
}

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

/// The two rtnetlink requests guard makes itself: dump a qdisc's filters, delete one.
mod netlink {
    use std::{io, os::fd::AsRawFd, os::fd::FromRawFd, os::fd::OwnedFd};

    use super::Filter;

    const RTM_DELQDISC: u16 = 37;
    const RTM_DELTFILTER: u16 = 45;
    const RTM_GETTFILTER: u16 = 46;
    const RTM_NEWTFILTER: u16 = 44;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_DUMP: u16 = 0x300;
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_NAME: u16 = 7;
    const TCA_BPF_ID: u16 = 11;
    const NLMSG_HDRLEN: usize = 16;
    const TCMSG_LEN: usize = 20;
    /// htons(ETH_P_ALL): the protocol guard's filters (aya's) match.
    const ETH_P_ALL_BE: u32 = (libc::ETH_P_ALL as u16).to_be() as u32;

    fn socket() -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// nlmsghdr + tcmsg (+ attributes).
    fn request(
        kind: u16,
        flags: u16,
        ifindex: u32,
        handle: u32,
        parent: u32,
        info: u32,
    ) -> Vec<u8> {
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        msg.extend_from_slice(&handle.to_ne_bytes());
        msg.extend_from_slice(&parent.to_ne_bytes());
        msg.extend_from_slice(&info.to_ne_bytes());
        msg
    }

    fn push_attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
        msg.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(payload);
        msg.resize(msg.len().next_multiple_of(4), 0);
    }

    fn send(fd: &OwnedFd, mut msg: Vec<u8>) -> io::Result<()> {
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: a valid buffer of that length, alive for the call.
        let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Reads replies until the dump ends or the request is acknowledged; hands every
    /// RTM_NEWTFILTER message's body to `each`.
    fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: a valid buffer of that length, alive for the call.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let body = &rest[NLMSG_HDRLEN..len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(body[..4].try_into().unwrap());
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    RTM_NEWTFILTER => each(body),
                    _ => {}
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }

    /// (type, payload) of each attribute in `data`.
    fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        std::iter::from_fn(move || {
            if data.len() < 4 {
                return None;
            }
            let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
            let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff; // without NLA_F_NESTED
            if len < 4 || len > data.len() {
                return None;
            }
            let payload = &data[4..len];
            data = &data[len.next_multiple_of(4).min(data.len())..];
            Some((kind, payload))
        })
    }

    fn c_string(payload: &[u8]) -> String {
        let end = payload.iter().position(|b| *b == 0).unwrap_or(payload.len());
        String::from_utf8_lossy(&payload[..end]).into_owned()
    }

    pub fn dump_filters(ifindex: u32, parent: u32) -> io::Result<Vec<Filter>> {
        let fd = socket()?;
        send(&fd, request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, 0))?;
        let mut filters = Vec::new();
        receive(&fd, |body| {
            if body.len() < TCMSG_LEN {
                return;
            }
            let handle = u32::from_ne_bytes(body[8..12].try_into().unwrap());
            let info = u32::from_ne_bytes(body[16..20].try_into().unwrap());
            let mut kind = String::new();
            let (mut name, mut program_id) = (String::new(), 0);
            for (attr, payload) in attrs(&body[TCMSG_LEN..]) {
                match attr {
                    TCA_KIND => kind = c_string(payload),
                    TCA_OPTIONS => {
                        for (option, value) in attrs(payload) {
                            match option {
                                TCA_BPF_NAME => name = c_string(value),
                                TCA_BPF_ID if value.len() >= 4 => {
                                    program_id = u32::from_ne_bytes(value[..4].try_into().unwrap())
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            // Handle 0 is the chain's own entry for a priority, not a filter.
            if kind == "bpf" && handle != 0 {
                filters.push(Filter { priority: (info >> 16) as u16, handle, name, program_id });
            }
        })?;
        Ok(filters)
    }

    /// How many filters of any kind both sides of `ifindex`'s clsact qdisc hold.
    pub fn dump_any_filter(ifindex: u32) -> io::Result<usize> {
        let mut count = 0;
        for parent in [0xFFFF_FFF2, 0xFFFF_FFF3] {
            let fd = socket()?;
            send(&fd, request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, 0))?;
            receive(&fd, |body| {
                // Handle 0 is a priority's own entry, not a filter.
                if body.len() >= TCMSG_LEN && body[8..12] != [0; 4] {
                    count += 1;
                }
            })?;
        }
        Ok(count)
    }

    /// Deletes the clsact qdisc of `ifindex` (TC_H_CLSACT).
    pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
        let fd = socket()?;
        let mut msg = request(RTM_DELQDISC, NLM_F_ACK, ifindex, 0xFFFF_0000, 0xFFFF_FFF1, 0);
        push_attr(&mut msg, TCA_KIND, b"clsact\0");
        send(&fd, msg)?;
        receive(&fd, |_| {})
    }

    pub fn delete_filter(ifindex: u32, parent: u32, priority: u16, handle: u32) -> io::Result<()> {
        let fd = socket()?;
        let info = (u32::from(priority) << 16) | ETH_P_ALL_BE;
        let mut msg = request(RTM_DELTFILTER, NLM_F_ACK, ifindex, handle, parent, info);
        push_attr(&mut msg, TCA_KIND, b"bpf\0");
        send(&fd, msg)?;
        receive(&fd, |_| {})
    }
}
