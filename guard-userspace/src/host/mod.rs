//! The host layer: the system's edges, everything guard asks of Linux and its neighbours
//! that is not a BPF object.
//!
//! - [`docker`] (the engine's API), [`docker_link`] (reaching it), [`engine_doors`] (the
//!   engine's swarm and its API listeners);
//! - [`interfaces`] (links, addresses, uplinks) and [`bridges`] (which bridge carries each
//!   network);
//! - [`netlink`] with [`rtnetlink`] (the requests aya does not make) and [`sock_diag`]
//!   (listening sockets);
//! - [`http_client`] (outbound HTTP(S)) and [`crowdsec`] (a CrowdSec LAPI's decisions);
//! - [`clock`] (the kernel's monotonic clock and UTC) and [`state_dir`] (what the agent last
//!   knew, on disk).
//!
//! Imports [`crate::policy`] and [`crate::state`].

pub mod bridges;
pub mod clock;
pub mod crowdsec;
pub mod docker;
pub mod docker_link;
pub mod engine_doors;
pub mod http_client;
pub mod interfaces;
pub mod netlink;
pub mod rtnetlink;
pub mod sock_diag;
pub mod state_dir;
