//! The state layer: what the kernel's maps should hold, as a pure function of the policy and
//! the snapshot. No system, no kernel.
//!
//! - [`identities`]: target ids, the integers the kernel knows containers by;
//! - [`desired`]: the desired state; [`doors`]: the engine's own ports in it;
//! - [`tables`]: the content of every map as plain ordered maps, and the plan (a diff) that
//!   turns one into another;
//! - [`engine_paths`]: which paths to a container the engine's own firewall leaves;
//! - [`openings`]: which opening let a source in.
//!
//! Imports only [`crate::policy`].

pub mod desired;
pub mod doors;
pub mod engine_paths;
pub mod identities;
pub mod openings;
pub mod reconcile;
pub mod tables;
