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
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use anyhow::Context as _;

use crate::{
    maps::PolicyMaps,
    pins::Pins,
    policy::Cidr,
    policy_file::PolicyFile,
    state::{StateDir, StateError},
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

/// What the agent denies besides the policy file's own `deny`: the deny files it names and
/// the bans, each kept as last read when a read fails (a broken or vanished file, a damaged
/// ban store never lifts a denial).
#[derive(Default)]
pub struct DenySources {
    /// Each deny file's sources as last read, and the modification time they were read at.
    files: BTreeMap<PathBuf, (Option<SystemTime>, Vec<Cidr>)>,
    /// The bans in force as last read.
    bans: Vec<Cidr>,
    /// When the next ban ends (seconds since the epoch).
    pub next_expiry: Option<u64>,
    /// CrowdSec's bans as its follower holds them (`--crowdsec-url`).
    crowdsec: Option<tokio::sync::watch::Receiver<crate::crowdsec::Bans>>,
    /// How many of them were in force at the last pass.
    crowdsec_in_force: usize,
    /// What was last saved of them.
    crowdsec_saved: Option<crate::crowdsec::Bans>,
}

impl DenySources {
    /// With CrowdSec's decisions as `follower` holds them, if the agent follows a local API.
    pub fn new(crowdsec: Option<tokio::sync::watch::Receiver<crate::crowdsec::Bans>>) -> Self {
        DenySources { crowdsec, ..DenySources::default() }
    }

    /// The sources to deny now, with the ban lock held: the caller keeps it until the maps
    /// are written. Problems go to `warnings` (the agent says each once).
    pub fn gather(
        &mut self,
        deny_files: &[PathBuf],
        store: &BanStore,
        warnings: &mut Vec<String>,
    ) -> (Vec<Cidr>, Option<BanLock>) {
        let mut sources = Vec::new();
        self.files.retain(|path, _| deny_files.contains(path));
        for path in deny_files {
            let modified = fs::metadata(path).and_then(|m| m.modified()).ok();
            let known = self.files.get(path);
            if known.is_none_or(|(at, _)| *at != modified || modified.is_none()) {
                match read_deny_file(path) {
                    Ok(read) => {
                        self.files.insert(path.clone(), (modified, read));
                    }
                    Err(e) if known.is_some() => {
                        warnings.push(format!("deny file {e}; its last good entries stay denied"))
                    }
                    Err(e) => warnings.push(format!("deny file {e}")),
                }
            }
            sources.extend(self.files.get(path).map(|(_, s)| s.clone()).unwrap_or_default());
        }
        let lock = match store.lock() {
            Ok(lock) => lock,
            Err(e) => {
                warnings.push(format!("{e}; the bans last read stay in force"));
                sources.extend(&self.bans);
                self.add_crowdsec(&mut sources);
                return (sources, None);
            }
        };
        match store.load(&lock) {
            Ok(bans) => {
                let now = now();
                let (active, ended): (Vec<Ban>, Vec<Ban>) =
                    bans.into_iter().partition(|b| b.active(now));
                if !ended.is_empty() {
                    for ban in &ended {
                        tracing::info!(source = %ban.source, reason = %ban.reason, "ban ended");
                    }
                    if let Err(e) = store.save(&lock, &active) {
                        warnings.push(format!("forgetting ended bans: {e}"));
                    }
                }
                self.next_expiry = next_expiry(&active, now);
                self.bans = active.iter().map(|b| b.source).collect();
            }
            Err(e) => warnings.push(format!("{e}; the bans last read stay in force")),
        }
        sources.extend(&self.bans);
        self.add_crowdsec(&mut sources);
        self.save_crowdsec(store, warnings);
        (sources, Some(lock))
    }

    /// Keeps CrowdSec's bans in the state directory when they change.
    fn save_crowdsec(&mut self, store: &BanStore, warnings: &mut Vec<String>) {
        let Some(decisions) = &self.crowdsec else { return };
        let now = decisions.borrow().clone();
        if self.crowdsec_saved.as_ref() == Some(&now) {
            return;
        }
        let listed: Vec<(Cidr, Option<u64>)> = now.iter().map(|(s, u)| (*s, *u)).collect();
        let bytes = serde_json::to_vec(&listed).expect("bans serialize");
        match store.dir.write_atomically(CROWDSEC_FILE, &bytes) {
            Ok(()) => self.crowdsec_saved = Some(now),
            Err(e) => warnings.push(format!("keeping CrowdSec's bans: {e}")),
        }
    }

    /// CrowdSec's bans in force now; the next end of one is when the agent wakes.
    fn add_crowdsec(&mut self, sources: &mut Vec<Cidr>) {
        let Some(decisions) = &self.crowdsec else { return };
        let now = now();
        let decisions = decisions.borrow();
        let in_force: Vec<(Cidr, Option<u64>)> = decisions
            .iter()
            .filter(|(_, until)| until.is_none_or(|until| now < until))
            .map(|(source, until)| (*source, *until))
            .collect();
        let ends = in_force.iter().filter_map(|(_, until)| *until);
        self.next_expiry = self.next_expiry.into_iter().chain(ends).min();
        self.crowdsec_in_force = in_force.len();
        sources.extend(in_force.into_iter().map(|(source, _)| source));
    }

    /// How many sources each kind holds: (deny files, bans, CrowdSec's).
    pub fn counts(&self) -> (usize, usize, usize) {
        let in_files = self.files.values().map(|(_, s)| s.len()).sum();
        (in_files, self.bans.len(), self.crowdsec_in_force)
    }
}

/// CrowdSec's bans as the agent last kept them (none: never followed, or unreadable).
pub fn saved_crowdsec(state_dir: &Path) -> crate::crowdsec::Bans {
    let text = StateDir::new(state_dir).read_file(CROWDSEC_FILE).ok().flatten();
    let listed: Vec<(Cidr, Option<u64>)> =
        text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    listed.into_iter().collect()
}

/// What a running agent denies besides the policy file's `deny`, as the files say now (for
/// `status` and `scan`, which compare the kernel with it): the readable deny files, the bans
/// and CrowdSec's bans in force. Read only: nothing is locked or pruned.
pub fn denied_by_files_and_bans(policy: &PolicyFile, state_dir: &Path) -> Vec<Cidr> {
    let mut sources: Vec<Cidr> =
        policy.deny_files.iter().filter_map(|path| read_deny_file(path).ok()).flatten().collect();
    let store = BanStore::new(state_dir);
    let now = now();
    if let Ok(Some(text)) = store.dir.read_file(FILE)
        && let Ok(bans) = serde_json::from_str::<Vec<Ban>>(&text)
    {
        sources.extend(bans.iter().filter(|b| b.active(now)).map(|b| b.source));
    }
    let crowdsec = saved_crowdsec(state_dir);
    sources.extend(crowdsec.iter().filter(|(_, u)| u.is_none_or(|u| now < u)).map(|(s, _)| *s));
    sources
}

/// `guard ban`: kept in the state directory, then written to the kernel's deny maps (if
/// protection is loaded), under the lock. Returns when it ends.
pub fn ban(
    pins: &Pins,
    state_dir: &Path,
    source: Cidr,
    duration: Option<Duration>,
    reason: &str,
) -> anyhow::Result<Option<u64>> {
    let store = BanStore::new(state_dir);
    let lock = store.lock()?;
    let since = now();
    let until = duration.map(|d| since.saturating_add(d.as_secs()));
    let bans = add(store.load(&lock)?, Ban { source, until, reason: reason.into(), since });
    store.save(&lock, &bans)?;
    if pins.exists() {
        PolicyMaps::from_pins(pins)?
            .set_denied(source, true)
            .with_context(|| format!("banning {source} in the kernel's maps"))?;
    }
    Ok(until)
}

/// `guard unban`: the `guard ban` of `source` lifted, in the file and in the kernel. A source
/// the policy file denies stays denied (the file decides), and so does one inside a prefix
/// still banned.
pub fn unban(
    pins: &Pins,
    state_dir: &Path,
    source: Cidr,
    policy: &PolicyFile,
) -> anyhow::Result<()> {
    let store = BanStore::new(state_dir);
    let lock = store.lock()?;
    let mut bans = store.load(&lock)?;
    let before = bans.len();
    bans.retain(|b| b.source != source);
    if bans.len() == before {
        anyhow::bail!("{source} is not banned by `guard ban` (see `guard bans`)");
    }
    store.save(&lock, &bans)?;
    if policy.deny.contains(&source) {
        anyhow::bail!("{source} is unbanned, but the policy file's `deny` still names it");
    }
    if pins.exists() {
        PolicyMaps::from_pins(pins)?
            .set_denied(source, false)
            .with_context(|| format!("lifting the ban of {source} in the kernel's maps"))?;
    }
    Ok(())
}

/// What `guard bans` lists.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub bans: Vec<Listed>,
    /// What could not be read (the policy file, a deny file).
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Listed {
    pub source: String,
    /// "cli", "policy" or the deny file's path.
    pub from: String,
    /// RFC 3339 UTC, absent for no expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub reason: String,
}

pub fn list(state_dir: &Path, config: &Path) -> anyhow::Result<Listing> {
    let store = BanStore::new(state_dir);
    let lock = store.lock()?;
    let now = now();
    let mut listed: Vec<Listed> = store
        .load(&lock)?
        .into_iter()
        .filter(|b| b.active(now))
        .map(|b| Listed {
            source: b.source.to_string(),
            from: "cli".into(),
            until: b.until.map(utc),
            reason: b.reason,
        })
        .collect();
    let mut notes = Vec::new();
    match crate::policy_file::load(config) {
        Ok(policy) => {
            let policy_entry = |source: &Cidr, from: &str| Listed {
                source: source.to_string(),
                from: from.into(),
                until: None,
                reason: String::new(),
            };
            listed.extend(policy.deny.iter().map(|s| policy_entry(s, "policy")));
            for path in &policy.deny_files {
                match read_deny_file(path) {
                    Ok(sources) => listed.extend(
                        sources.iter().map(|s| policy_entry(s, &path.display().to_string())),
                    ),
                    Err(e) => notes.push(e),
                }
            }
        }
        Err(e) => notes.push(format!("the policy file does not load ({e})")),
    }
    Ok(Listing { bans: listed, notes })
}

/// A deny file's sources, or why they cannot be read (said in the file's terms).
pub fn read_deny_file(path: &Path) -> Result<Vec<Cidr>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_deny_file(&text, &path.display().to_string()).map_err(|e| e.to_string())
}

pub fn render(listing: &Listing) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if listing.bans.is_empty() {
        out.push_str("no bans\n");
    }
    for b in &listing.bans {
        let until = b.until.as_deref().unwrap_or("-");
        let _ = writeln!(out, "{:<24} {:<10} until {:<22} {}", b.source, b.from, until, b.reason);
    }
    for note in &listing.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// Seconds since the epoch as ISO 8601 UTC, as drops are stamped.
pub fn utc(seconds: u64) -> String {
    crate::drops::utc(seconds as f64)
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
