//! `guard unload`: remove every link, program, map and pin under the pin directory, leaving
//! the host as it was before guard.

use std::{fs, io, path::Path};

use guard_common::maps as names;

use crate::kernel::pins::{PinError, Pins};

#[derive(Debug, PartialEq, Eq)]
pub enum Unloaded {
    /// Nothing was pinned there: a no-op.
    NothingThere,
    Removed {
        links: usize,
        maps: usize,
    },
}

/// Whether `unload` may remove the pins of a running agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Running {
    /// Refuse: removing them would open everything behind the agent's back.
    Refuse,
    /// Remove them anyway (`--force`).
    Override,
}

#[derive(Debug, thiserror::Error)]
pub enum UnloadError {
    #[error(
        "an agent is running on {root}: stop it first (unloading under it leaves every container open), or `guard unload --force`"
    )]
    Running { root: std::path::PathBuf },
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// [`unload`], unless an agent owns the pins and `running` says to refuse.
pub fn unload_checked(pins: &Pins, running: Running) -> Result<Unloaded, UnloadError> {
    if !pins.exists() {
        // No agent can own what is not there; filters may still be (a pin directory removed).
        return Ok(unload(pins)?);
    }
    // Held while removing, so no agent starts on the pins half-way.
    let _owner = match pins.claim() {
        Ok(owner) => Some(owner),
        Err(PinError::Owned { .. }) if running == Running::Override => None,
        Err(PinError::Owned { root }) => return Err(UnloadError::Running { root }),
        Err(e) => return Err(e.into()),
    };
    Ok(unload(pins)?)
}

/// Removes everything pinned under `pins`, whoever owns it, and guard's clsact filters.
pub fn unload(pins: &Pins) -> io::Result<Unloaded> {
    let filters = remove_filters()?;
    if !pins.exists() {
        return Ok(if filters == 0 {
            Unloaded::NothingThere
        } else {
            Unloaded::Removed { links: filters, maps: 0 }
        });
    }
    // Links first: removing a link's last reference detaches the program from its interface.
    let links = pins.pinned_links().map_err(io::Error::other)?;
    for (_, _, path) in &links {
        remove_file(path)?;
    }
    for (hook, framing) in crate::kernel::hook::Hook::PROGRAMS {
        remove_file(&pins.program(hook, framing))?;
    }
    for framing in crate::host::interfaces::Framing::ALL {
        remove_file(&pins.explain_program(framing))?;
    }
    // Every layout's maps: this build's and any an agent of another version left.
    let mut maps = 0;
    let layouts: Vec<std::path::PathBuf> = fs::read_dir(pins.layouts_dir())
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for layout in &layouts {
        for name in names::ALL {
            if remove_file(&layout.join(name))? {
                maps += 1;
            }
        }
    }
    for dir in layouts.iter().cloned().chain([
        pins.links_dir(),
        pins.layouts_dir(),
        pins.root().to_path_buf(),
    ]) {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{} still holds pins guard did not create: {e}", dir.display()),
                ));
            }
        }
    }
    Ok(Unloaded::Removed { links: links.len() + filters, maps })
}

/// Removes guard's filter from every interface and TC hook (kernels without TCX; elsewhere
/// there is none): only guard's slot, and only with one of guard's programs in it.
fn remove_filters() -> io::Result<usize> {
    let names = crate::kernel::hook::tc_program_names();
    let mut removed = 0;
    for link in crate::host::interfaces::links()? {
        removed += crate::kernel::tc_filter::remove_all_ours(link.ifindex, &names)?;
    }
    Ok(removed)
}

fn remove_file(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io::Error::new(e.kind(), format!("removing {}: {e}", path.display()))),
    }
}
