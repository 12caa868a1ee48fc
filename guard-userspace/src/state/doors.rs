//! The engine's own doors in the desired state (README, "What it protects"): Swarm's
//! overlay, gossip and control ports and the Docker API on tcp, each listed like a port Docker
//! publishes on the host, under a target id of its own ([`guard_common::maps::door`]), open
//! to the swarm's nodes and the operator's prefixes only. A pure function, like the rest of
//! the desired state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use guard_common::{
    addr::Addr,
    maps::{OPEN_NONE, PortKey, PublishedKey, PublishedTarget, door},
    parse::{IPPROTO_ESP, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP},
};

use crate::{
    policy::file::Management,
    policy::snapshot::{EngineDoors, GOSSIP_PORT},
    policy::{Cidr, Proto, Sources},
    state::desired::{listed_under, open_key},
    state::tables::TableSet,
};

/// One door as the agent guards it (for logs, `guard status` and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoorPolicy {
    pub target: u32,
    /// (IP protocol number, port): ESP has port 0.
    pub ports: Vec<(u8, u16)>,
    /// Who may reach it: the swarm's nodes, then the operator's prefixes.
    pub sources: Vec<Cidr>,
}

/// How a door's port is written: `4789/udp`, `esp`.
pub fn port_name(proto: u8, port: u16) -> String {
    match Proto::from_number(proto) {
        Some(p) => format!("{port}/{p}"),
        None if proto == IPPROTO_ESP => "esp".into(),
        None => format!("{port}/proto-{proto}"),
    }
}

/// The name a door goes by where a container's name would stand.
pub fn name(target: u32) -> Option<&'static str> {
    match target {
        door::OVERLAY => Some("engine:swarm-overlay"),
        door::GOSSIP => Some("engine:swarm-gossip"),
        door::CONTROL => Some("engine:swarm-control"),
        door::API => Some("engine:docker-api"),
        _ => None,
    }
}

/// Adds the doors the engine uses to `tables` (unless the operator turned them off) and says
/// what it guards. `host` is every host address the published ports are listed under.
pub fn guard(
    tables: &mut TableSet,
    doors: &EngineDoors,
    management: &Management,
    host: &[IpAddr],
) -> Vec<DoorPolicy> {
    if !management.enforce {
        return Vec::new();
    }
    let mut guarded = Vec::new();
    if let Some(swarm) = &doors.swarm {
        let nodes: Vec<Cidr> = swarm.nodes.iter().copied().map(Cidr::host).collect();
        let cluster: Vec<Cidr> = nodes.iter().chain(&management.cluster).copied().collect();
        let everywhere = wildcards();
        // An encrypted overlay's VXLAN travels inside ESP between the nodes.
        let mut overlay = vec![(UDP, swarm.data_path_port)];
        if swarm.encrypted {
            overlay.push((IPPROTO_ESP, 0));
        }
        guarded.push(DoorPolicy {
            target: door::OVERLAY,
            ports: overlay,
            sources: cluster.clone(),
        });
        guarded.push(DoorPolicy {
            target: door::GOSSIP,
            ports: vec![(TCP, GOSSIP_PORT), (UDP, GOSSIP_PORT)],
            sources: cluster.clone(),
        });
        if let Some(port) = swarm.control_port {
            // A node that joins, and the operator who manages the swarm from elsewhere.
            let sources = cluster.iter().chain(&management.admin).copied().collect();
            guarded.push(DoorPolicy { target: door::CONTROL, ports: vec![(TCP, port)], sources });
        }
        for policy in &guarded {
            list(tables, policy, &everywhere, host);
        }
    }
    let api: Vec<&crate::policy::snapshot::ApiListener> =
        doors.api.iter().filter(|l| !l.addr.ip().is_loopback()).collect();
    if !api.is_empty() {
        let policy = DoorPolicy {
            target: door::API,
            ports: api.iter().map(|l| (TCP, l.addr.port())).collect(),
            sources: management.admin.clone(),
        };
        for listener in &api {
            let one = DoorPolicy { ports: vec![(TCP, listener.addr.port())], ..policy.clone() };
            list(tables, &one, &[listener.addr.ip()], host);
        }
        guarded.push(policy);
    }
    guarded
}

/// The engine's doors no policy makes safe: a Docker API on tcp without TLS, reachable from
/// an uplink (from the `admin` prefixes at best, and from everywhere if the operator turned
/// guarding the doors off). Whoever reaches it is root on the host, and it is said whatever
/// the policy.
pub fn unsafe_listeners(doors: &EngineDoors, management: &Management) -> Vec<String> {
    let reach = if !management.enforce {
        "everyone ([management] enforce = false)".to_string()
    } else if management.admin.is_empty() {
        "no one outside yet ([management] admin is empty), but one prefix away from everyone"
            .to_string()
    } else {
        let admin: Vec<String> = management.admin.iter().map(ToString::to_string).collect();
        format!("[management] admin {}", admin.join(", "))
    };
    doors
        .api
        .iter()
        .filter(|l| l.plain_text && !l.addr.ip().is_loopback())
        .map(|l| {
            format!(
                "the Docker API listens on tcp://{} without TLS: whoever reaches it is root on this host; reachable from outside by {reach}. Use TLS (--tlsverify) or a unix socket / SSH",
                l.addr
            )
        })
        .collect()
}

/// Swarm's sockets listen on every address of the host (`--data-path-addr` does not change
/// that, moby#47667).
fn wildcards() -> [IpAddr; 2] {
    [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
}

/// Lists `policy`'s ports on each of `bound` (a wildcard standing for every host address of
/// its family, as for a published port), open to its sources. A port Docker publishes for a
/// container on the same address stays the container's: that is where the engine sends it.
fn list(tables: &mut TableSet, policy: &DoorPolicy, bound: &[IpAddr], host: &[IpAddr]) {
    for &(proto, port) in &policy.ports {
        for ip in bound.iter().flat_map(|b| listed_under(*b, host)) {
            let key = PublishedKey { addr: Addr::from(ip), port, proto, _pad: 0 };
            let value = PublishedTarget {
                target: policy.target,
                port,
                rule: OPEN_NONE,
                all_ports: OPEN_NONE,
                flags: 0,
                proto_rule: OPEN_NONE,
                _pad: [0; 2],
            };
            tables.published.entry(key).or_insert(value);
        }
        let key = PortKey::new(policy.target, proto, port);
        open_key(tables, key, &Sources::Listed(policy.sources.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use guard_common::{
        decision::{L4, Packet, decide},
        reason::{Reason, Verdict},
    };

    use super::*;
    use crate::{
        policy::file::{Mode, PolicyFile},
        policy::snapshot::{ApiListener, CONTROL_PORT, Snapshot, Swarm, VXLAN_PORT},
        state::desired::desired_state,
    };

    const HOST: &str = "10.77.0.11";
    const PEER: &str = "10.77.0.12";
    const OUTSIDE: &str = "10.77.0.66";
    const ADMIN: &str = "192.0.2.10";
    const JOINING: &str = "10.78.0.13";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn snapshot(manager: bool, api: &[&str]) -> Snapshot {
        let swarm = Swarm {
            data_path_port: VXLAN_PORT,
            control_port: manager.then_some(CONTROL_PORT),
            nodes: [HOST, PEER].map(ip).into(),
            encrypted: true,
        };
        let api = api
            .iter()
            .map(|a| ApiListener { addr: a.parse().unwrap(), plain_text: true })
            .collect();
        Snapshot { doors: EngineDoors { swarm: Some(swarm), api }, ..Default::default() }
    }

    fn policy(enforce: bool) -> PolicyFile {
        let management = Management {
            enforce,
            cluster: vec!["10.78.0.0/24".parse().unwrap()],
            admin: vec![ADMIN.parse().unwrap()],
        };
        PolicyFile { management, ..Default::default() }
    }

    fn verdict(
        snapshot: &Snapshot,
        policy: &PolicyFile,
        src: &str,
        dst: &str,
        proto: u8,
        port: u16,
    ) -> Reason {
        let d = desired_state(snapshot, &[ip(HOST)], &BTreeMap::new(), policy);
        let pkt = Packet {
            src: ip(src).into(),
            dst: ip(dst).into(),
            l4: L4::ports(proto, 40000, port, true),
        };
        decide(&d.tables, &pkt).reason
    }

    #[test]
    fn the_swarm_s_ports_open_to_its_nodes_and_the_cluster_prefixes_only() {
        let (s, p) = (snapshot(true, &[]), policy(true));
        for (proto, port) in
            [(UDP, VXLAN_PORT), (TCP, GOSSIP_PORT), (UDP, GOSSIP_PORT), (TCP, CONTROL_PORT)]
        {
            assert_eq!(
                verdict(&s, &p, OUTSIDE, HOST, proto, port),
                Reason::ManagementPort,
                "{port}"
            );
            assert_eq!(verdict(&s, &p, PEER, HOST, proto, port), Reason::AllowedSource, "{port}");
            assert_eq!(
                verdict(&s, &p, JOINING, HOST, proto, port),
                Reason::AllowedSource,
                "{port}"
            );
            // Broadcast reaches the wildcard socket as well.
            assert_eq!(
                verdict(&s, &p, OUTSIDE, "255.255.255.255", proto, port),
                Reason::ManagementPort
            );
        }
        // Only a manager's control port takes the admin prefixes; the data path does not.
        assert_eq!(verdict(&s, &p, ADMIN, HOST, TCP, CONTROL_PORT), Reason::AllowedSource);
        assert_eq!(verdict(&s, &p, ADMIN, HOST, UDP, VXLAN_PORT), Reason::ManagementPort);
        // Every other host service stays untouched, whoever sends.
        for port in [22, 80, 2375, 4790] {
            assert_eq!(verdict(&s, &p, OUTSIDE, HOST, TCP, port), Reason::NotContainerBound);
        }
        assert_eq!(verdict(&s, &p, OUTSIDE, HOST, TCP, VXLAN_PORT), Reason::NotContainerBound);
        // An encrypted overlay's ESP, likewise.
        assert_eq!(verdict(&s, &p, OUTSIDE, HOST, IPPROTO_ESP, 0), Reason::ManagementPort);
        assert_eq!(verdict(&s, &p, PEER, HOST, IPPROTO_ESP, 0), Reason::AllowedSource);
    }

    #[test]
    fn a_worker_has_no_control_port_to_guard() {
        let (s, p) = (snapshot(false, &[]), policy(true));
        assert_eq!(verdict(&s, &p, OUTSIDE, HOST, TCP, CONTROL_PORT), Reason::NotContainerBound);
        assert_eq!(verdict(&s, &p, OUTSIDE, HOST, UDP, VXLAN_PORT), Reason::ManagementPort);
    }

    #[test]
    fn the_api_on_tcp_opens_to_admin_prefixes_only_and_loopback_is_not_judged() {
        let s = snapshot(false, &["0.0.0.0:2375", "127.0.0.1:2376"]);
        let p = policy(true);
        assert_eq!(verdict(&s, &p, OUTSIDE, HOST, TCP, 2375), Reason::ManagementPort);
        assert_eq!(
            verdict(&s, &p, PEER, HOST, TCP, 2375),
            Reason::ManagementPort,
            "nodes are no admins"
        );
        assert_eq!(verdict(&s, &p, ADMIN, HOST, TCP, 2375), Reason::AllowedSource);
        assert_eq!(verdict(&s, &p, OUTSIDE, HOST, TCP, 2376), Reason::NotContainerBound);
        // With no admin prefix, nobody outside.
        let nobody = PolicyFile::default();
        assert_eq!(verdict(&s, &nobody, ADMIN, HOST, TCP, 2375), Reason::ManagementPort);
    }

    #[test]
    fn enforce_false_judges_no_door_and_audit_mode_counts_instead_of_dropping() {
        let s = snapshot(true, &["0.0.0.0:2375"]);
        for (proto, port) in [(UDP, VXLAN_PORT), (TCP, CONTROL_PORT), (TCP, 2375)] {
            assert_eq!(
                verdict(&s, &policy(false), OUTSIDE, HOST, proto, port),
                Reason::NotContainerBound
            );
        }
        let audit = PolicyFile { mode: Mode::Audit, ..policy(true) };
        let d = desired_state(&s, &[ip(HOST)], &BTreeMap::new(), &audit);
        let pkt = Packet {
            src: ip(OUTSIDE).into(),
            dst: ip(HOST).into(),
            l4: L4::ports(UDP, 1, VXLAN_PORT, true),
        };
        let decision = decide(&d.tables, &pkt);
        assert_eq!(
            (decision.reason, decision.audited, decision.verdict()),
            (Reason::ManagementPort, true, Verdict::Pass)
        );
    }

    #[test]
    fn a_port_a_container_publishes_stays_the_container_s_and_doors_outlive_closing() {
        let mut s = snapshot(true, &[]);
        let mut c = crate::policy::snapshot::Container {
            id: "ab".repeat(32),
            name: "gossip-like".into(),
            image: String::new(),
            labels: [("guard.expose".to_string(), "7946/tcp".to_string())].into(),
            addresses: vec![ip("172.18.0.2")],
            published: vec![],
        };
        c.published.push(crate::policy::snapshot::Published {
            host_ip: ip("0.0.0.0"),
            host_port: GOSSIP_PORT,
            container_port: GOSSIP_PORT,
            proto: Proto::Tcp,
        });
        s.containers.push(c);
        let targets = BTreeMap::from([("ab".repeat(32), 1)]);
        let mut d = desired_state(&s, &[ip(HOST)], &targets, &policy(true));
        let pkt = |src: &str, proto: u8, port: u16| Packet {
            src: ip(src).into(),
            dst: ip(HOST).into(),
            l4: L4::ports(proto, 40000, port, true),
        };
        assert_eq!(decide(&d.tables, &pkt(OUTSIDE, TCP, GOSSIP_PORT)).reason, Reason::Exposed);
        assert_eq!(
            decide(&d.tables, &pkt(OUTSIDE, UDP, GOSSIP_PORT)).reason,
            Reason::ManagementPort
        );
        // Before a sync nothing a label opened is open; the swarm's members still are.
        d.tables.close_openings();
        assert_eq!(decide(&d.tables, &pkt(OUTSIDE, TCP, GOSSIP_PORT)).reason, Reason::Closed);
        assert_eq!(decide(&d.tables, &pkt(PEER, UDP, VXLAN_PORT)).reason, Reason::AllowedSource);
        assert_eq!(
            decide(&d.tables, &pkt(OUTSIDE, UDP, VXLAN_PORT)).reason,
            Reason::ManagementPort
        );
    }
}
