//! The kernel layer: guard's BPF objects and how they meet the kernel.
//!
//! - [`features`]: what the running kernel can do;
//! - [`loader`] (the embedded program), [`pins`] (the bpffs layout), [`repin`] (pins removed
//!   under a running agent put back), [`unload`] (everything under the pins removed);
//! - [`maps`]: reading the pinned maps and applying a plan to them;
//! - [`hook`]: each hook's entry points, attach point and interfaces, in one catalogue;
//! - [`attach`] (programs on interfaces), [`tc_filter`] (clsact filters where there is no
//!   TCX), [`link_info`] (is a pinned link still attached);
//! - [`frames`]: synthesised frames for the program to judge (`guard explain`, the tests).
//!
//! Imports [`crate::policy`], [`crate::state`] and [`crate::host`].

pub mod attach;
pub mod features;
pub mod frames;
pub mod hook;
pub mod link_info;
pub mod loader;
pub mod maps;
pub mod pins;
pub mod repin;
pub mod tc_filter;
pub mod unload;
