//! Per-source rate limits on new flows to an opened container port
//! (`guard.ratelimit=443/tcp 100/s burst 200`).
//!
//! Each (container port, source) pair has a bucket in [`crate::maps::RATE_BUCKETS`], kept as
//! one number: the generic cell rate algorithm's *theoretical arrival time* (TAT), the moment
//! the bucket would be full again. A new flow at `now` is admitted when the TAT it would move
//! to stays within the burst of `now`; admitted, the TAT moves on by one interval. That is a
//! token bucket of `burst` tokens refilled at `rate` a second, with one word of state, one
//! comparison and no division in the kernel: user space turns the rate into nanoseconds once.
//!
//! The bucket is shared by every CPU and updated without a lock: a source whose new flows
//! land on several CPUs at the same instant can get a few more than its burst (at most one
//! per CPU per race). Exactness would need a spin lock per bucket, which LRU maps do not
//! offer; a flood from one source is still held to the rate.
//!
//! An IPv6 source is counted by its /64, the block one host or site gets: a per-address limit
//! would let one host on a /64 walk through its 2^64 addresses, each with a fresh burst.

use crate::{addr::Addr, maps::PortKey};

/// A limit on new flows per source, in the kernel's units.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateLimit {
    /// Nanoseconds per admitted flow at the sustained rate (1e9 / rate).
    pub interval_ns: u64,
    /// How far ahead of now the TAT may run: `burst` intervals.
    pub burst_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RateLimit>() == 16);

impl RateLimit {
    /// `flows` new flows every `period_ns` (100 a second: `new(100, 1_000_000_000, burst)`),
    /// `burst` at once; `None` if any is 0 or the rate is above one a nanosecond.
    pub const fn new(flows: u32, period_ns: u64, burst: u32) -> Option<RateLimit> {
        if flows == 0 || burst == 0 || period_ns < flows as u64 {
            return None;
        }
        let interval_ns = period_ns / flows as u64;
        match interval_ns.checked_mul(burst as u64) {
            Some(burst_ns) => Some(RateLimit { interval_ns, burst_ns }),
            None => None,
        }
    }
}

/// Key of [`crate::maps::RATE_BUCKETS`]: an opened container port and a source (an IPv6 source
/// as its /64).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub port: PortKey,
    pub src: Addr,
}
const _: () = assert!(core::mem::size_of::<BucketKey>() == 24);

impl BucketKey {
    #[inline(always)]
    pub fn new(port: PortKey, src: &Addr) -> BucketKey {
        let mut src = *src;
        if !src.is_v4() {
            src.0[2] = 0;
            src.0[3] = 0;
        }
        BucketKey { port, src }
    }
}

/// The TAT after admitting a new flow at `now` to a bucket at `tat` (none: full), or `None`
/// if the flow is over the limit (the bucket is then left as it is).
#[inline(always)]
pub fn admit(limit: &RateLimit, tat: Option<u64>, now: u64) -> Option<u64> {
    let start = match tat {
        Some(tat) if tat > now => tat,
        _ => now,
    };
    let next = start.saturating_add(limit.interval_ns);
    (next - now <= limit.burst_ns).then_some(next)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], explicit padding, no pointers.
    unsafe impl aya::Pod for super::RateLimit {}
    unsafe impl aya::Pod for super::BucketKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limit = RateLimit::new(100, SECOND, 200).unwrap();
        assert_eq!(limit.interval_ns, 10_000_000);
        let now = 5_000_000_000;
        let mut tat = None;
        for i in 0..200 {
            tat = Some(admit(&limit, tat, now).unwrap_or_else(|| panic!("flow {i} of the burst")));
        }
        assert_eq!(admit(&limit, tat, now), None, "the 201st at once is over");
        assert_eq!(admit(&limit, tat, now + 9_999_999), None, "no token back yet");
        let later = admit(&limit, tat, now + 10_000_000).expect("one interval refills one");
        assert_eq!(admit(&limit, Some(later), now + 10_000_000), None);
    }

    #[test]
    fn an_idle_bucket_refills_to_its_burst_and_no_further() {
        let limit = RateLimit::new(10, SECOND, 3).unwrap();
        let mut tat = None;
        let now = 1_000_000_000_000;
        for _ in 0..3 {
            tat = admit(&limit, tat, now);
        }
        let idle = now + 3600 * 1_000_000_000;
        let mut admitted = 0;
        while let Some(next) = admit(&limit, tat, idle) {
            tat = Some(next);
            admitted += 1;
        }
        assert_eq!(admitted, 3);
    }

    #[test]
    fn zero_and_absurd_limits_are_refused() {
        assert_eq!(RateLimit::new(0, SECOND, 10), None);
        assert_eq!(RateLimit::new(10, SECOND, 0), None);
        assert_eq!(RateLimit::new(10, 0, 1), None);
        assert_eq!(RateLimit::new(2_000_000_000, SECOND, 1), None);
        assert!(RateLimit::new(1_000_000_000, SECOND, u32::MAX).is_some());
        assert_eq!(RateLimit::new(1, u64::MAX, 2), None, "a burst past the clock's range");
        let per_minute = RateLimit::new(10, 60 * SECOND, 5).unwrap();
        assert_eq!(per_minute.interval_ns, 6 * SECOND);
    }

    #[test]
    fn ipv6_sources_share_their_slash_64() {
        let port = PortKey::new(3, 6, 443);
        let a = |s: &str| Addr::from(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(
            BucketKey::new(port, &a("2001:db8:1:2::1")),
            BucketKey::new(port, &a("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            BucketKey::new(port, &a("2001:db8:1:2::1")),
            BucketKey::new(port, &a("2001:db8:1:3::1"))
        );
        assert_ne!(BucketKey::new(port, &a("192.0.2.1")), BucketKey::new(port, &a("192.0.2.2")));
    }
}
