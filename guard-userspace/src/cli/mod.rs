//! The commands layer: what guard judges about the host, with or without a running agent.
//!
//! - [`status`]: every container, its ports and who may reach them, and whether the maps
//!   agree;
//! - [`scan`]: what the network can reach, judged by the loaded programs;
//! - [`explain`]: why a packet gets its verdict;
//! - [`bans`]: the ban lists (`guard ban`, deny files) and the sources the agent denies;
//! - [`reach`]: who outside reaches a port, as status and scan both say it.
//!
//! Imports the layers below ([`crate::policy`], [`crate::state`], [`crate::host`],
//! [`crate::kernel`]). It sits below [`crate::telemetry`] and [`crate::agent`] because the
//! agent reuses what these commands compute: the scan (alerts) and the ban sources.

pub mod bans;
pub mod explain;
pub mod reach;
pub mod scan;
pub mod status;
