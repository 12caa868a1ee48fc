//! Drops and accesses as the operator sees them: per-container counters and sampled events.
//!
//! Exact totals per reason live in the counters map. On top, every drop bound for a container
//! bumps a per-CPU counter keyed by the container port ([`DropKey`]), and two streams of
//! [`PacketEvent`]s share one ring buffer: drops ([`STREAM_DROPS`]), and the first packet of
//! each flow from outside that an opening let in ([`STREAM_ACCESS`], see
//! [`crate::arrivals`]). An event's reason tells them apart: a drop's verdict is drop (audited
//! or not), an access's is pass. Each stream reports at most [`EVENTS_PER_SECOND_PER_CPU`] per
//! CPU and second, with a budget of its own (a drop flood does not silence the access log),
//! so a flood cannot flood user space; the rest are counted as suppressed.

use crate::addr::Addr;

/// Key of [`crate::maps::DROPS`]: a container port that packets were dropped at.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub target: u32,
    /// Container port, host byte order; 0 for port-less packets.
    pub port: u16,
    pub proto: u8,
    /// `DROP_*` flags.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<DropKey>() == 8);

impl DropKey {
    /// The key of an empty [`DropSlot`]: no drop is counted for target 0 (not a container).
    pub const EMPTY: DropKey = DropKey { target: 0, port: 0, proto: 0, flags: 0 };

    /// The [`crate::maps::DROP_SLOTS`] slot this key is counted in first: a multiplicative
    /// hash of its fields, so the ports of one container and the containers of one port spread.
    #[inline(always)]
    pub const fn slot(&self) -> u32 {
        let rest = (self.port as u32) << 16 | (self.proto as u32) << 8 | self.flags as u32;
        let mixed = (self.target.wrapping_mul(0x9E37_79B1) ^ rest).wrapping_mul(0x85EB_CA6B);
        mixed >> (32 - DROP_SLOT_BITS)
    }
}

/// A value of [`crate::maps::DROP_SLOTS`]: one drop counter, in the slot of its key.
///
/// Drop counters live in two maps, both per CPU. First a direct-mapped array: a key goes to the
/// slot [`DropKey::slot`] names, takes it if it is empty ([`DropKey::EMPTY`]) and keeps it.
/// A key whose slot another key holds is counted in [`crate::maps::DROPS`], a hash, as every
/// key once was. The array costs a few ns (the JIT inlines the lookup) where the hash costs
/// ~15: a flood at one port, or the ports a host sees dropped every day, stay in the array.
/// The totals are the same; user space adds both maps up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropSlot {
    pub key: DropKey,
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<DropSlot>() == 16);

/// log2 of [`crate::maps::DROP_SLOTS_CAPACITY`].
pub const DROP_SLOT_BITS: u32 = 12;

/// The packet came through a port Docker publishes (not routed to the container directly).
pub const DROP_PUBLISHED: u8 = 1;
/// Audit mode waived the drop: the packet passed.
pub const DROP_AUDITED: u8 = 2;
/// Dropped by the bridge gate, after NAT (the XDP filter did not know the target yet).
pub const DROP_AT_GATE: u8 = 4;
/// Over the port's rate limit of new flows from this source ([`crate::ratelimit`]).
pub const DROP_RATE_LIMITED: u8 = 8;

/// One reported drop (or audit-mode would-drop), or access. The `DROP_*` flags that describe
/// the path ([`DROP_PUBLISHED`]) mean the same in an access.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketEvent {
    pub src: Addr,
    pub dst: Addr,
    /// CLOCK_MONOTONIC.
    pub time_ns: u64,
    /// The container's target id; 0 when not bound for a known container.
    pub target: u32,
    pub ifindex: u32,
    pub sport: u16,
    pub dport: u16,
    /// The container port it was bound for (0 if none or port-less).
    pub container_port: u16,
    pub proto: u8,
    /// A [`crate::reason::Reason`].
    pub reason: u8,
    /// `DROP_*` flags.
    pub flags: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<PacketEvent>() == 64);

/// Events a CPU may report per second; the rest are counted in [`EVENT_STATS`] slots.
pub const EVENTS_PER_SECOND_PER_CPU: u32 = 50;
/// Size of the ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// The event streams, each with its own entry in [`crate::maps::EVENT_LIMIT`] and its own
/// [`EVENT_OUTCOMES`] slots in [`crate::maps::EVENT_STATS`].
pub const EVENT_STREAMS: u32 = 2;
pub const STREAM_DROPS: u32 = 0;
pub const STREAM_ACCESS: u32 = 1;

/// Per-CPU rate limiter state (one entry of [`crate::maps::EVENT_LIMIT`] per stream).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Limiter {
    pub window_start_ns: u64,
    pub emitted: u32,
    /// Drops suppressed since the window was last checked against the clock.
    pub suppressed_since_check: u32,
}
const _: () = assert!(core::mem::size_of::<Limiter>() == 16);

/// What became of an event, per stream: slot `stream * EVENT_OUTCOMES + outcome` of
/// [`crate::maps::EVENT_STATS`] (per-CPU counters); see [`event_stat_slot`].
pub const EVENT_OUTCOMES: u32 = 3;
pub const EVENTS_EMITTED: u32 = 0;
/// Over the rate limit.
pub const EVENTS_SUPPRESSED: u32 = 1;
/// The ring buffer was full (user space not keeping up).
pub const EVENTS_LOST: u32 = 2;
pub const EVENT_STATS: u32 = EVENT_STREAMS * EVENT_OUTCOMES;

/// The [`crate::maps::EVENT_STATS`] slot counting `outcome` of `stream`.
#[inline(always)]
pub const fn event_stat_slot(stream: u32, outcome: u32) -> u32 {
    stream * EVENT_OUTCOMES + outcome
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], explicit padding, no pointers.
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::PacketEvent {}
    unsafe impl aya::Pod for super::DropSlot {}
    unsafe impl aya::Pod for super::Limiter {}
}
