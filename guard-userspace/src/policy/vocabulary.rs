//! The vocabulary of policy: protocols, port specs, source prefixes and openings.
//!
//! Labels (and later the policy file) parse into these types; the desired state turns them
//! into map entries. Nothing here touches the system.

use std::{fmt, net::IpAddr, str::FromStr};

use guard_common::{
    addr::{Addr, V4_MAPPED_PREFIX},
    parse::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};

/// A transport protocol Docker can publish and a label can name.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
            Proto::Sctp => IPPROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        [Proto::Tcp, Proto::Udp, Proto::Sctp].into_iter().find(|p| p.number() == n)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl FromStr for Proto {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "sctp" => Ok(Proto::Sctp),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which container ports an opening covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpec {
    /// `*`: every port of every protocol, and port-less traffic (ICMP, later fragments).
    All,
    /// `*/udp`: every port of one protocol, and nothing else (not ICMP, not another
    /// protocol's ports). One map entry, however many ports.
    EveryPortOf(Proto),
    /// `first-last/proto` (a single port has first == last).
    Range { proto: Proto, first: u16, last: u16 },
}

impl PortSpec {
    /// The map entries it takes: one for `*` and `*/proto`, one per port of a range.
    pub fn port_count(&self) -> u32 {
        match self {
            PortSpec::All | PortSpec::EveryPortOf(_) => 1,
            PortSpec::Range { first, last, .. } => u32::from(*last - *first) + 1,
        }
    }

    /// Whether a packet to container port `port` of `proto` is covered.
    pub fn covers(&self, proto: Proto, port: u16) -> bool {
        match *self {
            PortSpec::All => true,
            PortSpec::EveryPortOf(p) => p == proto,
            PortSpec::Range { proto: p, first, last } => {
                p == proto && (first..=last).contains(&port)
            }
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::All => f.write_str("*"),
            PortSpec::EveryPortOf(proto) => write!(f, "*/{proto}"),
            PortSpec::Range { proto, first, last } if first == last => write!(f, "{first}/{proto}"),
            PortSpec::Range { proto, first, last } => write!(f, "{first}-{last}/{proto}"),
        }
    }
}

/// An IPv4 or IPv6 prefix. Host bits are cleared on parse (`10.0.0.7/24` is `10.0.0.0/24`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadCidr {
    #[error("{0:?} is not an IP address or CIDR (examples: 192.0.2.7, 10.8.0.0/24, fd00::/64)")]
    Syntax(String),
    #[error("{0:?} is an IPv4-mapped IPv6 prefix: write IPv4 sources as IPv4 (e.g. 10.8.0.0/24)")]
    V4Mapped(String),
}

/// The IPv4-mapped range `::ffff:0:0/96`, where the kernel's tries keep every IPv4 address.
const V4_MAPPED: u128 = 0xffff << 32;

impl Cidr {
    pub fn host(addr: IpAddr) -> Self {
        Cidr { addr, prefix_len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    /// The prefix as the kernel's 128-bit tries see it (IPv4 is IPv4-mapped). For a Docker
    /// subnet; a prefix that selects *sources* goes through [`Cidr::to_source_prefixes`].
    pub fn to_addr_prefix(self) -> (Addr, u32) {
        let bits = if self.addr.is_ipv4() { V4_MAPPED_PREFIX } else { 0 };
        (Addr::from(self.addr), bits + u32::from(self.prefix_len))
    }

    /// The prefixes that select exactly this prefix's sources in a 128-bit trie. An IPv6 prefix
    /// short enough to contain `::ffff:0:0/96` (`::/0` up to `::/80`) would also select every
    /// IPv4 source there, so it is stored as the prefixes around that range: one sibling per
    /// level between its length and 96 (`::/0` becomes 96 entries).
    pub fn to_source_prefixes(self) -> Vec<(Addr, u32)> {
        let (net, len) = self.to_addr_prefix();
        if self.addr.is_ipv4() || !covers(u128::from_be_bytes(net.octets()), len, V4_MAPPED, 96) {
            return vec![(net, len)];
        }
        (len + 1..=V4_MAPPED_PREFIX)
            .map(|level| {
                // The mapped range's ancestor at `level`, with its last bit flipped.
                let ancestor = V4_MAPPED & prefix_mask(level);
                let sibling = ancestor ^ (1u128 << (128 - level));
                (Addr::from_v6(sibling.to_be_bytes()), level)
            })
            .collect()
    }

    /// Whether `ip` is one of this prefix's sources; an IPv6 prefix never holds an IPv4 source.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, len) = self.to_addr_prefix();
        self.addr.is_ipv4() == ip.is_ipv4() && Addr::from(ip).in_prefix(&net, len)
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr::Syntax(s.to_string());
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            Some(len) => len.trim().parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        let cidr = Cidr { addr: mask(addr, prefix_len), prefix_len };
        if let IpAddr::V6(v6) = cidr.addr
            && prefix_len >= 96
            && covers(V4_MAPPED, 96, u128::from(v6), u32::from(prefix_len))
        {
            return Err(BadCidr::V4Mapped(s.to_string()));
        }
        Ok(cidr)
    }
}

fn prefix_mask(len: u32) -> u128 {
    u128::MAX.checked_shl(128 - len).unwrap_or(0)
}

/// Whether `outer/outer_len` contains `inner/inner_len`.
fn covers(outer: u128, outer_len: u32, inner: u128, inner_len: u32) -> bool {
    outer_len <= inner_len && (outer ^ inner) & prefix_mask(outer_len) == 0
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
            IpAddr::from((u32::from(v4) & m).to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
            IpAddr::from((u128::from(v6) & m).to_be_bytes())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Who an opening lets in from outside.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sources {
    Everyone,
    Listed(Vec<Cidr>),
}

/// Container ports opened to some outside sources, and where that was said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opening {
    pub ports: PortSpec,
    pub sources: Sources,
    /// The rule that said so, for status and explain (e.g. `label guard.expose`).
    pub rule: String,
}

/// What a container's labels, and then the policy file's rules, declare for it: openings, and
/// limits on new flows to the ports they open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    pub openings: Vec<Opening>,
    /// In the order said: of two limits on one port, the later is in force.
    pub limits: Vec<crate::policy::rates::RateRule>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_hosts_and_prefixes_and_clears_host_bits() {
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().to_string(), "192.0.2.7/32");
        assert_eq!("10.8.0.9/24".parse::<Cidr>().unwrap().to_string(), "10.8.0.0/24");
        assert_eq!("fd00::1/64".parse::<Cidr>().unwrap().to_string(), "fd00::/64");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(" 10.0.0.0 / 8 ".trim().parse::<Cidr>().unwrap().prefix_len, 8);
    }

    #[test]
    fn cidr_rejects_garbage() {
        for bad in ["", "10.0.0.0/33", "fd00::/129", "10.0.0/8", "host.example", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn cidr_contains_and_maps_to_kernel_prefix() {
        let c: Cidr = "10.8.0.0/24".parse().unwrap();
        assert!(c.contains("10.8.0.200".parse().unwrap()));
        assert!(!c.contains("10.8.1.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        assert_eq!(c.to_addr_prefix().1, 96 + 24);
        let v6: Cidr = "fd00:1::/48".parse().unwrap();
        assert_eq!(v6.to_addr_prefix().1, 48);
    }

    #[test]
    fn ipv6_sources_never_cover_ipv4() {
        let any6: Cidr = "::/0".parse().unwrap();
        assert!(!any6.contains("198.51.100.7".parse().unwrap()));
        assert!(any6.contains("2001:db8::1".parse().unwrap()));
        let prefixes = any6.to_source_prefixes();
        assert_eq!(prefixes.len(), 96);
        let in_any = |ip: &str| {
            let a = Addr::from(ip.parse::<IpAddr>().unwrap());
            prefixes.iter().any(|(net, len)| a.in_prefix(net, *len))
        };
        for v6 in ["::", "::1", "2001:db8::1", "fe80::1", "ffff::", "::fffe:0:0", "::1:0:0:0"] {
            assert!(in_any(v6), "{v6} is an IPv6 source of ::/0");
        }
        for v4 in ["0.0.0.0", "198.51.100.7", "255.255.255.255"] {
            assert!(!in_any(v4), "{v4} is not an IPv6 source");
        }
        // A prefix that does not reach the mapped range stays one entry.
        let doc: Cidr = "2001:db8::/32".parse().unwrap();
        assert_eq!(doc.to_source_prefixes(), vec![doc.to_addr_prefix()]);
        let v4: Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(v4.to_source_prefixes(), vec![v4.to_addr_prefix()]);
    }

    #[test]
    fn ipv4_mapped_prefixes_are_refused() {
        for bad in ["::ffff:10.0.0.0/104", "::ffff:0:0/96", "::ffff:192.0.2.7"] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(matches!(err, BadCidr::V4Mapped(_)), "{bad}: {err}");
            assert!(err.to_string().contains("write IPv4 sources as IPv4"), "{err}");
        }
    }

    #[test]
    fn proto_names_roundtrip() {
        for p in [Proto::Tcp, Proto::Udp, Proto::Sctp] {
            assert_eq!(p.name().parse::<Proto>(), Ok(p));
            assert_eq!(Proto::from_number(p.number()), Some(p));
        }
        assert!("icmp".parse::<Proto>().is_err());
    }
}
