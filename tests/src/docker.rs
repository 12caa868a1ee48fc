//! Docker fixtures driven through the docker CLI: networks and containers that remove
//! themselves on drop.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use crate::cmd::{self, run, try_run};
use crate::probe::{self, EchoServer};

/// Prefix of every container and network the test bed creates.
pub const PREFIX: &str = "guard-e2e-";

/// The docker CLI. The test bed talks to a 20.10 daemon (API 1.41); Debian's docker.io puts
/// the matching client in /usr/bin, which a newer client earlier on `$PATH` would not be. It
/// drives a newer daemon too (Docker 28 accepts API 1.41).
pub fn docker_bin() -> &'static str {
    if Path::new("/usr/bin/docker").is_file() { "/usr/bin/docker" } else { "docker" }
}

/// `docker args`, stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    run(docker_bin(), args)
}

/// The image the containers run: busybox only (no registry to pull from).
pub fn image() -> String {
    std::env::var("GUARD_TEST_IMAGE").unwrap_or_else(|_| "guard-test:busybox".to_owned())
}

pub(crate) fn require_daemon_and_image() {
    assert!(
        Path::new("/usr/bin/docker").is_file() || cmd::find_in_path("docker").is_some(),
        "docker CLI not found: apt-get install -y docker.io"
    );
    if let Err(e) = try_run(docker_bin(), &["version", "--format", "{{.Server.Version}}"]) {
        panic!("dockerd is not answering ({e}): start it with `dockerd > /tmp/dockerd.log 2>&1 &`");
    }
    let image = image();
    assert!(
        try_run(docker_bin(), &["image", "inspect", &image]).is_ok(),
        "image {image} is missing: `cargo xtask test` builds it (busybox-static imported with \
         `docker import`), or set GUARD_TEST_IMAGE"
    );
}

/// Docker 28's bridge-network options for the gateway mode of each family (`nat`, the
/// default; `nat-unprotected`; `routed`; `isolated`).
pub const GATEWAY_MODE_V4: &str = "com.docker.network.bridge.gateway_mode_ipv4";
pub const GATEWAY_MODE_V6: &str = "com.docker.network.bridge.gateway_mode_ipv6";

/// The engine behind the docker CLI, as far as what the tests expect depends on it: the
/// same scenario meets a different firewall on Docker 28 than on 20.10, and the tests must
/// say what each engine does rather than fail on what it fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Engine {
    pub major: u32,
    pub minor: u32,
    /// Podman serving the Docker API (`podman system service`): its version numbers are
    /// Podman's, and its firewall (netavark) is its own.
    pub podman: bool,
}

impl Engine {
    /// The daemon's version (`docker version`), asked once per test process: `cargo xtask
    /// test --engine` swaps daemons between test processes, never during one.
    pub fn current() -> Engine {
        static ENGINE: OnceLock<Engine> = OnceLock::new();
        *ENGINE.get_or_init(|| {
            let version = docker(&["version", "--format", "{{.Server.Version}}"]);
            let components =
                docker(&["version", "--format", "{{range .Server.Components}}{{.Name}};{{end}}"]);
            let engine = Engine::parse(version.trim())
                .unwrap_or_else(|| panic!("cannot read the engine version from {version:?}"));
            Engine { podman: components.contains("Podman Engine"), ..engine }
        })
    }

    /// `20.10.24+dfsg1`, `28.5.2+dfsg4`.
    pub fn parse(version: &str) -> Option<Engine> {
        let mut parts = version.split(['.', '+', '-']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Engine { major, minor, podman: false })
    }

    /// Whether the host reaches a published port on `[::1]`: Docker's docker-proxy listens
    /// on `::` and serves it; rootful Podman publishes by DNAT alone (netavark), which cannot
    /// rewrite what is sent to IPv6 loopback, so nothing answers there.
    pub fn publishes_on_v6_loopback(self) -> bool {
        !self.podman
    }

    /// Docker 28 drops what an outside host routes straight to a container on a bridge network
    /// in the default gateway mode (`nat`): a raw-table PREROUTING drop per container address
    /// (`-d 10.250.0.10 ! -i br-… -j DROP`) and a filter drop for every unpublished port
    /// (`DOCKER ! -i br-… -o br-… -j DROP`). Docker 20.10 forwards all of it. Published ports
    /// stay open to everyone on both.
    pub fn drops_direct_routing(self) -> bool {
        !self.podman && self.major >= 28
    }

    /// Bridge networks have gateway modes (`nat`, `nat-unprotected`, `routed`, `isolated`):
    /// Docker 28 (tested; they came with 27); 20.10 has NAT only.
    pub fn has_gateway_modes(self) -> bool {
        !self.podman && self.major >= 28
    }

    /// Podman's netavark masquerades IPv6 too. Docker 27 and later run ip6tables by default: a bridge network's IPv6 is masqueraded
    /// like its IPv4, and published ports are DNATed on IPv6 too. Docker 20.10 leaves IPv6
    /// alone (no NAT; docker-proxy serves published ports on `::`).
    pub fn nats_ipv6(self) -> bool {
        self.podman || self.major >= 27
    }

    /// Docker 28 grants CAP_BPF and CAP_PERFMON (and its default seccomp profile allows
    /// bpf(2) with CAP_BPF); Docker 20.10 refuses them as "unknown capability".
    pub fn grants_bpf_caps(self) -> bool {
        !self.podman && self.major >= 28
    }
}

/// Removes containers, then networks, whose names carry the test prefix.
pub(crate) fn remove_leftovers() {
    let filter = format!("name={PREFIX}");
    let containers = docker(&["ps", "-aq", "--filter", &filter]);
    for id in containers.split_whitespace() {
        cmd::warn(format!("removing leftover container {id}"));
        let _ = try_run(docker_bin(), &["rm", "-f", "-v", id]);
    }
    let networks = docker(&["network", "ls", "-q", "--filter", &filter]);
    for id in networks.split_whitespace() {
        cmd::warn(format!("removing leftover network {id}"));
        let _ = try_run(docker_bin(), &["network", "rm", id]);
    }
}

/// A user-defined bridge network with fixed subnets (so the outside hosts can route to them
/// and assertions can name addresses), removed on drop.
pub struct Network {
    name: String,
    pub subnet_v4: String,
    pub gateway_v4: Ipv4Addr,
    /// `(subnet, gateway)` when the network has IPv6.
    pub v6: Option<(String, Ipv6Addr)>,
}

impl Network {
    /// `subnet_v4` like "10.250.0.0/24"; its gateway is the subnet's first address, as
    /// Docker would pick. Likewise for `v6` ("fd00:250::/64").
    pub fn create(name: &str, subnet_v4: &str, v6: Option<&str>) -> Self {
        Self::create_with(name, subnet_v4, v6, &[])
    }

    /// Like [`Network::create`], on a network the engine's own firewall leaves to the guard:
    /// Docker 28's gateway mode `nat-unprotected` (NAT and published ports as usual, but no
    /// drop of what is routed straight to a container, published or not), what 20.10 does
    /// on every network. For tests of the guard's own protection (crash, restart, start
    /// race), which would otherwise test Docker 28's drops of direct routing instead.
    pub fn create_guard_only(name: &str, subnet_v4: &str, v6: Option<&str>) -> Self {
        if !Engine::current().has_gateway_modes() {
            return Self::create(name, subnet_v4, v6);
        }
        let mut opts = vec![format!("--opt={GATEWAY_MODE_V4}=nat-unprotected")];
        if v6.is_some() {
            opts.push(format!("--opt={GATEWAY_MODE_V6}=nat-unprotected"));
        }
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        Self::create_with(name, subnet_v4, v6, &opts)
    }

    /// A network in Docker 28's gateway mode `routed` for IPv4: no NAT and no masquerade, the
    /// published container ports open to direct routing (no host port is mapped for them),
    /// every other port dropped. An engine without gateway modes (20.10) gets an ordinary
    /// NAT network.
    pub fn create_routed(name: &str, subnet_v4: &str) -> Self {
        if !Engine::current().has_gateway_modes() {
            return Self::create(name, subnet_v4, None);
        }
        Self::create_with(name, subnet_v4, None, &[&format!("--opt={GATEWAY_MODE_V4}=routed")])
    }

    /// A macvlan network (bridge mode) on `parent`: its containers sit on `parent`'s segment
    /// with their own MAC addresses, with no Docker bridge (and so no bridge gate) on the way.
    pub fn create_macvlan(name: &str, subnet_v4: &str, parent: &str) -> Self {
        let parent = format!("--opt=parent={parent}");
        Self::create_with(name, subnet_v4, None, &["--driver=macvlan", &parent])
    }

    fn create_with(name: &str, subnet_v4: &str, v6: Option<&str>, extra: &[&str]) -> Self {
        assert!(name.starts_with(PREFIX), "network {name} lacks the test prefix");
        let gateway_v4 = first_host_v4(subnet_v4);
        let mut args = vec![
            "network".to_owned(),
            "create".to_owned(),
            format!("--subnet={subnet_v4}"),
            format!("--gateway={gateway_v4}"),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let v6 = v6.map(|subnet| (subnet.to_owned(), first_host_v6(subnet)));
        if let Some((subnet, gateway)) = &v6 {
            args.extend(["--ipv6".to_owned(), format!("--subnet={subnet}")]);
            args.push(format!("--gateway={gateway}"));
        }
        args.push(name.to_owned());
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Self { name: name.to_owned(), subnet_v4: subnet_v4.to_owned(), gateway_v4, v6 }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn subnet_v6(&self) -> &str {
        &self.v6.as_ref().expect("network has no IPv6").0
    }

    /// The Linux bridge that carries it: the host's interface holding its IPv4 gateway, on
    /// every engine (Podman names its own and creates it with the network's first container).
    pub fn bridge(&self) -> String {
        let holder = format!("{}/32", self.gateway_v4);
        let shown = run("ip", &["-o", "-4", "addr", "show", "to", &holder]);
        shown.split_whitespace().nth(1).map_or_else(
            || panic!("no interface holds {holder}, the gateway of {}", self.name),
            |name| name.trim_end_matches(':').to_owned(),
        )
    }

    pub fn gateway_v6(&self) -> Ipv6Addr {
        self.v6.as_ref().expect("network has no IPv6").1
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(e) = try_run(docker_bin(), &["network", "rm", &self.name]) {
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}

fn first_host_v4(cidr: &str) -> Ipv4Addr {
    let base: Ipv4Addr = cidr.split('/').next().unwrap().parse().expect("v4 subnet");
    Ipv4Addr::from(u32::from(base) + 1)
}

fn first_host_v6(cidr: &str) -> Ipv6Addr {
    let base: Ipv6Addr = cidr.split('/').next().unwrap().parse().expect("v6 subnet");
    Ipv6Addr::from(u128::from(base) + 1)
}

/// What to `docker run`.
#[derive(Default)]
pub struct ContainerSpec<'a> {
    /// Without the prefix: "db" runs as "guard-e2e-db".
    pub name: &'a str,
    pub network: Option<&'a Network>,
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    pub labels: &'a [(&'a str, &'a str)],
    /// `-p` arguments, e.g. "10443:443".
    pub publish: &'a [&'a str],
    /// Run with `sh -c`.
    pub command: &'a str,
    /// Container TCP ports to wait for (from the host) before returning.
    pub listens_on: &'a [u16],
    /// `--restart` (e.g. "always"): the daemon starts the container again when it starts.
    pub restart: Option<&'a str>,
    /// `--volume` arguments, e.g. "/tmp/x:/log".
    pub volumes: &'a [&'a str],
}

/// A running container (`docker run -d`), force-removed on drop.
pub struct Container {
    name: String,
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
}

impl Container {
    pub fn run(spec: ContainerSpec) -> Self {
        let name = format!("{PREFIX}{}", spec.name);
        let mut args = vec!["run".to_owned(), "-d".to_owned(), format!("--name={name}")];
        if let Some(network) = spec.network {
            args.push(format!("--network={}", network.name()));
        }
        if let Some(ip) = spec.ip {
            args.push(format!("--ip={ip}"));
        }
        if let Some(ip6) = spec.ip6 {
            args.push(format!("--ip6={ip6}"));
        }
        for (key, value) in spec.labels {
            args.push(format!("--label={key}={value}"));
        }
        for publish in spec.publish {
            args.push(format!("--publish={publish}"));
        }
        if let Some(policy) = spec.restart {
            args.push(format!("--restart={policy}"));
        }
        for volume in spec.volumes {
            args.push(format!("--volume={volume}"));
        }
        args.extend([image(), "sh".to_owned(), "-c".to_owned(), spec.command.to_owned()]);
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let container = Self { name, ip: spec.ip, ip6: spec.ip6 };
        if let Some(ip) = spec.ip {
            for &port in spec.listens_on {
                probe::wait_for_tcp(
                    SocketAddr::from((ip, port)),
                    crate::patience(Duration::from_secs(15)),
                );
            }
        }
        container
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `docker rename`; `new_name` without the prefix, like [`ContainerSpec::name`]. Drop then
    /// removes the container under its new name.
    pub fn rename(&mut self, new_name: &str) {
        let new_name = format!("{PREFIX}{new_name}");
        docker(&["rename", &self.name, &new_name]);
        self.name = new_name;
    }

    /// The fixed IPv4 address it was started with.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip.unwrap_or_else(|| panic!("{} was started without --ip", self.name))
    }

    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6.unwrap_or_else(|| panic!("{} was started without --ip6", self.name))
    }

    /// The MAC address of its interface on `network`.
    pub fn mac(&self, network: &Network) -> String {
        let format =
            format!("{{{{(index .NetworkSettings.Networks \"{}\").MacAddress}}}}", network.name());
        docker(&["inspect", "--format", &format, &self.name]).trim().to_owned()
    }

    /// Attaches it to one more network (`docker network connect`) at `ip`.
    pub fn connect(&self, network: &Network, ip: Ipv4Addr) {
        docker(&["network", "connect", &format!("--ip={ip}"), network.name(), &self.name]);
    }

    /// `docker exec NAME args`; the caller judges the exit status.
    pub fn exec(&self, args: &[&str]) -> Output {
        cmd::output(
            Command::new(docker_bin()).arg("exec").arg(&self.name).args(args),
            cmd::command_timeout(),
        )
        .unwrap_or_else(|e| panic!("docker exec {} {args:?}: {e}", self.name))
    }

    /// `/proc/PID/ns/net` of its main process, for [`crate::netns::in_netns`]: lets a test
    /// send from the container's own network stack with std sockets, where busybox lacks a
    /// tool (its nc has no UDP mode).
    pub fn netns_path(&self) -> PathBuf {
        let pid = docker(&["inspect", "--format", "{{.State.Pid}}", &self.name]);
        let pid = pid.trim();
        assert!(pid != "0", "{} is not running", self.name);
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }

    /// A UDP echo server on `addr` inside the container's network namespace: busybox has no
    /// UDP server, and to the network it is a listener in the container like any other.
    pub fn udp_echo(&self, addr: SocketAddr, lifetime: Duration) -> EchoServer {
        EchoServer::udp(self.netns_path(), addr, lifetime)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = try_run(docker_bin(), &["rm", "-f", "-v", &self.name]) {
            cmd::warn(format!("cleanup: {e}"));
        }
    }
}
