//! Programs on interfaces: on the uplinks XDP on ingress (native first, generic where the
//! driver has none) and TC on egress; on Docker's bridges TC on both sides. TC programs run
//! as TCX links where the kernel has TCX (6.6 and later), else as clsact filters in guard's
//! slot (see [`super::tc_filter`]). Every link is pinned; the links a previous agent pinned,
//! and the filters it left, are adopted with an atomic program swap (the link or filter
//! stays, so there is no moment without one); those on interfaces that are gone or no longer
//! uplinks are removed.
//!
//! Uplink programs come in two framings (see [`Framing`] and [`Hook::framing_on`]):
//! Ethernet uplinks get `guard_xdp` and `guard_tc_egress`, L3 uplinks (tun, wireguard,
//! ipip...) `guard_xdp_ip`, always in generic mode, and `guard_tc_egress_ip`. An uplink of a link type
//! guard cannot read is reported, never silently left open.
//!
//! Nothing attached is trusted forever: every pass checks that each link still has its pin and
//! is still attached to its interface (a pin can be removed, a link detached with `bpftool link
//! detach`), and attaches again what vanished.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use aya::programs::{
    LinkOrder, SchedClassifier, Xdp,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::{XdpLink, XdpMode},
};
use tracing::{debug, info, warn};

use crate::{
    host::interfaces::{Framing, Link},
    host::rtnetlink::XdpAttached,
    kernel::hook::Hook,
    kernel::link_info::{PinnedLinkState, pinned_link_state},
    kernel::pins::Pins,
    kernel::tc_filter::{self, Mechanism},
};

/// How a program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// XDP in the driver, before an skb exists: the fast path.
    Native,
    /// Generic (skb) XDP, for drivers without native support.
    Generic,
    /// TCX (egress).
    Tcx,
    /// A clsact filter through netlink (kernels without TCX).
    Netlink,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
            Mode::Tcx => "tcx",
            Mode::Netlink => "netlink",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching {hook} to {iface} failed: {reason}")]
    Attach { hook: &'static str, iface: String, reason: String },
    #[error("pinning the {hook} link of {iface}: {reason}")]
    Pin { hook: &'static str, iface: String, reason: String },
}

/// What an attachment is: how it runs, and for XDP which framing its program reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub mode: Mode,
    pub framing: Framing,
    /// Taken over from what an earlier agent left (its pinned link or its filter).
    pub adopted: bool,
}

impl Attached {
    /// "native", "generic", "tcx", "netlink"; L3 XDP adds its framing: "generic/ip".
    pub fn label(self) -> String {
        match self.framing {
            Framing::Ethernet => self.mode.name().to_string(),
            Framing::Ip => format!("{}/ip", self.mode.name()),
        }
    }
}

/// Picks the program to put on a link at a hook: at XDP, the entry point of its framing.
pub trait Programs {
    fn for_link(&mut self, hook: Hook, link: &Link) -> Result<&mut dyn Hookable, String>;
}

/// A program that can be put on an interface at a hook, or swapped into a pinned link.
pub trait Hookable {
    /// Attaches to `link` at `hook` and returns the link as an fd, to be pinned.
    fn attach_new(&mut self, hook: Hook, link: &Link) -> Result<(FdLink, Mode), String>;
    /// Atomically replaces the program in a pinned link on `link`; returns how it runs.
    fn adopt(&mut self, pinned: FdLink, link: &Link) -> Result<Mode, String>;
    /// Puts the program in guard's clsact filter slot on `link`, replacing whatever program
    /// is there (TC programs, on kernels without TCX); returns whether it replaced one.
    fn attach_filter(&mut self, _hook: Hook, _link: &Link) -> Result<bool, String> {
        Err("only TC programs run as clsact filters".into())
    }
    /// The kernel's id of the loaded program.
    fn program_id(&self) -> Result<u32, String>;
}

impl Hookable for Xdp {
    fn attach_new(&mut self, _: Hook, link: &Link) -> Result<(FdLink, Mode), String> {
        // guard attaches afresh only where it has no link of its own: a program there is
        // another tool's, which guard does not replace (and beside which the kernel would
        // put guard's in the other mode, behind it).
        if let Ok((mode, id)) = crate::host::rtnetlink::xdp_attached(link.ifindex)
            && mode != XdpAttached::None
        {
            return Err(format!(
                "another XDP program (id {id}, {mode:?} mode) is attached to {iface}; guard does not replace another tool's program: detach it (`ip link set dev {iface} xdp off`, `bpftool prog show id {id}` says whose it is), or name the interface with --trust-iface if it needs no guard",
                iface = link.name
            ));
        }
        let (id, mode) = if link.framing() == Some(Framing::Ip) {
            // An L3 device's native hook, where it has one, need not see what the host
            // receives (tun runs it only for tap frames); generic XDP runs in the core receive
            // path of every device and hands over the packet from its IP header on.
            let id = self
                .attach_to_if_index(link.ifindex, XdpMode::Skb)
                .map_err(|e| format!("generic mode: {e}"))?;
            (id, Mode::Generic)
        } else {
            match self.attach_to_if_index(link.ifindex, XdpMode::Driver) {
                Ok(id) => (id, Mode::Native),
                Err(native) => {
                    let cause = native_refusal(&native, link);
                    warn!(iface = %link.name, "native XDP unavailable ({cause}); using generic mode");
                    let id = self
                        .attach_to_if_index(link.ifindex, XdpMode::Skb)
                        .map_err(|e| format!("native and generic mode: {e}"))?;
                    (id, Mode::Generic)
                }
            }
        };
        let fd_link = FdLink::try_from(self.take_link(id).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        Ok((fd_link, mode))
    }

    fn adopt(&mut self, pinned: FdLink, link: &Link) -> Result<Mode, String> {
        let xdp_link = XdpLink::try_from(pinned).map_err(|e| e.to_string())?;
        let id = self.attach_to_link(xdp_link).map_err(|e| e.to_string())?;
        // The pin keeps the link; dropping our handle only closes an fd.
        drop(self.take_link(id));
        // The link does not say in which mode it was attached; the interface does.
        match crate::host::rtnetlink::xdp_attached(link.ifindex) {
            Ok((XdpAttached::Driver, _)) => Ok(Mode::Native),
            Ok((XdpAttached::Generic, _)) => Ok(Mode::Generic),
            Ok((other, _)) => Err(format!("the interface reports its XDP program as {other:?}")),
            Err(e) => Err(format!("reading the interface's XDP mode: {e}")),
        }
    }

    fn program_id(&self) -> Result<u32, String> {
        self.info().map(|info| info.id()).map_err(|e| e.to_string())
    }
}

impl Hookable for SchedClassifier {
    fn attach_new(&mut self, hook: Hook, link: &Link) -> Result<(FdLink, Mode), String> {
        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
        let id = self
            .attach_with_options(&link.name, hook.attach_point().tc_side(), options)
            .map_err(|e| e.to_string())?;
        let fd_link = FdLink::try_from(self.take_link(id).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        Ok((fd_link, Mode::Tcx))
    }

    fn adopt(&mut self, pinned: FdLink, _: &Link) -> Result<Mode, String> {
        let link = SchedClassifierLink::try_from(pinned).map_err(|e| e.to_string())?;
        let id = self.attach_to_link(link).map_err(|e| e.to_string())?;
        drop(self.take_link(id));
        Ok(Mode::Tcx)
    }

    fn attach_filter(&mut self, hook: Hook, link: &Link) -> Result<bool, String> {
        tc_filter::attach(self, hook, link)
    }

    fn program_id(&self) -> Result<u32, String> {
        self.info().map(|info| info.id()).map_err(|e| e.to_string())
    }
}

/// The (hook, interface) pairs this agent has put its programs on.
#[derive(Debug)]
pub struct Attachments {
    attached: BTreeMap<(Hook, u32), (String, Attached)>,
    /// How TC programs go on interfaces on this kernel.
    tc: Mechanism,
    /// The TC hooks whose filters on every interface were looked at once (netlink only:
    /// filters an earlier agent left on interfaces that are no longer wanted).
    swept: BTreeSet<Hook>,
}

impl Attachments {
    pub fn new(tc: Mechanism) -> Self {
        Attachments { attached: BTreeMap::new(), tc, swept: BTreeSet::new() }
    }

    /// (hook, interface, what) of every attachment.
    pub fn all(&self) -> impl Iterator<Item = (Hook, &str, Attached)> {
        self.attached.iter().map(|((hook, _), (name, what))| (*hook, name.as_str(), *what))
    }

    /// Makes the set of interfaces running their program at `hook` equal to `links`. Errors
    /// are per interface: one that fails does not stop the others.
    pub fn sync(
        &mut self,
        programs: &mut impl Programs,
        hook: Hook,
        pins: &Pins,
        links: &[Link],
    ) -> Vec<AttachError> {
        if !hook.is_xdp() && self.tc == Mechanism::Netlink {
            return self.sync_filters(programs, hook, links);
        }
        let wanted: BTreeSet<u32> = links.iter().map(|l| l.ifindex).collect();

        // Pins of interfaces that are gone or no longer uplinks: removing the pin (the last
        // reference) detaches the link.
        match pins.pinned_links() {
            Ok(pinned) => {
                for (_, ifindex, path) in
                    pinned.into_iter().filter(|(h, i, _)| *h == hook && !wanted.contains(i))
                {
                    let _ = fs::remove_file(&path);
                    self.detached(hook, ifindex);
                }
            }
            Err(e) => warn!("{e}"),
        }
        self.attached.retain(|(h, ifindex), _| *h != hook || wanted.contains(ifindex));

        let mut errors = Vec::new();
        for link in links {
            let path = pins.link(hook, link.ifindex);
            let vanished = match self.attached.get(&(hook, link.ifindex)) {
                None => false,
                Some((_, what)) if Some(what.framing) != hook.framing_on(link) => {
                    info!(hook = hook.name(), iface = %link.name, "link type changed: attaching the program of its framing");
                    remove_stale_pin(&path);
                    false
                }
                Some(_) => match still_attached(&path, link) {
                    Ok(true) => continue,
                    Ok(false) => true,
                    Err(e) => {
                        // Cannot tell (bpffs unreadable?): leave it; the next pass looks again.
                        warn!(hook = hook.name(), iface = %link.name, "cannot check the link pinned at {}: {e}", path.display());
                        continue;
                    }
                },
            };
            let ensured = programs
                .for_link(hook, link)
                .map_err(|reason| attach_error(hook, link, reason))
                .and_then(|program| ensure(program, hook, &path, link));
            errors.extend(self.record(hook, link, vanished, ensured));
        }
        errors
    }

    /// [`Self::sync`] for TC hooks on kernels without TCX: guard's clsact filter on each of
    /// `links`, checked every pass (still there, still running this agent's program), and
    /// removed from the interfaces that no longer want it.
    fn sync_filters(
        &mut self,
        programs: &mut impl Programs,
        hook: Hook,
        links: &[Link],
    ) -> Vec<AttachError> {
        let wanted: BTreeSet<u32> = links.iter().map(|l| l.ifindex).collect();
        let mut stale: BTreeSet<u32> = self
            .attached
            .keys()
            .filter(|(h, i)| *h == hook && !wanted.contains(i))
            .map(|(_, i)| *i)
            .collect();
        if self.swept.insert(hook) {
            // The first pass also looks at every interface: an earlier agent's filters.
            let all = crate::host::interfaces::links().unwrap_or_default();
            stale.extend(all.iter().map(|l| l.ifindex).filter(|i| !wanted.contains(i)));
        }
        for ifindex in stale {
            match tc_filter::remove_ours(ifindex, hook, &hook.programs()) {
                Ok(removed) if removed || self.attached.contains_key(&(hook, ifindex)) => {
                    self.detached(hook, ifindex);
                }
                Ok(_) => {}
                Err(e) => warn!(hook = hook.name(), ifindex, "cannot remove guard's filter: {e}"),
            }
        }

        let mut errors = Vec::new();
        for link in links {
            let program = match programs.for_link(hook, link) {
                Ok(program) => program,
                Err(reason) => {
                    errors.push(attach_error(hook, link, reason));
                    continue;
                }
            };
            let vanished = self.attached.contains_key(&(hook, link.ifindex));
            if vanished {
                match (tc_filter::in_slot(link.ifindex, hook), program.program_id()) {
                    (Ok(Some(filter)), Ok(id)) if filter.program_id == id => continue,
                    (Ok(_), _) => {}
                    (Err(e), _) => {
                        warn!(hook = hook.name(), iface = %link.name, "cannot list the filters: {e}");
                        continue;
                    }
                }
            }
            let attached = program
                .attach_filter(hook, link)
                .map(|replaced| (Mode::Netlink, replaced))
                .map_err(|reason| attach_error(hook, link, reason));
            errors.extend(self.record(hook, link, vanished, attached));
        }
        errors
    }

    /// Takes note of one attach: logs it, remembers it, or hands back its error.
    fn record(
        &mut self,
        hook: Hook,
        link: &Link,
        vanished: bool,
        attached: Result<(Mode, bool), AttachError>,
    ) -> Option<AttachError> {
        self.attached.remove(&(hook, link.ifindex));
        let what = match attached {
            Ok((mode, adopted)) => Attached {
                mode,
                framing: hook.framing_on(link).unwrap_or(Framing::Ethernet),
                adopted,
            },
            Err(_) if gone(link) => {
                // Listed, then gone before the attach (a device moved into a container's
                // namespace, or deleted): nothing left here to guard.
                debug!(hook = hook.name(), iface = %link.name, "left before it could be attached");
                return None;
            }
            Err(e) => {
                if vanished {
                    warn!(hook = hook.name(), iface = %link.name, "{} on {} vanished (pin removed, link detached or filter deleted) and cannot be re-attached: {e}", hook.name(), link.name);
                }
                return Some(e);
            }
        };
        if vanished {
            warn!(hook = hook.name(), iface = %link.name, ifindex = link.ifindex, mode = what.label().as_str(), "{} on {} vanished (pin removed, link detached or filter deleted): re-attached", hook.name(), link.name);
        } else {
            info!(hook = hook.name(), iface = %link.name, ifindex = link.ifindex, mode = what.label().as_str(), adopted = what.adopted, "protecting interface");
        }
        self.attached.insert((hook, link.ifindex), (link.name.clone(), what));
        None
    }

    fn detached(&mut self, hook: Hook, ifindex: u32) {
        // A link an earlier agent pinned is not in `attached`: the interface list names it.
        let name = self.attached.remove(&(hook, ifindex)).map(|(n, _)| n).or_else(|| {
            let links = crate::host::interfaces::links().unwrap_or_default();
            links.into_iter().find(|l| l.ifindex == ifindex).map(|l| l.name)
        });
        let why = hook.class().left();
        info!(
            hook = hook.name(),
            ifindex,
            iface = name.as_deref().unwrap_or("(gone)"),
            "detached: {why}"
        );
    }
}

/// Why the kernel refused native XDP on `link`: aya's error with its whole cause chain (the
/// errno is in the source, not in aya's message), and what that errno means for an XDP
/// attach. The kernel's own words go only to a tracepoint (`xdp:bpf_xdp_link_attach_failed`),
/// so they are restated here from net/core/dev.c.
fn native_refusal(error: &(dyn std::error::Error + 'static), link: &Link) -> String {
    let mut text = error.to_string();
    let mut errno = None;
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        errno = errno.or_else(|| e.downcast_ref::<std::io::Error>()?.raw_os_error());
        source = e.source();
    }
    match errno.and_then(|n| xdp_errno_meaning(n, link.master.as_deref())) {
        Some(meaning) => format!("{text}; {meaning}"),
        None => text,
    }
}

/// What an errno from an XDP link attach means (dev_xdp_attach in net/core/dev.c).
fn xdp_errno_meaning(errno: i32, master: Option<&str>) -> Option<String> {
    Some(match errno {
        libc::EEXIST => {
            let upper = master.map_or(String::new(), |m| format!(" ({m} is its master)"));
            format!(
                "the kernel says \"Cannot attach when an upper device already has a program\"{upper} \
                 or \"Native and generic XDP can't be active at the same time\""
            )
        }
        libc::EBUSY => "the kernel says \"Can't replace active BPF XDP link\"".into(),
        libc::EOPNOTSUPP => {
            "the kernel says \"Underlying driver does not support XDP in native mode\"".into()
        }
        _ => return None,
    })
}

fn attach_error(hook: Hook, link: &Link, reason: String) -> AttachError {
    AttachError::Attach { hook: hook.name(), iface: link.name.clone(), reason }
}

/// Whether the link pinned at `path` is still there and attached to `link`. A link that is
/// detached (or attached elsewhere) loses its pin here, so a fresh one can take its place.
fn still_attached(path: &Path, link: &Link) -> std::io::Result<bool> {
    match pinned_link_state(path)? {
        PinnedLinkState::Attached { ifindex } if ifindex == link.ifindex => Ok(true),
        PinnedLinkState::Missing => Ok(false),
        PinnedLinkState::Attached { .. } | PinnedLinkState::Detached => {
            remove_stale_pin(path);
            Ok(false)
        }
    }
}

fn remove_stale_pin(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing the stale pin {}: {e}", path.display());
    }
}

/// Adopts the link pinned at `path`, or attaches afresh and pins the new link there; returns
/// how it runs and whether it was adopted.
fn ensure(
    program: &mut dyn Hookable,
    hook: Hook,
    path: &Path,
    link: &Link,
) -> Result<(Mode, bool), AttachError> {
    let hook_name = hook.name();
    if path.exists() {
        // A pinned link whose interface was replaced, or that someone detached, cannot take a
        // program: start over on this interface.
        let adopted = match pinned_link_state(path) {
            Ok(PinnedLinkState::Attached { ifindex }) if ifindex == link.ifindex => {
                PinnedLink::from_pin(path)
                    .map_err(|e| e.to_string())
                    .and_then(|pinned| program.adopt(FdLink::from(pinned), link))
            }
            Ok(state) => Err(format!("the link is {state:?}")),
            Err(e) => Err(e.to_string()),
        };
        match adopted {
            Ok(mode) => return Ok((mode, true)),
            Err(e) => {
                warn!(hook = hook_name, iface = %link.name, "cannot take over {}: {e}; attaching afresh", path.display());
                remove_stale_pin(path);
            }
        }
    }
    let (fd_link, mode) =
        program.attach_new(hook, link).map_err(|reason| attach_error(hook, link, reason))?;
    fd_link.pin(path).map_err(|e| AttachError::Pin {
        hook: hook_name,
        iface: link.name.clone(),
        reason: e.to_string(),
    })?;
    Ok((mode, false))
}

/// Whether `link` is no longer in the agent's namespace (by index and name: an index can be
/// reused). A dump that fails says nothing is gone: the error stands.
fn gone(link: &Link) -> bool {
    crate::host::interfaces::links()
        .is_ok_and(|links| !links.iter().any(|l| l.ifindex == link.ifindex && l.name == link.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// aya's shape: the call in the message, the errno only in the source.
    #[derive(Debug, thiserror::Error)]
    #[error("`bpf_link_create` failed")]
    struct Syscall(#[source] std::io::Error);

    fn port_of(master: Option<&str>) -> Link {
        Link {
            name: "veth1".into(),
            ifindex: 7,
            master: master.map(String::from),
            is_veth: true,
            is_bridge: false,
            link_type: 1,
        }
    }

    #[test]
    fn a_native_refusal_carries_the_errno_and_what_the_kernel_meant() {
        let error = Syscall(std::io::Error::from_raw_os_error(libc::EEXIST));
        let text = native_refusal(&error, &port_of(Some("podman0")));
        assert!(
            text.starts_with("`bpf_link_create` failed: File exists (os error 17); "),
            "{text}"
        );
        assert!(
            text.contains("upper device already has a program\" (podman0 is its master)"),
            "{text}"
        );
        let error = Syscall(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        let text = native_refusal(&error, &port_of(None));
        assert!(text.contains("does not support XDP in native mode"), "{text}");
        // An errno without a known meaning still shows itself.
        let error = Syscall(std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            native_refusal(&error, &port_of(None)),
            "`bpf_link_create` failed: Operation not permitted (os error 1)"
        );
    }
}
