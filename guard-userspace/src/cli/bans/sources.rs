//! What the agent denies besides the policy file's own `deny`, gathered on every pass: the
//! deny files, `guard ban`'s bans and CrowdSec's; and the same, read only, for `status` and
//! `scan`.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{
    deny_files::read_deny_file,
    store::{Ban, BanLock, BanStore, next_expiry, now, saved_crowdsec},
};
use crate::{policy::Cidr, policy::file::PolicyFile};

/// How long a pass waits for the ban lock: `guard ban` holds it for milliseconds; one that
/// hangs must not stall the agent.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

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
    crowdsec: Option<tokio::sync::watch::Receiver<crate::host::crowdsec::Bans>>,
    /// How many of them were in force at the last pass.
    crowdsec_in_force: usize,
    /// What was last saved of them.
    crowdsec_saved: Option<crate::host::crowdsec::Bans>,
}

impl DenySources {
    /// With CrowdSec's decisions as `follower` holds them, if the agent follows a local API.
    pub fn new(
        crowdsec: Option<tokio::sync::watch::Receiver<crate::host::crowdsec::Bans>>,
    ) -> Self {
        DenySources { crowdsec, ..DenySources::default() }
    }

    /// The sources to deny now, with the ban lock held: the caller keeps it until the maps
    /// are written. Without the lock (another command held it past [`LOCK_PATIENCE`], or it
    /// failed), the bans last read are returned but cannot be trusted to be current: the
    /// caller must then lift nothing (a ban being added meanwhile would be undone).
    /// Problems go to `warnings` (the agent says each once).
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
                        warnings.push(format!("deny file {e}; its last good entries stay denied"));
                    }
                    Err(e) => warnings.push(format!("deny file {e}")),
                }
            }
            sources.extend(self.files.get(path).map(|(_, s)| s.clone()).unwrap_or_default());
        }
        let lock = match store.lock_within(Some(LOCK_PATIENCE)) {
            Ok(lock) => lock,
            Err(e) => {
                warnings.push(format!("{e}; nothing denied is lifted until it can be read"));
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
        match store.keep_crowdsec(&now) {
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

/// What a running agent denies besides the policy file's `deny`, as the files say now (for
/// `status` and `scan`, which compare the kernel with it): the readable deny files, the bans
/// and CrowdSec's bans in force. Read only: nothing is locked or pruned.
pub fn denied_by_files_and_bans(policy: &PolicyFile, state_dir: &Path) -> Vec<Cidr> {
    let mut sources: Vec<Cidr> =
        policy.deny_files.iter().filter_map(|path| read_deny_file(path).ok()).flatten().collect();
    let store = BanStore::new(state_dir);
    let now = now();
    let bans = store.peek();
    sources.extend(bans.iter().filter(|b| b.active(now)).map(|b| b.source));
    let crowdsec = saved_crowdsec(state_dir);
    sources.extend(crowdsec.iter().filter(|(_, u)| u.is_none_or(|u| now < u)).map(|(s, _)| *s));
    sources
}
