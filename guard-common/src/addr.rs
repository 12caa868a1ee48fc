//! One 16-byte address type for IPv4 and IPv6, so every key has one shape for both families.
//!
//! IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), which keeps the longest-prefix
//! tries single-family: an IPv4 /N is an IPv6 /(96 + N).

/// An IP address in network byte order; IPv4 is IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr(pub [u8; 16]);

const _: () = assert!(core::mem::size_of::<Addr>() == 16);

/// Prefix length of the IPv4-mapped range `::ffff:0:0/96`.
pub const V4_MAPPED_PREFIX: u32 = 96;

impl Addr {
    #[inline(always)]
    pub const fn from_v4(o: [u8; 4]) -> Self {
        Addr([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3]])
    }

    #[inline(always)]
    pub const fn from_v6(o: [u8; 16]) -> Self {
        Addr(o)
    }

    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        let b = &self.0;
        b[0] | b[1] | b[2] | b[3] | b[4] | b[5] | b[6] | b[7] | b[8] | b[9] == 0
            && b[10] == 0xff
            && b[11] == 0xff
    }

    /// 127.0.0.0/8 or ::1: nothing that arrives on an uplink may be addressed there.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        let b = &self.0;
        if self.is_v4() {
            return b[12] == 127;
        }
        b[..15].iter().all(|&x| x == 0) && b[15] == 1
    }

    /// Whether `self` lies in `net/prefix_len` (prefix counted over all 128 bits).
    pub fn in_prefix(&self, net: &Addr, prefix_len: u32) -> bool {
        let prefix_len = prefix_len.min(128);
        let full = (prefix_len / 8) as usize;
        let rest = prefix_len % 8;
        if self.0[..full] != net.0[..full] {
            return false;
        }
        if rest == 0 {
            return true;
        }
        let mask = 0xffu8 << (8 - rest);
        self.0[full] & mask == net.0[full] & mask
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
            if a.is_v4() {
                IpAddr::from([a.0[12], a.0[13], a.0[14], a.0[15]])
            } else {
                IpAddr::from(a.0)
            }
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
    fn roundtrip_display() {
        assert_eq!(a("192.0.2.7").to_string(), "192.0.2.7");
        assert_eq!(a("fd00::7").to_string(), "fd00::7");
        assert!(a("192.0.2.7").is_v4());
        assert!(!a("fd00::7").is_v4());
    }
}
