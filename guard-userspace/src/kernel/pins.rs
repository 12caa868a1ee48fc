//! Where everything lives on bpffs. One root directory (default /sys/fs/bpf/guard):
//!
//! ```text
//! <root>/maps/<layout>/GUARD_*           the maps (pinned by name), per map layout
//! <root>/<hook>_program                  each program currently attached (see [`Hook`])
//! <root>/xdp_ip_program                  and XDP's for L3 uplinks
//! <root>/links/xdp-<ifindex>             one link per uplink and hook: XDP ingress,
//! <root>/links/tc-egress-<ifindex>         TCX egress,
//! <root>/links/bridge-gate-<ifindex>     and per Docker bridge: TCX egress (the gate),
//! <root>/links/bridge-ingress-<ifindex>    TCX ingress
//! ```
//!
//! The pins are what keeps protection up when no agent runs; a new agent adopts them.
//!
//! bpffs is mounted mode 1777, so anyone on the host can create `/sys/fs/bpf/guard` before
//! the agent first runs and keep write access to it: plant maps the agent would adopt (with
//! openings in them), or remove links. So the agent creates its directories mode 0700 and
//! refuses any that someone else owns or can write (see [`Pins::create`]).

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/guard";

/// Each hook's links are pinned under its name; the tests and older callers ask for it here.
pub use crate::kernel::hook::Hook;

/// A hook's links are pinned as `<name>-<ifindex>`.
fn link_prefix(hook: Hook) -> String {
    format!("{}-", hook.name())
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
    #[error(
        "pin directory {path} {problem}: whoever can write there can plant maps or remove links; remove it (rm -r {path}) or choose another --pin-dir"
    )]
    Untrusted { path: PathBuf, problem: Untrusted },
    #[error(
        "{path}, on the way to the pin directory, {problem}: whoever can write there can replace the pin directory; choose a --pin-dir whose parents only root can write"
    )]
    UntrustedParent { path: PathBuf, problem: Untrusted },
    #[error(
        "another guard agent is running on {root} (one agent per pin directory): stop it first, or choose another --pin-dir"
    )]
    Owned { root: PathBuf },
    #[error("cannot lock pin directory {root}: {source}")]
    Lock { root: PathBuf, source: io::Error },
}

/// The claim of one agent on a pin directory, held while it lives: an flock on the directory
/// itself, so it holds across containers sharing the bpffs and is released by the kernel when
/// the agent dies, however it dies.
#[derive(Debug)]
pub struct Owner {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Why a directory on the way to, or under, the pin root is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untrusted {
    Symlink,
    NotADirectory,
    Owner { uid: u32 },
    Writable { mode: u32 },
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Untrusted::Symlink => write!(f, "is a symbolic link"),
            Untrusted::NotADirectory => write!(f, "is not a directory"),
            Untrusted::Owner { uid } => write!(f, "is owned by uid {uid}, not root"),
            Untrusted::Writable { mode } => {
                write!(f, "is writable by group or others (mode {mode:04o})")
            }
        }
    }
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

    /// The pinned program of `hook` for links of `framing` (Ethernet's keeps the name it always
    /// had), so tools such as `guard explain` can run what an interface runs.
    pub fn program(&self, hook: Hook, framing: crate::host::interfaces::Framing) -> PathBuf {
        let suffix = match framing {
            crate::host::interfaces::Framing::Ethernet => "",
            crate::host::interfaces::Framing::Ip => "_ip",
        };
        self.root.join(format!("{}{suffix}_program", hook.name().replace('-', "_")))
    }

    /// The pinned explain program for links of `framing` (see [`crate::kernel::loader`]).
    pub fn explain_program(&self, framing: crate::host::interfaces::Framing) -> PathBuf {
        match framing {
            crate::host::interfaces::Framing::Ethernet => self.root.join("explain_program"),
            crate::host::interfaces::Framing::Ip => self.root.join("explain_ip_program"),
        }
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, hook: Hook, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{}{ifindex}", link_prefix(hook)))
    }

    /// Checks that the root's nearest existing ancestor is on bpffs and that only root can
    /// replace the root, then creates the layout (mode 0700) and checks every directory of it,
    /// new or found: each must be root's and writable by nobody else.
    pub fn create(&self) -> Result<(), PinError> {
        let existing = self.root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !is_bpffs(existing) {
            return Err(PinError::NotBpffs { dir: existing.to_path_buf() });
        }
        for parent in self.root.ancestors().skip(1) {
            check_parent(parent)?;
        }
        // Parents before children, each created alone: create_dir_all would follow a planted
        // symlink in the middle. A directory someone else made first is caught by the check.
        for dir in [self.root.clone(), self.layouts_dir(), self.maps_dir(), self.links_dir()] {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(PinError::CreateDir { path: dir, source }),
            }
            check_dir(&dir)?;
        }
        // Other layouts' map directories are read and emptied by the agent too.
        let layouts = self.layouts_dir();
        let entries = fs::read_dir(&layouts)
            .map_err(|source| PinError::ReadDir { path: layouts.clone(), source })?;
        for entry in entries.flatten() {
            check_dir(&entry.path())?;
        }
        Ok(())
    }

    /// Claims the (existing) pin root for this process; refused while another holds it.
    pub fn claim(&self) -> Result<Owner, PinError> {
        let lock_err = |source| PinError::Lock { root: self.root.clone(), source };
        let dir = fs::File::open(&self.root).map_err(lock_err)?;
        match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Owner { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                Err(PinError::Owned { root: self.root.clone() })
            }
            Err((_, errno)) => Err(lock_err(io::Error::from(errno))),
        }
    }

    /// The interfaces that have a link pinned at `hook` (for [`Hook::Xdp`]: those guarded).
    pub fn pinned_ifindexes(&self, hook: Hook) -> Result<Vec<u32>, PinError> {
        let links = self.pinned_links()?;
        Ok(links
            .into_iter()
            .filter(|(h, _, _)| *h == hook)
            .map(|(_, ifindex, _)| ifindex)
            .collect())
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
                let ifindex = name.strip_prefix(&link_prefix(hook)).and_then(|i| i.parse().ok());
                if let Some(ifindex) = ifindex {
                    links.push((hook, ifindex, entry.path()));
                }
            }
        }
        links.sort();
        Ok(links)
    }
}

/// The owners a pin directory may have: root, or the agent's own user (an agent run without
/// root, with capabilities only, owns what it creates).
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// A directory of the layout, looked at with lstat so a symlink is seen as one.
fn check_dir(path: &Path) -> Result<(), PinError> {
    let meta = fs::symlink_metadata(path)
        .map_err(|source| PinError::ReadDir { path: path.to_path_buf(), source })?;
    match problem_with(&meta, false) {
        Some(problem) => Err(PinError::Untrusted { path: path.to_path_buf(), problem }),
        None => Ok(()),
    }
}

/// A directory above the root (if it exists yet): whoever can write it can rename the root
/// away and put their own in its place.
fn check_parent(path: &Path) -> Result<(), PinError> {
    let Ok(meta) = fs::metadata(path) else { return Ok(()) };
    match problem_with(&meta, true) {
        Some(problem) => Err(PinError::UntrustedParent { path: path.to_path_buf(), problem }),
        None => Ok(()),
    }
}

/// What makes a directory untrusted. Above the root a shared directory is fine when the sticky
/// bit keeps others from renaming what is not theirs (bpffs itself: mode 1777, root's).
fn problem_with(meta: &fs::Metadata, above_root: bool) -> Option<Untrusted> {
    const STICKY: u32 = 0o1000;
    let shared_but_sticky = above_root && meta.mode() & STICKY != 0;
    if meta.file_type().is_symlink() {
        Some(Untrusted::Symlink)
    } else if !meta.is_dir() {
        Some(Untrusted::NotADirectory)
    } else if !trusted_owner(meta.uid()) {
        Some(Untrusted::Owner { uid: meta.uid() })
    } else if meta.mode() & 0o022 != 0 && !shared_but_sticky {
        Some(Untrusted::Writable { mode: meta.mode() & 0o7777 })
    } else {
        None
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
        use crate::host::interfaces::Framing;
        assert!(pins.program(Hook::TcEgress, Framing::Ethernet).starts_with(pins.root()));
        assert_eq!(pins.program(Hook::Xdp, Framing::Ip), pins.root().join("xdp_ip_program"));
    }

    /// A scratch directory on bpffs, removed with everything in it when dropped.
    struct BpffsScratch(PathBuf);

    impl BpffsScratch {
        /// None when this run cannot use bpffs (not root, or no bpffs at /sys/fs/bpf): the unit
        /// tier needs no root, the check then runs in CI where it is root.
        fn new(name: &str) -> Option<Self> {
            if !nix::unistd::geteuid().is_root() || !is_bpffs(Path::new("/sys/fs/bpf")) {
                eprintln!("skipped: needs root and bpffs at /sys/fs/bpf");
                return None;
            }
            let dir =
                PathBuf::from(format!("/sys/fs/bpf/guard-unit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            Some(BpffsScratch(dir))
        }
    }

    impl Drop for BpffsScratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::chown(path, Some(uid), None)
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    }

    fn refusal(pins: &Pins) -> String {
        pins.create().expect_err("an untrusted pin directory must be refused").to_string()
    }

    #[test]
    fn creates_the_root_0700_and_refuses_directories_others_own_or_can_write() {
        let Some(scratch) = BpffsScratch::new("pins") else { return };
        let pins = Pins::new(scratch.0.join("guard"));
        pins.create().expect("a fresh pin root is created");
        let mode = fs::metadata(pins.root()).expect("root exists").mode() & 0o7777;
        assert_eq!(mode, 0o700, "the pin root's mode");
        pins.create().expect("our own pin root is accepted again");

        // Someone else's root: the attack (bpffs is 1777, anyone can pre-create it).
        chown(pins.root(), 65534);
        let err = refusal(&pins);
        let root = pins.root().display().to_string();
        assert!(
            err.contains("owned by uid 65534") && err.contains(&format!("rm -r {root}")),
            "{err}"
        );
        chown(pins.root(), 0);

        // A subdirectory that others can write.
        chmod(&pins.links_dir(), 0o777);
        let err = refusal(&pins);
        assert!(err.contains(&pins.links_dir().display().to_string()), "{err}");
        assert!(err.contains("writable by group or others (mode 0777)"), "{err}");
        chmod(&pins.links_dir(), 0o700);

        // Another layout's map directory owned by someone else.
        let other = pins.layouts_dir().join("0badf00d");
        fs::create_dir(&other).expect("create another layout");
        chown(&other, 1000);
        let err = refusal(&pins);
        assert!(err.contains("0badf00d") && err.contains("uid 1000"), "{err}");
        fs::remove_dir(&other).expect("remove the other layout");

        // A symlink in place of a subdirectory (lstat, not stat).
        fs::remove_dir(pins.links_dir()).expect("remove links/");
        std::os::unix::fs::symlink(&scratch.0, pins.links_dir()).expect("plant a symlink");
        let err = refusal(&pins);
        assert!(err.contains("is a symbolic link"), "{err}");
        fs::remove_file(pins.links_dir()).expect("remove the symlink");
        pins.create().expect("a repaired layout is accepted");
    }

    #[test]
    fn refuses_a_root_whose_parent_others_can_write() {
        let Some(scratch) = BpffsScratch::new("parent") else { return };
        let parent = scratch.0.join("shared");
        fs::create_dir(&parent).expect("create the parent");
        chmod(&parent, 0o777);
        let err = refusal(&Pins::new(parent.join("guard")));
        assert!(err.contains("on the way to the pin directory") && err.contains("0777"), "{err}");
        // With the sticky bit (as bpffs itself) nobody can rename our root away.
        chmod(&parent, 0o1777);
        Pins::new(parent.join("guard")).create().expect("a sticky parent is fine");
    }

    #[test]
    fn refuses_a_directory_that_is_not_bpffs() {
        let err = Pins::new("/tmp/guard-not-bpffs/x").create().unwrap_err();
        assert!(err.to_string().contains("mount -t bpf bpf"), "{err}");
    }
}
