//! guard's kernel side.
//!
//! On every uplink, in the variant for its framing (Ethernet, or the IP header first on tun,
//! WireGuard and other L3 links):
//! - `guard_xdp` / `guard_xdp_ip` (XDP ingress) drops container-bound packets from outside
//!   unless opened;
//! - `guard_tc_egress` / `guard_tc_egress_ip` (TC egress) remembers the flows the host and its
//!   containers start whose replies would otherwise be dropped, so they never are; and drops a
//!   container's SYN-ACK to a connection the policy did not open (a container or network the
//!   agent has not seen, even while it is away).
//!
//! On every Docker bridge:
//! - `guard_tc_gate` (TCX egress) decides again after NAT, for packets that arrived on an
//!   uplink: anything the agent has not listed is closed from its first packet;
//! - `guard_tc_bridge_in` (TCX ingress) remembers the flows containers start, so the gate lets
//!   their replies through.
//!
//! `guard_explain` / `guard_explain_ip` are never attached: `guard explain` runs them on a
//! packet it makes up, and they return the decision instead of acting on it.
//!
//! Entry points are thin and total: parse with the shared [`guard_common::parse`], decide with
//! the shared [`guard_common::decision`], count the reason, return the reason's verdict.
//! No logging on the packet path.
#![no_std]
#![no_main]

use aya_ebpf::maps::{PerCpuHashMap, RingBuf};
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup as bpf_fib_lookup_t, xdp_action,
    },
    cty::c_void,
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use guard_common::arrivals::{self, FlowStart, flow_start};
use guard_common::events::DROP_AT_GATE;
use guard_common::parse::{self as parser, Bytes, Framing, IPPROTO_TCP};
use guard_common::{
    addr::Addr,
    decision::{L4Kind, Tables},
    maps::{
        ADDRS_CAPACITY, AddrInfo, CONFIG_AUDIT_ALL, CONFIG_HAS_DENY_EXACT, CONFIG_HAS_DENY_PREFIX,
        CONFIG_HAS_TRUSTED, Config, ContainerId, DENY_EXACT_CAPACITY, DENY_PREFIX_CAPACITY,
        FLOWS_CAPACITY, FlowKey, FlowSeen, IDENTITIES_CAPACITY, NETWORKS_CAPACITY, PORTS_CAPACITY,
        PUBLISHED_CAPACITY, PortKey, PortRule, PublishedKey, PublishedTarget, SOURCES_CAPACITY,
        SourceKey, TARGET_AUDIT, TARGET_RATE_LIMITED, TRUSTED_CAPACITY,
    },
    prefilter::{self, Bitmap},
    reason::{COUNTER_SLOTS, Decision, Reason, Verdict},
};
use guard_common::{
    decision::{L4, Packet, Resolved, decide_parsed, flow_to_remember},
    events::{
        DROP_AUDITED, DROP_PUBLISHED, DROP_RATE_LIMITED, DropKey, DropSlot, EVENT_STATS,
        EVENT_STREAMS, EVENTS_EMITTED, EVENTS_LOST, EVENTS_PER_SECOND_PER_CPU, EVENTS_RING_BYTES,
        EVENTS_SUPPRESSED, Limiter, PacketEvent, STREAM_ACCESS, STREAM_DROPS, event_stat_slot,
    },
    maps::{
        ARRIVALS_CAPACITY, DROP_SLOTS_CAPACITY, DROPS_CAPACITY, IFACE_DOCKER, IFACE_UPLINK,
        RATE_BUCKETS_CAPACITY, RATE_LIMITS_CAPACITY, UPLINKS_CAPACITY,
    },
    ratelimit::{self, BucketKey, RateLimit},
};

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
static GUARD_DROPSLOTS: PerCpuArray<DropSlot> = PerCpuArray::pinned(DROP_SLOTS_CAPACITY, 0);
#[map]
static GUARD_EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
#[map]
static GUARD_EVLIMIT: PerCpuArray<Limiter> = PerCpuArray::pinned(EVENT_STREAMS, 0);
#[map]
static GUARD_EVSTATS: PerCpuArray<u64> = PerCpuArray::pinned(EVENT_STATS, 0);
#[map]
static GUARD_UPLINKS: HashMap<u32, u32> = HashMap::pinned(UPLINKS_CAPACITY, 0);
#[map]
static GUARD_GATE: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
#[map]
static GUARD_DENY_HOST: HashMap<Addr, u32> = HashMap::pinned(DENY_EXACT_CAPACITY, 0);
#[map]
static GUARD_DENY_NET: LpmTrie<Addr, u32> = LpmTrie::pinned(DENY_PREFIX_CAPACITY, 0);
#[map]
static GUARD_RATES: HashMap<PortKey, RateLimit> = HashMap::pinned(RATE_LIMITS_CAPACITY, 0);
#[map]
static GUARD_BUCKETS: LruHashMap<BucketKey, u64> = LruHashMap::pinned(RATE_BUCKETS_CAPACITY, 0);
#[map]
static GUARD_ARRIVALS: LruHashMap<FlowKey, u64> = LruHashMap::pinned(ARRIVALS_CAPACITY, 0);

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

/// The policy tables, as BPF maps. `BEHIND_BRIDGE` is [`Tables::behind_bridge`], a constant
/// so that each instance is verified with its own answer: as a runtime value, every branch on
/// it doubles the states the verifier walks, past its limit. `DENIES`: whether the deny sets
/// are looked up (everywhere but the gate, see [`guard_tc_gate`]).
struct Maps<const BEHIND_BRIDGE: bool, const DENIES: bool = true> {
    /// The program's context (`xdp_md` or `__sk_buff`), for the FIB helper.
    ctx: *mut c_void,
    /// The interface the packet arrived on, for the FIB lookup.
    ifindex: u32,
}

impl<const BEHIND_BRIDGE: bool, const DENIES: bool> Tables for Maps<BEHIND_BRIDGE, DENIES> {
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
        // TCP needs no clock (a bare SYN never reaches here), so it is not read for TCP.
        key.proto == IPPROTO_TCP || key.alive(seen, unsafe { bpf_ktime_get_ns() })
    }

    #[inline(always)]
    fn source_trusted(&self, src: &Addr) -> bool {
        config_flag(CONFIG_HAS_TRUSTED) && GUARD_TRUSTED.get(Key::new(128, *src)).is_some()
    }

    /// Single addresses in a hash (one lookup), prefixes in a trie; each only while it holds
    /// something, so a host without bans pays two flag tests.
    #[inline(always)]
    fn source_denied(&self, src: &Addr) -> bool {
        if !DENIES {
            return false;
        }
        // SAFETY: the value is read for its presence only.
        (config_flag(CONFIG_HAS_DENY_EXACT) && unsafe { GUARD_DENY_HOST.get(src) }.is_some())
            || (config_flag(CONFIG_HAS_DENY_PREFIX)
                && GUARD_DENY_NET.get(Key::new(128, *src)).is_some())
    }

    #[inline(always)]
    fn audit_all(&self) -> bool {
        config_flag(CONFIG_AUDIT_ALL)
    }

    #[inline(always)]
    fn behind_bridge(&self) -> bool {
        BEHIND_BRIDGE
    }

    /// The kernel's own answer: a FIB lookup as if forwarding the packet. Anything but "it
    /// goes out through this neighbour" (a local, broadcast or anycast route; no route;
    /// forwarding off on the interface; an error) is taken as kept here: the packet is then
    /// judged by the wildcard publish, which can only close what the host would not forward.
    #[inline(always)]
    fn delivered_locally(&self, dst: &Addr) -> bool {
        // struct bpf_fib_lookup as words: family | l4_protocol | sport, dport | tot_len,
        // ifindex, tos/flowinfo, source (4 words), destination (4 words), vlan, MACs.
        let mut params = [0u32; 16];
        params[0] = if dst.is_v4() { AF_INET } else { AF_INET6 };
        params[2] = self.ifindex;
        if dst.is_v4() {
            params[8] = dst.0[3];
        } else {
            params[8..12].copy_from_slice(&dst.0);
        }
        // SAFETY: `params` is the 64-byte struct the helper reads and writes.
        let rc = unsafe {
            bpf_fib_lookup(self.ctx, params.as_mut_ptr() as *mut bpf_fib_lookup_t, 64, 0)
        };
        !matches!(
            rc as u32,
            BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED
        )
    }
}

/// Address families, as `struct bpf_fib_lookup` takes them (the first byte of its first word).
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The bytes of a packet in kernel memory, `[data, data_end)`.
#[derive(Clone, Copy)]
struct Frame {
    data: usize,
    data_end: usize,
}

/// Reads a field of a window [`Frame::window`] bounds-checked.
///
/// Typed loads, not byte arrays: LLVM splits loads of `[u8; N]` into N byte loads. Packet
/// fields need not be aligned for the BPF target (the verifier permits unaligned packet access
/// unless BPF_F_STRICT_ALIGNMENT is asked for, and the JITs of the architectures guard runs on
/// handle it), so a plain typed load is both valid there and the cheapest.
macro_rules! load {
    ($ty:ty, $window:expr, $at:expr) => {
        // SAFETY: the parser reads only inside a window that `window` checked.
        unsafe { core::ptr::read(($window + $at) as *const $ty) }
    };
}

impl Bytes for Frame {
    /// A pointer into the packet. Each header is checked once and every field is read through
    /// the pointer this returns: the verifier does not carry a bounds check over to a pointer
    /// computed separately, even at the same offset.
    type Window = usize;

    #[inline(always)]
    fn window(&self, offset: usize, len: usize) -> Option<usize> {
        let start = self.data + offset;
        if start + len > self.data_end {
            return None;
        }
        Some(start)
    }
    #[inline(always)]
    fn u8_at(&self, window: usize, at: usize) -> u8 {
        load!(u8, window, at)
    }
    #[inline(always)]
    fn u16_at(&self, window: usize, at: usize) -> u16 {
        load!(u16, window, at)
    }
    #[inline(always)]
    fn u32_at(&self, window: usize, at: usize) -> u32 {
        load!(u32, window, at)
    }
}

#[xdp]
pub fn guard_xdp(ctx: XdpContext) -> u32 {
    filter(&ctx, Framing::Ethernet)
}

/// For links whose frames start with the IP header (tun, WireGuard, ipip, sit, GRE, PPP).
#[xdp]
pub fn guard_xdp_ip(ctx: XdpContext) -> u32 {
    filter(&ctx, Framing::Ip)
}

/// What every XDP entry reads a packet with: its bytes, and the maps as seen from the
/// interface it arrived on.
#[inline(always)]
fn xdp_inputs(ctx: &XdpContext) -> (Frame, Maps<false>) {
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    (frame, Maps { ctx: ctx.as_ptr(), ifindex: ctx.ingress_ifindex() as u32 })
}

#[inline(always)]
fn filter(ctx: &XdpContext, framing: Framing) -> u32 {
    let (frame, maps) = xdp_inputs(ctx);
    let parsed = parser::parse(&frame, framing);
    let (mut decision, resolved) = decide_parsed(&maps, parsed);
    if let Ok(packet) = parsed {
        if decision.reason.is_opening() {
            decision = admit(&maps, &packet, decision, resolved);
        }
        if decision.reason.verdict() == Verdict::Drop {
            record_drop(&packet, decision, resolved, maps.ifindex, 0);
        }
    }
    count(&GUARD_COUNTERS, decision);
    match decision.verdict() {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// `guard explain`: the filter's decision on a packet the agent made up, returned (as its
/// counter slot, see [`Decision::counter_slot`]) instead of acted on. Nothing is counted and
/// no drop event is emitted, so asking never shows up as traffic. Run only through
/// BPF_PROG_TEST_RUN, never attached.
#[xdp]
pub fn guard_explain(ctx: XdpContext) -> u32 {
    explain(&ctx, Framing::Ethernet)
}

/// [`guard_explain`] for links whose frames start with the IP header.
#[xdp]
pub fn guard_explain_ip(ctx: XdpContext) -> u32 {
    explain(&ctx, Framing::Ip)
}

#[inline(always)]
fn explain(ctx: &XdpContext, framing: Framing) -> u32 {
    let (frame, maps) = xdp_inputs(ctx);
    decide_parsed(&maps, parser::parse(&frame, framing)).0.counter_slot()
}

/// A packet an opening let in, on an uplink: if it starts a flow (see
/// [`guard_common::arrivals`]), the flow meets its port's rate limit and, admitted, is reported
/// as an access. Traffic nothing opened never gets here, so it pays nothing for either.
///
/// A UDP flow is remembered as arrived only once admitted: a flow the limit dropped must meet
/// it again with its next packet, or a flood from one source port would be judged once.
#[inline(always)]
fn admit(maps: &Maps<false>, packet: &Packet, opened: Decision, resolved: Resolved) -> Decision {
    // The clock is read only where an arrival or a bucket needs it (a TCP SYN to a port
    // without a limit needs neither; its access event reads its own): 0 until then.
    let mut now = 0;
    let arrival = match flow_start(packet) {
        // A later segment of a connection, say: no clock read, no map.
        FlowStart::No => return opened,
        FlowStart::Yes => None,
        FlowStart::IfUnseen(key) => {
            now = unsafe { bpf_ktime_get_ns() };
            // SAFETY: the value is copied out at once.
            let seen = unsafe { GUARD_ARRIVALS.get(&key) }.copied();
            if !arrivals::is_new(seen, now) {
                if arrivals::needs_refresh(seen, now) {
                    let _ = GUARD_ARRIVALS.insert(&key, &now, 0);
                }
                return opened;
            }
            Some(key)
        }
    };
    let limited = resolved.flags & TARGET_RATE_LIMITED != 0
        && over_rate_limit(packet, resolved, now)
        && !maps.source_trusted(&packet.src);
    let decision = if limited {
        let audited = resolved.flags & TARGET_AUDIT != 0 || maps.audit_all();
        Decision { reason: Reason::RateLimited, audited }
    } else {
        opened
    };
    if decision.verdict() == Verdict::Pass {
        if let Some(key) = arrival {
            let _ = GUARD_ARRIVALS.insert(&key, &now, 0);
        }
        if !limited {
            report(
                STREAM_ACCESS,
                packet,
                opened.reason,
                resolved,
                maps.ifindex,
                path_flags(resolved),
            );
        }
    }
    decision
}

/// Whether a new flow from `packet`'s source to the container port `resolved` is over that
/// port's rate limit (or its protocol's, `*/udp`); admitted, it takes its place in the
/// source's bucket (see [`guard_common::ratelimit`]). `now`: the clock if already read, else 0.
#[inline(always)]
fn over_rate_limit(packet: &Packet, resolved: Resolved, now: u64) -> bool {
    let port = PortKey::new(resolved.target, resolved.proto, resolved.port);
    let every_port = PortKey::every_port_of(resolved.target, resolved.proto);
    // SAFETY: the values are copied out at once.
    let (key, limit) = match unsafe { GUARD_RATES.get(&port) } {
        Some(limit) => (port, *limit),
        None => match unsafe { GUARD_RATES.get(&every_port) } {
            Some(limit) => (every_port, *limit),
            None => return false,
        },
    };
    let now = if now != 0 { now } else { unsafe { bpf_ktime_get_ns() } };
    let bucket = BucketKey::new(key, &packet.src);
    // SAFETY: the value is copied out at once.
    let tat = unsafe { GUARD_BUCKETS.get(&bucket) }.copied();
    match ratelimit::admit(&limit, tat, now) {
        Some(next) => {
            let _ = GUARD_BUCKETS.insert(&bucket, &next, 0);
            false
        }
        None => true,
    }
}

/// The interface the kernel received the packet on (`skb->skb_iif`): 0 for packets the host
/// sends itself.
#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// Where a packet the host transmits came from, by the interface the kernel received it on
/// (`skb->skb_iif`: a routed packet's is the bridge it arrived on, a bridged one's the port).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Sent by the host itself (no ingress interface).
    Host,
    /// Arrived on a guarded uplink: from outside.
    Uplink(u32),
    /// Arrived on an interface that is neither guarded nor Docker's (a trusted one, one left
    /// out by `--iface`).
    Inside,
    /// Arrived on the bridge of a Docker network the agent knows: a container's packet.
    Docker,
    /// Arrived on an interface the agent has not named (see [`IFACE_DOCKER`]): a bridge of a
    /// network it has not seen, or an uplink back under a new index while it was away.
    Unnamed(u32),
}

/// The role the agent gave interface `ifindex`, if any.
#[inline(always)]
fn role(ifindex: u32) -> Option<u32> {
    // SAFETY: the value is copied out at once.
    unsafe { GUARD_UPLINKS.get(&ifindex) }.copied()
}

#[inline(always)]
fn origin(ctx: &TcContext) -> Origin {
    let ingress = ingress_ifindex(ctx);
    if ingress == 0 {
        return Origin::Host;
    }
    match role(ingress) {
        Some(IFACE_UPLINK) => Origin::Uplink(ingress),
        Some(IFACE_DOCKER) => Origin::Docker,
        Some(_) => Origin::Inside,
        None => Origin::Unnamed(ingress),
    }
}

/// The interface a TC program runs on (`skb->ifindex`).
#[inline(always)]
fn this_interface(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Whether the bridge a TC program runs on belongs to a network the agent knows. Behind one
/// it does not know, any destination is a network the agent has not seen (see
/// [`Tables::behind_bridge`]); behind a known one, a destination outside its subnets is
/// routed through a container (a VPN or subnet router): not guard's to judge.
#[inline(always)]
fn unseen_bridge(ctx: &TcContext) -> bool {
    role(this_interface(ctx)) != Some(IFACE_DOCKER)
}

/// The bridge gate: packets the host sends into a Docker network, after NAT. Those that arrived
/// on an uplink, or on an interface the agent has not named (an uplink back under a new index
/// while it was away), are judged; the host's own and containers' pass untouched.
///
/// The gate does not look up the deny sets: XDP dropped a denied source's packets on the
/// uplink before NAT, and the gate's two instances of the decision are at the verifier's
/// limit (a million instructions processed on 6.18) without them. A denied source behind an
/// uplink XDP does not run on yet (one back under a new index, until the agent's next pass)
/// reaches what is exposed, as everyone does there.
#[classifier]
pub fn guard_tc_gate(ctx: TcContext) -> i32 {
    let (ingress, seen_by_xdp) = match origin(&ctx) {
        Origin::Uplink(ingress) => (ingress, true),
        Origin::Unnamed(ingress) => (ingress, false),
        Origin::Host | Origin::Inside | Origin::Docker => return TC_ACT_UNSPEC,
    };
    let decision = if unseen_bridge(&ctx) {
        gate_decision::<true>(&ctx, ingress, false)
    } else {
        gate_decision::<false>(&ctx, ingress, seen_by_xdp)
    };
    count(&GUARD_GATE, decision);
    match decision.verdict() {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// The gate's decision on the packet in `ctx`, which arrived on `ingress` (an uplink XDP runs
/// on, if `seen_by_xdp`). Parsed within each instance: a parsed packet carried across the
/// branch on `BEHIND_BRIDGE` makes LLVM spill a register the verifier sees as uninitialised.
#[inline(always)]
fn gate_decision<const BEHIND_BRIDGE: bool>(
    ctx: &TcContext,
    ingress: u32,
    seen_by_xdp: bool,
) -> Decision {
    let maps = Maps::<BEHIND_BRIDGE, false> { ctx: ctx.as_ptr(), ifindex: ingress };
    let parsed = parse_skb(ctx);
    let (decision, resolved) = decide_parsed(&maps, parsed);
    if decision.reason.verdict() == Verdict::Drop
        && !counted_at_xdp::<BEHIND_BRIDGE>(decision, resolved, seen_by_xdp)
        && let Ok(packet) = parsed
    {
        record_drop(&packet, decision, resolved, maps.ifindex, DROP_AT_GATE);
    }
    decision
}

/// Whether XDP already counted this would-drop (its per-port counter and drop event), so the
/// gate must not count it again. Only audit mode lets a would-drop past XDP to reach the gate
/// (enforced, XDP dropped it). XDP judged it with the same maps, before NAT: a packet routed to
/// the container's address it saw as the gate does, one through a published port it resolved
/// to the same container through [`PUBLISHED`](guard_common::maps::PUBLISHED), which the agent
/// writes in the same pass as the container's addresses. So when the gate resolves a container
/// behind a bridge the agent knows, for a packet from an uplink XDP runs on, XDP counted it.
///
/// Everything else the gate still counts, because XDP did not: a container the gate does not
/// resolve (a port Docker published before the agent listed it, which XDP saw as the host's
/// business; the gate's reason is then `unassigned_addr` and it has no per-port counter), a
/// network the agent has not seen, an uplink back under a new index (no XDP on it yet).
///
/// Decided from the gate's own result, not from a mark left by XDP: nothing XDP can write
/// reaches the bridge (XDP metadata lives in the headroom the stack rewrites when it forwards,
/// and XDP cannot set `skb->mark`, which other tools own anyway).
#[inline(always)]
fn counted_at_xdp<const BEHIND_BRIDGE: bool>(
    decision: Decision,
    resolved: Resolved,
    seen_by_xdp: bool,
) -> bool {
    !BEHIND_BRIDGE && seen_by_xdp && decision.audited && resolved.target != 0
}

/// How much of a packet the gate makes linear when its first reading falls short: Ethernet,
/// the longest IPv4 header, ICMP, the quoted packet's headers and its ports, with room for
/// IPv6 and a fragment header.
const GATE_PULL: u32 = 256;

/// Parses a packet at the gate. An skb's linear head may end before what the parser needs:
/// drivers pull only the outer headers, so the packet an ICMP error quotes (a router's
/// "fragmentation needed" to a container on a routed network) can sit in page fragments. When
/// the first reading finds no ports and the skb holds more than its head, the head is pulled
/// and the packet read again; ordinary packets, whose ports are in the head, pay nothing.
///
/// The first reading only answers "short?"; the packet returned is always that of one final
/// reading. Returning either reading's packet made LLVM merge the two into values that are
/// undefined on some paths and spilled to the stack, which verifiers before Linux 6.3 reject
/// ("invalid read from stack").
#[inline(always)]
fn parse_skb(ctx: &TcContext) -> Result<Packet, Reason> {
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    let short = match parser::parse(&frame, Framing::Ethernet) {
        Ok(packet) => matches!(packet.l4.kind, L4Kind::NoPorts | L4Kind::Unreadable),
        Err(reason) => reason == Reason::Unreadable,
    };
    let head = (frame.data_end - frame.data) as u32;
    if short && head < ctx.len() {
        // A failed pull leaves the packet as it was: read as it is.
        let _ = ctx.pull_data(ctx.len().min(GATE_PULL));
    }
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    parser::parse(&frame, Framing::Ethernet)
}

/// Packets containers send out through the host: remember the flows they start, so the gate
/// knows the replies (which arrive on an uplink and are de-NATed to the container) are replies.
#[classifier]
pub fn guard_tc_bridge_in(ctx: TcContext) -> i32 {
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    if let Ok(packet) = parser::parse(&frame, Framing::Ethernet) {
        // The replies come back through this bridge's gate, judged as it judges them.
        if unseen_bridge(&ctx) {
            record_outbound::<true>(&ctx, &packet);
        } else {
            record_outbound::<false>(&ctx, &packet);
        }
    }
    TC_ACT_UNSPEC
}

/// Packets leaving through an uplink: remember the flows the host and its containers start
/// whose replies would look container-bound (a masqueraded connection that happened to get a
/// host port Docker publishes; a container on a network without NAT). Never drops or changes
/// anything: TCX_NEXT lets any other program (or the default) decide.
#[classifier]
pub fn guard_tc_egress(ctx: TcContext) -> i32 {
    leaving(&ctx, Framing::Ethernet)
}

/// [`guard_tc_egress`] for links whose frames start with the IP header.
#[classifier]
pub fn guard_tc_egress_ip(ctx: TcContext) -> i32 {
    leaving(&ctx, Framing::Ip)
}

/// A packet leaving through an uplink: remember the flow if it was started here, and let a
/// container of a network the agent has not seen accept a connection from outside only where
/// the policy opened it.
///
/// The second half is what closes such a network to TCP even while the agent is away: the
/// bridge gate sits only on the bridges the agent attached it to (a known network's bridge
/// has its gate, which judges its new containers), and XDP cannot see where Docker's NAT
/// sends a published port. But every TCP connection from outside needs the container's
/// SYN-ACK to leave through the uplink, having arrived on a bridge the agent has not named,
/// and there the answer is judged as the connection it accepts, behind the bridge. What the
/// policy opened passes, anything else is dropped: the handshake never completes.
#[inline(always)]
fn leaving(ctx: &TcContext, framing: Framing) -> i32 {
    let origin = origin(ctx);
    if matches!(origin, Origin::Uplink(_)) {
        // Forwarded from one uplink to another: not started here (see record_outbound).
        return TC_ACT_UNSPEC;
    }
    let frame = Frame { data: ctx.data(), data_end: ctx.data_end() };
    let Ok(packet) = parser::parse(&frame, framing) else {
        return TC_ACT_UNSPEC;
    };
    if packet.l4.accepts {
        match origin {
            Origin::Unnamed(_) => return judge_answer::<true>(ctx, &packet),
            // A known network's gate judged the SYN, unless it slipped in before the gate was
            // there (the bridge of an engine that creates it with the network's first
            // container, Podman): judged again where the policy already knows the port.
            Origin::Docker => return judge_answer::<false>(ctx, &packet),
            Origin::Host | Origin::Inside | Origin::Uplink(_) => {}
        }
    }
    record_outbound::<false>(ctx, &packet);
    TC_ACT_UNSPEC
}

/// A container's SYN-ACK leaving through an uplink, judged as the SYN it answers would be:
/// behind the bridge (`BEHIND_BRIDGE`, one the agent has not named: whatever it does not list
/// is closed), or as the uplink saw it (a known network's: what it does not list yet passes,
/// and the connection's next packet meets the gate). Counted at the gate's counters (a second
/// look after NAT, like the gate's) when it drops or would drop in audit mode; an answer the
/// policy opened was counted when its SYN came in.
#[inline(always)]
fn judge_answer<const BEHIND_BRIDGE: bool>(ctx: &TcContext, answer: &Packet) -> i32 {
    let l4 = answer.l4;
    let connection = Packet {
        src: answer.dst,
        dst: answer.src,
        l4: L4::ports(l4.proto, l4.dport, l4.sport, true),
    };
    let maps = Maps::<BEHIND_BRIDGE> { ctx: ctx.as_ptr(), ifindex: this_interface(ctx) };
    let (decision, resolved) = decide_parsed(&maps, Ok(connection));
    // In audit mode, a known network's connection was told when its SYN passed the uplink.
    if decision.reason.verdict() == Verdict::Drop && (BEHIND_BRIDGE || !decision.audited) {
        record_drop(&connection, decision, resolved, maps.ifindex, DROP_AT_GATE);
        count(&GUARD_GATE, decision);
    }
    match decision.verdict() {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT,
    }
}

/// Why flow memory and not the kernel's connection tracking (`bpf_xdp_ct_lookup`,
/// `bpf_skb_ct_lookup`, 5.19/6.0 on): those are kfuncs, and aya 0.14's loader cannot relocate
/// kfunc calls (aya-obj 0.3 has no ksym relocation), and aya 0.15 on needs a newer rustc than
/// this project's machines carry (README, Requirements). Nor would they cover Debian 11's
/// 5.10. So the programs keep their own memory, small and unpoisonable: what is remembered is
/// decided by [`flow_to_remember`] (only flows whose replies would otherwise drop), by whom it
/// is seen (only flows started here), and ICMP errors and later fragments need no entry of
/// their own.
///
/// Only flows that start on the host (no ingress interface) or in a container (received on a
/// bridge) are remembered: a packet the host merely forwards from one uplink to another could
/// carry any source, and remembering it would let an outsider plant the "reply" it sends next.
/// `BEHIND_BRIDGE`: whether the replies will be judged behind a bridge the agent does not
/// know (see [`Tables::behind_bridge`]).
#[inline(always)]
fn record_outbound<const BEHIND_BRIDGE: bool>(ctx: &TcContext, packet: &Packet) {
    let maps = Maps::<BEHIND_BRIDGE> { ctx: ctx.as_ptr(), ifindex: ingress_ifindex(ctx) };
    if let Some(flow) = flow_to_remember(&maps, packet) {
        remember(&flow);
    }
}

/// The `DROP_*` flags that say how a packet reached its container.
#[inline(always)]
fn path_flags(resolved: Resolved) -> u8 {
    if resolved.published != 0 { DROP_PUBLISHED } else { 0 }
}

/// A drop (or an audited would-drop): the container port's counter, and an event if this CPU
/// has not used up its share for this second.
#[inline(always)]
fn record_drop(packet: &Packet, decision: Decision, resolved: Resolved, ifindex: u32, flags: u8) {
    let mut flags = flags | path_flags(resolved);
    if decision.audited {
        flags |= DROP_AUDITED;
    }
    if decision.reason == Reason::RateLimited {
        flags |= DROP_RATE_LIMITED;
    }
    if resolved.target != 0 {
        count_drop(&DropKey {
            target: resolved.target,
            port: resolved.port,
            proto: resolved.proto,
            flags,
        });
    }
    report(STREAM_DROPS, packet, decision.reason, resolved, ifindex, flags);
}

/// Counts a drop at a container port: in its slot if the slot is its own or empty, else in
/// the hash (see [`DropSlot`]).
#[inline(always)]
fn count_drop(key: &DropKey) {
    if let Some(slot) = GUARD_DROPSLOTS.get_ptr_mut(key.slot()) {
        // SAFETY: this CPU's slot.
        let slot = unsafe { &mut *slot };
        if slot.key == *key {
            slot.count += 1;
            return;
        }
        if slot.key == DropKey::EMPTY {
            *slot = DropSlot { key: *key, count: 1 };
            return;
        }
    }
    match GUARD_DROPS.get_ptr_mut(key) {
        // SAFETY: this CPU's value.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = GUARD_DROPS.insert(key, &1, 0);
        }
    }
}

/// An event of `stream` (a drop or an access), if this CPU has not used up the stream's share
/// for this second; otherwise counted as suppressed.
#[inline(always)]
fn report(
    stream: u32,
    packet: &Packet,
    reason: Reason,
    resolved: Resolved,
    ifindex: u32,
    flags: u8,
) {
    let Some(limiter) = GUARD_EVLIMIT.get_ptr_mut(stream) else { return };
    // SAFETY: this CPU's slot.
    let limiter = unsafe { &mut *limiter };
    // Over the budget (a flood), the clock is read only every 64th drop, to notice that a new
    // second has begun; under it, the event needs a timestamp anyway, and that one read also
    // rolls the window. (Not the coarse clock: Linux 5.10 has no bpf_ktime_get_coarse_ns.)
    if limiter.emitted >= EVENTS_PER_SECOND_PER_CPU {
        limiter.suppressed_since_check = limiter.suppressed_since_check.wrapping_add(1);
        bump_event_stat(event_stat_slot(stream, EVENTS_SUPPRESSED));
        if limiter.suppressed_since_check & 63 == 0
            && unsafe { bpf_ktime_get_ns() }.wrapping_sub(limiter.window_start_ns) > 1_000_000_000
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
    let event = PacketEvent {
        src: packet.src,
        dst: packet.dst,
        time_ns: now,
        target: resolved.target,
        ifindex,
        sport: l4.sport,
        dport: l4.dport,
        container_port: resolved.port,
        proto: if resolved.proto != 0 { resolved.proto } else { l4.proto },
        reason: reason as u8,
        flags,
        _pad: [0; 7],
    };
    match GUARD_EVENTS.output::<PacketEvent>(&event, 0) {
        Ok(()) => bump_event_stat(event_stat_slot(stream, EVENTS_EMITTED)),
        Err(_) => bump_event_stat(event_stat_slot(stream, EVENTS_LOST)),
    }
}

#[inline(always)]
fn bump_event_stat(slot: u32) {
    if let Some(counter) = GUARD_EVSTATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
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
