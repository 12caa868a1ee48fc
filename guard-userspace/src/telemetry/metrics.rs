//! What the agent exports for monitoring, in Prometheus' text format: packets by reason, drops
//! per container port, drop- and access-event health, sync latency, map fill levels, XDP modes, Docker
//! connection state, policy reloads and rejected labels.

use std::{collections::BTreeMap, fmt::Write as _};

use guard_common::{
    events::{DROP_AT_GATE, DROP_AUDITED, DROP_PUBLISHED, DROP_RATE_LIMITED, DropKey},
    reason::{Decision, Verdict},
};

use crate::policy::Proto;

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
    pub mode: String,
    pub sync_seconds: Histogram,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// (container, label) of every label that was rejected.
    pub label_errors: Vec<(String, String)>,
    /// (hook, interface, mode) of every attachment.
    pub attachments: Vec<(String, String, String)>,
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

pub fn render(state: &AgentState, kernel: Option<&KernelCounters>) -> String {
    let mut out = String::new();
    let (version, commit, layout) = build_info();
    let _ = writeln!(
        out,
        "# HELP guard_build_info The running agent's version, commit and eBPF map layout.\n# TYPE guard_build_info gauge\nguard_build_info{{version=\"{version}\",commit=\"{commit}\",layout=\"{layout}\"}} 1"
    );
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    for (name, help, pick) in [
        ("guard_packets_total", "Packets seen on uplinks (XDP), by reason and verdict.", 0),
        (
            "guard_gate_packets_total",
            "Packets from uplinks judged again after NAT at the bridge gate.",
            1,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let Some(k) = kernel else { continue };
        let counters = if pick == 0 { &k.packets } else { &k.gate };
        let mut body = String::new();
        for (d, n) in counters {
            let verdict = if d.verdict() == Verdict::Pass { "pass" } else { "drop" };
            let (reason, audited) = (d.reason.name(), d.audited);
            let _ = writeln!(
                body,
                "{name}{{reason=\"{reason}\",verdict=\"{verdict}\",audited=\"{audited}\"}} {n}"
            );
        }
        out.push_str(&body);
    }

    let _ = writeln!(
        out,
        "# HELP guard_container_drops_total Packets dropped (or, audited, that would have been) per container port, by stage: xdp on the uplink, or the gate after NAT.\n# TYPE guard_container_drops_total counter"
    );
    if let Some(k) = kernel {
        out.push_str(&per_port(state, "guard_container_drops_total", k.drops.iter()));
    }
    let _ = writeln!(
        out,
        "# HELP guard_container_rate_limited_total New flows dropped (or, audited, that would have been) over a port's rate limit, per container port; also counted in guard_container_drops_total.\n# TYPE guard_container_rate_limited_total counter"
    );
    if let Some(k) = kernel {
        let limited = k.drops.iter().filter(|(key, _)| key.flags & DROP_RATE_LIMITED != 0);
        out.push_str(&per_port(state, "guard_container_rate_limited_total", limited));
    }

    for (name, what, pick) in [
        ("guard_drop_events_total", "Drop", 0),
        ("guard_access_events_total", "Access (the first packet of a flow an opening let in)", 1),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {what} events: reported, suppressed by the kernel's rate limit, lost to a full ring.\n# TYPE {name} counter"
        );
        let Some(k) = kernel else { continue };
        let events = if pick == 0 { k.drop_events } else { k.access_events };
        for (outcome, n) in ["reported", "suppressed", "lost"].iter().zip(events) {
            let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {n}");
        }
    }

    let h = &state.sync_seconds;
    let _ = writeln!(
        out,
        "# HELP guard_sync_duration_seconds Time to compute and apply the desired state.\n# TYPE guard_sync_duration_seconds histogram"
    );
    for (bound, count) in SYNC_BUCKETS.iter().zip(h.counts) {
        let _ = writeln!(out, "guard_sync_duration_seconds_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "guard_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(
        out,
        "guard_sync_duration_seconds_sum {}\nguard_sync_duration_seconds_count {}",
        h.sum, h.count
    );

    let _ = writeln!(
        out,
        "# HELP guard_map_entries Entries in each policy map after the last sync.\n# TYPE guard_map_entries gauge"
    );
    for (map, n, _) in &state.map_entries {
        let _ = writeln!(out, "guard_map_entries{{map=\"{map}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP guard_map_capacity Capacity of each policy map.\n# TYPE guard_map_capacity gauge"
    );
    for (map, _, capacity) in &state.map_entries {
        let _ = writeln!(out, "guard_map_capacity{{map=\"{map}\"}} {capacity}");
    }
    let _ = writeln!(
        out,
        "# HELP guard_map_update_errors_total Map updates that failed (a full map).\n# TYPE guard_map_update_errors_total counter"
    );
    for (map, n) in &state.update_errors {
        let _ = writeln!(out, "guard_map_update_errors_total{{map=\"{map}\"}} {n}");
    }

    let _ = writeln!(
        out,
        "# HELP guard_attached Programs attached, by hook, interface and mode (XDP native or generic).\n# TYPE guard_attached gauge"
    );
    for (hook, iface, mode) in &state.attachments {
        let _ = writeln!(
            out,
            "guard_attached{{hook=\"{hook}\",iface=\"{}\",mode=\"{mode}\"}} 1",
            escape(iface)
        );
    }
    let _ = writeln!(
        out,
        "# HELP guard_docker_connected Whether the Docker API answered the last sync.\n# TYPE guard_docker_connected gauge\nguard_docker_connected {}",
        u8::from(state.docker_connected)
    );
    let _ = writeln!(
        out,
        "# HELP guard_synced Whether the maps have held Docker's state at least once since start.\n# TYPE guard_synced gauge\nguard_synced {}",
        u8::from(state.synced)
    );
    let _ = writeln!(
        out,
        "# HELP guard_protection_lost_total Times the pins were removed under the running agent (guard unload --force), which then restored them.\n# TYPE guard_protection_lost_total counter\nguard_protection_lost_total {}",
        state.protection_lost
    );
    let _ = writeln!(
        out,
        "# HELP guard_config_valid Whether the policy file on disk parses and is the policy in force.\n# TYPE guard_config_valid gauge\nguard_config_valid {}",
        u8::from(state.config_valid)
    );
    let _ = writeln!(
        out,
        "# HELP guard_config_reloads_total Policy file reloads, by result.\n# TYPE guard_config_reloads_total counter"
    );
    let _ = writeln!(
        out,
        "guard_config_reloads_total{{result=\"ok\"}} {}\nguard_config_reloads_total{{result=\"error\"}} {}",
        state.reloads_ok, state.reloads_failed
    );
    let _ = writeln!(
        out,
        "# HELP guard_audit_mode Whether the whole host is in audit mode.\n# TYPE guard_audit_mode gauge\nguard_audit_mode {}",
        u8::from(state.mode == "audit")
    );
    let _ = writeln!(
        out,
        "# HELP guard_label_errors Labels rejected whole (each opens or limits nothing), by container and label.\n# TYPE guard_label_errors gauge"
    );
    for (container, label) in &state.label_errors {
        let _ = writeln!(
            out,
            "guard_label_errors{{container=\"{}\",label=\"{}\"}} 1",
            escape(container),
            escape(label)
        );
    }
    let _ = writeln!(
        out,
        "# HELP guard_engine_door_sources The engine's own ports guard judges (Swarm's, the Docker API on tcp), by door and port: how many sources (swarm nodes and [management] prefixes) may reach each.\n# TYPE guard_engine_door_sources gauge"
    );
    for (door, port, sources) in &state.doors {
        let _ = writeln!(
            out,
            "guard_engine_door_sources{{door=\"{}\",port=\"{}\"}} {sources}",
            escape(door),
            escape(port)
        );
    }
    let _ = writeln!(
        out,
        "# HELP guard_denied_sources Sources denied every container port, by where the denial comes from (policy file, deny files, guard ban).\n# TYPE guard_denied_sources gauge"
    );
    for (from, count) in &state.denied {
        let _ = writeln!(out, "guard_denied_sources{{from=\"{from}\"}} {count}");
    }
    if let Some(nodes) = state.swarm_nodes {
        let _ = writeln!(
            out,
            "# HELP guard_swarm_nodes The swarm's members as the engine names them (this node included).\n# TYPE guard_swarm_nodes gauge\nguard_swarm_nodes {nodes}"
        );
    }
    out
}

/// One series per container port, path, stage and audit of `drops` (summed over what else
/// tells their keys apart, such as the rate-limit flag: a series appears once).
fn per_port<'a>(
    state: &AgentState,
    name: &str,
    drops: impl Iterator<Item = &'a (DropKey, u64)>,
) -> String {
    let mut series: BTreeMap<String, u64> = BTreeMap::new();
    for (key, n) in drops {
        let container =
            state.names.get(&key.target).cloned().unwrap_or(format!("target-{}", key.target));
        let proto = Proto::from_number(key.proto).map_or("any".to_string(), |p| p.name().into());
        let path = if key.flags & DROP_PUBLISHED != 0 { "published" } else { "direct" };
        let stage = if key.flags & DROP_AT_GATE != 0 { "gate" } else { "xdp" };
        let labels = format!(
            "container=\"{}\",port=\"{}\",proto=\"{proto}\",path=\"{path}\",stage=\"{stage}\",audited=\"{}\"",
            escape(&container),
            key.port,
            key.flags & DROP_AUDITED != 0
        );
        *series.entry(labels).or_default() += n;
    }
    series.into_iter().map(|(labels, n)| format!("{name}{{{labels}}} {n}\n")).collect()
}

/// Escapes a Prometheus label value.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use guard_common::reason::Reason;

    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let mut state = AgentState {
            docker_connected: true,
            synced: true,
            mode: "enforce".into(),
            ..Default::default()
        };
        state.sync_seconds.observe(0.003);
        state.names.insert(7, "db".into());
        state.label_errors.push(("web".into(), "guard.expose".into()));
        state.attachments.push(("xdp".into(), "eth0".into(), "native".into()));
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
}
