//! XDP links on the uplinks: attach (native first, generic where the driver has none), pin,
//! adopt the links a previous agent pinned (atomic program swap, no gap), and detach from
//! interfaces that are no longer uplinks.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::PathBuf,
};

use aya::programs::{
    ProgramError, Xdp,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpMode},
};
use tracing::{info, warn};

use crate::{interfaces::Link, pins::Pins};

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the driver, before an skb exists: the fast path.
    Native,
    /// Generic (skb) XDP, for drivers without native support.
    Generic,
    /// Taken over from the link a previous agent pinned, in whatever mode it was attached.
    Adopted,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
            Mode::Adopted => "adopted",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching XDP to {iface} failed in native and generic mode: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("pinning the XDP link of {iface} at {path}: {reason}")]
    Pin {
        iface: String,
        path: PathBuf,
        reason: String,
    },
    #[error("taking over the pinned XDP link {path}: {reason}")]
    Adopt { path: PathBuf, reason: String },
}

/// The interfaces this agent has put its program on, by index.
#[derive(Debug, Default)]
pub struct Attachments {
    attached: BTreeMap<u32, (String, Mode)>,
}

impl Attachments {
    pub fn modes(&self) -> impl Iterator<Item = (&str, Mode)> {
        self.attached
            .values()
            .map(|(name, mode)| (name.as_str(), *mode))
    }

    /// Makes the set of interfaces running `program` equal to `uplinks`. Errors are per
    /// interface: one that fails does not stop the others.
    pub fn sync(&mut self, program: &mut Xdp, pins: &Pins, uplinks: &[Link]) -> Vec<AttachError> {
        let mut errors = Vec::new();
        let wanted: BTreeSet<u32> = uplinks.iter().map(|l| l.ifindex).collect();

        // Pins of interfaces that are gone or no longer uplinks: removing the pin (and our fd)
        // detaches the link.
        match pins.pinned_links() {
            Ok(pinned) => {
                for (ifindex, path) in pinned {
                    if !wanted.contains(&ifindex) {
                        let name = self.attached.remove(&ifindex).map(|(n, _)| n);
                        let _ = fs::remove_file(&path);
                        info!(
                            ifindex,
                            iface = name.as_deref().unwrap_or("?"),
                            "detached XDP: no longer an uplink"
                        );
                    }
                }
            }
            Err(e) => warn!("{e}"),
        }
        self.attached.retain(|ifindex, _| wanted.contains(ifindex));

        for link in uplinks {
            if self.attached.contains_key(&link.ifindex) {
                continue;
            }
            let path = pins.xdp_link(link.ifindex);
            let result = if path.exists() {
                adopt(program, &path).or_else(|e| {
                    // A stale pin (its interface was replaced): start over on this interface.
                    warn!(iface = %link.name, "{e}; attaching afresh");
                    let _ = fs::remove_file(&path);
                    attach(program, link, &path)
                })
            } else {
                attach(program, link, &path)
            };
            match result {
                Ok(mode) => {
                    info!(iface = %link.name, ifindex = link.ifindex, mode = mode.name(), "XDP protecting interface");
                    self.attached
                        .insert(link.ifindex, (link.name.clone(), mode));
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

/// Swaps `program` into a pinned link atomically: the link (and its id) stays, so there is no
/// moment without a filter.
fn adopt(program: &mut Xdp, path: &PathBuf) -> Result<Mode, AttachError> {
    let adopt_err = |reason: String| AttachError::Adopt {
        path: path.clone(),
        reason,
    };
    let pinned = PinnedLink::from_pin(path).map_err(|e| adopt_err(e.to_string()))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| adopt_err(e.to_string()))?;
    let id = program
        .attach_to_link(link)
        .map_err(|e| adopt_err(e.to_string()))?;
    // The pin keeps the link; the program need not manage it (dropping it only closes our fd).
    drop(program.take_link(id));
    Ok(Mode::Adopted)
}

fn attach(program: &mut Xdp, link: &Link, path: &PathBuf) -> Result<Mode, AttachError> {
    let (id, mode) = match program.attach_to_if_index(link.ifindex, XdpMode::Driver) {
        Ok(id) => (id, Mode::Native),
        Err(native) => {
            warn!(iface = %link.name, "native XDP unavailable ({native}); using generic mode");
            let id = program
                .attach_to_if_index(link.ifindex, XdpMode::Skb)
                .map_err(|source| AttachError::Attach {
                    iface: link.name.clone(),
                    source,
                })?;
            (id, Mode::Generic)
        }
    };
    let pin_err = |reason: String| AttachError::Pin {
        iface: link.name.clone(),
        path: path.clone(),
        reason,
    };
    let xdp_link = program.take_link(id).map_err(|e| pin_err(e.to_string()))?;
    let fd_link = FdLink::try_from(xdp_link).map_err(|e| pin_err(e.to_string()))?;
    fd_link.pin(path).map_err(|e| pin_err(e.to_string()))?;
    Ok(mode)
}
