//! The policy layer: what the operator says and the Docker world it is said about, as plain
//! data. Pure: no system, no kernel.
//!
//! - the vocabulary (protocols, port specs, source prefixes, openings), re-exported here since
//!   every other layer speaks it;
//! - [`labels`] (container labels → openings) and [`rates`] (limits on new flows);
//! - [`file`](mod@file): the operator's policy file;
//! - [`snapshot`]: Docker's networks and containers. It lives here rather than in `state`
//!   because the policy file's rules select containers from it.
//!
//! Imports nothing from guard's other layers.

mod vocabulary;

pub mod file;
pub mod labels;
pub mod rates;
pub mod snapshot;

pub use vocabulary::*;
