//! Where everything lives on bpffs. One root directory (default /sys/fs/bpf/guard):
//!
//! ```text
//! <root>/maps/<layout>/GUARD_*           the maps (pinned by name), per map layout
//! <root>/<hook>_program                  each program currently attached (see [`Hook`])
//! <root>/links/xdp-<ifindex>             one link per uplink and hook: XDP ingress,
//! <root>/links/tc-egress-<ifindex>         TCX egress,
//! <root>/links/bridge-gate-<ifindex>     and per Docker bridge: TCX egress (the gate),
//! <root>/links/bridge-ingress-<ifindex>    TCX ingress
//! ```
//!
//! The pins are what keeps protection up when no agent runs; a new agent adopts them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/guard";

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// XDP on an uplink's ingress: the filter.
    Xdp,
    /// TCX on an uplink's egress: flow memory for the host's masqueraded flows.
    TcEgress,
    /// TCX on a Docker bridge's egress: the gate after NAT.
    BridgeGate,
    /// TCX on a Docker bridge's ingress: flow memory for the flows containers start.
    BridgeIngress,
}

impl Hook {
    pub const ALL: [Hook; 4] = [Hook::Xdp, Hook::TcEgress, Hook::BridgeGate, Hook::BridgeIngress];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcEgress => "tc-egress",
            Hook::BridgeGate => "bridge-gate",
            Hook::BridgeIngress => "bridge-ingress",
        }
    }

    fn link_prefix(self) -> String {
        format!("{}-", self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{dir} is not on a bpffs: mount one with `mount -t bpf bpf {dir}` (or choose --pin-dir under one)"
    )]
    NotBpffs { dir: PathBuf },
    #[error("cannot create pin directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read pin directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
}

#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Pins { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    /// The maps of this build's layout (see [`guard_common::maps::LAYOUT`]).
    pub fn maps_dir(&self) -> PathBuf {
        self.layouts_dir().join(format!("{:08x}", guard_common::maps::LAYOUT))
    }

    /// Where every layout's map directory lives.
    pub fn layouts_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Map directories of other layouts (left by an agent of another version).
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        let current = self.maps_dir();
        fs::read_dir(self.layouts_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir() && *p != current)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn program(&self, hook: Hook) -> PathBuf {
        self.root.join(format!("{}_program", hook.name().replace('-', "_")))
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, hook: Hook, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{}{ifindex}", hook.link_prefix()))
    }

    /// Checks that the root's nearest existing ancestor is on bpffs, then creates the layout.
    pub fn create(&self) -> Result<(), PinError> {
        let existing = self.root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !is_bpffs(existing) {
            return Err(PinError::NotBpffs { dir: existing.to_path_buf() });
        }
        for dir in [self.root.clone(), self.layouts_dir(), self.maps_dir(), self.links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| PinError::CreateDir { path: dir, source })?;
        }
        Ok(())
    }

    /// The links pinned under this root: hook, interface index, pin.
    pub fn pinned_links(&self) -> Result<Vec<(Hook, u32, PathBuf)>, PinError> {
        let dir = self.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(PinError::ReadDir { path: dir, source }),
        };
        let mut links = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            for hook in Hook::ALL {
                let ifindex = name.strip_prefix(&hook.link_prefix()).and_then(|i| i.parse().ok());
                if let Some(ifindex) = ifindex {
                    links.push((hook, ifindex, entry.path()));
                }
            }
        }
        links.sort();
        Ok(links)
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_under_one_root() {
        let pins = Pins::new("/sys/fs/bpf/guard");
        let layout = format!("{:08x}", guard_common::maps::LAYOUT);
        assert_eq!(
            pins.map("GUARD_ADDRS"),
            Path::new("/sys/fs/bpf/guard/maps").join(layout).join("GUARD_ADDRS")
        );
        assert_eq!(pins.link(Hook::Xdp, 7), Path::new("/sys/fs/bpf/guard/links/xdp-7"));
        assert_eq!(pins.link(Hook::TcEgress, 7), Path::new("/sys/fs/bpf/guard/links/tc-egress-7"));
        assert!(pins.program(Hook::TcEgress).starts_with(pins.root()));
    }

    #[test]
    fn refuses_a_directory_that_is_not_bpffs() {
        let err = Pins::new("/tmp/guard-not-bpffs/x").create().unwrap_err();
        assert!(err.to_string().contains("mount -t bpf bpf"), "{err}");
    }
}
