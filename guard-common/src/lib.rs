//! What the kernel program and the agent must agree on, byte for byte.
//!
//! - [`addr`]: the one address type both families share.
//! - [`maps`]: map names, capacities and the `#[repr(C)]` keys and values.
//! - [`prefilter`]: the bitmaps that let most traffic pass without a single hash lookup.
//! - [`reason`]: why a packet got its verdict (one per-CPU counter each).
//! - [`events`]: per-container drop counters, and the rate-limited drop and access events.
//! - [`parse`]: frame to packet, written once for the kernel's packet memory and user space's
//!   byte slices, with every fail behaviour named in one table.
//! - [`arrivals`]: the first packet of a flow from outside that an opening let in.
//! - [`ratelimit`]: per-source limits on new flows to an opened port.
//! - [`decision`]: the policy decision itself, written once over a [`decision::Tables`] trait.
//!   The XDP program implements the trait with BPF maps; the agent implements it with the desired
//!   state, so user space can test and explain verdicts against the very same definition.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate std;

pub mod addr;
pub mod arrivals;
pub mod decision;
pub mod events;
pub mod maps;
pub mod parse;
pub mod prefilter;
pub mod ratelimit;
pub mod reason;
