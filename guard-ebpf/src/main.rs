//! guard's kernel side: one XDP program for every uplink.
//!
//! The entry point is thin and total: parse, decide with the shared
//! [`guard_common::decision::decide`], count the reason, return the reason's verdict.
//! No logging on the packet path.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use guard_common::{
    addr::Addr,
    decision::{Tables, decide},
    maps::{
        ADDRS_CAPACITY, AddrInfo, ContainerId, IDENTITIES_CAPACITY, NETWORKS_CAPACITY,
        PORTS_CAPACITY, PUBLISHED_CAPACITY, PortKey, PortRule, PublishedKey, PublishedTarget,
        SOURCES_CAPACITY, SourceKey,
    },
    reason::{Reason, Verdict},
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
static GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

/// The policy tables, as BPF maps.
struct Maps;

impl Tables for Maps {
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
}

#[xdp]
pub fn guard_xdp(ctx: XdpContext) -> u32 {
    let reason = match parse::parse(&ctx) {
        Ok(packet) => decide(&Maps, &packet),
        Err(reason) => reason,
    };
    count(reason);
    match reason.verdict() {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(counter) = GUARD_COUNTERS.get_ptr_mut(reason as u32) {
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
