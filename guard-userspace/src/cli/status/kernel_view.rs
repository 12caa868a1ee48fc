//! The containers as the kernel's maps hold them: their addresses, and which ports are open
//! to whom. What Docker and the policy file say (the desired state) only adds names, the
//! addresses Docker publishes on and the rules' names, and marks where it differs.

use std::collections::BTreeMap;

use guard_common::events::DropKey;
use guard_common::maps::{
    CONFIG_AUDIT_ALL, OPEN_EVERYONE, OPEN_LISTED, PROTO_ANY, PortKey, SourceKey, TARGET_AUDIT, door,
};

use super::{ContainerReport, DoorReport, Outside, PortReport, container_report, limits};
use crate::cli::reach::Reach;
use crate::{
    policy::{PortSpec, Proto},
    state::desired::{ContainerPolicy, Desired},
    state::identities::encode_hex,
    state::tables::TableSet,
};

/// One report per container the kernel knows, then those Docker has and the kernel does not
/// know yet (closed until the agent syncs).
/// `drops` are the kernel's per-port drop counters (for the drops over a rate limit).
pub fn containers(
    kernel: &TableSet,
    desired: Option<&Desired>,
    drops: &[(DropKey, u64)],
) -> Vec<ContainerReport> {
    let wanted: BTreeMap<&str, &ContainerPolicy> = desired
        .map(|d| d.containers.iter().map(|c| (c.container.id.as_str(), c)).collect())
        .unwrap_or_default();
    let rate_limited = limits::dropped(drops);
    let mut reports: Vec<ContainerReport> = kernel
        .identities
        .iter()
        .map(|(target, id)| {
            let id = encode_hex(&id.0);
            let mut report = container(kernel, *target, &id, wanted.get(id.as_str()).copied());
            limits::count(&mut report.ports, *target, &rate_limited);
            report
        })
        .collect();
    let known: Vec<String> = kernel.identities.values().map(|id| encode_hex(&id.0)).collect();
    for policy in wanted.values().filter(|c| !known.contains(&c.container.id)) {
        let mut report = container_report(policy);
        for port in &mut report.ports {
            port.outside = closed_until_synced(&port.outside);
            if let Some(limit) = &mut port.limit {
                limit.differs = Some(format!("{} once the agent syncs", limit.rate));
                limit.rate = "none".into();
            }
        }
        report.other_ports = closed_until_synced(&report.other_ports);
        reports.push(report);
    }
    reports
}

/// The engine's doors the kernel guards, and who outside may reach each port of them.
pub fn doors(kernel: &TableSet) -> Vec<DoorReport> {
    let mut reports = Vec::new();
    for target in door::ALL {
        let mut ports: Vec<(u8, u16)> = kernel
            .published
            .iter()
            .filter(|(_, p)| p.target == target)
            .map(|(key, p)| (key.proto, p.port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let Some(&(proto, port)) = ports.first() else { continue };
        // Every port of a door is open to the same sources.
        let outside = reach(kernel, &[rule(kernel, PortKey::new(target, proto, port))]);
        let name = crate::state::doors::name(target).unwrap_or("engine").to_string();
        let ports = ports
            .iter()
            .map(|(proto, port)| crate::state::doors::port_name(*proto, *port))
            .collect();
        reports.push(DoorReport { name, ports, outside });
    }
    reports
}

fn container(
    kernel: &TableSet,
    target: u32,
    id: &str,
    wanted: Option<&ContainerPolicy>,
) -> ContainerReport {
    let infos: Vec<_> = kernel.addrs.iter().filter(|(_, i)| i.target == target).collect();
    let all_ports = infos.first().map_or(0, |(_, i)| i.all_ports);
    let audit = kernel.config.flags & CONFIG_AUDIT_ALL != 0
        || infos.iter().any(|(_, i)| i.flags & TARGET_AUDIT != 0);

    let all = (PortKey::all_ports(target), all_ports);
    let mut rows: BTreeMap<(u8, u16), Vec<String>> = BTreeMap::new();
    let mut every_port_protos = Vec::new();
    for key in kernel.ports.keys().filter(|k| k.target == target && k.proto != PROTO_ANY) {
        if key.is_every_port_of_proto() {
            every_port_protos.push(key.proto);
        } else {
            rows.entry((key.proto, key.port)).or_default();
        }
    }
    for (key, published) in kernel.published.iter().filter(|(_, p)| p.target == target) {
        let host = match std::net::IpAddr::from(key.addr) {
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{}", key.port),
            v4 => format!("{v4}:{}", key.port),
        };
        rows.entry((key.proto, published.port)).or_default().push(host);
    }
    let other = reach(kernel, &[all]);
    let every_port_of = |proto: u8| rule(kernel, PortKey::every_port_of(target, proto));
    let ports = rows
        .into_iter()
        .map(|((proto_number, port), published)| {
            let port_rule = rule(kernel, PortKey::new(target, proto_number, port));
            let mut outside = reach(kernel, &[port_rule, every_port_of(proto_number), all]);
            let proto = Proto::from_number(proto_number).map_or("any", |p| p.name());
            if let Some(wanted) = wanted {
                let wanted_reach = wanted_port(wanted, port, proto_number);
                outside.rules = wanted_reach.rules.clone();
                outside.differs = differs(&outside, &wanted_reach);
            }
            // Docker's own words for where it publishes (0.0.0.0:80), when it answers.
            let published = match wanted {
                Some(w) => w
                    .container
                    .published
                    .iter()
                    .filter(|p| p.container_port == port && p.proto.name() == proto)
                    .map(|p| match p.host_ip {
                        std::net::IpAddr::V6(v6) => format!("[{v6}]:{}", p.host_port),
                        v4 => format!("{v4}:{}", p.host_port),
                    })
                    .collect(),
                None => published,
            };
            PortReport {
                port,
                every_port: false,
                last_port: None,
                proto: proto.into(),
                published,
                outside,
                limit: limits::in_kernel(kernel, target, proto_number, Some(port), wanted),
                rate_limited: 0,
                paths: Vec::new(),
            }
        })
        .chain(every_port_protos.into_iter().filter_map(|proto_number| {
            let proto = Proto::from_number(proto_number)?;
            let mut outside = reach(kernel, &[every_port_of(proto_number), all]);
            if let Some(wanted) = wanted {
                let wanted_reach = super::reach(
                    wanted.openings.iter().filter(|o| super::covers_every_port(o, proto)),
                );
                outside.rules = wanted_reach.rules.clone();
                outside.differs = differs(&outside, &wanted_reach);
            }
            let limit = limits::in_kernel(kernel, target, proto_number, None, wanted);
            Some(PortReport { limit, ..PortReport::every_port(proto, outside) })
        }))
        .collect();
    let (name, addresses_from_docker, label_errors) = match wanted {
        Some(w) => (
            w.container.name.clone(),
            Some(w.container.addresses.iter().map(ToString::to_string).collect::<Vec<_>>()),
            w.label_errors.iter().map(|e| e.warning(&w.container.name)).collect(),
        ),
        None => (id.chars().take(12).collect(), None, Vec::new()),
    };
    let mut other_ports = other;
    if let Some(wanted) = wanted {
        let wanted_reach =
            super::reach(wanted.openings.iter().filter(|o| o.ports == PortSpec::All));
        other_ports.rules = wanted_reach.rules.clone();
        other_ports.differs = differs(&other_ports, &wanted_reach);
    }
    ContainerReport {
        name,
        id: id.chars().take(12).collect(),
        addresses: addresses_from_docker.unwrap_or_else(|| {
            infos.iter().map(|(addr, _)| std::net::IpAddr::from(**addr).to_string()).collect()
        }),
        mode: if audit { "audit" } else { "enforce" }.into(),
        ports: compress(ports),
        other_ports,
        label_errors,
    }
}

/// The rule the kernel's PORTS map holds under `key` (`OPEN_NONE` without one), with the key
/// its sources are listed under.
fn rule(kernel: &TableSet, key: PortKey) -> (PortKey, u8) {
    (key, kernel.ports.get(&key).map_or(0, |r| r.open_to))
}

/// Who outside may reach what `rules` decide, by the kernel's maps: the rules that apply to a
/// port (its own, its protocol's every-port rule, the container's all-ports rule) add up.
fn reach(kernel: &TableSet, rules: &[(PortKey, u8)]) -> Outside {
    if rules.iter().any(|(_, rule)| *rule == OPEN_EVERYONE) {
        return Outside::new(Reach::everyone());
    }
    let sources: Vec<String> = rules
        .iter()
        .filter(|(_, rule)| *rule == OPEN_LISTED)
        .flat_map(|(key, _)| {
            kernel
                .sources
                .keys()
                .filter(move |s| s.data.port == *key)
                .map(|s| prefix(s.data, s.len))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    Outside::new(Reach::listed(sources))
}

/// A source prefix of the trie, as written in a policy (`10.0.0.0/8`, `2001:db8::/32`).
fn prefix(key: SourceKey, len: u32) -> String {
    let bits = len.saturating_sub(SourceKey::PORT_BITS);
    if key.addr.is_v4() {
        format!("{}/{}", key.addr, bits.saturating_sub(96))
    } else {
        format!("{}/{bits}", key.addr)
    }
}

/// What the desired state says of one port (the policy file's and the labels' words).
fn wanted_port(wanted: &ContainerPolicy, port: u16, proto: u8) -> Outside {
    super::reach(wanted.openings.iter().filter(|o| match Proto::from_number(proto) {
        Some(proto) => o.ports.covers(proto, port),
        None => o.ports == PortSpec::All,
    }))
}

/// What the desired state asks for, when the kernel holds something else.
fn differs(kernel: &Outside, wanted: &Outside) -> Option<String> {
    (kernel.reach != wanted.reach).then(|| wanted.text())
}

/// A container the kernel does not know yet is closed, whatever is wanted for it.
fn closed_until_synced(wanted: &Outside) -> Outside {
    let mut closed = Outside::new(Reach::nobody());
    if wanted.reach.is_open() {
        closed.differs = Some(format!("{} once the agent syncs", wanted.text()));
    }
    closed
}

/// Consecutive ports of one protocol, open to the same, unpublished: one row (`first-last`).
fn compress(ports: Vec<PortReport>) -> Vec<PortReport> {
    let mut rows: Vec<PortReport> = Vec::new();
    for port in ports {
        if let Some(last) = rows.last_mut()
            && last.proto == port.proto
            && !last.every_port
            && !port.every_port
            && last.published.is_empty()
            && port.published.is_empty()
            && last.outside == port.outside
            && last.limit == port.limit
            && u32::from(last.last_port.unwrap_or(last.port)) + 1 == u32::from(port.port)
        {
            last.last_port = Some(port.port);
            continue;
        }
        rows.push(port);
    }
    rows
}

#[cfg(test)]
mod tests {
    use guard_common::{
        addr::Addr,
        maps::{ContainerId, PortRule},
    };

    use super::*;
    use crate::state::tables::Lpm;

    fn listed(kernel: &mut TableSet, key: PortKey, source: &str, len: u32) {
        let addr = Addr::from(source.parse::<std::net::IpAddr>().unwrap());
        let data = SourceKey { port: key, addr };
        kernel.sources.insert(Lpm { len: SourceKey::PORT_BITS + len, data }, 1);
    }

    #[test]
    fn a_ports_rule_and_the_all_ports_rule_add_up_and_everyone_wins() {
        let mut kernel = TableSet::default();
        let port = PortKey::new(7, 6, 5432);
        kernel.ports.insert(port, PortRule::listed());
        listed(&mut kernel, port, "10.0.0.0", 96 + 8);
        listed(&mut kernel, PortKey::all_ports(7), "2001:db8::", 32);

        let all = |rule| (PortKey::all_ports(7), rule);
        let both = reach(&kernel, &[(port, OPEN_LISTED), all(OPEN_LISTED)]);
        assert_eq!(both.reach, Reach::listed(vec!["10.0.0.0/8".into(), "2001:db8::/32".into()]));
        let other = reach(&kernel, &[all(OPEN_LISTED)]);
        assert_eq!(other.reach.sources, ["2001:db8::/32"]);
        assert_eq!(
            reach(&kernel, &[(port, OPEN_LISTED), all(OPEN_EVERYONE)]).reach,
            Reach::everyone()
        );
        assert_eq!(reach(&kernel, &[(PortKey::new(7, 6, 80), 0), all(0)]).reach, Reach::nobody());
    }

    #[test]
    fn every_port_of_a_protocol_is_shown_as_such_and_adds_to_that_protocol_s_ports_only() {
        let mut kernel = TableSet::default();
        let udp = PortKey::every_port_of(7, 17);
        kernel.ports.insert(udp, PortRule::listed());
        listed(&mut kernel, udp, "10.0.0.0", 96 + 8);
        kernel.ports.insert(PortKey::new(7, 6, 80), PortRule::everyone());
        kernel.ports.insert(PortKey::new(7, 17, 53), PortRule::listed());
        listed(&mut kernel, PortKey::new(7, 17, 53), "192.0.2.0", 96 + 24);
        kernel.identities.insert(7, ContainerId([0xab; 32]));
        let mut info = guard_common::maps::AddrInfo::container(7);
        info.port_rules = 3;
        kernel.addrs.insert(Addr::from("172.30.0.9".parse::<std::net::IpAddr>().unwrap()), info);

        let report = &containers(&kernel, None, &[])[0];
        let rows: Vec<(String, String)> =
            report.ports.iter().map(|p| (p.label(), p.outside.text())).collect();
        assert_eq!(
            rows,
            [
                ("80/tcp".to_string(), "everyone".to_string()),
                ("53/udp".into(), "10.0.0.0/8, 192.0.2.0/24".into()),
                ("*/udp".into(), "10.0.0.0/8".into()),
            ]
        );
        assert_eq!(report.other_ports.text(), "none");
    }

    #[test]
    fn consecutive_unpublished_ports_open_to_the_same_are_one_row() {
        let row = |port, published: &[&str]| PortReport {
            port,
            every_port: false,
            last_port: None,
            proto: "tcp".into(),
            published: published.iter().map(ToString::to_string).collect(),
            outside: Outside::new(Reach::everyone()),
            limit: None,
            rate_limited: 0,
            paths: Vec::new(),
        };
        let rows = compress(vec![
            row(8000, &[]),
            row(8001, &[]),
            row(8002, &[]),
            row(8004, &[]),
            row(8005, &["0.0.0.0:8005"]),
        ]);
        let spans: Vec<(u16, Option<u16>)> = rows.iter().map(|r| (r.port, r.last_port)).collect();
        assert_eq!(spans, [(8000, Some(8002)), (8004, None), (8005, None)]);
    }
}
