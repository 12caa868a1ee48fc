//! Where the kernel counts drops per container port: first in a slot of a per-CPU array, and
//! in the hash when another key holds that slot (see `guard_common::events::DropSlot`). The
//! agent reads the sum: whichever map a drop went to, the totals are exact.

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use guard_common::{
    events::{DropKey, DropSlot},
    maps::DROP_SLOTS,
};

use super::*;

fn totals(g: &Loaded) -> std::collections::BTreeMap<DropKey, u64> {
    g.maps.drops().expect("read drop counters").into_iter().collect()
}

#[test]
fn a_drop_whose_slot_another_key_holds_counts_in_the_hash_and_a_gone_container_s_slot_is_freed() {
    let mut g = Loaded::seed().with_uplink();
    let db = g.desired.containers.iter().find(|c| c.container.name == "db").unwrap().target;
    let key = DropKey { target: db, port: 5432, proto: 6, flags: 0 };
    let probe = Frame::new(OUTSIDE_A, DB, Tcp(5432)).bytes();
    let mut slots: PerCpuArray<MapData, DropSlot> =
        PerCpuArray::try_from(admission::pinned(&g.pins, DROP_SLOTS)).expect("the slots map");
    let cpus = aya::util::nr_cpus().expect("the number of CPUs");

    // A container that is gone (its target id never returns) holds the slot on every CPU.
    let squatter = DropKey { target: u32::MAX - 1, ..key };
    let held = vec![DropSlot { key: squatter, count: 7 }; cpus];
    slots.set(key.slot(), PerCpuValues::try_from(held).unwrap(), 0).unwrap();
    for _ in 0..3 {
        assert_eq!(g.run(&probe, Framing::Ethernet), XDP_DROP);
    }
    let after = totals(&g);
    assert_eq!(after.get(&key), Some(&3), "counted in the hash: {after:?}");
    assert_eq!(after.get(&squatter), Some(&(7 * cpus as u64)), "the slot's own count stays");

    // The agent forgets the gone container: its slot is freed, the next drop takes it.
    let live: BTreeSet<u32> = g.desired.tables.identities.keys().copied().collect();
    assert!(!live.contains(&squatter.target) && live.contains(&db));
    g.maps.forget_drops(&live);
    for _ in 0..2 {
        assert_eq!(g.run(&probe, Framing::Ethernet), XDP_DROP);
    }
    let after = totals(&g);
    assert_eq!(after.get(&key), Some(&5), "the hash's 3 and the slot's 2: {after:?}");
    assert!(!after.contains_key(&squatter), "the gone container's count is forgotten");
    let slot = slots.get(&key.slot(), 0).unwrap();
    assert!(slot.contains(&DropSlot { key, count: 2 }), "the slot is the key's now");
}
