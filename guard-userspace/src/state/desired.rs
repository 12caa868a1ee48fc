//! The desired state: what every policy map must hold, computed from a Docker snapshot, the
//! host's addresses and the target ids. A pure function: no Docker, no kernel.

use guard_common::maps::{CONFIG_AUDIT_ALL, CONFIG_HAS_TRUSTED, TARGET_AUDIT, TARGET_RATE_LIMITED};
use std::{collections::BTreeMap, net::IpAddr};

use guard_common::{
    addr::Addr,
    maps::{
        AddrInfo, OPEN_NONE, PORT_RULES_PER_PROTO, PORT_RULES_SINGLE, PROTO_ANY, PortKey, PortRule,
        PublishedKey, PublishedTarget, SourceKey,
    },
};

use crate::{
    policy::file::{Mode, PolicyFile, apply_rules},
    policy::labels::{LabelError, parse_labels},
    policy::rates::RateRule,
    policy::snapshot::{Container, Snapshot},
    policy::{Opening, PortSpec, Sources},
    state::doors::{self, DoorPolicy},
    state::identities::decode_hex,
    state::tables::{Lpm, TableSet},
};

/// One container's policy as the agent understood it (for logs and `guard status`).
#[derive(Clone, Debug)]
pub struct ContainerPolicy {
    pub container: Container,
    pub target: u32,
    pub openings: Vec<Opening>,
    /// Limits on new flows, in the order said (the later of two on one port is in force).
    pub limits: Vec<RateRule>,
    pub label_errors: Vec<LabelError>,
    pub mode: Mode,
}

#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub tables: TableSet,
    pub containers: Vec<ContainerPolicy>,
    /// The engine's own doors guard judges (see [`crate::state::doors`]).
    pub doors: Vec<DoorPolicy>,
}

/// `host_addrs` are every address of every host interface; `targets` maps container ids to
/// target ids (see [`crate::state::identities`]); `policy` is the operator's policy file. A container
/// without a target id is left closed.
pub(crate) fn desired_state(
    snapshot: &Snapshot,
    host_addrs: &[IpAddr],
    targets: &BTreeMap<String, u32>,
    policy: &PolicyFile,
) -> Desired {
    let mut tables = TableSet::default();
    if policy.mode == Mode::Audit {
        tables.config.flags |= CONFIG_AUDIT_ALL;
    }
    for cidr in &policy.trusted_sources {
        for (addr, len) in cidr.to_source_prefixes() {
            tables.trusted.insert(Lpm { len, data: addr }, 1);
        }
        tables.config.flags |= CONFIG_HAS_TRUSTED;
    }
    tables.deny(policy.deny.iter().copied());

    // Protection first: every Docker subnet, so an address no container holds yet is closed.
    for network in &snapshot.networks {
        for subnet in &network.subnets {
            let (addr, len) = subnet.to_addr_prefix();
            tables.networks.insert(Lpm { len, data: addr }, 1);
        }
    }

    // The host's own addresses (bridge gateways included): container-bound only through a
    // published port. Loopback needs no entry: the decision drops it before any lookup.
    let gateways = snapshot.networks.iter().flat_map(|n| n.gateways.iter().copied());
    let host: Vec<IpAddr> =
        host_addrs.iter().copied().chain(gateways).filter(|ip| !ip.is_loopback()).collect();
    for ip in &host {
        tables.addrs.insert(Addr::from(*ip), AddrInfo::host());
    }

    let mut containers = Vec::new();
    for container in &snapshot.containers {
        let Some(&target) = targets.get(&container.id) else {
            continue;
        };
        let Some(identity) = decode_hex(&container.id) else {
            continue;
        };
        tables.identities.insert(target, identity);

        for ip in &container.addresses {
            tables.addrs.insert(Addr::from(*ip), AddrInfo::container(target));
        }
        for published in &container.published {
            for host_ip in listed_under(published.host_ip, &host) {
                let key = PublishedKey {
                    addr: Addr::from(host_ip),
                    port: published.host_port,
                    proto: published.proto.number(),
                    _pad: 0,
                };
                // The rules are filled in once every opening is known.
                let value = PublishedTarget {
                    target,
                    port: published.container_port,
                    rule: OPEN_NONE,
                    all_ports: OPEN_NONE,
                    flags: 0,
                    proto_rule: OPEN_NONE,
                    _pad: [0; 2],
                };
                tables.published.insert(key, value);
            }
        }

        let (from_labels, label_errors) = parse_labels(&container.labels);
        let (declared, mode) = apply_rules(policy, container, from_labels);
        for opening in &declared.openings {
            open(&mut tables, target, opening);
        }
        for limit in &declared.limits {
            // Later rules overwrite earlier ones on the same port, as the policy reads.
            for key in port_keys(target, limit.ports) {
                tables.rates.insert(key, limit.limit.to_kernel());
            }
        }
        containers.push(ContainerPolicy {
            container: container.clone(),
            target,
            openings: declared.openings,
            limits: declared.limits,
            label_errors,
            mode,
        });
    }
    let doors = doors::guard(&mut tables, &snapshot.doors, &policy.management, &host);
    let audited: std::collections::BTreeSet<u32> =
        containers.iter().filter(|c| c.mode == Mode::Audit).map(|c| c.target).collect();
    fold_rules_into_lookups(&mut tables, &audited);
    fill_prefilter(&mut tables, snapshot);
    Desired { tables, containers, doors }
}

/// Copies each container's all-ports rule, each published port's rule (and its protocol's
/// every-port rule) and the audit and rate-limited flags into the ADDRS and PUBLISHED values,
/// where the packet path finds them without another lookup, and marks which kinds of PORTS
/// entries each container has at all (single ports, every port of a protocol), so a
/// container without one kind skips that lookup. All-ports rules then leave PORTS (their
/// source lists stay in SOURCES under the all-ports key); every-port-of-a-protocol rules
/// stay, one entry each.
fn fold_rules_into_lookups(tables: &mut TableSet, audited: &std::collections::BTreeSet<u32>) {
    // The kernel looks a limit up only for a target flagged so: a port without one pays
    // nothing.
    let limited: std::collections::BTreeSet<u32> = tables.rates.keys().map(|k| k.target).collect();
    let flags = |target: &u32| {
        let audit = if audited.contains(target) { TARGET_AUDIT } else { 0 };
        audit | if limited.contains(target) { TARGET_RATE_LIMITED } else { 0 }
    };
    let all_ports: BTreeMap<u32, u8> = tables
        .ports
        .iter()
        .filter(|(k, _)| k.proto == PROTO_ANY)
        .map(|(k, r)| (k.target, r.open_to))
        .collect();
    tables.ports.retain(|k, _| k.proto != PROTO_ANY);
    let mut port_rules: BTreeMap<u32, u8> = BTreeMap::new();
    for key in tables.ports.keys() {
        let kind =
            if key.is_every_port_of_proto() { PORT_RULES_PER_PROTO } else { PORT_RULES_SINGLE };
        *port_rules.entry(key.target).or_default() |= kind;
    }
    for info in tables.addrs.values_mut().filter(|i| i.kind == AddrInfo::CONTAINER) {
        info.all_ports = all_ports.get(&info.target).copied().unwrap_or(OPEN_NONE);
        info.port_rules = port_rules.get(&info.target).copied().unwrap_or(0);
        info.flags = flags(&info.target);
    }
    let rule_of = |key: PortKey| tables.ports.get(&key).map_or(OPEN_NONE, |r| r.open_to);
    for (key, p) in &mut tables.published {
        p.rule = rule_of(PortKey::new(p.target, key.proto, p.port));
        p.proto_rule = rule_of(PortKey::every_port_of(p.target, key.proto));
        p.all_ports = all_ports.get(&p.target).copied().unwrap_or(OPEN_NONE);
        p.flags = flags(&p.target);
    }
}

/// Sets the prefilter bits for every Docker subnet, every container address (even one outside
/// any subnet Docker reported) and every published port. Host addresses outside Docker's
/// subnets stay clear: traffic to the host's own services skips every lookup.
fn fill_prefilter(tables: &mut TableSet, snapshot: &Snapshot) {
    for network in &snapshot.networks {
        for subnet in &network.subnets {
            let (addr, len) = subnet.to_addr_prefix();
            tables.prefilter.mark_prefix(&addr, len);
        }
    }
    let containers: Vec<Addr> = tables
        .addrs
        .iter()
        .filter(|(_, info)| info.kind == AddrInfo::CONTAINER)
        .map(|(addr, _)| *addr)
        .collect();
    for addr in &containers {
        tables.prefilter.mark_addr(addr);
    }
    for key in tables.published.keys() {
        tables.prefilter.ports.set(key.port);
    }
}

/// The host addresses a port bound to `bound` is listed under. A port bound to the wildcard
/// address of a family (`0.0.0.0` or `::`; Docker reports one binding per family) is listed
/// under every host address of that family, and under the wildcard address itself, where the
/// decision looks up broadcast and multicast destinations (docker-proxy receives those on its
/// wildcard socket). One bound to loopback is never reached from an uplink.
pub(crate) fn listed_under(bound: IpAddr, host: &[IpAddr]) -> Vec<IpAddr> {
    if bound.is_unspecified() {
        let family = host.iter().copied().filter(|ip| ip.is_ipv4() == bound.is_ipv4());
        family.chain([bound]).collect()
    } else if bound.is_loopback() {
        Vec::new()
    } else {
        vec![bound]
    }
}

/// Adds one opening. Open-to-everyone wins over a source list on the same port; source lists
/// on the same port add up.
fn open(tables: &mut TableSet, target: u32, opening: &Opening) {
    for key in port_keys(target, opening.ports) {
        open_key(tables, key, &opening.sources);
    }
}

/// The map keys `ports` of `target` take: one for `*` and `*/proto`, one per port of a range.
fn port_keys(target: u32, ports: PortSpec) -> Vec<PortKey> {
    match ports {
        PortSpec::All => vec![PortKey::all_ports(target)],
        PortSpec::EveryPortOf(proto) => vec![PortKey::every_port_of(target, proto.number())],
        PortSpec::Range { proto, first, last } => {
            (first..=last).map(|port| PortKey::new(target, proto.number(), port)).collect()
        }
    }
}

/// Opens one port (or every port of a protocol: [`PortKey::every_port_of`]; or a whole
/// container: [`PortKey::all_ports`]) to `sources`.
pub(crate) fn open_key(tables: &mut TableSet, key: PortKey, sources: &Sources) {
    match sources {
        Sources::Everyone => {
            tables.ports.insert(key, PortRule::everyone());
            tables.sources.retain(|s, _| s.data.port != key);
        }
        Sources::Listed(cidrs) => {
            if tables.ports.get(&key) == Some(&PortRule::everyone()) {
                return;
            }
            tables.ports.insert(key, PortRule::listed());
            for (addr, len) in cidrs.iter().flat_map(|c| c.to_source_prefixes()) {
                let data = SourceKey { port: key, addr };
                tables.sources.insert(Lpm { len: SourceKey::PORT_BITS + len, data }, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use guard_common::{
        decision::{L4, Packet, decide},
        reason::Reason,
    };

    use super::*;
    use crate::{
        policy::Proto,
        policy::snapshot::{Container, Published},
        state::identities::Identities,
        testing::{HOST, OUTSIDE_A, OUTSIDE_B, container, publish, seed_snapshot},
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// `containers` alone on the seed's network.
    fn on_seed_network(containers: Vec<Container>) -> Snapshot {
        Snapshot { networks: seed_snapshot().networks, containers, doors: Default::default() }
    }

    fn state(snapshot: &Snapshot) -> Desired {
        let mut ids = Identities::default();
        let targets = ids.assign(snapshot.containers.iter().map(|c| c.id.as_str()));
        desired_state(snapshot, &[ip(HOST), ip("127.0.0.1")], &targets, &PolicyFile::default())
    }

    fn verdict(d: &Desired, src: &str, dst: &str, port: u16) -> Reason {
        let pkt = Packet {
            src: ip(src).into(),
            dst: ip(dst).into(),
            l4: L4::ports(6, 40000, port, true),
        };
        decide(&d.tables, &pkt).reason
    }

    #[test]
    fn seed_scenario_outside_reaches_only_what_was_opened() {
        let d = state(&seed_snapshot());
        for src in [OUTSIDE_A, OUTSIDE_B] {
            assert_eq!(verdict(&d, src, "172.30.0.4", 443), Reason::Exposed);
            assert_eq!(verdict(&d, src, HOST, 10443), Reason::Exposed);
            assert_eq!(verdict(&d, src, "172.30.0.1", 10443), Reason::Exposed);
            assert_eq!(verdict(&d, src, "fd00:30::4", 443), Reason::Exposed);
            assert_eq!(verdict(&d, src, "172.30.0.2", 5432), Reason::Closed);
            assert_eq!(verdict(&d, src, HOST, 5432), Reason::Closed);
            assert_eq!(verdict(&d, src, "172.30.0.1", 5432), Reason::Closed);
            assert_eq!(verdict(&d, src, "172.30.0.3", 8080), Reason::Closed);
            assert_eq!(verdict(&d, src, "172.30.0.4", 8443), Reason::Closed);
            assert_eq!(verdict(&d, src, HOST, 18443), Reason::Closed);
            assert_eq!(verdict(&d, src, "fd00:30::4", 8443), Reason::Closed);
            assert_eq!(verdict(&d, src, "172.30.0.77", 80), Reason::UnassignedAddr);
            assert_eq!(verdict(&d, src, "127.0.0.1", 5432), Reason::LoopbackDst);
            // The host's own services and routed-through traffic are not ours.
            assert_eq!(verdict(&d, src, HOST, 22), Reason::NotContainerBound);
            assert_eq!(verdict(&d, src, "172.30.0.1", 22), Reason::NotContainerBound);
            assert_eq!(verdict(&d, src, "192.0.2.1", 5432), Reason::NotContainerBound);
        }
        assert_eq!(verdict(&d, OUTSIDE_A, "172.30.0.5", 9000), Reason::AllowedSource);
        assert_eq!(verdict(&d, OUTSIDE_A, HOST, 19000), Reason::AllowedSource);
        assert_eq!(verdict(&d, OUTSIDE_B, "172.30.0.5", 9000), Reason::Closed);
        assert_eq!(verdict(&d, OUTSIDE_B, HOST, 19000), Reason::Closed);
    }

    #[test]
    fn expose_beats_allow_and_allow_lists_add_up() {
        let snap = Snapshot {
            networks: seed_snapshot().networks,
            containers: vec![container(
                9,
                "svc",
                &["172.30.0.9"],
                &[
                    ("guard.allow.a", "80 from 10.0.0.0/8"),
                    ("guard.allow.b", "80,81 from 192.0.2.0/24"),
                    ("guard.expose", "81"),
                ],
            )],
            doors: Default::default(),
        };
        let d = state(&snap);
        assert_eq!(verdict(&d, "10.1.1.1", "172.30.0.9", 80), Reason::AllowedSource);
        assert_eq!(verdict(&d, "192.0.2.9", "172.30.0.9", 80), Reason::AllowedSource);
        assert_eq!(verdict(&d, "198.51.100.1", "172.30.0.9", 80), Reason::Closed);
        assert_eq!(verdict(&d, "198.51.100.1", "172.30.0.9", 81), Reason::Exposed);
        assert_eq!(d.tables.sources.len(), 2, "no source entries behind an exposed port");
    }

    #[test]
    fn all_ports_rule_opens_port_less_traffic_and_every_port() {
        let snap = Snapshot {
            networks: seed_snapshot().networks,
            containers: vec![container(
                9,
                "vpn",
                &["172.30.0.9"],
                &[("guard.allow.vpn", "* from 10.8.0.0/24")],
            )],
            doors: Default::default(),
        };
        let d = state(&snap);
        assert_eq!(verdict(&d, "10.8.0.3", "172.30.0.9", 12345), Reason::AllowedSource);
        let icmp =
            Packet { src: ip("10.8.0.3").into(), dst: ip("172.30.0.9").into(), l4: L4::NO_PORTS };
        assert_eq!(decide(&d.tables, &icmp).reason, Reason::AllowedSource);
        let icmp_b = Packet { src: ip("10.9.0.3").into(), ..icmp };
        assert_eq!(decide(&d.tables, &icmp_b).reason, Reason::Closed);
    }

    #[test]
    fn every_port_of_one_protocol_opens_that_protocol_only_in_one_entry() {
        let mut dns = container(
            9,
            "dns",
            &["172.30.0.9"],
            &[("guard.expose", "*/udp"), ("guard.allow.lan", "*/sctp from 10.8.0.0/24")],
        );
        dns.addresses.push(ip("fd00:30::9"));
        dns.published = vec![
            publish("0.0.0.0", 10053, 53, Proto::Udp),
            publish("0.0.0.0", 10054, 53, Proto::Tcp),
            publish("0.0.0.0", 10055, 3868, Proto::Sctp),
        ];
        let snap = Snapshot {
            networks: seed_snapshot().networks,
            containers: vec![dns],
            doors: Default::default(),
        };
        let d = state(&snap);
        assert_eq!(d.tables.ports.len(), 2, "one entry per (container, protocol), no ranges");
        let judge = |src: &str, dst: &str, l4: L4| {
            decide(&d.tables, &Packet { src: ip(src).into(), dst: ip(dst).into(), l4 }).reason
        };
        for dst in ["172.30.0.9", "fd00:30::9"] {
            let src = if dst.contains(':') { "2001:db8::7" } else { OUTSIDE_A };
            for port in [1, 53, 40000, 65535] {
                assert_eq!(judge(src, dst, L4::ports(17, 1234, port, true)), Reason::Exposed);
                assert_eq!(judge(src, dst, L4::ports(6, 1234, port, true)), Reason::Closed);
                assert_eq!(judge(src, dst, L4::ports(132, 1234, port, true)), Reason::Closed);
            }
            // ICMP echo (its identifier as the port), other port-less protocols: `*` only.
            assert_eq!(judge(src, dst, L4::ports(1, 7, 7, true)), Reason::Closed);
            assert_eq!(judge(src, dst, L4::ports(58, 7, 7, true)), Reason::Closed);
            assert_eq!(judge(src, dst, L4::no_ports(47)), Reason::Closed);
            assert_eq!(judge(src, dst, L4::NO_PORTS), Reason::Closed);
        }
        // Through the published ports: the host port's protocol decides.
        assert_eq!(judge(OUTSIDE_A, HOST, L4::ports(17, 1, 10053, true)), Reason::Exposed);
        assert_eq!(judge(OUTSIDE_A, HOST, L4::ports(6, 1, 10054, true)), Reason::Closed);
        // The listed protocol: its sources only, on every port.
        let sctp = |src: &str, dst: &str, port| judge(src, dst, L4::ports(132, 1, port, true));
        assert_eq!(sctp("10.8.0.7", "172.30.0.9", 9), Reason::AllowedSource);
        assert_eq!(sctp("10.8.0.7", HOST, 10055), Reason::AllowedSource);
        assert_eq!(sctp(OUTSIDE_B, HOST, 10055), Reason::Closed);
        assert_eq!(sctp(OUTSIDE_B, "172.30.0.9", 9), Reason::Closed);
        // `10.8.0.0/24` opens SCTP, not UDP's neighbours nor TCP.
        assert_eq!(judge("10.8.0.7", "172.30.0.9", L4::ports(6, 1, 9, true)), Reason::Closed);
        // Later fragments follow their first fragment whatever the rules; a first fragment
        // too short for its ports fails closed.
        assert_eq!(judge(OUTSIDE_A, "172.30.0.9", L4::LATER_FRAGMENT), Reason::LaterFragment);
        assert_eq!(judge(OUTSIDE_A, "172.30.0.9", L4::UNREADABLE), Reason::Unreadable);
    }

    #[test]
    fn every_port_rules_are_flagged_so_containers_without_them_skip_the_lookup() {
        use guard_common::maps::{PORT_RULES_PER_PROTO, PORT_RULES_SINGLE};
        let snap = Snapshot {
            networks: seed_snapshot().networks,
            containers: vec![
                container(1, "single", &["172.30.0.11"], &[("guard.expose", "53/udp")]),
                container(2, "proto", &["172.30.0.12"], &[("guard.expose", "*/udp")]),
                container(3, "both", &["172.30.0.13"], &[("guard.expose", "*/udp,80")]),
                container(4, "all", &["172.30.0.14"], &[("guard.expose", "*")]),
            ],
            doors: Default::default(),
        };
        let d = state(&snap);
        let flags: Vec<u8> = ["172.30.0.11", "172.30.0.12", "172.30.0.13", "172.30.0.14"]
            .iter()
            .map(|a| d.tables.addrs[&ip(a).into()].port_rules)
            .collect();
        assert_eq!(
            flags,
            [PORT_RULES_SINGLE, PORT_RULES_PER_PROTO, PORT_RULES_SINGLE | PORT_RULES_PER_PROTO, 0]
        );
    }

    #[test]
    fn rate_limits_become_entries_and_flag_every_address_and_published_port() {
        use guard_common::{maps::TARGET_RATE_LIMITED, ratelimit::RateLimit};
        let mut web = container(
            9,
            "web",
            &["172.30.0.9"],
            &[
                ("guard.expose", "443,8000-8002,*/udp"),
                ("guard.ratelimit", "443/tcp 100/s burst 200, 8000-8002 5/m, */udp 30/s"),
            ],
        );
        web.addresses.push(ip("fd00:30::9"));
        web.published = vec![publish("0.0.0.0", 10443, 443, Proto::Tcp)];
        let plain = container(8, "plain", &["172.30.0.8"], &[("guard.expose", "443")]);
        let file = crate::policy::file::parse(
            "[[rule]]\nmatch = { container = \"web\" }\nratelimit = [{ ports = \"443\", rate = \"10/s\" }]\n",
            "test.toml",
        )
        .unwrap();
        let snap = on_seed_network(vec![web, plain]);
        let mut ids = Identities::default();
        let targets = ids.assign(snap.containers.iter().map(|c| c.id.as_str()));
        let (web_t, plain_t) = (targets[&snap.containers[0].id], targets[&snap.containers[1].id]);
        let d = desired_state(&snap, &[ip(HOST)], &targets, &PolicyFile::default());
        let second = 1_000_000_000;
        let want: BTreeMap<PortKey, RateLimit> = [
            (PortKey::new(web_t, 6, 443), RateLimit::new(100, second, 200).unwrap()),
            (PortKey::new(web_t, 6, 8000), RateLimit::new(5, 60 * second, 5).unwrap()),
            (PortKey::new(web_t, 6, 8001), RateLimit::new(5, 60 * second, 5).unwrap()),
            (PortKey::new(web_t, 6, 8002), RateLimit::new(5, 60 * second, 5).unwrap()),
            (PortKey::every_port_of(web_t, 17), RateLimit::new(30, second, 30).unwrap()),
        ]
        .into();
        assert_eq!(d.tables.rates, want);
        let flagged = |info: &AddrInfo| info.flags & TARGET_RATE_LIMITED != 0;
        for (addr, info) in d.tables.addrs.iter().filter(|(_, i)| i.kind == AddrInfo::CONTAINER) {
            assert_eq!(flagged(info), info.target == web_t, "{addr:?}: {info:?}");
        }
        assert_eq!(d.tables.addrs.values().filter(|i| flagged(i)).count(), 2, "both families");
        assert!(
            d.tables
                .published
                .values()
                .all(|p| p.target != web_t || p.flags & TARGET_RATE_LIMITED != 0)
        );
        assert!(d.tables.addrs.values().any(|i| i.target == plain_t && i.flags == 0));
        // A limit holds back; it opens nothing: the verdicts are the openings'.
        assert_eq!(verdict(&d, OUTSIDE_A, "172.30.0.9", 443), Reason::Exposed);
        assert_eq!(verdict(&d, OUTSIDE_A, "172.30.0.9", 444), Reason::Closed);

        // The policy file's word on a port comes after the label's.
        let d = desired_state(&snap, &[ip(HOST)], &targets, &file);
        assert_eq!(
            d.tables.rates[&PortKey::new(web_t, 6, 443)],
            RateLimit::new(10, second, 10).unwrap()
        );
        assert_eq!(d.containers[0].limits.len(), 4, "the label's three, then the file's");

        // Until the agent has synced, nothing is open and nothing is limited.
        let mut closed = d.tables.clone();
        closed.close_openings();
        assert!(closed.rates.is_empty());
        assert!(closed.addrs.values().all(|i| i.flags == 0));
        let plan = crate::state::tables::diff(&closed, &d.tables);
        assert_eq!(plan.rates.upsert.len(), d.tables.rates.len());
    }

    #[test]
    fn a_bad_ratelimit_label_limits_nothing_and_leaves_the_openings_as_they_are() {
        let labels = [("guard.expose", "443"), ("guard.ratelimit", "443/tcp 100/h")];
        let snap = on_seed_network(vec![container(9, "web", &["172.30.0.9"], &labels)]);
        let d = state(&snap);
        assert!(d.tables.rates.is_empty());
        assert!(d.tables.addrs.values().all(|i| i.flags == 0));
        assert_eq!(verdict(&d, OUTSIDE_A, "172.30.0.9", 443), Reason::Exposed);
        let warning = d.containers[0].label_errors[0].warning("web");
        assert!(warning.contains("guard.ratelimit") && warning.contains("N/s"), "{warning}");
    }

    #[test]
    fn bad_labels_leave_the_container_closed_and_are_reported() {
        let labels = [("guard.expose", "*/udpp"), ("guard.allow.x", "*-3/udp from 10.0.0.0/8")];
        let snap = on_seed_network(vec![container(9, "typo", &["172.30.0.9"], &labels)]);
        let d = state(&snap);
        assert_eq!(verdict(&d, OUTSIDE_A, "172.30.0.9", 443), Reason::Closed);
        let udp = L4::ports(17, 1, 53, true);
        let pkt = Packet { src: ip("10.0.0.1").into(), dst: ip("172.30.0.9").into(), l4: udp };
        assert_eq!(decide(&d.tables, &pkt).reason, Reason::Closed);
        let errors: Vec<String> =
            d.containers[0].label_errors.iter().map(|e| e.warning("typo")).collect();
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains("guard.allow.x") && errors[0].contains("*-3/udp"), "{errors:?}");
        assert!(errors[1].contains("guard.expose") && errors[1].contains("udpp"), "{errors:?}");
        assert!(d.tables.ports.is_empty());
    }

    #[test]
    fn published_on_one_address_or_loopback_only() {
        let mut web = container(9, "web", &["172.30.0.9"], &[("guard.expose", "80")]);
        web.published = vec![
            Published { host_ip: ip(HOST), host_port: 8080, container_port: 80, proto: Proto::Tcp },
            Published {
                host_ip: ip("127.0.0.1"),
                host_port: 8081,
                container_port: 80,
                proto: Proto::Tcp,
            },
        ];
        let snap = Snapshot {
            networks: seed_snapshot().networks,
            containers: vec![web],
            doors: Default::default(),
        };
        let d = state(&snap);
        assert_eq!(verdict(&d, OUTSIDE_A, HOST, 8080), Reason::Exposed);
        // Not bound on the gateway address: that is the host's own port 8080.
        assert_eq!(verdict(&d, OUTSIDE_A, "172.30.0.1", 8080), Reason::NotContainerBound);
        assert_eq!(d.tables.published.len(), 1);
    }

    #[test]
    fn an_address_taken_over_by_another_container_inherits_nothing() {
        let d1 = state(&seed_snapshot());
        // web (exposed) is gone; an unlabelled container holds its address now.
        let mut snap = seed_snapshot();
        snap.containers.retain(|c| c.name != "web");
        snap.containers.push(container(7, "newcomer", &["172.30.0.4"], &[]));
        let mut ids = Identities::default();
        ids.assign(seed_snapshot().containers.iter().map(|c| c.id.as_str()));
        let targets = ids.assign(snap.containers.iter().map(|c| c.id.as_str()));
        let d2 = desired_state(&snap, &[ip(HOST)], &targets, &PolicyFile::default());
        assert_eq!(verdict(&d1, OUTSIDE_A, "172.30.0.4", 443), Reason::Exposed);
        assert_eq!(verdict(&d2, OUTSIDE_A, "172.30.0.4", 443), Reason::Closed);
        assert_ne!(
            d1.tables.addrs[&ip("172.30.0.4").into()],
            d2.tables.addrs[&ip("172.30.0.4").into()]
        );
    }

    #[test]
    fn policy_file_rules_audit_and_trusted_sources() {
        let file = crate::policy::file::parse(
            r#"
trusted_sources = ["198.18.2.0/24"]
[[rule]]
match = { container = "db" }
mode = "audit"
[[rule]]
match = { container = "api" }
expose = ["8080"]
"#,
            "test.toml",
        )
        .unwrap();
        let snap = seed_snapshot();
        let mut ids = Identities::default();
        let targets = ids.assign(snap.containers.iter().map(|c| c.id.as_str()));
        let d = desired_state(&snap, &[ip(HOST)], &targets, &file);
        let decision = |src: &str, dst: &str, port: u16| {
            let l4 = L4::ports(6, 40000, port, true);
            decide(&d.tables, &Packet { src: ip(src).into(), dst: ip(dst).into(), l4 })
        };
        // The audited db: the drop is counted as such, and the packet passes.
        let db = decision(OUTSIDE_A, "172.30.0.2", 5432);
        assert_eq!((db.reason, db.audited), (Reason::Closed, true));
        assert_eq!(db.verdict(), guard_common::reason::Verdict::Pass);
        let published_db = decision(OUTSIDE_A, HOST, 5432);
        assert_eq!((published_db.reason, published_db.audited), (Reason::Closed, true));
        // Not audited: web's closed port still drops.
        let web = decision(OUTSIDE_A, "172.30.0.4", 8443);
        assert_eq!((web.reason, web.audited), (Reason::Closed, false));
        // A file rule opens api's port without a label.
        assert_eq!(decision(OUTSIDE_A, "172.30.0.3", 8080).reason, Reason::Exposed);
        // Outside host B is trusted: inside, for closed ports and unassigned addresses.
        assert_eq!(decision(OUTSIDE_B, "172.30.0.4", 8443).reason, Reason::TrustedSource);
        assert_eq!(decision(OUTSIDE_B, "172.30.0.99", 1).reason, Reason::TrustedSource);
        assert_eq!(decision(OUTSIDE_B, "127.0.0.1", 1).reason, Reason::LoopbackDst);
        assert!(d.containers.iter().any(|c| c.container.name == "db" && c.mode == Mode::Audit));
    }
}
