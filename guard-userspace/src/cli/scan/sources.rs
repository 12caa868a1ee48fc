//! The sources a scan sends its probes from: one outside address that no rule, trusted prefix
//! or Docker network names (what an unknown host on the network gets), and one address inside
//! each prefix a rule names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use guard_common::{addr::Addr, maps::SourceKey};

use crate::state::tables::TableSet;

/// Documentation and private ranges first: a policy rarely names them.
const UNNAMED_V4: [Ipv4Addr; 6] = [
    Ipv4Addr::new(192, 0, 2, 201),
    Ipv4Addr::new(198, 51, 100, 201),
    Ipv4Addr::new(203, 0, 113, 201),
    Ipv4Addr::new(100, 127, 255, 201),
    Ipv4Addr::new(192, 168, 255, 201),
    Ipv4Addr::new(8, 8, 4, 201),
];
const UNNAMED_V6: [Ipv6Addr; 4] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0xc9),
    Ipv6Addr::new(0x3fff, 0xfff, 0, 0, 0, 0, 0, 0xc9),
    Ipv6Addr::new(0xfdff, 0xffff, 0, 0, 0, 0, 0, 0xc9),
    Ipv6Addr::new(0x2606, 0x4700, 0, 0, 0, 0, 0, 0xc9),
];

/// Whether any table names `ip`: a rule's source, a trusted prefix, a Docker network, an
/// address the maps hold.
fn named(tables: &[&TableSet], ip: IpAddr) -> bool {
    let a = Addr::from(ip);
    tables.iter().any(|t| {
        t.sources.keys().any(|s| a.in_prefix(&s.data.addr, s.len - SourceKey::PORT_BITS))
            || t.trusted.keys().any(|k| a.in_prefix(&k.data, k.len))
            || t.networks.keys().any(|k| a.in_prefix(&k.data, k.len))
            || t.addrs.contains_key(&a)
    })
}

/// An IPv4 and an IPv6 outside source that no table names.
pub fn unnamed(tables: &[&TableSet]) -> anyhow::Result<(IpAddr, IpAddr)> {
    let v4 = UNNAMED_V4.into_iter().map(IpAddr::V4).find(|ip| !named(tables, *ip));
    let v6 = UNNAMED_V6.into_iter().map(IpAddr::V6).find(|ip| !named(tables, *ip));
    match (v4, v6) {
        (Some(v4), Some(v6)) => Ok((v4, v6)),
        _ => anyhow::bail!(
            "every address guard tries as an unnamed outside source is named by a rule or trusted: cannot tell what everyone reaches"
        ),
    }
}

/// An address inside `addr/len` (`len` over 128 bits, IPv4 mapped): the first host of a
/// network, the address itself for a host prefix.
pub fn representative(addr: &Addr, len: u32) -> IpAddr {
    match IpAddr::from(*addr) {
        IpAddr::V4(v4) if len < 96 + 31 => IpAddr::V4(Ipv4Addr::from(u32::from(v4) | 1)),
        IpAddr::V6(v6) if len < 127 => IpAddr::V6(Ipv6Addr::from(u128::from(v6) | 1)),
        ip => ip,
    }
}

/// `10.0.0.0/8`, `2001:db8::/32`, as a policy writes them.
pub fn prefix_text(addr: &Addr, len: u32) -> String {
    match IpAddr::from(*addr) {
        IpAddr::V4(v4) => format!("{v4}/{}", len.saturating_sub(96)),
        ip => format!("{ip}/{len}"),
    }
}

#[cfg(test)]
mod tests {
    use guard_common::maps::{PortKey, SourceKey};

    use super::*;
    use crate::state::tables::Lpm;

    fn addr(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn the_unnamed_source_avoids_every_named_prefix() {
        let mut t = TableSet::default();
        assert_eq!(unnamed(&[&t]).unwrap().0.to_string(), "192.0.2.201");
        let port = PortKey::new(1, 6, 80);
        t.sources.insert(
            Lpm {
                len: SourceKey::PORT_BITS + 96 + 24,
                data: SourceKey { port, addr: addr("192.0.2.0") },
            },
            1,
        );
        t.trusted.insert(Lpm { len: 96 + 8, data: addr("198.0.0.0") }, 1);
        t.networks.insert(Lpm { len: 96 + 24, data: addr("203.0.113.0") }, 1);
        t.trusted.insert(Lpm { len: 32, data: addr("2001:db8::") }, 1);
        let (v4, v6) = unnamed(&[&TableSet::default(), &t]).unwrap();
        assert_eq!(
            (v4.to_string(), v6.to_string()),
            ("100.127.255.201".into(), "3fff:fff::c9".into())
        );
        t.trusted.insert(Lpm { len: 96, data: addr("0.0.0.0") }, 1);
        assert!(unnamed(&[&t]).is_err(), "0.0.0.0/0 trusted leaves no unnamed source");
    }

    #[test]
    fn a_prefix_is_probed_from_inside_it_and_written_as_a_policy_writes_it() {
        assert_eq!(representative(&addr("10.8.0.0"), 96 + 24).to_string(), "10.8.0.1");
        assert_eq!(representative(&addr("192.0.2.7"), 128).to_string(), "192.0.2.7");
        assert_eq!(representative(&addr("2001:db8::"), 32).to_string(), "2001:db8::1");
        assert_eq!(prefix_text(&addr("10.8.0.0"), 96 + 24), "10.8.0.0/24");
        assert_eq!(prefix_text(&addr("2001:db8::"), 32), "2001:db8::/32");
        assert!(addr("10.8.0.1").in_prefix(&addr("10.8.0.0"), 96 + 24));
    }
}
