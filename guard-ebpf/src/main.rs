//! guard's kernel side.
//!
//! On every uplink:
//! - `guard_xdp` (XDP ingress) drops container-bound packets from outside unless opened;
//! - `guard_tc_egress` (TCX egress) remembers outbound flows whose replies would otherwise look
//!   container-bound, so they are never dropped.
//!
//! On every Docker bridge:
//! - `guard_tc_gate` (TCX egress) decides again after NAT, for packets that arrived on an
//!   uplink: a container the agent has not learnt of yet is closed from its first packet;
//! - `guard_tc_bridge_in` (TCX ingress) remembers the flows containers start, so the gate lets
//!   their replies through.
//!
//! Entry points are thin and total: parse, decide with the shared
//! [`guard_common::decision::decide`], count the reason, return the reason's verdict.
//! No logging on the packet path.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    maps::{PerCpuHashMap, RingBuf},
};
use guard_common::events::DROP_AT_GATE;
use guard_common::{
    addr::Addr,
    decision::{L4Kind, Tables},
    maps::{
        ADDRS_CAPACITY, AddrInfo, CONFIG_AUDIT_ALL, CONFIG_HAS_TRUSTED, Config, ContainerId,
        FLOW_TIMEOUT_NS, FLOWS_CAPACITY, FlowKey, FlowSeen, IDENTITIES_CAPACITY, NETWORKS_CAPACITY,
        PORTS_CAPACITY, PUBLISHED_CAPACITY, PortKey, PortRule, PublishedKey, PublishedTarget,
        SOURCES_CAPACITY, SourceKey, TRUSTED_CAPACITY,
    },
    prefilter::{self, Bitmap},
    reason::{COUNTER_SLOTS, Decision, Verdict},
};
use guard_common::{
    decision::{Packet, Resolved, decide_resolved},
    events::{
        DROP_AUDITED, DROP_PUBLISHED, DropEvent, DropKey, EVENT_STATS, EVENTS_EMITTED, EVENTS_LOST,
        EVENTS_PER_SECOND_PER_CPU, EVENTS_RING_BYTES, EVENTS_SUPPRESSED, Limiter,
    },
    maps::{DROPS_CAPACITY, UPLINKS_CAPACITY},
};
use parse::Frame;

// Map statics are named exactly as guard_common::maps names them; the agent finds them by
// those names and pins them under the same names.
#[map]
static GUARD_ADDRS: HashMap<Addr, AddrInfo> = HashMap::pinned(ADDRS_CAPACITY, 0);
#[map]
static GUARD_NETWORKS: LpmTrie<Addr, u32> = LpmTrie::pinned(NETWORKS_CAPACITY, 0);
#[map]
static GUARD_PUBLISHED: HashMap<PublishedKey, PublishedTarget> =
    HashMap::pinned(PUBLISHED_CAPACITY, 0);
#[map]
static GUARD_PORTS: HashMap<PortKey, PortRule> = HashMap::pinned(PORTS_CAPACITY, 0);
#[map]
static GUARD_SOURCES: LpmTrie<SourceKey, u32> = LpmTrie::pinned(SOURCES_CAPACITY, 0);
/// Written and read by the agent only; declared here so it is created and pinned with the rest.
#[map]
static GUARD_IDENTS: HashMap<u32, ContainerId> = HashMap::pinned(IDENTITIES_CAPACITY, 0);
#[map]
static GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
#[map]
static GUARD_PREFILTER: Array<Bitmap> = Array::pinned(prefilter::ENTRIES, 0);
#[map]
static GUARD_FLOWS: LruHashMap<FlowKey, FlowSeen> = LruHashMap::pinned(FLOWS_CAPACITY, 0);
#[map]
static GUARD_TRUSTED: LpmTrie<Addr, u32> = LpmTrie::pinned(TRUSTED_CAPACITY, 0);
#[map]
static GUARD_CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static GUARD_DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::pinned(DROPS_CAPACITY, 0);
#[map]
static GUARD_EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
#[map]
static GUARD_EVLIMIT: PerCpuArray<Limiter> = PerCpuArray::pinned(1, 0);
#[map]
static GUARD_EVSTATS: PerCpuArray<u64> = PerCpuArray::pinned(EVENT_STATS, 0);
#[map]
static GUARD_UPLINKS: HashMap<u32, u32> = HashMap::pinned(UPLINKS_CAPACITY, 0);
#[map]
static GUARD_GATE: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[inline(always)]
fn config_flag(flag: u32) -> bool {
    GUARD_CONFIG.get(0).is_some_and(|c| c.flags & flag != 0)
}

/// Whether `bit` is set in prefilter entry `entry`. A missing entry cannot happen (arrays are
/// preallocated); if it did, answer "maybe", which costs a lookup but never opens anything.
#[inline(always)]
fn prefilter_bit(entry: u32, bit: u16) -> bool {
    GUARD_PREFILTER.get(entry).is_none_or(|bitmap| bitmap.get(bit))
}

/// The policy tables, as BPF maps.
struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn may_hold_container(&self, dst: &Addr) -> bool {
        let (entry, bit) = prefilter::address_bucket(dst);
        prefilter_bit(entry, bit)
    }

    #[inline(always)]
    fn may_be_published(&self, port: u16) -> bool {
        prefilter_bit(prefilter::PUBLISHED_PORTS, port)
    }

    #[inline(always)]
    fn addr_info(&self, addr: &Addr) -> Option<AddrInfo> {
        // SAFETY: the value is copied out before any other map operation.
        unsafe { GUARD_ADDRS.get(addr) }.copied()
    }

    #[inline(always)]
    fn in_docker_network(&self, addr: &Addr) -> bool {
        GUARD_NETWORKS.get(Key::new(128, *addr)).is_some()
    }

    #[inline(always)]
    fn published(&self, key: &PublishedKey) -> Option<PublishedTarget> {
        // SAFETY: as above.
        unsafe { GUARD_PUBLISHED.get(key) }.copied()
    }

    #[inline(always)]
    fn port_rule(&self, key: &PortKey) -> Option<PortRule> {
        // SAFETY: as above.
        unsafe { GUARD_PORTS.get(key) }.copied()
    }

    #[inline(always)]
    fn source_listed(&self, key: &PortKey, src: &Addr) -> bool {
        let lpm_key = Key::new(SourceKey::PORT_BITS + 128, SourceKey { port: *key, addr: *src });
        GUARD_SOURCES.get(lpm_key).is_some()
    }

    #[inline(always)]
    fn flow_seen(&self, key: &FlowKey) -> bool {
        // SAFETY: the value is copied out at once.
        let Some(seen) = (unsafe { GUARD_FLOWS.get(key) }).copied() else {
            return false;
        };
        // TCP needs no clock: a bare SYN never reaches here. Others expire.
        key.proto == 6 || unsafe { bpf_ktime_get_ns() }.saturating_sub(seen) < FLOW_TIMEOUT_NS
    }

    #[inline(always)]
    fn source_trusted(&self, src: &Addr) -> bool {
        config_flag(CONFIG_HAS_TRUSTED) && GUARD_TRUSTED.get(Key::new(128, *src)).is_some()
    }

    #[inline(always)]
    fn audit_all(&self) -> bool {
        config_flag(CONFIG_AUDIT_ALL)
    }
}

#[xdp]
pub fn guard_xdp(ctx: XdpContext) -> u32 {
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    let decision = judge_frame(frame, ctx.ingress_ifindex() as u32, 0);
    count(&GUARD_COUNTERS, decision);
    match decision.verdict() {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// Parses and decides; a drop (or audited would-drop) is recorded with `flags` added.
#[inline(always)]
fn judge_frame(frame: Frame, ifindex: u32, flags: u8) -> Decision {
    match parse::parse(frame) {
        Ok(packet) => {
            let (decision, resolved) = decide_resolved(&Maps, &packet);
            if decision.reason.verdict() == Verdict::Drop {
                record_drop(&packet, decision, resolved, ifindex, flags);
            }
            decision
        }
        Err(reason) => Decision::enforced(reason),
    }
}

/// The bridge gate: packets the host sends into a Docker network, after NAT. Only those that
/// arrived on an uplink are judged; the host's own and other containers' pass untouched.
#[classifier]
pub fn guard_tc_gate(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: the value is not used, only its presence.
    if unsafe { GUARD_UPLINKS.get(&ingress) }.is_none() {
        return TC_ACT_UNSPEC;
    }
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    let decision = judge_frame(frame, ingress, DROP_AT_GATE);
    count(&GUARD_GATE, decision);
    match decision.verdict() {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Packets containers send out through the host: remember their flows, so the gate knows the
/// replies (which arrive on an uplink and are de-NATed to the container) are replies.
#[classifier]
pub fn guard_tc_bridge_in(ctx: TcContext) -> i32 {
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    if let Ok(packet) = parse::parse(frame)
        && let Some(flow) = outbound_flow(&packet)
    {
        remember(&flow);
    }
    TC_ACT_UNSPEC
}

/// A drop (or an audited would-drop): the container port's counter, and an event if this CPU
/// has not used up its share for this second.
#[inline(always)]
fn record_drop(packet: &Packet, decision: Decision, resolved: Resolved, ifindex: u32, flags: u8) {
    let mut flags = flags;
    if resolved.published != 0 {
        flags |= DROP_PUBLISHED;
    }
    if decision.audited {
        flags |= DROP_AUDITED;
    }
    if resolved.target != 0 {
        let key =
            DropKey { target: resolved.target, port: resolved.port, proto: resolved.proto, flags };
        match GUARD_DROPS.get_ptr_mut(&key) {
            // SAFETY: this CPU's slot.
            Some(count) => unsafe { *count += 1 },
            None => {
                let _ = GUARD_DROPS.insert(&key, &1, 0);
            }
        }
    }

    let Some(limiter) = GUARD_EVLIMIT.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot.
    let limiter = unsafe { &mut *limiter };
    // Over the budget (a flood), the clock is read only every 64th drop, to notice that a new
    // second has begun; under it, the event needs a timestamp anyway, and that one read also
    // rolls the window.
    if limiter.emitted >= EVENTS_PER_SECOND_PER_CPU {
        limiter.suppressed_since_check = limiter.suppressed_since_check.wrapping_add(1);
        bump_event_stat(EVENTS_SUPPRESSED);
        if limiter.suppressed_since_check & 63 == 0
            && unsafe { bpf_ktime_get_coarse_ns() }.wrapping_sub(limiter.window_start_ns)
                > 1_000_000_000
        {
            limiter.emitted = 0;
        }
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(limiter.window_start_ns) > 1_000_000_000 {
        limiter.window_start_ns = now;
        limiter.emitted = 0;
    }
    limiter.emitted += 1;
    let l4 = packet.l4;
    let event = DropEvent {
        src: packet.src,
        dst: packet.dst,
        time_ns: now,
        target: resolved.target,
        ifindex,
        sport: l4.sport,
        dport: l4.dport,
        container_port: resolved.port,
        proto: if resolved.proto != 0 { resolved.proto } else { l4.proto },
        reason: decision.reason as u8,
        flags,
        _pad: [0; 7],
    };
    match GUARD_EVENTS.output::<DropEvent>(&event, 0) {
        Ok(()) => bump_event_stat(EVENTS_EMITTED),
        Err(_) => bump_event_stat(EVENTS_LOST),
    }
}

#[inline(always)]
fn bump_event_stat(slot: u32) {
    if let Some(counter) = GUARD_EVSTATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
}

/// Remembers outbound flows whose replies would look container-bound: from a host port that
/// Docker also publishes (a masqueraded connection that happened to get that port), or from a
/// container address (networks without NAT). Never drops or changes anything.
#[classifier]
pub fn guard_tc_egress(ctx: TcContext) -> i32 {
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    if let Ok(packet) = parse::parse(frame)
        && let Some(flow) = outbound_flow(&packet)
    {
        let (entry, bit) = prefilter::address_bucket(&packet.src);
        if prefilter_bit(prefilter::PUBLISHED_PORTS, flow.local_port) || prefilter_bit(entry, bit) {
            remember(&flow);
        }
    }
    // TCX_NEXT: no opinion, let any other program (or the default) decide.
    TC_ACT_UNSPEC
}

/// The flow an outbound packet belongs to, keyed as its replies will arrive.
#[inline(always)]
fn outbound_flow(packet: &Packet) -> Option<FlowKey> {
    let l4 = packet.l4;
    (l4.kind == L4Kind::Ports).then_some(FlowKey {
        remote: packet.dst,
        local: packet.src,
        remote_port: l4.dport,
        local_port: l4.sport,
        proto: l4.proto,
        _pad: [0; 3],
    })
}

/// Records a flow, rewriting its timestamp at most once a second per flow (an update per
/// packet would make every packet of a bulk flow pay for a map write).
#[inline(always)]
fn remember(key: &FlowKey) {
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the value is copied out at once.
    let seen = unsafe { GUARD_FLOWS.get(key) }.copied();
    if seen.is_none_or(|seen| now.saturating_sub(seen) > 1_000_000_000) {
        let _ = GUARD_FLOWS.insert(key, &now, 0);
    }
}

#[inline(always)]
fn count(counters: &PerCpuArray<u64>, decision: Decision) {
    if let Some(counter) = counters.get_ptr_mut(decision.counter_slot()) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
