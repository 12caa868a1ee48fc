//! The prefilter: two questions answered with one bit each, before any hash lookup.
//!
//! - Could the destination be in a Docker network? Addresses fall into 65,536 buckets per
//!   family: IPv4 by their /16, IPv6 by a fold of their first 32 bits.
//! - Could the destination port be published? One bit per port number.
//!
//! A clear bit is a proof ("not container-bound"); a set bit only means "look it up". The
//! agent sets a bucket's bit for every subnet and address that falls in it, so the filter has
//! no false negatives, and the reference decision (which skips it) checks that it has none.

use crate::addr::Addr;

/// 65,536 bits.
pub const WORDS: usize = 1024;

/// One bitmap, as stored in a [`crate::maps::PREFILTER`] entry.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bitmap {
    pub words: [u64; WORDS],
}
const _: () = assert!(core::mem::size_of::<Bitmap>() == 8192);

/// Entries of [`crate::maps::PREFILTER`].
pub const V4_DESTINATIONS: u32 = 0;
pub const V6_DESTINATIONS: u32 = 1;
pub const PUBLISHED_PORTS: u32 = 2;
pub const ENTRIES: u32 = 3;

impl Bitmap {
    pub const fn empty() -> Self {
        Bitmap { words: [0; WORDS] }
    }

    #[inline(always)]
    pub fn get(&self, bit: u16) -> bool {
        self.words[(bit >> 6) as usize] >> (bit & 63) & 1 == 1
    }

    pub fn set(&mut self, bit: u16) {
        self.words[(bit >> 6) as usize] |= 1 << (bit & 63);
    }

    pub fn fill(&mut self) {
        self.words = [u64::MAX; WORDS];
    }

    #[must_use]
    pub fn union(&self, other: &Bitmap) -> Bitmap {
        let mut out = *self;
        for (w, o) in out.words.iter_mut().zip(other.words.iter()) {
            *w |= *o;
        }
        out
    }

    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }
}

impl core::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Bitmap({} bits set)", self.count())
    }
}

/// The prefilter entry and bit an address falls in.
#[inline(always)]
pub fn address_bucket(addr: &Addr) -> (u32, u16) {
    if addr.is_v4() {
        (V4_DESTINATIONS, (u32::from_be(addr.0[3]) >> 16) as u16)
    } else {
        (V6_DESTINATIONS, v6_fold(u32::from_be(addr.0[0])))
    }
}

/// Folds the first 32 bits of an IPv6 address into a bucket.
#[inline(always)]
pub const fn v6_fold(first32: u32) -> u16 {
    ((first32 >> 16) as u16) ^ (first32 as u16)
}
