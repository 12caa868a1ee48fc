//! Sources banned from every container port, whatever labels and rules open: the policy
//! file's `deny` list, the deny files it names (one address or prefix per line, `#`
//! comments), and `guard ban` (kept in the state directory, with an optional expiry, so a ban
//! outlives the agent and the reboot).
//!
//! `guard ban` writes the kernel's deny maps itself, so a ban takes effect at once, with or
//! without an agent; the agent rebuilds its desired deny set from this file on every pass.
//! Both hold [`BanStore::lock`] from reading the file to writing the maps: an agent's pass
//! can never write back a set that misses a ban made meanwhile.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    policy::Cidr,
    state::{StateDir, StateError},
};

const FILE: &str = "bans.json";
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

    pub fn lock(&self) -> Result<BanLock, BanError> {
        self.dir.create()?;
        let path = self.path.with_file_name(LOCK);
        let locked = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|file| {
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, errno)| std::io::Error::from(errno))
            })
            .map_err(|source| BanError::Lock { path: path.clone(), source })?;
        Ok(BanLock { _file: locked })
    }

    /// Every ban made, expired ones included (the agent forgets those when it next saves).
    pub fn load(&self, _lock: &BanLock) -> Result<Vec<Ban>, BanError> {
        match self.dir.read_file(FILE)? {
            None => Ok(Vec::new()),
            Some(text) => serde_json::from_str(&text)
                .map_err(|source| BanError::Corrupt { path: self.path.clone(), source }),
        }
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

/// A line of a deny file that is neither an address, a prefix, blank nor a comment.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: `{text}` is not an address or prefix ({why})")]
pub struct BadLine {
    pub path: String,
    pub line: usize,
    pub text: String,
    pub why: String,
}

/// A deny file's sources: one address or prefix per line; `#` starts a comment. A file with
/// a bad line is refused whole (the sources it gave before stay in force).
pub fn parse_deny_file(text: &str, path: &str) -> Result<Vec<Cidr>, BadLine> {
    let mut sources = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let cidr = entry.parse::<Cidr>().map_err(|e| BadLine {
            path: path.into(),
            line: n + 1,
            text: entry.into(),
            why: e.to_string(),
        })?;
        sources.push(cidr);
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_files_take_addresses_prefixes_and_comments_and_refuse_the_rest() {
        let text = "# bad actors\n192.0.2.7\n\n198.51.100.0/24  # a whole net\n2001:db8::/32\n";
        let sources = parse_deny_file(text, "deny.txt").unwrap();
        let shown: Vec<String> = sources.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["192.0.2.7/32", "198.51.100.0/24", "2001:db8::/32"]);
        let bad = parse_deny_file("192.0.2.7\nexample.com\n", "deny.txt").unwrap_err();
        assert_eq!((bad.line, bad.text.as_str()), (2, "example.com"));
        assert!(bad.to_string().starts_with("deny.txt:2: `example.com`"), "{bad}");
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
