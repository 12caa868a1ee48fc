//! The telemetry layer: what the agent tells the world.
//!
//! - [`events`]: the kernel's drop and access events, from the ring buffer to the log, the
//!   HTTP endpoint and `guard drops` / `guard access`;
//! - [`metrics`] (Prometheus) and [`http`] (the agent's endpoint);
//! - [`alerts`] (the scan kept current, one event per change) and [`webhook`]
//!   (`--alert-url`).
//!
//! Imports every layer but [`crate::agent`].

pub mod alerts;
pub mod events;
pub mod http;
pub mod metrics;
pub mod sync_report;
pub mod webhook;
