//! guard: keeps the XDP filter's maps equal to what Docker and the operator want.
//!
//! Pure logic (no root, unit-tested): [`policy`], [`labels`], [`rates`] (limits on new flows),
//! [`snapshot`], [`identities`],
//! [`tables`], [`desired`], [`doors`] (the engine's own ports in the desired state),
//! [`engine_paths`] (which paths to a container the engine's own firewall leaves). System
//! edges: [`docker`] (Docker API), [`docker_link`] (reaching it), [`engine_doors`] (the
//! engine's swarm and its API listeners), [`interfaces`] (links and addresses), [`bridges`]
//! (which bridge carries each engine network), [`pins`] (bpffs layout), [`hook`] (where each program runs), [`loader`] (the
//! embedded program), [`kernel`] (what the running kernel can do), [`attach`] (programs on
//! interfaces), [`tc_filter`] (clsact filters where there is no TCX), [`netlink`] with
//! [`rtnetlink`] (the netlink requests aya does not make) and [`sock_diag`] (listening
//! sockets), [`link_info`] (is a pinned link still attached), [`maps`] (reading and writing
//! the pinned maps), [`repin`] (pins removed under a running agent put back), [`state`] (what
//! the agent last knew, on disk). Commands: [`agent`] (`guard run`), [`status`], [`scan`]
//! (what the network can reach, judged by the loaded programs), [`explain`] (with
//! [`openings`]: which rule let a source in), [`unload`]. The kernel's events: [`events`]
//! (drops and the access log, `guard drops`, `guard access`). Alerts:
//! [`alerts`] (the scan kept current in `guard run`, one event per change) and [`webhook`]
//! (`--alert-url`). Ban lists: [`bans`] (`guard ban`, deny files) and [`crowdsec`]
//! (`--crowdsec-url`: a CrowdSec LAPI's decisions); the webhook and the bouncer send through
//! [`http_client`].

pub mod desired;
pub mod doors;
pub mod engine_paths;
pub mod identities;
pub mod labels;
pub mod policy;
pub mod policy_file;
pub mod rates;
pub mod snapshot;
pub mod tables;

pub mod agent;
pub mod alerts;
pub mod attach;
pub mod bans;
pub mod bridges;
pub mod crowdsec;
pub mod docker;
pub mod docker_link;
pub mod engine_doors;
pub mod events;
pub mod explain;
pub mod frames;
pub mod hook;
pub mod http;
pub mod http_client;
pub mod interfaces;
pub mod kernel;
pub mod link_info;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod netlink;
pub mod openings;
pub mod pins;
pub mod repin;
pub mod rtnetlink;
pub mod scan;
pub mod sock_diag;
pub mod state;
pub mod status;
pub mod tc_filter;
pub mod unload;
pub mod webhook;
