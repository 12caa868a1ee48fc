//! The pinned policy maps: read them into a [`TableSet`], apply a [`Plan`] to them.

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use guard_common::{
    addr::Addr,
    maps::{
        self as names, AddrInfo, ContainerId, PortKey, PortRule, PublishedKey, PublishedTarget,
        SourceKey,
    },
    reason::Reason,
};

use crate::{
    pins::Pins,
    tables::{Lpm, Plan, TableDiff, TableSet},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the eBPF object: the build is broken")]
    Missing { name: &'static str },
    #[error(
        "opening pinned map {name} at {path}: {source} (is the agent installed at this --pin-dir?)"
    )]
    Open {
        name: &'static str,
        path: String,
        source: MapError,
    },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout {
        name: &'static str,
        source: MapError,
    },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        source: MapError,
    },
}

/// A map update that failed; the rest of the plan is still applied.
#[derive(Debug, thiserror::Error)]
#[error("{op} in map {map} failed: {source} (map full? capacity {capacity})")]
pub struct UpdateError {
    pub map: &'static str,
    pub op: &'static str,
    pub capacity: u32,
    pub source: MapError,
}

pub struct PolicyMaps {
    addrs: HashMap<MapData, Addr, AddrInfo>,
    networks: LpmTrie<MapData, Addr, u32>,
    published: HashMap<MapData, PublishedKey, PublishedTarget>,
    ports: HashMap<MapData, PortKey, PortRule>,
    sources: LpmTrie<MapData, SourceKey, u32>,
    identities: HashMap<MapData, u32, ContainerId>,
    counters: PerCpuArray<MapData, u64>,
}

/// Where the maps come from: the object just loaded, or the pins an agent left.
trait MapSource {
    fn map(&mut self, name: &'static str) -> Result<MapData, MapsError>;
}

impl MapSource for Ebpf {
    fn map(&mut self, name: &'static str) -> Result<MapData, MapsError> {
        let map = self.take_map(name).ok_or(MapsError::Missing { name })?;
        // Every guard map is pinned by name, so its MapData is what every typed view wraps.
        match map {
            aya::maps::Map::HashMap(m)
            | aya::maps::Map::LpmTrie(m)
            | aya::maps::Map::PerCpuArray(m) => Ok(m),
            _ => Err(MapsError::Layout {
                name,
                source: MapError::InvalidName { name: name.into() },
            }),
        }
    }
}

impl MapSource for &Pins {
    fn map(&mut self, name: &'static str) -> Result<MapData, MapsError> {
        let path = Pins::map(self, name);
        MapData::from_pin(&path).map_err(|source| MapsError::Open {
            name,
            path: path.display().to_string(),
            source,
        })
    }
}

impl PolicyMaps {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::open(ebpf)
    }

    pub fn from_pins(pins: &Pins) -> Result<Self, MapsError> {
        Self::open(&mut { pins })
    }

    fn open(source: &mut impl MapSource) -> Result<Self, MapsError> {
        fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
            name: &'static str,
            data: MapData,
        ) -> Result<T, MapsError> {
            let map = aya::maps::Map::from_map_data(data)
                .map_err(|source| MapsError::Layout { name, source })?;
            T::try_from(map).map_err(|source| MapsError::Layout { name, source })
        }
        Ok(PolicyMaps {
            addrs: typed(names::ADDRS, source.map(names::ADDRS)?)?,
            networks: typed(names::NETWORKS, source.map(names::NETWORKS)?)?,
            published: typed(names::PUBLISHED, source.map(names::PUBLISHED)?)?,
            ports: typed(names::PORTS, source.map(names::PORTS)?)?,
            sources: typed(names::SOURCES, source.map(names::SOURCES)?)?,
            identities: typed(names::IDENTITIES, source.map(names::IDENTITIES)?)?,
            counters: typed(names::COUNTERS, source.map(names::COUNTERS)?)?,
        })
    }

    /// Everything the kernel holds now.
    pub fn read(&self) -> Result<TableSet, MapsError> {
        fn collect<K: Ord, V, I: Iterator<Item = Result<(K, V), MapError>>>(
            name: &'static str,
            iter: I,
        ) -> Result<std::collections::BTreeMap<K, V>, MapsError> {
            iter.collect::<Result<_, _>>()
                .map_err(|source| MapsError::Read { name, source })
        }
        fn lpm<K: aya::Pod + Ord, V>(
            name: &'static str,
            iter: impl Iterator<Item = Result<(Key<K>, V), MapError>>,
        ) -> Result<std::collections::BTreeMap<Lpm<K>, V>, MapsError> {
            collect(
                name,
                iter.map(|r| {
                    r.map(|(k, v)| {
                        (
                            Lpm {
                                len: k.prefix_len(),
                                data: k.data(),
                            },
                            v,
                        )
                    })
                }),
            )
        }
        Ok(TableSet {
            addrs: collect(names::ADDRS, self.addrs.iter())?,
            networks: lpm(names::NETWORKS, self.networks.iter())?,
            published: collect(names::PUBLISHED, self.published.iter())?,
            ports: collect(names::PORTS, self.ports.iter())?,
            sources: lpm(names::SOURCES, self.sources.iter())?,
            identities: collect(names::IDENTITIES, self.identities.iter())?,
        })
    }

    /// Applies `plan` in the order that never opens more than either the old or the new state
    /// would: close, then protect and map, then open, then forget.
    ///
    /// 1. Remove openings that go away (ports, sources).
    /// 2. Add subnets, addresses, published ports, identities. A new address points at its
    ///    (possibly new) target id, whose openings do not exist yet.
    /// 3. Add openings: source lists before the port rules that refer to them.
    /// 4. Remove addresses, published ports, subnets and identities that are gone.
    pub fn apply(&mut self, plan: &Plan) -> Vec<UpdateError> {
        let mut errors = Vec::new();
        remove(
            &mut self.ports,
            &plan.ports,
            names::PORTS,
            names::PORTS_CAPACITY,
            &mut errors,
        );
        remove_lpm(
            &mut self.sources,
            &plan.sources,
            names::SOURCES,
            names::SOURCES_CAPACITY,
            &mut errors,
        );

        upsert_lpm(
            &mut self.networks,
            &plan.networks,
            names::NETWORKS,
            names::NETWORKS_CAPACITY,
            &mut errors,
        );
        upsert(
            &mut self.addrs,
            &plan.addrs,
            names::ADDRS,
            names::ADDRS_CAPACITY,
            &mut errors,
        );
        upsert(
            &mut self.published,
            &plan.published,
            names::PUBLISHED,
            names::PUBLISHED_CAPACITY,
            &mut errors,
        );
        upsert(
            &mut self.identities,
            &plan.identities,
            names::IDENTITIES,
            names::IDENTITIES_CAPACITY,
            &mut errors,
        );

        upsert_lpm(
            &mut self.sources,
            &plan.sources,
            names::SOURCES,
            names::SOURCES_CAPACITY,
            &mut errors,
        );
        upsert(
            &mut self.ports,
            &plan.ports,
            names::PORTS,
            names::PORTS_CAPACITY,
            &mut errors,
        );

        remove(
            &mut self.addrs,
            &plan.addrs,
            names::ADDRS,
            names::ADDRS_CAPACITY,
            &mut errors,
        );
        remove(
            &mut self.published,
            &plan.published,
            names::PUBLISHED,
            names::PUBLISHED_CAPACITY,
            &mut errors,
        );
        remove_lpm(
            &mut self.networks,
            &plan.networks,
            names::NETWORKS,
            names::NETWORKS_CAPACITY,
            &mut errors,
        );
        remove(
            &mut self.identities,
            &plan.identities,
            names::IDENTITIES,
            names::IDENTITIES_CAPACITY,
            &mut errors,
        );
        errors
    }

    /// Packets seen per reason, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, MapsError> {
        Reason::ALL
            .iter()
            .map(|reason| {
                let per_cpu =
                    self.counters
                        .get(&(*reason as u32), 0)
                        .map_err(|source| MapsError::Read {
                            name: names::COUNTERS,
                            source,
                        })?;
                Ok((*reason, per_cpu.iter().sum()))
            })
            .collect()
    }
}

fn upsert<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    diff: &TableDiff<K, V>,
    name: &'static str,
    capacity: u32,
    errors: &mut Vec<UpdateError>,
) {
    for (k, v) in &diff.upsert {
        if let Err(source) = map.insert(k, v, 0) {
            errors.push(UpdateError {
                map: name,
                op: "insert",
                capacity,
                source,
            });
        }
    }
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    diff: &TableDiff<K, V>,
    name: &'static str,
    capacity: u32,
    errors: &mut Vec<UpdateError>,
) {
    for k in &diff.remove {
        if let Err(source) = map.remove(k) {
            errors.push(UpdateError {
                map: name,
                op: "remove",
                capacity,
                source,
            });
        }
    }
}

fn upsert_lpm<K: aya::Pod, V: aya::Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    diff: &TableDiff<Lpm<K>, V>,
    name: &'static str,
    capacity: u32,
    errors: &mut Vec<UpdateError>,
) {
    for (k, v) in &diff.upsert {
        if let Err(source) = map.insert(&Key::new(k.len, k.data), v, 0) {
            errors.push(UpdateError {
                map: name,
                op: "insert",
                capacity,
                source,
            });
        }
    }
}

fn remove_lpm<K: aya::Pod, V: aya::Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    diff: &TableDiff<Lpm<K>, V>,
    name: &'static str,
    capacity: u32,
    errors: &mut Vec<UpdateError>,
) {
    for k in &diff.remove {
        if let Err(source) = map.remove(&Key::new(k.len, k.data)) {
            errors.push(UpdateError {
                map: name,
                op: "remove",
                capacity,
                source,
            });
        }
    }
}
