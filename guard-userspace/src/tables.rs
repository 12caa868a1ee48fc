//! The content of every policy map, as plain ordered maps: what the agent wants
//! ([`crate::desired`]) and what the kernel holds ([`crate::maps`]) have this one shape, so
//! reconciling is a pure [`diff`] between two [`TableSet`]s.
//!
//! A [`TableSet`] also implements [`Tables`], which makes it the reference for the kernel's
//! decision: `decide(&desired.tables, &packet)` is what the XDP program must answer.

use std::collections::BTreeMap;

use guard_common::{
    addr::Addr,
    decision::Tables,
    maps::{AddrInfo, ContainerId, PortKey, PortRule, PublishedKey, PublishedTarget, SourceKey},
};

/// A longest-prefix-match key: `len` leading bits of `data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lpm<K> {
    pub len: u32,
    pub data: K,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSet {
    pub addrs: BTreeMap<Addr, AddrInfo>,
    pub networks: BTreeMap<Lpm<Addr>, u32>,
    pub published: BTreeMap<PublishedKey, PublishedTarget>,
    pub ports: BTreeMap<PortKey, PortRule>,
    pub sources: BTreeMap<Lpm<SourceKey>, u32>,
    pub identities: BTreeMap<u32, ContainerId>,
}

impl Tables for TableSet {
    fn addr_info(&self, addr: &Addr) -> Option<AddrInfo> {
        self.addrs.get(addr).copied()
    }

    fn in_docker_network(&self, addr: &Addr) -> bool {
        self.networks
            .keys()
            .any(|net| addr.in_prefix(&net.data, net.len))
    }

    fn published(&self, key: &PublishedKey) -> Option<PublishedTarget> {
        self.published.get(key).copied()
    }

    fn port_rule(&self, key: &PortKey) -> Option<PortRule> {
        self.ports.get(key).copied()
    }

    fn source_listed(&self, key: &PortKey, src: &Addr) -> bool {
        self.sources.keys().any(|s| {
            s.data.port == *key && src.in_prefix(&s.data.addr, s.len - SourceKey::PORT_BITS)
        })
    }
}

/// What to change in one map: entries to insert or overwrite, keys to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableDiff<K, V> {
    pub upsert: Vec<(K, V)>,
    pub remove: Vec<K>,
}

impl<K, V> TableDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
    pub fn len(&self) -> usize {
        self.upsert.len() + self.remove.len()
    }
}

fn diff_map<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> TableDiff<K, V> {
    let upsert = desired
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let remove = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    TableDiff { upsert, remove }
}

/// The changes that turn `current` into `desired`, map by map. The order in which they may be
/// applied safely is [`crate::maps::PolicyMaps::apply`]'s business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub addrs: TableDiff<Addr, AddrInfo>,
    pub networks: TableDiff<Lpm<Addr>, u32>,
    pub published: TableDiff<PublishedKey, PublishedTarget>,
    pub ports: TableDiff<PortKey, PortRule>,
    pub sources: TableDiff<Lpm<SourceKey>, u32>,
    pub identities: TableDiff<u32, ContainerId>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.change_count() == 0
    }

    pub fn change_count(&self) -> usize {
        self.addrs.len()
            + self.networks.len()
            + self.published.len()
            + self.ports.len()
            + self.sources.len()
            + self.identities.len()
    }
}

pub fn diff(current: &TableSet, desired: &TableSet) -> Plan {
    Plan {
        addrs: diff_map(&current.addrs, &desired.addrs),
        networks: diff_map(&current.networks, &desired.networks),
        published: diff_map(&current.published, &desired.published),
        ports: diff_map(&current.ports, &desired.ports),
        sources: diff_map(&current.sources, &desired.sources),
        identities: diff_map(&current.identities, &desired.identities),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Addr {
        s.parse::<std::net::IpAddr>().unwrap().into()
    }

    #[test]
    fn diff_of_equal_sets_is_empty_and_finds_every_change() {
        let mut current = TableSet::default();
        current
            .addrs
            .insert(a("172.18.0.2"), AddrInfo::container(1));
        current
            .addrs
            .insert(a("172.18.0.3"), AddrInfo::container(2));
        current
            .ports
            .insert(PortKey::new(1, 6, 443), PortRule::everyone());
        assert!(diff(&current, &current).is_empty());

        let mut desired = current.clone();
        desired
            .addrs
            .insert(a("172.18.0.2"), AddrInfo::container(5)); // changed value
        desired.addrs.remove(&a("172.18.0.3")); // gone
        desired
            .addrs
            .insert(a("172.18.0.4"), AddrInfo::container(6)); // new
        desired.ports.clear();
        let plan = diff(&current, &desired);
        assert_eq!(
            plan.addrs.upsert,
            vec![
                (a("172.18.0.2"), AddrInfo::container(5)),
                (a("172.18.0.4"), AddrInfo::container(6))
            ]
        );
        assert_eq!(plan.addrs.remove, vec![a("172.18.0.3")]);
        assert_eq!(plan.ports.remove, vec![PortKey::new(1, 6, 443)]);
        assert_eq!(plan.change_count(), 4);
    }

    #[test]
    fn reference_lookups_follow_prefixes() {
        let mut t = TableSet::default();
        t.networks.insert(
            Lpm {
                len: 96 + 16,
                data: a("172.18.0.0"),
            },
            1,
        );
        let key = PortKey::new(1, 6, 5432);
        t.sources.insert(
            Lpm {
                len: SourceKey::PORT_BITS + 96 + 24,
                data: SourceKey {
                    port: key,
                    addr: a("10.8.0.0"),
                },
            },
            1,
        );
        assert!(t.in_docker_network(&a("172.18.9.9")));
        assert!(!t.in_docker_network(&a("172.19.0.1")));
        assert!(t.source_listed(&key, &a("10.8.0.77")));
        assert!(!t.source_listed(&key, &a("10.8.1.77")));
        assert!(!t.source_listed(&PortKey::new(1, 6, 5433), &a("10.8.0.77")));
    }
}
