//! guard: keeps the XDP filter's maps equal to what Docker and the operator want.
//!
//! The folders are the layers, lowest first; a layer imports only from the layers above it
//! in this list (each one's `mod.rs` says what it owns):
//!
//! - [`policy`]: the operator's words (labels, rates, the policy file) and the Docker world
//!   they speak about (the snapshot). Pure.
//! - [`state`]: what the maps should hold, computed from those (target ids, the desired state,
//!   the map image and the plan to reach it, the engine's own doors). Pure.
//! - [`host`]: the system's edges: Docker's API, interfaces and bridges, netlink, sockets,
//!   outbound HTTP, CrowdSec, the clocks and the state directory on disk.
//! - [`kernel`]: the kernel's objects: the program and its pins, the maps, attachment, what
//!   the running kernel can do, synthesised frames.
//! - [`cli`]: the commands that judge the host without an agent (`status`, `scan`,
//!   `explain`) and the ban lists (`guard ban`, deny files).
//! - [`telemetry`]: what the agent tells the world: the kernel's events, metrics, the HTTP
//!   endpoint, alerts on exposure changes and their webhook.
//! - [`agent`]: `guard run`.
//!
//! Beside the layers, `testing` (hidden from the docs) holds the seed scenario that the unit
//! tests here and the verdict tests in the `tests` crate share.

pub mod policy;
pub mod state;

pub mod host;
pub mod kernel;

pub mod cli;
pub mod telemetry;

pub mod agent;

#[doc(hidden)]
pub mod testing;
