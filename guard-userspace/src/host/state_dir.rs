//! What the agent last knew, on disk (`--state-dir`, default [`DEFAULT_STATE_DIR`]): Docker's
//! last snapshot and the last policy file that parsed.
//!
//! bpffs is memory: a reboot empties it, and the agent starts before Docker answers. With this
//! file it starts from the networks, containers and published ports it last saw, all closed
//! until it has synced with Docker again, rather than from nothing; and a policy file that
//! does not parse at start is replaced by the last one that did, not by the defaults.
//!
//! Written atomically (a temporary file, fsync, rename, fsync of the directory): a crash or a
//! power cut leaves the previous state or the new one, never half of either.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::policy::snapshot::Snapshot;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/container-guard";
const FILE: &str = "state.json";
/// Bumped when the file's meaning changes; a file of another version is ignored.
const VERSION: u32 = 1;

/// The state as saved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    version: u32,
    /// Docker's state at the last sync.
    pub snapshot: Snapshot,
    /// The text of the last policy file that parsed; None when there was no file.
    pub policy_text: Option<String>,
}

impl Saved {
    /// What is kept of `snapshot`: networks, containers' identities, names, addresses and
    /// published ports. Not their labels or images: before the first sync nothing is opened,
    /// so nothing reads them, and labels can hold secrets (credentials, password hashes).
    pub fn new(snapshot: &Snapshot, policy_text: Option<String>) -> Self {
        let mut snapshot = snapshot.clone();
        for container in &mut snapshot.containers {
            container.labels.clear();
            container.image.clear();
        }
        Saved { version: VERSION, snapshot, policy_text }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {dir}: {source} (pass --state-dir to use another)")]
    Create { dir: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a state file this guard can read ({source}); starting without it")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("cannot save the state to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "the state directory {dir} is not root's alone (owner uid {uid}, mode {mode:o}): not used; make it root's with mode 0700"
    )]
    NotPrivate { dir: PathBuf, uid: u32, mode: u32 },
}

#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Creates the directory (0700: it names every container and port) if it is missing, and
    /// checks it (see [`StateDir::check_private`]).
    pub fn create(&self) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StateError::Create { dir: self.dir.clone(), source })?;
        self.check_private()
    }

    /// Only its owner, this process's user (root), may write to the directory: what is in it
    /// decides what is closed at the next start, and which policy stands in for a broken one.
    fn check_private(&self) -> Result<(), StateError> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::symlink_metadata(&self.dir)
            .map_err(|source| StateError::Read { path: self.dir.clone(), source })?;
        let uid = meta.uid();
        let mode = meta.mode() & 0o7777;
        if !meta.is_dir() || uid != nix::unistd::geteuid().as_raw() || mode & 0o022 != 0 {
            return Err(StateError::NotPrivate { dir: self.dir.clone(), uid, mode });
        }
        Ok(())
    }

    /// The saved state; None when there is none (a first start), or it is of another version.
    pub fn load(&self) -> Result<Option<Saved>, StateError> {
        let Some(text) = self.read_file(FILE)? else { return Ok(None) };
        let path = self.path();
        let saved: Saved =
            serde_json::from_str(&text).map_err(|source| StateError::Corrupt { path, source })?;
        Ok((saved.version == VERSION).then_some(saved))
    }

    pub fn save(&self, saved: &Saved) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(saved)
            .map_err(|e| StateError::Write { path: self.path(), source: io::Error::other(e) })?;
        self.write_atomically(FILE, &bytes)
    }

    /// The contents of `name` in the directory, None when there is no such file.
    pub fn read_file(&self, name: &str) -> Result<Option<String>, StateError> {
        if !self.dir.exists() {
            return Ok(None);
        }
        self.check_private()?;
        let path = self.dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Replaces `name` in the directory with `bytes`, whole or not at all (a crash leaves the
    /// old file), creating the directory if it is missing.
    pub fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        self.create()?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let write = || -> io::Result<()> {
            // A fresh file, never one planted there (a symlink is not followed).
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| StateError::Write { path: path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::snapshot::{Container, Network, Published};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("guard-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saves_and_loads_what_it_saved_and_nothing_is_a_first_start() {
        let dir = scratch("saved");
        let state = StateDir::new(dir.join("nested"));
        state.create().unwrap();
        assert_eq!(state.load().unwrap(), None);
        let snapshot = Snapshot {
            networks: vec![Network {
                id: "n1".into(),
                name: "web".into(),
                bridge: Some("br-0123456789ab".into()),
                subnets: vec!["172.20.0.0/16".parse().unwrap()],
                gateways: vec!["172.20.0.1".parse().unwrap()],
            }],
            containers: vec![Container {
                id: "c".repeat(64),
                name: "db".into(),
                image: "postgres".into(),
                labels: [("guard.expose".to_string(), "5432".to_string())].into(),
                addresses: vec!["172.20.0.2".parse().unwrap()],
                published: vec![Published {
                    host_ip: "0.0.0.0".parse().unwrap(),
                    host_port: 15432,
                    container_port: 5432,
                    proto: crate::policy::Proto::Tcp,
                }],
            }],
            doors: Default::default(),
        };
        let saved = Saved::new(&snapshot, Some("mode = \"audit\"\n".into()));
        state.save(&saved).unwrap();
        let loaded = state.load().unwrap().expect("saved");
        assert_eq!(loaded, saved);
        let container = &loaded.snapshot.containers[0];
        assert!(container.labels.is_empty() && container.image.is_empty(), "{container:?}");
        assert_eq!(container.published, snapshot.containers[0].published);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_to_is_refused() {
        let dir = scratch("open");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let state = StateDir::new(&dir);
        for err in [state.create().unwrap_err(), state.load().unwrap_err()] {
            let err = err.to_string();
            assert!(err.contains("not root's alone") && err.contains("777"), "{err}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_file_is_an_error_that_says_which_file() {
        let dir = scratch("damaged");
        let state = StateDir::new(&dir);
        state.create().unwrap();
        fs::write(state.path(), "{\"version\": 1, \"snap").unwrap();
        let err = state.load().unwrap_err().to_string();
        assert!(err.contains("state.json") && err.contains("starting without it"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
