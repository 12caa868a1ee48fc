//! One 16-byte address type for IPv4 and IPv6, so every key has one shape for both families.
//!
//! IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), which keeps the longest-prefix
//! tries single-family: an IPv4 /N is an IPv6 /(96 + N).

/// An IP address in network byte order; IPv4 is IPv4-mapped.
///
/// Stored as four `u32` words that hold the address bytes exactly as they are in memory (in
/// network order, whatever the host's endianness): the same 16 bytes as `[u8; 16]`, so map keys
/// are unchanged, but 4-byte aligned, so the XDP program reads an address from a packet with
/// four word loads instead of sixteen byte loads. (`repr(align)` is not an option: aya's LPM
/// key is `repr(packed)` and may not contain an over-aligned type.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr(pub [u32; 4]);

const _: () = assert!(core::mem::size_of::<Addr>() == 16);

/// Prefix length of the IPv4-mapped range `::ffff:0:0/96`.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// The third word of every IPv4-mapped address: bytes 00 00 ff ff.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    #[inline(always)]
    pub const fn from_v4(o: [u8; 4]) -> Self {
        Self::from_v4_word(u32::from_ne_bytes(o))
    }

    /// From the four address bytes as one word loaded from memory (network order kept).
    #[inline(always)]
    pub const fn from_v4_word(word: u32) -> Self {
        Addr([0, 0, V4_MAPPED_WORD, word])
    }

    #[inline(always)]
    pub const fn from_v6(o: [u8; 16]) -> Self {
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            words[i] = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            i += 1;
        }
        Addr(words)
    }

    /// The 16 bytes in network order.
    #[inline(always)]
    pub const fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.0[i].to_ne_bytes();
            out[4 * i] = b[0];
            out[4 * i + 1] = b[1];
            out[4 * i + 2] = b[2];
            out[4 * i + 3] = b[3];
            i += 1;
        }
        out
    }

    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == V4_MAPPED_WORD
    }

    /// 127.0.0.0/8 or ::1: nothing that arrives on an uplink may be addressed there.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        if self.is_v4() {
            return self.0[3].to_ne_bytes()[0] == 127;
        }
        self.0[0] == 0
            && self.0[1] == 0
            && self.0[2] == 0
            && self.0[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }

    /// A multicast or broadcast destination (IPv4 224.0.0.0 and up, 255.255.255.255 included;
    /// IPv6 ff00::/8): delivered to whatever listens on the wildcard address.
    #[inline(always)]
    pub fn is_group(&self) -> bool {
        if self.is_v4() {
            return self.0[3].to_ne_bytes()[0] >= 224;
        }
        self.0[0].to_ne_bytes()[0] == 0xff
    }

    /// The wildcard address of this address's family: `0.0.0.0` (IPv4-mapped) or `::`.
    #[inline(always)]
    #[must_use]
    pub fn wildcard(&self) -> Addr {
        if self.is_v4() { Addr::from_v4_word(0) } else { Addr([0; 4]) }
    }

    /// Whether `self` lies in `net/prefix_len` (prefix counted over all 128 bits).
    pub fn in_prefix(&self, net: &Addr, prefix_len: u32) -> bool {
        let (a, n) = (self.octets(), net.octets());
        let prefix_len = prefix_len.min(128);
        let full = (prefix_len / 8) as usize;
        let rest = prefix_len % 8;
        if a[..full] != n[..full] {
            return false;
        }
        if rest == 0 {
            return true;
        }
        let mask = 0xffu8 << (8 - rest);
        a[full] & mask == n[full] & mask
    }
}

#[cfg(any(test, feature = "user"))]
mod conversions {
    use super::*;
    use std::net::IpAddr;

    impl From<IpAddr> for Addr {
        fn from(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
                IpAddr::V6(v6) => Addr::from_v6(v6.octets()),
            }
        }
    }

    impl From<Addr> for IpAddr {
        fn from(a: Addr) -> Self {
            if a.is_v4() { IpAddr::from(a.0[3].to_ne_bytes()) } else { IpAddr::from(a.octets()) }
        }
    }

    impl core::fmt::Display for Addr {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            IpAddr::from(*self).fmt(f)
        }
    }
}

// SAFETY: plain bytes, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Addr {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::IpAddr, string::ToString};

    fn a(s: &str) -> Addr {
        s.parse::<IpAddr>().unwrap().into()
    }

    #[test]
    fn loopback_both_families() {
        assert!(a("127.0.0.1").is_loopback());
        assert!(a("127.200.3.4").is_loopback());
        assert!(a("::1").is_loopback());
        assert!(!a("128.0.0.1").is_loopback());
        assert!(!a("::2").is_loopback());
        assert!(!a("fe80::1").is_loopback());
    }

    #[test]
    fn prefix_match_v4_mapped_and_v6() {
        assert!(a("172.18.5.9").in_prefix(&a("172.18.0.0"), 96 + 16));
        assert!(!a("172.19.0.1").in_prefix(&a("172.18.0.0"), 96 + 16));
        assert!(a("10.0.0.9").in_prefix(&a("10.0.0.8"), 96 + 29));
        assert!(!a("10.0.0.16").in_prefix(&a("10.0.0.8"), 96 + 29));
        assert!(a("fd00:1::5").in_prefix(&a("fd00:1::"), 64));
        assert!(!a("fd00:2::5").in_prefix(&a("fd00:1::"), 64));
        assert!(a("fd00:2::5").in_prefix(&a("::"), 0));
        assert!(a("1.2.3.4").in_prefix(&a("1.2.3.4"), 128));
    }

    #[test]
    fn groups_and_wildcards() {
        for group in ["224.0.0.1", "239.1.2.3", "255.255.255.255", "ff02::1", "ff05::2"] {
            assert!(a(group).is_group(), "{group}");
        }
        for unicast in ["10.0.0.255", "223.255.255.255", "fe80::1", "2001:db8::ff"] {
            assert!(!a(unicast).is_group(), "{unicast}");
        }
        assert_eq!(a("224.0.0.1").wildcard(), a("0.0.0.0"));
        assert_eq!(a("ff02::1").wildcard(), a("::"));
    }

    #[test]
    fn roundtrip_display() {
        assert_eq!(a("192.0.2.7").to_string(), "192.0.2.7");
        assert_eq!(a("fd00::7").to_string(), "fd00::7");
        assert!(a("192.0.2.7").is_v4());
        assert!(!a("fd00::7").is_v4());
    }
}
