//! The seed scenario as a reusable test bed, for tests that run the agent some other way than
//! [`crate::agent::Agent`] (the agent as a container, tests/tests/container.rs): the same
//! compose-like project, outside hosts and checks as tests/tests/e2e.rs, without the agent.
//!
//! A project on a real dockerd, two outside hosts on their own links (the uplinks to guard),
//! and the expectations: outside hosts reach only what the labels open (web:443/tcp and
//! dns:53/udp for everyone, reports:9000 for A), by any path and over both families; the host,
//! the containers and the containers' outbound connections are never affected.
//!
//! What an outside host reaches *without* the agent depends on the engine ([`Engine`]):
//! Docker 20.10 forwards everything, container addresses and published ports; Docker 28 drops
//! direct routing to containers itself and leaves the published ports open to everyone. A
//! path the engine drops is expected silent whatever the labels say (the agent can only take
//! away, never add).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::docker::{Container, ContainerSpec, Engine, Network};
use crate::host::RoutingHost;
use crate::netns::{OutsideHost, in_netns, xdp_attached};
use crate::probe::{
    self, EchoServer, Outcome, PATIENT, Proto, QUICK, tcp_roundtrip, udp_roundtrip,
};
use crate::{Exclusive, prepare_test_bed};

pub const SUBNET_V4: &str = "10.250.0.0/24";
pub const SUBNET_V6: &str = "fd00:250::/64";
/// Long enough for any one test; the servers stop with the project anyway.
const SERVER_LIFETIME: Duration = Duration::from_secs(300);

/// The project. TCP listeners are busybox httpd (serves /www/index.html, "ok", on both
/// families); UDP listeners are echo servers in the container's namespace.
pub struct Project {
    // Drop order is field order: servers, then containers, then their network.
    _udp_servers: Vec<EchoServer>,
    pub db: Container,
    pub api: Container,
    pub web: Container,
    pub dns: Container,
    pub reports: Container,
    pub net: Network,
}

impl Project {
    /// On a network in the engine's default gateway mode.
    pub fn start() -> Self {
        Self::start_on(Network::create("guard-e2e-net", SUBNET_V4, Some(SUBNET_V6)))
    }

    /// On `net` ([`SUBNET_V4`] and [`SUBNET_V6`]).
    fn start_on(net: Network) -> Self {
        let run = |name: &str,
                   host: u8,
                   labels: &[(&str, &str)],
                   publish: &[&str],
                   command: &str,
                   listens_on: &[u16]| {
            Container::run(ContainerSpec {
                name,
                network: Some(&net),
                ip: Some(format!("10.250.0.{host}").parse().unwrap()),
                ip6: Some(format!("fd00:250::{host}").parse().unwrap()),
                labels,
                publish,
                command,
                listens_on,
                restart: None,
                volumes: &[],
            })
        };
        // The database: published the way compose files do, no label: closed to the outside.
        let db = run("db", 10, &[], &["5432:5432"], "exec httpd -f -p 5432 -h /www", &[5432]);
        // An internal API, not even published: still reachable by routing without the guard.
        let api = run("api", 11, &[], &[], "exec httpd -f -p 8080 -h /www", &[8080]);
        // The front end: 443 public by label, 8443 (an admin port) published but not exposed.
        let web = run(
            "web",
            12,
            &[("guard.expose", "443/tcp")],
            &["10443:443", "18443:8443"],
            "httpd -p 443 -h /www && exec httpd -f -p 8443 -h /www",
            &[443, 8443],
        );
        // A DNS server: 53/udp public by label; 53/tcp published too but the label names udp
        // only; 5353/udp (published) stays closed.
        let dns = run(
            "dns",
            13,
            &[("guard.expose", "53/udp")],
            &["1053:53/udp", "1053:53/tcp", "15353:5353/udp"],
            "exec httpd -f -p 53 -h /www",
            &[53],
        );
        // A partner feed: 9000 open to outside host A only (both its addresses), 9001 not.
        let reports = run(
            "reports",
            14,
            &[("guard.allow.partner", "9000/tcp from 10.251.1.2, fd00:251:1::2")],
            &["19000:9000", "19001:9001"],
            "httpd -p 9000 -h /www && exec httpd -f -p 9001 -h /www",
            &[9000, 9001],
        );
        let mut udp_servers = Vec::new();
        for port in [53, 5353] {
            for ip in [IpAddr::from(dns.ip()), dns.ip6().into()] {
                udp_servers.push(dns.udp_echo(SocketAddr::new(ip, port), SERVER_LIFETIME));
            }
        }
        Self { _udp_servers: udp_servers, db, api, web, dns, reports, net }
    }

    /// Every container port, with its published host port and which outside hosts the
    /// labels open it to.
    pub fn targets(&self) -> Vec<Target<'_>> {
        use Proto::{Tcp, Udp};
        let target = |name, container, proto, port, published, open_to_a, open_to_b| Target {
            name,
            container,
            proto,
            port,
            published,
            open_to_a,
            open_to_b,
        };
        vec![
            target("db:5432", &self.db, Tcp, 5432, Some(5432), false, false),
            target("api:8080", &self.api, Tcp, 8080, None, false, false),
            target("web:443", &self.web, Tcp, 443, Some(10443), true, true),
            target("web:8443", &self.web, Tcp, 8443, Some(18443), false, false),
            target("dns:53/udp", &self.dns, Udp, 53, Some(1053), true, true),
            target("dns:53/tcp", &self.dns, Tcp, 53, Some(1053), false, false),
            target("dns:5353/udp", &self.dns, Udp, 5353, Some(15353), false, false),
            target("reports:9000", &self.reports, Tcp, 9000, Some(19000), true, false),
            target("reports:9001", &self.reports, Tcp, 9001, Some(19001), false, false),
        ]
    }
}

pub struct Target<'a> {
    pub name: &'static str,
    pub container: &'a Container,
    pub proto: Proto,
    pub port: u16,
    pub published: Option<u16>,
    pub open_to_a: bool,
    pub open_to_b: bool,
}

/// One way to try a target.
struct Attempt {
    what: String,
    proto: Proto,
    addr: SocketAddr,
    /// Answered where open; where closed, silent: a drop, never a RST (which would mean the
    /// packet got through to a stack).
    expected: Outcome,
}

/// Everything the scenario runs against, without an agent. Field order is drop order:
/// outside hosts, then the project, then the host settings, and the exclusive hold on the test
/// bed last.
pub struct SeedBed {
    pub a: OutsideHost,
    pub b: OutsideHost,
    pub project: Project,
    /// Whether the engine forwards what outside hosts route straight to the containers.
    direct_routed: bool,
    _routing: RoutingHost,
    _exclusive: Exclusive,
}

impl SeedBed {
    /// The project on a network in the engine's default gateway mode.
    pub fn new() -> Self {
        let exclusive = prepare_test_bed();
        let direct_routed = !Engine::current().drops_direct_routing();
        Self::with_project(exclusive, Project::start(), direct_routed)
    }

    /// The project on a network whose engine firewall leaves everything to the guard
    /// ([`Network::create_guard_only`]: Docker 28's `nat-unprotected`; any 20.10 network).
    pub fn guard_only() -> Self {
        let exclusive = prepare_test_bed();
        let net = Network::create_guard_only("guard-e2e-net", SUBNET_V4, Some(SUBNET_V6));
        Self::with_project(exclusive, Project::start_on(net), true)
    }

    fn with_project(exclusive: Exclusive, project: Project, direct_routed: bool) -> Self {
        let routing = RoutingHost::enable();
        let outside = |name, n| {
            let host = OutsideHost::new(name, n);
            host.route_via_host(SUBNET_V4);
            host.route_via_host(SUBNET_V6);
            host
        };
        let (a, b) = (outside("a", 1), outside("b", 2));
        Self { a, b, project, direct_routed, _routing: routing, _exclusive: exclusive }
    }

    /// The host ends of the outside links: the uplinks the agent guards.
    pub fn uplinks(&self) -> [&str; 2] {
        [self.a.host_end(), self.b.host_end()]
    }

    /// The ways `from` can try each target: the container's addresses (direct routing), and
    /// for published ports every host address it can reach: its link's v4 and v6 address
    /// (docker-proxy listens on v6; Docker 28 DNATs v6 too) and the bridge gateways.
    /// `expected`: what a guarded host must answer; without the agent every path the engine
    /// forwards is open, which is the bug.
    fn outside_attempts(&self, from: &OutsideHost, guarded: bool) -> Vec<Attempt> {
        let net = &self.project.net;
        let is_a = from.v4() == self.a.v4();
        let direct_open = self.direct_routed;
        let mut attempts = Vec::new();
        for t in self.project.targets() {
            let labelled = !guarded || if is_a { t.open_to_a } else { t.open_to_b };
            let mut attempt = |how: &str, ip: IpAddr, port, engine_open: bool| {
                let open = labelled && engine_open;
                attempts.push(Attempt {
                    what: format!("{} {how}", t.name),
                    proto: t.proto,
                    addr: SocketAddr::new(ip, port),
                    expected: if open { Outcome::Answered } else { Outcome::Silent },
                });
            };
            attempt("direct v4", t.container.ip().into(), t.port, direct_open);
            attempt("direct v6", t.container.ip6().into(), t.port, direct_open);
            if let Some(host_port) = t.published {
                attempt("published, link v4", from.host_v4().into(), host_port, true);
                attempt("published, link v6", from.host_v6().into(), host_port, true);
                attempt("published, gateway v4", net.gateway_v4.into(), host_port, true);
                attempt("published, gateway v6", net.gateway_v6().into(), host_port, true);
            }
        }
        attempts
    }

    /// db:5432 the way the engine exposes it to outside host A without the agent: by its
    /// address where the engine routes to containers (20.10), through its published port on
    /// A's link where the engine drops direct routing (28). The test bed's own check that
    /// there is an exposure to close, and that unloading brings it back.
    pub fn db_exposed_to_a(&self) -> SocketAddr {
        if self.direct_routed {
            SocketAddr::new(self.project.db.ip().into(), 5432)
        } else {
            SocketAddr::new(self.a.host_v4().into(), 5432)
        }
    }

    /// The agent has stopped, its pins stay: db is still dropped, by address and through its
    /// port published on A's link, and XDP is still on every uplink.
    pub fn check_stopped_agent_protects(&self) {
        let db = self.project.db.ip();
        for db in [SocketAddr::new(db.into(), 5432), SocketAddr::new(self.a.host_v4().into(), 5432)]
        {
            assert_eq!(
                self.a.tcp_outcome(db, QUICK),
                Outcome::Silent,
                "{db} not dropped once the agent stopped: protection lost"
            );
        }
        for uplink in self.uplinks() {
            assert!(xdp_attached(uplink), "the stopped agent took its XDP program off {uplink}");
        }
    }

    /// No XDP program is left on an uplink.
    pub fn check_no_xdp(&self) {
        for uplink in self.uplinks() {
            assert!(!xdp_attached(uplink), "an XDP program is still attached to {uplink}");
        }
    }

    /// After `guard unload`: no XDP program on an uplink, and A reaches db again, as before
    /// the agent.
    pub fn check_unloaded(&self) {
        self.check_no_xdp();
        let exposed = self.db_exposed_to_a();
        assert!(
            self.a.tcp_connect(exposed, PATIENT),
            "after unload A reaches {exposed} again, as before the agent"
        );
    }

    /// Probes every outside attempt from both hosts; prints the whole table and panics
    /// listing every attempt that went the wrong way.
    pub fn check_outside(&self, guarded: bool) {
        let mut wrong = Vec::new();
        for (tag, host) in [("A", &self.a), ("B", &self.b)] {
            let attempts = self.outside_attempts(host, guarded);
            // Patience only where an answer is expected: silence costs the full timeout.
            let targets: Vec<_> = attempts
                .iter()
                .map(|t| {
                    let patience = if t.expected == Outcome::Answered { PATIENT } else { QUICK };
                    (t.proto, t.addr, patience)
                })
                .collect();
            let outcomes = host.outcome_all(&targets);
            for (attempt, outcome) in attempts.iter().zip(outcomes) {
                let line = format!(
                    "{tag} -> {:<36} {} {:<24} {outcome}",
                    attempt.what,
                    attempt.proto,
                    attempt.addr.to_string(),
                );
                println!("{line}");
                if outcome != attempt.expected {
                    wrong.push(format!("{line}, expected {}", attempt.expected));
                }
            }
        }
        assert!(wrong.is_empty(), "outside reachability is wrong:\n{}", wrong.join("\n"));
    }

    /// `guard status --json` (`status`, the command's output) says, for every port the labels
    /// open, the paths that [`SeedBed::check_outside`] finds open with real traffic: the
    /// published host ports, and the container's own addresses exactly where the engine
    /// forwards what is routed to them.
    pub fn check_status_paths(&self, status: &str) {
        let report: serde_json::Value = serde_json::from_str(status)
            .unwrap_or_else(|e| panic!("guard status --json is not JSON ({e}):\n{status}"));
        let mut wrong = Vec::new();
        for t in self.project.targets().iter().filter(|t| t.open_to_a || t.open_to_b) {
            let name = t.container.name();
            let container = report["containers"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name)));
            let Some(container) = container else {
                wrong.push(format!("{}: no container {name} in status", t.name));
                continue;
            };
            let proto = t.proto.to_string();
            let row = container["ports"].as_array().and_then(|ps| {
                ps.iter().find(|p| p["port"] == t.port && p["proto"].as_str() == Some(&proto))
            });
            let paths = row.and_then(|r| r["paths"].as_array()).cloned().unwrap_or_default();
            for path in &paths {
                let (kind, to, open) = (&path["path"], &path["to"], path["open"].as_bool());
                let expected = match kind.as_str() {
                    Some("direct") => self.direct_routed,
                    Some("published") => !to.as_str().is_some_and(|to| to.starts_with("127.")),
                    _ => continue,
                };
                if open != Some(expected) {
                    wrong.push(format!(
                        "{}: {kind} {to} open={open:?}, expected {expected} ({})",
                        t.name, path["why"]
                    ));
                }
            }
            let direct: Vec<&serde_json::Value> =
                paths.iter().filter(|p| p["path"] == "direct").map(|p| &p["to"]).collect();
            let want_direct = [
                SocketAddr::new(t.container.ip().into(), t.port).to_string(),
                SocketAddr::new(t.container.ip6().into(), t.port).to_string(),
            ];
            if !want_direct.iter().all(|w| direct.iter().any(|d| d.as_str() == Some(w))) {
                wrong
                    .push(format!("{}: direct paths {direct:?}, expected {want_direct:?}", t.name));
            }
            let published = paths.iter().filter(|p| p["path"] == "published" && p["open"] == true);
            if t.published.is_some() && published.count() == 0 {
                wrong.push(format!("{}: no open published path in {paths:?}", t.name));
            }
        }
        assert!(wrong.is_empty(), "guard status paths are wrong:\n{}\n{status}", wrong.join("\n"));
    }

    /// What must work with or without the agent: the host and the containers themselves,
    /// and the replies to the containers' own outbound connections.
    pub fn check_inside(&self) {
        self.check_host_reaches_containers();
        self.check_containers_reach_each_other();
        self.check_outbound_replies();
    }

    /// The host (local zone) reaches every port by container address and through the
    /// published ports on loopback (docker-proxy; IPv4 only on Podman, which has none).
    fn check_host_reaches_containers(&self) {
        let mut targets = Vec::new();
        for t in self.project.targets() {
            let mut target = |addr| targets.push((t.proto, addr, PATIENT));
            target(SocketAddr::new(t.container.ip().into(), t.port));
            target(SocketAddr::new(t.container.ip6().into(), t.port));
            if let Some(host_port) = t.published {
                target(SocketAddr::from(([127, 0, 0, 1], host_port)));
                if Engine::current().publishes_on_v6_loopback() {
                    target(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], host_port)));
                }
            }
        }
        let blocked: Vec<_> = targets
            .iter()
            .zip(probe::outcome_all(&targets))
            .filter(|(_, outcome)| *outcome != Outcome::Answered)
            .map(|((proto, addr, _), _)| format!("{addr}/{proto}"))
            .collect();
        assert!(blocked.is_empty(), "the host cannot reach {}", blocked.join(", "));
    }

    /// Containers (bridge zone) reach each other directly, over both families, and through
    /// a published port on the gateway (hairpin).
    fn check_containers_reach_each_other(&self) {
        let p = &self.project;
        let gw = p.net.gateway_v4;
        let cases = [
            (&p.api, format!("http://{}:5432/", p.db.ip())),
            (&p.api, format!("http://[{}]:5432/", p.db.ip6())),
            (&p.api, format!("http://{}:8443/", p.web.ip())),
            (&p.api, format!("http://{gw}:5432/")),
            (&p.web, format!("http://{}:8080/", p.api.ip())),
            (&p.reports, format!("http://[{}]:8080/", p.api.ip6())),
        ];
        for (from, url) in cases {
            // busybox wget's own -T crashes; timeout bounds it instead.
            let out = from.exec(&["timeout", "3", "wget", "-q", "-O", "-", &url]);
            assert!(
                String::from_utf8_lossy(&out.stdout).trim() == "ok",
                "{} cannot fetch {url} ({}): {}",
                from.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // UDP, from the container's own stack (busybox has no UDP client).
        for dns in [IpAddr::from(p.dns.ip()), p.dns.ip6().into()] {
            let addr = SocketAddr::new(dns, 5353);
            let reached =
                in_netns(&p.api.netns_path(), || probe::reachable(Proto::Udp, addr, PATIENT));
            assert!(reached, "api cannot reach {addr}/udp");
        }
    }

    /// A container's outbound TCP and UDP connections to outside host A get their replies,
    /// over both families, from an ordinary ephemeral source port and from a source port
    /// that is also a published host port of the same protocol:
    /// - v4 is masqueraded, and MASQUERADE keeps a free source port: the replies then arrive
    ///   addressed to a host address and a published port, exactly what an inbound
    ///   connection to web:8443 (TCP) or dns:5353 (UDP) looks like. Docker draws published
    ///   ports from the ephemeral range, so this happens in real use, DNS over UDP included.
    /// - v6 is not NATed on Docker 20.10, so every reply is addressed to the container
    ///   itself; Docker 28 masquerades v6 as well, and the v6 cases are the v4 ones again.
    ///
    /// The connections are made from the container's network namespace with std sockets:
    /// busybox nc can neither choose its source port (its -p only applies to -l) nor speak
    /// UDP. The packets take the same path as any process's in the container would.
    fn check_outbound_replies(&self) {
        let api = &self.project.api;
        let a = &self.a;
        let mut wrong = Vec::new();
        let v6_seen_as = if Engine::current().nats_ipv6() {
            IpAddr::from(a.host_v6())
        } else {
            IpAddr::from(api.ip6())
        };
        for (remote_ip, seen_as) in
            [(IpAddr::from(a.v4()), IpAddr::from(a.host_v4())), (IpAddr::from(a.v6()), v6_seen_as)]
        {
            let cases = [
                (Proto::Tcp, 0),
                (Proto::Tcp, 18443), // published: web:8443/tcp
                (Proto::Udp, 0),
                (Proto::Udp, 15353), // published: dns:5353/udp
            ];
            for (proto, source_port) in cases {
                let remote = SocketAddr::new(remote_ip, 7000);
                let local = SocketAddr::new(probe::unspecified(remote), source_port);
                let payload = b"e2e-outbound";
                let (echo, reply) = match proto {
                    Proto::Tcp => {
                        let echo = a.tcp_echo(remote, Duration::from_secs(30));
                        let reply = in_netns(&api.netns_path(), || {
                            tcp_roundtrip(local, remote, payload, PATIENT)
                        });
                        (echo, reply)
                    }
                    Proto::Udp => {
                        let echo = a.udp_echo(remote, Duration::from_secs(30));
                        let reply = in_netns(&api.netns_path(), || {
                            udp_roundtrip(local, remote, payload, PATIENT)
                        });
                        (echo, reply)
                    }
                };
                let case = format!("api {proto} from port {source_port} to {remote}");
                let peers = echo.peers();
                if let Some(peer) = peers.first() {
                    assert!(
                        peers.len() == 1 && peer.ip() == seen_as,
                        "{case}: outside host A saw {peers:?}, expected {seen_as}"
                    );
                    assert!(
                        source_port == 0 || peer.port() == source_port,
                        "{case}: NAT changed the source port to {peer}: case not tested"
                    );
                }
                let seen = peers.first().map_or("nothing".into(), ToString::to_string);
                let answered = reply.as_deref() == Some(payload);
                let outcome = if answered { "reply received" } else { "NO REPLY" };
                println!("{case} (A saw {seen}): {outcome}");
                if !answered {
                    wrong.push(format!("{case} (A saw {seen}) got no reply"));
                }
            }
        }
        assert!(wrong.is_empty(), "outbound connections broken:\n{}", wrong.join("\n"));
    }
}

impl Default for SeedBed {
    fn default() -> Self {
        Self::new()
    }
}
