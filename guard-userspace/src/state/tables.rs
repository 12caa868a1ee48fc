//! The content of every policy map, as plain ordered maps: what the agent wants
//! ([`super::desired`]) and what the kernel holds ([`crate::kernel::maps`]) have this one shape, so
//! reconciling is a pure [`diff`] between two [`TableSet`]s.
//!
//! A [`TableSet`] also implements [`Tables`], which makes it the reference for the kernel's
//! decision: `decide(&desired.tables, &packet)` is what the XDP program must answer. The
//! reference ignores the prefilter (it answers "maybe" to everything), so any prefilter bit
//! the agent failed to set shows up as a difference between kernel and reference.

use guard_common::maps::{
    CONFIG_AUDIT_ALL, CONFIG_HAS_DENY_EXACT, CONFIG_HAS_DENY_PREFIX, Config, OPEN_NONE, door,
};
use std::collections::{BTreeMap, BTreeSet};

use guard_common::{
    addr::Addr,
    decision::Tables,
    maps::{
        AddrInfo, ContainerId, FlowKey, PortKey, PortRule, PublishedKey, PublishedTarget, SourceKey,
    },
    prefilter::{self, Bitmap},
    ratelimit::RateLimit,
};

use crate::policy::Cidr;

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
    pub prefilter: Prefilter,
    pub trusted: BTreeMap<Lpm<Addr>, u32>,
    /// Denied single addresses (the kernel's hash) and prefixes (its trie).
    pub deny_exact: BTreeMap<Addr, u32>,
    pub deny_prefixes: BTreeMap<Lpm<Addr>, u32>,
    /// Limits on new flows per source: a port's own, or every port of a protocol
    /// ([`PortKey::every_port_of`]); each limited target carries `TARGET_RATE_LIMITED`.
    pub rates: BTreeMap<PortKey, RateLimit>,
    pub config: Config,
    /// Interfaces by index and role (`IFACE_UPLINK`, `IFACE_INSIDE`); one it does not name
    /// is taken for Docker's.
    pub uplinks: BTreeMap<u32, u32>,
}

impl TableSet {
    /// The same containers, networks and published ports, with nothing opened: what holds
    /// until the agent has synced with Docker. Host-wide settings (trusted sources, audit
    /// mode) come from the local policy file and stay.
    /// The engine's doors keep their members: the swarm's own traffic never waits for a sync
    /// (their sources are the last membership the engine named, not an operator's opening).
    /// Limits go too: with nothing open they have nothing to limit, and the flags that point
    /// the kernel at them are cleared with the others.
    pub fn close_openings(&mut self) {
        self.ports.retain(|key, _| door::is_door(key.target));
        self.rates.retain(|key, _| door::is_door(key.target));
        self.sources.retain(|source, _| door::is_door(source.data.port.target));
        for info in self.addrs.values_mut() {
            info.all_ports = OPEN_NONE;
            info.port_rules = 0;
            info.flags = 0;
        }
        for target in self.published.values_mut().filter(|t| !door::is_door(t.target)) {
            target.rule = OPEN_NONE;
            target.all_ports = OPEN_NONE;
            target.proto_rule = OPEN_NONE;
            target.flags = 0;
        }
    }
}

impl TableSet {
    /// Denies `sources` every container port: single addresses in the exact table, prefixes
    /// in the trie (an IPv6 prefix around the IPv4-mapped range selects no IPv4 source).
    pub fn deny(&mut self, sources: impl IntoIterator<Item = Cidr>) {
        for cidr in sources {
            let single = cidr.prefix_len == if cidr.addr.is_ipv4() { 32 } else { 128 };
            if single {
                self.deny_exact.insert(Addr::from(cidr.addr), 1);
                self.config.flags |= CONFIG_HAS_DENY_EXACT;
                continue;
            }
            for (addr, len) in cidr.to_source_prefixes() {
                self.deny_prefixes.insert(Lpm { len, data: addr }, 1);
            }
            self.config.flags |= CONFIG_HAS_DENY_PREFIX;
        }
    }

    /// Keeps everything `kernel` denies denied as well: for a pass that could not read the
    /// bans safely, which then lifts nothing.
    pub fn keep_denied(&mut self, kernel: &TableSet) {
        self.deny_exact.extend(&kernel.deny_exact);
        self.deny_prefixes.extend(kernel.deny_prefixes.iter().map(|(k, v)| (*k, *v)));
        self.config.flags |= kernel.config.flags & (CONFIG_HAS_DENY_EXACT | CONFIG_HAS_DENY_PREFIX);
    }
}

/// The three prefilter bitmaps (see [`guard_common::prefilter`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefilter {
    pub v4: Box<Bitmap>,
    pub v6: Box<Bitmap>,
    pub ports: Box<Bitmap>,
}

impl Default for Prefilter {
    fn default() -> Self {
        let empty = || Box::new(Bitmap::empty());
        Prefilter { v4: empty(), v6: empty(), ports: empty() }
    }
}

impl Prefilter {
    /// The bitmaps by map entry, in entry order.
    pub fn entries(&self) -> [(u32, &Bitmap); 3] {
        [
            (prefilter::V4_DESTINATIONS, &self.v4),
            (prefilter::V6_DESTINATIONS, &self.v6),
            (prefilter::PUBLISHED_PORTS, &self.ports),
        ]
    }

    pub fn entry_mut(&mut self, entry: u32) -> &mut Bitmap {
        match entry {
            prefilter::V4_DESTINATIONS => &mut self.v4,
            prefilter::V6_DESTINATIONS => &mut self.v6,
            _ => &mut self.ports,
        }
    }

    /// Sets the bucket of one address.
    pub fn mark_addr(&mut self, addr: &Addr) {
        let (entry, bit) = prefilter::address_bucket(addr);
        self.entry_mut(entry).set(bit);
    }

    /// Sets every bucket an address in `addr/len` (a 128-bit prefix length; IPv4 mapped) can
    /// fall in.
    pub fn mark_prefix(&mut self, addr: &Addr, len: u32) {
        let b = addr.octets();
        if addr.is_v4() {
            // Buckets are /16s: a longer prefix is one bucket, a shorter one spans several.
            let top16 = u16::from_be_bytes([b[12], b[13]]);
            let v4_len = len.saturating_sub(96).min(32);
            let spanned = 16u32.saturating_sub(v4_len);
            let first = u32::from(top16) & !((1u32 << spanned) - 1);
            for bucket in first..first + (1 << spanned) {
                self.v4.set(bucket as u16);
            }
        } else if len < 16 {
            self.v6.fill();
        } else {
            // Buckets are folds of the first 32 bits: enumerate the /32s the prefix spans.
            let first32 = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let spanned = 32u32.saturating_sub(len.min(32));
            let first = u64::from(first32) & !((1u64 << spanned) - 1);
            for top in first..first + (1u64 << spanned) {
                self.v6.set(prefilter::v6_fold(top as u32));
            }
        }
    }

    #[must_use]
    pub fn union(&self, other: &Prefilter) -> Prefilter {
        Prefilter {
            v4: Box::new(self.v4.union(&other.v4)),
            v6: Box::new(self.v6.union(&other.v6)),
            ports: Box::new(self.ports.union(&other.ports)),
        }
    }
}

impl TableSet {
    /// (map, entries, capacity) of every keyed policy map, for fill-level metrics.
    pub fn sizes(&self) -> Vec<(&'static str, usize, u32)> {
        use guard_common::maps as m;
        vec![
            (m::ADDRS, self.addrs.len(), m::ADDRS_CAPACITY),
            (m::NETWORKS, self.networks.len(), m::NETWORKS_CAPACITY),
            (m::PUBLISHED, self.published.len(), m::PUBLISHED_CAPACITY),
            (m::PORTS, self.ports.len(), m::PORTS_CAPACITY),
            (m::SOURCES, self.sources.len(), m::SOURCES_CAPACITY),
            (m::IDENTITIES, self.identities.len(), m::IDENTITIES_CAPACITY),
            (m::TRUSTED, self.trusted.len(), m::TRUSTED_CAPACITY),
            (m::DENY_EXACT, self.deny_exact.len(), m::DENY_EXACT_CAPACITY),
            (m::DENY_PREFIX, self.deny_prefixes.len(), m::DENY_PREFIX_CAPACITY),
            (m::RATE_LIMITS, self.rates.len(), m::RATE_LIMITS_CAPACITY),
        ]
    }
}

impl Tables for TableSet {
    fn may_hold_container(&self, _: &Addr) -> bool {
        true
    }

    fn may_be_published(&self, _: u16) -> bool {
        true
    }

    fn addr_info(&self, addr: &Addr) -> Option<AddrInfo> {
        self.addrs.get(addr).copied()
    }

    fn in_docker_network(&self, addr: &Addr) -> bool {
        self.networks.keys().any(|net| addr.in_prefix(&net.data, net.len))
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

    fn flow_seen(&self, _: &FlowKey) -> bool {
        false
    }

    fn source_trusted(&self, src: &Addr) -> bool {
        self.trusted.keys().any(|t| src.in_prefix(&t.data, t.len))
    }

    fn source_denied(&self, src: &Addr) -> bool {
        self.deny_exact.contains_key(src)
            || self.deny_prefixes.keys().any(|d| src.in_prefix(&d.data, d.len))
    }

    fn audit_all(&self) -> bool {
        self.config.flags & CONFIG_AUDIT_ALL != 0
    }

    /// The host addresses the agent listed; the kernel also asks its FIB, which can know
    /// more (see [`guard_common::decision::Tables::delivered_locally`]).
    fn delivered_locally(&self, dst: &Addr) -> bool {
        self.addrs.get(dst).is_some_and(|info| info.kind == AddrInfo::HOST)
    }
}

/// The reference with flow memory: `tables` plus the flows the egress program has seen.
pub struct WithFlows<'a> {
    pub tables: &'a TableSet,
    pub flows: &'a BTreeSet<FlowKey>,
}

impl Tables for WithFlows<'_> {
    fn may_hold_container(&self, dst: &Addr) -> bool {
        self.tables.may_hold_container(dst)
    }
    fn may_be_published(&self, port: u16) -> bool {
        self.tables.may_be_published(port)
    }
    fn published(&self, key: &PublishedKey) -> Option<PublishedTarget> {
        self.tables.published(key)
    }
    fn addr_info(&self, addr: &Addr) -> Option<AddrInfo> {
        self.tables.addr_info(addr)
    }
    fn in_docker_network(&self, addr: &Addr) -> bool {
        self.tables.in_docker_network(addr)
    }
    fn port_rule(&self, key: &PortKey) -> Option<PortRule> {
        self.tables.port_rule(key)
    }
    fn source_listed(&self, key: &PortKey, src: &Addr) -> bool {
        self.tables.source_listed(key, src)
    }
    fn flow_seen(&self, key: &FlowKey) -> bool {
        self.flows.contains(key)
    }
    fn source_trusted(&self, src: &Addr) -> bool {
        self.tables.source_trusted(src)
    }
    fn source_denied(&self, src: &Addr) -> bool {
        self.tables.source_denied(src)
    }
    fn audit_all(&self) -> bool {
        self.tables.audit_all()
    }
    fn delivered_locally(&self, dst: &Addr) -> bool {
        self.tables.delivered_locally(dst)
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
    let upsert =
        desired.iter().filter(|(k, v)| current.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
    let remove = current.keys().filter(|k| !desired.contains_key(k)).copied().collect();
    TableDiff { upsert, remove }
}

/// The changes that turn `current` into `desired`, map by map. The order in which they may be
/// applied safely is [`crate::kernel::maps::PolicyMaps::apply`]'s business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub addrs: TableDiff<Addr, AddrInfo>,
    pub networks: TableDiff<Lpm<Addr>, u32>,
    pub published: TableDiff<PublishedKey, PublishedTarget>,
    pub ports: TableDiff<PortKey, PortRule>,
    pub sources: TableDiff<Lpm<SourceKey>, u32>,
    pub identities: TableDiff<u32, ContainerId>,
    pub prefilter: Option<PrefilterChange>,
    pub trusted: TableDiff<Lpm<Addr>, u32>,
    pub deny_exact: TableDiff<Addr, u32>,
    pub deny_prefixes: TableDiff<Lpm<Addr>, u32>,
    pub rates: TableDiff<PortKey, RateLimit>,
    pub config: Option<Config>,
    pub uplinks: TableDiff<u32, u32>,
}

/// A prefilter change is applied in two steps so the filter never hides anything either the
/// old or the new state holds: `widened` (old | new) before the other maps change, `last`
/// (new) after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefilterChange {
    pub widened: Prefilter,
    pub last: Prefilter,
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
            + self.prefilter.as_ref().map_or(0, |_| 1)
            + self.trusted.len()
            + self.deny_exact.len()
            + self.deny_prefixes.len()
            + self.rates.len()
            + self.config.map_or(0, |_| 1)
            + self.uplinks.len()
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
        prefilter: (current.prefilter != desired.prefilter).then(|| PrefilterChange {
            widened: current.prefilter.union(&desired.prefilter),
            last: desired.prefilter.clone(),
        }),
        trusted: diff_map(&current.trusted, &desired.trusted),
        deny_exact: diff_map(&current.deny_exact, &desired.deny_exact),
        deny_prefixes: diff_map(&current.deny_prefixes, &desired.deny_prefixes),
        rates: diff_map(&current.rates, &desired.rates),
        config: (current.config != desired.config).then_some(desired.config),
        uplinks: diff_map(&current.uplinks, &desired.uplinks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Addr {
        s.parse::<std::net::IpAddr>().unwrap().into()
    }

    #[test]
    fn a_pass_without_the_ban_lock_lifts_no_denial() {
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let mut kernel = TableSet::default();
        kernel.deny([cidr("192.0.2.7/32"), cidr("198.51.100.0/24")]);
        let mut desired = TableSet::default();
        desired.deny([cidr("203.0.113.9/32")]);
        desired.keep_denied(&kernel);
        let plan = diff(&kernel, &desired);
        let mut after = kernel.clone();
        after.deny([cidr("203.0.113.9/32")]);
        assert_eq!(desired, after, "the new denial added, none lifted");
        assert!(!plan.is_empty());
    }

    #[test]
    fn diff_of_equal_sets_is_empty_and_finds_every_change() {
        let mut current = TableSet::default();
        current.addrs.insert(a("172.18.0.2"), AddrInfo::container(1));
        current.addrs.insert(a("172.18.0.3"), AddrInfo::container(2));
        current.ports.insert(PortKey::new(1, 6, 443), PortRule::everyone());
        assert!(diff(&current, &current).is_empty());

        let mut desired = current.clone();
        desired.addrs.insert(a("172.18.0.2"), AddrInfo::container(5)); // changed value
        desired.addrs.remove(&a("172.18.0.3")); // gone
        desired.addrs.insert(a("172.18.0.4"), AddrInfo::container(6)); // new
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
    fn prefilter_marks_every_bucket_a_prefix_can_reach() {
        let cases = [
            ("172.30.0.0", 96 + 24, &["172.30.0.1", "172.30.0.255"][..], &["172.31.0.1"][..]),
            ("10.0.0.0", 96 + 8, &["10.0.0.1", "10.255.255.255", "10.128.3.4"], &["11.0.0.1"]),
            ("172.16.0.0", 96 + 12, &["172.16.0.1", "172.31.255.1"], &["172.32.0.1"]),
            ("fd00:30::", 64, &["fd00:30::1", "fd00:30::ffff:1"], &["fd00:31::1"]),
            ("2001:db8::", 29, &["2001:db8::1", "2001:dbf:ffff::1"], &["2001:dc0::1"]),
        ];
        for (net, len, inside, outside) in cases {
            let mut p = Prefilter::default();
            p.mark_prefix(&a(net), len);
            for ip in inside {
                let (entry, bit) = prefilter::address_bucket(&a(ip));
                assert!(p.entry_mut(entry).get(bit), "{ip} in {net}/{len} must pass the filter");
            }
            for ip in outside {
                let (entry, bit) = prefilter::address_bucket(&a(ip));
                assert!(!p.entry_mut(entry).get(bit), "{ip} outside {net}/{len} is filtered");
            }
        }
        let mut p = Prefilter::default();
        p.mark_prefix(&a("fd00::"), 8);
        assert_eq!(p.v6.count(), 65536, "a v6 prefix shorter than /16 opens the whole filter");
    }

    #[test]
    fn reference_lookups_follow_prefixes() {
        let mut t = TableSet::default();
        t.networks.insert(Lpm { len: 96 + 16, data: a("172.18.0.0") }, 1);
        let key = PortKey::new(1, 6, 5432);
        t.sources.insert(
            Lpm {
                len: SourceKey::PORT_BITS + 96 + 24,
                data: SourceKey { port: key, addr: a("10.8.0.0") },
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
