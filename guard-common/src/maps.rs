//! The maps the XDP program reads and the agent writes: names, capacities, keys and values.
//!
//! The packet path answers these questions, cheapest first:
//! 0. Could this be container-bound at all? [`PREFILTER`]: bitmaps of the address buckets that
//!    hold Docker networks and of the ports Docker publishes. Most traffic stops here.
//! 1. Is (host address, protocol, port) published by Docker? [`PUBLISHED`] names the container
//!    port behind it, with that port's rule.
//! 2. Otherwise, what is the destination? [`ADDRS`]: a container (direct routing) or one of the
//!    host's own addresses; [`NETWORKS`]: somewhere in a Docker network no container holds yet.
//! 3. Is the container port open to this source? The rules for a whole container and a
//!    published port travel in the [`ADDRS`]/[`PUBLISHED`] values, so a closed container costs
//!    one hash lookup; [`PORTS`] holds single-port rules and one entry per (container,
//!    protocol) for every port of that protocol (`*/udp`), [`SOURCES`] the allowed prefixes.
//! 4. Would-drop only: is it a reply to a flow the host or a container started? [`FLOWS`],
//!    written by the TC egress program on the uplinks and the TC ingress program on Docker's
//!    bridges.
//!
//! The bridge gate (TC egress on Docker's bridges) asks the same questions again after NAT, for
//! packets that arrived on one of the [`UPLINKS`]: it closes the moment between Docker
//! publishing a new container's port and the agent learning of it.
//!
//! Containers are named in the kernel by a *target id* the agent allocates per container
//! identity ([`IDENTITIES`] keeps the reverse mapping for the agent and its CLI), so a container
//! on several networks has one set of port rules and an IP reused by another container never
//! inherits them.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a size assertion.

use crate::addr::Addr;

/// Map names as the kernel sees them (at most 15 bytes) and as they are pinned.
pub const ADDRS: &str = "GUARD_ADDRS";
pub const NETWORKS: &str = "GUARD_NETWORKS";
pub const PUBLISHED: &str = "GUARD_PUBLISHED";
pub const PORTS: &str = "GUARD_PORTS";
pub const SOURCES: &str = "GUARD_SOURCES";
pub const IDENTITIES: &str = "GUARD_IDENTS";
pub const COUNTERS: &str = "GUARD_COUNTERS";
pub const PREFILTER: &str = "GUARD_PREFILTER";
pub const FLOWS: &str = "GUARD_FLOWS";
pub const TRUSTED: &str = "GUARD_TRUSTED";
pub const CONFIG: &str = "GUARD_CONFIG";
pub const DROPS: &str = "GUARD_DROPS";
pub const DROP_SLOTS: &str = "GUARD_DROPSLOTS";
pub const EVENTS: &str = "GUARD_EVENTS";
pub const EVENT_LIMIT: &str = "GUARD_EVLIMIT";
pub const EVENT_STATS: &str = "GUARD_EVSTATS";
pub const UPLINKS: &str = "GUARD_UPLINKS";
pub const GATE_COUNTERS: &str = "GUARD_GATE";
pub const DENY_EXACT: &str = "GUARD_DENY_HOST";
pub const DENY_PREFIX: &str = "GUARD_DENY_NET";
pub const RATE_LIMITS: &str = "GUARD_RATES";
pub const RATE_BUCKETS: &str = "GUARD_BUCKETS";
pub const ARRIVALS: &str = "GUARD_ARRIVALS";

/// Every map the agent pins, in the order `guard unload` removes them.
pub const ALL: [&str; 23] = [
    ADDRS,
    NETWORKS,
    PUBLISHED,
    PORTS,
    SOURCES,
    IDENTITIES,
    COUNTERS,
    PREFILTER,
    FLOWS,
    TRUSTED,
    CONFIG,
    DROPS,
    DROP_SLOTS,
    EVENTS,
    EVENT_LIMIT,
    EVENT_STATS,
    UPLINKS,
    GATE_COUNTERS,
    DENY_EXACT,
    DENY_PREFIX,
    RATE_LIMITS,
    RATE_BUCKETS,
    ARRIVALS,
];

const _: () = {
    let mut i = 0;
    while i < ALL.len() {
        assert!(ALL[i].len() <= 15, "BPF object names are limited to 15 bytes");
        i += 1;
    }
};

/// Container and host addresses (a host with 1,000 containers on 4 networks uses 4,000).
pub const ADDRS_CAPACITY: u32 = 65_536;
/// Docker network subnets, both families.
pub const NETWORKS_CAPACITY: u32 = 4_096;
/// (host address, protocol, port) triples: each published port times each host address.
pub const PUBLISHED_CAPACITY: u32 = 65_536;
/// Opened container ports (expose or allow), one entry per port of a range.
pub const PORTS_CAPACITY: u32 = 65_536;
/// Allowed source prefixes, one per (opened port, CIDR).
pub const SOURCES_CAPACITY: u32 = 65_536;
/// Containers the agent can tell apart at once.
pub const IDENTITIES_CAPACITY: u32 = 65_536;
/// Outbound flows remembered so their replies pass (least recently used are forgotten).
pub const FLOWS_CAPACITY: u32 = 65_536;
/// Trusted source prefixes from the policy file.
pub const TRUSTED_CAPACITY: u32 = 4_096;
/// Denied single addresses (/32, /128): bans, deny lists and files (100,000 must fit).
pub const DENY_EXACT_CAPACITY: u32 = 131_072;
/// Denied prefixes shorter than a single address.
pub const DENY_PREFIX_CAPACITY: u32 = 131_072;
/// Container ports with a rate limit on new flows ([`crate::ratelimit::RateLimit`], keyed by
/// [`PortKey`]), one entry per port of a range.
pub const RATE_LIMITS_CAPACITY: u32 = 65_536;
/// Sources' buckets at rate-limited ports (least recently used are forgotten: a forgotten
/// bucket starts full again, see [`crate::ratelimit`]).
pub const RATE_BUCKETS_CAPACITY: u32 = 65_536;
/// Flows from outside an opening let in, for their first packet (see [`crate::arrivals`]).
pub const ARRIVALS_CAPACITY: u32 = 65_536;
/// Container ports with drop counters (the agent removes those of containers that are gone).
pub const DROPS_CAPACITY: u32 = 65_536;
/// Drop counters' first place, per CPU (see [`crate::events::DropSlot`]).
pub const DROP_SLOTS_CAPACITY: u32 = 1 << crate::events::DROP_SLOT_BITS;
/// Interfaces by index, with their role ([`IFACE_UPLINK`], [`IFACE_INSIDE`], [`IFACE_DOCKER`]).
pub const UPLINKS_CAPACITY: u32 = 1_024;

/// [`UPLINKS`] value: an interface guard protects; packets that arrived on it are from outside.
pub const IFACE_UPLINK: u32 = 1;
/// [`UPLINKS`] value: an interface that is neither guarded nor Docker's (loopback, a trusted
/// interface, one left out by `--iface`).
pub const IFACE_INSIDE: u32 = 2;
/// [`UPLINKS`] value: the bridge of a Docker network the agent knows (its subnets are in
/// [`NETWORKS`]).
pub const IFACE_DOCKER: u32 = 3;
// An interface the map does not name appeared since the agent last looked: a bridge of a
// network it has not seen, or an uplink that came back under a new index while it was away.
// Both are judged as outside where it matters (the gate; a container's answer leaving
// through an uplink), so neither needs the agent to be closed.

/// Target flag: the container is in audit mode (a policy-file rule said so): its would-drops
/// pass and are counted as such.
pub const TARGET_AUDIT: u8 = 1;
/// Target flag: some port of the container has a rate limit in [`RATE_LIMITS`]. Without it,
/// the lookup is skipped (a port without a limit pays nothing).
pub const TARGET_RATE_LIMITED: u8 = 2;

/// The engine's own doors (README, "What it protects"): host ports that lead
/// straight to containers or to root on the host. They are listed in [`PUBLISHED`] like a
/// published port, under a target id of their own that no container ever gets (container ids
/// count up from 1), with the sources that may reach them in [`SOURCES`]: everything the
/// decision does for a published port (host addresses, broadcast, the FIB, source lists,
/// audit, counters, explain) holds for them unchanged.
pub mod door {
    /// Swarm's data path: VXLAN to the data-path port (4789/udp unless the swarm says
    /// otherwise), which takes Ethernet frames for every overlay container, unauthenticated.
    pub const OVERLAY: u32 = 0xffff_ff00;
    /// Swarm's gossip, 7946/tcp and udp.
    pub const GOSSIP: u32 = 0xffff_ff01;
    /// A manager's control port, 2377/tcp (raft, and every node that joins).
    pub const CONTROL: u32 = 0xffff_ff02;
    /// The Docker API on a tcp socket: root on the host for whoever reaches it.
    pub const API: u32 = 0xffff_ff03;
    pub const ALL: [u32; 4] = [OVERLAY, GOSSIP, CONTROL, API];

    /// Whether `target` is one of the engine's doors rather than a container.
    #[inline(always)]
    pub const fn is_door(target: u32) -> bool {
        target >= OVERLAY
    }
}

/// Who a port (or a whole container) is open to, as stored in rule fields.
pub const OPEN_NONE: u8 = 0;
pub const OPEN_EVERYONE: u8 = 1;
/// Open to the prefixes listed in [`SOURCES`] under the rule's [`PortKey`].
pub const OPEN_LISTED: u8 = 2;

/// What a destination address in [`ADDRS`] is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrInfo {
    /// The container's target id; 0 for host addresses.
    pub target: u32,
    /// [`AddrInfo::CONTAINER`] or [`AddrInfo::HOST`].
    pub kind: u8,
    /// The container's all-ports rule (`*`), an `OPEN_*` value.
    pub all_ports: u8,
    /// `PORT_RULES_*` flags: which kinds of [`PORTS`] entries this target has. Without a flag,
    /// the lookup it stands for is skipped (a closed container costs one hash lookup).
    pub port_rules: u8,
    /// `TARGET_*` flags.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<AddrInfo>() == 8);

/// [`AddrInfo::port_rules`] flag: [`PORTS`] holds single-port rules for this target.
pub const PORT_RULES_SINGLE: u8 = 1;
/// [`AddrInfo::port_rules`] flag: [`PORTS`] holds every-port-of-a-protocol rules
/// ([`PortKey::every_port_of`]) for this target.
pub const PORT_RULES_PER_PROTO: u8 = 2;

impl AddrInfo {
    pub const CONTAINER: u8 = 1;
    pub const HOST: u8 = 2;

    pub const fn container(target: u32) -> Self {
        AddrInfo { target, kind: Self::CONTAINER, all_ports: OPEN_NONE, port_rules: 0, flags: 0 }
    }
    pub const fn host() -> Self {
        AddrInfo { target: 0, kind: Self::HOST, all_ports: OPEN_NONE, port_rules: 0, flags: 0 }
    }
}

/// Key of [`NETWORKS`] (longest-prefix match over the 128-bit [`Addr`]).
pub type NetworkKey = Addr;

/// Key of [`PUBLISHED`]: a host address and a port Docker publishes on it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishedKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    /// IP protocol number (6 tcp, 17 udp, 132 sctp).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PublishedKey>() == 20);

/// Value of [`PUBLISHED`]: the container port behind a published host port, and its rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishedTarget {
    pub target: u32,
    /// Container port, host byte order.
    pub port: u16,
    /// The rule of that container port, an `OPEN_*` value.
    pub rule: u8,
    /// The container's all-ports rule, an `OPEN_*` value.
    pub all_ports: u8,
    /// `TARGET_*` flags.
    pub flags: u8,
    /// The container's rule for every port of the published port's protocol (`*/udp`), an
    /// `OPEN_*` value: folded in like `rule`, so the published path needs no [`PORTS`] lookup.
    pub proto_rule: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PublishedTarget>() == 12);

/// Protocol value of a [`PortKey`] that stands for every port of every protocol (`*`), and
/// the rule that decides port-less packets (ICMP, later fragments). Such keys appear only in
/// [`SOURCES`]; the all-ports rule itself lives in [`AddrInfo`] and [`PublishedTarget`].
pub const PROTO_ANY: u8 = 0;

/// Port value of a [`PortKey`] that stands for every port of its protocol (`*/udp`). Labels
/// and the policy file never open port 0 on its own (ports are 1-65535), so the key is free;
/// and a packet to port 0 of that protocol, which `*/udp` covers too, finds it directly.
pub const EVERY_PORT: u16 = 0;

/// Key of [`PORTS`]: a container port, every port of one protocol ([`EVERY_PORT`]), or all of
/// a container's ports ([`PROTO_ANY`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub target: u32,
    /// Host byte order; [`EVERY_PORT`] for every port of `proto` (or, with [`PROTO_ANY`], of
    /// every protocol).
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);

impl PortKey {
    pub const fn new(target: u32, proto: u8, port: u16) -> Self {
        PortKey { target, port, proto, _pad: 0 }
    }
    pub const fn all_ports(target: u32) -> Self {
        Self::new(target, PROTO_ANY, EVERY_PORT)
    }
    /// Every port of protocol `proto` (`*/udp`): one entry however many ports it opens.
    pub const fn every_port_of(target: u32, proto: u8) -> Self {
        Self::new(target, proto, EVERY_PORT)
    }
    /// Whether this key stands for every port of one protocol.
    pub const fn is_every_port_of_proto(&self) -> bool {
        self.port == EVERY_PORT && self.proto != PROTO_ANY
    }
}

/// Value of [`PORTS`]: to whom a single container port is open.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    /// [`OPEN_EVERYONE`] or [`OPEN_LISTED`].
    pub open_to: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PortRule>() == 4);

impl PortRule {
    pub const fn everyone() -> Self {
        PortRule { open_to: OPEN_EVERYONE, _pad: [0; 3] }
    }
    pub const fn listed() -> Self {
        PortRule { open_to: OPEN_LISTED, _pad: [0; 3] }
    }
}

/// Data of a [`SOURCES`] key: an opened port and a source prefix. The trie's prefix length
/// always covers the whole [`PortKey`] ([`SourceKey::PORT_BITS`]) plus the source prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub port: PortKey,
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 24);

impl SourceKey {
    pub const PORT_BITS: u32 = 64;
}

/// Value of [`IDENTITIES`]: the Docker container id (32 bytes, the 64 hex digits decoded)
/// behind a target id. Only the agent reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(pub [u8; 32]);
const _: () = assert!(core::mem::size_of::<ContainerId>() == 32);

/// Key of [`FLOWS`]: a flow as its *replies* will arrive (remote is their source).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub remote: Addr,
    pub local: Addr,
    /// Host byte order.
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of [`FLOWS`]: when the flow last left the host (bpf_ktime_get_ns).
pub type FlowSeen = u64;

/// How long a UDP (or SCTP) flow's replies are awaited after its last outbound packet, like
/// conntrack's UDP stream timeout. TCP replies need no clock: a bare SYN is never a reply.
pub const FLOW_TIMEOUT_NS: u64 = 180 * 1_000_000_000;

impl FlowKey {
    /// Whether a flow last seen leaving at `seen` still has its replies let in at `now`: a TCP
    /// flow until flow memory forgets it, any other for [`FLOW_TIMEOUT_NS`].
    #[inline(always)]
    pub fn alive(&self, seen: FlowSeen, now: u64) -> bool {
        self.proto == crate::parse::IPPROTO_TCP || now.saturating_sub(seen) < FLOW_TIMEOUT_NS
    }
}

/// Value of the one-entry [`CONFIG`] array: settings of the whole host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `CONFIG_*` flags.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 4);

/// Audit mode for the whole host: nothing is dropped, would-drops are counted.
pub const CONFIG_AUDIT_ALL: u32 = 1;
/// [`TRUSTED`] holds prefixes: look sources up there before dropping (without, skip it).
pub const CONFIG_HAS_TRUSTED: u32 = 2;
/// [`DENY_EXACT`] holds addresses: look container-bound sources up there (without, skip it).
pub const CONFIG_HAS_DENY_EXACT: u32 = 4;
/// [`DENY_PREFIX`] holds prefixes: look container-bound sources up there (without, skip it).
pub const CONFIG_HAS_DENY_PREFIX: u32 = 8;

/// Bump when a map's meaning changes without its shape changing.
/// 4: every port of one protocol (`*/udp`): [`PORTS`] keys with [`EVERY_PORT`],
/// [`AddrInfo::port_rules`] flags and [`PublishedTarget::proto_rule`].
/// 5: rate limits ([`TARGET_RATE_LIMITED`]), access events in [`EVENTS`] and a limiter per
/// event stream.
/// 6: drop counters first in [`DROP_SLOTS`].
pub const LAYOUT_REVISION: u32 = 6;

/// A fingerprint of every map's shape. The agent pins maps in a directory named by it, so an
/// agent never adopts maps of another layout: an upgrade that changes one fills new maps and
/// swaps the programs atomically, then drops the old maps.
pub const LAYOUT: u32 = fnv1a(&[
    LAYOUT_REVISION,
    core::mem::size_of::<Addr>() as u32,
    core::mem::size_of::<AddrInfo>() as u32,
    core::mem::size_of::<PublishedKey>() as u32,
    core::mem::size_of::<PublishedTarget>() as u32,
    core::mem::size_of::<PortKey>() as u32,
    core::mem::size_of::<PortRule>() as u32,
    core::mem::size_of::<SourceKey>() as u32,
    core::mem::size_of::<ContainerId>() as u32,
    core::mem::size_of::<FlowKey>() as u32,
    core::mem::size_of::<Config>() as u32,
    core::mem::size_of::<crate::events::DropKey>() as u32,
    core::mem::size_of::<crate::events::DropSlot>() as u32,
    core::mem::size_of::<crate::events::PacketEvent>() as u32,
    core::mem::size_of::<crate::events::Limiter>() as u32,
    core::mem::size_of::<crate::prefilter::Bitmap>() as u32,
    core::mem::size_of::<crate::ratelimit::RateLimit>() as u32,
    core::mem::size_of::<crate::ratelimit::BucketKey>() as u32,
    ADDRS_CAPACITY,
    NETWORKS_CAPACITY,
    PUBLISHED_CAPACITY,
    PORTS_CAPACITY,
    SOURCES_CAPACITY,
    IDENTITIES_CAPACITY,
    FLOWS_CAPACITY,
    TRUSTED_CAPACITY,
    DENY_EXACT_CAPACITY,
    DENY_PREFIX_CAPACITY,
    RATE_LIMITS_CAPACITY,
    RATE_BUCKETS_CAPACITY,
    ARRIVALS_CAPACITY,
    DROPS_CAPACITY,
    DROP_SLOTS_CAPACITY,
    UPLINKS_CAPACITY,
    crate::reason::COUNTER_SLOTS,
    crate::prefilter::ENTRIES,
    crate::events::EVENTS_RING_BYTES,
    crate::events::EVENT_STATS,
    crate::events::EVENT_STREAMS,
    ALL.len() as u32,
]);

const fn fnv1a(words: &[u32]) -> u32 {
    let mut hash = 0x811c_9dc5u32;
    let mut i = 0;
    while i < words.len() {
        hash ^= words[i];
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)] with explicit padding and no pointers.
    unsafe impl aya::Pod for AddrInfo {}
    unsafe impl aya::Pod for PublishedKey {}
    unsafe impl aya::Pod for PublishedTarget {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for ContainerId {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for crate::prefilter::Bitmap {}
}
