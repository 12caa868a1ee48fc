//! What the agent exports for monitoring, in Prometheus' text format: packets by reason, drops
//! per container port, drop- and access-event health, sync latency, map fill levels, XDP modes, Docker
//! connection state, policy reloads and rejected labels.
//!
//! Every family is a [`Family`] constant (name, type, help) and is written through
//! [`Exposition`], which writes its HELP and TYPE lines once and escapes every label value.
//! Not `prometheus-client`: it writes OpenMetrics only (a counter's family named without its
//! `_total`, a full stop added to each help, `# EOF` at the end), which would change the lines
//! scrapers and dashboards already read; and every value here is read at scrape time (the
//! kernel's maps, the agent's last sync), where its registry of live metrics would need a
//! collector of our own anyway.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
};

use guard_common::{
    events::{DROP_AT_GATE, DROP_AUDITED, DROP_PUBLISHED, DROP_RATE_LIMITED, DropKey},
    reason::{Decision, Verdict},
};

use crate::{
    kernel::{attach::Attached, hook::Hook},
    policy::{Proto, file::Mode},
};

/// A metric family's type, as its TYPE line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: written once, HELP and TYPE before its samples.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

impl Family {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Family { name, kind: Kind::Counter, help }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Family { name, kind: Kind::Gauge, help }
    }
}

/// A label's name and value (the value is escaped when written).
pub type Label<'a> = (&'static str, &'a str);

/// A page in Prometheus' text exposition format (0.0.4), written family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts `family` (its HELP and TYPE lines); the samples written through the answer are
    /// its own.
    pub fn family(&mut self, family: &Family) -> Samples<'_> {
        let Family { name, kind, help } = family;
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {}", kind.name());
        Samples { out: &mut self.out, name }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The samples of one family.
pub struct Samples<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Samples<'_> {
    /// `name{labels} value` (no braces without labels).
    pub fn sample(&mut self, labels: &[Label<'_>], value: impl fmt::Display) -> &mut Self {
        self.series("", labels, value)
    }

    /// A sample of one of the family's series named with a suffix (a histogram's `_bucket`,
    /// `_sum` and `_count`).
    fn series(
        &mut self,
        suffix: &str,
        labels: &[Label<'_>],
        value: impl fmt::Display,
    ) -> &mut Self {
        let _ = writeln!(self.out, "{}{suffix}{} {value}", self.name, Labels(labels));
        self
    }
}

/// A sample's labels as written: `{name="value",...}`, or nothing when there are none.
struct Labels<'a, 'b>(&'a [Label<'b>]);

impl fmt::Display for Labels<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        f.write_char('{')?;
        for (i, (name, value)) in self.0.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(f, "{comma}{name}=\"{}\"", escape(value))?;
        }
        f.write_char('}')
    }
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Upper bounds (seconds) of the sync-latency histogram buckets.
const SYNC_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; SYNC_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (bound, count) in SYNC_BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    /// Its `_bucket` series (cumulative, then `+Inf`), `_sum` and `_count`.
    fn write(&self, samples: &mut Samples<'_>) {
        for (bound, count) in SYNC_BUCKETS.iter().zip(self.counts) {
            samples.series("_bucket", &[("le", &bound.to_string())], count);
        }
        samples
            .series("_bucket", &[("le", "+Inf")], self.count)
            .series("_sum", &[], self.sum)
            .series("_count", &[], self.count);
    }
}

/// A program on an interface, as the agent last attached it.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub hook: Hook,
    pub iface: String,
    pub how: Attached,
}

/// The agent's own state, updated by the reconcile loop.
#[derive(Clone, Debug, Default)]
pub struct AgentState {
    pub docker_connected: bool,
    pub synced: bool,
    /// Whether the policy in force is the policy file as it is on disk (false: the file does
    /// not parse, and the last good one, or everything closed, is in force).
    pub config_valid: bool,
    /// Times the pins were found removed under the agent (protection lost until restored).
    pub protection_lost: u64,
    /// Whether a restoration is under way (or failed): not ready.
    pub restoring: bool,
    /// The host's mode: the policy file's, or `--mode`'s.
    pub mode: Mode,
    pub sync_seconds: Histogram,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// (container, label) of every label that was rejected.
    pub label_errors: Vec<(String, String)>,
    /// Every program on an interface.
    pub attachments: Vec<Attachment>,
    /// Why each interface and hook that should run a program does not (attach errors).
    pub unguarded: Vec<String>,
    /// Container names by target id.
    pub names: BTreeMap<u32, String>,
    /// Interface names by index.
    pub ifaces: BTreeMap<u32, String>,
    /// Each container's openings by target id: the rules access events name.
    pub openings: crate::telemetry::events::access::Openings,
    /// (map, entries, capacity) after the last sync.
    pub map_entries: Vec<(&'static str, usize, u32)>,
    pub update_errors: BTreeMap<&'static str, u64>,
    /// The engine's doors guarded: (name, `port/proto`, how many sources may reach it).
    pub doors: Vec<(String, String, usize)>,
    /// The swarm's members the agent learned from the engine (None: not in a swarm).
    pub swarm_nodes: Option<usize>,
    /// Denied sources by where they come from: `policy`, `file`, `cli`.
    pub denied: Vec<(&'static str, usize)>,
}

/// What the kernel's maps said at scrape time.
pub struct KernelCounters {
    pub packets: Vec<(Decision, u64)>,
    /// The bridge gate's decisions (packets from uplinks, after NAT).
    pub gate: Vec<(Decision, u64)>,
    pub drops: Vec<(DropKey, u64)>,
    /// Drop events emitted, suppressed, lost.
    pub drop_events: [u64; 3],
    /// Access events emitted, suppressed, lost.
    pub access_events: [u64; 3],
}

/// What this build is: the crate's version, the commit it was built from, and the eBPF map
/// layout (pins of another layout are never adopted).
pub fn build_info() -> (&'static str, &'static str, String) {
    (env!("CARGO_PKG_VERSION"), env!("GUARD_COMMIT"), format!("{:08x}", guard_common::maps::LAYOUT))
}

const BUILD_INFO: Family =
    Family::gauge("guard_build_info", "The running agent's version, commit and eBPF map layout.");
const PACKETS: Family =
    Family::counter("guard_packets_total", "Packets seen on uplinks (XDP), by reason and verdict.");
const GATE_PACKETS: Family = Family::counter(
    "guard_gate_packets_total",
    "Packets from uplinks judged again after NAT at the bridge gate.",
);
const CONTAINER_DROPS: Family = Family::counter(
    "guard_container_drops_total",
    "Packets dropped (or, audited, that would have been) per container port, by stage: xdp on the uplink, or the gate after NAT.",
);
const CONTAINER_RATE_LIMITED: Family = Family::counter(
    "guard_container_rate_limited_total",
    "New flows dropped (or, audited, that would have been) over a port's rate limit, per container port; also counted in guard_container_drops_total.",
);
const DROP_EVENTS: Family = Family::counter(
    "guard_drop_events_total",
    "Drop events: reported, suppressed by the kernel's rate limit, lost to a full ring.",
);
const ACCESS_EVENTS: Family = Family::counter(
    "guard_access_events_total",
    "Access (the first packet of a flow an opening let in) events: reported, suppressed by the kernel's rate limit, lost to a full ring.",
);
/// The `outcome` label of each slot of an event stream's counters, in slot order.
const EVENT_OUTCOMES: [&str; 3] = ["reported", "suppressed", "lost"];
const SYNC_DURATION: Family = Family {
    name: "guard_sync_duration_seconds",
    kind: Kind::Histogram,
    help: "Time to compute and apply the desired state.",
};
const MAP_ENTRIES: Family =
    Family::gauge("guard_map_entries", "Entries in each policy map after the last sync.");
const MAP_CAPACITY: Family = Family::gauge("guard_map_capacity", "Capacity of each policy map.");
const MAP_UPDATE_ERRORS: Family =
    Family::counter("guard_map_update_errors_total", "Map updates that failed (a full map).");
const ATTACHED: Family = Family::gauge(
    "guard_attached",
    "Programs attached, by hook, interface and mode (XDP native or generic).",
);
const DOCKER_CONNECTED: Family =
    Family::gauge("guard_docker_connected", "Whether the Docker API answered the last sync.");
const SYNCED: Family = Family::gauge(
    "guard_synced",
    "Whether the maps have held Docker's state at least once since start.",
);
const PROTECTION_LOST: Family = Family::counter(
    "guard_protection_lost_total",
    "Times the pins were removed under the running agent (guard unload --force), which then restored them.",
);
const CONFIG_VALID: Family = Family::gauge(
    "guard_config_valid",
    "Whether the policy file on disk parses and is the policy in force.",
);
const CONFIG_RELOADS: Family =
    Family::counter("guard_config_reloads_total", "Policy file reloads, by result.");
const AUDIT_MODE: Family =
    Family::gauge("guard_audit_mode", "Whether the whole host is in audit mode.");
const LABEL_ERRORS: Family = Family::gauge(
    "guard_label_errors",
    "Labels rejected whole (each opens or limits nothing), by container and label.",
);
const ENGINE_DOOR_SOURCES: Family = Family::gauge(
    "guard_engine_door_sources",
    "The engine's own ports guard judges (Swarm's, the Docker API on tcp), by door and port: how many sources (swarm nodes and [management] prefixes) may reach each.",
);
const DENIED_SOURCES: Family = Family::gauge(
    "guard_denied_sources",
    "Sources denied every container port, by where the denial comes from (policy file, deny files, guard ban).",
);
const SWARM_NODES: Family = Family::gauge(
    "guard_swarm_nodes",
    "The swarm's members as the engine names them (this node included).",
);

pub fn render(state: &AgentState, kernel: Option<&KernelCounters>) -> String {
    let mut page = Exposition::default();
    let (version, commit, layout) = build_info();
    page.family(&BUILD_INFO)
        .sample(&[("version", version), ("commit", commit), ("layout", &layout)], 1);
    decisions(page.family(&PACKETS), kernel.map_or(&[], |k| &k.packets));
    decisions(page.family(&GATE_PACKETS), kernel.map_or(&[], |k| &k.gate));

    let drops = kernel.map_or(&[][..], |k| &k.drops);
    per_port(page.family(&CONTAINER_DROPS), state, drops.iter());
    let limited = drops.iter().filter(|(key, _)| key.flags & DROP_RATE_LIMITED != 0);
    per_port(page.family(&CONTAINER_RATE_LIMITED), state, limited);

    for (family, events) in [
        (&DROP_EVENTS, kernel.map(|k| k.drop_events)),
        (&ACCESS_EVENTS, kernel.map(|k| k.access_events)),
    ] {
        let mut samples = page.family(family);
        for (outcome, n) in events.iter().flat_map(|e| EVENT_OUTCOMES.iter().zip(*e)) {
            samples.sample(&[("outcome", outcome)], n);
        }
    }

    state.sync_seconds.write(&mut page.family(&SYNC_DURATION));

    let mut entries = page.family(&MAP_ENTRIES);
    for (map, n, _) in &state.map_entries {
        entries.sample(&[("map", map)], n);
    }
    let mut capacity = page.family(&MAP_CAPACITY);
    for (map, _, n) in &state.map_entries {
        capacity.sample(&[("map", map)], n);
    }
    let mut update_errors = page.family(&MAP_UPDATE_ERRORS);
    for (map, n) in &state.update_errors {
        update_errors.sample(&[("map", map)], n);
    }

    let mut attached = page.family(&ATTACHED);
    for a in &state.attachments {
        let labels = [("hook", a.hook.name()), ("iface", &a.iface), ("mode", &a.how.label())];
        attached.sample(&labels, 1);
    }
    page.family(&DOCKER_CONNECTED).sample(&[], u8::from(state.docker_connected));
    page.family(&SYNCED).sample(&[], u8::from(state.synced));
    page.family(&PROTECTION_LOST).sample(&[], state.protection_lost);
    page.family(&CONFIG_VALID).sample(&[], u8::from(state.config_valid));
    page.family(&CONFIG_RELOADS)
        .sample(&[("result", "ok")], state.reloads_ok)
        .sample(&[("result", "error")], state.reloads_failed);
    page.family(&AUDIT_MODE).sample(&[], u8::from(state.mode == Mode::Audit));

    let mut label_errors = page.family(&LABEL_ERRORS);
    for (container, label) in &state.label_errors {
        label_errors.sample(&[("container", container), ("label", label)], 1);
    }
    let mut doors = page.family(&ENGINE_DOOR_SOURCES);
    for (door, port, sources) in &state.doors {
        doors.sample(&[("door", door), ("port", port)], sources);
    }
    let mut denied = page.family(&DENIED_SOURCES);
    for (from, count) in &state.denied {
        denied.sample(&[("from", from)], count);
    }
    if let Some(nodes) = state.swarm_nodes {
        page.family(&SWARM_NODES).sample(&[], nodes);
    }
    page.finish()
}

/// One series per reason, verdict and audit of a program's decision counters.
fn decisions(mut samples: Samples<'_>, counters: &[(Decision, u64)]) {
    for (d, n) in counters {
        let verdict = if d.verdict() == Verdict::Pass { "pass" } else { "drop" };
        let audited = if d.audited { "true" } else { "false" };
        samples
            .sample(&[("reason", d.reason.name()), ("verdict", verdict), ("audited", audited)], n);
    }
}

/// One series per container port, path, stage and audit of `drops` (summed over what else
/// tells their keys apart, such as the rate-limit flag: a series appears once).
fn per_port<'a>(
    mut samples: Samples<'_>,
    state: &AgentState,
    drops: impl Iterator<Item = &'a (DropKey, u64)>,
) {
    // Keyed by the labels' text, in the order they are written: the series come out sorted
    // as the text sorts.
    let mut series: BTreeMap<[String; 6], u64> = BTreeMap::new();
    for (key, n) in drops {
        let container =
            state.names.get(&key.target).cloned().unwrap_or(format!("target-{}", key.target));
        let proto = Proto::from_number(key.proto).map_or("any", Proto::name);
        let path = if key.flags & DROP_PUBLISHED != 0 { "published" } else { "direct" };
        let stage = if key.flags & DROP_AT_GATE != 0 { "gate" } else { "xdp" };
        let audited = key.flags & DROP_AUDITED != 0;
        let labels = [
            container,
            key.port.to_string(),
            proto.to_string(),
            path.to_string(),
            stage.to_string(),
            audited.to_string(),
        ];
        *series.entry(labels).or_default() += n;
    }
    for ([container, port, proto, path, stage, audited], n) in &series {
        let labels = [
            ("container", container.as_str()),
            ("port", port),
            ("proto", proto),
            ("path", path),
            ("stage", stage),
            ("audited", audited),
        ];
        samples.sample(&labels, n);
    }
}

#[cfg(test)]
mod tests {
    use guard_common::reason::Reason;

    use super::*;
    use crate::{host::interfaces::Framing, kernel::attach};

    fn attachment(hook: Hook, iface: &str, mode: attach::Mode, framing: Framing) -> Attachment {
        let how = Attached { mode, framing, adopted: false };
        Attachment { hook, iface: iface.into(), how }
    }

    #[test]
    fn renders_every_family_with_labels() {
        let mut state = AgentState {
            docker_connected: true,
            synced: true,
            mode: Mode::Enforce,
            ..Default::default()
        };
        state.sync_seconds.observe(0.003);
        state.names.insert(7, "db".into());
        state.label_errors.push(("web".into(), "guard.expose".into()));
        state.attachments.push(attachment(
            Hook::Xdp,
            "eth0",
            attach::Mode::Native,
            Framing::Ethernet,
        ));
        state.map_entries.push(("GUARD_ADDRS", 12, 65536));
        let kernel = KernelCounters {
            packets: vec![
                (Decision::enforced(Reason::Closed), 5),
                (Decision { reason: Reason::Closed, audited: true }, 2),
            ],
            gate: vec![(Decision::enforced(Reason::UnassignedAddr), 9)],
            drops: vec![
                (DropKey { target: 7, port: 5432, proto: 6, flags: DROP_PUBLISHED }, 5),
                // The same port dropped at the gate: a series of its own.
                (
                    DropKey {
                        target: 7,
                        port: 5432,
                        proto: 6,
                        flags: DROP_PUBLISHED | DROP_AT_GATE,
                    },
                    1,
                ),
                // Over its rate limit: counted among the port's drops, and on its own.
                (
                    DropKey {
                        target: 7,
                        port: 5432,
                        proto: 6,
                        flags: DROP_PUBLISHED | DROP_RATE_LIMITED,
                    },
                    4,
                ),
            ],
            drop_events: [3, 1, 0],
            access_events: [4, 0, 2],
        };
        let text = render(&state, Some(&kernel));
        for needle in [
            "guard_packets_total{reason=\"closed\",verdict=\"drop\",audited=\"false\"} 5",
            "guard_packets_total{reason=\"closed\",verdict=\"pass\",audited=\"true\"} 2",
            "guard_container_drops_total{container=\"db\",port=\"5432\",proto=\"tcp\",path=\"published\",stage=\"xdp\",audited=\"false\"} 9",
            "guard_container_rate_limited_total{container=\"db\",port=\"5432\",proto=\"tcp\",path=\"published\",stage=\"xdp\",audited=\"false\"} 4",
            "guard_drop_events_total{outcome=\"suppressed\"} 1",
            "guard_access_events_total{outcome=\"reported\"} 4",
            "guard_access_events_total{outcome=\"lost\"} 2",
            "guard_gate_packets_total{reason=\"unassigned_addr\",verdict=\"drop\",audited=\"false\"} 9",
            "guard_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "guard_sync_duration_seconds_bucket{le=\"0.001\"} 0",
            "guard_map_entries{map=\"GUARD_ADDRS\"} 12",
            "guard_attached{hook=\"xdp\",iface=\"eth0\",mode=\"native\"} 1",
            "guard_docker_connected 1",
            "guard_label_errors{container=\"web\",label=\"guard.expose\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        let (version, commit, layout) = build_info();
        let info = format!(
            "guard_build_info{{version=\"{version}\",commit=\"{commit}\",layout=\"{layout}\"}} 1"
        );
        assert!(text.contains(&info), "missing {info} in\n{text}");
        assert!(commit == "unknown" || commit.bytes().all(|b| b.is_ascii_hexdigit()), "{commit}");
        assert_eq!(layout.len(), 8, "{layout}");
        assert!(text.lines().all(|l| l.starts_with('#') || l.starts_with("guard_")), "{text}");
        // Prometheus rejects an exposition that names one series twice.
        let series: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series))
            .collect();
        let unique: std::collections::BTreeSet<&&str> = series.iter().collect();
        assert_eq!(unique.len(), series.len(), "a series appears twice in\n{text}");
    }

    #[test]
    fn families_come_once_in_their_order_and_label_values_are_escaped() {
        let mut state = AgentState { swarm_nodes: Some(3), ..Default::default() };
        state.names.insert(8, "we\"b\\x".into());
        state.label_errors.push(("web".into(), "guard.expose\n".into()));
        let kernel = KernelCounters {
            packets: vec![],
            gate: vec![],
            drops: vec![(DropKey { target: 8, port: 9, proto: 0, flags: 0 }, 5)],
            drop_events: [0; 3],
            access_events: [0; 3],
        };
        let text = render(&state, Some(&kernel));
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert_eq!(
            families,
            [
                "guard_build_info",
                "guard_packets_total",
                "guard_gate_packets_total",
                "guard_container_drops_total",
                "guard_container_rate_limited_total",
                "guard_drop_events_total",
                "guard_access_events_total",
                "guard_sync_duration_seconds",
                "guard_map_entries",
                "guard_map_capacity",
                "guard_map_update_errors_total",
                "guard_attached",
                "guard_docker_connected",
                "guard_synced",
                "guard_protection_lost_total",
                "guard_config_valid",
                "guard_config_reloads_total",
                "guard_audit_mode",
                "guard_label_errors",
                "guard_engine_door_sources",
                "guard_denied_sources",
                "guard_swarm_nodes",
            ]
        );
        for line in [
            "guard_container_drops_total{container=\"we\\\"b\\\\x\",port=\"9\",proto=\"any\",path=\"direct\",stage=\"xdp\",audited=\"false\"} 5",
            "guard_label_errors{container=\"web\",label=\"guard.expose\\n\"} 1",
            "guard_sync_duration_seconds_bucket{le=\"+Inf\"} 0",
            "guard_sync_duration_seconds_sum 0",
            "guard_config_reloads_total{result=\"error\"} 0",
            "guard_audit_mode 0",
            "guard_swarm_nodes 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }
}
