//! Target ids: the small integers the kernel knows containers by.
//!
//! A target id names one container *identity* (Docker's container id), never an address, and
//! is never handed to another container while this agent runs: ids only grow. So an address
//! that moves from one container to another can never carry the first one's openings along,
//! whatever order the map updates land in. The mapping is kept in the pinned IDENTITIES map,
//! so a restarted agent adopts it instead of renumbering every container.

use std::collections::BTreeMap;

use guard_common::maps::ContainerId;

#[derive(Debug, Default)]
pub struct Identities {
    by_container: BTreeMap<String, u32>,
    next: u32,
}

impl Identities {
    /// Rebuilds the allocator from the pinned mapping (target id → container id).
    pub fn adopt(pinned: impl IntoIterator<Item = (u32, ContainerId)>) -> Self {
        let mut ids = Identities::default();
        for (target, container) in pinned {
            ids.by_container.insert(encode_hex(&container.0), target);
            ids.next = ids.next.max(target);
        }
        ids
    }

    /// Ids for exactly the `live` containers: known ones keep theirs, new ones get fresh ids,
    /// gone ones are forgotten.
    pub fn assign<'a>(&mut self, live: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u32> {
        let mut assigned = BTreeMap::new();
        for container in live {
            let id = match self.by_container.get(container) {
                Some(id) => *id,
                None => {
                    // 0 is never used: AddrInfo::host() has target 0.
                    self.next = self.next.checked_add(1).expect("4 billion containers");
                    self.next
                }
            };
            assigned.insert(container.to_string(), id);
        }
        self.by_container = assigned.clone();
        assigned
    }
}

/// Docker's 64-hex-digit id as the 32 bytes the IDENTITIES map stores.
pub fn decode_hex(id: &str) -> Option<ContainerId> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(id, &mut out).ok()?;
    Some(ContainerId(out))
}

pub fn encode_hex(bytes: &[u8; 32]) -> String {
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn ids_are_stable_and_never_reused() {
        let mut ids = Identities::default();
        let first = ids.assign([A, B]);
        assert_eq!(ids.assign([A, B]), first);
        let after_b_left = ids.assign([A]);
        assert_eq!(after_b_left[A], first[A]);
        let with_c = ids.assign([A, C]);
        assert!(with_c[C] > first[A] && with_c[C] > first[B], "C must not inherit B's id");
        let b_again = ids.assign([A, B, C]);
        assert_ne!(b_again[B], first[B], "a returning identity gets a fresh id too");
        assert!(b_again.values().all(|id| *id != 0));
    }

    #[test]
    fn adopting_pinned_ids_keeps_them_and_continues_above() {
        let pinned = [(7, decode_hex(A).unwrap()), (3, decode_hex(B).unwrap())];
        let mut ids = Identities::adopt(pinned);
        let assigned = ids.assign([A, B, C]);
        assert_eq!((assigned[A], assigned[B], assigned[C]), (7, 3, 8));
    }

    #[test]
    fn hex_roundtrip_and_rejects() {
        assert_eq!(encode_hex(&decode_hex(C).unwrap().0), C);
        assert!(decode_hex("abc").is_none());
        assert!(decode_hex(&"g".repeat(64)).is_none());
    }
}
