//! `guard ban`, `guard unban` and `guard bans`.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    deny_files::read_deny_file,
    store::{Ban, BanStore, add, now},
};
use crate::{kernel::maps::PolicyMaps, kernel::pins::Pins, policy::Cidr, policy::file::PolicyFile};

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
    match crate::policy::file::load(config) {
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
    crate::host::clock::utc(seconds as f64)
}
