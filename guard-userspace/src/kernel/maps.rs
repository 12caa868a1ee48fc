//! The pinned policy maps: read them into a [`TableSet`], apply a [`Plan`] to them.

use aya::maps::PerCpuHashMap;
use guard_common::events::{
    DropKey, DropSlot, EVENT_OUTCOMES, EVENT_STREAMS, EVENTS_PER_SECOND_PER_CPU, Limiter,
    event_stat_slot,
};
use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key,
    },
};
use guard_common::{
    addr::Addr,
    maps::{
        self as names, AddrInfo, Config, ContainerId, FlowKey, FlowSeen, PortKey, PortRule,
        PublishedKey, PublishedTarget, SourceKey,
    },
    prefilter::{self, Bitmap},
    ratelimit::RateLimit,
    reason::{Decision, Reason},
};

use crate::{
    kernel::pins::Pins,
    policy::Cidr,
    state::tables::{Lpm, Plan, Prefilter, TableDiff, TableSet},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the eBPF object: the build is broken")]
    Missing { name: &'static str },
    #[error(
        "opening pinned map {name} at {path}: {source} (is the agent installed at this --pin-dir?)"
    )]
    Open { name: &'static str, path: String, source: MapError },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout { name: &'static str, source: MapError },
    #[error("reading map {name}: {source}")]
    Read { name: &'static str, source: MapError },
}

#[derive(Debug, thiserror::Error)]
pub enum DenyError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Update(Box<UpdateError>),
}

/// A map update that failed; the rest of the plan is still applied.
#[derive(Debug, thiserror::Error)]
#[error("{op} of {key} in map {map} failed: {} (map full? capacity {capacity})", errno(source))]
pub struct UpdateError {
    /// The entry, for the operator: which opening or address is missing.
    pub key: String,
    pub map: &'static str,
    pub op: &'static str,
    pub capacity: u32,
    pub source: MapError,
}

pub struct PolicyMaps {
    addrs: Table<HashMap<MapData, Addr, AddrInfo>>,
    networks: Table<LpmTrie<MapData, Addr, u32>>,
    published: Table<HashMap<MapData, PublishedKey, PublishedTarget>>,
    ports: Table<HashMap<MapData, PortKey, PortRule>>,
    sources: Table<LpmTrie<MapData, SourceKey, u32>>,
    identities: Table<HashMap<MapData, u32, ContainerId>>,
    counters: PerCpuArray<MapData, u64>,
    prefilter: Array<MapData, Bitmap>,
    flows: HashMap<MapData, FlowKey, FlowSeen>,
    trusted: Table<LpmTrie<MapData, Addr, u32>>,
    deny_exact: Table<HashMap<MapData, Addr, u32>>,
    deny_prefixes: Table<LpmTrie<MapData, Addr, u32>>,
    rates: Table<HashMap<MapData, PortKey, RateLimit>>,
    config: Array<MapData, Config>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    drop_slots: PerCpuArray<MapData, DropSlot>,
    /// The containers whose drop slots were kept at the last sweep of the slots (see
    /// [`PolicyMaps::forget_drops`]); `None` before the first.
    drop_slots_kept: Option<BTreeSet<u32>>,
    event_stats: PerCpuArray<MapData, u64>,
    event_limit: PerCpuArray<MapData, Limiter>,
    uplinks: Table<HashMap<MapData, u32, u32>>,
    gate_counters: PerCpuArray<MapData, u64>,
}

/// Where the maps come from: the object just loaded, or the pins an agent left.
trait MapSource {
    fn map(&mut self, name: &'static str) -> Result<Map, MapsError>;
}

impl MapSource for Ebpf {
    fn map(&mut self, name: &'static str) -> Result<Map, MapsError> {
        self.take_map(name).ok_or(MapsError::Missing { name })
    }
}

impl MapSource for &Pins {
    fn map(&mut self, name: &'static str) -> Result<Map, MapsError> {
        let path = Pins::map(self, name);
        let open_err = |source| MapsError::Open { name, path: path.display().to_string(), source };
        Map::from_map_data(MapData::from_pin(&path).map_err(open_err)?).map_err(open_err)
    }
}

impl PolicyMaps {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::open(ebpf)
    }

    pub fn from_pins(pins: &Pins) -> Result<Self, MapsError> {
        Self::open(&mut { pins })
    }

    fn open(s: &mut impl MapSource) -> Result<Self, MapsError> {
        fn typed<T: TryFrom<Map, Error = MapError>>(
            source: &mut impl MapSource,
            name: &'static str,
        ) -> Result<T, MapsError> {
            source.map(name)?.try_into().map_err(|source| MapsError::Layout { name, source })
        }
        fn table<T: TryFrom<Map, Error = MapError>>(
            source: &mut impl MapSource,
            name: &'static str,
            capacity: u32,
        ) -> Result<Table<T>, MapsError> {
            Ok(Table { map: typed(source, name)?, name, capacity })
        }
        Ok(PolicyMaps {
            addrs: table(s, names::ADDRS, names::ADDRS_CAPACITY)?,
            networks: table(s, names::NETWORKS, names::NETWORKS_CAPACITY)?,
            published: table(s, names::PUBLISHED, names::PUBLISHED_CAPACITY)?,
            ports: table(s, names::PORTS, names::PORTS_CAPACITY)?,
            sources: table(s, names::SOURCES, names::SOURCES_CAPACITY)?,
            identities: table(s, names::IDENTITIES, names::IDENTITIES_CAPACITY)?,
            counters: typed(s, names::COUNTERS)?,
            prefilter: typed(s, names::PREFILTER)?,
            flows: typed(s, names::FLOWS)?,
            trusted: table(s, names::TRUSTED, names::TRUSTED_CAPACITY)?,
            deny_exact: table(s, names::DENY_EXACT, names::DENY_EXACT_CAPACITY)?,
            deny_prefixes: table(s, names::DENY_PREFIX, names::DENY_PREFIX_CAPACITY)?,
            rates: table(s, names::RATE_LIMITS, names::RATE_LIMITS_CAPACITY)?,
            config: typed(s, names::CONFIG)?,
            drops: typed(s, names::DROPS)?,
            drop_slots: typed(s, names::DROP_SLOTS)?,
            drop_slots_kept: None,
            event_stats: typed(s, names::EVENT_STATS)?,
            event_limit: typed(s, names::EVENT_LIMIT)?,
            uplinks: table(s, names::UPLINKS, names::UPLINKS_CAPACITY)?,
            gate_counters: typed(s, names::GATE_COUNTERS)?,
        })
    }

    /// Everything the kernel holds now.
    pub fn read(&self) -> Result<TableSet, MapsError> {
        Ok(TableSet {
            addrs: self.addrs.read()?,
            networks: self.networks.read()?,
            published: self.published.read()?,
            ports: self.ports.read()?,
            sources: self.sources.read()?,
            identities: self.identities.read()?,
            prefilter: self.read_prefilter()?,
            trusted: self.trusted.read()?,
            deny_exact: self.deny_exact.read()?,
            deny_prefixes: self.deny_prefixes.read()?,
            rates: self.rates.read()?,
            uplinks: self.uplinks.read()?,
            config: self
                .config
                .get(&0, 0)
                .map_err(|source| MapsError::Read { name: names::CONFIG, source })?,
        })
    }

    fn read_prefilter(&self) -> Result<Prefilter, MapsError> {
        let read = |entry: u32| {
            self.prefilter
                .get(&entry, 0)
                .map(Box::new)
                .map_err(|source| MapsError::Read { name: names::PREFILTER, source })
        };
        Ok(Prefilter {
            v4: read(prefilter::V4_DESTINATIONS)?,
            v6: read(prefilter::V6_DESTINATIONS)?,
            ports: read(prefilter::PUBLISHED_PORTS)?,
        })
    }

    fn write_prefilter(&mut self, prefilter: &Prefilter, errors: &mut Vec<UpdateError>) {
        for (entry, bitmap) in prefilter.entries() {
            if let Err(source) = self.prefilter.set(entry, bitmap, 0) {
                errors.push(UpdateError {
                    map: names::PREFILTER,
                    op: "set",
                    key: format!("entry {entry}"),
                    capacity: prefilter::ENTRIES,
                    source,
                });
            }
        }
    }

    /// Applies `plan` in the order that never opens more than either the old or the new state
    /// would: close, then protect and map, then open, then forget.
    ///
    /// 1. Remove openings that go away (ports, sources); put new and changed rate limits in
    ///    force (a limit only ever holds back, and its target's flag comes in step 2).
    /// 2. Widen the prefilter to old | new; add subnets, addresses, published ports,
    ///    identities. A new address points at its (possibly new) target id, whose openings do
    ///    not exist yet.
    /// 3. Add openings: source lists before the port rules that refer to them.
    /// 4. Remove addresses, published ports, subnets, identities and rate limits that are
    ///    gone (the flags that pointed at a limit went in step 2); narrow the prefilter to the
    ///    new state.
    ///
    /// A failed update (a full map) is reported and the rest still applied.
    pub fn apply(&mut self, plan: &Plan) -> Vec<UpdateError> {
        let mut errors = Vec::new();
        let e = &mut errors;
        self.ports.remove_all(&plan.ports, e);
        self.sources.remove_all(&plan.sources, e);
        // Denials close: in force before anything else changes (the flags that make the
        // program look them up come with the config below).
        self.deny_exact.upsert_all(&plan.deny_exact, e);
        self.deny_prefixes.upsert_all(&plan.deny_prefixes, e);
        self.rates.upsert_all(&plan.rates, e);

        if let Some(change) = &plan.prefilter {
            self.write_prefilter(&change.widened, e);
        }
        self.networks.upsert_all(&plan.networks, e);
        self.addrs.upsert_all(&plan.addrs, e);
        self.published.upsert_all(&plan.published, e);
        self.identities.upsert_all(&plan.identities, e);
        self.trusted.upsert_all(&plan.trusted, e);
        self.uplinks.upsert_all(&plan.uplinks, e);
        if let Some(config) = &plan.config
            && let Err(source) = self.config.set(0, config, 0)
        {
            let key = "entry 0".into();
            e.push(UpdateError { map: names::CONFIG, op: "set", key, capacity: 1, source });
        }

        self.sources.upsert_all(&plan.sources, e);
        self.ports.upsert_all(&plan.ports, e);
        self.deny_exact.remove_all(&plan.deny_exact, e);
        self.deny_prefixes.remove_all(&plan.deny_prefixes, e);

        self.addrs.remove_all(&plan.addrs, e);
        self.published.remove_all(&plan.published, e);
        self.networks.remove_all(&plan.networks, e);
        self.identities.remove_all(&plan.identities, e);
        self.trusted.remove_all(&plan.trusted, e);
        self.uplinks.remove_all(&plan.uplinks, e);
        self.rates.remove_all(&plan.rates, e);
        if let Some(change) = &plan.prefilter {
            self.write_prefilter(&change.last, e);
        }
        errors
    }

    /// Denies `source` every container port, or lifts that (`guard ban` and `guard unban`,
    /// which take effect before an agent's next pass), by the same ordered apply as a pass.
    /// The flag that makes the program look a table up stays set once set: an empty table
    /// costs a lookup, never a denial missed.
    pub fn set_denied(&mut self, source: Cidr, denied: bool) -> Result<(), DenyError> {
        let current = self.read()?;
        let mut entries = TableSet::default();
        entries.deny([source]);
        let mut wanted = current.clone();
        if denied {
            wanted.deny([source]);
        } else {
            wanted.deny_exact.retain(|k, _| !entries.deny_exact.contains_key(k));
            wanted.deny_prefixes.retain(|k, _| !entries.deny_prefixes.contains_key(k));
        }
        let failed = self.apply(&crate::state::tables::diff(&current, &wanted));
        match failed.into_iter().next() {
            Some(first) => Err(DenyError::Update(Box::new(first))),
            None => Ok(()),
        }
    }

    /// Records an outbound flow as the TC egress program would (for tests and benchmarks).
    pub fn remember_flow(&mut self, key: &FlowKey, seen_ns: FlowSeen) -> Result<(), MapError> {
        self.flows.insert(key, seen_ns, 0)
    }

    /// Packets dropped (or waived by audit) per container port, summed over CPUs and over the
    /// two maps a counter can be in (see [`DropSlot`]).
    pub fn drops(&self) -> Result<Vec<(DropKey, u64)>, MapsError> {
        let mut totals: BTreeMap<DropKey, u64> = BTreeMap::new();
        for entry in &self.drops {
            let (key, per_cpu) =
                entry.map_err(|source| MapsError::Read { name: names::DROPS, source })?;
            *totals.entry(key).or_default() += per_cpu.iter().sum::<u64>();
        }
        for per_cpu in self.drop_slots.iter() {
            let per_cpu =
                per_cpu.map_err(|source| MapsError::Read { name: names::DROP_SLOTS, source })?;
            for slot in per_cpu.iter().filter(|slot| slot.key != DropKey::EMPTY) {
                *totals.entry(slot.key).or_default() += slot.count;
            }
        }
        Ok(totals.into_iter().collect())
    }

    /// Forgets the drop counters of containers that are gone (their target ids never return).
    /// Their slots are emptied for other keys to take, but only when a container went away
    /// since the last sweep: the sweep reads every slot.
    pub fn forget_drops(&mut self, live_targets: &BTreeSet<u32>) {
        let gone: Vec<DropKey> = self
            .drops
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live_targets.contains(&k.target))
            .collect();
        for key in gone {
            let _ = self.drops.remove(&key);
        }
        if self.drop_slots_kept.as_ref().is_some_and(|kept| kept.is_subset(live_targets)) {
            return;
        }
        let gone = |slot: &DropSlot| {
            slot.key != DropKey::EMPTY && !live_targets.contains(&slot.key.target)
        };
        let empty = DropSlot { key: DropKey::EMPTY, count: 0 };
        for index in 0..names::DROP_SLOTS_CAPACITY {
            let Ok(per_cpu) = self.drop_slots.get(&index, 0) else { continue };
            if !per_cpu.iter().any(gone) {
                continue;
            }
            // The whole slot is written, every CPU's copy: a drop counted on another CPU for a
            // live key in this slot between the read above and this write is lost. Rare (a
            // container went away, and two CPUs' keys met in one slot) and small; the totals
            // per reason in the counters map are not affected.
            let kept: Vec<DropSlot> =
                per_cpu.iter().map(|slot| if gone(slot) { empty } else { *slot }).collect();
            if let Ok(values) = PerCpuValues::try_from(kept) {
                let _ = self.drop_slots.set(index, values, 0);
            }
        }
        self.drop_slots_kept = Some(live_targets.clone());
    }

    /// Events of `stream` (`STREAM_DROPS`, `STREAM_ACCESS`) emitted, suppressed by the rate
    /// limit and lost to a full ring, summed over CPUs.
    pub fn event_stats(&self, stream: u32) -> Result<[u64; EVENT_OUTCOMES as usize], MapsError> {
        let mut out = [0; EVENT_OUTCOMES as usize];
        for (outcome, total) in (0..).zip(out.iter_mut()) {
            let per_cpu = self
                .event_stats
                .get(&event_stat_slot(stream, outcome), 0)
                .map_err(|source| MapsError::Read { name: names::EVENT_STATS, source })?;
            *total = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Gives a CPU whose event budget ran out more than a second ago (at `now_ns`,
    /// CLOCK_MONOTONIC) a fresh one, in every stream (drops, accesses: each has its own).
    /// Over its budget, the program reads the clock only every 64th event (a flood must not pay
    /// for it on every packet), so after a flood that ended, the next quiet events would go
    /// untold until 64 of them had passed: the running agent ends such a window each second
    /// instead, and `at_exit` every spent one, so that what happens while no agent runs is
    /// told by the next.
    pub fn renew_event_budget(&mut self, now_ns: u64, at_exit: bool) -> Result<(), MapsError> {
        for stream in 0..EVENT_STREAMS {
            self.renew_stream_budget(stream, now_ns, at_exit)?;
        }
        Ok(())
    }

    /// [`Self::renew_event_budget`] for one stream's limiter entry.
    fn renew_stream_budget(
        &mut self,
        stream: u32,
        now_ns: u64,
        at_exit: bool,
    ) -> Result<(), MapsError> {
        let read = |source| MapsError::Read { name: names::EVENT_LIMIT, source };
        let mut limiters: Vec<Limiter> = self.event_limit.get(&stream, 0).map_err(read)?.to_vec();
        let mut renewed = false;
        for limiter in &mut limiters {
            let spent = limiter.emitted >= EVENTS_PER_SECOND_PER_CPU;
            let over = now_ns.wrapping_sub(limiter.window_start_ns) > 1_000_000_000;
            if spent && (over || at_exit) {
                *limiter =
                    Limiter { window_start_ns: now_ns, emitted: 0, suppressed_since_check: 0 };
                renewed = true;
            }
        }
        if renewed {
            // The count read is the count of possible CPUs: the values fit.
            let values = PerCpuValues::try_from(limiters).map_err(|e| read(MapError::from(e)))?;
            self.event_limit.set(stream, values, 0).map_err(read)?;
        }
        Ok(())
    }

    /// Every flow in flow memory, with when it last left the host (CLOCK_MONOTONIC ns).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowSeen)>, MapsError> {
        self.flows
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| MapsError::Read { name: names::FLOWS, source })
    }

    /// Packets seen on the uplinks per decision (reason, and whether audit mode waived a drop),
    /// summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Decision, u64)>, MapsError> {
        read_counters(&self.counters, names::COUNTERS)
    }

    /// The same for the bridge gate: packets from uplinks judged again after NAT.
    pub fn gate_counters(&self) -> Result<Vec<(Decision, u64)>, MapsError> {
        read_counters(&self.gate_counters, names::GATE_COUNTERS)
    }
}

fn read_counters(
    counters: &PerCpuArray<MapData, u64>,
    name: &'static str,
) -> Result<Vec<(Decision, u64)>, MapsError> {
    let decisions = Reason::ALL
        .iter()
        .flat_map(|reason| [false, true].map(|audited| Decision { reason: *reason, audited }));
    decisions
        .map(|decision| {
            let per_cpu = counters
                .get(&decision.counter_slot(), 0)
                .map_err(|source| MapsError::Read { name, source })?;
            Ok((decision, per_cpu.iter().sum()))
        })
        .collect()
}

/// The OS error under a map error (aya's own message names only the syscall).
fn errno(e: &MapError) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut last = e.to_string();
    while let Some(err) = source {
        last = err.to_string();
        source = err.source();
    }
    format!("{e}: {last}")
}

/// A kernel map with the name and capacity its errors should mention.
struct Table<M> {
    map: M,
    name: &'static str,
    capacity: u32,
}

/// Read, insert and remove for the two kinds of keyed map, in the [`TableSet`]'s key types.
trait KeyedMap<K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError>;
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError>;
    fn delete(&mut self, key: &K) -> Result<(), MapError>;
}

impl<K: aya::Pod + Ord, V: aya::Pod> KeyedMap<K, V> for HashMap<MapData, K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        self.iter().collect()
    }
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.insert(key, value, 0)
    }
    fn delete(&mut self, key: &K) -> Result<(), MapError> {
        self.remove(key)
    }
}

impl<K: aya::Pod + Ord, V: aya::Pod> KeyedMap<Lpm<K>, V> for LpmTrie<MapData, K, V> {
    fn entries(&self) -> Result<BTreeMap<Lpm<K>, V>, MapError> {
        self.iter()
            .map(|r| r.map(|(k, v)| (Lpm { len: k.prefix_len(), data: k.data() }, v)))
            .collect()
    }
    fn put(&mut self, key: &Lpm<K>, value: &V) -> Result<(), MapError> {
        self.insert(&Key::new(key.len, key.data), value, 0)
    }
    fn delete(&mut self, key: &Lpm<K>) -> Result<(), MapError> {
        self.remove(&Key::new(key.len, key.data))
    }
}

impl<M> Table<M> {
    fn read<K, V>(&self) -> Result<BTreeMap<K, V>, MapsError>
    where
        M: KeyedMap<K, V>,
    {
        self.map.entries().map_err(|source| MapsError::Read { name: self.name, source })
    }

    fn upsert_all<K: std::fmt::Debug, V>(
        &mut self,
        diff: &TableDiff<K, V>,
        errors: &mut Vec<UpdateError>,
    ) where
        M: KeyedMap<K, V>,
    {
        for (key, value) in &diff.upsert {
            if let Err(source) = self.map.put(key, value) {
                errors.push(self.error("insert", format!("{key:?}"), source));
            }
        }
    }

    fn remove_all<K: std::fmt::Debug, V>(
        &mut self,
        diff: &TableDiff<K, V>,
        errors: &mut Vec<UpdateError>,
    ) where
        M: KeyedMap<K, V>,
    {
        for key in &diff.remove {
            if let Err(source) = self.map.delete(key) {
                errors.push(self.error("remove", format!("{key:?}"), source));
            }
        }
    }

    fn error(&self, op: &'static str, key: String, source: MapError) -> UpdateError {
        UpdateError { map: self.name, op, key, capacity: self.capacity, source }
    }
}
