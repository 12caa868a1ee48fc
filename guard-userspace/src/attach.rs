//! Programs on interfaces: on the uplinks XDP on ingress (native first, generic where the
//! driver has none) and TCX on egress; on Docker's bridges TCX on both sides. Every link is
//! pinned; the links a previous agent pinned are adopted with
//! an atomic program swap (the link and its id stay, so there is no moment without a filter);
//! links on interfaces that are gone or no longer uplinks are removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::{XdpLink, XdpMode},
};
use tracing::{info, warn};

use crate::{
    interfaces::Link,
    pins::{Hook, Pins},
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
    /// Taken over from the link a previous agent pinned, in whatever mode it was attached.
    Adopted,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
            Mode::Tcx => "tcx",
            Mode::Adopted => "adopted",
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

/// A program that can be put on an interface at a hook, or swapped into a pinned link.
pub trait Hookable {
    /// Attaches to `link` at `hook` and returns the link as an fd, to be pinned.
    fn attach_new(&mut self, hook: Hook, link: &Link) -> Result<(FdLink, Mode), String>;
    /// Atomically replaces the program in a pinned link.
    fn adopt(&mut self, pinned: FdLink) -> Result<(), String>;
}

impl Hookable for Xdp {
    fn attach_new(&mut self, _: Hook, link: &Link) -> Result<(FdLink, Mode), String> {
        let (id, mode) = match self.attach_to_if_index(link.ifindex, XdpMode::Driver) {
            Ok(id) => (id, Mode::Native),
            Err(native) => {
                warn!(iface = %link.name, "native XDP unavailable ({native}); using generic mode");
                let id = self
                    .attach_to_if_index(link.ifindex, XdpMode::Skb)
                    .map_err(|e| format!("native and generic mode: {e}"))?;
                (id, Mode::Generic)
            }
        };
        let fd_link = FdLink::try_from(self.take_link(id).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        Ok((fd_link, mode))
    }

    fn adopt(&mut self, pinned: FdLink) -> Result<(), String> {
        let link = XdpLink::try_from(pinned).map_err(|e| e.to_string())?;
        let id = self.attach_to_link(link).map_err(|e| e.to_string())?;
        // The pin keeps the link; dropping our handle only closes an fd.
        drop(self.take_link(id));
        Ok(())
    }
}

impl Hookable for SchedClassifier {
    fn attach_new(&mut self, hook: Hook, link: &Link) -> Result<(FdLink, Mode), String> {
        let direction = match hook {
            Hook::BridgeIngress => TcAttachType::Ingress,
            _ => TcAttachType::Egress,
        };
        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
        let id =
            self.attach_with_options(&link.name, direction, options).map_err(|e| e.to_string())?;
        let fd_link = FdLink::try_from(self.take_link(id).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        Ok((fd_link, Mode::Tcx))
    }

    fn adopt(&mut self, pinned: FdLink) -> Result<(), String> {
        let link = SchedClassifierLink::try_from(pinned).map_err(|e| e.to_string())?;
        let id = self.attach_to_link(link).map_err(|e| e.to_string())?;
        drop(self.take_link(id));
        Ok(())
    }
}

/// The (hook, interface) pairs this agent has put its programs on.
#[derive(Debug, Default)]
pub struct Attachments {
    attached: BTreeMap<(Hook, u32), (String, Mode)>,
}

impl Attachments {
    /// (hook, interface, mode) of every attachment.
    pub fn modes(&self) -> impl Iterator<Item = (Hook, &str, Mode)> {
        self.attached.iter().map(|((hook, _), (name, mode))| (*hook, name.as_str(), *mode))
    }

    /// Makes the set of interfaces running `program` at `hook` equal to `links`. Errors are
    /// per interface: one that fails does not stop the others.
    pub fn sync(
        &mut self,
        program: &mut impl Hookable,
        hook: Hook,
        pins: &Pins,
        links: &[Link],
    ) -> Vec<AttachError> {
        let wanted: BTreeSet<u32> = links.iter().map(|l| l.ifindex).collect();

        // Pins of interfaces that are gone or no longer uplinks: removing the pin (the last
        // reference) detaches the link.
        match pins.pinned_links() {
            Ok(pinned) => {
                for (_, ifindex, path) in
                    pinned.into_iter().filter(|(h, i, _)| *h == hook && !wanted.contains(i))
                {
                    let name = self.attached.remove(&(hook, ifindex)).map(|(n, _)| n);
                    let _ = fs::remove_file(&path);
                    info!(
                        hook = hook.name(),
                        ifindex,
                        iface = name.as_deref().unwrap_or("?"),
                        "detached: no longer an uplink"
                    );
                }
            }
            Err(e) => warn!("{e}"),
        }
        self.attached.retain(|(h, ifindex), _| *h != hook || wanted.contains(ifindex));

        let mut errors = Vec::new();
        for link in links {
            if self.attached.contains_key(&(hook, link.ifindex)) {
                continue;
            }
            match ensure(program, hook, &pins.link(hook, link.ifindex), link) {
                Ok(mode) => {
                    info!(hook = hook.name(), iface = %link.name, ifindex = link.ifindex, mode = mode.name(), "protecting interface");
                    self.attached.insert((hook, link.ifindex), (link.name.clone(), mode));
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

/// Adopts the link pinned at `path`, or attaches afresh and pins the new link there.
fn ensure(
    program: &mut impl Hookable,
    hook: Hook,
    path: &Path,
    link: &Link,
) -> Result<Mode, AttachError> {
    let hook_name = hook.name();
    if path.exists() {
        let adopted = PinnedLink::from_pin(path)
            .map_err(|e| e.to_string())
            .and_then(|pinned| program.adopt(FdLink::from(pinned)));
        match adopted {
            Ok(()) => return Ok(Mode::Adopted),
            // A stale pin (its interface was replaced): start over on this interface.
            Err(e) => {
                warn!(hook = hook_name, iface = %link.name, "cannot take over {}: {e}; attaching afresh", path.display());
                let _ = fs::remove_file(path);
            }
        }
    }
    let (fd_link, mode) = program.attach_new(hook, link).map_err(|reason| AttachError::Attach {
        hook: hook_name,
        iface: link.name.clone(),
        reason,
    })?;
    fd_link.pin(path).map_err(|e| AttachError::Pin {
        hook: hook_name,
        iface: link.name.clone(),
        reason: e.to_string(),
    })?;
    Ok(mode)
}
