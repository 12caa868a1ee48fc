//! Sources banned from every container port, whatever labels and rules open: the policy
//! file's `deny` list, the deny files it names (one address or prefix per line, `#`
//! comments), and `guard ban` (kept in the state directory, with an optional expiry, so a ban
//! outlives the agent and the reboot).
//!
//! `guard ban` writes the kernel's deny maps itself, so a ban takes effect at once, with or
//! without an agent; the agent rebuilds its desired deny set from this file on every pass.
//! Both hold [`BanStore::lock`] from reading the file to writing the maps: an agent's pass
//! can never write back a set that misses a ban made meanwhile.

mod commands;
mod deny_files;
mod sources;
mod store;

pub use commands::{Listed, Listing, ban, list, render, unban, utc};
pub use deny_files::{BadLine, parse_deny_file, read_deny_file};
pub use sources::{DenySources, denied_by_files_and_bans};
pub use store::{Ban, BanError, BanLock, BanStore, add, next_expiry, now, saved_crowdsec};
