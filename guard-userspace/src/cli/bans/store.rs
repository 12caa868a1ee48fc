//! `guard ban`'s bans in the state directory (`bans.json`), the lock that orders them with
//! the agent's passes, and CrowdSec's bans as the agent last kept them (`crowdsec.json`).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    host::state_dir::{StateDir, StateError},
    policy::Cidr,
};

const FILE: &str = "bans.json";
/// CrowdSec's bans as last followed: what `status` compares the kernel with, and what a
/// restarted agent denies until the local API answers again.
const CROWDSEC_FILE: &str = "crowdsec.json";
const LOCK: &str = "bans.lock";

/// One `guard ban`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// An address or a prefix.
    pub source: Cidr,
    /// Seconds since the epoch when it ends; None: until `guard unban`.
    pub until: Option<u64>,
    pub reason: String,
    /// When it was made (seconds since the epoch).
    pub since: u64,
}

impl Ban {
    pub fn active(&self, now: u64) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path} is damaged ({source}): remove it to lose every `guard ban`, or fix it")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
}

/// The bans `guard ban` made, in the state directory.
pub struct BanStore {
    dir: StateDir,
    path: PathBuf,
}

/// Held from reading the bans to writing the maps (see the module's documentation).
pub struct BanLock {
    _file: nix::fcntl::Flock<fs::File>,
}

impl BanStore {
    pub fn new(state_dir: &Path) -> Self {
        BanStore { dir: StateDir::new(state_dir), path: state_dir.join(FILE) }
    }

    /// The ban lock, waiting for it as long as it takes (the commands: an operator waits).
    pub fn lock(&self) -> Result<BanLock, BanError> {
        self.lock_within(None)
    }

    /// The ban lock, waiting at most `patience` (the agent: a wedged command must not stall
    /// its passes); `None` waits as long as it takes.
    pub fn lock_within(&self, patience: Option<Duration>) -> Result<BanLock, BanError> {
        self.dir.create()?;
        let path = self.path.with_file_name(LOCK);
        let lock_err = |source| BanError::Lock { path: path.clone(), source };
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        let Some(patience) = patience else {
            let locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| lock_err(errno.into()))?;
            return Ok(BanLock { _file: locked });
        };
        let deadline = Instant::now() + patience;
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(locked) => return Ok(BanLock { _file: locked }),
                Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((_, errno)) => return Err(lock_err(errno.into())),
            }
        }
    }

    /// Every ban made, expired ones included (the agent forgets those when it next saves).
    pub fn load(&self, _lock: &BanLock) -> Result<Vec<Ban>, BanError> {
        match self.dir.read_file(FILE)? {
            None => Ok(Vec::new()),
            Some(text) => serde_json::from_str(&text)
                .map_err(|source| BanError::Corrupt { path: self.path.clone(), source }),
        }
    }

    /// The bans as the file holds them now, without the lock (read only: `status`); none if
    /// it cannot be read.
    pub fn peek(&self) -> Vec<Ban> {
        let text = self.dir.read_file(FILE).ok().flatten();
        text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    /// Keeps CrowdSec's bans (see [`saved_crowdsec`]).
    pub fn keep_crowdsec(&self, bans: &crate::host::crowdsec::Bans) -> Result<(), StateError> {
        let listed: Vec<(Cidr, Option<u64>)> = bans.iter().map(|(s, u)| (*s, *u)).collect();
        let bytes = serde_json::to_vec(&listed).expect("bans serialize");
        self.dir.write_atomically(CROWDSEC_FILE, &bytes)
    }

    pub fn save(&self, _lock: &BanLock, bans: &[Ban]) -> Result<(), BanError> {
        let bytes = serde_json::to_vec_pretty(bans).expect("bans serialize");
        Ok(self.dir.write_atomically(FILE, &bytes)?)
    }
}

/// Adds (or renews) a ban of `source`; the list with it.
pub fn add(mut bans: Vec<Ban>, ban: Ban) -> Vec<Ban> {
    bans.retain(|b| b.source != ban.source);
    bans.push(ban);
    bans
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// The first moment after `now` at which a ban ends, for the agent to wake then.
pub fn next_expiry(bans: &[Ban], now: u64) -> Option<u64> {
    bans.iter().filter_map(|b| b.until).filter(|until| *until > now).min()
}

/// CrowdSec's bans as the agent last kept them (none: never followed, or unreadable).
pub fn saved_crowdsec(state_dir: &Path) -> crate::host::crowdsec::Bans {
    let text = StateDir::new(state_dir).read_file(CROWDSEC_FILE).ok().flatten();
    let listed: Vec<(Cidr, Option<u64>)> =
        text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    listed.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_waits_for_the_ban_lock_a_bounded_time() {
        let dir = std::env::temp_dir().join(format!("guard-ban-lock-{}", std::process::id()));
        let store = BanStore::new(&dir);
        let held = store.lock().expect("the first lock");
        let started = Instant::now();
        let patience = Duration::from_millis(100);
        assert!(matches!(store.lock_within(Some(patience)), Err(BanError::Lock { .. })));
        assert!(started.elapsed() >= patience, "it waited its patience out");
        drop(held);
        assert!(store.lock_within(Some(patience)).is_ok(), "free again");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bans_expire_renew_and_say_when_to_wake() {
        let ban = |source: &str, until| Ban {
            source: source.parse().unwrap(),
            until,
            reason: String::new(),
            since: 0,
        };
        let bans = add(
            vec![ban("192.0.2.7", Some(100)), ban("192.0.2.8", None)],
            ban("192.0.2.7", Some(300)),
        );
        assert_eq!(bans.len(), 2, "a second ban of one source renews it");
        assert!(bans.iter().all(|b| b.active(150)));
        assert!(!bans[1].active(300) && bans[0].active(1_000_000));
        assert_eq!(next_expiry(&bans, 150), Some(300));
        assert_eq!(next_expiry(&bans, 300), None);
    }
}
