//! A synthetic Docker host at a given scale, and guard loaded with the maps the agent would
//! write for it (the real `desired_state`, diffed and applied like the agent does).
//!
//! The host: uplink 10.252.0.1 (the flood's host-side veth has this address), Docker networks
//! 10.253.N.0/24 + fd00:253:N::/64 with 250 containers each (gateway .1), so 10,000 containers
//! take 40 networks. Container `i`:
//! - holds 10.253.(i / 250).(2 + i % 250), and every 4th also the matching IPv6 address;
//! - publishes host port 20000 + i/10 on every host address for its closed port 8080 if
//!   i % 10 == 0 (Docker's `-p 20000:8080`);
//! - exposes 443/tcp if i % 5 == 0;
//! - allows 5432/tcp from its share of 10,000 source prefixes 100.64.0.0/24 .. 100.103.15.0/24
//!   (prefix k goes to container k % N), in labels of at most 200 prefixes each (guard's label
//!   limits), so every scale holds the same 10,000 allow entries.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    rc::Rc,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{Ebpf, programs::Xdp};
use guard_common::{
    events::STREAM_ACCESS,
    maps::{CONFIG_HAS_DENY_EXACT, CONFIG_HAS_DENY_PREFIX, FlowKey, door},
    reason::Reason,
};
use guard_userspace::{
    kernel::loader,
    kernel::maps::PolicyMaps,
    kernel::pins::Pins,
    kernel::unload::unload,
    policy::file::PolicyFile,
    policy::snapshot::{ApiListener, Container, EngineDoors, Network, Published, Snapshot, Swarm},
    policy::{Cidr, Proto},
    state::reconcile::{Inputs, Reconciler},
    state::tables::diff,
};

pub const UPLINK: Ipv4Addr = Ipv4Addr::new(10, 252, 0, 1);
pub const UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x252, 0, 0, 0, 0, 1);
/// The outside host (the flood's namespace has this address).
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 252, 0, 2);
/// Every container address lies in here; the flood routes it into a namespace of its own.
pub const CONTAINER_SUPERNET: &str = "10.253.0.0/16";
pub const ALLOW_ENTRIES: usize = 10_000;
/// Denied sources in every world: half single addresses (the hash), half /28 prefixes (the
/// trie), as a large ban list has them.
pub const DENY_ENTRIES: usize = 100_000;
/// A denied source (the first single address).
pub const DENIED: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
const PER_NETWORK: usize = 250;
const PREFIXES_PER_LABEL: usize = 200;

pub const EXPOSED_PORT: u16 = 443;
pub const ALLOWED_PORT: u16 = 5432;
/// Open to nobody; published containers publish this one.
pub const CLOSED_PORT: u16 = 8080;
/// A host port Docker does not publish (the host's own ssh).
pub const HOST_SERVICE_PORT: u16 = 22;
/// The host is a swarm node: VXLAN on this port is the engine's door.
pub const VXLAN_PORT: u16 = 4789;
const PUBLISHED_BASE: u16 = 20_000;

/// A remote server a container talked to; its replies come back through flow memory.
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const REMOTE_PORT: u16 = 443;
pub const LOCAL_PORT: u16 = 40_000;

pub struct World {
    pub containers: usize,
    pub snapshot: Snapshot,
    /// The container the per-packet cases address: the middle one (published, exposed and
    /// allow-listed, like every i % 10 == 0).
    pub probe: usize,
}

impl World {
    pub fn new(containers: usize) -> Self {
        assert!((1..=PER_NETWORK * 256).contains(&containers));
        let networks = containers.div_ceil(PER_NETWORK);
        let networks = (0..networks)
            .map(|n| Network {
                id: format!("gbench-net-{n}"),
                name: format!("gbench-net-{n}"),
                bridge: Some(format!("br-gbench{n}")),
                subnets: vec![
                    format!("10.253.{n}.0/24").parse().unwrap(),
                    format!("fd00:253:{n:x}::/64").parse().unwrap(),
                ],
                gateways: vec![
                    IpAddr::V4(Ipv4Addr::new(10, 253, n as u8, 1)),
                    format!("fd00:253:{n:x}::1").parse().unwrap(),
                ],
            })
            .collect();
        let mut prefixes: Vec<Vec<String>> = vec![Vec::new(); containers];
        for k in 0..ALLOW_ENTRIES {
            prefixes[k % containers].push(format!("{}/24", allowed_prefix(k)));
        }
        let containers_list = (0..containers)
            .map(|i| {
                let mut labels = BTreeMap::new();
                if i.is_multiple_of(5) {
                    labels.insert("guard.expose".into(), format!("{EXPOSED_PORT}/tcp"));
                }
                for (j, chunk) in prefixes[i].chunks(PREFIXES_PER_LABEL).enumerate() {
                    labels.insert(
                        format!("guard.allow.b{j}"),
                        format!("{ALLOWED_PORT}/tcp from {}", chunk.join(", ")),
                    );
                }
                let mut addresses = vec![IpAddr::V4(container_addr(i))];
                if i.is_multiple_of(4) {
                    let (n, h) = (i / PER_NETWORK, 2 + i % PER_NETWORK);
                    addresses.push(format!("fd00:253:{n:x}::{h:x}").parse().unwrap());
                }
                let published = published_port(i)
                    .map(|host_port| Published {
                        host_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        host_port,
                        container_port: CLOSED_PORT,
                        proto: Proto::Tcp,
                    })
                    .into_iter()
                    .collect();
                Container {
                    id: format!("{:064x}", i + 1),
                    name: format!("gbench-{i}"),
                    image: "gbench:latest".into(),
                    labels,
                    addresses,
                    published,
                }
            })
            .collect();
        World {
            containers,
            snapshot: Snapshot { networks, containers: containers_list, doors: swarm_node() },
            probe: containers / 2 / 10 * 10,
        }
    }

    pub fn probe_addr(&self) -> Ipv4Addr {
        container_addr(self.probe)
    }

    pub fn probe_published_port(&self) -> u16 {
        published_port(self.probe).expect("the probe container publishes a port")
    }

    /// A source inside the probe container's first allowed prefix.
    pub fn probe_allowed_source(&self) -> Ipv4Addr {
        let [a, b, c, _] = allowed_prefix(self.probe).octets();
        Ipv4Addr::new(a, b, c, 7)
    }
}

/// [`DENY_ENTRIES`] sources, apart from every other address of the world: single addresses
/// from 172.16.0.1 on, /28 prefixes from 172.24.0.0 on.
fn denied_sources() -> impl Iterator<Item = Cidr> {
    let single = (0..DENY_ENTRIES / 2).map(|k| {
        let ip = Ipv4Addr::from(u32::from(DENIED) + k as u32);
        Cidr::host(IpAddr::V4(ip))
    });
    let prefixes = (0..DENY_ENTRIES / 2).map(|k| {
        let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 24, 0, 0)) + 16 * k as u32);
        format!("{net}/28").parse().expect("a /28")
    });
    single.chain(prefixes)
}

pub fn container_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 253, (i / PER_NETWORK) as u8, (2 + i % PER_NETWORK) as u8)
}

fn published_port(i: usize) -> Option<u16> {
    i.is_multiple_of(10).then(|| PUBLISHED_BASE + (i / 10) as u16)
}

/// The k-th allowed source prefix (a /24 in 100.64.0.0/10).
fn allowed_prefix(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64 + (k / 256) as u8, (k % 256) as u8, 0)
}

/// Entries per map, as written.
#[derive(Clone, Copy, Debug, Default)]
pub struct MapSizes {
    pub addrs: usize,
    pub networks: usize,
    pub published: usize,
    pub ports: usize,
    pub sources: usize,
    /// Remembered outbound flows (written by the `pass_flow` case's setup).
    pub flows: usize,
}

/// guard's XDP program, loaded into a pin directory of its own and holding a [`World`]'s
/// desired state. Unloaded (pins removed, program and maps freed) on drop.
pub struct Guard {
    pub world: Rc<World>,
    pub sizes: MapSizes,
    // Field order matters for drop: our Drop removes the pins first, then the maps and the
    // object (program, links) are closed.
    maps: PolicyMaps,
    ebpf: Ebpf,
    pins: Pins,
}

/// Pin directories of this benchmark: /sys/fs/bpf/gbench-<pid>-<n>.
pub const PIN_PREFIX: &str = "gbench-";
const BPFFS: &str = "/sys/fs/bpf";

impl Guard {
    pub fn load(world: &Rc<World>) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pins = Pins::new(format!("{BPFFS}/{PIN_PREFIX}{}-{n}", std::process::id()));
        let mut ebpf = loader::load(&pins).with_context(|| {
            format!("loading guard's XDP program under {}", pins.root().display())
        })?;
        // From here on, a failure must still remove the pins.
        let cleanup = PinCleanup(pins.clone());
        let mut maps = PolicyMaps::from_ebpf(&mut ebpf).context("opening guard's maps")?;

        let host = [IpAddr::V4(UPLINK), IpAddr::V6(UPLINK6)];
        let policy = PolicyFile::default();
        let denied: Vec<_> = denied_sources().collect();
        let desired = Reconciler::default().desired_state(&Inputs {
            denied: &denied,
            ..Inputs::new(&world.snapshot, &host, &policy)
        });
        for c in &desired.containers {
            ensure!(
                c.label_errors.is_empty(),
                "synthetic labels of {} rejected: {:?}",
                c.container.name,
                c.label_errors
            );
        }
        let t = &desired.tables;
        let sizes = MapSizes {
            addrs: t.addrs.len(),
            networks: t.networks.len(),
            published: t.published.len(),
            ports: t.ports.len(),
            sources: t.sources.len(),
            flows: 0,
        };
        // The swarm's members come on top, in the engine's doors' source lists.
        let allow = t.sources.keys().filter(|s| !door::is_door(s.data.port.target)).count();
        ensure!(
            allow == ALLOW_ENTRIES,
            "expected {ALLOW_ENTRIES} allow entries, the desired state has {allow}"
        );
        let plan = diff(&maps.read().context("reading the fresh maps")?, &desired.tables);
        let failures = maps.apply(&plan);
        if !failures.is_empty() {
            bail!(
                "{} map updates failed at {} containers, first: {}",
                failures.len(),
                world.containers,
                failures[0]
            );
        }
        ensure!(
            maps.read().context("reading the maps back")? == desired.tables,
            "the maps do not hold the desired state at {} containers",
            world.containers
        );
        std::mem::forget(cleanup);
        Ok(Guard { world: world.clone(), sizes, maps, ebpf, pins })
    }

    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(loader::xdp_program(&mut self.ebpf)?)
    }

    /// Fills flow memory as the TC egress program would after every container opened a
    /// connection to REMOTE:443 from port 40000, so the probe's reply finds its flow among as
    /// many as there are containers.
    pub fn remember_flows(&mut self) -> Result<()> {
        // bpf_ktime_get_ns() is this clock.
        let now = guard_userspace::host::clock::monotonic_ns();
        for i in 0..self.world.containers {
            let key = FlowKey {
                remote: IpAddr::V4(REMOTE).into(),
                local: IpAddr::V4(container_addr(i)).into(),
                remote_port: REMOTE_PORT,
                local_port: LOCAL_PORT,
                proto: 6,
                _pad: [0; 3],
            };
            self.maps.remember_flow(&key, now).context("writing guard's flow memory")?;
        }
        self.sizes.flows = self.world.containers;
        Ok(())
    }

    /// Turns the program's lookups of the deny sets on or off (their entries stay): the cost
    /// of 100,000 entries, side by side with none.
    pub fn set_deny_lookups(&mut self, on: bool) -> Result<()> {
        let mut tables = self.maps.read().context("reading guard's maps")?;
        let flags = CONFIG_HAS_DENY_EXACT | CONFIG_HAS_DENY_PREFIX;
        let wanted = if on { tables.config.flags | flags } else { tables.config.flags & !flags };
        if wanted != tables.config.flags {
            let current = tables.clone();
            tables.config.flags = wanted;
            let failed = self.maps.apply(&diff(&current, &tables));
            ensure!(failed.is_empty(), "writing guard's config: {failed:?}");
        }
        Ok(())
    }

    /// Packets counted for `reason`, over all CPUs.
    pub fn counter(&self, reason: Reason) -> Result<u64> {
        let counters = self.maps.counters().context("reading guard's counters")?;
        // Audit mode is off: every decision is enforced.
        Ok(counters
            .into_iter()
            .find(|(d, _)| d.reason == reason && !d.audited)
            .map_or(0, |(_, n)| n))
    }

    /// Access events so far: reported, suppressed by their rate limit or lost to a full ring.
    pub fn access_events(&self) -> Result<u64> {
        let stats = self.maps.event_stats(STREAM_ACCESS).context("reading guard's event stats")?;
        Ok(stats.iter().sum())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        remove_pins(&self.pins);
    }
}

/// Removes a pin directory if loading fails half-way.
struct PinCleanup(Pins);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        remove_pins(&self.0);
    }
}

fn remove_pins(pins: &Pins) {
    if let Err(e) = unload(pins) {
        eprintln!("bench: cleanup: unloading {}: {e}", pins.root().display());
    }
    // Whatever guard's unload does not know about (a map added since) goes too.
    if pins.root().exists()
        && let Err(e) = fs::remove_dir_all(pins.root())
    {
        eprintln!("bench: cleanup: removing {}: {e}", pins.root().display());
    }
}

/// Pin directories a killed run left behind (their process is gone).
pub fn remove_leftover_pins() {
    let Ok(entries) = fs::read_dir(BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PIN_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: removing leftover pins {}", entry.path().display());
            remove_pins(&Pins::new(entry.path()));
        }
    }
}

/// The engine's doors of a manager in a swarm of 16 nodes, with its API on tcp: the host's
/// own traffic is measured where guard judges the most host ports it ever does.
fn swarm_node() -> EngineDoors {
    let mut nodes: std::collections::BTreeSet<IpAddr> = [IpAddr::V4(UPLINK)].into();
    nodes.extend((2..17).map(|n| IpAddr::V4(Ipv4Addr::new(10, 252, 1, n))));
    let swarm =
        Swarm { data_path_port: VXLAN_PORT, control_port: Some(2377), nodes, encrypted: true };
    let api = ApiListener { addr: "0.0.0.0:2376".parse().unwrap(), plain_text: false };
    EngineDoors { swarm: Some(swarm), api: vec![api] }
}
